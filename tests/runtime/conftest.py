"""Fixtures for the runtime tests: tiny random HF models saved once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.runtime.hf_models import FAMILIES, load_hf_model, save_tiny_model


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model of each family (llama with Llama-3 rope scaling, mistral, qwen2 with QKV bias)."""
    return save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama (Llama-3 rope scaling, float32 safetensors, tokenizer with a chat template)."""
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir: Path):
    """The transformers model saved in ``tiny_model_dir``, loaded back (float32, CPU)."""
    return load_hf_model(tiny_model_dir)
