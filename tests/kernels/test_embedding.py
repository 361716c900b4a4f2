import numpy as np
import pytest

from infinilm_nb.kernels import embedding, reference
from tests.helpers import pick, poisoned, random
from tests.kernels.widths import placed, record_widths


# (tokens, vocab, hidden, vocab_start, shard rows): the full table, then a shard in the middle of the
# vocab; on the GPU Llama-3-8B's vocab split over 4 ranks, and more tokens than the grid's y axis
CASES = pick(
    sim=[(7, 50, 37, 0, 50), (9, 60, 70, 20, 15), (6, 40, 16, 8, 20)],
    gpu=[(7, 50, 37, 0, 50), (300, 128256, 4096, 64128, 32064), (70000, 1000, 64, 500, 250)],
)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])  # uint16: bfloat16
@pytest.mark.parametrize("tokens,vocab,hidden,vocab_start,rows", CASES)
def test_embedding_matches_reference(kb, rng, dtype, tokens, vocab, hidden, vocab_start, rows):
    weight = random(rng, (rows, hidden), dtype)
    ids = rng.integers(0, vocab, tokens).astype(np.int32)
    # ids just outside the shard on both sides, its first and last rows, and a negative id
    ids[:5] = [vocab_start - 1, vocab_start, vocab_start + rows - 1, vocab_start + rows, -1][: min(5, tokens)]
    out = poisoned(kb, (tokens, hidden), dtype)
    embedding.embedding(kb.asarray(ids), kb.asarray(weight), out, vocab_start)
    want = reference.embedding(ids, weight, np.empty((tokens, hidden), dtype), vocab_start)
    np.testing.assert_array_equal(kb.to_host(out), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])  # uint16: bfloat16
@pytest.mark.parametrize("aligned", [True, False])
def test_embedding_takes_the_16_byte_path_only_when_aligned(kb, rng, monkeypatch, dtype, aligned):
    widths = record_widths(monkeypatch, embedding)
    weight = random(rng, (20, 24), dtype)
    ids = np.array([3, 0, 19, 20, -1, 7], np.int32)
    out = poisoned(kb, (6, 24), dtype)
    embedding.embedding(kb.asarray(ids), placed(kb, weight, aligned), out)
    np.testing.assert_array_equal(kb.to_host(out), reference.embedding(ids, weight, np.empty((6, 24), dtype)))
    assert widths == [16 // np.dtype(dtype).itemsize if aligned else 1]


def test_embedding_rejects_bad_arguments(kb, rng):
    ids = kb.asarray(np.array([1, 2, 3], np.int32))
    weight = kb.asarray(random(rng, (10, 6)))
    out = kb.asarray(random(rng, (3, 6)))
    with pytest.raises(ValueError, match="embedding: ids must be int32, got int64"):
        embedding.embedding(kb.asarray(np.array([1, 2, 3])), weight, out)
    with pytest.raises(ValueError, match=r"embedding: out must have shape \(3, 6\), got \(3, 5\)"):
        embedding.embedding(ids, weight, kb.asarray(random(rng, (3, 5))))
    with pytest.raises(ValueError, match=r"embedding: out must have the dtype of weight \(float32\), got float16"):
        embedding.embedding(ids, weight, kb.asarray(random(rng, (3, 6), np.float16)))
    with pytest.raises(ValueError, match="embedding: weight must be C-contiguous"):
        embedding.embedding(ids, kb.asarray(random(rng, (6, 10))).T, out)
    with pytest.raises(ValueError, match="embedding: weight must be float16, float32 or bfloat16, got int32"):
        embedding.embedding(ids, kb.asarray(np.ones((10, 6), np.int32)), out)
    with pytest.raises(ValueError, match="embedding: vocab_start must be an integer, got float"):
        embedding.embedding(ids, weight, out, 2.0)
