"""ModelConfig from HF config.json (transformers 4 and 5 layouts), ParallelConfig and dtypes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.config import ModelConfig, ParallelConfig, resolve_dtype
from tests.runtime.hf_models import LLAMA3_ROPE

# a transformers-4 style config.json, as most checkpoints on the Hub carry
V4_LLAMA = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": dict(LLAMA3_ROPE, original_max_position_embeddings=8192),
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def test_reads_each_family(tiny_model_dir):
    config = ModelConfig.from_pretrained(tiny_model_dir)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (64, 4, 2, 16)
    assert config.q_size == 64 and config.kv_size == 32
    assert config.attention_bias == (config.model_type == "qwen2")
    assert not config.o_proj_bias and not config.mlp_bias
    assert config.rope_theta == 10000.0 and config.eos_token_ids == [2] and config.bos_token_id == 1
    if config.model_type == "llama":
        assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == 8.0
    else:
        assert config.rope_scaling is None
    assert config.torch_dtype == "float32"


def test_reads_transformers4_layout():
    config = ModelConfig.from_dict(V4_LLAMA)
    assert config.head_dim == 128 and config.rope_theta == 500000.0
    assert config.rope_scaling["original_max_position_embeddings"] == 8192
    assert config.eos_token_ids == [128001, 128008, 128009] and config.torch_dtype == "bfloat16"
    assert not config.tie_word_embeddings


def test_defaults_kv_heads_and_head_dim():
    d = {k: v for k, v in V4_LLAMA.items() if k not in ("num_key_value_heads", "rope_theta", "rope_scaling")}
    config = ModelConfig.from_dict(d)
    assert config.num_key_value_heads == 32 and config.head_dim == 128
    assert config.rope_theta == 10000.0 and config.rope_scaling is None


def test_llama_attention_bias_also_biases_o_proj():
    config = ModelConfig.from_dict(dict(V4_LLAMA, attention_bias=True, mlp_bias=True))
    assert config.attention_bias and config.o_proj_bias and config.mlp_bias


def test_unknown_model_type_names_it_and_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(V4_LLAMA, model_type="gpt2")))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'gpt2' \(supported: llama, mistral, qwen2\)"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_field_names_it_and_the_file(tmp_path):
    d = {k: v for k, v in V4_LLAMA.items() if k != "intermediate_size"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: missing required field 'intermediate_size'"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_config_json_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model directory {tmp_path} has no config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"num_key_value_heads": 5}, r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)"),
        ({"hidden_size": 0}, "hidden_size must be positive, got 0"),
    ],
)
def test_rejects_what_the_runtime_cannot_run(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(dict(V4_LLAMA, **change), source="cfg")


def test_parallel_config():
    assert ParallelConfig() == ParallelConfig(tp_size=1, rank=0)
    with pytest.raises(ValueError, match="tp_size must be >= 1, got 0"):
        ParallelConfig(tp_size=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        ParallelConfig(tp_size=2, rank=2)


def test_resolve_dtype():
    cpu = get_backend("cpu")
    assert resolve_dtype(None, cpu) == np.float32 and resolve_dtype("auto", cpu) == np.float32
    assert resolve_dtype("float16", cpu) == np.float16 and resolve_dtype(np.float32, cpu) == np.float32
    assert resolve_dtype("bfloat16", cpu) == np.uint16 == resolve_dtype("bf16", cpu)  # bfloat16 bit patterns
    for bad in ("int8", "fp17", np.float64):
        with pytest.raises(ValueError, match="dtype must be float16, float32 or bfloat16"):
            resolve_dtype(bad, cpu)
