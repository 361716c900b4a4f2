"""Scheduler and block manager, driven by a fake model that reads its "KV cache" back through the
step's slot_mapping and block tables: wrong slots, reused blocks or lost context change its tokens."""

from __future__ import annotations

import numpy as np
import pytest

from infinilm_nb import SamplingParams
from infinilm_nb.runtime.block_manager import BlockManager
from infinilm_nb.runtime.cache import BlockAllocator
from infinilm_nb.runtime.scheduler import Scheduler
from infinilm_nb.runtime.sequence import Sequence, SequenceStatus

VOCAB = 97


class FakeModel:
    """Stores each token id at its cache slot, and predicts from the context it reads back."""

    def __init__(self, num_slots: int) -> None:
        self.cache = np.full(num_slots, -1, dtype=np.int64)

    def next_tokens(self, scheduled, block_size: int) -> np.ndarray:
        step = scheduled.step
        self.cache[step.slot_mapping] = step.token_ids
        tokens = []
        for b, length in enumerate(step.context_lens):
            pos = np.arange(length)
            context = self.cache[step.block_tables[b, pos // block_size] * block_size + pos % block_size]
            assert (context >= 0).all(), "the step reads a slot nothing was written to"
            tokens.append(int((context * (pos + 3)).sum() % VOCAB))
        return np.array(tokens, dtype=np.int32)


def run(prompts, max_tokens=6, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=256):
    """Generate ``max_tokens`` tokens per prompt through the scheduler; return them and the scheduler."""
    allocator = BlockAllocator(num_blocks)
    scheduler = Scheduler(BlockManager(allocator, block_size), max_num_seqs, max_num_batched_tokens)
    model = FakeModel(num_blocks * block_size)
    seqs = [Sequence(str(i), p, SamplingParams(max_tokens=max_tokens)) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while (scheduled := scheduler.schedule()) is not None:
        assert scheduled.step.num_tokens <= max_num_batched_tokens
        assert scheduled.step.num_seqs <= max_num_seqs
        for seq in scheduler.update(scheduled, model.next_tokens(scheduled, block_size)):
            if seq.num_output_tokens == max_tokens:
                scheduler.finish(seq)
    assert allocator.num_free == num_blocks, "blocks leaked"
    return [seq.output_token_ids for seq in seqs], scheduler


PROMPTS = [list(range(1 + i, 1 + i + n)) for i, n in enumerate([5, 1, 9, 3, 12, 7, 2, 8])]


def test_first_steps_layout():
    scheduler = Scheduler(BlockManager(BlockAllocator(8), 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = Sequence("a", [10, 11, 12, 13, 14])
    scheduler.add(a)
    first = scheduler.schedule()
    step = first.step
    np.testing.assert_array_equal(step.token_ids, [10, 11, 12, 13, 14])
    np.testing.assert_array_equal(step.positions, [0, 1, 2, 3, 4])
    assert a.block_table == [0, 1]
    np.testing.assert_array_equal(step.slot_mapping, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(step.query_start_loc, [0, 5])
    np.testing.assert_array_equal(step.context_lens, [5])
    np.testing.assert_array_equal(step.block_tables, [[0, 1]])
    assert first.samples == [True]
    for field in ("token_ids", "positions", "slot_mapping", "query_start_loc", "context_lens", "block_tables"):
        assert getattr(step, field).dtype == np.int32, field

    assert scheduler.update(first, np.array([42])) == [a]
    assert a.token_ids[-1] == 42 and a.num_computed_tokens == 5
    b = Sequence("b", [20, 21])
    scheduler.add(b)
    second = scheduler.schedule()  # a's decode and b's prefill in one flattened batch
    step = second.step
    np.testing.assert_array_equal(step.token_ids, [42, 20, 21])
    np.testing.assert_array_equal(step.positions, [5, 0, 1])
    np.testing.assert_array_equal(step.slot_mapping, [5, 8, 9])
    np.testing.assert_array_equal(step.query_start_loc, [0, 1, 3])
    np.testing.assert_array_equal(step.context_lens, [6, 2])
    np.testing.assert_array_equal(step.block_tables, [[0, 1], [2, 0]])  # padded with 0
    assert second.samples == [True, True]


def test_limits_and_chunked_prefill():
    scheduler = Scheduler(BlockManager(BlockAllocator(16), 4), max_num_seqs=2, max_num_batched_tokens=4)
    seqs = [Sequence("long", list(range(1, 11))), Sequence("s1", [1]), Sequence("s2", [2])]
    for seq in seqs:
        scheduler.add(seq)
    chunks, samples = [], []
    for _ in range(3):
        scheduled = scheduler.schedule()
        assert scheduled.seqs[0] is seqs[0]
        chunks.append(scheduled.step.positions[: scheduled.num_new_tokens[0]].tolist())
        samples.append(scheduled.samples[0])
        scheduler.update(scheduled, np.zeros(scheduled.step.num_seqs, np.int32))
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert samples == [False, False, True]  # only the chunk that completes the prompt samples
    assert seqs[0].num_output_tokens == 1
    assert len(scheduler.running) == 2 and seqs[2].status is SequenceStatus.WAITING  # max_num_seqs


def test_static_cache_layout():
    max_len = 32
    scheduler = Scheduler(BlockManager(BlockAllocator(3), max_len), max_num_seqs=3, max_num_batched_tokens=64)
    seqs = [Sequence(str(i), [5] * n) for i, n in enumerate([3, 2])]
    for seq in seqs:
        scheduler.add(seq)
    step = scheduler.schedule().step
    np.testing.assert_array_equal(step.block_tables, [[0], [1]])
    np.testing.assert_array_equal(step.slot_mapping, [0, 1, 2, max_len, max_len + 1])


def test_outputs_do_not_depend_on_batching():
    alone = [run([p])[0][0] for p in PROMPTS]
    batched, _ = run(PROMPTS)
    assert batched == alone


def test_chunked_prefill_equals_whole_prefill():
    whole, _ = run(PROMPTS)
    chunked, _ = run(PROMPTS, max_num_batched_tokens=5)
    assert chunked == whole


def test_preemption_keeps_outputs():
    whole, _ = run(PROMPTS)
    # 6 blocks of 4 tokens hold one sequence of up to 24 tokens; eight sequences must take turns
    squeezed, scheduler = run(PROMPTS, num_blocks=6, max_num_batched_tokens=7)
    assert scheduler.num_preemptions > 0
    assert squeezed == whole


def test_preempts_newest_and_requeues_it_first():
    scheduler = Scheduler(BlockManager(BlockAllocator(2), 2), max_num_seqs=4, max_num_batched_tokens=16)
    old, new = Sequence("old", [1, 2]), Sequence("new", [3, 4])
    scheduler.add(old)
    scheduler.add(new)
    scheduler.update(scheduler.schedule(), np.array([7, 8]))  # both prefilled: each fills its only block
    scheduled = scheduler.schedule()  # old's next token needs a block: new gives its one up
    assert scheduled.seqs == [old]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and new.block_table == []
    assert list(scheduler.waiting) == [new] and new.num_preemptions == 1
    scheduler.update(scheduled, np.array([9]))
    scheduler.finish(old)
    recompute = scheduler.schedule()  # new comes back and recomputes its prompt and its token
    assert recompute.seqs == [new]
    np.testing.assert_array_equal(recompute.step.token_ids, [3, 4, 8])
    assert recompute.samples == [True]


def test_finish_frees_and_abort_waiting():
    allocator = BlockAllocator(4)
    scheduler = Scheduler(BlockManager(allocator, 4), max_num_seqs=1, max_num_batched_tokens=16)
    running, waiting = Sequence("r", [1] * 6), Sequence("w", [2])
    scheduler.add(running)
    scheduler.add(waiting)
    scheduler.schedule()
    assert allocator.num_free == 2
    scheduler.finish(waiting)  # an abort while queued
    scheduler.finish(running)
    assert allocator.num_free == 4 and not scheduler.has_unfinished()
    assert scheduler.schedule() is None


def test_errors():
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        Scheduler(BlockManager(BlockAllocator(1), 4), 0, 8)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1, got 0"):
        Scheduler(BlockManager(BlockAllocator(1), 4), 1, 0)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        BlockManager(BlockAllocator(1), 0)
    scheduler = Scheduler(BlockManager(BlockAllocator(1), 4), 1, 64)
    scheduler.add(Sequence("big", [1] * 9))
    with pytest.raises(RuntimeError, match="no sequence fits in 1 free cache blocks"):
        scheduler.schedule()
