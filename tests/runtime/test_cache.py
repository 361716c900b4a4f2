"""BlockAllocator, PagedKVCache and StaticKVCache."""

from __future__ import annotations

import numpy as np
import pytest

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.cache import BlockAllocator, PagedKVCache, StaticKVCache, block_bytes
from infinilm_nb.runtime.config import ModelConfig
from tests.runtime.hf_models import TINY

CONFIG = ModelConfig.from_dict(dict(TINY, model_type="llama"))


def test_allocator_counts_references():
    alloc = BlockAllocator(3)
    assert alloc.num_free == 3 and alloc.can_allocate(3) and not alloc.can_allocate(4)
    a, b = alloc.allocate(), alloc.allocate()
    assert (a, b) == (0, 1) and alloc.num_free == 1
    alloc.incref(a)
    alloc.free(a)
    assert alloc.num_free == 1 and alloc.ref_count(a) == 1
    alloc.free(a)
    assert alloc.num_free == 2 and alloc.ref_count(a) == 0
    assert alloc.allocate() == a  # the freed block is reused first


def test_allocator_errors():
    alloc = BlockAllocator(1)
    alloc.allocate()
    with pytest.raises(RuntimeError, match=r"out of KV-cache blocks \(all 1 in use\)"):
        alloc.allocate()
    alloc.free(0)
    with pytest.raises(ValueError, match="free: block 0 is not allocated"):
        alloc.free(0)
    with pytest.raises(ValueError, match="incref: block 0 is not allocated"):
        alloc.incref(0)
    with pytest.raises(ValueError, match=r"free: block 5 is out of range \[0, 1\)"):
        alloc.free(5)
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockAllocator(0)


def test_paged_cache_layout():
    cache = PagedKVCache(get_backend("cpu"), CONFIG, num_blocks=5, block_size=4, dtype=np.float16)
    assert cache.k.shape == cache.v.shape == (2, 5, 4, 2, 16) and cache.k.dtype == np.float16
    k1, v1 = cache.layer(1)
    assert k1.shape == (5, 4, 2, 16) and k1.flags.c_contiguous
    k1[3, 2] = 7
    assert cache.k[1, 3, 2].min() == 7 and cache.v.max() == 0  # views, not copies
    assert cache.block_size == 4 and cache.allocator.num_free == 5
    assert block_bytes(CONFIG, 4, np.float16) == 2 * 2 * 4 * 2 * 16 * 2


def test_static_cache_slots_and_lengths():
    cache = StaticKVCache(get_backend("cpu"), CONFIG, num_slots=2, max_len=8, dtype=np.float32)
    assert cache.k.shape == (2, 2, 8, 2, 16) and cache.block_size == 8
    assert cache.layer(0)[0].shape == (2, 8, 2, 16)
    a = cache.allocate()
    cache.lengths[a] = 5
    b = cache.allocate()
    assert (a, b) == (0, 1) and not cache.can_allocate() and cache.num_free == 0
    with pytest.raises(RuntimeError, match="out of static KV-cache slots"):
        cache.allocate()
    cache.free(a)
    assert cache.lengths[a] == 0 and cache.can_allocate(1)
    with pytest.raises(ValueError, match="free: slot 0 is not allocated"):
        cache.free(a)
