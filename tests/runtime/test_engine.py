"""LLM / LLMEngine end to end on the cpu backend with a tiny random Llama, against transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from infinilm_nb import LLM, SamplingParams
from tests.runtime.hf_models import hf_greedy, load_hf_model

PROMPT = [5, 17, 99, 42, 7, 250, 3, 64, 128]
# eight prompts of different lengths (1 to 23 tokens)
PROMPTS = [[(7 * i + 3 * j) % 290 + 3 for j in range(n)] for i, n in enumerate([1, 9, 4, 23, 2, 13, 6, 17])]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)


def ids(prompt: list[int]) -> dict:
    return {"prompt_token_ids": prompt}


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(llama_dir, backend="cpu", max_model_len=64)


@pytest.fixture(scope="module")
def batched(llm: LLM) -> list[list[int]]:
    """Greedy tokens of PROMPTS run as one batch with no limits in the way."""
    return tokens(llm.generate([ids(p) for p in PROMPTS], GREEDY))


@pytest.fixture(scope="module")
def hf_tokens(llama_dir: Path) -> list[int]:
    return hf_greedy(load_hf_model(llama_dir), PROMPT, 24)


@pytest.mark.parametrize("cache", ["paged", "static"])
def test_greedy_matches_transformers(llama_dir: Path, hf_tokens: list[int], cache: str):
    want = hf_tokens
    llm = LLM(llama_dir, backend="cpu", cache=cache, block_size=4, max_model_len=64)
    out = llm.generate(ids(PROMPT), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == want  # and so paged equals static
    assert out.outputs[0].finish_reason == "length" and out.finished
    assert out.prompt_token_ids == PROMPT


def test_bfloat16_generates_in_a_batch_as_alone(llama_dir: Path):
    """dtype="bfloat16" end to end: batched prompts give the tokens each gives alone, seeded and greedy,
    and the first greedy token is transformers' (a clear argmax of this model)."""
    llm = LLM(llama_dir, backend="cpu", dtype="bfloat16", max_model_len=64)
    assert llm.model.dtype.name == "uint16"
    params = [GREEDY, SAMPLED, GREEDY]
    batch = tokens(llm.generate([ids(p) for p in PROMPTS[:3]], params))
    assert batch == [tokens(llm.generate(ids(p), q))[0] for p, q in zip(PROMPTS[:3], params)]
    assert all(len(t) == 8 for t in batch)
    first = llm.generate(ids(PROMPT), SamplingParams(max_tokens=1, temperature=0))[0].outputs[0].token_ids
    assert first == hf_greedy(load_hf_model(llama_dir), PROMPT, 1)


def test_batched_equals_each_alone(llm: LLM, batched: list[list[int]]):
    alone = [llm.generate(ids(p), GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_preemption_keeps_outputs(llama_dir: Path, batched: list[list[int]]):
    # 8 blocks of 4 tokens: one 32-token sequence fits, eight must take turns
    llm = LLM(llama_dir, backend="cpu", block_size=4, num_blocks=8, max_model_len=32)
    assert tokens(llm.generate([ids(p) for p in PROMPTS], GREEDY)) == batched
    assert llm.scheduler.num_preemptions > 0


def test_chunked_prefill_equals_whole_prefill(llama_dir: Path, batched: list[list[int]]):
    llm = LLM(llama_dir, backend="cpu", max_num_batched_tokens=5, max_model_len=64)
    assert tokens(llm.generate([ids(p) for p in PROMPTS], GREEDY)) == batched


def test_static_cache_batch_with_few_slots(llama_dir: Path, batched: list[list[int]]):
    llm = LLM(llama_dir, backend="cpu", cache="static", max_num_seqs=3, max_model_len=64)
    assert tokens(llm.generate([ids(p) for p in PROMPTS], GREEDY)) == batched


def test_seeded_sampling_reproduces(llm: LLM, llama_dir: Path):
    alone = llm.generate(ids(PROMPT), SAMPLED)[0].outputs[0].token_ids
    assert llm.generate(ids(PROMPT), SAMPLED)[0].outputs[0].token_ids == alone
    # in a batch, under preemption and chunked prefill, the seeded request still draws the same tokens
    squeezed = LLM(llama_dir, backend="cpu", block_size=4, num_blocks=8, max_model_len=32, max_num_batched_tokens=6)
    out = squeezed.generate([ids(p) for p in PROMPTS[:4]] + [ids(PROMPT)], [GREEDY] * 4 + [SAMPLED])
    assert out[-1].outputs[0].token_ids == alone and squeezed.scheduler.num_preemptions > 0
    other = llm.generate(ids(PROMPT), SamplingParams(**{**vars_of(SAMPLED), "seed": 99}))[0].outputs[0].token_ids
    assert other != alone
    # without a seed, the engine's seed decides: a new LLM with the same seed repeats itself
    unseeded = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    first = LLM(llama_dir, backend="cpu", max_model_len=64, seed=3).generate(ids(PROMPT), unseeded)
    second = LLM(llama_dir, backend="cpu", max_model_len=64, seed=3).generate(ids(PROMPT), unseeded)
    assert tokens(first) == tokens(second)


def vars_of(params: SamplingParams) -> dict:
    return {k: v for k, v in vars(params).items() if k != "stop_strings"}


def clean_window(text: str, width: int) -> str:
    """The first ``width`` characters of ``text`` after its third with no U+FFFD among them (the random
    model's text is mostly stray bytes)."""
    for start in range(3, len(text) - width):
        if "\ufffd" not in text[start : start + width]:
            return text[start : start + width]
    raise AssertionError(f"no clean window of {width} in {text!r}")


def test_text_and_stop_conditions(llm: LLM):
    full = llm.generate(ids(PROMPT), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
    assert full.text == llm.tokenizer.decode(full.token_ids)
    stop = clean_window(full.text, 2)
    cut = llm.generate(ids(PROMPT), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=["zzzz", stop]))
    out = cut[0].outputs[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert full.token_ids[: len(out.token_ids)] == out.token_ids

    token = full.token_ids[5]
    at = full.token_ids.index(token)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[token])
    out = llm.generate(ids(PROMPT), params)[0].outputs[0]
    assert out.token_ids == full.token_ids[: at + 1]  # the stop token is kept in the ids, not in the text
    assert (out.finish_reason, out.stop_reason) == ("stop", token)
    assert out.text == llm.tokenizer.decode(full.token_ids[:at])

    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = {token}
    try:
        out = llm.generate(ids(PROMPT), SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
        assert out.token_ids == full.token_ids[: at + 1] and out.finish_reason == "stop"
        out = llm.generate(ids(PROMPT), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].outputs[0]
        assert out.token_ids == full.token_ids
    finally:
        llm.engine.eos_token_ids = saved


def test_length_limits(llm: LLM):
    out = llm.generate(ids(PROMPT), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    long_prompt = PROMPT * 6  # 54 tokens of max_model_len 64
    out = llm.generate(ids(long_prompt), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 64 - 54 and out.outputs[0].finish_reason == "length"


def test_stream_equals_offline_text(llm: LLM):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    for p in (params, SamplingParams(**{**vars_of(params), "stop": "\ufffd\ufffd\ufffd never"})):
        want = llm.generate(ids(PROMPT), p)[0].outputs[0].text
        stream = llm.stream(ids(PROMPT), p)
        pieces = list(stream)
        assert "".join(pieces) == want and len(pieces) > 3
        assert stream.output.finished and stream.output.outputs[0].text == want
    # a stop string is never streamed, even in part
    stop = clean_window(want, 2)
    stream = llm.stream(ids(PROMPT), SamplingParams(**{**vars_of(params), "stop": stop}))
    assert "".join(stream) == want[: want.index(stop)]


def test_stream_closed_early_aborts(llm: LLM):
    stream = llm.stream(ids(PROMPT), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished() and not llm.scheduler.has_unfinished()


def test_text_prompt_and_chat(llm: LLM):
    out = llm.generate("The capital of France is", GREEDY)[0]
    assert out.prompt == "The capital of France is"
    assert out.prompt_token_ids == llm.tokenizer.encode("The capital of France is")

    conversation = [{"role": "user", "content": "Hello, how are you?"}]
    rendered = llm.tokenizer.apply_chat_template(conversation)
    chat = llm.chat([conversation, conversation + [{"role": "assistant", "content": "fine"}]], GREEDY)
    assert chat[0].prompt == rendered
    want = llm.generate(ids(llm.tokenizer.encode(rendered, add_special_tokens=False)), GREEDY)[0]
    assert chat[0].outputs[0].token_ids == want.outputs[0].token_ids
    assert chat[1].outputs[0].token_ids != chat[0].outputs[0].token_ids
    assert "".join(llm.stream(conversation, GREEDY, chat=True)) == chat[0].outputs[0].text


def test_too_long_prompt_fails_alone(llm: LLM, batched: list[list[int]]):
    outputs = llm.generate([ids(PROMPTS[0]), ids(PROMPT * 8), ids(PROMPTS[1])], GREEDY)
    assert outputs[1].outputs[0].finish_reason == "error" and outputs[1].finished
    assert "prompt has 72 tokens, more than max_model_len=64" in outputs[1].outputs[0].error
    assert outputs[1].outputs[0].token_ids == []
    assert tokens([outputs[0], outputs[2]]) == batched[:2]


def test_bad_requests_raise_before_any_work(llm: LLM):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(["fine", ""], GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(ids([]), GREEDY)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 300\), got \[300\]"):
        llm.generate(ids([1, 300]), GREEDY)
    with pytest.raises(ValueError, match="a prompt is a string or"):
        llm.generate([["not", "a", "prompt"]], GREEDY)
    with pytest.raises(ValueError, match=r"one per prompt \(2\), got 3 items"):
        llm.generate(["a", "b"], [GREEDY] * 3)
    with pytest.raises(ValueError, match=r"prompt is empty \(no tokens\) in request 'bare'"):
        llm.engine.add_request("bare", None, [], GREEDY)  # the engine's own entry, as bench/decode.py uses it
    assert not llm.engine.has_unfinished()


def test_bad_engine_options(llama_dir: Path):
    with pytest.raises(ValueError, match="cache must be one of paged, static, got 'ring'"):
        LLM(llama_dir, backend="cpu", cache="ring")
    with pytest.raises(ValueError, match=r"max_model_len must be in \[1, 256\]"):
        LLM(llama_dir, backend="cpu", max_model_len=1000)
    with pytest.raises(ValueError, match="num_blocks=3 of 4 tokens hold 12 tokens, fewer than one sequence of max_mo"):
        LLM(llama_dir, backend="cpu", block_size=4, num_blocks=3, max_model_len=64)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(llama_dir / "nowhere", backend="cpu")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file_is_named(llama_dir: Path, tmp_path: Path, missing: str):
    for path in llama_dir.iterdir():
        if path.name != missing:
            shutil.copy(path, tmp_path / path.name)
    with pytest.raises((FileNotFoundError, ValueError), match=missing.replace(".", r"\.")):
        LLM(tmp_path, backend="cpu")
