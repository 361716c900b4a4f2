"""Tensor-parallel sharding in one process: which slices each rank reads, and the size checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.config import ModelConfig, ParallelConfig
from infinilm_nb.runtime.llama import LlamaForCausalLM, load_model
from infinilm_nb.runtime.weights import ModelWeights
from tests.runtime.hf_models import TINY, TP_TINY, save_tiny_model


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 q heads / 6 KV heads of 8, qwen2 (biases on q, k, v), tied embeddings."""
    return save_tiny_model(tmp_path_factory.mktemp("gqa"), "qwen2", tokenizer=False, tie_word_embeddings=True, **TP_TINY)


def load(directory: Path, parallel: ParallelConfig) -> dict[str, np.ndarray]:
    return dict(ModelWeights(directory, ModelConfig.from_pretrained(directory), progress=False, parallel=parallel).items())


@pytest.mark.parametrize("ranks", [2, 3, 4, 6, 12])
def test_each_rank_reads_its_heads_ffn_and_vocabulary(gqa_dir: Path, ranks: int):
    config = ModelConfig.from_pretrained(gqa_dir)
    whole = load(gqa_dir, ParallelConfig())
    if ranks == 4:
        with pytest.raises(ValueError, match=r"size 4 does not fit num_key_value_heads \(6\)"):
            load(gqa_dir, ParallelConfig(4, 1))
        return
    d, q, kv = config.head_dim, config.q_size, config.kv_size
    heads, group = 12 // ranks, 2  # q heads per rank; q heads per KV head
    parts = [load(gqa_dir, ParallelConfig(ranks, r)) for r in range(ranks)]
    for r, part in enumerate(parts):
        rows = np.arange(r * heads * d, (r + 1) * heads * d)
        kv_heads = range(r * heads // group, r * heads // group + max(1, 6 // ranks))
        kv_rows = np.concatenate([np.arange(h * d, (h + 1) * d) for h in kv_heads])
        for name in ("layers.1.qkv_proj.weight", "layers.1.qkv_proj.bias"):
            full = whole[name]
            want = np.concatenate([full[rows], full[q + kv_rows], full[q + kv + kv_rows]])
            np.testing.assert_array_equal(part[name], want)
        np.testing.assert_array_equal(part["layers.0.o_proj.weight"], whole["layers.0.o_proj.weight"][:, rows])
        ffn = slice(r * 96 // ranks, (r + 1) * 96 // ranks)
        gate_up = whole["layers.0.gate_up_proj.weight"]
        np.testing.assert_array_equal(part["layers.0.gate_up_proj.weight"], np.concatenate([gate_up[:96][ffn], gate_up[96:][ffn]]))
        np.testing.assert_array_equal(part["layers.0.down_proj.weight"], whole["layers.0.down_proj.weight"][:, ffn])
        np.testing.assert_array_equal(part["embed_tokens"], whole["embed_tokens"][r * 300 // ranks : (r + 1) * 300 // ranks])
        np.testing.assert_array_equal(part["norm"], whole["norm"])
        assert "lm_head" not in part  # tied: the lm_head shard is the embedding shard
        assert all(a.flags.c_contiguous for a in part.values())


def test_replicated_kv_heads_follow_their_query_heads(gqa_dir: Path):
    """12 ranks > 6 KV heads: ranks 2k and 2k + 1 (query heads 2k, 2k + 1) both read KV head k."""
    whole = load(gqa_dir, ParallelConfig())["layers.0.qkv_proj.weight"]
    k_rows = lambda head: whole[96 + 8 * head : 96 + 8 * (head + 1)]  # noqa: E731
    for r in range(12):
        part = load(gqa_dir, ParallelConfig(12, r))["layers.0.qkv_proj.weight"]
        np.testing.assert_array_equal(part[8:16], k_rows(r // 2))


@pytest.mark.parametrize(
    "change,ranks,message",
    [
        ({}, 5, r"tensor parallel size 5 does not divide num_attention_heads \(12\); sizes that fit this model: 1, 2, 3, 6, 12"),
        ({"intermediate_size": 100}, 3, r"size 3 does not divide intermediate_size \(100\)"),
        ({"vocab_size": 301}, 2, r"size 2 does not divide vocab_size \(301\)"),
        ({"num_key_value_heads": 4}, 6, r"size 6 does not fit num_key_value_heads \(4\): it must divide them, or be a multiple"),
    ],
)
def test_rank_counts_that_do_not_split_the_model_are_named(change, ranks, message):
    config = ModelConfig.from_dict(
        dict(TINY, **TP_TINY, model_type="llama", hidden_act="silu") | change, source="cfg"
    )
    with pytest.raises(ValueError, match=message):
        ParallelConfig(ranks, 0).check(config, "cfg")


def test_the_model_checks_the_rank_count_before_reading_weights(gqa_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ModelWeights, "__getitem__", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(ValueError, match=r"size 5 does not divide num_attention_heads \(12\)"):
        ModelWeights(gqa_dir, ModelConfig.from_pretrained(gqa_dir), progress=False, parallel=ParallelConfig(5, 4))


def test_a_sharded_model_needs_its_group(gqa_dir: Path):
    config = ModelConfig.from_pretrained(gqa_dir)
    weights = ModelWeights(gqa_dir, config, progress=False, parallel=ParallelConfig(2, 1))
    with pytest.raises(ValueError, match="tp_size=2 needs a CommunicationGroup of as many ranks"):
        LlamaForCausalLM(config, get_backend("cpu"), weights, parallel=ParallelConfig(2, 1))
    model = load_model(gqa_dir, "cpu", progress=False)
    assert model.shard_config is model.config  # one rank: nothing is split
