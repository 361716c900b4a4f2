"""The ``infinilm-nb`` command: a small dispatcher of subcommands.

Each subcommand is a function that adds its parser to the subparsers and sets ``run`` to the function
that executes it (returning the exit status); :data:`SUBCOMMANDS` lists them, in ``--help`` order.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

Subcommand = Callable[["argparse._SubParsersAction"], None]


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help="an HF model directory (config.json, safetensors, tokenizer.json) or a .gguf file (converted once "
        "into the cache); default: the embedded SmolLM2-135M-Instruct, fetched once",
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "cpu", "sim"])
    parser.add_argument("--cache", default="paged", choices=["paged", "static"])
    parser.add_argument(
        "--dtype", default=None, choices=["float16", "float32", "bfloat16"], help="default: float16 on cuda, else float32"
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def _load(args: argparse.Namespace):
    """The LLM and the SamplingParams the options describe."""
    from . import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    llm = LLM(args.model, backend=args.backend, dtype=args.dtype, cache=args.cache, max_model_len=args.max_model_len)
    return llm, params


def _print_stream(stream) -> str:
    """Write a TextStream's pieces to stdout as they come, then its speeds to stderr; return the text."""
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    output = stream.output
    prompt_tokens = len(output.prompt_token_ids)
    generated = len(output.outputs[0].token_ids)
    first = stream.time_to_first_token or 0.0
    decode_time = stream.elapsed - first
    prompt_rate = prompt_tokens / first if first > 0 else float("nan")
    decode_rate = (generated - 1) / decode_time if generated > 1 and decode_time > 0 else float("nan")
    print(
        f"prompt: {prompt_tokens} tokens, {prompt_rate:.1f} tokens/s; "
        f"generation: {generated} tokens, {decode_rate:.1f} tokens/s",
        file=sys.stderr,
    )
    if output.outputs[0].finish_reason == "error":
        print(f"infinilm-nb: error: {output.outputs[0].error}", file=sys.stderr)
    return output.outputs[0].text


def _generate(args: argparse.Namespace) -> int:
    llm, params = _load(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    stream = llm.stream(prompt, params, chat=args.chat)
    _print_stream(stream)
    return 1 if stream.output.outputs[0].finish_reason == "error" else 0


def add_generate(subparsers: "argparse._SubParsersAction") -> None:
    parser = subparsers.add_parser("generate", help="complete one prompt, streaming the text to stdout")
    _add_model_options(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.set_defaults(run=_generate)


def _chat(args: argparse.Namespace) -> int:
    llm, params = _load(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: type a message, /exit (or end of input) to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        stream = llm.stream(history, params, chat=True)
        reply = _print_stream(stream)
        if stream.output.outputs[0].finish_reason == "error":
            history.pop()  # e.g. the conversation outgrew max_model_len: this turn is dropped
        else:
            history.append({"role": "assistant", "content": reply})
    return 0


def add_chat(subparsers: "argparse._SubParsersAction") -> None:
    parser = subparsers.add_parser("chat", help="talk with a model; the conversation is kept between turns")
    _add_model_options(parser)
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.set_defaults(run=_chat)


def add_demo(subparsers: "argparse._SubParsersAction") -> None:
    from .demo import add_demo_arguments, demo_main

    parser = subparsers.add_parser(
        "demo", help="fetch the embedded model and answer a question with mpirun-launched inference"
    )
    add_demo_arguments(parser)
    parser.set_defaults(run=demo_main)


def add_convert(subparsers: "argparse._SubParsersAction") -> None:
    from .convert.commands import add_convert_arguments, convert_main

    parser = subparsers.add_parser("convert", help="convert a llama-architecture GGUF file into an HF directory")
    add_convert_arguments(parser)
    parser.set_defaults(run=convert_main)


def add_fetch(subparsers: "argparse._SubParsersAction") -> None:
    from .convert.commands import add_fetch_arguments, fetch_main

    parser = subparsers.add_parser("fetch", help="download and convert the embedded default model")
    add_fetch_arguments(parser)
    parser.set_defaults(run=fetch_main)


SUBCOMMANDS: list[Subcommand] = [add_generate, add_chat, add_demo, add_convert, add_fetch]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinilm-nb", description="LLM inference with Numba CUDA kernels")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    from .models import FetchError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FetchError) as error:
        print(f"infinilm-nb: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
