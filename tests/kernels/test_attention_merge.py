"""The merge of split-context partials (attention_merge) against the online-softmax rule in NumPy."""

import numpy as np
import pytest

from infinilm_nb.kernels import attention_merge, common
from tests.helpers import pick, poisoned, rel_err, tolerance

GRAIN = 64


@pytest.mark.parametrize("dim", pick(sim=[8, 64], gpu=[64, 128, 256]))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("early", [True, False])  # letting the next kernel launch early, or not
def test_merge_matches_the_online_softmax_rule(kb, rng, monkeypatch, dim, dtype, early):
    monkeypatch.setattr(common, "LAUNCH_NEXT_EARLY", early)
    # partition counts: one, a few, past the rows summed side by side and past the block's threads
    parts = np.array(pick(sim=[1, 3, 9, 70], gpu=[1, 3, 9, 43, 133, 300]), np.int32)
    tokens, heads, room = len(parts), 3, int(parts.max()) + 2
    # each token's range within room * GRAIN keys: partitions of GRAIN keys, `parts` of them holding keys
    context_lens = parts * GRAIN - rng.integers(0, GRAIN, tokens).astype(np.int32)
    query_start_loc = np.arange(tokens + 1, dtype=np.int32)  # one decode token per sequence
    maxima = rng.normal(0, 4, (tokens, heads, room)).astype(np.float32)
    sums = rng.uniform(0.5, 20, (tokens, heads, room)).astype(np.float32)
    stats = np.stack([maxima, sums])
    partials = rng.normal(0, 1, (tokens, heads, room, dim)).astype(np.float32)
    want = np.empty((tokens, heads, dim), np.float64)
    for t, count in enumerate(parts):
        m, s, o = maxima[t, :, :count], sums[t, :, :count], partials[t, :, :count]
        w = np.exp(m - m.max(axis=1, keepdims=True)).astype(np.float64)
        want[t] = (w[:, :, None] * o).sum(axis=1) / (w * s).sum(axis=1)[:, None]
    out = poisoned(kb, (tokens, heads, dim), dtype)
    attention_merge.merge_partitions(
        kb.asarray(context_lens), kb.asarray(query_start_loc), 1 << 30, GRAIN, kb.asarray(stats),
        kb.asarray(partials), out,
    )
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)
