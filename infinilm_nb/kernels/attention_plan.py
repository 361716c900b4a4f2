"""How a decode attention step is launched: the warps a block and the partitions of each token's keys,
those of least time in a model of the launch.

The host cannot see the contexts of a step (a CUDA graph is captured before they are known), so it
plans for the block table's capacity: ``pairs`` (token, KV head) blocks, each over ``keys`` keys cut
into partitions of a multiple of ``KEY_GRAIN`` keys (:func:`split_of`). Each kernel family that can
take the step (the tensor-core kernel in blocks of 8, 6, 4 or 2 warps, or the CUDA-core kernel)
holds some blocks an SM; :func:`fastest_launch` estimates every (family, partition count) by
:func:`step_time` and takes the least.

The model (fitted to 32 H200 timings of 32 / 8 heads at d 128, batch 1 to 64, 1K to 8K keys, 2 to 8
warps, 1 to 128 partitions: bench/attention_sweep.py, bench/versus.py; within 15% of each, and it
picks the measured fastest launch of each bench case: tests/kernels/test_attention_plan.py). Each warp
keeps one 16-key step of loads in flight, so a block streams keys at ``warps x STEP_KEYS / STEP_US``
until its SM's blocks together near ``SM_BYTES_PER_US``; ``SATURATION`` is how sharply they bend
towards that. The blocks run in waves; a wave pays a fixed chain of dependent round trips
(sequence, q, table, fold, out: ``WHOLE_US``; split, the partials, fence and counter too:
``SPLIT_US``) and streams its partition at the rate of the blocks on its fullest SM; a split adds
the merge's ``MERGE_US`` a partition. (The launch with its key loop cut out took 4.3 us unsplit, 10.5
split in 3 and 12.9 in 26: fourteenth session.)
"""

from __future__ import annotations

import functools

from .common import SIMULATOR, cdiv

# Partition lengths are multiples of this many keys. The simulator's is small so that tiny test
# contexts span several partitions.
KEY_GRAIN = 16 if SIMULATOR else 64
STEP_KEYS = 16
STEP_US = 1.52  # a warp's 16-key step: 10.5 keys a microsecond
SM_BYTES_PER_US = 34_800  # an SM's streaming ceiling (x 132 SMs: 4.6 TB/s)
SATURATION = 3
WHOLE_US = 7.0
SPLIT_US = 9.0
MERGE_US = 0.15


def split_of(keys: int, parts: int, grain: int = KEY_GRAIN) -> tuple[int, int]:
    """The partitions, and the keys of each, that ``keys`` are cut into when ``parts`` are asked for:
    multiples of ``grain`` keys, so maybe fewer than asked; ``(1, keys)`` when one holds them all."""
    part_keys = grain * cdiv(cdiv(keys, grain), parts)
    return (1, keys) if part_keys >= keys else (cdiv(keys, part_keys), part_keys)


def step_time(
    pairs: int, keys: int, parts: int, warps: int, per_sm: int, sms: int, key_bytes: int, grain: int = KEY_GRAIN
) -> float:
    """Estimated microseconds of a decode attention launch (the module's model): ``pairs`` (token, KV
    head) blocks, each token's ``keys`` cut into ``parts`` partitions of a multiple of ``grain`` keys
    (:func:`split_of`), of ``warps`` warps, of which each of ``sms`` SMs holds ``per_sm``;
    ``key_bytes`` of K and V a key."""
    parts, part_keys = split_of(keys, parts, grain)
    ceiling = SM_BYTES_PER_US / key_bytes  # keys a microsecond

    def wave(blocks: int) -> float:
        resident = cdiv(blocks, sms)  # on the fullest SM
        demand = resident * warps * STEP_KEYS / STEP_US
        rate = demand / (1 + (demand / ceiling) ** SATURATION) ** (1 / SATURATION)
        return (WHOLE_US if parts == 1 else SPLIT_US) + part_keys * resident / rate

    full, rest = divmod(pairs * parts, per_sm * sms)
    time = full * wave(per_sm * sms) + (wave(rest) if rest else 0.0)
    return time + (MERGE_US * parts if parts > 1 else 0.0)


@functools.lru_cache(maxsize=4096)  # a step's host time: the same steps recur
def fastest_launch(
    pairs: int, keys: int, most: int, families: tuple[tuple[int, int, int], ...], sms: int, key_bytes: int,
    grain: int = KEY_GRAIN,
) -> tuple[int, int]:
    """The kernel family and partition count (up to ``most``) of least :func:`step_time`. ``families``
    lists each family's warps a block and blocks an SM of its whole-range and its split kernel; ties go
    to the first listed."""
    best = min(
        (step_time(pairs, keys, parts, warps, whole if parts == 1 else split, sms, key_bytes, grain), index, parts)
        for index, (warps, whole, split) in enumerate(families)
        for parts in range(1, min(most, cdiv(keys, grain)) + 1)  # split_of makes no more
    )
    return best[1], best[2]
