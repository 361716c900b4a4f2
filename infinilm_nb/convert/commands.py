"""Entry points of ``infinilm-nb convert`` and ``infinilm-nb fetch``, for cli.py to wire up.

Each ``*_main`` takes the namespace parsed by a parser that ``add_*_arguments`` set up, or an argv
list (parsed here), and returns the process exit status; errors print one message, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

FETCHABLE = ("smollm2",)


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``infinilm-nb convert GGUF_FILE OUT_DIR [--dtype float16|float32]``."""
    parser.add_argument("gguf_file", type=Path, help="a llama-architecture GGUF file")
    parser.add_argument("out_dir", type=Path, help="the HF model directory to write")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="dtype of the dequantized weights (default: float16)")


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``infinilm-nb fetch smollm2``."""
    parser.add_argument("model", choices=FETCHABLE, help="the embedded model to download and convert")


def _parse(
    args: argparse.Namespace | Sequence[str] | None, prog: str, add: Callable[[argparse.ArgumentParser], None]
) -> argparse.Namespace:
    if isinstance(args, argparse.Namespace):
        return args
    parser = argparse.ArgumentParser(prog=prog)
    add(parser)
    return parser.parse_args(args)


def convert_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``infinilm-nb convert``: write an HF directory from a GGUF file; prints the directory."""
    from infinilm_nb.convert import convert_gguf

    ns = _parse(args, "infinilm-nb convert", add_convert_arguments)
    try:
        out = convert_gguf(ns.gguf_file, ns.out_dir, dtype=ns.dtype)
    except (ValueError, OSError) as error:
        print(f"infinilm-nb convert: error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


def fetch_main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """``infinilm-nb fetch smollm2``: download and convert the embedded model; prints its directory."""
    from infinilm_nb.models import FetchError, fetch_smollm2

    _parse(args, "infinilm-nb fetch", add_fetch_arguments)
    try:
        out = fetch_smollm2()
    except FetchError as error:
        print(f"infinilm-nb fetch: error: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0
