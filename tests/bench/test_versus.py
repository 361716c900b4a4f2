"""bench/versus.py: the package at a commit runs beside the tree's as a package of its own."""

from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest

from bench import versus
from infinilm_nb.kernels import norm, reference
from tests.helpers import poisoned, random


def test_the_exported_package_runs_its_own_kernels(tmp_path, kb, rng, monkeypatch):
    package = versus.load(versus.export("HEAD", tmp_path))
    assert package.__name__ != "infinilm_nb"
    ops = versus.ops_of(package)
    assert ops.rms_norm.__module__ == f"{package.__name__}.kernels.norm"
    assert ops.paged_attention.__module__ == f"{package.__name__}.kernels.attention"

    x, weight = random(rng, (3, 40), np.float16), random(rng, 40, np.float16)
    got = []
    for rms_norm in (ops.rms_norm, kb.ops.rms_norm):
        out = poisoned(kb, x.shape, np.float16)
        got.append(kb.to_host(rms_norm(kb.asarray(x), kb.asarray(weight), 1e-5, out)))
    want = reference.rms_norm(x, weight, 1e-5, np.empty(x.shape, np.float32))
    assert np.array_equal(got[0], got[1])
    assert np.abs(got[0].astype(np.float32) - want).max() < 5e-3

    theirs = importlib.import_module(f"{package.__name__}.kernels.norm")
    assert theirs is not norm
    monkeypatch.setattr(theirs, "ITEMS", norm.ITEMS + 1)  # a constant set in one package stays in it
    assert norm.ITEMS != theirs.ITEMS


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not the infinilm_nb package"):
        versus.load(tmp_path)


@pytest.mark.parametrize("names", [("a", "a"), ("tree",)])
def test_against_directories_need_names_of_their_own(tmp_path, capsys, names):
    with pytest.raises(SystemExit):
        versus.main(["--against", *(str(tmp_path / name) for name in names)])
    assert "names of their own" in capsys.readouterr().err


@pytest.mark.gpu
def test_versus_times_every_package_on_every_elementwise_case(tmp_path):
    import json

    from infinilm_nb.kernels import common

    pdl = common.PDL
    directory = versus.export("HEAD", tmp_path / "export")
    twin = shutil.copytree(directory, tmp_path / "twin")  # a second package, as a variant would be
    assert versus.main(["--against", str(directory), str(twin), "--only", "elementwise", "--rounds", "1",
                        "--out", str(tmp_path)]) == 0
    assert common.PDL == pdl  # switched off for the timing only
    result = json.loads((tmp_path / "versus.json").read_text())
    assert result["against"] == [directory.name, "twin"]
    assert [row["case"].split()[0] for row in result["rows"]] == [
        "rms_norm", "add_rms_norm", "rope", "silu_mul", "store_kv", "embedding"]
    for row in result["rows"]:
        assert set(row["us"]) == {directory.name, "twin", "tree"} and all(t > 0 for t in row["us"].values()), row
