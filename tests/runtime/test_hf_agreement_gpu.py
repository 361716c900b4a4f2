"""Issue 4's GPU check: float16 on cuda against transformers on the same GPU, teacher-forced.

The random model is initialised variance-preserving (weights ``N(0, 1/hidden)``, as a trained model's
layers roughly are), so that its top-1 token is well defined: with the suite's usual gain of 2.4 per
layer, transformers' own float16 run already disagrees with its float32 run on a few percent of
positions, and no float16 engine could be measured against it. Even so transformers' float16 run
flips a few near-ties (on an H100 at this size: 99.2% agreement with its own float32 run for llama,
97.3% for qwen2), and two float16 runs flip different ones, so their agreement with each other is
no measure of either. The checks are against the exact answer, transformers' float32 run:

- every *decisive* position agrees: one where float32's top-1 leads the runner-up by at least
  ``NEAR_TIE_ULPS`` float16 spacings of the top logit. The logits are float16, so a smaller lead is
  within the rounding of the logits themselves. (On an H200, qwen2 flipped 2 or 3 of its 4 such
  positions, leads of 0.3-1.4 spacings, and which ones moved with the decode attention's partition
  count, i.e. with the order of its float16 sums; no position leading by 2 spacings or more flipped.)
- near-ties are few (``MAX_NEAR_TIES`` of the positions), so that the first check covers most of them;
- overall, at least the agreement transformers' own float16 run reaches.

Every figure goes to the JUnit XML (``record_property``).

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
NEAR_TIE_ULPS = 2  # a lead under 2 float16 spacings of the top logit is a near-tie
MAX_NEAR_TIES = 0.05  # of the positions


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float16_top1_agrees_with_transformers_after_a_prefill(tmp_path, family, record_property):
    import torch

    from tests.runtime.hf_models import load_hf_model

    scale = SIZE["hidden_size"] ** -0.5
    directory = save_tiny_model(tmp_path / family, family, dtype="float16", scale=scale, **SIZE)
    tokens = np.random.default_rng(7).integers(3, 300, TOKENS).tolist()
    ids = torch.tensor([tokens], device="cuda")
    hf_logits = {}
    with torch.no_grad():
        for dtype in (torch.float16, torch.float32):
            hf = load_hf_model(directory).to(device="cuda", dtype=dtype)
            hf_logits[dtype] = hf(ids).logits[0, PREFILL - 1 :].float().cpu().numpy()
            del hf
    top1 = {dtype: logits.argmax(-1) for dtype, logits in hf_logits.items()}
    ranked = np.sort(hf_logits[torch.float32], axis=-1)
    spacing = np.spacing(np.abs(ranked[:, -1]).astype(np.float16)).astype(np.float32)
    decisive = ranked[:, -1] - ranked[:, -2] >= NEAR_TIE_ULPS * spacing

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
        "ours_fp16_vs_hf_fp32_decisive": float(np.mean(got[decisive] == top1[torch.float32][decisive])),
        "near_ties": float(np.mean(~decisive)),
    }
    for name, value in figures.items():
        record_property(name, value)
    print(f"{family}: teacher-forced top-1 agreement over the last {TOKENS - PREFILL + 1} of {TOKENS} tokens: {figures}")
    assert figures["near_ties"] <= MAX_NEAR_TIES, figures
    flipped = np.nonzero(decisive & (got != top1[torch.float32]))[0]
    assert flipped.size == 0, (f"decisive positions {flipped.tolist()} disagree with float32", figures)
    assert figures["ours_fp16_vs_hf_fp32"] >= figures["hf_fp16_vs_hf_fp32"], figures
