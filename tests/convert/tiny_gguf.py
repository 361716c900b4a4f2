"""A tiny llama-architecture GGUF file written with gguf.GGUFWriter, for fast conversion tests.

Random weights in many tensor types (F32, F16, BF16, Q8_0, Q4_0, Q4_1 from ``gguf.quants.quantize``;
Q4_K and Q6_K as random blocks with sane scales, since gguf cannot quantize to them), Q and K rows
permuted the way llama.cpp's converter does, and a byte-level vocabulary with a few merges.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tokenizers import pre_tokenizers

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, CONTEXT = 64, 4, 2, 16, 256, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool>"]
MERGES = (
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
    "l l", "e ll", "h ell", "hell o", "Ġ h", "Ġh ell", "Ġhell o", "Ċ Ċ", "Ġ Ġ", "ĠĠ ĠĠ", "i s", "Ġ is",
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# (layer, tensor) -> stored type; the rest are F32 (norms) or Q8_0 (embedding, output)
LAYER_TYPES = [
    {"attn_q": Q.F16, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q8_0,
     "ffn_gate": Q.Q4_1, "ffn_up": Q.BF16, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q8_0, "attn_k": Q.F32, "attn_v": Q.F16, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_K},
]


def vocabulary(merges: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """Tokens (specials, the 256 byte symbols, the merge results, user-defined) and their llama.cpp types."""
    tokens = list(SPECIALS) + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += [merge.replace(" ", "") for merge in merges] + USER_DEFINED
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - len(USER_DEFINED)) + [4] * len(USER_DEFINED)
    return tokens, types


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The Q/K row permutation of llama.cpp's converter (HF ``rotate_half`` halves -> interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _k_quant_blocks(rng: np.random.Generator, rows: int, cols: int, kind: Q) -> np.ndarray:
    block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
    blocks = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    if kind == Q.Q4_K:  # d, dmin lead the block
        blocks[..., 0:2] = np.array([0.004], np.float16).view(np.uint8)
        blocks[..., 2:4] = np.array([0.002], np.float16).view(np.uint8)
    else:  # Q6_K: d ends the block
        blocks[..., -2:] = np.array([0.0005], np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def _store(rng: np.random.Generator, weight: np.ndarray, kind: Q) -> tuple[np.ndarray, Q | None]:
    if kind == Q.F32:
        return weight.astype(np.float32), None
    if kind == Q.F16:
        return weight.astype(np.float16), None
    if kind in (Q.Q4_K, Q.Q6_K):
        return _k_quant_blocks(rng, *weight.shape, kind), kind
    return gguf.quants.quantize(weight.astype(np.float32), kind), kind


def write_tiny_gguf(
    path: Path,
    *,
    arch: str = "llama",
    pre: str = "smollm",
    tokenizer_model: str = "gpt2",
    tied: bool = True,
    add_bos: bool = False,
    theta: float = 50000.0,
    merges: tuple[str, ...] = MERGES,
    extra: dict[str, tuple[np.ndarray, Q | None]] | None = None,
    drop: tuple[str, ...] = (),
    seed: int = 0,
) -> Path:
    """Write the tiny model to ``path``; ``extra`` adds or replaces tensors (name -> (array, raw type)),
    ``drop`` leaves tensors out."""
    rng = np.random.default_rng(seed)
    tokens, types = vocabulary(merges)

    def rand(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors: dict[str, tuple[np.ndarray, Q | None]] = {
        "token_embd.weight": _store(rng, rand(len(tokens), HIDDEN, scale=1.0), Q.Q8_0),
        "output_norm.weight": (1.0 + rand(HIDDEN), None),
    }
    if not tied:
        tensors["output.weight"] = _store(rng, rand(len(tokens), HIDDEN), Q.Q8_0)
    shapes = {"attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
              "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
              "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for layer, layer_types in enumerate(LAYER_TYPES):
        tensors[f"blk.{layer}.attn_norm.weight"] = (1.0 + rand(HIDDEN), None)
        tensors[f"blk.{layer}.ffn_norm.weight"] = (1.0 + rand(HIDDEN), None)
        for name, shape in shapes.items():
            weight = rand(*shape)
            if name in ("attn_q", "attn_k"):
                weight = llama_cpp_permute(weight, HEADS if name == "attn_q" else KV_HEADS)
            tensors[f"blk.{layer}.{name}.weight"] = _store(rng, weight, layer_types[name])
    tensors.update(extra or {})
    for name in drop:
        del tensors[name]

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(list(merges))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, (array, raw_type) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
