"""Safetensors loading: HF tensor names, dtype conversion and the packed QKV / gate-up weights.

The model asks for weights by *runtime name* (:func:`expected_shapes` lists them):

* ``embed_tokens`` ``[V, H]``, ``norm`` ``[H]``, ``lm_head`` ``[V, H]`` (absent when tied: the model
  reuses the embedding);
* per layer ``layers.{i}.``: ``input_layernorm`` and ``post_attention_layernorm`` ``[H]``,
  ``qkv_proj.weight`` ``[(Hq + 2 Hk) D, H]`` (q, k, v rows stacked; ``qkv_proj.bias`` when the model
  has attention bias), ``o_proj.weight`` ``[H, Hq D]``, ``gate_up_proj.weight`` ``[2 I, H]`` (gate rows
  first) and ``down_proj.weight`` ``[H, I]`` (plus their biases when the config asks).

:class:`ModelWeights` reads them lazily from the files, one tensor in host memory at a time, after
checking every header first, so that a bad checkpoint fails before anything is loaded. Safetensors
files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and memory
mapped, which reads bfloat16 without torch (``safe_open(..., "numpy").get_slice`` cannot: NumPy has no
bfloat16) and lets a tensor-parallel rank read only its slice (:func:`rank_slices`) of each tensor:
slicing the mapping touches only the pages that hold the slice, as ``get_slice`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from tqdm.auto import tqdm

from ..kernels import reference
from .config import ModelConfig, ParallelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DISK_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16 widened by hand
# tensors some checkpoints carry that the runtime recomputes
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def expected_shapes(config: ModelConfig, tied: bool) -> dict[str, tuple[int, ...]]:
    """Runtime name -> shape of every weight the model needs; no ``lm_head`` when ``tied``."""
    return {
        name: (sum(shape[0] for _, shape in parts),) + parts[0][1][1:]
        for name, parts in hf_sources(config, tied).items()
    }


def hf_sources(config: ModelConfig, tied: bool) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Runtime name -> the HF tensors (name, shape) stacked along axis 0 to make it (in that order)."""
    h, inter = config.hidden_size, config.intermediate_size
    q, kv = config.q_size, config.kv_size
    sources: dict[str, list[tuple[str, tuple[int, ...]]]] = {"embed_tokens": [("model.embed_tokens.weight", (config.vocab_size, h))]}
    for i in range(config.num_hidden_layers):
        p, hp = f"layers.{i}.", f"model.layers.{i}."
        attn, mlp = hp + "self_attn.", hp + "mlp."
        sources[p + "input_layernorm"] = [(hp + "input_layernorm.weight", (h,))]
        sources[p + "qkv_proj.weight"] = [(attn + "q_proj.weight", (q, h)), (attn + "k_proj.weight", (kv, h)),
                                          (attn + "v_proj.weight", (kv, h))]
        if config.attention_bias:
            sources[p + "qkv_proj.bias"] = [(attn + "q_proj.bias", (q,)), (attn + "k_proj.bias", (kv,)),
                                            (attn + "v_proj.bias", (kv,))]
        sources[p + "o_proj.weight"] = [(attn + "o_proj.weight", (h, q))]
        if config.o_proj_bias:
            sources[p + "o_proj.bias"] = [(attn + "o_proj.bias", (h,))]
        sources[p + "post_attention_layernorm"] = [(hp + "post_attention_layernorm.weight", (h,))]
        sources[p + "gate_up_proj.weight"] = [(mlp + "gate_proj.weight", (inter, h)), (mlp + "up_proj.weight", (inter, h))]
        sources[p + "down_proj.weight"] = [(mlp + "down_proj.weight", (h, inter))]
        if config.mlp_bias:
            sources[p + "gate_up_proj.bias"] = [(mlp + "gate_proj.bias", (inter,)), (mlp + "up_proj.bias", (inter,))]
            sources[p + "down_proj.bias"] = [(mlp + "down_proj.bias", (h,))]
    sources["norm"] = [("model.norm.weight", (h,))]
    if not tied:
        sources["lm_head"] = [("lm_head.weight", (config.vocab_size, h))]
    return sources


Slice = tuple[int, slice] | None  # (axis, range) of one HF tensor that a rank reads; None: all of it


def rank_slices(name: str, config: ModelConfig, parallel: ParallelConfig) -> list[Slice] | None:
    """How ``parallel.rank`` cuts each HF part (:func:`hf_sources`) of the runtime tensor ``name``;
    None when the rank reads every part whole.

    Column-parallel (rows of the HF tensor): q / k / v by heads, gate / up by FFN rows, the embedding
    and lm_head by vocabulary rows. Row-parallel (columns): o_proj by query heads, down_proj by FFN
    columns; their biases stay whole (rank 0 adds them). Norms are whole.
    """
    if parallel.tp_size == 1:
        return None
    local = parallel.shard(config)
    d = config.head_dim
    q_head, kv_head = parallel.head_starts(config)
    q = slice(q_head * d, q_head * d + local.q_size)
    kv = slice(kv_head * d, kv_head * d + local.kv_size)
    ffn = slice(parallel.rank * local.intermediate_size, (parallel.rank + 1) * local.intermediate_size)
    vocab = slice(parallel.rank * local.vocab_size, (parallel.rank + 1) * local.vocab_size)
    kind = name.split(".")[2] if name.startswith("layers.") else name
    weight = not name.endswith(".bias")
    rules: dict[str, list[Slice]] = {
        "embed_tokens": [(0, vocab)],
        "lm_head": [(0, vocab)],
        "qkv_proj": [(0, q), (0, kv), (0, kv)],
        "o_proj": [(1, q) if weight else None],
        "gate_up_proj": [(0, ffn), (0, ffn)],
        "down_proj": [(1, ffn) if weight else None],
    }
    return rules.get(kind)


class SafetensorsFile:
    """One ``.safetensors`` file: its header, and its tensors as read-only memory-mapped arrays."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            length = int.from_bytes(raw, "little")
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{path}: not a safetensors file (bad header: {error})") from None
        header.pop("__metadata__", None)
        self.header: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length
        self._map: np.memmap | None = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.header[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored (bfloat16 comes back as its uint16 bit pattern), memory mapped.

        Only F32, F16 and BF16 tensors are read (:class:`ModelWeights` checks that first)."""
        info = self.header[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = (self.data_start + int(o) for o in info["data_offsets"])
        return self._map[begin:end].view(DISK_DTYPES[info["dtype"]]).reshape(self.shape(name))

    def is_bf16(self, name: str) -> bool:
        return self.header[name]["dtype"] == "BF16"


def to_dtype(array: np.ndarray, bf16: bool, dtype: np.dtype, name: str = "tensor") -> np.ndarray:
    """Convert a stored tensor to ``dtype``; bfloat16 bits go to the high half of a float32. A
    bfloat16 runtime dtype (uint16, its bit patterns) keeps stored bfloat16 bits and rounds the others.

    Narrowing bfloat16 or float32 to float16 raises ``ValueError`` naming the tensor when a finite
    value falls outside float16's range (it would silently become infinite)."""
    if np.dtype(dtype) == reference.BF16:
        return np.array(array, order="C") if bf16 else reference.cast(np.asarray(array, np.float32), reference.BF16)
    if bf16:
        array = reference.to_f32(array)
    out = np.array(array, dtype=dtype, order="C")  # always a copy: never hand out the file mapping
    if out.dtype == np.float16 and array.dtype != np.float16 and np.isinf(out).any():
        wide = np.asarray(array, dtype=np.float32)
        overflow = np.isfinite(wide) & np.isinf(out)
        if overflow.any():
            values = wide[overflow]
            biggest = float(values[np.argmax(np.abs(values))])
            raise ValueError(
                f"{name} holds {biggest:.6g}, beyond float16's range (65504): load it with dtype='float32'"
            )
    return out


def weight_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the file holding it, from the index (sharded) or the single file."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index}: not a safetensors index (no weight_map: {error})") from None
        files = {name: model_dir / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise FileNotFoundError(f"weight file {path.name} listed in {index} is missing from {model_dir}")
        return files
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"model directory {model_dir} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")
    return {name: single for name in SafetensorsFile(single).header}


class ModelWeights(Mapping):
    """The model's weights by runtime name, read from an HF directory on demand.

    Construction checks every tensor's presence and shape against the config (``ValueError`` naming
    the tensor and both shapes) and that no unexpected tensor is present. ``weights[name]`` reads,
    converts to ``dtype`` and packs one runtime tensor (host NumPy): with ``parallel``, only this
    rank's slice of it (shapes of ``parallel.shard(config)``). Iterating advances a tqdm bar.
    """

    def __init__(
        self,
        model_dir: str | Path,
        config: ModelConfig,
        dtype: Any = np.float32,
        progress: bool = True,
        parallel: ParallelConfig | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.dtype = np.dtype(dtype)
        self.progress = progress
        self.parallel = parallel or ParallelConfig()
        self.parallel.check(config, str(self.model_dir / "config.json"))
        locations = weight_files(self.model_dir)
        self._files = {path: SafetensorsFile(path) for path in sorted(set(locations.values()))}
        self._where = {name: self._files[path] for name, path in locations.items()}
        for name, file in self._where.items():
            if name not in file.header:
                raise ValueError(f"tensor {name} is listed in {INDEX_FILE} but missing from {file.path.name}")
        self.tied = config.tie_word_embeddings or "lm_head.weight" not in self._where
        self._sources = hf_sources(config, self.tied)
        self._check()

    def _check(self) -> None:
        wanted: dict[str, tuple[int, ...]] = {}
        for parts in self._sources.values():
            wanted.update(parts)
        for name, shape in wanted.items():
            if name not in self._where:
                raise ValueError(f"missing tensor {name} (expected shape {tuple(shape)}) in {self.model_dir}")
            file = self._where[name]
            got = file.shape(name)
            if got != tuple(shape):
                raise ValueError(f"tensor {name} has shape {got} in {file.path.name}, expected {tuple(shape)}")
            if file.header[name]["dtype"] not in DISK_DTYPES:
                raise ValueError(f"{file.path}: tensor {name} has dtype {file.header[name]['dtype']}; supported: F32, F16, BF16")
        allowed = set(wanted) | ({"lm_head.weight"} if self.tied else set())
        for name, file in self._where.items():
            if name not in allowed and not name.endswith(IGNORED_SUFFIXES):
                raise ValueError(
                    f"unexpected tensor {name} with shape {file.shape(name)} in {file.path.name} "
                    f"(not part of a {self.config.model_type} model with this config)"
                )

    def __getitem__(self, name: str) -> np.ndarray:
        parts = []
        slices = rank_slices(name, self.config, self.parallel) or [None] * len(self._sources[name])
        for (hf_name, _), cut in zip(self._sources[name], slices):
            file = self._where[hf_name]
            stored = file.read(hf_name)
            if cut is not None:  # a view of the mapping: only the slice's pages are read
                axis, span = cut
                stored = stored[span] if axis == 0 else stored[:, span]
            parts.append(to_dtype(stored, file.is_bf16(hf_name), self.dtype, f"tensor {hf_name}"))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(tqdm(self._sources, desc="Loading weights", unit="tensor", disable=not self.progress))

    def __len__(self) -> int:
        return len(self._sources)
