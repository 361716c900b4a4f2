"""Issue 4's GPU check: float16 on cuda against transformers float16 on the same GPU, teacher-forced."""

from __future__ import annotations

import numpy as np
import pytest

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.cache import PagedKVCache
from infinilm_nb.runtime.llama import load_model
from tests.runtime.hf_models import save_tiny_model
from tests.runtime.steps import CachedSeq, run_step

TOKENS = 512
SIZE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float16_top1_agrees_with_transformers_over_512_tokens(tmp_path, family):
    import torch

    from tests.runtime.hf_models import load_hf_model

    directory = save_tiny_model(tmp_path / family, family, dtype="float16", **SIZE)
    tokens = np.random.default_rng(7).integers(3, 300, TOKENS).tolist()
    hf = load_hf_model(directory).to(device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = hf(torch.tensor([tokens], device="cuda")).logits[0].float().argmax(-1).cpu().numpy()

    backend = get_backend("cuda")
    model = load_model(directory, backend, dtype="float16", progress=False)
    cache = PagedKVCache(backend, model.config, num_blocks=TOKENS // 16 + 2, block_size=16, dtype=np.float16)
    seq = CachedSeq(cache)
    got = [int(np.argmax(run_step(model, [(seq, [token])])[0])) for token in tokens]  # one decode step each
    agreement = float(np.mean(np.array(got) == want))
    print(f"{family}: teacher-forced top-1 agreement with transformers fp16 over {TOKENS} tokens: {agreement:.4f}")
    assert agreement >= 0.99
