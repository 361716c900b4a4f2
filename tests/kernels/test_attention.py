import numpy as np
import pytest

from infinilm_nb.kernels import attention, reference
from infinilm_nb.kernels.attention import AttentionWorkspace, attention_workspace_shapes
from tests.helpers import pick, poisoned, random, rel_err, tolerance
from tests.kernels.widths import placed, record_widths

F32, F16, BF16 = np.float32, np.float16, np.uint16  # uint16: bfloat16 bit patterns


@pytest.fixture(autouse=True)
def cuda_core_kernels(monkeypatch):
    """The CUDA-core kernels on every step here: on a GPU float16 decode would otherwise take the
    tensor-core kernel, which test_attention_mma checks."""
    monkeypatch.setattr(attention.attention_mma, "ENABLED", False)

# (q heads, kv heads, head_dim, block_size, dtype): GQA ratios 4, 3 and 1
CONFIGS = pick(
    sim=[(4, 1, 8, 4, F32), (3, 1, 16, 8, F16), (2, 2, 8, 16, F32)],
    gpu=[
        (hq, hk, d, bs, dtype)
        for hq, hk, d, bs in [(32, 8, 128, 16), (9, 3, 64, 32), (8, 8, 128, 32), (12, 4, 64, 16), (32, 8, 128, 32)]
        for dtype in (F32, F16)
    ],
)


def _cases(bs: int) -> dict[str, list[tuple[int, int]]]:
    """Batches of sequences (queries n, context length L) for block size bs: contexts that end
    exactly on a block boundary and one token past it, prefills with and without a cached prefix,
    an idle sequence (n = 0) inside a mixed batch; on the GPU also long prefills and contexts."""
    long, chunk, big = pick(sim=(2, 3, []), gpu=(40, bs + 3, [300]))
    return {
        "decode": [(1, long * bs), (1, long * bs + 1), (1, 5), (1, 1)],
        "prefill": [(bs + 1, bs + 1), (chunk, chunk)] + [(n, n) for n in big],
        "prefill_prefix": [(chunk, long * bs + chunk), (2, bs + 2), (1, bs)] + [(n, n + 7 * bs) for n in big],
        "mixed": [(1, long * bs), (chunk, chunk + bs + 2), (0, 5), (1, bs + 1), (2, 2), (1, long * bs + 1)]
        + [(n, n + bs + 1) for n in big],
    }


def _qkv_views(kb, rng, tokens, q_heads, kv_heads, dim, dtype):
    """Host q, k, v and their device views into one fused QKV buffer, as the QKV GEMM leaves them."""
    width = (q_heads + 2 * kv_heads) * dim
    host = random(rng, (tokens, width), dtype)
    fused = kb.asarray(host)

    def split(array, lo, heads):
        return array[:, lo * dim : (lo + heads) * dim].reshape(tokens, heads, dim)

    def views(array):
        return split(array, 0, q_heads), split(array, q_heads, kv_heads), split(array, q_heads + kv_heads, kv_heads)

    return views(host), views(fused)


def _paged_batch(rng, seqs, block_size):
    """Block tables (random, non-contiguous blocks; unused entries point at other valid blocks),
    context lengths and query offsets for ``seqs``; returns them and the number of blocks."""
    need = [-(-length // block_size) for _, length in seqs]
    width = max(need) + 1
    num_blocks = sum(need) + 3
    order = rng.permutation(num_blocks).astype(np.int32)
    tables = rng.integers(0, num_blocks, size=(len(seqs), width), dtype=np.int32)
    used = 0
    for b, count in enumerate(need):
        tables[b, :count] = order[used : used + count]
        used += count
    context_lens = np.array([length for _, length in seqs], np.int32)
    qsl = np.concatenate([[0], np.cumsum([n for n, _ in seqs])]).astype(np.int32)
    return tables, context_lens, qsl, num_blocks


def _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, dtype, workspace=None, aligned=True):
    """Paged attention of ``seqs`` on random data, and the reference's answer; ``aligned=False``
    places the caches one element off a 16-byte boundary."""
    tables, context_lens, qsl, num_blocks = _paged_batch(rng, seqs, block_size)
    tokens = int(qsl[-1])
    (q, _, _), (q_dev, _, _) = _qkv_views(kb, rng, tokens, q_heads, kv_heads, dim, dtype)
    k_cache = random(rng, (num_blocks, block_size, kv_heads, dim), dtype)
    v_cache = random(rng, (num_blocks, block_size, kv_heads, dim), dtype)
    scale = dim**-0.5
    out = poisoned(kb, (tokens, q_heads, dim), dtype)
    split = {} if workspace is None else {"workspace": workspace}
    kb.ops.paged_attention(
        q_dev, placed(kb, k_cache, aligned), placed(kb, v_cache, aligned), kb.asarray(tables),
        kb.asarray(context_lens), kb.asarray(qsl), scale, out, **split,
    )
    want = reference.paged_attention(
        q, k_cache, v_cache, tables, context_lens, qsl, scale, np.empty((tokens, q_heads, dim), np.float32)
    )
    return kb.to_host(out), want


@pytest.mark.parametrize("case", ["decode", "prefill", "prefill_prefix", "mixed"])
@pytest.mark.parametrize("q_heads,kv_heads,dim,block_size,dtype", CONFIGS)
def test_paged_attention_matches_reference(kb, rng, q_heads, kv_heads, dim, block_size, dtype, case):
    got, want = _run_paged(kb, rng, _cases(block_size)[case], q_heads, kv_heads, dim, block_size, dtype)
    assert rel_err(got, want) < tolerance(dtype)


@pytest.mark.parametrize("case,aligned", [("decode", False), ("mixed", True)])
def test_paged_attention_bfloat16_matches_reference(kb, rng, case, aligned):
    # unaligned caches take the one-element loads, aligned ones the 16-byte loads; mixed has cached prefixes
    q_heads, kv_heads, dim, block_size = pick(sim=CONFIGS[1][:4], gpu=(32, 8, 128, 16))
    got, want = _run_paged(
        kb, rng, _cases(block_size)[case], q_heads, kv_heads, dim, block_size, BF16, aligned=aligned
    )
    assert rel_err(got, want) < tolerance(BF16)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_paged_attention_head_dim_64(kb, rng, dtype):
    seqs = pick(sim=[(1, 20), (2, 33)], gpu=_cases(16)["mixed"])
    got, want = _run_paged(kb, rng, seqs, 2, 1, 64, 8, dtype)
    assert rel_err(got, want) < tolerance(dtype)


# the simulator's steps run on CUDA cores, whose kernel always merges in the merge kernel
@pytest.mark.parametrize("merge_in_partition", pick(sim=[True], gpu=[True, False]), ids=str)
@pytest.mark.parametrize("q_heads,kv_heads,dim,block_size,dtype", CONFIGS[:3])
def test_paged_attention_split_context_matches_reference(
    kb, rng, monkeypatch, merge_in_partition, q_heads, kv_heads, dim, block_size, dtype
):
    # contexts crossing several partitions, one ending exactly on a partition boundary; the partials
    # merged by the last partition block of each (token, KV head), or by the merge kernel
    monkeypatch.setattr(attention, "MERGE_IN_PARTITION", merge_in_partition)
    seqs = pick(sim=[(1, 35), (2, 18), (0, 4), (1, 16), (1, 3)], gpu=_cases(block_size)["mixed"] + [(1, 5000)])
    tokens = sum(n for n, _ in seqs)
    max_context = (-(-max(length for _, length in seqs) // block_size) + 1) * block_size
    # partitions of 16 keys (the simulator's tile) split its tiny contexts
    workspace = AttentionWorkspace.allocate(
        kb.xp, tokens + 2, q_heads, dim, max_context, partition_keys=pick(sim=16, gpu=256)
    )
    assert workspace.partials.shape[2] > 1
    got, want = _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, dtype, workspace)
    assert rel_err(got, want) < tolerance(dtype)
    assert not kb.to_host(workspace.finished).any()  # back at zero for the next launch


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("aligned", [True, False])
def test_paged_attention_takes_the_16_byte_path_only_when_aligned(kb, rng, monkeypatch, dtype, aligned):
    widths = record_widths(monkeypatch, attention)
    got, want = _run_paged(kb, rng, [(1, 9), (3, 7)], 4, 2, 16, 4, dtype, aligned=aligned)
    assert rel_err(got, want) < tolerance(dtype)
    assert widths == [16 // np.dtype(dtype).itemsize if aligned else 1]


def test_paged_attention_workspace_too_small_for_step_runs_unsplit(kb, rng):
    q_heads, kv_heads, dim, block_size, _ = CONFIGS[0]
    seqs = _cases(block_size)["prefill_prefix"]
    workspace = AttentionWorkspace.allocate(kb.xp, 2, q_heads, dim, 64, partition_keys=16)
    got, want = _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, np.float32, workspace)
    assert rel_err(got, want) < tolerance(np.float32)


def test_paged_attention_few_tokens_split_finer_than_the_workspace_shape(kb, rng, monkeypatch):
    # sized for 8 tokens of 2 partitions; one sequence decoding may use 16 partitions of that memory
    q_heads, kv_heads, dim, block_size, _ = CONFIGS[0]
    seqs = [(1, pick(sim=100, gpu=3000))]
    max_context = (-(-seqs[0][1] // block_size) + 1) * block_size
    workspace = AttentionWorkspace.allocate(kb.xp, 8, q_heads, dim, max_context, partition_keys=-(-max_context // 2))
    assert workspace.partials.shape[:3] == (8, q_heads, 2)
    launched = []
    plan = attention._plan

    def record(candidates, pairs, keys, most, *rest):
        launched.append(most)
        return plan(candidates, pairs, keys, most, *rest)

    monkeypatch.setattr(attention, "_plan", record)
    got, want = _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, np.float32, workspace)
    assert rel_err(got, want) < tolerance(np.float32)
    assert launched == [16]


@pytest.mark.parametrize("dtype", [F32, F16])
def test_a_short_context_spreads_over_every_partition(kb, rng, monkeypatch, dtype):
    # a block table far wider than the context (as a CUDA graph captures it): the host splits for the
    # table's 32 grains of keys into 4 partitions, and the token cuts its 3 grains into 3 of them
    q_heads, kv_heads, dim, block_size = CONFIGS[0][:4]
    grain = attention.KEY_GRAIN
    length, capacity = 3 * grain, 32 * grain
    tables = rng.permutation(capacity // block_size).astype(np.int32)[None]
    context_lens, qsl = np.array([length], np.int32), np.array([0, 1], np.int32)
    k_cache, v_cache = (random(rng, (capacity // block_size, block_size, kv_heads, dim), dtype) for _ in range(2))
    (q, _, _), (q_dev, _, _) = _qkv_views(kb, rng, 1, q_heads, kv_heads, dim, dtype)
    workspace = AttentionWorkspace.allocate(kb.xp, 1, q_heads, dim, capacity, partition_keys=capacity // 4)
    workspace.stats.fill(np.nan)
    monkeypatch.setattr(attention, "_plan", lambda candidates, pairs, keys, most, *rest: (candidates[0], most))  # all 4
    out = poisoned(kb, (1, q_heads, dim), dtype)
    kb.ops.paged_attention(q_dev, kb.asarray(k_cache), kb.asarray(v_cache), kb.asarray(tables), kb.asarray(context_lens),
                           kb.asarray(qsl), dim**-0.5, out, workspace=workspace)
    want = reference.paged_attention(q, k_cache, v_cache, tables, context_lens, qsl, dim**-0.5,
                                     np.empty((1, q_heads, dim), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)
    maxima = kb.to_host(workspace.stats)[0, 0]  # [heads, partitions]
    assert maxima.shape[1] == 4 and np.isfinite(maxima[:, :3]).all() and np.isnan(maxima[:, 3]).all()


def test_attention_workspace_shapes():
    shapes = attention_workspace_shapes(8, 32, 128, 4097, partition_keys=256)
    assert shapes == {"stats": (2, 8, 32, 17), "partials": (8, 32, 17, 128)}


def _run_static(kb, rng, q_heads, kv_heads, dim, dtype, max_len, split):
    """Static-cache attention of a mixed batch (a context of max_len keys, prefills, an idle slot) on
    random data, split into partitions or not, and the reference's answer."""
    seqs = [(1, max_len), (3, 9), (1, 1), (0, 3), (2, max_len - 1)]
    num_slots = len(seqs) + 2
    slots = rng.permutation(num_slots)[: len(seqs)].astype(np.int32)
    context_lens = np.array([length for _, length in seqs], np.int32)
    qsl = np.concatenate([[0], np.cumsum([n for n, _ in seqs])]).astype(np.int32)
    tokens = int(qsl[-1])
    (q, _, _), (q_dev, _, _) = _qkv_views(kb, rng, tokens, q_heads, kv_heads, dim, dtype)
    k_cache = random(rng, (num_slots, max_len, kv_heads, dim), dtype)
    v_cache = random(rng, (num_slots, max_len, kv_heads, dim), dtype)
    workspace = (
        AttentionWorkspace.allocate(kb.xp, tokens, q_heads, dim, max_len, partition_keys=pick(sim=16, gpu=256))
        if split
        else None
    )
    out = poisoned(kb, (tokens, q_heads, dim), dtype)
    kb.ops.static_attention(
        q_dev, kb.asarray(k_cache), kb.asarray(v_cache), kb.asarray(slots), kb.asarray(context_lens),
        kb.asarray(qsl), 0.25, out, workspace=workspace,
    )
    want = reference.static_attention(
        q, k_cache, v_cache, slots, context_lens, qsl, 0.25, np.empty((tokens, q_heads, dim), np.float32)
    )
    return kb.to_host(out), want


def test_the_plan_weighs_each_kernel_family_by_its_own_blocks_an_sm(monkeypatch):
    """On a GPU, _plan gives the model each candidate's warps and blocks an SM (whole-range, and split
    when the step may split) and launches its answer; checked here with stand-ins for compiled kernels."""
    kernels = [attention._Kernels(whole=name, partition=f"{name} split", split_signature="", args=(),
                                  threads=warps * 32, options={}, merges=True)
               for name, warps in (("w8", 8), ("w2", 2))]
    per_sm = {"w8": 1, "w8 split": 1, "w2": 6, "w2 split": 5}
    monkeypatch.setattr(attention, "SIMULATOR", False)
    monkeypatch.setattr(attention, "compiled", lambda function, signature, **options: function)
    monkeypatch.setattr(attention, "_blocks_per_sm", lambda kernel, threads: per_sm[kernel])
    monkeypatch.setattr(attention, "multiprocessors", lambda: 132)
    asked = []
    monkeypatch.setattr(attention, "fastest_launch", lambda *args: asked.append(args) or (1, 7))
    assert attention._plan(kernels, 8, 8192, 64, 512) == (kernels[1], 7)
    assert asked == [(8, 8192, 64, ((8, 1, 1), (2, 6, 5)), 132, 512)]
    asked.clear()
    attention._plan(kernels, 8, 8192, 1, 512)  # no room to split: the whole-range kernels' residency
    assert asked[0][3] == ((8, 1, 1), (2, 6, 6))


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_static_attention_matches_reference(kb, rng, dtype, split):
    q_heads, kv_heads, dim, _, _ = CONFIGS[1]
    got, want = _run_static(kb, rng, q_heads, kv_heads, dim, dtype, pick(sim=20, gpu=2048), split)
    assert rel_err(got, want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("block_size", pick(sim=[4], gpu=[16, 32]))
def test_store_kv_matches_reference(kb, rng, dtype, block_size):
    tokens, q_heads, kv_heads, dim = pick(sim=(5, 2, 2, 8), gpu=(300, 32, 8, 128))
    num_blocks = tokens // block_size + 4
    (_, k, v), (_, k_dev, v_dev) = _qkv_views(kb, rng, tokens, q_heads, kv_heads, dim, dtype)
    slots = rng.permutation(num_blocks * block_size)[:tokens].astype(np.int32)
    slots[tokens // 2] = -1
    k_cache = random(rng, (num_blocks, block_size, kv_heads, dim), dtype)
    v_cache = random(rng, (num_blocks, block_size, kv_heads, dim), dtype)
    k_dev_cache, v_dev_cache = kb.asarray(k_cache), kb.asarray(v_cache)
    kb.ops.store_kv(k_dev, v_dev, k_dev_cache, v_dev_cache, kb.asarray(slots))
    reference.store_kv(k, v, k_cache, v_cache, slots)
    assert np.array_equal(kb.to_host(k_dev_cache), k_cache)
    assert np.array_equal(kb.to_host(v_dev_cache), v_cache)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_store_kv_static_matches_reference(kb, rng, dtype):
    tokens, q_heads, kv_heads, dim, max_len = pick(sim=(5, 1, 1, 16, 6), gpu=(300, 32, 8, 128, 512))
    num_slots = 4
    (_, k, v), (_, k_dev, v_dev) = _qkv_views(kb, rng, tokens, q_heads, kv_heads, dim, dtype)
    flat = rng.permutation(num_slots * max_len)[:tokens]  # distinct (slot, position) pairs: no write races
    cache_slots = (flat // max_len).astype(np.int32)
    positions = (flat % max_len).astype(np.int32)
    cache_slots[1] = -1
    k_cache = random(rng, (num_slots, max_len, kv_heads, dim), dtype)
    v_cache = random(rng, (num_slots, max_len, kv_heads, dim), dtype)
    k_dev_cache, v_dev_cache = kb.asarray(k_cache), kb.asarray(v_cache)
    kb.ops.store_kv_static(k_dev, v_dev, k_dev_cache, v_dev_cache, kb.asarray(cache_slots), kb.asarray(positions))
    reference.store_kv_static(k, v, k_cache, v_cache, cache_slots, positions)
    assert np.array_equal(kb.to_host(k_dev_cache), k_cache)
    assert np.array_equal(kb.to_host(v_dev_cache), v_cache)


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("aligned", [True, False])
def test_store_kv_takes_the_16_byte_path_only_when_aligned(kb, rng, monkeypatch, dtype, aligned):
    widths = record_widths(monkeypatch, attention)
    tokens, kv_heads, dim, block_size = 4, 2, 8, 4
    # k and v inside one buffer [T, 2 * Hk * D], as a fused QKV output leaves them
    kv = random(rng, (tokens, 2 * kv_heads * dim), dtype)
    kv_d = placed(kb, kv, aligned)
    k, v = (a.reshape(tokens, kv_heads, dim) for a in (kv[:, : kv_heads * dim], kv[:, kv_heads * dim :]))
    k_d, v_d = (a.reshape(tokens, kv_heads, dim) for a in (kv_d[:, : kv_heads * dim], kv_d[:, kv_heads * dim :]))
    slots = np.array([5, -1, 0, 11], np.int32)
    k_cache = random(rng, (3, block_size, kv_heads, dim), dtype)
    v_cache = random(rng, (3, block_size, kv_heads, dim), dtype)
    k_cache_d, v_cache_d = kb.asarray(k_cache), kb.asarray(v_cache)
    kb.ops.store_kv(k_d, v_d, k_cache_d, v_cache_d, kb.asarray(slots))
    reference.store_kv(k, v, k_cache, v_cache, slots)
    assert np.array_equal(kb.to_host(k_cache_d), k_cache)
    assert np.array_equal(kb.to_host(v_cache_d), v_cache)
    assert widths == [16 // np.dtype(dtype).itemsize if aligned else 1]


# ----------------------------------------------------------------------------------- errors


def _attention_args(kb, q_heads=4, kv_heads=2, dim=8, dtype=np.float32, cache_dtype=None):
    """Valid arguments for 3 tokens of 2 sequences, for the error tests to spoil one at a time."""
    cache_dtype = cache_dtype or dtype
    return dict(
        q=kb.asarray(np.ones((3, q_heads, dim), dtype)),
        k_cache=kb.asarray(np.zeros((4, 4, kv_heads, dim), cache_dtype)),
        v_cache=kb.asarray(np.zeros((4, 4, kv_heads, dim), cache_dtype)),
        block_tables=kb.asarray(np.zeros((2, 2), np.int32)),
        context_lens=kb.asarray(np.full(2, 2, np.int32)),
        query_start_loc=kb.asarray(np.array([0, 1, 3], np.int32)),
        scale=1.0,
        out=kb.asarray(np.zeros((3, q_heads, dim), dtype)),
    )


def test_paged_attention_rejects_wrong_output_shape(kb):
    args = _attention_args(kb)
    args["out"] = kb.asarray(np.zeros((3, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"paged_attention: out must have shape \(3, 4, 8\), got \(3, 2, 8\)"):
        kb.ops.paged_attention(**args)


def test_paged_attention_rejects_wrong_block_tables(kb):
    args = _attention_args(kb)
    args["block_tables"] = kb.asarray(np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match=r"paged_attention: block_tables must have shape \(2, \*\), got \(3, 2\)"):
        kb.ops.paged_attention(**args)


def test_paged_attention_rejects_wrong_query_start_loc(kb):
    args = _attention_args(kb)
    args["query_start_loc"] = kb.asarray(np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match=r"paged_attention: query_start_loc must have shape \(3,\), got \(2,\)"):
        kb.ops.paged_attention(**args)


def test_paged_attention_rejects_heads_not_multiple_of_kv_heads(kb):
    with pytest.raises(ValueError, match="paged_attention: q has 3 heads, which is not a multiple of the 2 KV heads"):
        kb.ops.paged_attention(**_attention_args(kb, q_heads=3))


def test_paged_attention_rejects_mixed_dtypes(kb):
    with pytest.raises(ValueError, match=r"paged_attention: k_cache must have the dtype of q \(float32\), got float16"):
        kb.ops.paged_attention(**_attention_args(kb, cache_dtype=np.float16))


def test_paged_attention_rejects_bfloat16_q_with_float16_caches(kb):
    message = r"paged_attention: k_cache must have the dtype of q \(bfloat16\), got float16"
    with pytest.raises(ValueError, match=message):
        kb.ops.paged_attention(**_attention_args(kb, dtype=BF16, cache_dtype=np.float16))


def test_paged_attention_rejects_strided_head_dim(kb):
    args = _attention_args(kb)
    args["q"] = kb.asarray(np.ones((3, 4, 16), np.float32))[:, :, ::2]
    with pytest.raises(ValueError, match="paged_attention: q must be unit-stride along its last axis"):
        kb.ops.paged_attention(**args)


def test_paged_attention_rejects_int64_metadata(kb):
    args = _attention_args(kb)
    args["context_lens"] = kb.asarray(np.full(2, 2, np.int64))
    with pytest.raises(ValueError, match="paged_attention: context_lens must be int32, got int64"):
        kb.ops.paged_attention(**args)


def test_paged_attention_rejects_unsupported_head_dim(kb):
    with pytest.raises(ValueError, match="paged_attention: head_dim must be a multiple of 8 up to 256, got 12"):
        kb.ops.paged_attention(**_attention_args(kb, dim=12))


def test_paged_attention_rejects_wrong_workspace(kb):
    workspace = AttentionWorkspace.allocate(kb.xp, 3, 4, 16, 8)
    with pytest.raises(ValueError, match=r"workspace.partials must have shape \(3, 4, 1, 8\), got \(3, 4, 1, 16\)"):
        kb.ops.paged_attention(**_attention_args(kb), workspace=workspace)


def test_static_attention_rejects_wrong_cache_slots(kb):
    args = _attention_args(kb)
    args["cache_slots"] = kb.asarray(np.zeros(3, np.int32))
    del args["block_tables"]
    with pytest.raises(ValueError, match=r"static_attention: cache_slots must have shape \(2,\), got \(3,\)"):
        kb.ops.static_attention(**args)


def test_store_kv_rejects_wrong_slot_mapping(kb):
    k = kb.asarray(np.ones((3, 2, 8), np.float32))
    cache = kb.asarray(np.zeros((4, 4, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"store_kv: slot_mapping must have shape \(3,\), got \(2,\)"):
        kb.ops.store_kv(k, k, cache, cache, kb.asarray(np.zeros(2, np.int32)))


def test_store_kv_rejects_cache_of_other_heads(kb):
    k = kb.asarray(np.ones((3, 2, 8), np.float32))
    cache = kb.asarray(np.zeros((4, 4, 1, 8), np.float32))
    with pytest.raises(ValueError, match=r"store_kv: k_cache must have shape \(\*, \*, 2, 8\), got \(4, 4, 1, 8\)"):
        kb.ops.store_kv(k, k, cache, cache, kb.asarray(np.zeros(3, np.int32)))


def test_store_kv_rejects_mixed_dtypes(kb):
    k = kb.asarray(np.ones((3, 2, 8), np.float32))
    cache = kb.asarray(np.zeros((4, 4, 2, 8), np.float16))
    with pytest.raises(ValueError, match=r"store_kv: k_cache must have the dtype of k \(float32\), got float16"):
        kb.ops.store_kv(k, k, cache, cache, kb.asarray(np.zeros(3, np.int32)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "uint16", "float32"])  # uint16: bfloat16
@pytest.mark.parametrize("dim,group", [(128, 4), (128, 1), (64, 3)])
def test_decode_attention_keeps_its_arrays_in_registers(dtype, dim, group):
    """Llama-3-8B (d 128, 4 q heads per KV head) and other shapes: no local memory under the register cap."""
    from infinilm_nb.kernels.common import compiled

    vec = 16 // np.dtype(dtype).itemsize
    options = attention._compile_options(dim, group, vec)
    kernels = attention._attention_kernels(dim, group, vec, attention._warps(dim, group, vec), 16, dtype == "uint16")
    for pyfunc, signature in zip(kernels, attention.kernel_signatures(dtype)):
        kernel = compiled(pyfunc, signature, **options)
        assert kernel.get_local_mem_per_thread() == 0, (pyfunc.__name__, kernel.get_regs_per_thread())
        assert kernel.get_regs_per_thread() <= options.get("max_registers", 255)
