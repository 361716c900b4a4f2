"""Decode attention on tensor cores (attention_mma) against the reference, through paged_attention.

These tests turn the kernel on in the simulator too (NumPy loads and mma), and lift the dispatcher's
one-wave limit so that every shape runs it; the last tests check that limit itself on the GPU.
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
    (head_dim, group) of each launch."""
    monkeypatch.setattr(attention_mma, "ENABLED", True)
    monkeypatch.setattr(attention_mma, "WITHIN_ONE_WAVE", False)
    launched = []
    build = attention_mma.mma_attention_kernels

    def spy(head_dim, group, block_size):
        launched.append((head_dim, group))
        return build(head_dim, group, block_size)

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
    seqs = _seqs(block_size, case) + pick(sim=[(1, 37)] if split else [], gpu=[(1, 5000)])  # several partitions
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
    assert mma_path == [(64, 2)]


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


@pytest.mark.gpu
def test_steps_past_one_wave_of_blocks_stay_on_cuda_cores(kb, rng, monkeypatch):
    """More (token, KV head) pairs than one wave of tensor-core blocks: the CUDA-core kernel, whose
    SMs hold more blocks, takes the step; one pair fewer than a wave runs on tensor cores."""
    from infinilm_nb.kernels.common import compiled

    monkeypatch.setattr(attention_mma, "ENABLED", True)
    on_cuda_cores = []
    build = attention._cuda_core_kernels

    def spy(*args):
        on_cuda_cores.append(True)
        return build(*args)

    monkeypatch.setattr(attention, "_cuda_core_kernels", spy)
    whole, _ = attention_mma.mma_attention_kernels(128, 4, 16)
    wave = attention._resident_blocks(compiled(whole, attention_mma.kernel_signatures()[0], fastmath=True),
                                      attention_mma.WARPS * 32)
    for tokens, want in ((wave // 8, []), (wave // 8 + 1, [True])):
        on_cuda_cores.clear()
        got, reference_out = _run_paged(kb, rng, [(1, 40)] * tokens, 32, 8, 128, 16, F16)
        assert rel_err(got, reference_out) < tolerance(F16)
        assert on_cuda_cores == want, tokens


@pytest.mark.gpu
@pytest.mark.parametrize("dim,group", [(128, 4), (128, 8), (128, 1), (64, 3)])
def test_mma_attention_keeps_its_arrays_in_registers(dim, group):
    from infinilm_nb.kernels.common import compiled

    kernels = attention_mma.mma_attention_kernels(dim, group, 16)
    for pyfunc, signature in zip(kernels, attention_mma.kernel_signatures()):
        kernel = compiled(pyfunc, signature, fastmath=True)
        assert kernel.get_local_mem_per_thread() == 0, (pyfunc.__name__, kernel.get_regs_per_thread())
