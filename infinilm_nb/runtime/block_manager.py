"""BlockManager: which cache blocks each sequence holds, on top of the cache's BlockAllocator."""

from __future__ import annotations

from typing import Protocol

from .sequence import Sequence


class Allocator(Protocol):
    """What :class:`infinilm_nb.runtime.cache.BlockAllocator` offers."""

    def allocate(self) -> int: ...

    def free(self, block: int) -> None: ...

    def can_allocate(self, count: int) -> bool: ...

    @property
    def num_free(self) -> int: ...


class BlockManager:
    """Grows and frees sequences' block tables, ``block_size`` tokens per block.

    A static cache is the case ``block_size == max_model_len``: each sequence gets one block (its slot).
    """

    def __init__(self, allocator: Allocator, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.allocator = allocator
        self.block_size = block_size

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks ``seq`` needs for its first ``num_tokens`` tokens to be in the cache."""
        return max(-(-num_tokens // self.block_size) - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.allocator.can_allocate(self.blocks_needed(seq, num_tokens))

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give ``seq`` blocks for its first ``num_tokens`` tokens (check :meth:`can_allocate` first)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            seq.block_table.append(self.allocator.allocate())

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` to the allocator."""
        for block in reversed(seq.block_table):
            self.allocator.free(block)
        seq.block_table.clear()

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free
