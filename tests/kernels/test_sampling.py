"""The sampler: the kernel draws exactly reference.sample's tokens, and what both draw has the
statistics of greedy / temperature / top-k / top-p sampling."""

import numpy as np
import pytest

from infinilm_nb.kernels import reference
from tests.conftest import ON_GPU
from tests.helpers import pick, poisoned, random

# the simulator runs the kernel's uint64 splitmix64 on NumPy scalars, which warn when they wrap
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in scalar:RuntimeWarning")

# (temperature, top_k, top_p) per kind of row; top_k 1 << 30 is "at least the vocabulary"
KINDS = {
    "greedy": (0.0, 0, 1.0),
    "greedy ignores filters": (0.0, 3, 0.5),
    "temperature": (0.8, 0, 1.0),
    "top-k": (1.0, 7, 1.0),
    "top-p": (1.3, 0, 0.8),
    "top-k and top-p": (0.7, 20, 0.9),
    "top-k 1": (1.0, 1, 1.0),
    "top-p 0": (1.0, 0, 0.0),
    "top-p 0.999, cold": (0.3, 0, 0.999),  # the last top-p that starts its search above the light tokens
    "top-p 0.9999": (1.0, 0, 0.9999),  # the whole row is searched
    "top-k past vocab": (1.0, 1 << 30, 1.0),
}


def settings(kinds, rng):
    """temperatures, top_ks, top_ps and distinct random seeds for rows of the given kinds."""
    rows = [KINDS[k] for k in kinds]
    return (
        np.array([r[0] for r in rows], np.float32),
        np.array([r[1] for r in rows], np.int32),
        np.array([r[2] for r in rows], np.float32),
        rng.integers(0, 2**64, len(kinds), dtype=np.uint64),
    )


def kernel_sample(kb, logits, temperatures, top_ks, top_ps, seeds):
    out = poisoned(kb, (logits.shape[0],), np.int32)
    args = [kb.asarray(a) for a in (logits, temperatures, top_ks, top_ps, seeds)]
    kb.ops.sample(*args, out)
    return kb.to_host(out)


def reference_sample(logits, temperatures, top_ks, top_ps, seeds):
    return reference.sample(logits, temperatures, top_ks, top_ps, seeds, np.empty(len(logits), np.int32))


def draw(impl, kb, logits_row, temperature, top_k, top_p, seeds):
    """One token per seed from one row, by the kernel or by the reference."""
    rows = len(seeds)
    logits = np.repeat(logits_row[None], rows, axis=0)
    args = (logits, np.full(rows, temperature, np.float32), np.full(rows, top_k, np.int32),
            np.full(rows, top_p, np.float32), seeds)
    return kernel_sample(kb, *args) if impl == "kernel" else reference_sample(*args)


def tied_logits(rng, rows, vocab):
    """Logits on a coarse grid (many ties at any cut-off), with a few -inf (masked) tokens."""
    logits = np.round(rng.standard_normal((rows, vocab)) * 2) / 2
    logits[:, rng.choice(vocab, 3, replace=False)] = -np.inf
    return logits.astype(np.float32)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize(
    "dtype,kinds",
    [
        (np.float32, list(KINDS)),
        (np.float16, ["greedy", "temperature", "top-k and top-p"]),
        (np.uint16, ["greedy", "temperature", "top-k and top-p"]),  # bfloat16 logits
    ],
)
@pytest.mark.parametrize("vocab", pick(sim=[157, 160], gpu=[1000, 1001, 128256]))  # 16-byte loads but at 157, 1001
def test_sample_matches_reference(kb, rng, dtype, kinds, vocab):
    logits = random(rng, (len(kinds), vocab), dtype, scale=3.0)
    args = (logits, *settings(kinds, rng))
    got = kernel_sample(kb, *args)
    want = reference_sample(*args)
    assert got.tolist() == want.tolist(), [k for k, g, w in zip(kinds, got, want) if g != w]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
# several blocks' rounds of loads, the last block's partly past the row; on a Hopper the top-k / top-p
# rows are searched by clusters of 8 blocks (16 a row), 3 (9 a row) and 8 (16 a row, single-element loads)
@pytest.mark.parametrize("vocab", pick(sim=[1500], gpu=[128256, 17 * 8192, 128255]))
def test_rows_split_over_blocks_match_reference_and_leave_the_workspace_clean(kb, rng, dtype, vocab):
    from infinilm_nb.kernels import sampling

    kinds = ["greedy", "temperature", "top-k and top-p", "greedy", "top-p", "top-k", "top-p 0.9999"]
    logits = random(rng, (len(kinds), vocab), dtype, scale=3.0)
    logits[0, -5] = logits[0].max() + 1  # the winner in the last block
    logits[3, :] = 0  # a tie over the whole row: the lowest index wins
    for _ in range(2):  # the workspace is ready for the next launch
        args = (logits, *settings(kinds, rng))
        assert kernel_sample(kb, *args).tolist() == reference_sample(*args).tolist()
        best, finished = sampling.workspace(kb.asarray(logits))
        assert (kb.to_host(best) == sampling.NO_BEST).all() and not kb.to_host(finished).any()


@pytest.mark.parametrize("clusters", [False, True])
def test_a_128k_row_is_split_over_16_blocks_and_searched_by_a_cluster_of_8(kb, monkeypatch, clusters):
    from infinilm_nb.kernels import sampling

    launches = []
    monkeypatch.setattr(sampling, "launch",
                        lambda kernel, grid, *rest, cluster=None: launches.append((grid, cluster)))
    monkeypatch.setattr(sampling, "THREADS", 512)
    monkeypatch.setattr(sampling, "compiled", lambda *args, **options: None)
    monkeypatch.setattr(sampling, "clusters_launch", lambda: clusters)
    monkeypatch.setattr(sampling, "active_clusters", lambda kernel, threads, cluster: 3)  # every row's fits
    for vocab in (128256, 8192, 17 * 8192, 7 * 8192, 11 * 8192):
        args = [np.zeros((3, vocab), np.float16), np.zeros(3, np.float32), np.zeros(3, np.int32),
                np.ones(3, np.float32), np.zeros(3, np.uint64), np.zeros(3, np.int32)]
        sampling.sample(*[kb.asarray(a) for a in args])
    # 17 rounds: 2 each, the last block 1; a cluster of the most blocks, up to 8, that divide a row's
    grids = [(3, 16), (3, 1), (3, 9), (3, 7), (3, 11)]
    want = [(1, 8), None, (1, 3), (1, 7), None] if clusters else [None] * 5
    assert launches == list(zip(grids, want))


def test_a_searched_row_takes_the_largest_cluster_whose_wave_holds_every_row(monkeypatch):
    from infinilm_nb.kernels import sampling

    monkeypatch.setattr(sampling, "clusters_launch", lambda: True)
    active = {2: 66, 4: 28, 8: 14}.get  # clusters a GPU of 132 SMs runs at once, one block an SM
    assert [sampling.cluster_size(16, rows, active) for rows in (1, 14, 15, 28, 29, 66, 67)] == [8, 8, 4, 4, 2, 2, 1]
    assert sampling.cluster_size(9, 1, lambda blocks: 100) == 3  # the most that divide the row's blocks
    monkeypatch.setattr(sampling, "clusters_launch", lambda: False)
    assert sampling.cluster_size(16, 1, active) == 1


def edge_seeds(rng, logits, temperature, top_k, top_p):
    """Two seeds that put the draw at the edge of the mask: with the first, the most likely tokens left
    out beat every kept one; with the second, the least likely kept tokens win. A mask one value too
    wide, or too narrow, then draws another token."""
    keep = reference.sampling_mask(logits, temperature, top_k, top_p)
    x = logits.astype(np.float32)
    outside = ~keep & (x == x[~keep].max())
    inside = keep & (x == x[keep].min())
    found = [None, None]
    for _ in range(100_000):
        seed = rng.integers(0, 2**64, dtype=np.uint64)
        scores = x / np.float32(temperature) + reference.gumbel_noise(seed, len(x))
        if found[0] is None and scores[outside].max() > scores[keep].max():
            found[0] = seed
        if found[1] is None and inside[np.argmax(np.where(keep, scores, -np.inf))]:
            found[1] = seed
        if found[0] is not None and found[1] is not None:
            return found
    raise AssertionError("no seed puts the draw at the mask's edge")


@pytest.mark.parametrize("vocab", pick(sim=[60], gpu=[1000, 5000]))
def test_sample_matches_reference_at_the_mask_edges(kb, rng, vocab):
    settings_per_row = [(2.0, 7, 1.0), (2.0, 0, 0.6), (1.5, 12, 0.7), (0.5, 0, 0.95), (2.0, 5, 1.0)]
    logits = tied_logits(rng, len(settings_per_row), vocab)
    logits[-1] = rng.standard_normal(vocab)  # top-k without ties: exactly k tokens
    rows, temperatures, top_ks, top_ps, seeds = [], [], [], [], []
    for row, (temperature, top_k, top_p) in zip(logits, settings_per_row):
        for seed in edge_seeds(rng, row, temperature, top_k, top_p):
            rows.append(row)
            temperatures.append(temperature)
            top_ks.append(top_k)
            top_ps.append(top_p)
            seeds.append(seed)
    args = (np.array(rows), np.array(temperatures, np.float32), np.array(top_ks, np.int32),
            np.array(top_ps, np.float32), np.array(seeds, np.uint64))
    assert kernel_sample(kb, *args).tolist() == reference_sample(*args).tolist()


def test_greedy_takes_the_lowest_index_among_equal_maxima(kb):
    logits = np.array([[0.5, 3.0, -1.0, 3.0, 3.0], [-0.0, 0.0, -2.0, -1.0, -3.0]], np.float32)
    args = (logits, np.zeros(2, np.float32), np.zeros(2, np.int32), np.ones(2, np.float32),
            np.arange(2, dtype=np.uint64))
    assert reference_sample(*args).tolist() == [1, 0]
    assert kernel_sample(kb, *args).tolist() == [1, 0]


def seeds_for(impl, rng, sim):
    """Seeds for a statistical test: many on the reference or a GPU, ``sim`` in the simulator."""
    count = 4000 if impl == "reference" else pick(sim=sim, gpu=4000)
    return rng.integers(0, 2**64, count, dtype=np.uint64)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_top_k_never_leaves_the_top_k(kb, rng, impl):
    logits = tied_logits(rng, 1, 30)[0]
    k = 5
    seeds = seeds_for(impl, rng, sim=3)
    tokens = draw(impl, kb, logits, 2.0, k, 1.0, seeds)
    kth = np.sort(logits)[::-1][k - 1]
    assert np.all(logits[tokens] >= kth)
    if impl == "reference" or ON_GPU:  # every token of the top-k set, ties at the k-th value included
        assert set(tokens.tolist()) == set(np.flatnonzero(logits >= kth).tolist())


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(kb, rng, impl):
    logits = (rng.standard_normal(24) * 1.5).astype(np.float32)
    temperature, top_p = 0.9, 0.7
    probs = softmax(logits.astype(np.float64) / temperature)
    order = np.argsort(-probs)
    size = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1  # smallest prefix reaching top_p
    nucleus = set(order[:size].tolist())
    seeds = seeds_for(impl, rng, sim=3)
    tokens = set(draw(impl, kb, logits, temperature, 0, top_p, seeds).tolist())
    assert tokens <= nucleus
    if impl == "reference" or ON_GPU:
        assert tokens == nucleus


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_a_seed_reproduces_its_tokens_and_other_seeds_differ(kb, rng, impl):
    logits = (rng.standard_normal(20) * 0.5).astype(np.float32)  # flat: many tokens are likely
    seeds = rng.integers(0, 2**64, 8, dtype=np.uint64)
    first = draw(impl, kb, logits, 1.0, 0, 1.0, seeds)
    again = draw(impl, kb, logits, 1.0, 0, 1.0, seeds)
    assert first.tolist() == again.tolist()
    assert len(set(first.tolist())) > 1


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_temperature_zero_is_argmax(kb, rng, impl):
    logits = (rng.standard_normal(40) * 3).astype(np.float32)
    seeds = rng.integers(0, 2**64, 3, dtype=np.uint64)
    assert draw(impl, kb, logits, 0.0, 5, 0.5, seeds).tolist() == [int(np.argmax(logits))] * 3


def assert_frequencies(tokens, probs):
    """Each token's count is within 5 binomial standard deviations of ``len(tokens) * p``."""
    draws = len(tokens)
    counts = np.bincount(tokens, minlength=len(probs))
    sigma = np.sqrt(draws * probs * (1 - probs)) + 1e-9
    assert np.all(np.abs(counts - draws * probs) <= 5 * sigma + 1), (counts.tolist(), (draws * probs).tolist())


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_frequencies_follow_the_tempered_softmax(kb, rng, impl):
    logits = np.array([1.0, 0.2, -0.5, 1.6, 0.0, 0.9], np.float32)
    temperature = 1.4
    seeds = seeds_for(impl, rng, sim=64)
    tokens = draw(impl, kb, logits, temperature, 0, 1.0, seeds)
    assert_frequencies(tokens, softmax(logits.astype(np.float64) / temperature))


@pytest.mark.parametrize("impl", ["reference", pytest.param("kernel", marks=pytest.mark.gpu)])
def test_frequencies_follow_the_renormalised_top_k_top_p_softmax(kb, rng, impl):
    logits = np.array([0.3, 2.0, -1.0, 1.1, 0.6, -0.2, 1.5, 0.0], np.float32)
    temperature, top_k, top_p = 0.8, 5, 0.8
    probs = softmax(logits.astype(np.float64) / temperature)
    probs[np.argsort(-logits)[top_k:]] = 0  # top-5 (no ties here)
    probs /= probs.sum()
    order = np.argsort(-probs)
    size = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    probs[order[size:]] = 0
    probs /= probs.sum()
    seeds = seeds_for(impl, rng, sim=0)
    tokens = draw(impl, kb, logits, temperature, top_k, top_p, seeds)
    assert_frequencies(tokens, probs)


@pytest.mark.skipif(ON_GPU, reason="device functions are callable from Python only in the simulator")
def test_kernel_noise_equals_reference_gumbel_noise():
    from infinilm_nb.kernels import sampling

    for seed in (np.uint64(0), np.uint64(2**64 - 1), np.uint64(0x0123456789ABCDEF)):
        want = reference.gumbel_noise(seed, 50)
        got = np.array([sampling._gumbel(seed, i) for i in range(50)], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # float32 logs may differ by an ulp


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
def test_sampler_fits_a_full_block_without_spilling(kb, rng, dtype):
    from infinilm_nb.kernels import common, sampling

    logits = random(rng, (2, 1000), dtype)
    kernel_sample(kb, logits, *settings(["greedy", "top-k and top-p"], rng))  # compiles it
    sampler = sampling._sampler(8 if dtype != np.float32 else 4, dtype == np.uint16)  # 1000: 16-byte loads
    kernel = common._compiled[(sampler, sampling.kernel_signature(np.dtype(dtype).name))]
    assert kernel.get_local_mem_per_thread() == 0
    assert kernel.get_regs_per_thread() * sampling.THREADS <= 65536  # a launch of THREADS threads fits an SM


def _good_args(kb, rows=2, vocab=9):
    host = (np.ones((rows, vocab), np.float32), np.ones(rows, np.float32), np.zeros(rows, np.int32),
            np.ones(rows, np.float32), np.arange(rows, dtype=np.uint64), np.zeros(rows, np.int32))
    return [kb.asarray(a) for a in host]


@pytest.mark.parametrize(
    "index,bad,message",
    [
        (0, np.ones((2, 9), np.float64), r"sample: logits must be float16, float32 or bfloat16, got float64"),
        (0, np.ones(9, np.float32), r"sample: logits must have shape \(\*, \*\), got \(9,\)"),
        (1, np.ones(3, np.float32), r"sample: temperatures must have shape \(2,\), got \(3,\)"),
        (1, np.ones(2, np.float64), r"sample: temperatures must be float32, got float64"),
        (2, np.ones(2, np.int64), r"sample: top_ks must be int32, got int64"),
        (3, np.ones(2, np.float16), r"sample: top_ps must be float32, got float16"),
        (4, np.arange(2, dtype=np.int64), r"sample: seeds must be uint64, got int64"),
        (5, np.zeros(2, np.int64), r"sample: out must be int32, got int64"),
        (5, np.zeros(1, np.int32), r"sample: out must have shape \(2,\), got \(1,\)"),
    ],
)
def test_sample_rejects_bad_arguments(kb, index, bad, message):
    args = _good_args(kb)
    args[index] = kb.asarray(bad)
    with pytest.raises(ValueError, match=message):
        kb.ops.sample(*args)


def test_sample_rejects_strided_logits(kb):
    args = _good_args(kb, vocab=18)
    args[0] = args[0][:, ::2]
    with pytest.raises(ValueError, match=r"sample: logits must be C-contiguous"):
        kb.ops.sample(*args)
