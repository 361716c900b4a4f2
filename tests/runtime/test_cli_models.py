"""Where the command line's model comes from: convert, fetch, a GGUF --model, no --model, and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import infinilm_nb.convert
from infinilm_nb import models
from infinilm_nb.cli import main
from infinilm_nb.demo import QUESTION, default_ranks
from infinilm_nb.models import SMOLLM2_DIR, SMOLLM2_GGUF
from tests.runtime.test_cli import REPO, greedy_text

gguf = pytest.importorskip("gguf")
from tests.convert.tiny_gguf import write_tiny_gguf  # noqa: E402  (needs gguf)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache (INFINILM_NB_HOME) for the test."""
    monkeypatch.setenv("INFINILM_NB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def embedded_is(monkeypatch: pytest.MonkeyPatch):
    """Make ``fetch_smollm2`` (the default model) return a given directory, with no download."""
    return lambda directory: monkeypatch.setattr(models, "fetch_smollm2", lambda progress=True: directory)


def test_convert_and_fetch_subcommands(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["convert", str(source), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'out'}\n"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    (home / "gguf").mkdir(parents=True)
    write_tiny_gguf(home / "gguf" / SMOLLM2_GGUF)
    assert main(["fetch", "smollm2"]) == 0
    assert capsys.readouterr().out == f"{home / 'models' / SMOLLM2_DIR}\n"


def test_generate_converts_a_gguf_model_once(home: Path, tmp_path: Path, capsys, monkeypatch):
    source = write_tiny_gguf(tmp_path / "tiny.gguf")
    args = ["generate", "--model", str(source), "--prompt", "hello world", "--max-tokens", "5", "--backend", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    (converted,) = (home / "models").iterdir()
    assert converted.name.startswith("tiny-") and first == greedy_text(converted, "hello world", 5) + "\n"
    monkeypatch.setattr(infinilm_nb.convert, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_without_a_model_runs_the_embedded_one(llama_dir: Path, embedded_is, capsys):
    embedded_is(llama_dir)
    assert main(["generate", "--prompt", "Hello", "--max-tokens", "4", "--backend", "cpu"]) == 0
    assert capsys.readouterr().out == greedy_text(llama_dir, "Hello", 4) + "\n"


@pytest.mark.mpi
def test_demo_asks_its_question_under_mpiexec(llama_dir: Path, embedded_is, capfd, monkeypatch):
    embedded_is(llama_dir)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    assert default_ranks("cpu", llama_dir) == 1
    assert main(["demo", "--ranks", "2", "--backend", "cpu", "--max-tokens", "6"]) == 0
    out, err = capfd.readouterr()
    assert out == f"> {QUESTION}\n" + greedy_text(llama_dir, QUESTION, 6, chat=True) + "\n"
    assert "infinilm-nb demo: 2 ranks on cpu: " in err and " -n 2 " in err
    assert "generation: 6 tokens" in err and "tokens/s" in err


def test_demo_refuses_a_rank_count_that_does_not_split_the_model(llama_dir: Path, embedded_is, capsys):
    embedded_is(llama_dir)
    assert main(["demo", "--ranks", "3", "--backend", "cpu"]) == 2
    assert "tensor parallel size 3 does not divide num_attention_heads (4)" in capsys.readouterr().err
