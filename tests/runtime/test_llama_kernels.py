"""The model on the kernel backend (the GPU, else numba's simulator) against the cpu backend and HF."""

from __future__ import annotations

import numpy as np
import pytest

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.cache import PagedKVCache, StaticKVCache
from infinilm_nb.runtime.llama import load_model
from tests.conftest import ON_GPU
from tests.helpers import pick, rel_err
from tests.runtime.hf_models import FAMILIES, TINIEST, hf_logits, load_hf_model, save_tiny_model
from tests.runtime.steps import CachedSeq, run_step

# Below the tiniest vocab (64). On the GPU the prompt outgrows one attention partition (256 keys),
# so the decode step runs the split-context path with its merge.
PROMPT = pick(sim=[5, 17, 59, 42, 7], gpu=[(7 * i + 3) % 64 for i in range(300)])


@pytest.fixture(scope="module", params=pick(sim=["llama"], gpu=list(FAMILIES)))
def kernel_model_dir(request, tmp_path_factory):
    """On the GPU each tiny family; in the simulator (one Python thread per CUDA thread) only the
    tiniest Llama: 1 layer, hidden 16, 2 q heads / 1 kv head of 8, vocab 64, Llama-3 rope scaling."""
    sizes = {"max_position_embeddings": 1024} if ON_GPU else TINIEST
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param, tokenizer=False, **sizes)


TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


@pytest.mark.parametrize("dtype", pick(sim=["float32", "bfloat16"], gpu=["float32", "float16", "bfloat16"]))
@pytest.mark.parametrize("cache_kind", pick(sim=["paged"], gpu=["paged", "static"]))
def test_kernel_backend_matches_cpu_and_transformers(kb, kernel_model_dir, dtype, cache_kind):
    """Prefill then decode on the kernels (a mixed batch included) equals the cpu backend in float32.

    float16 is held to 1e-2: the cpu backend's own float16 run is ~2e-3 from float32 here; bfloat16
    (8 mantissa bits to float16's 11) to 5e-2.
    """
    hf = load_hf_model(kernel_model_dir)
    models = {
        "cpu": load_model(kernel_model_dir, get_backend("cpu"), dtype=np.float32, progress=False),
        "kernel": load_model(kernel_model_dir, kb, dtype=dtype, progress=False),
    }
    got = {}
    for name, model in models.items():
        if cache_kind == "paged":
            cache = PagedKVCache(model.backend, model.config, pick(8, 64), pick(4, 16), model.dtype)
        else:
            cache = StaticKVCache(model.backend, model.config, 2, pick(16, 512), model.dtype)
        a, b = CachedSeq(cache, spacer=True), CachedSeq(cache)
        prefill = run_step(model, [(a, PROMPT)])
        mixed = run_step(model, [(a, [int(prefill[0].argmax())]), (b, PROMPT[:3])])
        got[name] = np.concatenate([prefill, mixed])
    assert rel_err(got["kernel"], got["cpu"]) < TOLERANCE[dtype]
    hf_tol = 1e-4 if dtype == "float32" else TOLERANCE[dtype]
    assert rel_err(got["kernel"][0], hf_logits(hf, PROMPT)[-1]) < hf_tol
    assert rel_err(got["kernel"][2], hf_logits(hf, PROMPT[:3])[-1]) < hf_tol
