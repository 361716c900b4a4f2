"""Continuous batching: each step, one flattened batch that mixes prefill chunks and decodes."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

from .batch import StepInput
from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledStep:
    """What one step computes: ``num_new_tokens[b]`` tokens of ``seqs[b]``, flattened in ``step``.

    ``samples[b]`` says whether row b's logits give a new token: only when the step reaches the end
    of the sequence's tokens (a decode, or the last chunk of a prompt).
    """

    seqs: list[Sequence]
    num_new_tokens: list[int]
    samples: list[bool]
    step: StepInput


class Scheduler:
    """Picks the sequences of each step, bounded by ``max_num_seqs`` running sequences and
    ``max_num_batched_tokens`` tokens per step.

    Running sequences go first, oldest first: each takes its remaining tokens (one for a decode, a
    chunk of at most the token budget left for a prompt). When one needs a block and none is free,
    the newest running sequence is preempted — its blocks freed, itself queued first in line, to be
    recomputed later — until the block fits. Then, if nothing was preempted, waiting sequences are
    admitted in arrival order while sequence slots, token budget and blocks last.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out (finished or aborted) and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledStep | None:
        """The next step's batch, or None when no sequence is left."""
        budget = self.max_num_batched_tokens
        picked: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            count = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + count
            if self.blocks.blocks_needed(seq, target):  # most decode steps stay inside the last block
                while seq.status is SequenceStatus.RUNNING and not self.blocks.can_allocate(seq, target):
                    self._preempt(self.running.pop())  # the newest; seq itself when it is the newest left
                    preempted = True
                if seq.status is SequenceStatus.WAITING:
                    break
                self.blocks.allocate(seq, target)
            picked.append((seq, count))
            budget -= count
            i += 1
        while not preempted and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            count = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(seq, seq.num_computed_tokens + count):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, seq.num_computed_tokens + count)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            picked.append((seq, count))
            budget -= count
        if not picked:
            if self.running or self.waiting:
                raise RuntimeError(
                    f"scheduler: no sequence fits in {self.blocks.num_free_blocks} free cache blocks; "
                    "the cache must hold at least one sequence of max_model_len tokens"
                )
            return None
        return self._build(picked)

    def update(self, scheduled: ScheduledStep, sampled: np.ndarray) -> list[Sequence]:
        """Record a computed step: advance each sequence, append the tokens sampled for the rows
        that sample. Returns the sequences that got a new token, in batch order."""
        grown = []
        for seq, count, samples, token in zip(scheduled.seqs, scheduled.num_new_tokens, scheduled.samples, sampled):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted between schedule and update
            seq.num_computed_tokens += count
            if samples:
                seq.append(int(token))
                grown.append(seq)
        return grown

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _build(self, picked: list[tuple[Sequence, int]]) -> ScheduledStep:
        """The host StepInput of the picked (sequence, new token count) pairs, built with a few
        whole-batch NumPy operations (no per-sequence arrays: this runs every decode step)."""
        seqs = [seq for seq, _ in picked]
        counts = [count for _, count in picked]
        num_seqs = len(picked)
        starts = np.fromiter((seq.num_computed_tokens for seq in seqs), dtype=np.int32, count=num_seqs)
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
        np.cumsum(counts, out=query_start_loc[1:])
        lengths = starts + query_start_loc[1:] - query_start_loc[:-1]
        num_tokens = int(query_start_loc[-1])
        if num_tokens == num_seqs:  # all decodes (or one-token chunks): one token per sequence
            token_ids = np.fromiter((seq.token_ids[seq.num_computed_tokens] for seq in seqs), np.int32, num_seqs)
            positions = starts
            rows = np.arange(num_seqs)
        else:
            chunks = (seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n] for seq, n in picked)
            token_ids = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int32, count=num_tokens)
            rows = np.repeat(np.arange(num_seqs), counts)
            positions = np.arange(num_tokens, dtype=np.int32) + np.repeat(starts - query_start_loc[:-1], counts)
        tables, slots = self._tables_and_slots(seqs, rows, positions)
        step = StepInput(
            token_ids=token_ids,
            positions=positions,
            slot_mapping=slots,
            query_start_loc=query_start_loc,
            context_lens=lengths,
            block_tables=tables,
            max_query_len=max(counts),
        )
        samples = [seq.num_computed_tokens + count == seq.num_tokens for seq, count in picked]
        return ScheduledStep(seqs=seqs, num_new_tokens=counts, samples=samples, step=step)

    def _tables_and_slots(self, seqs: list[Sequence], rows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The block tables of ``seqs`` (zero-padded to the widest) and the cache slot of each token
        (``rows[i]``: its sequence's index, ``positions[i]``: its position)."""
        width = max(len(seq.block_table) for seq in seqs)
        tables = np.array([seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs], dtype=np.int32)
        block_size = self.blocks.block_size
        slots = tables[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
        return tables, slots.astype(np.int32)

    def schedule_ahead(self, scheduled: ScheduledStep) -> ScheduledStep | None:
        """The decode step after ``scheduled`` (a decode step of running sequences whose tokens have
        not come back yet) for the same sequences, their token ids left for the device to fill in; or
        None when the next step must be scheduled as usual: a waiting sequence could be admitted (a
        running slot is free), or a sequence needs a block that is not free (preempting is
        :meth:`schedule`'s job). With every slot taken, waiting sequences wait one step more when a
        running one finishes.

        Each sequence's next token goes to position ``num_tokens`` (the token being sampled now); its
        block is allocated here. :meth:`update` then takes ``scheduled``'s tokens and this step's in
        order, skipping the sequences that finished in between.
        """
        seqs = scheduled.seqs
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        if any(seq.status is not SequenceStatus.RUNNING for seq in seqs):
            return None
        needed = sum(self.blocks.blocks_needed(seq, seq.num_tokens + 1) for seq in seqs)
        if needed > self.blocks.num_free_blocks:
            return None
        for seq in seqs:
            self.blocks.allocate(seq, seq.num_tokens + 1)
        n = len(seqs)
        positions = np.fromiter((seq.num_tokens for seq in seqs), dtype=np.int32, count=n)
        tables, slots = self._tables_and_slots(seqs, np.arange(n), positions)
        step = StepInput(
            token_ids=np.zeros(n, dtype=np.int32),
            positions=positions,
            slot_mapping=slots,
            query_start_loc=np.arange(n + 1, dtype=np.int32),
            context_lens=positions + 1,
            block_tables=tables,
            max_query_len=1,
        )
        return ScheduledStep(seqs=list(seqs), num_new_tokens=[1] * n, samples=[True] * n, step=step)
