import numpy as np
import pytest

from infinilm_nb.kernels import reference, rope
from tests.helpers import as_float, nans, pick, random, rel_err, tolerance
from tests.kernels.widths import placed, record_widths

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
MAX_POSITIONS = pick(sim=300, gpu=131072)


def fused_views(qkv, q_heads, kv_heads, head_dim):
    """q and k as strided views into a fused QKV output ``[T, (Hq + 2 Hk) * D]``."""
    tokens = qkv.shape[0]
    q = qkv[:, : q_heads * head_dim].reshape(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].reshape(tokens, kv_heads, head_dim)
    return q, k


# GQA ratios 1, 3, 4. Blocks loop over tokens past rope.BLOCKS_PER_SM blocks an SM (the simulator's
# grid has 2 rows of blocks): on the GPU 2500 tokens of 32 + 8 heads, and 70000 of 1 + 1 (past the
# grid's y axis, 65535, too)
SHAPES = pick(
    sim=[(3, 2, 2), (2, 3, 1), (1, 4, 1)], gpu=[(5, 8, 8), (77, 9, 3), (300, 32, 8), (2500, 32, 8), (70000, 1, 1)]
)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])  # uint16: bfloat16
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens,q_heads,kv_heads", SHAPES)
def test_rope_on_fused_qkv_views(kb, rng, dtype, head_dim, tokens, q_heads, kv_heads):
    scaling = LLAMA3_SCALING if head_dim == 128 else None
    cos_sin = reference.rope_cache(head_dim, MAX_POSITIONS, 500000.0 if scaling else 10000.0, scaling)
    positions = rng.integers(0, MAX_POSITIONS, tokens).astype(np.int32)
    qkv = random(rng, (tokens, (q_heads + 2 * kv_heads) * head_dim), dtype, scale=2.0)
    qkv_d = kb.asarray(qkv.copy())
    q_d, k_d = fused_views(qkv_d, q_heads, kv_heads, head_dim)
    assert rope.rope(q_d, k_d, kb.asarray(positions), kb.asarray(cos_sin)) is None

    want = as_float(qkv).astype(np.float32)
    reference.rope(*fused_views(want, q_heads, kv_heads, head_dim), positions, cos_sin)
    got = kb.to_host(qkv_d)
    qk = (q_heads + kv_heads) * head_dim
    assert rel_err(got[:, :qk], want[:, :qk]) < tolerance(dtype)
    np.testing.assert_array_equal(got[:, qk:], qkv[:, qk:])  # v is untouched


def test_rope_on_separate_arrays(kb, rng):
    tokens, head_dim = 4, 10
    cos_sin = reference.rope_cache(head_dim, 50, 10000.0, {"rope_type": "linear", "factor": 2.0})
    positions = np.array([7, 0, 49, 7], np.int32)
    q = random(rng, (tokens, 3, head_dim))
    k = random(rng, (tokens, 1, head_dim))
    q_d, k_d = kb.asarray(q.copy()), kb.asarray(k.copy())
    rope.rope(q_d, k_d, kb.asarray(positions), kb.asarray(cos_sin))
    reference.rope(q, k, positions, cos_sin)
    assert rel_err(kb.to_host(q_d), q) < 1e-5
    assert rel_err(kb.to_host(k_d), k) < 1e-5


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("qkv_aligned,table_aligned", [(True, True), (True, False), (False, True)])
def test_rope_takes_the_16_byte_paths_only_when_aligned(kb, rng, monkeypatch, dtype, qkv_aligned, table_aligned):
    widths = record_widths(monkeypatch, rope)
    tokens, q_heads, kv_heads, head_dim = 3, 2, 1, 32
    cos_sin = reference.rope_cache(head_dim, 40, 10000.0)
    positions = rng.integers(0, 40, tokens).astype(np.int32)
    qkv = random(rng, (tokens, (q_heads + 2 * kv_heads) * head_dim), dtype)
    qkv_d = placed(kb, qkv, qkv_aligned)
    table = placed(kb, cos_sin, table_aligned)
    rope.rope(*fused_views(qkv_d, q_heads, kv_heads, head_dim), kb.asarray(positions), table)
    want = as_float(qkv).astype(np.float32)
    reference.rope(*fused_views(want, q_heads, kv_heads, head_dim), positions, cos_sin)
    assert rel_err(kb.to_host(qkv_d), want) < tolerance(dtype)
    vec = 16 // np.dtype(dtype).itemsize if qkv_aligned else 1
    assert widths == [vec, 4 if qkv_aligned and table_aligned else 1]


def test_rope_rejects_bad_arguments(kb, rng):
    cos_sin = kb.asarray(reference.rope_cache(8, 16, 10000.0))
    positions = kb.asarray(np.arange(3, dtype=np.int32))
    qkv = kb.asarray(random(rng, (3, 32)))
    q, k = fused_views(qkv, 2, 1, 8)
    with pytest.raises(ValueError, match="rope: head_dim \\(q's last axis\\) must be even, got 7"):
        rope.rope(kb.asarray(random(rng, (3, 2, 7))), kb.asarray(random(rng, (3, 1, 7))), positions, cos_sin)
    with pytest.raises(ValueError, match=r"rope: k must have shape \(3, \*, 8\), got \(3, 1, 6\)"):
        rope.rope(q, kb.asarray(random(rng, (3, 1, 6))), positions, cos_sin)
    with pytest.raises(ValueError, match=r"rope: k must have the dtype of q \(float32\), got float16"):
        rope.rope(q, kb.asarray(random(rng, (3, 1, 8), np.float16)), positions, cos_sin)
    with pytest.raises(ValueError, match="rope: positions must be int32, got int64"):
        rope.rope(q, k, kb.asarray(np.arange(3)), cos_sin)
    with pytest.raises(ValueError, match=r"rope: positions must have shape \(3,\), got \(4,\)"):
        rope.rope(q, k, kb.asarray(np.arange(4, dtype=np.int32)), cos_sin)
    with pytest.raises(ValueError, match=r"rope: cos_sin must have shape \(\*, 8\), got \(16, 16\)"):
        rope.rope(q, k, positions, kb.asarray(reference.rope_cache(16, 16, 10000.0)))
    with pytest.raises(ValueError, match="rope: cos_sin must be float32, got float16"):
        rope.rope(q, k, positions, kb.asarray(reference.rope_cache(8, 16, 10000.0).astype(np.float16)))
    with pytest.raises(ValueError, match="rope: q must be unit-stride along its last axis"):
        rope.rope(kb.asarray(random(rng, (3, 2, 16)))[:, :, ::2], k, positions, cos_sin)
    with pytest.raises(ValueError, match=r"rope: k must have non-negative strides, got \(-128, "):
        rope.rope(q, k[::-1], positions, cos_sin)


def qkv_views(qkv, q_heads, kv_heads, head_dim):
    """q, k and v as strided views into a fused QKV output."""
    q, k = fused_views(qkv, q_heads, kv_heads, head_dim)
    v = qkv[:, (q_heads + kv_heads) * head_dim :].reshape(qkv.shape[0], kv_heads, head_dim)
    return q, k, v


def _fused_case(kb, rng, dtype, tokens, q_heads, kv_heads, head_dim, block_size=16, aligned=True):
    """Run rope_store_kv on fresh data into NaN-poisoned caches; return (got, want) of the QKV buffer
    and of both caches. Slots are scattered over the blocks; every third token is padding (-1)."""
    cos_sin = reference.rope_cache(head_dim, MAX_POSITIONS, 500000.0, LLAMA3_SCALING if head_dim == 128 else None)
    positions = rng.integers(0, MAX_POSITIONS, tokens).astype(np.int32)
    qkv = random(rng, (tokens, (q_heads + 2 * kv_heads) * head_dim), dtype, scale=2.0)
    blocks = tokens // block_size + 3
    slots = rng.permutation(blocks * block_size)[:tokens].astype(np.int32)
    slots[::3] = -1
    shape = (blocks, block_size, kv_heads, head_dim)
    caches = [nans(shape, dtype) for _ in range(2)]
    qkv_d = placed(kb, qkv, aligned)
    caches_d = [placed(kb, c, aligned) for c in caches]
    assert rope.rope_store_kv(*qkv_views(qkv_d, q_heads, kv_heads, head_dim), kb.asarray(positions),
                              kb.asarray(cos_sin), *caches_d, kb.asarray(slots)) is None
    want = qkv.copy()
    reference.rope_store_kv(*qkv_views(want, q_heads, kv_heads, head_dim), positions, cos_sin, *caches, slots)
    return [(kb.to_host(qkv_d), want)] + [(kb.to_host(g), w) for g, w in zip(caches_d, caches)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("tokens,q_heads,kv_heads", SHAPES[:4])
def test_rope_store_kv_equals_rope_then_store_kv(kb, rng, dtype, head_dim, tokens, q_heads, kv_heads):
    for got, want in _fused_case(kb, rng, dtype, tokens, q_heads, kv_heads, head_dim):
        written = ~np.isnan(as_float(want))
        np.testing.assert_array_equal(np.isnan(as_float(got)), ~written)  # untouched slots keep their NaN
        assert rel_err(got[written], want[written]) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("aligned", [True, False])
def test_rope_store_kv_takes_the_16_byte_path_only_when_aligned(kb, rng, monkeypatch, dtype, aligned):
    widths = record_widths(monkeypatch, rope)
    for got, want in _fused_case(kb, rng, dtype, 5, 2, 1, 32, block_size=4, aligned=aligned):
        written = ~np.isnan(as_float(want))
        assert rel_err(got[written], want[written]) < tolerance(dtype)
    assert widths[0] == (16 // np.dtype(dtype).itemsize if aligned else 1)


def test_rope_store_kv_rejects_bad_arguments(kb, rng):
    cos_sin = kb.asarray(reference.rope_cache(8, 16, 10000.0))
    positions, slots = kb.asarray(np.arange(3, dtype=np.int32)), kb.asarray(np.arange(3, dtype=np.int32))
    q, k, v = qkv_views(kb.asarray(random(rng, (3, 32))), 2, 1, 8)
    cache = kb.asarray(random(rng, (2, 4, 1, 8)))
    with pytest.raises(ValueError, match=r"rope_store_kv: v must have shape \(3, 1, 8\), got \(3, 2, 8\)"):
        rope.rope_store_kv(q, k, kb.asarray(random(rng, (3, 2, 8))), positions, cos_sin, cache, cache, slots)
    with pytest.raises(ValueError, match=r"rope_store_kv: k_cache must have shape \(\*, \*, 1, 8\), got \(2, 4, 2, 8\)"):
        wide = kb.asarray(random(rng, (2, 4, 2, 8)))
        rope.rope_store_kv(q, k, v, positions, cos_sin, wide, wide, slots)
    with pytest.raises(ValueError, match=r"rope_store_kv: v_cache must have shape \(2, 4, 1, 8\), got \(3, 4, 1, 8\)"):
        rope.rope_store_kv(q, k, v, positions, cos_sin, cache, kb.asarray(random(rng, (3, 4, 1, 8))), slots)
    with pytest.raises(ValueError, match=r"rope_store_kv: k_cache must have the dtype of k \(float32\), got float16"):
        half = kb.asarray(random(rng, (2, 4, 1, 8), np.float16))
        rope.rope_store_kv(q, k, v, positions, cos_sin, half, half, slots)
    with pytest.raises(ValueError, match="rope_store_kv: slot_mapping must be int32, got int64"):
        rope.rope_store_kv(q, k, v, positions, cos_sin, cache, cache, kb.asarray(np.arange(3)))
