"""Kernel microbenchmarks on the GPU: time, GB/s or TFLOP/s, % of roofline, ratio to the peer.

Usage: ``python bench/kernels.py [--out DIR] [--only gemm,norm,...]``. Prints a table (GPU named),
writes ``kernels.json`` and a roofline chart ``kernels.png`` (when matplotlib is installed) to DIR.
Peers: cuBLAS through CuPy (eager, weights rotated), torch SDPA; roofline: the measured
device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import copies_needed, copy_bandwidth, gpu_name, time_eager, time_graph  # noqa: E402
from infinilm_nb.backend import get_backend  # noqa: E402
from infinilm_nb.kernels import reference  # noqa: E402

OPS = get_backend("cuda").ops
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 8, 128, 14336, 128256
GEMM_SHAPES = {  # name: (N, K), Llama-3-8B
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (2 * FFN, HIDDEN),
    "down": (HIDDEN, FFN),
    "lm_head": (VOCAB, HIDDEN),
}


@dataclass
class Row:
    kernel: str
    shape: str
    us: float
    rate: float  # GB/s or TFLOP/s
    unit: str
    roofline_pct: float | None
    peer: str
    peer_us: float | None

    @property
    def ratio(self) -> float | None:
        return None if self.peer_us is None else self.peer_us / self.us


def rand(shape, dtype=np.float16, scale=1.0):
    return (cupy.random.standard_normal(shape, dtype=np.float32) * scale).astype(dtype)


def bench_gemm(copy_bw: float) -> list[Row]:
    rows = []
    for name, (n, k) in GEMM_SHAPES.items():
        for m in (1, 8, 16, 32):
            nbytes = 2 * (n * k + m * k + m * n)
            copies = copies_needed(nbytes)
            ws = [rand((n, k), scale=0.02) for _ in range(copies)]
            xs = [rand((m, k)) for _ in range(copies)]
            outs = [cupy.empty((m, n), np.float16) for _ in range(copies)]
            ours = [lambda i=i: OPS.linear(xs[i], ws[i], outs[i]) for i in range(copies)]
            peer = [lambda i=i: cupy.matmul(xs[i], ws[i].T, out=outs[i]) for i in range(copies)]
            t, tp = time_graph(ours), time_eager(peer)
            rows.append(Row(f"linear {name}", f"M={m} {k}->{n}", t * 1e6, nbytes / t / 1e9, "GB/s",
                            100 * nbytes / t / copy_bw, "cuBLAS", tp * 1e6))
            del ws, xs, outs
    return rows


def bench_elementwise(copy_bw: float, tokens: int = 4096) -> list[Row]:
    rows = []
    h = HIDDEN

    def add(kernel: str, shape: str, nbytes: int, make: Callable[[], Callable[[], None]]):
        calls = [make() for _ in range(copies_needed(nbytes))]
        t = time_graph(calls)
        rows.append(Row(kernel, shape, t * 1e6, nbytes / t / 1e9, "GB/s", 100 * nbytes / t / copy_bw, "copy", None))

    def norm():
        x, w, out = rand((tokens, h)), rand((h,)), cupy.empty((tokens, h), np.float16)
        return lambda: OPS.rms_norm(x, w, 1e-5, out)

    def add_norm():
        x, r, w, out = rand((tokens, h)), rand((tokens, h)), rand((h,)), cupy.empty((tokens, h), np.float16)
        return lambda: OPS.add_rms_norm(x, r, w, 1e-5, out)

    cos_sin = cupy.asarray(reference.rope_cache(HEAD_DIM, 8192, 500000.0))

    def rope():
        qkv = rand((tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM))
        q = qkv[:, : HEADS * HEAD_DIM].reshape(tokens, HEADS, HEAD_DIM)
        k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].reshape(tokens, KV_HEADS, HEAD_DIM)
        pos = cupy.arange(tokens, dtype=np.int32)
        return lambda: OPS.rope(q, k, pos, cos_sin)

    def silu():
        x, out = rand((tokens, 2 * h)), cupy.empty((tokens, h), np.float16)
        return lambda: OPS.silu_mul(x, out)

    def store():
        k, v = rand((tokens, KV_HEADS, HEAD_DIM)), rand((tokens, KV_HEADS, HEAD_DIM))
        kc = cupy.empty((tokens // 16 + 1, 16, KV_HEADS, HEAD_DIM), np.float16)
        vc = cupy.empty_like(kc)
        slots = cupy.asarray(np.random.permutation(tokens).astype(np.int32))
        return lambda: OPS.store_kv(k, v, kc, vc, slots)

    def embed():
        w = rand((VOCAB, h), scale=0.02)
        ids = cupy.asarray(np.random.randint(0, VOCAB, tokens).astype(np.int32))
        out = cupy.empty((tokens, h), np.float16)
        return lambda: OPS.embedding(ids, w, out)

    act = tokens * h * 2
    add("rms_norm", f"{tokens}x{h}", 2 * act, norm)
    add("add_rms_norm", f"{tokens}x{h}", 4 * act, add_norm)
    add("rope", f"{tokens}x(32+8)x128", 2 * 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM, rope)
    add("silu_mul", f"{tokens}x{h}", 3 * act, silu)
    add("store_kv", f"{tokens}x8x128", 2 * 2 * 2 * tokens * KV_HEADS * HEAD_DIM, store)
    add("embedding", f"{tokens}x{h}", 2 * act, embed)
    return rows


SUITES = {"gemm": bench_gemm, "elementwise": bench_elementwise}


def commit() -> str:
    """The commit measured: INFINILM_NB_COMMIT (the GPU machine gets no .git), else git's HEAD."""
    if os.environ.get("INFINILM_NB_COMMIT"):
        return os.environ["INFINILM_NB_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def print_table(rows: list[Row], title: str) -> None:
    print(title)
    print(f"{'kernel':<16} {'shape':<24} {'us':>9} {'rate':>10} {'% roof':>7} {'peer':>7} {'ratio':>6}")
    for r in rows:
        pct = f"{r.roofline_pct:.0f}%" if r.roofline_pct is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        print(f"{r.kernel:<16} {r.shape:<24} {r.us:>9.1f} {r.rate:>7.0f} {r.unit[:2]:<2} {pct:>7} {r.peer:>7} {ratio:>6}")


def plot(rows: list[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install 'infinilm-nb[bench]')")
        return
    gb = [r for r in rows if r.unit == "GB/s"]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(gb) + 1.5))
    labels = [f"{r.kernel} {r.shape}" for r in gb]
    ax.barh(labels, [r.roofline_pct for r in gb], color="tab:blue")
    ax.axvline(100, color="black", lw=1)
    ax.axvline(85, color="tab:red", lw=1, ls="--")
    ax.set_xlabel("% of measured copy bandwidth")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    title = f"{gpu_name()}  {datetime.date.today()}  commit {commit()}  copy {bw / 1e9:.0f} GB/s (read+write)"
    rows: list[Row] = []
    for name in args.only.split(","):
        rows += SUITES[name](bw)
    (args.out / "kernels.json").write_text(json.dumps(
        {"gpu": gpu_name(), "date": str(datetime.date.today()), "commit": commit(), "copy_gbps": bw / 1e9,
         "rows": [asdict(r) | {"ratio": r.ratio} for r in rows]}, indent=1))
    plot(rows, args.out / "kernels.png", title)
    print_table(rows, title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
