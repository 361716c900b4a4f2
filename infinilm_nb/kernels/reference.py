"""NumPy specification of every op: the oracle for the kernel tests and the ops of the CPU backend.

Conventions shared by every op (and by the Numba launchers, which have the same signatures):

* Arrays are NumPy arrays (CuPy arrays for the launchers on ``cuda``). Activations and weights are
  float16, float32 or bfloat16; integer metadata is int32; seeds are uint64. NumPy and CuPy have no
  bfloat16 dtype, so a bfloat16 array is a ``uint16`` array of its bit patterns (:data:`BF16`):
  :func:`to_f32` reads any of the three as float32 and :func:`cast` rounds float32 to one.
* Arithmetic accumulates in float32 and rounds once, to the output's dtype, when it is stored.
* Outputs are passed in (``out=``) and returned; an op never allocates its result. Ops documented
  as "in place" write into their inputs.
* The token axis is flat: one step's prefill and decode tokens are concatenated (``T`` tokens in all),
  and sequence ``b`` owns tokens ``query_start_loc[b]:query_start_loc[b + 1]``.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
BF16 = np.dtype(np.uint16)  # bfloat16, as its bit patterns


def to_f32(x: np.ndarray) -> np.ndarray:
    """``x`` as float32: a bfloat16 (uint16) array's bit patterns widened, other dtypes converted."""
    if x.dtype == BF16:
        return (x.astype(np.uint32) << np.uint32(16)).view(F32)
    return x.astype(F32)


def cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 ``values`` rounded to ``dtype``; bfloat16 (uint16) to nearest even, NaN kept a NaN."""
    if np.dtype(dtype) != BF16:
        return values.astype(dtype)
    bits = values.astype(F32, order="C").view(np.uint32)
    with np.errstate(over="ignore"):
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(values), np.uint32(0x7FC0), rounded).astype(np.uint16)


def convert(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` (float16, float32 or bfloat16) in ``dtype`` (one of those), as a new array. NumPy's
    functions only: CuPy arrays work too."""
    if x.dtype == BF16 or np.dtype(dtype) == BF16:
        return cast(to_f32(x), dtype) if x.dtype != np.dtype(dtype) else x.copy()
    return x.astype(dtype)


def embedding(ids: np.ndarray, weight: np.ndarray, out: np.ndarray, vocab_start: int = 0) -> np.ndarray:
    """Gather embedding rows: ``out[t] = weight[ids[t] - vocab_start]``.

    ids: int32 ``[T]``; weight: ``[V_shard, H]``, the rows ``vocab_start .. vocab_start + V_shard`` of
    the full table (a vocab-parallel shard); out: ``[T, H]``. Ids outside the shard give zero rows, so
    that summing the shards' outputs over ranks gives the full embedding.
    """
    local = ids.astype(np.int64) - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    out[...] = 0
    out[inside] = weight[local[inside]]
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """``out = x / sqrt(mean(x**2, -1) + eps) * weight`` per row.

    x, out: ``[T, H]`` (out may be x); weight: ``[H]``.
    """
    xf = to_f32(x)
    out[...] = cast(xf * _inv_rms(xf, eps) * to_f32(weight), out.dtype)
    return out


def _inv_rms(xf: np.ndarray, eps: float) -> np.ndarray:
    """``1 / sqrt(mean(x**2) + eps)`` of each row of float32 ``xf``, as a float32 column."""
    return (1.0 / np.sqrt((xf * xf).mean(axis=-1, keepdims=True, dtype=F32) + F32(eps))).astype(F32)


def add_rms_norm(
    x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray
) -> np.ndarray:
    """Fused residual add and RMSNorm, as vLLM's ``fused_add_rms_norm``.

    In place: ``residual += x`` (rounded to residual's dtype); then ``out = rms_norm(residual)``.
    x, residual, out: ``[T, H]`` (out may be x); weight: ``[H]``. The norm reads the rounded residual,
    so every backend normalises exactly what it stores.
    """
    residual[...] = cast(to_f32(residual) + to_f32(x), residual.dtype)
    return rms_norm(residual, weight, eps, out)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies ``theta ** (-2i / head_dim)``, with Llama-3 ``rope_scaling`` applied.

    ``scaling`` is the HF ``rope_scaling`` dict; ``rope_type`` (or ``type``) ``"llama3"`` uses
    ``factor``, ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``;
    ``"default"`` or None leaves the frequencies alone; ``"linear"`` divides them by ``factor``.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind != "llama3":
        raise ValueError(f"rope_scaling: unsupported rope_type {kind!r} (supported: default, linear, llama3)")
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def rope_cache(head_dim: int, max_positions: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """The cos/sin table read by :func:`rope`: float32 ``[max_positions, head_dim]``.

    Row ``p`` holds ``cos(p * inv_freq)`` in its first ``head_dim / 2`` columns and ``sin(p * inv_freq)``
    in the rest.
    """
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), rope_inv_freq(head_dim, theta, scaling))
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=1).astype(F32)


def rope(q: np.ndarray, k: np.ndarray, positions: np.ndarray, cos_sin: np.ndarray) -> None:
    """Rotary embedding, GPT-NeoX ``rotate_half`` layout, applied to q and k in place.

    q: ``[T, Hq, D]``; k: ``[T, Hk, D]`` (both may be strided views into a fused QKV output);
    positions: int32 ``[T]``; cos_sin: :func:`rope_cache` ``[P, D]``. With ``x1, x2`` the halves of a
    head: ``x1' = x1 cos - x2 sin`` and ``x2' = x2 cos + x1 sin``.
    """
    half = cos_sin.shape[1] // 2
    cos = cos_sin[positions, :half][:, None, :]
    sin = cos_sin[positions, half:][:, None, :]
    for x in (q, k):
        x1 = to_f32(x[..., :half])
        x2 = to_f32(x[..., half:])
        x[..., :half] = cast(x1 * cos - x2 * sin, x.dtype)
        x[..., half:] = cast(x2 * cos + x1 * sin, x.dtype)


def silu_mul(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """SwiGLU activation over a fused ``[gate | up]`` tensor: ``out = silu(gate) * up``.

    x: ``[T, 2I]`` (gate in the first I columns); out: ``[T, I]``.
    """
    inter = out.shape[-1]
    gate = to_f32(x[..., :inter])
    up = to_f32(x[..., inter:])
    out[...] = cast(gate / (1 + np.exp(-gate)) * up, out.dtype)
    return out


def linear(
    x: np.ndarray,
    weight: np.ndarray,
    out: np.ndarray,
    bias: np.ndarray | None = None,
    residual: np.ndarray | None = None,
    norm_eps: float | None = None,
    normed: np.ndarray | None = None,
) -> np.ndarray:
    """``out = x @ weight.T (+ bias) (+ residual)``, accumulated in float32.

    x: ``[M, K]``; weight: ``[N, K]`` row-major, as HF stores it; bias: ``[N]``; residual, out:
    ``[M, N]`` (out may be residual: the fused residual add of o_proj and down_proj).

    With ``norm_eps`` each row of x is first divided by ``sqrt(mean(x**2) + eps)``: an RMSNorm whose
    weight the caller folded into ``weight``'s columns. Here the division scales the float32
    products (as the decode GEMM does); ``normed`` (like x) is scratch a backend may normalise into.
    """
    acc = _f32_view(x) @ _f32_view(weight).T
    if norm_eps is not None:
        acc *= _inv_rms(to_f32(x), norm_eps)
    if bias is not None:
        acc += to_f32(bias)
    if residual is not None:
        acc += to_f32(residual)
    out[...] = cast(acc, out.dtype)
    return out


def _f32_view(x: np.ndarray) -> np.ndarray:
    """``x`` as float32 without a copy when it is float32 already (the cpu backend's weights)."""
    return x if x.dtype == F32 else to_f32(x)


def linear_silu_mul(
    x: np.ndarray, weight: np.ndarray, out: np.ndarray, norm_eps: float | None = None, normed: np.ndarray | None = None
) -> np.ndarray:
    """The gate-up projection with SwiGLU fused: ``out = silu_mul(x @ weight.T)``.

    x: ``[M, K]``; weight: ``[2I, K]``, the gate rows then the up rows (the fused gate-up weight);
    out: ``[M, I]``. The products stay in float32 (never rounded to out's dtype) until
    ``silu(gate) * up`` is stored. ``norm_eps`` and ``normed`` as for :func:`linear`.
    """
    gate_up = linear(x, weight, np.empty((x.shape[0], weight.shape[0]), F32), norm_eps=norm_eps)
    return silu_mul(gate_up, out)


def store_kv(
    k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, slot_mapping: np.ndarray
) -> None:
    """Write each token's K and V into a paged cache.

    k, v: ``[T, Hk, D]``; k_cache, v_cache: ``[num_blocks, block_size, Hk, D]`` (one layer);
    slot_mapping: int32 ``[T]``, the flat slot ``block * block_size + offset`` of each token; a
    negative slot skips that token (padding).
    """
    block_size = k_cache.shape[1]
    for t in np.flatnonzero(slot_mapping >= 0):
        block, offset = divmod(int(slot_mapping[t]), block_size)
        k_cache[block, offset] = k[t]
        v_cache[block, offset] = v[t]


def rope_store_kv(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    positions: np.ndarray,
    cos_sin: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slot_mapping: np.ndarray,
) -> None:
    """:func:`rope` on q and k in place, then :func:`store_kv` of the rotated k and of v: the two
    steps between a layer's QKV projection and its attention, as one op."""
    rope(q, k, positions, cos_sin)
    store_kv(k, v, k_cache, v_cache, slot_mapping)


def qkv_heads(qkv: np.ndarray, q_heads: int, kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``q [T, q_heads, D]``, ``k [T, kv_heads, D]`` and ``v [T, kv_heads, D]``: strided views into a
    fused QKV output ``[T, (q_heads + 2 kv_heads) D]`` (slicing only: CuPy arrays work too)."""
    heads = qkv.reshape(qkv.shape[0], q_heads + 2 * kv_heads, head_dim)
    return heads[:, :q_heads], heads[:, q_heads : q_heads + kv_heads], heads[:, q_heads + kv_heads :]


def linear_rope_store_kv(
    x: np.ndarray,
    weight: np.ndarray,
    out: np.ndarray,
    positions: np.ndarray,
    cos_sin: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    slot_mapping: np.ndarray,
    q_heads: int,
    kv_heads: int,
    bias: np.ndarray | None = None,
    norm_eps: float | None = None,
    normed: np.ndarray | None = None,
) -> np.ndarray:
    """A layer's QKV projection with RoPE and the K / V cache store: :func:`linear` into
    ``out [M, (q_heads + 2 kv_heads) D]`` (q heads, then k, then v; D the caches' head dim), then
    :func:`rope_store_kv` on its heads, the products rotated in float32 before they are rounded to
    out's dtype. ``bias``, ``norm_eps`` and ``normed`` as for :func:`linear`."""
    qkv = linear(x, weight, np.empty(out.shape, F32), bias=bias, norm_eps=norm_eps)
    q, k, v = qkv_heads(qkv, q_heads, kv_heads, k_cache.shape[-1])
    rope(q, k, positions, cos_sin)
    store_kv(cast(k, k_cache.dtype), cast(v, v_cache.dtype), k_cache, v_cache, slot_mapping)
    out[...] = cast(qkv, out.dtype)
    return out


def store_kv_static(
    k: np.ndarray,
    v: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    cache_slots: np.ndarray,
    positions: np.ndarray,
) -> None:
    """Write each token's K and V into a static cache ``[num_slots, max_len, Hk, D]``.

    cache_slots: int32 ``[T]``, the cache slot (sequence row) of each token, negative to skip;
    positions: int32 ``[T]``. A static cache is a paged cache whose blocks are whole sequences,
    so this is :func:`store_kv` with ``slot = cache_slot * max_len + position``.
    """
    slots = np.where(cache_slots >= 0, cache_slots.astype(np.int64) * k_cache.shape[1] + positions, -1)
    store_kv(k, v, k_cache, v_cache, slots)


def paged_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    context_lens: np.ndarray,
    query_start_loc: np.ndarray,
    scale: float,
    out: np.ndarray,
    max_query_len: int | None = None,
) -> np.ndarray:
    """Causal attention of a flattened batch over a paged KV cache (prefill, decode or both).

    q, out: ``[T, Hq, D]``; k_cache, v_cache: ``[num_blocks, block_size, Hk, D]``, already holding every
    token of each sequence, this step's included (store_kv runs first); ``Hq`` is a multiple of ``Hk``
    (GQA: query head ``h`` reads KV head ``h // (Hq // Hk)``); block_tables: int32 ``[B, max_blocks]``;
    context_lens: int32 ``[B]``, the tokens of sequence b in the cache after this step; query_start_loc:
    int32 ``[B + 1]``. Sequence b's ``n = qsl[b+1] - qsl[b]`` queries are its last n positions
    ``L - n .. L - 1`` (``L = context_lens[b]``), so a prefill with a cached prefix and a decode step
    (n = 1) are the same case. Query i attends to keys ``0 .. L - n + i``; softmax in float32.
    ``max_query_len`` (the largest n, when the caller knows it) lets a kernel choose its prefill path;
    the result does not depend on it.
    """
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    for b in range(len(context_lens)):
        start, end = int(query_start_loc[b]), int(query_start_loc[b + 1])
        n, length = end - start, int(context_lens[b])
        if n == 0:
            continue
        pos = np.arange(length)
        blocks = block_tables[b, pos // block_size]
        keys = np.repeat(to_f32(k_cache[blocks, pos % block_size]), group, axis=1)  # [L, Hq, D]
        vals = np.repeat(to_f32(v_cache[blocks, pos % block_size]), group, axis=1)
        scores = np.einsum("qhd,khd->hqk", to_f32(q[start:end]), keys) * F32(scale)
        allowed = pos[None, :] <= (length - n + np.arange(n))[:, None]  # [n, L]
        scores = np.where(allowed[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[start:end] = cast(np.einsum("hqk,khd->qhd", probs, vals), out.dtype)
    return out


def static_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    cache_slots: np.ndarray,
    context_lens: np.ndarray,
    query_start_loc: np.ndarray,
    scale: float,
    out: np.ndarray,
    max_query_len: int | None = None,
) -> np.ndarray:
    """:func:`paged_attention` over a static cache ``[num_slots, max_len, Hk, D]``.

    cache_slots: int32 ``[B]``, the cache slot of each sequence. A static cache is a paged cache with
    one block per sequence, so the block table is ``cache_slots[:, None]``.
    """
    return paged_attention(
        q, k_cache, v_cache, cache_slots.reshape(-1, 1), context_lens, query_start_loc, scale, out
    )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix_stream(seeds: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``splitmix64(seed + (index + 1) * 0x9E3779B97F4A7C15)``: the ``index``-th number of the stream
    ``seed`` starts, elementwise over uint64 arrays (broadcast), wrapping mod 2**64. The sampler's
    noise and the engine's per-step seeds both come from it."""
    with np.errstate(over="ignore"):
        z = np.asarray(seeds, dtype=np.uint64) + (np.asarray(index, dtype=np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def gumbel_noise(seed: np.uint64, count: int) -> np.ndarray:
    """Float32 Gumbel(0, 1) noise for indices ``0 .. count - 1``, a pure function of (seed, index).

    ``z = splitmix_stream(seed, i)``; ``u = ((z >> 41) + 0.5) / 2**23``;
    ``g = -log(-log(u))``, all in float32 after ``u``. The sampling kernel computes the same numbers.
    23 bits, so that ``u`` is exact in float32 and inside (0, 1): with 24, ``(2**24 - 1) + 0.5`` rounds
    to ``2**24``, ``u`` to 1 and ``g`` to +inf, once in 2**24 draws.
    """
    z = splitmix_stream(np.uint64(seed), np.arange(count, dtype=np.uint64))
    u = ((z >> np.uint64(41)).astype(F32) + F32(0.5)) * F32(1.0 / (1 << 23))
    return -np.log(-np.log(u))


def sampling_mask(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The tokens one row may be sampled from: its top-k, then the top-p nucleus of what is left.

    top-k keeps the tokens whose logit is at least the k-th largest (ties at the boundary stay;
    ``top_k <= 0`` or ``>= V`` keeps all). top-p works on ``softmax(logits / temperature)`` renormalised
    over the top-k set, and keeps a token when the mass of the tokens strictly more likely than it is
    below ``top_p``: the smallest set whose mass reaches p (ties stay). ``top_p >= 1`` keeps all;
    the most likely tokens always stay, so ``top_p <= 0`` keeps just them.
    """
    x = to_f32(logits)
    keep = np.ones(x.shape, dtype=bool)
    if 0 < top_k < x.size:
        keep &= x >= np.partition(x, x.size - top_k)[x.size - top_k]
    if top_p < 1.0:
        probs = np.where(keep, np.exp((x - x.max()) / F32(temperature)), 0).astype(np.float64)
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        greater_mass = np.cumsum(sorted_probs) - sorted_probs
        # tokens tied with a kept token are kept as well
        first_of_value = np.searchsorted(-sorted_probs, -sorted_probs, side="left")
        keep_sorted = (greater_mass[first_of_value] < top_p) | (first_of_value == 0)
        keep[order] &= keep_sorted
    return keep


def sample(
    logits: np.ndarray,
    temperatures: np.ndarray,
    top_ks: np.ndarray,
    top_ps: np.ndarray,
    seeds: np.ndarray,
    out: np.ndarray,
) -> np.ndarray:
    """Pick one token per row of ``logits [B, V]``; writes int32 ``out [B]``.

    temperatures: float32 ``[B]``, 0 means greedy (argmax, lowest index on ties); top_ks: int32
    ``[B]``; top_ps: float32 ``[B]``; seeds: uint64 ``[B]``, one per row and step (the engine derives
    it from the request's seed and its step, so a seed reproduces its tokens). Otherwise the token is
    ``argmax(logits / T + gumbel_noise(seed))`` over :func:`sampling_mask` — the Gumbel-max trick,
    which draws exactly from the renormalised softmax and needs only one pass over the row.
    """
    for b in range(logits.shape[0]):
        row = to_f32(logits[b])
        temperature = float(temperatures[b])
        if temperature <= 0:
            out[b] = int(np.argmax(row))
            continue
        keep = sampling_mask(row, temperature, int(top_ks[b]), float(top_ps[b]))
        scores = row / F32(temperature) + gumbel_noise(seeds[b], row.size)
        out[b] = int(np.argmax(np.where(keep, scores, -np.inf)))
    return out
