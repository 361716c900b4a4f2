"""GGUF file (llama architecture) -> HF directory the runtime loads.

Output: ``model.safetensors`` (HF names and (out, in) shapes, dequantized), ``config.json``
(``LlamaForCausalLM``), ``tokenizer.json`` and ``tokenizer_config.json``. llama.cpp's converter
permutes the rows of Q and K so that RoPE rotates interleaved pairs; they are put back in the
``rotate_half`` order HF Llama uses. Everything is checked before anything is written.
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

try:
    import gguf
except ImportError as error:  # an optional extra, so say which
    raise ImportError("GGUF conversion needs the gguf package: pip install 'infinilm-nb[gguf]'") from error

from infinilm_nb.convert.gguf_rope import rope_scaling
from infinilm_nb.convert.gguf_tokenizer import build_tokenizer
from infinilm_nb.convert.safetensors_stream import TensorSpec, write_safetensors

SUPPORTED_ARCHITECTURES = ("llama",)
DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_FREQS = "rope_freqs.weight"  # Llama-3 rope scaling, read into config.json


def hf_name(name: str) -> str:
    """The HF Llama name of a GGUF tensor name; ValueError for one that has none."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"unsupported tensor {name!r} for the llama architecture")


def unpermute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: interleaved RoPE pairs back to HF ``rotate_half`` halves."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@cache
def _dequantizable(kind: gguf.GGMLQuantizationType) -> bool:
    if kind not in gguf.GGML_QUANT_SIZES:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[kind][1]), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


def _dequantize(tensor: Any) -> np.ndarray:
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)


def _shortest_f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


class _Metadata:
    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self._fields = reader.fields
        self._path = path

    def get(self, key: str) -> Any:
        field = self._fields.get(key)
        return None if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self._path}: GGUF metadata has no {key!r}")
        return value


def _config(meta: _Metadata, arch: str, tensors: dict[str, Any], dtype: str, rope_freqs: np.ndarray | None) -> dict:
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    rotary = meta.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ValueError(f"unsupported partial rotary embedding: rope dimension {rotary} of head_dim {head_dim}")
    theta = _shortest_f32(meta.get(f"{arch}.rope.freq_base") or 10000.0)
    context = int(meta.require(f"{arch}.context_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": _shortest_f32(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": rope_scaling(meta.get, arch, theta, head_dim, rope_freqs),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }
    special_ids = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    for key, name in special_ids.items():
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is not None:
            config[key] = int(value)
    return config


def _weight_spec(tensor: Any, name: str, out_dtype: np.dtype, config: dict) -> TensorSpec:
    heads = {".self_attn.q_proj.": config["num_attention_heads"], ".self_attn.k_proj.": config["num_key_value_heads"]}
    n_head = next((n for part, n in heads.items() if part in name), None)

    def load() -> np.ndarray:
        weight = _dequantize(tensor)
        if n_head is not None:
            weight = unpermute_rows(weight, n_head)
        if out_dtype == np.float16 and np.abs(weight).max() > np.finfo(np.float16).max:
            raise ValueError(f"{tensor.name} has values beyond the float16 range: convert with dtype float32")
        return weight.astype(out_dtype)

    return TensorSpec(name, tuple(int(d) for d in reversed(tensor.shape)), out_dtype, load)


def convert_gguf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float16", progress: bool = True
) -> Path:
    """Convert a llama-architecture GGUF file into an HF directory at ``out_dir``; returns its path.

    Weights are dequantized (every type ``gguf.quants.dequantize`` handles) and stored as ``dtype``
    (``"float16"`` or ``"float32"``). Raises ValueError naming an unsupported architecture, tensor,
    tensor type, tokenizer or rope scaling, before writing anything.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(gguf_path)
    reader = gguf.GGUFReader(path)
    meta = _Metadata(reader, path)
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"unsupported architecture {arch!r} in {path} (supported: {supported})")

    tensors = {t.name: t for t in reader.tensors}
    for tensor in tensors.values():
        if not _dequantizable(tensor.tensor_type):
            raise ValueError(f"unsupported tensor type {tensor.tensor_type.name} of tensor {tensor.name!r}")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path} has no token_embd.weight tensor")
    rope_freqs = _dequantize(tensors.pop(_ROPE_FREQS)) if _ROPE_FREQS in tensors else None
    names = {gguf_name: hf_name(gguf_name) for gguf_name in tensors}

    config = _config(meta, arch, tensors, dtype, rope_freqs)
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}" for i in range(config["num_hidden_layers"]) for n in _LAYER_NAMES.values()
    }
    missing = sorted(expected - set(names.values()))
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) of a llama model, e.g. HF {missing[0]!r}")
    tokenizer, tokenizer_config = build_tokenizer(meta.get, config["max_position_embeddings"])
    specs = [_weight_spec(tensors[g], h, DTYPES[dtype], config) for g, h in names.items()]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", specs, progress=progress)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return out
