"""The Llama runtime against transformers on the cpu backend, driven by hand-built StepInputs."""

from __future__ import annotations

import numpy as np
import pytest

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.cache import PagedKVCache, StaticKVCache
from infinilm_nb.runtime.llama import MODEL_REGISTRY, LlamaForCausalLM, Qwen2ForCausalLM, fold_norm_weights, load_model
from tests.helpers import rel_err
from infinilm_nb.runtime.weights import ModelWeights
from tests.runtime.hf_models import hf_greedy, hf_logits, load_hf_model, save_tiny_model
from tests.runtime.steps import CachedSeq, run_step

PROMPT = [5, 17, 99, 42, 7, 250, 3, 64, 128]
STEPS = 24


def make_cache(model: LlamaForCausalLM, kind: str, block_size: int = 4):
    if kind == "paged":
        return PagedKVCache(model.backend, model.config, 32, block_size, model.dtype)
    return StaticKVCache(model.backend, model.config, 3, 48, model.dtype)


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu")


def test_registry_maps_every_family(tiny_model_dir, cpu):
    model = load_model(tiny_model_dir, cpu, progress=False)
    assert type(model) is MODEL_REGISTRY[model.config.model_type]
    assert model.dtype == np.float32
    assert not model.hooks
    if model.config.model_type == "qwen2":
        assert isinstance(model, Qwen2ForCausalLM) and model.layers[0].self_attn.qkv_proj.bias is not None


@pytest.mark.parametrize("cache_kind", ["paged", "static"])
def test_greedy_matches_transformers(tiny_model_dir, tiny_hf_model, cpu, cache_kind):
    """Prefill logits and 24 greedy steps (teacher-forced with transformers' tokens) match."""
    model = load_model(tiny_model_dir, cpu, progress=False)
    want_tokens = hf_greedy(tiny_hf_model, PROMPT, STEPS)
    want_logits = hf_logits(tiny_hf_model, PROMPT + want_tokens[:-1])[len(PROMPT) - 1 :]
    seq = CachedSeq(make_cache(model, cache_kind), spacer=True)
    got = [run_step(model, [(seq, PROMPT)])[0]]
    for token in want_tokens[:-1]:
        got.append(run_step(model, [(seq, [token])])[0])
    got = np.stack(got)
    assert rel_err(got[0], want_logits[0]) < 1e-4
    assert rel_err(got, want_logits) < 1e-4
    assert got.argmax(axis=-1).tolist() == want_tokens


@pytest.mark.parametrize("cache_kind", ["paged", "static"])
def test_mixed_batch_equals_each_alone(tiny_model_dir, cpu, cache_kind):
    """One step holding a prefill and a decode gives each sequence the logits it gets alone."""
    model = load_model(tiny_model_dir, cpu, progress=False)
    prompt_b = [9, 8, 7, 6, 5]
    alone_a = run_step(model, [(CachedSeq(make_cache(model, cache_kind)), PROMPT)])[0]
    b = CachedSeq(make_cache(model, cache_kind))
    run_step(model, [(b, prompt_b)])
    alone_b = run_step(model, [(b, [11])])[0]

    cache = make_cache(model, cache_kind)
    a, b = CachedSeq(cache), CachedSeq(cache)
    run_step(model, [(b, prompt_b)])
    both = run_step(model, [(a, PROMPT), (b, [11])])
    assert rel_err(both[0], alone_a) < 1e-5
    assert rel_err(both[1], alone_b) < 1e-5
    # and then both decode together
    both = run_step(model, [(b, [12]), (a, [13])])
    assert np.all(np.isfinite(both))


def test_chunked_prefill_equals_whole_prefill(tiny_model_dir, cpu):
    model = load_model(tiny_model_dir, cpu, progress=False)
    whole = run_step(model, [(CachedSeq(make_cache(model, "paged")), PROMPT)])[0]
    seq = CachedSeq(make_cache(model, "paged", block_size=2))
    run_step(model, [(seq, PROMPT[:5])])
    chunked = run_step(model, [(seq, PROMPT[5:])])[0]
    assert rel_err(chunked, whole) < 1e-5


def test_tied_embeddings_match_transformers(tmp_path, cpu):
    directory = save_tiny_model(tmp_path, "qwen2", tie_word_embeddings=True, tokenizer=False)
    model = load_model(directory, cpu, progress=False)
    assert "lm_head" not in ModelWeights(directory, model.config, progress=False)
    assert model.lm_head.weight is model.embed_tokens.weight
    logits = run_step(model, [(CachedSeq(make_cache(model, "paged")), PROMPT)])[0]
    assert rel_err(logits, hf_logits(load_hf_model(directory), PROMPT)[-1]) < 1e-4


def test_float16_on_cpu_is_close(tiny_model_dir, tiny_hf_model, cpu):
    model = load_model(tiny_model_dir, cpu, dtype="float16", progress=False)
    logits = run_step(model, [(CachedSeq(make_cache(model, "paged")), PROMPT)])[0]
    assert logits.dtype == np.float32
    assert rel_err(logits, hf_logits(tiny_hf_model, PROMPT)[-1]) < 2e-2


@pytest.mark.parametrize("cache_kind", ["paged", "static"])
def test_bfloat16_on_cpu_is_close_and_generates(tiny_model_dir, tiny_hf_model, cpu, cache_kind):
    """dtype="bfloat16": weights, activations and the cache hold bfloat16 bits (uint16), logits come
    back float32; prefill and decode stay within bfloat16 error of transformers in float32."""
    model = load_model(tiny_model_dir, cpu, dtype="bfloat16", progress=False)
    assert model.dtype == np.uint16 and model.embed_tokens.weight.dtype == np.uint16
    seq = CachedSeq(make_cache(model, cache_kind))
    prefill = run_step(model, [(seq, PROMPT)])[0]
    decode = run_step(model, [(seq, [int(prefill.argmax())])])[0]
    assert prefill.dtype == np.float32
    assert rel_err(prefill, hf_logits(tiny_hf_model, PROMPT)[-1]) < 3e-2  # float16 here: ~1e-3
    assert rel_err(decode, hf_logits(tiny_hf_model, PROMPT + [int(prefill.argmax())])[-1]) < 3e-2


def test_model_rejects_bad_weight_dicts(tiny_model_dir, cpu):
    model = load_model(tiny_model_dir, cpu, progress=False)
    weights = dict(ModelWeights(tiny_model_dir, model.config, progress=False).items())
    bad = dict(weights, **{"layers.0.o_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"weight 'layers.0.o_proj.weight' has shape \(3, 3\), expected \(64, 64\)"):
        LlamaForCausalLM(model.config, cpu, bad)
    bad = {k: v for k, v in weights.items() if k != "norm"}
    with pytest.raises(ValueError, match=r"missing weight 'norm' \(expected shape \(64,\)\)"):
        LlamaForCausalLM(model.config, cpu, bad)
    bad = dict(weights, extra=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="unexpected weight 'extra'"):
        LlamaForCausalLM(model.config, cpu, bad)
    with pytest.raises(ValueError, match="dtype must be float16, float32 or bfloat16"):
        LlamaForCausalLM(model.config, cpu, weights, dtype="int8")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_norm_weights_fold_into_the_columns_of_qkv_and_gate_up(dtype):
    rng = np.random.default_rng(3)
    arrays = {f"layers.0.{name}": rng.standard_normal(shape).astype(dtype) for name, shape in (
        ("qkv_proj.weight", (6, 4)), ("gate_up_proj.weight", (8, 4)), ("o_proj.weight", (4, 4)),
        ("input_layernorm", (4,)), ("post_attention_layernorm", (4,)))}
    before = {name: array.copy() for name, array in arrays.items()}
    folded = fold_norm_weights(arrays, 1)
    for name, norm in (("qkv_proj.weight", "input_layernorm"), ("gate_up_proj.weight", "post_attention_layernorm")):
        want = (before[f"layers.0.{name}"].astype(np.float32) * before[f"layers.0.{norm}"].astype(np.float32)).astype(dtype)
        np.testing.assert_array_equal(folded[f"layers.0.{name}"], want)
    for name in ("o_proj.weight", "input_layernorm", "post_attention_layernorm"):
        assert folded[f"layers.0.{name}"] is arrays[f"layers.0.{name}"]
    for name, array in arrays.items():  # the caller's arrays are left as they were
        np.testing.assert_array_equal(array, before[name])
