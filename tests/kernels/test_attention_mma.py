"""Decode attention on tensor cores (attention_mma) against the reference, through paged_attention.

These tests turn the kernel on in the simulator too (NumPy loads and mma), and lift the dispatcher's
one-wave limit so that every shape runs it; the last tests check that limit itself, the warp counts
it leaves to choose from, and each warp count's answers.
"""

import numpy as np
import pytest

from infinilm_nb.kernels import attention, attention_mma
from infinilm_nb.kernels.attention import AttentionWorkspace
from tests.helpers import pick, rel_err, tolerance
from tests.kernels.test_attention import _cases, _run_paged, _run_static

F16 = np.float16

# ((q heads, kv heads, head_dim, block_size), split): GQA groups 4, 3, 8 (the most one tile's rows
# hold) and 1; blocks of 16 or more keys hold a whole 16-key step (one table lookup a step), smaller
# ones do not. The simulator, slow at head dim 128, runs that one split only.
SHAPES = pick(sim=[(4, 1, 64, 4), (3, 1, 64, 8), (8, 1, 64, 16)], gpu=[(32, 8, 128, 16), (9, 3, 64, 32), (64, 8, 128, 16), (8, 8, 128, 32)])
CASES = [(shape, split) for shape in SHAPES for split in (False, True)] + pick(sim=[((2, 2, 128, 4), True)], gpu=[])
# A split step merges its partitions in its last block (every case) or in the merge kernel (the
# simulator, which is slow, runs that for the first shape only); an unsplit one merges nothing.
MERGE_CASES = [(shape, split, True) for shape, split in CASES] + [
    (shape, True, False) for shape in pick(sim=SHAPES[:1], gpu=SHAPES)
]


@pytest.fixture
def mma_path(monkeypatch):
    """The switch on (also in the simulator) for every step it can take, and a record of the
    (head_dim, group) of each build of its kernels (one a warp count it may choose)."""
    monkeypatch.setattr(attention_mma, "ENABLED", True)
    monkeypatch.setattr(attention_mma, "WITHIN_ONE_WAVE", False)
    launched = []
    build = attention_mma.mma_attention_kernels

    def spy(head_dim, group, block_size, warps):
        launched.append((head_dim, group))
        return build(head_dim, group, block_size, warps)

    monkeypatch.setattr(attention_mma, "mma_attention_kernels", spy)
    return launched


def _seqs(block_size: int, case: str) -> list[tuple[int, int]]:
    if case == "decode":
        return _cases(block_size)["decode"]
    # a mixed batch with cached prefixes; the simulator's is short (it is slow)
    return pick(sim=[(1, 3 * block_size + 1), (3, 9), (0, 4), (2, 2 * block_size)], gpu=_cases(block_size)["mixed"])


@pytest.mark.parametrize("shape,split,merge_in_partition", MERGE_CASES, ids=str)
def test_mma_attention_matches_reference(kb, rng, monkeypatch, mma_path, shape, split, merge_in_partition):
    monkeypatch.setattr(attention, "MERGE_IN_PARTITION", merge_in_partition)
    q_heads, kv_heads, dim, block_size = shape
    case = "decode" if (q_heads + split) % 2 else "mixed"
    # several partitions; in the simulator (16-key partitions) at head dim 64 more than two of the
    # in-block merge's batches of attention_merge's IN_FLIGHT (head dim 128 is slow there)
    seqs = _seqs(block_size, case) + pick(sim=[(1, 149 if dim == 64 else 37)] if split else [], gpu=[(1, 5000)])
    workspace = None
    if split:
        max_context = (-(-max(length for _, length in seqs) // block_size) + 1) * block_size
        tokens = sum(n for n, _ in seqs)
        workspace = AttentionWorkspace.allocate(kb.xp, tokens, q_heads, dim, max_context, partition_keys=pick(sim=16, gpu=256))
        assert workspace.partials.shape[2] > 1
    got, want = _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, F16, workspace)
    assert rel_err(got, want) < tolerance(F16)
    assert workspace is None or not kb.to_host(workspace.finished).any()  # back at zero for the next launch
    assert mma_path[0] == (dim, q_heads // kv_heads) and len(set(mma_path)) == 1


@pytest.mark.parametrize("split", pick(sim=[True], gpu=[False, True]))
def test_mma_static_attention_matches_reference(kb, rng, mma_path, split):
    # a static cache is one block of max_len keys per sequence (a multiple of 16: whole 16-key steps)
    got, want = _run_static(kb, rng, 4, 2, 64, F16, pick(sim=32, gpu=2048), split)
    assert rel_err(got, want) < tolerance(F16)
    assert set(mma_path) == {(64, 2)}


@pytest.mark.parametrize(
    "why,q_heads,kv_heads,dim,dtype,aligned",
    [
        ("float32", 4, 1, 64, np.float32, True),
        ("bfloat16", 4, 1, 64, np.uint16, True),
        ("head_dim 32", 4, 1, 32, F16, True),
        ("9 query heads per KV head", 9, 1, 64, F16, True),
        ("caches off a 16-byte boundary", 4, 1, 64, F16, False),
    ],
)
def test_other_steps_stay_on_cuda_cores(kb, rng, mma_path, why, q_heads, kv_heads, dim, dtype, aligned):
    got, want = _run_paged(kb, rng, [(1, 6), (2, 5)], q_heads, kv_heads, dim, 4, dtype, aligned=aligned)
    assert rel_err(got, want) < tolerance(dtype)
    assert mma_path == [], why


def _record_candidates(monkeypatch, record: list) -> None:
    """Append to ``record``, at every step, the warps a block of each kernel family the dispatcher
    chooses among ("cuda cores" for the CUDA-core one)."""
    plan = attention._plan

    def spy(candidates, *args):
        record.append([k.threads // 32 if k.merges else "cuda cores" for k in candidates])
        return plan(candidates, *args)

    monkeypatch.setattr(attention, "_plan", spy)


@pytest.mark.parametrize("split", [False, True])
def test_warp_counts_whose_wave_cannot_hold_the_step_are_not_chosen(kb, rng, monkeypatch, split):
    """A step whose (token, KV head) pairs overflow one wave of blocks of the most warps is left to
    those of fewer, which get the reference's answer (waves made small here, so that this runs in the
    simulator too; the GPU's own waves: the next test)."""
    monkeypatch.setattr(attention_mma, "ENABLED", True)
    candidates = []
    _record_candidates(monkeypatch, candidates)
    seqs = [(1, 21), (1, 40), (1, 7)]  # 3 pairs (one KV head)
    most = attention_mma.WARP_CHOICES[0]
    monkeypatch.setattr(attention, "_wave", lambda kernels: 2 if kernels.threads == most * 32 else 3)
    workspace = AttentionWorkspace.allocate(kb.xp, len(seqs), 4, 64, 48, partition_keys=16) if split else None
    got, want = _run_paged(kb, rng, seqs, 4, 1, 64, 16, F16, workspace)
    assert rel_err(got, want) < tolerance(F16)
    assert candidates == [list(attention_mma.WARP_CHOICES[1:])]


@pytest.mark.gpu
def test_steps_past_one_wave_of_every_warp_count_stay_on_cuda_cores(kb, rng, monkeypatch):
    """The dispatcher chooses among the warp counts whose wave of blocks holds a step's (token, KV
    head) pairs; past the largest wave, the CUDA-core kernel, whose SMs hold more blocks, takes the
    step. Each answer is checked against the reference."""
    from infinilm_nb.kernels.common import compiled, multiprocessors

    monkeypatch.setattr(attention_mma, "ENABLED", True)
    candidates = []
    _record_candidates(monkeypatch, candidates)

    def wave(warps):
        whole, _ = attention_mma.mma_attention_kernels(128, 4, 16, warps)
        kernel = compiled(whole, attention_mma.kernel_signatures()[0], fastmath=True)
        return attention._blocks_per_sm(kernel, warps * 32) * multiprocessors()

    waves = {warps: wave(warps) for warps in attention_mma.WARP_CHOICES}
    assert waves[min(waves)] == max(waves.values()), waves  # the fewest warps fill the most blocks
    for pairs in sorted({w for w in waves.values()} | {max(waves.values()) + 8}):
        tokens = pairs // 8
        candidates.clear()
        got, reference_out = _run_paged(kb, rng, [(1, 40)] * tokens, 32, 8, 128, 16, F16)
        assert rel_err(got, reference_out) < tolerance(F16)
        want = [warps for warps in attention_mma.WARP_CHOICES if tokens * 8 <= waves[warps]] or ["cuda cores"]
        assert candidates == [want], (tokens, waves)


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [8, 6, 4, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_warp_count_matches_reference(kb, rng, monkeypatch, shape, warps):
    """Each warp count the dispatcher may choose, forced on every shape, split and not."""
    monkeypatch.setattr(attention_mma, "ENABLED", True)
    monkeypatch.setattr(attention_mma, "WITHIN_ONE_WAVE", False)
    monkeypatch.setattr(attention_mma, "WARP_CHOICES", (warps,))
    q_heads, kv_heads, dim, block_size = shape
    seqs = _seqs(block_size, "decode") + [(1, 3000)]
    max_context = (-(-3000 // block_size) + 1) * block_size
    split = AttentionWorkspace.allocate(kb.xp, len(seqs), q_heads, dim, max_context, partition_keys=256)
    for workspace in (None, split):
        got, want = _run_paged(kb, rng, seqs, q_heads, kv_heads, dim, block_size, F16, workspace)
        assert rel_err(got, want) < tolerance(F16), workspace is not None


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dim,group,warps",
    [(128, 4, 4), (128, 8, 4), (128, 1, 4), (64, 3, 4), (128, 4, 2), (128, 8, 2), (128, 4, 6), (128, 8, 6),
     (128, 4, 8), (128, 8, 8)],
)
def test_mma_attention_keeps_its_arrays_in_registers(dim, group, warps):
    from infinilm_nb.kernels.common import compiled

    kernels = attention_mma.mma_attention_kernels(dim, group, 16, warps)
    for pyfunc, signature in zip(kernels, attention_mma.kernel_signatures()):
        kernel = compiled(pyfunc, signature, fastmath=True)
        assert kernel.get_local_mem_per_thread() == 0, (pyfunc.__name__, kernel.get_regs_per_thread())
