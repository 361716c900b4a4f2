"""A hand-made stand-in for the scheduler: place sequences in a cache and build StepInputs for them."""

from __future__ import annotations

import numpy as np

from infinilm_nb.runtime.batch import StepInput
from infinilm_nb.runtime.cache import PagedKVCache, StaticKVCache


class CachedSeq:
    """One sequence's place in a paged cache (its blocks) or a static cache (its slot)."""

    def __init__(self, cache: PagedKVCache | StaticKVCache, spacer: bool = False) -> None:
        self.cache = cache
        self.length = 0
        self.spacer = spacer  # leave a block unused after each of ours, so block tables are not 0, 1, 2...
        self.blocks = [cache.allocate()] if isinstance(cache, StaticKVCache) else []

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens."""
        if isinstance(self.cache, StaticKVCache):
            assert self.length + n <= self.cache.max_len
            return
        while len(self.blocks) * self.cache.block_size < self.length + n:
            self.blocks.append(self.cache.allocator.allocate())
            if self.spacer:
                self.cache.allocator.allocate()

    def slot(self, position: int) -> int:
        size = self.cache.block_size
        return self.blocks[position // size] * size + position % size


def make_step(batch: list[tuple[CachedSeq, list[int]]]) -> StepInput:
    """The StepInput for each sequence's new tokens, advancing the sequences' lengths."""
    tokens, positions, slots, starts, lengths = [], [], [], [0], []
    for seq, new in batch:
        seq.reserve(len(new))
        pos = list(range(seq.length, seq.length + len(new)))
        tokens += new
        positions += pos
        slots += [seq.slot(p) for p in pos]
        seq.length += len(new)
        if isinstance(seq.cache, StaticKVCache):
            seq.cache.lengths[seq.blocks[0]] = seq.length
        starts.append(len(tokens))
        lengths.append(seq.length)
    width = max(len(seq.blocks) for seq, _ in batch)
    tables = np.zeros((len(batch), width), np.int32)
    for b, (seq, _) in enumerate(batch):
        tables[b, : len(seq.blocks)] = seq.blocks
    as32 = lambda values: np.asarray(values, dtype=np.int32)  # noqa: E731
    longest = int(np.diff(starts).max())
    return StepInput(as32(tokens), as32(positions), as32(slots), as32(starts), as32(lengths), tables, longest)


def run_step(model, batch: list[tuple[CachedSeq, list[int]]]) -> np.ndarray:
    """Forward one step on the model's backend; host float32 logits ``[B, vocab]``."""
    step = make_step(batch).to(model.backend)
    seq = batch[0][0]
    return model.backend.to_host(model.forward(step, seq.cache))
