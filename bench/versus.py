"""Time the working tree's kernels beside the same kernels as they were at another commit, in one process.

A kernel change is best judged against the kernel it replaces on the same GPU, in the same process,
case by case, interleaved: clocks and the L2 drift between runs by a few percent, which is as much as
many changes are worth. Here the package as it was at a commit is imported under another name beside
the tree's (its modules import each other relatively, so it runs its own kernels, constants and
launch choices), and each case of ``bench/kernels.py`` is timed with one package's ops, then the
other's, ``--rounds`` times, the best of each kept.

Usage, in two steps because the GPU machine's git may not hold the commit::

    python bench/versus.py --export HEAD                 # here: writes bench/out/versus/<sha>/infinilm_nb
    python bench/versus.py --against bench/out/versus/<sha> [--only elementwise,sampling,attention,gemm] [--rounds 2]

(carry ``bench/out/versus`` to the GPU machine: it is git-ignored). ``--against`` takes several
directories (named apart: a directory's name names its package), so that variants are timed in one
interleaved run, each beside the tree. Inputs are made once per case and shared, so the packages must
take the same arguments; constants such as ``common.PDL`` are set alike in all of them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PACKAGE = "infinilm_nb"
EXPORTS = ROOT / "bench" / "out" / "versus"


def export(rev: str, into: Path = EXPORTS) -> Path:
    """Write the package as it is at ``rev`` to ``into/<short sha>/infinilm_nb``; return ``into/<short sha>``."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    directory = into / sha
    directory.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, PACKAGE], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


def load(directory: Path) -> ModuleType:
    """Import ``directory/infinilm_nb`` as a package of its own, named after the directory."""
    source = Path(directory) / PACKAGE
    if not (source / "__init__.py").is_file():
        raise FileNotFoundError(f"{source} is not the {PACKAGE} package (make one with --export REV)")
    name = PACKAGE + "_at_" + re.sub(r"\W", "_", Path(directory).name)
    if name in sys.modules:
        return sys.modules[name]
    home = Path(tempfile.mkdtemp(prefix="versus-"))
    (home / name).symlink_to(source.resolve(), target_is_directory=True)
    sys.path.insert(0, str(home))
    return importlib.import_module(name)


def ops_of(package: ModuleType) -> SimpleNamespace:
    """The package's kernel launchers by op name (its ``backend.OP_MODULES``), from its own modules."""
    name = package.__name__
    modules = importlib.import_module(f"{name}.backend").OP_MODULES
    return SimpleNamespace(**{op: getattr(importlib.import_module(f"{name}.kernels.{module}"), op)
                              for op, module in modules.items()})


Calls = list[Callable[[], None]]


def cases(only: list[str]) -> list[tuple[str, str, Callable[[], tuple[int, Calls]]]]:
    """(suite, case, make() -> (bytes a call moves, calls)) of ``bench/kernels.py``'s suites named in
    ``only``; every call reaches the ops through ``bench.kernels.OPS``, so it runs whichever is set."""
    import numpy as np

    from bench import kernels
    from bench.timing import copies_needed

    found = []
    if "elementwise" in only:
        for kernel, shape, nbytes, make in kernels.elementwise_cases(4096, kernels.rope_cache()):
            found.append(("elementwise", f"{kernel} {shape}", lambda make=make, nbytes=nbytes: (
                nbytes, [make(np.float16) for _ in range(copies_needed(nbytes))])))
    if "sampling" in only:
        for kernel, batch, temperature, top_p in kernels.SAMPLER_CASES:
            def make(batch=batch, temperature=temperature, top_p=top_p):
                nbytes = batch * kernels.VOCAB * 4
                return nbytes, [kernels.sampler_call(np.float32, temperature, top_p, batch)
                                for _ in range(copies_needed(nbytes))]

            found.append(("sampling", f"{kernel} {batch}x{kernels.VOCAB}", make))
    if "attention" in only:
        for batch, length in kernels.ATTENTION_CASES:
            def make(batch=batch, length=length):
                case = kernels.DecodeAttentionCase.make(batch, length)
                return case.nbytes, case.calls(case.workspace)

            found.append(("attention", f"paged B={batch} L={length}", make))
    if "gemm" in only:
        for name, (n, k) in kernels.GEMM_SHAPES.items():
            for m in (1, 8, 16, 32):
                def make(m=m, n=n, k=k):
                    nbytes, operands = kernels.gemm_operands(m, n, k)
                    return nbytes, kernels.linear_calls(operands)

                found.append(("gemm", f"linear {name} M={m}", make))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", metavar="REV", help="write the package at REV for --against, and stop")
    parser.add_argument("--against", type=Path, nargs="+", help="directories each holding an exported infinilm_nb")
    parser.add_argument("--only", default="elementwise,attention",
                        help="comma-separated: elementwise, sampling, attention, gemm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args(argv)
    if args.export:
        print(export(args.export))
        return 0
    if args.against is None:
        parser.error("give --export REV or --against DIR")
    names = [directory.name for directory in args.against]
    if len(set(names + ["tree"])) != len(names) + 1:
        parser.error(f"--against directories need names of their own, other than 'tree': {names}")

    from bench import kernels
    from bench.provenance import commit
    from bench.timing import copy_bandwidth, gpu_name, time_graph
    from infinilm_nb.kernels import common

    packages = [load(directory) for directory in args.against]
    sides = {name: ops_of(package) for name, package in zip(names, packages)} | {"tree": kernels.OPS}
    commons = [common] + [importlib.import_module(f"{package.__name__}.kernels.common") for package in packages]
    pdl = [package_common.PDL for package_common in commons]
    bandwidth = copy_bandwidth()
    print(f"{gpu_name()}  tree at {commit()} against {', '.join(names)}  copy {bandwidth / 1e9:.0f} GB/s")
    print(f"{'suite':<12} {'case':<34} " + " ".join(f"{side + ' us':>12} {'%':>4}" for side in sides)
          + "".join(f" {'tree vs ' + name:>14}" for name in names))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for package_common in commons:
            package_common.PDL = False  # each kernel alone, as bench/kernels.py times them
        for suite, case, make in cases(args.only.split(",")):
            nbytes, calls = make()
            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for side, ops in sides.items():
                    kernels.OPS = ops
                    best[side] = min(best.get(side, float("inf")), time_graph(calls))
            columns = " ".join(f"{1e6 * t:12.1f} {100 * nbytes / t / bandwidth:4.0f}" for t in best.values())
            ratios = "".join(f" {best[name] / best['tree']:13.2f}x" for name in names)
            print(f"{suite:<12} {case:<34} {columns}{ratios}", flush=True)
            rows.append({"suite": suite, "case": case, "bytes": nbytes, "us": {s: 1e6 * t for s, t in best.items()}})
            del calls
    finally:  # the caller's process (a test's, say) goes on with the tree's ops and switches
        kernels.OPS = sides["tree"]
        for package_common, was in zip(commons, pdl):
            package_common.PDL = was
    (args.out / "versus.json").write_text(json.dumps(
        {"gpu": gpu_name(), "tree": commit(), "against": names, "copy_gbps": bandwidth / 1e9,
         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
