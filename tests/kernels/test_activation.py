import numpy as np
import pytest

from infinilm_nb.kernels import activation, reference
from tests.helpers import pick, poisoned, random, rel_err, tolerance
from tests.kernels.widths import placed, record_widths

# inter 5 and 37 take the element path, 24 and up the 16-byte path
SHAPES = pick(sim=[(3, 5), (1, 37), (3, 24)], gpu=[(3, 5), (77, 1000), (4096, 14336)])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])  # uint16: bfloat16
@pytest.mark.parametrize("tokens,inter", SHAPES)
def test_silu_mul_matches_reference(kb, rng, dtype, tokens, inter):
    x = random(rng, (tokens, 2 * inter), dtype, scale=2.0)
    out = poisoned(kb, (tokens, inter), dtype)
    kb.ops.silu_mul(kb.asarray(x), out)
    want = reference.silu_mul(x, np.empty((tokens, inter), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("aligned", [True, False])
def test_silu_mul_takes_the_16_byte_path_only_when_aligned(kb, rng, monkeypatch, dtype, aligned):
    widths = record_widths(monkeypatch, activation)
    x = random(rng, (3, 48), dtype, scale=2.0)
    out = poisoned(kb, (3, 24), dtype)
    kb.ops.silu_mul(placed(kb, x, aligned), out)
    assert rel_err(kb.to_host(out), reference.silu_mul(x, np.empty((3, 24), np.float32))) < tolerance(dtype)
    assert widths == [16 // np.dtype(dtype).itemsize if aligned else 1]


def test_silu_mul_rejects_wrong_output_shape(kb, rng):
    x = kb.asarray(random(rng, (4, 6)))
    with pytest.raises(ValueError, match=r"silu_mul: out must have shape \(4, 3\), got \(4, 6\)"):
        kb.ops.silu_mul(x, kb.asarray(np.zeros((4, 6), np.float32)))


def test_silu_mul_rejects_mixed_dtypes(kb, rng):
    x = kb.asarray(random(rng, (4, 6)))
    with pytest.raises(ValueError, match="out must have the dtype of x \\(float32\\), got float16"):
        kb.ops.silu_mul(x, kb.asarray(np.zeros((4, 3), np.float16)))


def test_silu_mul_names_bfloat16_in_a_dtype_mismatch(kb, rng):
    x = kb.asarray(random(rng, (4, 6), np.uint16))
    with pytest.raises(ValueError, match=r"out must have the dtype of x \(bfloat16\), got float16"):
        kb.ops.silu_mul(x, kb.asarray(np.zeros((4, 3), np.float16)))
