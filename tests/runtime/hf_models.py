"""Tiny random HF models (and a tiny tokenizer) saved as HF directories, for the runtime tests.

``save_tiny_model(tmp_path, "llama")`` writes ``config.json``, ``model.safetensors`` (or shards),
``tokenizer.json`` and ``tokenizer_config.json`` (with a chat template) and returns the directory;
``load_hf_model(dir)`` gives the transformers model back (torch, CPU, float32, eval mode) to compare
with. Weights are drawn from a seeded generator with a spread large enough that greedy tokens are
not decided by rounding noise; biases and norm weights are random too, so a dropped bias or norm
weight shows up in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2")

# Special tokens come first in the tokenizer, so their ids are 0, 1, 2 in every tiny model.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# hidden 64, 4 q heads / 2 kv heads of 16, FFN 128, vocab 300
TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)

# overrides of TINY for tensor parallelism over 2 and 3 ranks: 12 q / 6 kv heads of 8 (hidden 96),
# FFN 96 and vocab 300 all divide
TP_TINY = dict(hidden_size=96, intermediate_size=96, num_attention_heads=12, num_key_value_heads=6)

# the tiniest model, for the simulator: 1 layer, hidden 16, 2 q heads / 1 kv head of 8, vocab 64
TINIEST = dict(TINY, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=64)


def hf_config(family: str, **overrides: Any) -> Any:
    """A transformers config for ``family`` (llama, mistral, qwen2): :data:`TINY` plus ``overrides``.

    The llama config carries Llama-3 rope scaling unless ``rope_scaling`` is overridden.
    """
    import transformers

    classes = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    kwargs = dict(TINY)
    if family == "llama":
        kwargs["rope_scaling"] = dict(LLAMA3_ROPE)
    kwargs.update(overrides)
    return getattr(transformers, classes[family])(**kwargs)


def build_hf_model(family: str, seed: int = 0, scale: float = 0.15, **overrides: Any) -> Any:
    """A random ``<Family>ForCausalLM`` in float32 on the CPU, in eval mode."""
    import torch
    import transformers

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(scale * noise)
    return model


def save_tokenizer(directory: str | Path, vocab_size: int) -> None:
    """Write a byte-level BPE ``tokenizer.json`` of ``vocab_size`` tokens and its ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
        "Hello, world! How are you today? I am fine, thank you. Héllo wörld, ünïcode 你好.",
    ] * 4
    tokenizer.train_from_iterator(text, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_tiny_model(
    directory: str | Path,
    family: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Build a random tiny model and ``save_pretrained`` it (safetensors) into ``directory``.

    ``dtype`` is the on-disk dtype (float32, float16 or bfloat16); ``max_shard_size`` (e.g. "20KB")
    writes shards and ``model.safetensors.index.json``. Returns the directory.
    """
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(family, seed=seed, **overrides)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        save_tokenizer(directory, model.config.vocab_size)
    return directory


def load_hf_model(directory: str | Path) -> Any:
    """The saved model back from transformers, float32 on the CPU, eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def hf_logits(model: Any, token_ids: list[int]) -> np.ndarray:
    """float32 ``[len(token_ids), vocab]`` logits of one sequence through transformers."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([token_ids], dtype=torch.long))
    return out.logits[0].float().numpy()


def hf_greedy(model: Any, prompt: list[int], steps: int) -> list[int]:
    """``steps`` greedy (argmax) tokens after ``prompt`` through transformers, never stopping at EOS."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(hf_logits(model, tokens)[-1])))
    return tokens[len(prompt):]
