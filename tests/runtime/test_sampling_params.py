"""SamplingParams: defaults, normalisation and a ValueError naming each bad field and value."""

from __future__ import annotations

import pytest

from infinilm_nb import SamplingParams
from infinilm_nb.runtime.engine import step_seed


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


def test_step_seeds_are_distinct_and_reproducible():
    seeds = {step_seed(seed, step) for seed in range(4) for step in range(64)}
    assert len(seeds) == 4 * 64
    assert all(0 <= s < 2**64 for s in seeds)
    assert step_seed(123, 5) == step_seed(123, 5)
