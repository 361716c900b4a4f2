import numpy as np
import pytest

from infinilm_nb.kernels import reference
from tests.helpers import pick, poisoned, random, rel_err, tolerance


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("tokens,inter", pick(sim=[(3, 5), (1, 37)], gpu=[(3, 5), (77, 1000), (4096, 14336)]))
def test_silu_mul_matches_reference(kb, rng, dtype, tokens, inter):
    x = random(rng, (tokens, 2 * inter), dtype, scale=2.0)
    out = poisoned(kb, (tokens, inter), dtype)
    kb.ops.silu_mul(kb.asarray(x), out)
    want = reference.silu_mul(x, np.empty((tokens, inter), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)


def test_silu_mul_rejects_wrong_output_shape(kb, rng):
    x = kb.asarray(random(rng, (4, 6)))
    with pytest.raises(ValueError, match=r"silu_mul: out must have shape \(4, 3\), got \(4, 6\)"):
        kb.ops.silu_mul(x, kb.asarray(np.zeros((4, 6), np.float32)))


def test_silu_mul_rejects_mixed_dtypes(kb, rng):
    x = kb.asarray(random(rng, (4, 6)))
    with pytest.raises(ValueError, match="out must have the dtype of x \\(float32\\), got float16"):
        kb.ops.silu_mul(x, kb.asarray(np.zeros((4, 3), np.float16)))
