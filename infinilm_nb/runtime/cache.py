"""KV caches: a paged pool of blocks with a reference-counting allocator, and a static per-slot cache.

Both hold K and V as ``[layers, blocks, block_size, kv_heads, head_dim]``; a static cache is a paged
cache with one block of ``max_len`` per sequence slot, so the model treats both the same: the
scheduler writes ``slot_mapping = block * block_size + offset`` and ``block_tables`` (``[[slot]]`` and
``slot * max_len + position`` for the static cache).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import ModelConfig, ParallelConfig


class BlockAllocator:
    """Free list of block ids with reference counts (blocks shared by prefixes are freed at 0)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 goes out first
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        """Whether ``n`` blocks are free."""
        return n <= len(self._free)

    def allocate(self) -> int:
        """Take a free block (reference count 1); ``RuntimeError`` when none is left."""
        if not self._free:
            raise RuntimeError(f"out of KV-cache blocks (all {self.num_blocks} in use)")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Share an allocated block once more."""
        self._check_allocated(block, "incref")
        self._refs[block] += 1

    def free(self, block: int) -> None:
        """Drop one reference; the block returns to the free list when none is left."""
        self._check_allocated(block, "free")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def _check_allocated(self, block: int, what: str) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"{what}: block {block} is out of range [0, {self.num_blocks})")
        if self._refs[block] == 0:
            raise ValueError(f"{what}: block {block} is not allocated")


def _kv_heads(config: ModelConfig, parallel: ParallelConfig) -> int:
    """KV heads held by this rank (replicated when there are more ranks than KV heads)."""
    return max(1, config.num_key_value_heads // parallel.tp_size)


def block_bytes(config: ModelConfig, block_size: int, dtype: Any, parallel: ParallelConfig | None = None) -> int:
    """Bytes of one block of K and V over all layers."""
    heads = _kv_heads(config, parallel or ParallelConfig())
    return 2 * config.num_hidden_layers * block_size * heads * config.head_dim * np.dtype(dtype).itemsize


class PagedKVCache:
    """K and V pools ``[layers, num_blocks, block_size, kv_heads, head_dim]`` and their allocator."""

    def __init__(
        self,
        backend: Any,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: Any,
        parallel: ParallelConfig | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.backend = backend
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)
        shape = (config.num_hidden_layers, num_blocks, block_size, _kv_heads(config, parallel or ParallelConfig()),
                 config.head_dim)
        self.k = backend.xp.zeros(shape, dtype=np.dtype(dtype))
        self.v = backend.xp.zeros(shape, dtype=np.dtype(dtype))

    def layer(self, i: int) -> tuple[Any, Any]:
        """Layer i's ``(k, v)``, each ``[num_blocks, block_size, kv_heads, head_dim]`` (views)."""
        return self.k[i], self.v[i]


class StaticKVCache:
    """K and V ``[layers, num_slots, max_len, kv_heads, head_dim]``: one contiguous row per sequence.

    ``lengths`` (host int32 ``[num_slots]``) is each slot's token count, kept by the scheduler;
    ``allocate()`` / ``free(slot)`` hand out slots. ``block_size == max_len``, so the model reads it
    as a paged cache whose block ``s`` is slot ``s``.
    """

    def __init__(
        self,
        backend: Any,
        config: ModelConfig,
        num_slots: int,
        max_len: int,
        dtype: Any,
        parallel: ParallelConfig | None = None,
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"num_slots and max_len must be >= 1, got {num_slots} and {max_len}")
        self.backend = backend
        self.num_slots = num_slots
        self.max_len = max_len
        self.block_size = max_len
        self.lengths = np.zeros(num_slots, dtype=np.int32)
        self._free = list(range(num_slots - 1, -1, -1))
        self._used = [False] * num_slots
        shape = (config.num_hidden_layers, num_slots, max_len, _kv_heads(config, parallel or ParallelConfig()),
                 config.head_dim)
        self.k = backend.xp.zeros(shape, dtype=np.dtype(dtype))
        self.v = backend.xp.zeros(shape, dtype=np.dtype(dtype))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int = 1) -> bool:
        """Whether ``n`` slots are free."""
        return n <= len(self._free)

    def allocate(self) -> int:
        """Take a free slot (length 0); ``RuntimeError`` when all are in use."""
        if not self._free:
            raise RuntimeError(f"out of static KV-cache slots (all {self.num_slots} in use)")
        slot = self._free.pop()
        self._used[slot] = True
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back."""
        if not 0 <= slot < self.num_slots or not self._used[slot]:
            raise ValueError(f"free: slot {slot} is not allocated")
        self._used[slot] = False
        self.lengths[slot] = 0
        self._free.append(slot)

    def layer(self, i: int) -> tuple[Any, Any]:
        """Layer i's ``(k, v)``, each ``[num_slots, max_len, kv_heads, head_dim]`` (views)."""
        return self.k[i], self.v[i]


def num_blocks_for_memory(
    config: ModelConfig,
    block_size: int,
    dtype: Any,
    gpu_memory_utilization: float,
    parallel: ParallelConfig | None = None,
    reserve_bytes: int = 0,
) -> int:
    """How many blocks fit on this GPU so that total use stays under ``gpu_memory_utilization``.

    Call it after the weights are loaded: what is already used counts against the budget
    (``free - (1 - utilization) * total``); ``reserve_bytes`` keeps room for activations.
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()  # cached but unused blocks are free for the cache
    free, total = cupy.cuda.runtime.memGetInfo()
    budget = free - (1.0 - gpu_memory_utilization) * total - reserve_bytes
    per_block = block_bytes(config, block_size, dtype, parallel)
    blocks = int(budget // per_block)
    if blocks < 1:
        raise ValueError(
            f"no GPU memory left for the KV cache: {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB, "
            f"gpu_memory_utilization={gpu_memory_utilization} leaves {budget / 2**30:.2f} GiB; "
            f"one block needs {per_block / 2**20:.2f} MiB (raise gpu_memory_utilization or lower the model size)"
        )
    return blocks
