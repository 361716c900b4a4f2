"""GGUF -> HF conversion on tiny GGUF files written with gguf.GGUFWriter (fast, no download)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from infinilm_nb.convert import convert_gguf
from infinilm_nb.convert.commands import convert_main
from infinilm_nb.convert.gguf import unpermute_rows
from infinilm_nb.convert.gguf_rope import llama3_rope_divisors, rope_scaling
from tests.convert.tiny_gguf import HEAD_DIM, MERGES, Q, llama_cpp_permute, write_tiny_gguf

STRINGS = [
    "hello world", "the 123 is 4567", "<|im_start|>user\nhi<tool><|im_end|>\n", "  \n\n  x",
    "I'm 99% sure it's Ünïcödé 日本語 🙂!", "x=1;\n\tif(y) {return 2}", "hello    world   ", "'s 've ALL CAPS",
]


def _hf_load(directory: Path, gguf_file: str | None = None) -> tuple[dict[str, np.ndarray], Any]:
    """transformers' model from an HF directory (or a GGUF file in it) and its weights as arrays."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file)
    return {name: tensor.numpy() for name, tensor in model.state_dict().items()}, model


@pytest.mark.parametrize("tied", [True, False])
def test_weights_and_logits_match_transformers_gguf_load(tmp_path, tied):
    """Every tensor type, the Q/K un-permutation and the config: our directory loads in transformers
    with the exact weights and logits of transformers' own load of the same GGUF."""
    import torch

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tied=tied)
    out = convert_gguf(path, tmp_path / "hf", dtype="float32", progress=False)
    want, want_model = _hf_load(tmp_path, "tiny.gguf")
    got, got_model = _hf_load(out)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got_model.config.tie_word_embeddings is tied
    assert sorted(load_file(out / "model.safetensors")) == sorted(
        n for n in want if not (tied and n == "lm_head.weight")
    )
    ids = torch.tensor([[5, 40, 100, 7, 200, 33, 2, 1, 9, 77]])
    with torch.no_grad():
        np.testing.assert_array_equal(got_model(ids).logits.numpy(), want_model(ids).logits.numpy())


def test_config_from_metadata(tmp_path):
    out = convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", theta=12345.0), tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 256, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert (config["rope_theta"], config["rms_norm_eps"], config["max_position_embeddings"]) == (12345.0, 1e-5, 128)
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float16")
    assert config["tie_word_embeddings"] is True and config["rope_scaling"] is None
    assert config["vocab_size"] == Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()


def test_float16_is_float32_rounded(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    f16 = load_file(convert_gguf(path, tmp_path / "f16", "float16", progress=False) / "model.safetensors")
    f32 = load_file(convert_gguf(path, tmp_path / "f32", "float32", progress=False) / "model.safetensors")
    for name, weight in f32.items():
        assert f16[name].dtype == np.float16
        np.testing.assert_array_equal(f16[name], weight.astype(np.float16), err_msg=name)


def test_unpermute_inverts_llama_cpp_permutation(rng):
    weight = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(weight, 3), 3), weight)
    bias = rng.standard_normal(3 * 8).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(bias, 3), 3), bias)


@pytest.mark.parametrize("pre", ["smollm", "default", "llama-bpe"])
def test_tokenizer_matches_transformers_gguf_tokenizer(tmp_path, pre):
    """Encode and decode like transformers' tokenizer built from the same GGUF. transformers does
    not apply llama-bpe's ignore_merges (llama.cpp does, and so do we), so it is switched on there."""
    from transformers import AutoTokenizer

    path = write_tiny_gguf(tmp_path / "tiny.gguf", pre=pre, add_bos=pre == "llama-bpe")
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    want = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    if pre == "llama-bpe":
        want.backend_tokenizer.model.ignore_merges = True
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    ours_auto = AutoTokenizer.from_pretrained(str(out))
    for text in STRINGS:
        ids = want.encode(text)
        assert ours.encode(text).ids == ids == ours_auto.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == want.decode(ids), text
    assert (ours.encode("hi").ids[0] == 1) is (pre == "llama-bpe")  # bos added only where the file says
    messages = [{"role": "user", "content": "hi"}]
    assert ours_auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        want.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def test_tokenizer_config(tmp_path):
    out = convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "hf", progress=False)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["additional_special_tokens"] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert config["chat_template"].startswith("{% for m in messages %}")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special] == config[
        "additional_special_tokens"
    ]


def test_smollm_keeps_digits_apart_despite_digit_merges(tmp_path):
    """SmolLM's split isolates every digit first (llama.cpp's ``smollm`` regex, SmolLM2's tokenizer.json)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", merges=MERGES + ("Ġ 1", "1 2"))
    tokenizer = Tokenizer.from_file(str(convert_gguf(path, tmp_path / "hf", progress=False) / "tokenizer.json"))
    assert tokenizer.encode("a 12").tokens == ["a", "Ġ", "1", "2"]


def test_llama3_rope_scaling_recovered_from_divisors():
    """Llama 3.1's parameters come back from the divisors llama.cpp stores."""
    divisors = llama3_rope_divisors(500000.0, 128, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    assert rope_scaling({}.get, "llama", 500000.0, 128, divisors) == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_llama3_rope_freqs_tensor_gives_the_same_frequencies_in_transformers(tmp_path):
    """A rope_freqs tensor becomes rope_scaling from which transformers computes the same frequencies
    (the file does not state the original context, so the recovered factors are scaled to 8192)."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = 100.0  # wavelengths close enough together that two of them are blended
    divisors = llama3_rope_divisors(theta, HEAD_DIM, 8.0, 1.0, 4.0, 256).astype(np.float32)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", theta=theta, extra={"rope_freqs.weight": (divisors, None)})
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")
    hf = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    base = theta ** -(np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    np.testing.assert_allclose(inv_freq.numpy(), base / divisors, rtol=1e-5)


def test_rope_scaling_metadata():
    meta = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    assert rope_scaling(meta.get, "llama", 1e4, 64, None) == {"rope_type": "linear", "factor": 4.0}
    meta = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 4096}
    assert rope_scaling(meta.get, "llama", 1e4, 64, None) == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert rope_scaling({"llama.rope.scaling.type": "none"}.get, "llama", 1e4, 64, None) is None
    with pytest.raises(ValueError, match="unsupported rope scaling type 'longrope'"):
        rope_scaling({"llama.rope.scaling.type": "longrope"}.get, "llama", 1e4, 64, None)
    with pytest.raises(ValueError, match="does not describe Llama-3 rope scaling"):
        rope_scaling({}.get, "llama", 1e4, 64, np.full(32, 2.0, np.float32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "falcon"}, "unsupported architecture 'falcon'"),
        ({"extra": {"blk.0.attn_q.weight": (np.ones((64, 64), np.int32), None)}},
         "unsupported tensor type I32 of tensor 'blk.0.attn_q.weight'"),
        ({"extra": {"blk.0.attn_q.bias": (np.ones(64, np.float32), None)}},
         "unsupported tensor 'blk.0.attn_q.bias' for the llama architecture"),
        ({"drop": ("blk.1.ffn_up.weight",)},
         "lacks 1 tensor(s) of a llama model, e.g. HF 'model.layers.1.mlp.up_proj.weight'"),
        ({"merges": MERGES + ("zz q",)}, "the GGUF vocabulary and merges do not form a BPE tokenizer"),
        ({"tokenizer_model": "llama"}, "unsupported tokenizer model 'llama'"),
        ({"pre": "qwen2"}, "unsupported tokenizer pre-tokenizer 'qwen2'"),
    ],
)
def test_unsupported_input_is_a_value_error_naming_it(tmp_path, kwargs, message):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_gguf(path, tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()  # checked before anything is written


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of float16, float32, got 'int8'"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "hf", dtype="int8")


def test_every_dequantizable_type_is_accepted():
    from infinilm_nb.convert.gguf import _dequantizable

    for kind in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.IQ4_NL):
        assert _dequantizable(kind), kind.name
    assert not _dequantizable(Q.I32) and not _dequantizable(gguf.GGMLQuantizationType.F64)


def test_convert_main(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert convert_main([str(path), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert load_file(tmp_path / "hf" / "model.safetensors")["model.norm.weight"].dtype == np.float32
    assert convert_main([str(write_tiny_gguf(tmp_path / "bad.gguf", arch="falcon")), str(tmp_path / "x")]) == 1
    assert "infinilm-nb convert: error: unsupported architecture 'falcon'" in capsys.readouterr().err
