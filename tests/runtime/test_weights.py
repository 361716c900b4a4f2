"""Safetensors loading: packing, shards, on-disk dtypes, tied embeddings and every bad checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infinilm_nb.kernels import reference
from infinilm_nb.runtime.config import ModelConfig
from infinilm_nb.runtime.weights import ModelWeights, expected_shapes
from tests.runtime.hf_models import build_hf_model, save_tiny_model


def hf_state(family: str, **overrides) -> dict[str, np.ndarray]:
    """The float32 state dict of the model save_tiny_model(family, seed=0) writes."""
    return {k: v.numpy() for k, v in build_hf_model(family, **overrides).state_dict().items()}


def load(directory, dtype=np.float32) -> dict[str, np.ndarray]:
    weights = ModelWeights(directory, ModelConfig.from_pretrained(directory), dtype, progress=False)
    return dict(weights.items())


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer=False)


def copy_of(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "model")


def test_packs_qkv_gate_up_and_biases(qwen2_dir):
    config = ModelConfig.from_pretrained(qwen2_dir)
    got = load(qwen2_dir)
    want = hf_state("qwen2")
    assert set(got) == set(expected_shapes(config, tied=False))
    attn, mlp = "model.layers.1.self_attn.", "model.layers.1.mlp."
    qkv = np.concatenate([want[attn + f"{p}_proj.weight"] for p in "qkv"])
    np.testing.assert_array_equal(got["layers.1.qkv_proj.weight"], qkv)
    np.testing.assert_array_equal(got["layers.1.qkv_proj.bias"], np.concatenate([want[attn + f"{p}_proj.bias"] for p in "qkv"]))
    np.testing.assert_array_equal(got["layers.1.gate_up_proj.weight"],
                                  np.concatenate([want[mlp + "gate_proj.weight"], want[mlp + "up_proj.weight"]]))
    np.testing.assert_array_equal(got["layers.1.down_proj.weight"], want[mlp + "down_proj.weight"])
    np.testing.assert_array_equal(got["norm"], want["model.norm.weight"])
    np.testing.assert_array_equal(got["lm_head"], want["lm_head.weight"])
    assert all(a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable for a in got.values())


def test_sharded_checkpoint_loads_the_same(qwen2_dir, tmp_path):
    sharded = save_tiny_model(tmp_path, "qwen2", max_shard_size="20KB", tokenizer=False)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    whole, shards = load(qwen2_dir), load(sharded)
    assert all(np.array_equal(whole[k], shards[k]) for k in whole)


@pytest.mark.parametrize("disk", ["bfloat16", "float16"])
@pytest.mark.parametrize("runtime", [np.float32, np.float16])
def test_converts_on_disk_dtypes(tmp_path, disk, runtime):
    directory = save_tiny_model(tmp_path, "llama", dtype=disk, tokenizer=False)
    got = load(directory, runtime)
    torch_model = build_hf_model("llama").to(getattr(torch, disk))
    want = torch_model.state_dict()["model.layers.0.mlp.down_proj.weight"].float().numpy().astype(runtime)
    assert got["layers.0.down_proj.weight"].dtype == runtime
    np.testing.assert_array_equal(got["layers.0.down_proj.weight"], want)
    assert ModelConfig.from_pretrained(directory).torch_dtype == disk


@pytest.mark.parametrize("disk", ["bfloat16", "float32"])
def test_a_bfloat16_runtime_keeps_bfloat16_bits_and_rounds_the_rest(tmp_path, disk):
    directory = save_tiny_model(tmp_path, "llama", dtype=disk, tokenizer=False)
    got = load(directory, reference.BF16)["layers.0.down_proj.weight"]
    torch_model = build_hf_model("llama").to(getattr(torch, disk))
    stored = torch_model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    # torch's own bfloat16 rounding is nearest even too: its bits are what the runtime must hold
    want = stored.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("disk", ["bfloat16", "float32"])
def test_a_weight_beyond_float16_range_is_an_error_in_float16_only(tmp_path, disk):
    directory = save_tiny_model(tmp_path, "llama", dtype=disk, tokenizer=False)
    name = "model.layers.0.mlp.down_proj.weight"

    def enlarge(tensors):
        tensors[name][3, 5] = -2.0**20  # exact in bfloat16 too

    rewrite(directory, enlarge)
    with pytest.raises(ValueError, match=rf"tensor {name} holds -1.04858e\+06, beyond float16's range \(65504\): "
                                         r"load it with dtype='float32'"):
        load(directory, np.float16)
    assert load(directory, np.float32)["layers.0.down_proj.weight"][3, 5] == -2.0**20


def test_tied_when_lm_head_is_absent(tmp_path):
    directory = save_tiny_model(tmp_path, "llama", tie_word_embeddings=True, tokenizer=False)
    assert "lm_head.weight" not in load_file(directory / "model.safetensors")
    weights = ModelWeights(directory, ModelConfig.from_pretrained(directory), progress=False)
    assert weights.tied and "lm_head" not in weights and len(weights) == len(list(weights))


def rewrite(directory, edit) -> None:
    """Load model.safetensors as torch tensors, apply ``edit`` to the dict, save it back."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def open_weights(directory):
    return ModelWeights(directory, ModelConfig.from_pretrained(directory), progress=False)


def test_missing_tensor(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    rewrite(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model.layers.1.mlp.up_proj.weight \(expected shape \(128, 64\)\)"):
        open_weights(directory)


def test_missing_bias(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    rewrite(directory, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensor model.layers.0.self_attn.k_proj.bias \(expected shape \(32,\)\)"):
        open_weights(directory)


def test_unexpected_tensor(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    rewrite(directory, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(3, 4)}))
    with pytest.raises(ValueError, match=r"unexpected tensor model.layers.0.mlp.extra.weight with shape \(3, 4\)"):
        open_weights(directory)


def test_wrong_shape(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    rewrite(directory, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.ones(16, 64)}))
    with pytest.raises(
        ValueError,
        match=r"tensor model.layers.0.self_attn.k_proj.weight has shape \(16, 64\) in model.safetensors, expected \(32, 64\)",
    ):
        open_weights(directory)


def test_unsupported_dtype(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    rewrite(directory, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].double()}))
    with pytest.raises(ValueError, match="tensor model.norm.weight has dtype F64; supported: F32, F16, BF16"):
        open_weights(directory)


def test_missing_config_json(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ModelConfig.from_pretrained(directory)


def test_missing_weight_file(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        open_weights(directory)


def test_missing_shard(tmp_path):
    directory = save_tiny_model(tmp_path, "llama", max_shard_size="20KB", tokenizer=False)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"weight file {shard.name} listed in .*index.json is missing"):
        open_weights(directory)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    directory = save_tiny_model(tmp_path, "llama", max_shard_size="20KB", tokenizer=False)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = sorted(directory.glob("model-*.safetensors"))[0].name
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="tensor model.norm.weight is listed in model.safetensors.index.json but missing"):
        open_weights(directory)


def test_not_a_safetensors_file(qwen2_dir, tmp_path):
    directory = copy_of(qwen2_dir, tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ValueError, match="model.safetensors: not a safetensors file"):
        open_weights(directory)
