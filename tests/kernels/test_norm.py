import numpy as np
import pytest

from infinilm_nb.kernels import norm, reference
from tests.helpers import pick, poisoned, random, rel_err, tolerance
from tests.kernels.widths import placed, record_widths

EPS = 1e-5
# (tokens, hidden): rows of 37 take the element path, 64 the 16-byte path, 300 the 16-byte path in
# float32 only; the GPU list adds Llama-3-8B (4096), SmolLM2 (576), 8192 and a row wider than the
# registers hold (40000), which re-reads memory on the second pass
SHAPES = pick(sim=[(3, 37), (2, 64), (2, 300)], gpu=[(3, 37), (77, 576), (33, 4096), (5, 8192), (3, 40000)])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])  # uint16: bfloat16
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_rms_norm_matches_reference(kb, rng, dtype, tokens, hidden):
    x = random(rng, (tokens, hidden), dtype, scale=3.0)
    weight = random(rng, hidden, dtype)
    out = poisoned(kb, (tokens, hidden), dtype)
    norm.rms_norm(kb.asarray(x), kb.asarray(weight), EPS, out)
    want = reference.rms_norm(x, weight, EPS, np.empty((tokens, hidden), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)


def test_rms_norm_in_place_with_float32_weight(kb, rng):
    x = random(rng, (4, 45), np.float16, scale=0.5)
    weight = random(rng, 45, np.float32)
    xd = kb.asarray(x.copy())  # the simulator's asarray would hand back x itself
    assert norm.rms_norm(xd, kb.asarray(weight), EPS, xd) is xd
    want = reference.rms_norm(x, weight, EPS, np.empty(x.shape, np.float32))
    assert rel_err(kb.to_host(xd), want) < tolerance(np.float16)


@pytest.mark.parametrize("early_weights", [True, False])
@pytest.mark.parametrize("dtype,hidden", [(np.float32, 301), (np.float32, 1040), (np.float16, 1040), (np.uint16, 1040)])
def test_norms_on_rows_wider_than_registers(kb, rng, monkeypatch, dtype, hidden, early_weights):
    # caps the block so that a small row overflows ITEMS chunks per thread and takes the re-read
    # path: element by element at 301, in 16-byte chunks at 1040; the weights loaded before the
    # reduction (few rows) or as the row is written (many)
    monkeypatch.setattr(norm, "MAX_THREADS", 32)
    monkeypatch.setattr(norm, "EARLY_WEIGHTS_MAX_ROWS", 2 if early_weights else 1)
    built = []
    kernel = norm._norm_kernel
    monkeypatch.setattr(norm, "_norm_kernel", lambda *args: built.append(args[-1]) or kernel(*args))
    x = random(rng, (2, hidden), dtype)
    residual = random(rng, (2, hidden), dtype)
    weight = random(rng, hidden, dtype)
    out = poisoned(kb, x.shape, dtype)
    norm.rms_norm(kb.asarray(x), kb.asarray(weight), EPS, out)
    want = reference.rms_norm(x, weight, EPS, np.empty(x.shape, np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)
    residual_d = kb.asarray(residual.copy())
    norm.add_rms_norm(kb.asarray(x), residual_d, kb.asarray(weight), EPS, out)
    want = reference.add_rms_norm(x, residual, weight, EPS, np.empty(x.shape, np.float32))
    assert rel_err(kb.to_host(residual_d), residual) < tolerance(dtype)
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)
    assert built == [early_weights] * 2


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("aligned", [True, False])
def test_norms_take_the_16_byte_path_only_when_aligned(kb, rng, monkeypatch, dtype, aligned):
    widths = record_widths(monkeypatch, norm)
    x = random(rng, (3, 64), dtype)
    residual = random(rng, (3, 64), dtype)
    weight = random(rng, 64, np.float32)  # float32 weight beside float16 x: 4-wide weight loads
    out = poisoned(kb, x.shape, dtype)
    norm.rms_norm(placed(kb, x, aligned), kb.asarray(weight), EPS, out)
    want = reference.rms_norm(x, weight, EPS, np.empty(x.shape, np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)
    residual_d = placed(kb, residual, True)
    norm.add_rms_norm(placed(kb, x, aligned), residual_d, kb.asarray(weight), EPS, out)
    want = reference.add_rms_norm(x, residual, weight, EPS, np.empty(x.shape, np.float32))
    assert rel_err(kb.to_host(residual_d), residual) < tolerance(dtype)
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)
    vec = 16 // np.dtype(dtype).itemsize
    assert widths == ([vec, 4] * 2 if aligned else [1, 1] * 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_add_rms_norm_matches_reference(kb, rng, dtype, tokens, hidden):
    x = random(rng, (tokens, hidden), dtype)
    residual = random(rng, (tokens, hidden), dtype, scale=2.0)
    weight = random(rng, hidden, dtype)
    residual_d = kb.asarray(residual.copy())
    out = poisoned(kb, (tokens, hidden), dtype)
    norm.add_rms_norm(kb.asarray(x), residual_d, kb.asarray(weight), EPS, out)
    want_residual = residual.copy()
    want = reference.add_rms_norm(x, want_residual, weight, EPS, np.empty((tokens, hidden), np.float32))
    assert rel_err(kb.to_host(residual_d), want_residual) < tolerance(dtype)
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)


@pytest.mark.parametrize("monkeypatched_threads", [None, 32])
def test_add_rms_norm_out_is_x(kb, rng, monkeypatch, monkeypatched_threads):
    if monkeypatched_threads:
        monkeypatch.setattr(norm, "MAX_THREADS", monkeypatched_threads)
    x = random(rng, (3, 301), np.float16)
    residual = random(rng, (3, 301), np.float16)
    weight = random(rng, 301, np.float16)
    xd, residual_d = kb.asarray(x.copy()), kb.asarray(residual.copy())
    norm.add_rms_norm(xd, residual_d, kb.asarray(weight), EPS, xd)
    want_residual = residual.copy()
    want = reference.add_rms_norm(x, want_residual, weight, EPS, np.empty(x.shape, np.float32))
    assert rel_err(kb.to_host(residual_d), want_residual) < tolerance(np.float16)
    assert rel_err(kb.to_host(xd), want) < tolerance(np.float16)


def test_norms_reject_bad_arguments(kb, rng):
    x = kb.asarray(random(rng, (4, 6)))
    weight = kb.asarray(random(rng, 6))
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \(6,\), got \(5,\)"):
        norm.rms_norm(x, kb.asarray(random(rng, 5)), EPS, x)
    with pytest.raises(ValueError, match=r"rms_norm: out must have shape \(4, 6\), got \(6, 4\)"):
        norm.rms_norm(x, weight, EPS, kb.asarray(random(rng, (6, 4))))
    with pytest.raises(ValueError, match=r"rms_norm: out must have the dtype of x \(float32\), got float16"):
        norm.rms_norm(x, weight, EPS, kb.asarray(random(rng, (4, 6), np.float16)))
    with pytest.raises(ValueError, match="rms_norm: x must be float16, float32 or bfloat16, got int32"):
        norm.rms_norm(kb.asarray(np.ones((4, 6), np.int32)), weight, EPS, x)
    with pytest.raises(ValueError, match="rms_norm: x must be C-contiguous"):
        norm.rms_norm(kb.asarray(random(rng, (4, 12)))[:, ::2], weight, EPS, x)
    with pytest.raises(ValueError, match=r"add_rms_norm: residual must have shape \(4, 6\), got \(4, 7\)"):
        norm.add_rms_norm(x, kb.asarray(random(rng, (4, 7))), weight, EPS, x)
    with pytest.raises(ValueError, match=r"add_rms_norm: residual must have the dtype of x \(float32\), got float16"):
        norm.add_rms_norm(x, kb.asarray(random(rng, (4, 6), np.float16)), weight, EPS, x)
    with pytest.raises(ValueError, match="add_rms_norm: residual must be C-contiguous"):
        norm.add_rms_norm(x, kb.asarray(random(rng, (6, 4))).T, weight, EPS, x)


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("tokens", [1, norm.LAUNCH_NEXT_MAX_ROWS + 1])
def test_decode_norms_let_the_next_kernel_launch_early_and_compute_the_same(kb, rng, monkeypatch, early, tokens):
    from infinilm_nb.kernels import common

    monkeypatch.setattr(common, "LAUNCH_NEXT_EARLY", early)
    built = []
    kernel = norm._norm_kernel
    monkeypatch.setattr(norm, "_norm_kernel", lambda *args: built.append(args[5]) or kernel(*args))
    x, residual = random(rng, (tokens, 64), np.float16), random(rng, (tokens, 64), np.float16)
    weight = random(rng, 64, np.float16)
    out, residual_d = poisoned(kb, (tokens, 64), np.float16), kb.asarray(residual.copy())
    norm.add_rms_norm(kb.asarray(x), residual_d, kb.asarray(weight), EPS, out)
    assert built == [early and tokens <= norm.LAUNCH_NEXT_MAX_ROWS]
    want_residual = residual.copy()
    want = reference.add_rms_norm(x, want_residual, weight, EPS, np.empty((tokens, 64), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(np.float16)
    assert rel_err(kb.to_host(residual_d), want_residual) < tolerance(np.float16)
