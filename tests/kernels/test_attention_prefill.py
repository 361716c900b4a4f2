"""GPU tests of the tensor-core prefill attention (attention_prefill.py) and its dispatch from
paged_attention / static_attention with ``max_query_len``.

Against reference.paged_attention on random float16 data: prompts with and without a cached
prefix, batches mixing several prefills with decode tokens and an idle sequence, GQA 1/3/4, head
dims 64/128, block sizes 16/32, q as a view into a fused QKV buffer. GPU only (inline PTX), except
the fallback test, which also checks in the simulator that the hint is accepted and harmless.
"""

import numpy as np
import pytest

from infinilm_nb.kernels import attention_prefill, reference, wgmma
from infinilm_nb.kernels.common import compiled
from tests.helpers import pick, poisoned, random, rel_err, tolerance
from tests.kernels.test_attention import _paged_batch

F16 = np.float16
# (K / V tile pairs, queries per block, wgmma): the ring of 2 tile pairs dispatched on mma.sync and a
# ring of 3 (more dynamic shared memory), blocks of 128 queries (8 warps), and wgmma (Hopper only)
# for one and two warpgroups (dispatched there: 128 queries)
VARIANTS = [(2, 64, False), (3, 64, False), (2, 128, False), (2, 64, True), (2, 128, True)]


def _skip_wgmma_before_hopper(on_wgmma):
    if on_wgmma and not wgmma.supported():
        pytest.skip("wgmma needs a Hopper GPU")


def _variant_id(variant) -> str:
    kv_stages, block_q, on_wgmma = variant
    return f"stages{kv_stages}-q{block_q}" + ("-wgmma" if on_wgmma else "")


@pytest.fixture(params=VARIANTS, ids=_variant_id)
def variant(request, monkeypatch):
    """Dispatch the prefill variant ``(kv_stages, block_q, wgmma)`` for the test."""
    _skip_wgmma_before_hopper(request.param[2])
    monkeypatch.setattr(attention_prefill, "variant", lambda: request.param)
    return request.param
# (q heads, kv heads, head_dim, block_size): GQA 4, 3 and 1
CONFIGS = [(32, 8, 128, 16), (9, 3, 64, 32), (4, 4, 128, 32), (12, 4, 64, 16)]
BATCHES = {  # (queries n, context length L) per sequence
    "prompt": [(300, 300)],
    "prompt_with_prefix": [(100, 357)],
    "tile_edges": [(64, 64), (65, 130), (63, 63), (1, 1)],
    "mixed": [(200, 200), (1, 77), (0, 9), (70, 300), (1, 1000), (33, 33), (129, 140)],
}


def _q_view(kb, rng, tokens, q_heads, kv_heads, dim):
    """q on the host and as the device view into a fused QKV buffer that the runtime passes."""
    fused = random(rng, (tokens, (q_heads + 2 * kv_heads) * dim), F16)
    q = fused[:, : q_heads * dim].reshape(tokens, q_heads, dim)
    return q, kb.asarray(fused)[:, : q_heads * dim].reshape(tokens, q_heads, dim)


def _spy(monkeypatch) -> list:
    """Record each launch of the tensor-core kernel (and still run it)."""
    launched, real = [], attention_prefill.prefill_attention

    def spy(*args):
        launched.append(args[0].shape)
        real(*args)

    monkeypatch.setattr(attention_prefill, "prefill_attention", spy)
    return launched


def _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, max_query_len):
    tables, context_lens, qsl, num_blocks = _paged_batch(rng, seqs, block_size)
    tokens = int(qsl[-1])
    q, q_dev = _q_view(kb, rng, tokens, q_heads, kv_heads, dim)
    k_cache = random(rng, (num_blocks, block_size, kv_heads, dim), F16)
    v_cache = random(rng, (num_blocks, block_size, kv_heads, dim), F16)
    scale = dim**-0.5
    out = poisoned(kb, (tokens, q_heads, dim), F16)
    kb.ops.paged_attention(
        q_dev, kb.asarray(k_cache), kb.asarray(v_cache), kb.asarray(tables), kb.asarray(context_lens),
        kb.asarray(qsl), scale, out, max_query_len=max_query_len,
    )
    want = reference.paged_attention(
        q, k_cache, v_cache, tables, context_lens, qsl, scale, np.empty((tokens, q_heads, dim), np.float32)
    )
    return kb.to_host(out), want


@pytest.mark.gpu
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("q_heads,kv_heads,dim,block_size", CONFIGS)
def test_prefill_attention_matches_reference(kb, rng, monkeypatch, variant, q_heads, kv_heads, dim, block_size,
                                             batch):
    seqs = BATCHES[batch]
    launched = _spy(monkeypatch)
    got, want = _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, max(n for n, _ in seqs))
    assert len(launched) == 1
    assert rel_err(got, want) < tolerance(F16)


@pytest.mark.gpu
def test_prefill_attention_long_prompt(kb, rng, monkeypatch, variant):
    launched = _spy(monkeypatch)
    got, want = _run_paged(kb, rng, [(2048, 2048), (1, 2048)], 8, 2, 128, 16, 2048)
    assert len(launched) == 1
    assert rel_err(got, want) < tolerance(F16)


@pytest.mark.gpu
def test_static_attention_prefill_matches_reference(kb, rng, monkeypatch, variant):
    q_heads, kv_heads, dim, max_len = 8, 2, 128, 500  # a static length that is not a power of two
    seqs = [(130, 400), (1, 500), (0, 3), (77, 77)]
    num_slots = len(seqs) + 2
    slots = rng.permutation(num_slots)[: len(seqs)].astype(np.int32)
    context_lens = np.array([length for _, length in seqs], np.int32)
    qsl = np.concatenate([[0], np.cumsum([n for n, _ in seqs])]).astype(np.int32)
    tokens = int(qsl[-1])
    q, q_dev = _q_view(kb, rng, tokens, q_heads, kv_heads, dim)
    k_cache = random(rng, (num_slots, max_len, kv_heads, dim), F16)
    v_cache = random(rng, (num_slots, max_len, kv_heads, dim), F16)
    launched = _spy(monkeypatch)
    out = poisoned(kb, (tokens, q_heads, dim), F16)
    kb.ops.static_attention(
        q_dev, kb.asarray(k_cache), kb.asarray(v_cache), kb.asarray(slots), kb.asarray(context_lens),
        kb.asarray(qsl), 0.1, out, max_query_len=130,
    )
    want = reference.static_attention(
        q, k_cache, v_cache, slots, context_lens, qsl, 0.1, np.empty((tokens, q_heads, dim), np.float32)
    )
    assert len(launched) == 1
    assert rel_err(kb.to_host(out), want) < tolerance(F16)


@pytest.mark.parametrize(
    "case", ["no_hint", "short_queries", "switched_off", "block_size_not_power_of_two", "head_dim_96"]
)
def test_prefill_attention_falls_back_to_cuda_cores(kb, rng, monkeypatch, case):
    dim = 96 if case == "head_dim_96" else pick(sim=16, gpu=64)  # the simulator never takes the path
    block_size = 12 if case == "block_size_not_power_of_two" else pick(sim=4, gpu=16)
    seqs = pick(sim=[(5, 7), (1, 4)], gpu=[(40, 50), (1, 20)])
    hint = {"no_hint": None, "short_queries": attention_prefill.MIN_QUERIES - 1}.get(case, 40)
    if case == "switched_off":
        monkeypatch.setattr(attention_prefill, "ENABLED", False)
    monkeypatch.setattr(attention_prefill, "prefill_attention", lambda *args: pytest.fail("took the tensor-core path"))
    got, want = _run_paged(kb, rng, seqs, 4, 2, dim, block_size, hint)
    assert rel_err(got, want) < tolerance(F16)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_stages,block_q,on_wgmma", VARIANTS, ids=[_variant_id(v) for v in VARIANTS])
@pytest.mark.parametrize("dim", attention_prefill.HEAD_DIMS)
def test_prefill_kernel_is_tensor_cores_without_local_memory(dim, kv_stages, block_q, on_wgmma):
    _skip_wgmma_before_hopper(on_wgmma)
    kernel = compiled(attention_prefill.prefill_kernel(dim, kv_stages, block_q, on_wgmma),
                      attention_prefill.SIGNATURE)
    ptx = "".join(kernel.inspect_asm().values())
    mma_sync = ["mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "ldmatrix.sync.aligned.m8n8.x4.trans"]
    wgmma_ops = ["wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16", "fence.proxy.async",
                 f"wgmma.mma_async.sync.aligned.m64n{dim}k16.f32.f16.f16", ", p, 1, 1, 1;"]  # P V: transposed B
    for instruction in wgmma_ops if on_wgmma else mma_sync:
        assert instruction in ptx, instruction
    for instruction in mma_sync if on_wgmma else []:
        assert instruction not in ptx, instruction
    assert kernel.get_local_mem_per_thread() == 0


def test_prefill_kernel_variants_are_checked():
    with pytest.raises(ValueError, match=r"kv_stages must be at least 2 \(a ring of K/V tile pairs\), got 1"):
        attention_prefill.prefill_kernel(128, 1)
    with pytest.raises(ValueError, match="block_q must be one of"):
        attention_prefill.prefill_kernel(128, 2, 96)


def test_a_hopper_takes_wgmma_with_128_queries_unless_switched_off(monkeypatch):
    on_hopper = wgmma.supported()
    stages = attention_prefill.KV_STAGES
    assert attention_prefill.variant() == ((stages, 128, True) if on_hopper and wgmma.ENABLED else (stages, 64, False))
    monkeypatch.setattr(wgmma, "ENABLED", False)
    assert attention_prefill.variant() == (stages, 64, False)
