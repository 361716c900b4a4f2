"""Model, cache and parallel configuration, read from an HF ``config.json``.

``ModelConfig.from_pretrained(dir)`` accepts both config layouts in use: transformers 4
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and transformers 5 (``rope_parameters``, ``dtype``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# bfloat16 is held as its uint16 bit patterns (kernels.reference.BF16)
RUNTIME_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.uint16))
_DTYPE_NAMES = {"bfloat16": np.dtype(np.uint16), "bf16": np.dtype(np.uint16)}

# fields every config.json must carry (the others have the defaults transformers gives them)
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
    "max_position_embeddings",
)


@dataclass
class ModelConfig:
    """The shape and numerics of a Llama-family decoder (llama, mistral, qwen2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str
    attention_bias: bool  # bias on q/k/v (qwen2 always; llama when its config says so)
    bos_token_id: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    o_proj_bias: bool = False  # llama's attention_bias also puts a bias on o_proj; qwen2's does not
    mlp_bias: bool = False
    sliding_window: int | None = None  # mistral: the runtime attends to the full context

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Read ``model_dir/config.json``; errors name the file."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model directory {model_dir} has no config.json (looked for {path})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a config.json dict; ``source`` (the file) prefixes every error message."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        missing = [name for name in REQUIRED_FIELDS if d.get(name) is None]
        if missing:
            raise ValueError(f"{source}: missing required field {missing[0]!r} for model_type {model_type!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: unsupported hidden_act {act!r} (only silu)")
        heads = int(d["num_attention_heads"])
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or int(d["hidden_size"]) // heads)
        rope_theta, rope_scaling = _rope(d, source)
        bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        sliding = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        config = cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d["max_position_embeddings"]),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            attention_bias=bias,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])],
            o_proj_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=None if sliding is None else int(sliding),
        )
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Raise ``ValueError`` for sizes the runtime cannot run."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{source}: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"{source}: head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        """Width of the query projection: ``num_attention_heads * head_dim``."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) projection: ``num_key_value_heads * head_dim``."""
        return self.num_key_value_heads * self.head_dim


def _rope(d: dict[str, Any], source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either config layout; scaling is None for plain RoPE."""
    params = d.get("rope_parameters")
    if params:  # transformers 5: theta and scaling in one dict
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: unsupported rope_scaling type {kind!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    return float(theta), (None if kind == "default" else scaling)


@dataclass
class ParallelConfig:
    """Tensor parallelism: this process is ``rank`` of ``tp_size``.

    Rank ``r`` holds query heads ``r * Hq / N ..`` and the KV heads they read: ``Hk / N`` of them, or,
    with more ranks than KV heads, the one KV head its query heads share (replicated over ranks). It
    holds FFN columns ``r * I / N ..`` and vocabulary rows ``r * V / N ..`` of the embedding and lm_head.
    """

    tp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {self.tp_size}")
        if not 0 <= self.rank < self.tp_size:
            raise ValueError(f"rank must be in [0, {self.tp_size}), got {self.rank}")

    def check(self, config: ModelConfig, source: str = "config") -> None:
        """``ValueError`` naming the first quantity that ``tp_size`` does not split evenly."""
        problem = _misfit(config, self.tp_size)
        if problem is not None:
            fits = ", ".join(str(n) for n in range(1, config.num_attention_heads + 1) if _misfit(config, n) is None)
            raise ValueError(f"{source}: tensor parallel size {self.tp_size} {problem}; sizes that fit this model: {fits}")

    def shard(self, config: ModelConfig) -> ModelConfig:
        """The sizes this rank computes with: heads, KV heads, FFN and vocabulary divided by ``tp_size``."""
        if self.tp_size == 1:
            return config
        self.check(config)
        n = self.tp_size
        return replace(
            config,
            num_attention_heads=config.num_attention_heads // n,
            num_key_value_heads=max(1, config.num_key_value_heads // n),
            intermediate_size=config.intermediate_size // n,
            vocab_size=config.vocab_size // n,
        )

    def head_starts(self, config: ModelConfig) -> tuple[int, int]:
        """(first query head, first KV head) of this rank."""
        q_heads = config.num_attention_heads // self.tp_size
        group = config.num_attention_heads // config.num_key_value_heads
        return self.rank * q_heads, self.rank * q_heads // group


def _misfit(config: ModelConfig, n: int) -> str | None:
    """Why ``n`` ranks cannot split ``config`` (the quantity named), or None when they can."""
    for name in ("num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(config, name) % n:
            return f"does not divide {name} ({getattr(config, name)})"
    kv = config.num_key_value_heads
    if kv % n and n % kv:
        return (f"does not fit num_key_value_heads ({kv}): it must divide them, or be a multiple of them "
                "(each KV head then replicated on several ranks)")
    return None


def resolve_dtype(dtype: Any, backend: Any) -> np.dtype:
    """The runtime dtype: ``dtype`` if given (float16, float32, or bfloat16: returned as uint16, its bit
    patterns), else float16 on cuda, float32 elsewhere."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return np.dtype(np.float16 if backend.on_gpu else np.float32)
    if isinstance(dtype, str) and dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be float16, float32 or bfloat16, got {dtype!r}") from None
    if resolved not in RUNTIME_DTYPES:
        raise ValueError(f"dtype must be float16, float32 or bfloat16, got {resolved.name}")
    return resolved
