"""The launch plan of decode attention (attention_plan): its model against measured timings."""

import pytest

from infinilm_nb.kernels import attention_plan


# Decode attention on tensor cores (the split kernel merging in its last block), us by warps a block
# and partition count: NVIDIA H200, 32 / 8 heads, d 128, 64-key grain, 132 SMs holding 1, 2, 3 or 6
# blocks of 8, 6, 4 or 2 warps (bench/attention_sweep.py at 34390e7 for 4 warps; bench/versus.py at
# 8a5c327, 2026-11-29, for the others, each at the count the dispatcher of the time chose).
MEASURED = {  # (batch, keys): {(warps, partitions): us}
    (1, 8192): {(4, 1): 195.7, (4, 16): 25.3, (4, 26): 23.9, (4, 32): 23.8, (4, 43): 26.1, (4, 64): 37.1,
                (4, 128): 54.2, (8, 16): 20.7, (6, 26): 22.8},
    (16, 1024): {(4, 1): 32.8, (4, 2): 28.3, (4, 3): 27.3, (4, 4): 38.2, (4, 6): 35.9, (4, 16): 64.6, (8, 1): 25.1,
                 (6, 2): 27.3},
    (16, 8192): {(4, 1): 217.5, (4, 3): 136.7, (4, 6): 146.1, (8, 1): 146.6, (6, 2): 135.7},
    (32, 2048): {(4, 1): 76.2, (4, 2): 97.2, (4, 3): 82.6, (6, 1): 70.8, (2, 3): 74.9},
    (64, 2048): {(2, 1): 145.5},
}
BLOCKS_PER_SM = {8: 1, 6: 2, 4: 3, 2: 6}


@pytest.mark.parametrize("batch, keys", sorted(MEASURED))
def test_the_launch_chosen_is_the_one_measured_fastest(batch, keys):
    measured = MEASURED[batch, keys]
    families = [(w, BLOCKS_PER_SM[w], BLOCKS_PER_SM[w]) for w in (8, 6, 4, 2) if batch * 8 <= BLOCKS_PER_SM[w] * 132]
    index, asked = attention_plan.fastest_launch(batch * 8, keys, 8192, tuple(families), 132, 512, grain=64)
    chosen = (families[index][0], attention_plan.split_of(keys, asked, grain=64)[0])
    assert chosen in measured, f"{chosen} (warps, partitions) was not measured"
    assert measured[chosen] <= 1.03 * min(measured.values()), (chosen, measured)


def test_the_time_model_is_near_every_measured_launch():
    for (batch, keys), times in MEASURED.items():
        for (warps, parts), us in times.items():
            estimate = attention_plan.step_time(batch * 8, keys, parts, warps, BLOCKS_PER_SM[warps], 132, 512, grain=64)
            assert abs(estimate / us - 1) < 0.15, (batch, keys, warps, parts, estimate, us)


def test_split_of_cuts_whole_grains_and_never_more_partitions_than_asked():
    assert attention_plan.split_of(8192, 30, grain=64) == (26, 320)  # 5 grains a partition
    assert attention_plan.split_of(8192, 26, grain=64) == (26, 320)
    assert attention_plan.split_of(100, 4, grain=64) == (2, 64)
    assert attention_plan.split_of(100, 1, grain=64) == (1, 100)
    assert attention_plan.split_of(64, 8, grain=64) == (1, 64)


def test_ties_go_to_the_first_family_and_no_more_partitions_than_grains():
    same = (4, 3, 3)
    assert attention_plan.fastest_launch(8, 8192, 8192, (same, same), 132, 512, grain=64)[0] == 0
    # 3 grains of keys: at most 3 partitions, however many the workspace allows
    _, parts = attention_plan.fastest_launch(1, 192, 1000, ((8, 1, 1),), 132, 512, grain=64)
    assert 1 <= parts <= 3
