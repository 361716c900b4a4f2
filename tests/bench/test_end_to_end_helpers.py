"""The end-to-end benchmarks' CPU-side helpers: the random checkpoint, request lengths, the step timer."""

from __future__ import annotations

import numpy as np
import pytest

from bench import decode, throughput
from bench.model import hf_tensors, llama_config, plan_shards, weight_bytes, write_random_llama
from infinilm_nb import LLM
from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.cache import PagedKVCache
from infinilm_nb.runtime.llama import load_model
from tests.helpers import rel_err
from tests.runtime.hf_models import hf_logits, load_hf_model
from tests.runtime.steps import CachedSeq, run_step

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=256)


def test_llama3_8b_shape_and_shards():
    config = llama_config()
    assert weight_bytes(config) == 2 * 8_030_261_248  # Llama-3-8B's parameters, float16
    tensors = hf_tensors(config)
    assert len(tensors) == 2 + 32 * 9 + 1 and tensors[0] == ("model.embed_tokens.weight", (128256, 4096))
    shards = plan_shards(tensors, 4 << 30)
    assert [name for shard in shards for name in shard] == [name for name, _ in tensors]
    assert len(shards) == 4 and all(shards)


def test_plan_shards_keeps_order_and_limit():
    tensors = [("a", (10,)), ("b", (20,)), ("c", (100,)), ("d", (5,))]
    assert plan_shards(tensors, 70) == [["a", "b"], ["c"], ["d"]]
    assert plan_shards(tensors, 1000) == [["a", "b", "c", "d"]]


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    config = llama_config(2, **TINY)
    return write_random_llama(tmp_path_factory.mktemp("random"), config, shard_bytes=100_000)


def test_random_checkpoint_loads_here_and_in_transformers(random_dir):
    assert len(list(random_dir.glob("model-*-of-*.safetensors"))) > 1
    model = load_model(random_dir, get_backend("cpu"), dtype=np.float32, progress=False)
    prompt = [5, 17, 99, 42, 7, 250]
    ours = run_step(model, [(CachedSeq(PagedKVCache(model.backend, model.config, 4, 4, model.dtype)), prompt)])[0]
    assert rel_err(ours, hf_logits(load_hf_model(random_dir), prompt)[-1]) < 1e-4


def test_run_batch_times_a_generation(random_dir):
    llm = LLM(random_dir, backend="cpu", max_num_seqs=4, max_model_len=64)
    row = decode.run_batch(llm, 3, prompt_len=5, new_tokens=6)
    assert row["batch"] == 3 and 0 < row["ttft_ms"] < 1e3 * row["total_s"]
    assert row["decode_tok_s"] > 0 and row["ms_per_step"] > 0
    assert llm.tokenizer.decode([0, 299]) == "t0 t299"
    assert not llm.engine.has_unfinished()
    sampled = decode.run_batch(llm, 2, prompt_len=5, new_tokens=6, sampling=decode.SAMPLED)
    assert sampled["batch"] == 2 and sampled["decode_tok_s"] > 0
    assert not llm.engine.has_unfinished()


def test_requests_are_seeded_and_in_range():
    requests = throughput.make_requests(256, 1000)
    assert requests == throughput.make_requests(256, 1000)
    prompts = [len(p) for p, _ in requests]
    outputs = [o for _, o in requests]
    for lengths in (prompts, outputs):
        assert min(lengths) >= 100 and max(lengths) <= 1024 and np.std(lengths) > 200
    assert max(max(p) for p, _ in requests) < 1000


def test_host_breakdown_times_each_part_and_unwraps_them(random_dir):
    llm = LLM(random_dir, backend="cpu", max_num_seqs=2, max_model_len=64)
    engine, graphs = llm.engine, llm.engine.graphs
    parts = decode.host_breakdown(llm, prompt_len=5, new_tokens=6)
    for name in ("schedule", "sampling", "fill", "upload", "wait", "update", "detokenize", "decode", "step"):
        assert parts[name] > 0, name
    assert parts["decode"] >= parts["fill"] + parts["upload"] + parts["wait"]
    assert engine.async_scheduling  # the engine's setting again after the step-by-step timing
    assert "decode" not in vars(graphs) and "_fill" not in vars(graphs) and "schedule" not in vars(engine.scheduler)
    assert all("upload" not in vars(bucket.inputs) for bucket in graphs._buckets.values())
