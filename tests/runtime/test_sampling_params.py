"""SamplingParams: defaults, normalisation and a ValueError naming each bad field and value."""

from __future__ import annotations

import numpy as np
import pytest

from infinilm_nb import SamplingParams
from infinilm_nb.runtime.engine import step_seeds


def test_defaults_and_normalisation():
    params = SamplingParams()
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p) == (16, 1.0, 0, 1.0)
    assert params.stop_strings == [] and params.stop_token_ids == []
    params = SamplingParams(temperature=0, top_k=-1, stop="END", stop_token_ids=[5])
    assert params.temperature == 0.0 and params.top_k == 0
    assert params.stop_strings == ["END"] and params.stop_token_ids == [5]
    assert SamplingParams(stop=["a", "bc"]).stop_strings == ["a", "bc"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_tokens", 0, "max_tokens must be an integer >= 1, got 0"),
        ("max_tokens", 2.5, "max_tokens must be an integer >= 1, got 2.5"),
        ("temperature", -0.1, "temperature must be a number >= 0, got -0.1"),
        ("temperature", float("nan"), "temperature must be a number >= 0, got nan"),
        ("top_k", -2, "top_k must be an integer >= 1, or 0 / -1 for off, got -2"),
        ("top_p", 0.0, r"top_p must be a number in \(0, 1\], got 0.0"),
        ("top_p", 1.5, r"top_p must be a number in \(0, 1\], got 1.5"),
        ("seed", "7", "seed must be an integer or None, got '7'"),
        ("stop", "", "stop must be a non-empty string or a list of them, got ''"),
        ("stop", ["ok", 3], r"stop must be a non-empty string or a list of them, got \['ok', 3\]"),
        ("stop_token_ids", [-1], r"stop_token_ids must be a list of integers >= 0, got \[-1\]"),
        ("ignore_eos", "yes", "ignore_eos must be True or False, got 'yes'"),
    ],
)
def test_invalid_values_raise_at_construction(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{message}"):
        SamplingParams(**{field: value})


def test_step_seeds_are_distinct_reproducible_and_splitmix64():
    request_seeds = np.repeat(np.arange(4, dtype=np.uint64), 64)
    steps = np.tile(np.arange(64, dtype=np.uint64), 4)
    seeds = step_seeds(request_seeds, steps)
    assert seeds.dtype == np.uint64 and len(set(seeds.tolist())) == 4 * 64
    assert np.array_equal(seeds, step_seeds(request_seeds, steps))
    mask = (1 << 64) - 1  # the same numbers from Python integers, written out
    for seed, step, got in zip(request_seeds.tolist(), steps.tolist(), seeds.tolist()):
        z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        assert got == z ^ (z >> 31)
