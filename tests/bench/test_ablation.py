"""bench/ablation.py: the unfused op table computes what the fused ops do, and is undone afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from bench.ablation import FUSIONS, UnfusedOps, undone
from infinilm_nb.backend import get_backend
from infinilm_nb.kernels import reference
from infinilm_nb.runtime.cache import PagedKVCache
from infinilm_nb.runtime.llama import load_model
from tests.helpers import rel_err
from tests.runtime.hf_models import save_tiny_model
from tests.runtime.steps import CachedSeq, run_step


def test_each_unfused_op_equals_the_fused_one(rng):
    ops = UnfusedOps(get_backend("cpu").ops, np, FUSIONS)
    x, weight = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((10, 8)).astype(np.float32)
    want = reference.linear_silu_mul(x, weight, np.empty((3, 5), np.float32))
    assert rel_err(ops.linear_silu_mul(x, weight, np.empty((3, 5), np.float32)), want) < 1e-6

    residual = rng.standard_normal((3, 10)).astype(np.float32)
    want = reference.linear(x, weight, np.empty((3, 10), np.float32), residual=residual)
    assert rel_err(ops.linear(x, weight, residual.copy(), residual=residual.copy()), want) < 1e-6

    cos_sin = reference.rope_cache(4, 16, 10000.0)
    x, weight = x[:2], rng.standard_normal((4 * 4, 8)).astype(np.float32)  # 2 q heads, 1 KV head, D = 4
    positions, slots = np.array([3, 9], np.int32), np.array([5, 0], np.int32)
    caches = {name: [np.zeros((2, 4, 1, 4), np.float32) for _ in range(2)] for name in ("fused", "unfused")}
    outs = {}
    for name, target in (("fused", reference), ("unfused", ops)):
        outs[name] = target.linear_rope_store_kv(
            x, weight, np.empty((2, 16), np.float32), positions, cos_sin, *caches[name], slots, 2, 1
        )
    assert rel_err(outs["unfused"], outs["fused"]) < 1e-6
    for got, want in zip(caches["unfused"], caches["fused"]):
        assert rel_err(got, want) < 1e-6


def test_unknown_fusion_is_an_error():
    with pytest.raises(ValueError, match=r"unknown fusion\(s\) \['norm'\]: choose from silu, residual, rope"):
        UnfusedOps(get_backend("cpu").ops, np, ("norm",))


def test_a_model_built_with_fusions_undone_gives_the_same_logits(tmp_path):
    backend = get_backend("cpu")
    directory = save_tiny_model(tmp_path, "llama")
    tokens = [5, 17, 3, 99, 42]

    def logits() -> np.ndarray:
        model = load_model(directory, backend, progress=False)
        seq = CachedSeq(PagedKVCache(backend, model.config, num_blocks=4, block_size=16, dtype=np.float32))
        return run_step(model, [(seq, tokens)])

    fused = backend.ops
    want = logits()
    with undone(backend, FUSIONS):
        assert isinstance(backend.ops, UnfusedOps)
        got = logits()
    assert backend.ops is fused
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_is_switched_within_the_block_only(monkeypatch, pdl):
    from bench.ablation import pdl_switched
    from infinilm_nb.kernels import common

    monkeypatch.setattr(common, "PDL", pdl)
    with pdl_switched() as switched:
        assert common.PDL is not pdl and switched == ("pdl on" if not pdl else "pdl off")
    assert common.PDL is pdl


@pytest.mark.parametrize("switch,module,flag,label,on,off", [
    ("late_launches", "common", "LAUNCH_NEXT_EARLY", "early launch off", True, False),
    ("norms_apart", "gemm", "NORM_IN_GEMM", "norm in gemm off", True, False),
    ("merges_apart", "attention", "MERGE_IN_PARTITION", "merge in partition off", True, False),
    ("rope_apart", "gemm", "ROPE_IN_GEMM", "rope in gemm off", True, False),
    ("sampler_in_one_block", "sampling", "MAX_PARTS", "sampler split off", 16, 1),
])
def test_each_switch_is_off_within_the_block_only(switch, module, flag, label, on, off):
    import importlib

    from bench import ablation

    owner = importlib.import_module(f"infinilm_nb.kernels.{module}")
    def value():  # with its type: True == 1, but a flag is not a count
        return type(getattr(owner, flag)), getattr(owner, flag)

    assert value() == (type(on), on)
    with getattr(ablation, switch)() as switched:
        assert switched == label and value() == (type(off), off)
    assert value() == (type(on), on)
