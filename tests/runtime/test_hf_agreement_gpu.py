"""Issue 4's GPU check: float16 on cuda against transformers on the same GPU, teacher-forced.

The random model is initialised variance-preserving (weights ``N(0, 1/hidden)``, as a trained model's
layers roughly are), so that its top-1 token is well defined: with the suite's usual gain of 2.4 per
layer, transformers' own float16 run already disagrees with its float32 run on a few percent of
positions, and no float16 engine could be measured against it. Even so transformers' float16 run
flips a few near-ties (on an H100 at this size: 99.2% agreement with its own float32 run for llama,
97.3% for qwen2), and two float16 runs flip different ones, so their agreement with each other is
no measure of either. The checks are against the exact answer, transformers' float32 run: at least
99% agreement, and at least the agreement transformers' own float16 run reaches. Every figure goes
to the JUnit XML (``record_property``).

Head dim 64 and a GQA group of 4, so that every float16 tensor-core path runs: the first
``PREFILL`` tokens go in one step (prefill GEMM and prefill attention on tensor cores), then one
decode step per token (decode attention on tensor cores, split over the context).
"""

from __future__ import annotations

import numpy as np
import pytest

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.cache import PagedKVCache
from infinilm_nb.runtime.llama import load_model
from tests.runtime.hf_models import save_tiny_model
from tests.runtime.steps import CachedSeq, run_step

TOKENS = 512
PREFILL = 256
SIZE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float16_top1_agrees_with_transformers_after_a_prefill(tmp_path, family, record_property):
    import torch

    from tests.runtime.hf_models import load_hf_model

    scale = SIZE["hidden_size"] ** -0.5
    directory = save_tiny_model(tmp_path / family, family, dtype="float16", scale=scale, **SIZE)
    tokens = np.random.default_rng(7).integers(3, 300, TOKENS).tolist()
    ids = torch.tensor([tokens], device="cuda")
    top1 = {}
    with torch.no_grad():
        for dtype in (torch.float16, torch.float32):
            hf = load_hf_model(directory).to(device="cuda", dtype=dtype)
            top1[dtype] = hf(ids).logits[0, PREFILL - 1 :].float().argmax(-1).cpu().numpy()
            del hf

    backend = get_backend("cuda")
    model = load_model(directory, backend, dtype="float16", progress=False)
    cache = PagedKVCache(backend, model.config, num_blocks=TOKENS // 16 + 2, block_size=16, dtype=np.float16)
    seq = CachedSeq(cache)
    first = run_step(model, [(seq, tokens[:PREFILL])])[0]
    decoded = [run_step(model, [(seq, [token])])[0] for token in tokens[PREFILL:]]  # one decode step each
    got = np.array([int(np.argmax(logits)) for logits in [first, *decoded]])  # positions PREFILL - 1 ..
    figures = {
        "ours_fp16_vs_hf_fp16": float(np.mean(got == top1[torch.float16])),
        "ours_fp16_vs_hf_fp32": float(np.mean(got == top1[torch.float32])),
        "hf_fp16_vs_hf_fp32": float(np.mean(top1[torch.float16] == top1[torch.float32])),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"{family}: teacher-forced top-1 agreement over the last {TOKENS - PREFILL + 1} of {TOKENS} tokens: {figures}")
    assert figures["ours_fp16_vs_hf_fp32"] >= 0.99, figures
    assert figures["ours_fp16_vs_hf_fp32"] >= figures["hf_fp16_vs_hf_fp32"], figures
