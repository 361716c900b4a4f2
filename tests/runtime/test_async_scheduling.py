"""async_scheduling: decode steps launched before the previous step's tokens come back give exactly
the outputs of the step-by-step engine, whatever stops, arrives, is aborted or is preempted between."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from infinilm_nb import LLM, SamplingParams
from tests.runtime.test_engine import PROMPTS, ids

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def completions(outputs: list) -> list[tuple[list[int], str, str | None]]:
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]


def pair(llama_dir: Path, **options: Any) -> tuple[LLM, LLM]:
    """The same engine step by step and with async scheduling (the default)."""
    return (LLM(llama_dir, backend="cpu", max_model_len=64, async_scheduling=False, **options),
            LLM(llama_dir, backend="cpu", max_model_len=64, **options))


def mixed_params(reference: list[list[int]], texts: list[str]) -> list[SamplingParams]:
    """Per prompt: greedy of several lengths, seeded sampling, and requests that stop mid-way on a
    token id or a string that the step-by-step run produces at its third to sixth token."""
    params = []
    for i, (tokens, text) in enumerate(zip(reference, texts)):
        kind = i % 4
        if kind == 0:
            params.append(SamplingParams(max_tokens=3 + i, temperature=0, ignore_eos=True))
        elif kind == 1:
            params.append(SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=i, ignore_eos=True))
        elif kind == 2:
            params.append(SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[tokens[3]]))
        else:
            stop = text[4:7] if len(text.strip()) >= 7 else None
            params.append(SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=[stop] if stop else None))
    return params


@pytest.mark.parametrize("cache", ["paged", "static"])
def test_async_scheduling_gives_the_same_outputs(llama_dir: Path, cache: str):
    sync, ahead = pair(llama_dir, cache=cache, block_size=4)
    first = sync.generate([ids(p) for p in PROMPTS], GREEDY)
    params = mixed_params([o.outputs[0].token_ids for o in first], [o.outputs[0].text for o in first])
    want = completions(sync.generate([ids(p) for p in PROMPTS], params))
    assert completions(ahead.generate([ids(p) for p in PROMPTS], params)) == want
    assert ahead.engine.steps_ahead > 0 and sync.engine.steps_ahead == 0
    assert {reason for _, _, reason in want} == {"length", "stop"}  # both kinds of stop happened mid-batch


def test_async_scheduling_with_every_slot_taken(llama_dir: Path):
    # two slots for eight requests: steps go on ahead while the others wait for a slot, also past a
    # request that stops on a token or a string (its slot then waits a step)
    sync, ahead = pair(llama_dir, max_num_seqs=2)
    first = sync.generate([ids(p) for p in PROMPTS], GREEDY)
    params = mixed_params([o.outputs[0].token_ids for o in first], [o.outputs[0].text for o in first])
    want = completions(sync.generate([ids(p) for p in PROMPTS], params))
    assert completions(ahead.generate([ids(p) for p in PROMPTS], params)) == want
    assert ahead.engine.steps_ahead > 0


def test_async_scheduling_under_preemption(llama_dir: Path):
    # 16 blocks of 4 tokens (one 64-token sequence): the eight take turns, and a step ahead sometimes
    # finds no free block
    sync, ahead = pair(llama_dir, block_size=4, num_blocks=16)
    want = completions(sync.generate([ids(p) for p in PROMPTS], GREEDY))
    assert completions(ahead.generate([ids(p) for p in PROMPTS], GREEDY)) == want
    assert ahead.scheduler.num_preemptions > 0 and ahead.engine.steps_ahead > 0


def run_with_arrivals_and_an_abort(llm: LLM) -> dict[str, tuple]:
    """Drive the engine by hand: two requests, more arriving after a few steps, one aborted."""
    engine = llm.engine
    for i in range(2):
        engine.add_request(f"r{i}", None, PROMPTS[i], GREEDY)
    finals: dict[str, tuple] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
        steps += 1
        if steps == 3:
            for i in range(2, 5):
                engine.add_request(f"r{i}", None, PROMPTS[i], GREEDY)
        if steps == 6:
            engine.abort("r1")
    return finals


def test_async_scheduling_with_arrivals_and_an_abort(llama_dir: Path):
    sync, ahead = pair(llama_dir, block_size=4)
    want = run_with_arrivals_and_an_abort(sync)
    assert run_with_arrivals_and_an_abort(ahead) == want
    assert "r1" not in want and set(want) == {"r0", "r2", "r3", "r4"}
    assert ahead.engine.steps_ahead > 0


def test_async_stream_equals_offline_text(llama_dir: Path):
    _, ahead = pair(llama_dir)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    stream = ahead.stream(ids(PROMPTS[3]), params)
    assert "".join(stream) == stream.output.outputs[0].text
    assert stream.output.outputs[0].token_ids == ahead.generate(ids(PROMPTS[3]), params)[0].outputs[0].token_ids
