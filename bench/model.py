"""The end-to-end benchmarks' model: a random-weight Llama checkpoint in HF layout, and its HF peer.

:func:`write_random_llama` writes a Llama-3-8B-shaped (by default) float16 checkpoint that both this
engine and transformers load: ``config.json``, safetensors shards of about ``shard_bytes`` with their
``model.safetensors.index.json``, and a word-level ``tokenizer.json`` covering the vocabulary. Weights
are drawn on the GPU with CuPy when it is usable (NumPy otherwise), one tensor at a time, so that
host memory holds at most one shard; no torch model is ever built for it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from infinilm_nb.runtime.config import ModelConfig
from infinilm_nb.runtime.weights import INDEX_FILE, expected_shapes, hf_sources

LLAMA3_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
WEIGHT_STD = 0.02  # HF's initializer range: activations stay well inside float16 over 32 layers
SHARD_BYTES = 4 << 30

Normal = Callable[[tuple[int, ...]], np.ndarray]  # shape -> float16 N(0, WEIGHT_STD^2) host array


def llama_config(layers: int = 32, **overrides: Any) -> dict[str, Any]:
    """The ``config.json`` dict of the Llama-3-8B shape with ``layers`` decoder layers."""
    return {**LLAMA3_8B, "num_hidden_layers": layers, **overrides}


def weight_bytes(config: dict[str, Any]) -> int:
    """Bytes of every float16 weight of the model (embedding and lm_head included)."""
    shapes = expected_shapes(ModelConfig.from_dict(config), tied=bool(config.get("tie_word_embeddings")))
    return sum(2 * int(np.prod(shape)) for shape in shapes.values())


def hf_tensors(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of the checkpoint, in file order."""
    sources = hf_sources(ModelConfig.from_dict(config), tied=bool(config.get("tie_word_embeddings")))
    return [part for parts in sources.values() for part in parts]


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int, itemsize: int = 2) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = itemsize * int(np.prod(shape))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def normal_sampler(seed: int) -> Normal:
    """Float16 N(0, WEIGHT_STD^2) host arrays: drawn on the GPU with CuPy when usable, else with NumPy."""
    from infinilm_nb.backend import cuda_problem

    if cuda_problem() is None:
        import cupy

        gpu = cupy.random.default_rng(seed)
        return lambda shape: (gpu.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16).get()
    cpu = np.random.default_rng(seed)
    return lambda shape: (cpu.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float16)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose token ``i`` is the word ``t{i}``: every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def write_random_llama(
    directory: str | Path, config: dict[str, Any], shard_bytes: int = SHARD_BYTES, seed: int = 0,
    normal: Normal | None = None,
) -> Path:
    """Write a random float16 checkpoint of ``config`` (see :func:`llama_config`) into ``directory``.

    Matrices are N(0, 0.02^2), norm weights 1. ``normal`` draws the matrices (default:
    :func:`normal_sampler`). Returns the directory.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    normal = normal or normal_sampler(seed)
    tensors = hf_tensors(config)
    shapes = dict(tensors)
    shards = plan_shards(tensors, shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {
            name: np.ones(shapes[name], np.float16) if name.endswith("norm.weight") else normal(shapes[name])
            for name in names
        }
        save_file(arrays, str(directory / file), metadata={"format": "pt"})
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({name: file for name in names})
        del arrays
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(directory, config["vocab_size"])
    return directory


@contextlib.contextmanager
def model_directory(config: dict[str, Any], keep: str | Path | None = None) -> Iterator[Path]:
    """A directory holding the random checkpoint of ``config``: ``keep`` (written once, reused while
    its config.json matches), else a temporary one removed afterwards."""
    if keep is not None:
        keep = Path(keep)
        found = keep / "config.json"
        if not (found.is_file() and json.loads(found.read_text()) == config):
            print(f"writing a random {config['num_hidden_layers']}-layer checkpoint to {keep} ...", flush=True)
            write_random_llama(keep, config)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="infinilm-bench-") as tmp:
        print(f"writing a random {config['num_hidden_layers']}-layer checkpoint to {tmp} ...", flush=True)
        yield write_random_llama(tmp, config)


def free_gpu_memory() -> None:
    """Return what CuPy's pools cache to the driver (after dropping an LLM), so torch can use it."""
    gc.collect()
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()


def load_hf(directory: str | Path) -> Any:
    """transformers' ``LlamaForCausalLM`` of the checkpoint, float16 on the GPU, eval mode."""
    import torch
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_arg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    model = transformers.LlamaForCausalLM.from_pretrained(str(directory), **{dtype_arg: torch.float16})
    return model.to("cuda").eval()


def hf_generate(model: Any, input_ids: Any, attention_mask: Any, new_tokens: int) -> float:
    """Seconds for transformers' greedy ``generate`` of exactly ``new_tokens`` tokens (EOS suppressed)."""
    import time

    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )
    torch.cuda.synchronize()
    return time.perf_counter() - start
