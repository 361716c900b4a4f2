"""reference.py against plain, independent formulas: explicit loops, math.exp, complex rotations.

The kernels are tested against reference.py, so this file is what makes reference.py trustworthy.
NumPy only: nothing here launches a kernel.
"""

import cmath
import math

import numpy as np
import pytest

from infinilm_nb.kernels import reference
from tests.helpers import random, rel_err, tolerance

# ---------------------------------------------------------------- attention and the KV caches


def dense_attention(q, keys, values, scale):
    """One sequence's causal attention, in Python loops: q ``[n, Hq, D]`` are its last n positions."""
    n, heads, dim = q.shape
    length, kv_heads, _ = keys.shape
    group = heads // kv_heads
    out = np.zeros((n, heads, dim))
    for i in range(n):
        last = length - n + i
        for h in range(heads):
            kv = h // group
            scores = [
                scale * sum(float(q[i, h, c]) * float(keys[j, kv, c]) for c in range(dim)) for j in range(last + 1)
            ]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            total = sum(weights)
            for c in range(dim):
                out[i, h, c] = sum(w * float(values[j, kv, c]) for j, w in enumerate(weights)) / total
    return out


def paged_layout(rng, keys, values, block_size, dtype):
    """Scatter each sequence's dense K/V into a paged cache through a shuffled (non-contiguous) block
    table; unused slots hold large garbage so that any read past a context shows."""
    kv_heads, dim = keys[0].shape[1:]
    needed = [-(-len(k) // block_size) for k in keys]
    num_blocks = sum(needed) + 3
    order = rng.permutation(num_blocks)
    k_cache = (rng.standard_normal((num_blocks, block_size, kv_heads, dim)) * 100).astype(dtype)
    v_cache = (rng.standard_normal((num_blocks, block_size, kv_heads, dim)) * 100).astype(dtype)
    tables = np.zeros((len(keys), max(needed)), np.int32)
    used = 0
    for b, (k, v) in enumerate(zip(keys, values)):
        tables[b, : needed[b]] = order[used : used + needed[b]]
        used += needed[b]
        for pos in range(len(k)):
            block = tables[b, pos // block_size]
            k_cache[block, pos % block_size] = k[pos]
            v_cache[block, pos % block_size] = v[pos]
    return k_cache, v_cache, tables


# (context length, queries) per sequence with block_size 4: prefill ending on a block boundary, one
# past it, a prefill after a cached prefix, decodes on and past a boundary, and a sequence idle this step
SEQUENCES = [(8, 8), (9, 9), (9, 3), (5, 1), (4, 1), (6, 0)]


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_paged_attention_equals_dense_causal_attention(rng, group, dtype):
    kv_heads, dim, block_size, scale = 2, 8, 4, 0.3
    heads = kv_heads * group
    keys = [random(rng, (length, kv_heads, dim), dtype) for length, _ in SEQUENCES]
    values = [random(rng, (length, kv_heads, dim), dtype) for length, _ in SEQUENCES]
    queries = [random(rng, (n, heads, dim), dtype) for _, n in SEQUENCES]
    k_cache, v_cache, tables = paged_layout(rng, keys, values, block_size, dtype)
    lens = np.array([length for length, _ in SEQUENCES], np.int32)
    qsl = np.concatenate([[0], np.cumsum([n for _, n in SEQUENCES])]).astype(np.int32)
    q = np.concatenate(queries)
    out = np.full(q.shape, np.nan, dtype)
    reference.paged_attention(q, k_cache, v_cache, tables, lens, qsl, scale, out)
    want = np.concatenate([dense_attention(qs, k, v, scale) for qs, k, v in zip(queries, keys, values)])
    assert rel_err(out, want) < tolerance(dtype)


def test_static_attention_equals_paged_attention_on_the_same_tokens(rng):
    kv_heads, heads, dim, max_len, scale = 2, 6, 8, 12, 0.25
    sequences = [(12, 5), (7, 1), (3, 3)]
    slots = np.array([2, 0, 3], np.int32)
    keys = [random(rng, (length, kv_heads, dim)) for length, _ in sequences]
    values = [random(rng, (length, kv_heads, dim)) for length, _ in sequences]
    static_k = random(rng, (4, max_len, kv_heads, dim), scale=100.0)
    static_v = random(rng, (4, max_len, kv_heads, dim), scale=100.0)
    for slot, k, v in zip(slots, keys, values):
        static_k[slot, : len(k)] = k
        static_v[slot, : len(v)] = v
    k_cache, v_cache, tables = paged_layout(rng, keys, values, 4, np.float32)
    lens = np.array([length for length, _ in sequences], np.int32)
    qsl = np.concatenate([[0], np.cumsum([n for _, n in sequences])]).astype(np.int32)
    q = random(rng, (int(qsl[-1]), heads, dim))
    static_out = reference.static_attention(q, static_k, static_v, slots, lens, qsl, scale, np.empty_like(q))
    paged_out = reference.paged_attention(q, k_cache, v_cache, tables, lens, qsl, scale, np.empty_like(q))
    assert rel_err(static_out, paged_out) < 1e-6


def test_store_kv_writes_each_token_to_its_slot_and_nothing_else(rng):
    tokens, kv_heads, dim, blocks, block_size = 7, 2, 4, 5, 3
    k, v = random(rng, (tokens, kv_heads, dim)), random(rng, (tokens, kv_heads, dim))
    slots = np.array([4, 0, -1, 14, 8, -1, 9], np.int32)
    k_cache = np.full((blocks, block_size, kv_heads, dim), np.nan, np.float32)
    v_cache = k_cache.copy()
    reference.store_kv(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots):
        if slot >= 0:
            assert np.array_equal(k_cache[slot // block_size, slot % block_size], k[t])
            assert np.array_equal(v_cache[slot // block_size, slot % block_size], v[t])
    written = np.zeros((blocks, block_size), bool)
    written.flat[slots[slots >= 0]] = True
    assert np.isnan(k_cache[~written]).all() and np.isnan(v_cache[~written]).all()


def test_store_kv_static_writes_each_token_at_its_slot_and_position(rng):
    tokens, kv_heads, dim, num_slots, max_len = 6, 3, 4, 3, 5
    k, v = random(rng, (tokens, kv_heads, dim)), random(rng, (tokens, kv_heads, dim))
    cache_slots = np.array([1, 1, -1, 0, 2, 2], np.int32)
    positions = np.array([3, 4, 0, 0, 1, 2], np.int32)
    k_cache = np.full((num_slots, max_len, kv_heads, dim), np.nan, np.float32)
    v_cache = k_cache.copy()
    reference.store_kv_static(k, v, k_cache, v_cache, cache_slots, positions)
    written = np.zeros((num_slots, max_len), bool)
    for t in range(tokens):
        if cache_slots[t] >= 0:
            assert np.array_equal(k_cache[cache_slots[t], positions[t]], k[t])
            assert np.array_equal(v_cache[cache_slots[t], positions[t]], v[t])
            written[cache_slots[t], positions[t]] = True
    assert np.isnan(k_cache[~written]).all() and np.isnan(v_cache[~written]).all()


# ---------------------------------------------------------------- rotary embeddings


def llama3_inv_freq(head_dim, theta, factor, low, high, old_len):
    """Llama 3.1's frequency scaling, one frequency at a time (Meta's ``apply_scaling``)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


LLAMA3_SCALINGS = [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.1
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2
]


@pytest.mark.parametrize("scaling", LLAMA3_SCALINGS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama3_inv_freq_matches_the_per_frequency_formula(scaling, head_dim):
    want = llama3_inv_freq(head_dim, 500000.0, scaling["factor"], scaling["low_freq_factor"],
                           scaling["high_freq_factor"], scaling["original_max_position_embeddings"])
    got = reference.rope_inv_freq(head_dim, 500000.0, scaling)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert (got < 1.0 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim)).any()  # scaling did something


@pytest.mark.parametrize("scaling", LLAMA3_SCALINGS)
def test_llama3_inv_freq_matches_transformers(scaling):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=131072, rope_scaling=dict(scaling))
    inv_freq, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    np.testing.assert_allclose(reference.rope_inv_freq(128, 500000.0, scaling), inv_freq.numpy(), rtol=1e-6)


def test_rope_inv_freq_default_linear_and_unsupported():
    plain = np.array([1.0 / 10000.0 ** (i / 16) for i in range(0, 16, 2)])
    np.testing.assert_allclose(reference.rope_inv_freq(16, 10000.0), plain, rtol=1e-12)
    np.testing.assert_allclose(reference.rope_inv_freq(16, 10000.0, {"type": "default"}), plain, rtol=1e-12)
    np.testing.assert_allclose(reference.rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4}),
                               plain / 4, rtol=1e-12)
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        reference.rope_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 4})


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALINGS[0]])
def test_rope_is_a_complex_rotation_of_each_half_pair(rng, scaling):
    tokens, heads, kv_heads, dim, theta = 5, 4, 2, 16, 500000.0
    inv_freq = llama3_inv_freq(dim, theta, 8.0, 1.0, 4.0, 8192) if scaling else [
        1.0 / theta ** (i / dim) for i in range(0, dim, 2)]
    qkv = random(rng, (tokens, (heads + 2 * kv_heads) * dim))  # q and k are strided views into it
    before = qkv.copy()
    q = qkv[:, : heads * dim].reshape(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim)
    positions = np.array([0, 1, 7, 4095, 123], np.int32)
    reference.rope(q, k, positions, reference.rope_cache(dim, 4096, theta, scaling))
    half = dim // 2
    for x, x0 in ((q, before[:, : heads * dim].reshape(q.shape)),
                  (k, before[:, heads * dim : (heads + kv_heads) * dim].reshape(k.shape))):
        want = np.empty(x.shape)
        for t, p in enumerate(positions):
            for h in range(x.shape[1]):
                for i in range(half):
                    z = complex(x0[t, h, i], x0[t, h, i + half]) * cmath.exp(1j * int(p) * inv_freq[i])
                    want[t, h, i], want[t, h, i + half] = z.real, z.imag
        assert rel_err(x, want) < 1e-5
    assert np.array_equal(qkv[:, (heads + kv_heads) * dim :], before[:, (heads + kv_heads) * dim :])  # v


def test_rope_cache_rows_are_cos_then_sin_of_position_times_frequency():
    dim, theta = 8, 10000.0
    table = reference.rope_cache(dim, 50, theta)
    for p in (0, 1, 49):
        for i in range(dim // 2):
            angle = p / theta ** (2 * i / dim)
            assert table[p, i] == pytest.approx(math.cos(angle), abs=1e-7)
            assert table[p, i + dim // 2] == pytest.approx(math.sin(angle), abs=1e-7)


# ---------------------------------------------------------------- norms, linear, embedding


def rms_norm_loops(x, weight, eps):
    out = np.empty(x.shape)
    for t in range(x.shape[0]):
        row = [float(v) for v in x[t]]
        inv = 1.0 / math.sqrt(sum(v * v for v in row) / len(row) + eps)
        for c, v in enumerate(row):
            out[t, c] = v * inv * float(weight[c])
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("in_place", [False, True])
def test_rms_norm_matches_per_row_loops(rng, dtype, in_place):
    x, weight = random(rng, (4, 37), dtype, scale=3.0), random(rng, (37,), dtype)
    want = rms_norm_loops(x, weight, 1e-5)
    out = x if in_place else np.full(x.shape, np.nan, dtype)
    reference.rms_norm(x, weight, 1e-5, out)
    assert rel_err(out, want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_add_rms_norm_adds_in_place_then_normalises_the_stored_residual(rng, dtype):
    x, residual, weight = (random(rng, (3, 29), dtype), random(rng, (3, 29), dtype), random(rng, (29,), dtype))
    summed = np.empty(x.shape, dtype)
    for t in range(3):
        for c in range(29):
            summed[t, c] = float(residual[t, c]) + float(x[t, c])  # rounded to dtype on store
    want = rms_norm_loops(summed, weight, 1e-6)
    out = x  # out may be x
    reference.add_rms_norm(x, residual, weight, 1e-6, out)
    assert np.array_equal(residual, summed)
    assert rel_err(out, want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bias,res", [(False, False), (True, False), (False, True), (True, True)])
def test_linear_matches_per_element_dot_products(rng, dtype, bias, res):
    m, n, k = 3, 5, 11
    x, weight = random(rng, (m, k), dtype), random(rng, (n, k), dtype)
    b = random(rng, (n,), dtype) if bias else None
    r = random(rng, (m, n), dtype) if res else None
    want = np.empty((m, n))
    for i in range(m):
        for j in range(n):
            acc = sum(float(x[i, c]) * float(weight[j, c]) for c in range(k))
            want[i, j] = acc + (float(b[j]) if bias else 0.0) + (float(r[i, j]) if res else 0.0)
    out = r if res else np.full((m, n), np.nan, dtype)  # the fused residual writes over the residual
    reference.linear(x, weight, out, b, r)
    assert rel_err(out, want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_linear_silu_mul_is_silu_of_the_gate_row_times_the_up_row(rng, dtype):
    m, inter, k = 3, 4, 9
    x, weight = random(rng, (m, k), dtype), random(rng, (2 * inter, k), dtype)
    want = np.empty((m, inter))
    for i in range(m):
        for j in range(inter):
            gate = sum(float(x[i, c]) * float(weight[j, c]) for c in range(k))
            up = sum(float(x[i, c]) * float(weight[inter + j, c]) for c in range(k))
            want[i, j] = gate / (1.0 + math.exp(-gate)) * up
    out = np.full((m, inter), np.nan, dtype)
    assert reference.linear_silu_mul(x, weight, out) is out
    assert rel_err(out, want) < tolerance(dtype)


def test_embedding_shards_give_their_rows_and_zeros_elsewhere_and_sum_to_the_table(rng):
    vocab, hidden = 11, 5
    table = random(rng, (vocab, hidden))
    ids = np.array([0, 3, 4, 10, 7, 8, 11, -1, 3], np.int32)  # 11 and -1 are outside the vocabulary
    total = np.zeros((len(ids), hidden), np.float32)
    for start, stop in ((0, 4), (4, 8), (8, 11)):
        out = np.full((len(ids), hidden), np.nan, np.float32)
        reference.embedding(ids, table[start:stop], out, vocab_start=start)
        for t, token in enumerate(ids):
            want = table[token] if start <= token < stop else np.zeros(hidden, np.float32)
            assert np.array_equal(out[t], want)
        total += out
    for t, token in enumerate(ids):
        assert np.array_equal(total[t], table[token] if 0 <= token < vocab else np.zeros(hidden, np.float32))


def test_silu_mul_matches_per_element_formula(rng):
    x = random(rng, (3, 14), scale=3.0)
    want = np.array([[float(x[t, c]) / (1 + math.exp(-float(x[t, c]))) * float(x[t, c + 7]) for c in range(7)]
                     for t in range(3)])
    assert rel_err(reference.silu_mul(x, np.empty((3, 7), np.float32)), want) < 1e-5


# ---------------------------------------------------------------- sampling

GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK64 = (1 << 64) - 1


def gumbel_python(seed, i):
    """splitmix64 on Python integers, then Gumbel(0, 1) in float64."""
    z = (seed + (i + 1) * GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    z ^= z >> 31
    u = ((z >> 41) + 0.5) / 2**23
    return -math.log(-math.log(u))


def test_gumbel_noise_is_splitmix64_of_seed_and_index():
    for seed in (0, 1, 2**64 - 1, 0x0123456789ABCDEF):
        noise = reference.gumbel_noise(np.uint64(seed), 40)
        want = [gumbel_python(seed, i) for i in range(40)]
        np.testing.assert_allclose(noise, want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(reference.gumbel_noise(np.uint64(seed), 7), noise[:7])


def test_gumbel_noise_is_finite_and_has_gumbel_moments():
    noise = np.concatenate([reference.gumbel_noise(np.uint64(seed), 1_000_000) for seed in (0, 99)])
    assert np.isfinite(noise).all()  # u never rounds to 0 or 1 (it did once in 2**24 with 24 bits)
    assert noise.mean() == pytest.approx(0.5772157, abs=0.005)  # Euler-Mascheroni
    assert noise.var() == pytest.approx(math.pi**2 / 6, abs=0.01)


def mask_by_definition(logits, temperature, top_k, top_p):
    """sampling_mask written from its definition, with loops and no sorting of the kept set."""
    x = [float(v) for v in logits]
    kth = sorted(x, reverse=True)[top_k - 1] if 0 < top_k < len(x) else -math.inf
    in_k = [v >= kth for v in x]
    top = max(x)
    p = [math.exp((v - top) / temperature) if keep else 0.0 for v, keep in zip(x, in_k)]
    total = sum(p)
    keep = []
    for i, v in enumerate(x):
        greater = sum(pj for pj in p if pj > p[i]) / total
        keep.append(in_k[i] and (top_p >= 1 or greater < top_p or p[i] == max(p)))
    return np.array(keep)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (6, 1.0), (0, 0.75), (6, 0.6), (3, 0.0), (40, 0.9)])
def test_sampling_mask_matches_its_definition_on_tied_logits(rng, top_k, top_p):
    for _ in range(5):
        logits = (np.round(rng.standard_normal(30) * 2) / 2).astype(np.float32)  # many ties
        want = mask_by_definition(logits, 0.9, top_k, top_p)
        assert np.array_equal(reference.sampling_mask(logits, 0.9, top_k, top_p), want)


def test_top_p_zero_keeps_only_the_most_likely_tokens():
    logits = np.array([0.0, 5.0, 1.0, 5.0], np.float32)
    assert reference.sampling_mask(logits, 1.0, 0, 0.0).tolist() == [False, True, False, True]
    out = np.empty(3, np.int32)
    seeds = np.array([1, 2, 3], np.uint64)
    tokens = reference.sample(np.repeat(logits[None], 3, 0), np.ones(3, np.float32), np.zeros(3, np.int32),
                              np.zeros(3, np.float32), seeds, out)
    assert set(tokens.tolist()) <= {1, 3}


def test_sample_greedy_is_the_first_maximum():
    logits = np.array([[1.0, 4.0, 4.0, -2.0], [-1.0, -1.0, -3.0, -5.0]], np.float16)
    out = reference.sample(logits, np.zeros(2, np.float32), np.full(2, 2, np.int32), np.full(2, 0.5, np.float32),
                           np.arange(2, dtype=np.uint64), np.empty(2, np.int32))
    assert out.tolist() == [1, 0]
