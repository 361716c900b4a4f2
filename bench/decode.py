"""End-to-end decode of a Llama-3-8B-shaped random-weight float16 model, beside HF transformers.

Usage: ``python bench/decode.py [--out DIR] [--layers 32] [--prompt 128] [--tokens 256]
[--batches 8,32,64] [--long-prompt 2048] [--ablate] [--hf-tokens 64] [--no-hf] [--model-dir DIR]``.

Batch 1: tokens/s and ms/token of the decode phase, time to first token, and the weight-read roofline
(every weight byte once per step at the measured device-to-device copy bandwidth) with the share
reached; the host time per decode step (the step's wall time minus the GPU time of its CUDA graph,
replayed alone), and its parts (timed step by step). Then tokens/s at larger batches, batch 1 and the
largest batch sampled (temperature 0.8, top-p 0.9: :data:`SAMPLED`), batch 1 and the
largest batch again step by step (``async_scheduling`` off), the time to first token of one long prompt, how many 4K-token sequences the KV cache holds at
``gpu_memory_utilization=0.9``, with ``--ablate`` the GPU time of a batch-1 step with each fusion
undone and with PDL switched (:mod:`bench.ablation`), and HF transformers (PyTorch eager, its default attention, float16,
greedy ``generate``) on the same GPU in the same run, with fewer new tokens. Prints a table naming the
GPU; writes ``decode.json`` to DIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.model import free_gpu_memory, hf_generate, llama_config, load_hf, model_directory, weight_bytes  # noqa: E402
from infinilm_nb import SamplingParams  # noqa: E402

CONTEXT = 4096  # the sequence length of the memory report
UTILIZATION = 0.9
H100_80GB_BYTES = 81559 * 2**20  # what an H100 80GB reports as its total memory


# the sampled rows' settings (a chat model's usual ones): the sampler searches each row's top-p cut-off
SAMPLED = {"temperature": 0.8, "top_p": 0.9}


def run_batch(
    llm: Any, batch: int, prompt_len: int, new_tokens: int, seed: int = 0, sampling: dict[str, float] | None = None,
) -> dict[str, float]:
    """Drive the engine through ``batch`` random prompts of ``prompt_len`` tokens, ``new_tokens`` each
    (greedy, or with the ``sampling`` settings; EOS ignored), timing every step. The decode phase
    starts once every sequence has its first token."""
    engine = llm.engine
    rng = np.random.default_rng(seed)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, **(sampling or {"temperature": 0}))
    for i in range(batch):
        prompt = rng.integers(0, llm.model.config.vocab_size, prompt_len).tolist()
        engine.add_request(f"bench-{batch}-{i}", None, prompt, params)
    started: set[str] = set()
    decode_steps: list[float] = []
    first_token = None
    start = time.perf_counter()
    while engine.has_unfinished():
        step_start = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        if first_token is not None:
            decode_steps.append(now - step_start)
        started.update(o.request_id for o in outputs)
        if first_token is None and len(started) == batch:
            first_token = now - start
    total = time.perf_counter() - start
    decode = total - first_token
    return {
        "batch": batch,
        "ttft_ms": 1e3 * first_token,
        "total_s": total,
        "tok_s": batch * new_tokens / total,
        "decode_tok_s": batch * (new_tokens - 1) / decode,
        "ms_per_step": 1e3 * median(decode_steps),
    }


def graph_step_seconds(llm: Any, batch: int, reps: int = 50) -> float:
    """GPU seconds of one decode step of ``batch`` sequences: its CUDA graph replayed back to back."""
    import cupy

    graphs, stream = llm.engine.graphs, cupy.cuda.get_current_stream()
    graphs.replay(batch)
    stream.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(reps):
        graphs.replay(batch)
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / reps


def _timed(record: dict[str, float], name: str, function: Any) -> Any:
    """``function``, adding each call's seconds to ``record[name]``."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record[name] = record.get(name, 0.0) + time.perf_counter() - start
    return wrapper


def host_breakdown(llm: Any, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """Microseconds per batch-1 decode step spent in each part of the engine's host path, timed by
    wrapping the parts on this engine's instances: schedule, sampling parameters, the graph inputs'
    fill and upload, the wait for the tokens (GPU time included), the update, detokenize + stop checks,
    and the graphs' ``decode`` as a whole (its remainder is the graph launch and the token download's
    enqueueing). ``decode`` runs decode steps only: the prefill's eager forward is not in it."""
    engine, graphs = llm.engine, llm.engine.graphs
    overlapped, engine.async_scheduling = engine.async_scheduling, False  # the parts in order, each waited for
    record: dict[str, float] = {}
    wrapped = {"schedule": (engine.scheduler, "schedule"), "sampling": (engine, "_sampling"),
               "decode": (graphs, "decode"), "fill": (graphs, "_fill"), "wait": (graphs, "wait"),
               "update": (engine.scheduler, "update"), "detokenize": (engine, "_check_stop")}
    for name, (owner, method) in wrapped.items():
        setattr(owner, method, _timed(record, name, getattr(owner, method)))
    for size, bucket in graphs._buckets.items():
        bucket.inputs.upload = _timed(record, "upload", bucket.inputs.upload)
    try:
        run_batch(llm, 1, prompt_len, 2, seed=97)  # the prefill and first step, then the parts from zero
        record.clear()
        row = run_batch(llm, 1, prompt_len, new_tokens + 1, seed=96)
    finally:
        for owner, method in wrapped.values():
            delattr(owner, method)  # the class's method again
        for bucket in graphs._buckets.values():
            del bucket.inputs.upload
        engine.async_scheduling = overlapped
    steps = new_tokens + 1  # the prefill step's parts are in too: per step, near enough
    parts = {name: 1e6 * seconds / steps for name, seconds in record.items()}
    parts["launch"] = parts["decode"] - parts["fill"] - parts["upload"] - parts["wait"]
    parts["step"] = 1e3 * row["ms_per_step"]
    return parts


def kv_capacity(llm: Any) -> dict[str, float]:
    """Sequences of :data:`CONTEXT` tokens the KV cache holds, here and (estimated) on an H100 80GB:
    the same bytes outside the cache, ``UTILIZATION`` of that card's memory."""
    import cupy

    from infinilm_nb.runtime.cache import block_bytes

    cache = llm.cache
    per_block = block_bytes(llm.model.config, cache.block_size, llm.dtype)
    kv = cache.num_blocks * per_block
    total = cupy.cuda.runtime.memGetInfo()[1]
    outside = UTILIZATION * total - kv  # weights, activations, CUDA context: what the sizing saw in use
    per_seq = per_block * CONTEXT / cache.block_size
    return {
        "kv_gib": kv / 2**30,
        "sequences": int(kv // per_seq),
        "sequences_h100_80gb": int(max(0.0, UTILIZATION * H100_80GB_BYTES - outside) // per_seq),
        "gpu_gib": total / 2**30,
    }


def hf_decode(directory: Path, prompt_len: int, new_tokens: int, long_prompt: int, seed: int = 0) -> dict[str, float]:
    """transformers at batch 1: time to first token (also of a ``long_prompt``-token prompt) and
    decode tokens/s of greedy ``generate``."""
    import torch

    model = load_hf(directory)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator).to("cuda")
    mask = torch.ones_like(ids)
    hf_generate(model, ids, mask, 4)  # warm-up
    first = median(hf_generate(model, ids, mask, 1) for _ in range(3))
    total = hf_generate(model, ids, mask, new_tokens)
    long_ids = torch.randint(0, model.config.vocab_size, (1, long_prompt), generator=generator).to("cuda")
    hf_generate(model, long_ids, torch.ones_like(long_ids), 1)  # warm-up
    long_first = median(hf_generate(model, long_ids, torch.ones_like(long_ids), 1) for _ in range(3))
    del model
    torch.cuda.empty_cache()
    return {"tokens": new_tokens, "ttft_ms": 1e3 * first, "long_ttft_ms": 1e3 * long_first, "decode_tok_s": (new_tokens - 1) / (total - first),
            "ms_per_token": 1e3 * (total - first) / (new_tokens - 1)}


def measure(args: argparse.Namespace, directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    from bench.timing import copy_bandwidth
    from infinilm_nb import LLM

    bandwidth = copy_bandwidth()
    llm = LLM(directory, backend="cuda", dtype="float16", max_num_seqs=max([1, *args.batches]),
              max_model_len=CONTEXT, gpu_memory_utilization=UTILIZATION)
    run_batch(llm, 1, args.prompt, 8, seed=99)  # warm-up: compiles the prefill kernels
    single = run_batch(llm, 1, args.prompt, args.tokens)
    # one first token is one sample (49 ms in one H100 run, 73 ms in the next): take a median
    single["ttft_ms"] = median(run_batch(llm, 1, args.prompt, 2, seed=seed)["ttft_ms"] for seed in range(3))
    floor = weight_bytes(config) / bandwidth
    single["roofline_tok_s"] = 1 / floor
    single["roofline_pct"] = 100 * floor / (single["ms_per_step"] / 1e3)
    gpu = graph_step_seconds(llm, 1)
    single["gpu_ms_per_step"] = 1e3 * gpu
    single["host_us_per_step"] = 1e6 * (single["ms_per_step"] / 1e3 - gpu)
    single["host_pct"] = 100 * (1 - gpu / (single["ms_per_step"] / 1e3))
    single["host_parts_us"] = host_breakdown(llm, args.prompt, 64)
    run_batch(llm, 1, args.long_prompt, 2, seed=98)  # warm-up at the long prompt's shapes
    long_ttft = median(run_batch(llm, 1, args.long_prompt, 2, seed=seed)["ttft_ms"] for seed in range(3))
    batches = []
    for batch in args.batches:
        # warm-up: the first steps of a new batch size can use kernel variants nothing compiled yet
        # (a batch-32 first token once took 4.6 s, 254 ms in the run before)
        run_batch(llm, batch, args.prompt, 2, seed=batch + 1000)
        row = run_batch(llm, batch, args.prompt, args.tokens, seed=batch)
        gpu = graph_step_seconds(llm, batch)
        row["host_pct"] = 100 * (1 - gpu / (row["ms_per_step"] / 1e3))
        batches.append(row)
    # batch 1 and the largest batch again, sampled: what the sampler's search adds to a step
    sampled = []
    for batch in (1, max(args.batches, default=1)):
        row = run_batch(llm, batch, args.prompt, args.tokens, seed=batch, sampling=SAMPLED)
        row["host_pct"] = 100 * (1 - graph_step_seconds(llm, batch) / (row["ms_per_step"] / 1e3))
        sampled.append(dict(row, sampling=SAMPLED))
    # the same engine step by step: each step launched only once the previous tokens are on the host
    llm.engine.async_scheduling = False
    step_by_step = []
    for batch in (1, max(args.batches, default=1)):
        row = run_batch(llm, batch, args.prompt, args.tokens, seed=batch)
        row["host_pct"] = 100 * (1 - graph_step_seconds(llm, batch) / (row["ms_per_step"] / 1e3))
        step_by_step.append(row)
    step_by_step[0]["roofline_pct"] = 100 * floor / (step_by_step[0]["ms_per_step"] / 1e3)
    llm.engine.async_scheduling = True
    memory = kv_capacity(llm)
    del llm
    free_gpu_memory()
    result = {"copy_gbps": bandwidth / 1e9, "weight_gb": weight_bytes(config) / 1e9, "batch1": single,
              "batches": batches, "sampled": sampled, "step_by_step": step_by_step, "memory": memory,
              "long_prompt_ttft_ms": long_ttft}
    if args.ablate:
        result["ablation_gpu_ms"] = ablation_ms(args, directory)
    return result


def ablation_ms(args: argparse.Namespace, directory: Path) -> dict[str, float]:
    """GPU milliseconds of a batch-1 decode step (its graph replayed) with every fusion, then with
    each undone (:func:`bench.ablation.ablate`)."""
    from bench.ablation import ablate
    from infinilm_nb import LLM

    def make_llm() -> Any:
        free_gpu_memory()
        return LLM(directory, backend="cuda", dtype="float16", max_num_seqs=1, max_model_len=CONTEXT,
                   gpu_memory_utilization=0.5)

    def step_ms(llm: Any) -> float:
        run_batch(llm, 1, args.prompt, 8, seed=99)  # real inputs in the batch-1 graph's buffers
        return 1e3 * graph_step_seconds(llm, 1)

    return ablate(step_ms, make_llm)


def print_report(result: dict[str, Any]) -> None:
    s, m = result["batch1"], result["memory"]
    print(f"\n{result['title']}")
    print(f"model: Llama-3-8B shape, {result['layers']} layers, float16, {result['weight_gb']:.2f} GB of weights; "
          f"prompt {result['prompt']} tokens, {result['tokens']} new tokens, greedy")
    print(f"{'engine':<22} {'batch':>5} {'tok/s':>9} {'ms/token':>9} {'TTFT ms':>8} {'% roof':>7} {'host %':>7}")
    print(f"{'infinilm-nb':<22} {1:>5} {s['decode_tok_s']:>9.1f} {s['ms_per_step']:>9.2f} {s['ttft_ms']:>8.1f} "
          f"{s['roofline_pct']:>6.1f}% {s['host_pct']:>6.1f}%")
    for row in result["batches"]:
        print(f"{'infinilm-nb':<22} {row['batch']:>5} {row['decode_tok_s']:>9.1f} {row['ms_per_step']:>9.2f} "
              f"{row['ttft_ms']:>8.1f} {'-':>7} {row['host_pct']:>6.1f}%")
    for row in result.get("sampled", []):
        sampled = ", ".join(f"{name} {value}" for name, value in row["sampling"].items())
        print(f"{'  ' + sampled:<22} {row['batch']:>5} {row['decode_tok_s']:>9.1f} {row['ms_per_step']:>9.2f} "
              f"{row['ttft_ms']:>8.1f} {'-':>7} {row['host_pct']:>6.1f}%")
    for row in result.get("step_by_step", []):
        roof = f"{row['roofline_pct']:>6.1f}%" if "roofline_pct" in row else f"{'-':>7}"
        print(f"{'  step by step':<22} {row['batch']:>5} {row['decode_tok_s']:>9.1f} {row['ms_per_step']:>9.2f} "
              f"{row['ttft_ms']:>8.1f} {roof} {row['host_pct']:>6.1f}%")
    hf = result.get("hf")
    if hf is not None:
        print(f"{'HF transformers eager':<22} {1:>5} {hf['decode_tok_s']:>9.1f} {hf['ms_per_token']:>9.2f} "
              f"{hf['ttft_ms']:>8.1f}   ({hf['tokens']} new tokens)")
        print(f"speed-up at batch 1: {s['decode_tok_s'] / hf['decode_tok_s']:.1f}x HF transformers")
    else:
        print(f"HF transformers: skipped ({result.get('hf_skipped')})")
    long = f"time to first token, {result['long_prompt']}-token prompt: {result['long_prompt_ttft_ms']:.1f} ms"
    if hf is not None and "long_ttft_ms" in hf:
        long += f"; HF transformers {hf['long_ttft_ms']:.1f} ms"
    print(long)
    ablation = result.get("ablation_gpu_ms")
    if ablation:
        fused = ablation["fused"]
        saved = ", ".join(f"{name} {ms - fused:+.3f} ms ({100 * (ms - fused) / fused:+.1f}%)"
                          for name, ms in ablation.items() if name != "fused")
        print(f"batch-1 step GPU time {fused:.3f} ms with every fusion; each undone, then each switch "
              f"(bench/ablation.py): {saved}")
    print(f"roofline: {s['roofline_tok_s']:.0f} tok/s (weights / copy bandwidth {result['copy_gbps']:.0f} GB/s); "
          f"host per decode step {s['host_us_per_step']:.0f} us of {s['ms_per_step']:.2f} ms "
          f"(GPU {s['gpu_ms_per_step']:.2f} ms)")
    parts = s.get("host_parts_us")
    if parts:
        shown = ("schedule", "sampling", "fill", "upload", "launch", "wait", "update", "detokenize")
        print("batch-1 step, host parts (us): " + ", ".join(f"{name} {parts[name]:.0f}" for name in shown)
              + f"; wait minus GPU {parts['wait'] - 1e3 * s['gpu_ms_per_step']:.0f}")
    print(f"KV cache at gpu_memory_utilization={UTILIZATION}: {m['kv_gib']:.1f} GiB of {m['gpu_gib']:.1f} GiB = "
          f"{m['sequences']} sequences of {CONTEXT} tokens (an H100 80GB: ~{m['sequences_h100_80gb']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3-8B; fewer: quick runs)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per sequence")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",") if b], default=[8, 32, 64],
                        help="comma-separated batch sizes measured after batch 1")
    parser.add_argument("--long-prompt", type=int, default=2048, help="prompt tokens of the time-to-first-token run")
    parser.add_argument("--ablate", action="store_true", help="time a batch-1 step with each fusion undone, and with PDL switched")
    parser.add_argument("--hf-tokens", type=int, default=64, help="new tokens for HF transformers (it is slow)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--model-dir", type=Path, help="keep the random checkpoint here (reused if its config matches)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from bench.provenance import commit
    from bench.timing import gpu_name

    config = llama_config(args.layers)
    with model_directory(config, args.model_dir) as directory:
        result = measure(args, directory, config)
        if args.no_hf:
            result["hf_skipped"] = "--no-hf"
        else:
            try:
                result["hf"] = hf_decode(directory, args.prompt, args.hf_tokens, args.long_prompt)
            except Exception as error:  # the peer failing (no CUDA torch, no transformers) keeps our figures
                result["hf_skipped"] = f"{type(error).__name__}: {error}"
    result.update(gpu=gpu_name(), date=str(datetime.date.today()), commit=commit(), layers=args.layers,
                  prompt=args.prompt, tokens=args.tokens, long_prompt=args.long_prompt)
    result["title"] = f"{result['gpu']}  {result['date']}  commit {result['commit']}"
    (args.out / "decode.json").write_text(json.dumps(result, indent=1))
    print_report(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
