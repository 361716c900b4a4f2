"""Offline throughput on a Llama-3-8B-shaped random-weight float16 model, beside HF transformers.

Usage: ``python bench/throughput.py [--out DIR] [--layers 32] [--requests 256] [--hf-requests 32]
[--hf-batch 32] [--no-hf] [--model-dir DIR]``.

``--requests`` requests whose prompt and output lengths are drawn uniformly from 100..1024 (a fixed
seed), EOS ignored, greedy, all submitted at once to ``LLM.generate``: output tokens/s and total time,
then again step by step (``async_scheduling`` off). The peer is HF transformers' batched greedy ``generate`` (left-padded batches of ``--hf-batch``, each
running to its longest output) on the first ``--hf-requests`` requests, counting only the tokens each
request asked for. Prints a table naming the GPU; writes ``throughput.json`` to DIR.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.model import free_gpu_memory, hf_generate, llama_config, load_hf, model_directory  # noqa: E402
from infinilm_nb import SamplingParams  # noqa: E402

LENGTHS = (100, 1024)  # inclusive range of prompt and output lengths
MAX_MODEL_LEN = 2 * LENGTHS[1]


def make_requests(count: int, vocab_size: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``count`` (prompt token ids, output length) pairs, lengths uniform in :data:`LENGTHS`."""
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(LENGTHS[0], LENGTHS[1] + 1, count)
    output_lens = rng.integers(LENGTHS[0], LENGTHS[1] + 1, count)
    return [(rng.integers(0, vocab_size, int(p)).tolist(), int(o)) for p, o in zip(prompt_lens, output_lens)]


def run_ours(directory: Path, requests: list[tuple[list[int], int]], args: argparse.Namespace) -> dict[str, float]:
    from infinilm_nb import LLM

    llm = LLM(directory, backend="cuda", dtype="float16", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=MAX_MODEL_LEN)
    warm = [{"prompt_token_ids": prompt} for prompt, _ in requests[:2]]
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    prompts = [{"prompt_token_ids": prompt} for prompt, _ in requests]
    params = [SamplingParams(max_tokens=out, temperature=0, ignore_eos=True) for _, out in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {
        "requests": len(requests),
        "seconds": seconds,
        "output_tokens": generated,
        "output_tok_s": generated / seconds,
        "total_tok_s": (generated + sum(len(p) for p, _ in requests)) / seconds,
        "preemptions": llm.scheduler.num_preemptions,
        "kv_blocks": llm.cache.num_blocks,
    }
    result["steps_ahead"] = llm.engine.steps_ahead
    # the same requests again step by step (each decode step launched once the previous tokens are back)
    llm.engine.async_scheduling = False
    start = time.perf_counter()
    again = llm.generate(prompts, params)
    result["step_by_step_output_tok_s"] = sum(len(o.outputs[0].token_ids) for o in again) / (time.perf_counter() - start)
    del llm, outputs, again
    free_gpu_memory()
    return result


def run_hf(directory: Path, requests: list[tuple[list[int], int]], batch: int) -> dict[str, float]:
    import torch

    model = load_hf(directory)
    warm = torch.ones((1, 8), dtype=torch.long, device="cuda")
    hf_generate(model, warm, torch.ones_like(warm), 2)
    seconds, counted = 0.0, 0
    for start in range(0, len(requests), batch):
        group = requests[start : start + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(group):  # left padding, as decoder-only generation needs
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        seconds += hf_generate(model, ids.to("cuda"), mask.to("cuda"), max(o for _, o in group))
        counted += sum(o for _, o in group)
    del model
    torch.cuda.empty_cache()
    return {"requests": len(requests), "batch": batch, "seconds": seconds, "output_tokens": counted,
            "output_tok_s": counted / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3-8B; fewer: quick runs)")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--hf-requests", type=int, default=32, help="requests given to HF transformers (it is slow)")
    parser.add_argument("--hf-batch", type=int, default=32)
    parser.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    parser.add_argument("--model-dir", type=Path, help="keep the random checkpoint here (reused if its config matches)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from bench.provenance import commit
    from bench.timing import gpu_name

    config = llama_config(args.layers)
    requests = make_requests(args.requests, config["vocab_size"])
    result: dict[str, Any] = {"gpu": gpu_name(), "date": str(datetime.date.today()), "commit": commit(),
                              "layers": args.layers, "lengths": LENGTHS}
    with model_directory(config, args.model_dir) as directory:
        result["ours"] = run_ours(directory, requests, args)
        if args.no_hf:
            result["hf_skipped"] = "--no-hf"
        else:
            try:
                result["hf"] = run_hf(directory, requests[: args.hf_requests], args.hf_batch)
            except Exception as error:  # the peer failing (no CUDA torch, no transformers) keeps our figures
                result["hf_skipped"] = f"{type(error).__name__}: {error}"
    (args.out / "throughput.json").write_text(json.dumps(result, indent=1))
    ours, hf = result["ours"], result.get("hf")
    print(f"\n{result['gpu']}  {result['date']}  commit {result['commit']}")
    print(f"model: Llama-3-8B shape, {args.layers} layers, float16; prompt and output lengths uniform in "
          f"{LENGTHS[0]}..{LENGTHS[1]}, greedy, EOS ignored")
    print(f"{'engine':<22} {'requests':>8} {'out tokens':>10} {'seconds':>8} {'out tok/s':>10}")
    print(f"{'infinilm-nb':<22} {ours['requests']:>8} {ours['output_tokens']:>10} {ours['seconds']:>8.1f} "
          f"{ours['output_tok_s']:>10.0f}")
    if hf is not None:
        print(f"{'HF transformers eager':<22} {hf['requests']:>8} {hf['output_tokens']:>10} {hf['seconds']:>8.1f} "
              f"{hf['output_tok_s']:>10.0f}   (batches of {hf['batch']}, left-padded)")
        print(f"speed-up: {ours['output_tok_s'] / hf['output_tok_s']:.1f}x HF transformers (on fewer requests)")
    else:
        print(f"HF transformers: skipped ({result['hf_skipped']})")
    print(f"{ours['preemptions']} preemptions; KV cache of {ours['kv_blocks']} blocks")
    print(f"{ours['steps_ahead']} decode steps launched ahead; step by step: "
          f"{ours['step_by_step_output_tok_s']:.0f} out tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
