"""The infinilm-nb command line: generate and chat, through main() and as a real process."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infinilm_nb import LLM, SamplingParams
from infinilm_nb.cli import main

REPO = Path(__file__).resolve().parents[2]


def greedy_text(model_dir: Path, prompt: str, max_tokens: int, chat: bool = False, dtype: str | None = None) -> str:
    llm = LLM(model_dir, backend="cpu", dtype=dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    if chat:
        return llm.chat([{"role": "user", "content": prompt}], params)[0].outputs[0].text
    return llm.generate(prompt, params)[0].outputs[0].text


def test_generate_streams_text_and_speed(llama_dir: Path, capsys: pytest.CaptureFixture):
    args = ["generate", "--model", str(llama_dir), "--prompt", "The capital of France is", "--max-tokens", "12",
            "--backend", "cpu", "--cache", "static"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == greedy_text(llama_dir, "The capital of France is", 12) + "\n"
    prompt_tokens = len(LLM(llama_dir, backend="cpu").tokenizer.encode("The capital of France is"))
    assert f"prompt: {prompt_tokens} tokens, " in err and "generation: 12 tokens, " in err and "tokens/s" in err


def test_generate_in_bfloat16(llama_dir: Path, capsys: pytest.CaptureFixture):
    args = ["generate", "--model", str(llama_dir), "--prompt", "Hi", "--max-tokens", "6", "--backend", "cpu",
            "--dtype", "bfloat16"]
    assert main(args) == 0
    assert capsys.readouterr().out == greedy_text(llama_dir, "Hi", 6, dtype="bfloat16") + "\n"


def test_generate_chat_sampled(llama_dir: Path, capsys: pytest.CaptureFixture):
    greedy = ["generate", "--model", str(llama_dir), "--prompt", "Hi", "--chat", "--max-tokens", "6",
              "--backend", "cpu"]
    args = greedy + ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded
    assert main(greedy) == 0
    assert capsys.readouterr().out == greedy_text(llama_dir, "Hi", 6, chat=True) + "\n"


def test_chat_keeps_history(llama_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nHow are you?\n/exit\nnot read\n"))
    assert main(["chat", "--model", str(llama_dir), "--backend", "cpu", "--max-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    llm = LLM(llama_dir, backend="cpu")
    params = SamplingParams(max_tokens=5, temperature=0)
    history = [{"role": "user", "content": "Hello"}]
    first = llm.chat(history, params)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "How are you?"}]
    second = llm.chat(history, params)[0].outputs[0].text
    assert out == f"> {first}\n> > {second}\n> "  # the empty line is asked again
    assert err.count("generation: 5 tokens") == 2


def test_errors_exit_with_a_message(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--backend", "cpu"]) == 2
    assert "infinilm-nb: error: model directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(llama_dir), "--prompt", "x", "--backend", "cpu", "--top-p", "2"]) == 2
    assert "SamplingParams.top_p must be a number in (0, 1], got 2.0" in capsys.readouterr().err
    assert main(["generate", "--model", str(llama_dir), "--prompt", "", "--backend", "cpu"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    args = ["generate", "--model", str(llama_dir), "--prompt", "x " * 40, "--backend", "cpu", "--max-model-len", "16"]
    assert main(args) == 1
    assert "more than max_model_len=16" in capsys.readouterr().err


def test_generate_as_a_process(llama_dir: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "infinilm_nb", "generate", "--model", str(llama_dir), "--prompt", "Hello, world",
         "--max-tokens", "8", "--backend", "cpu"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_text(llama_dir, "Hello, world", 8) + "\n"
    assert "generation: 8 tokens" in result.stderr
