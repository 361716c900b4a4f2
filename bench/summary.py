"""The short table a GPU session ends with: what its run left in one output folder, against the targets.

Usage: ``python bench/summary.py DIR``. Reads whichever of ``gpu-tests*.xml`` (pytest JUnit),
``kernels.json``, ``decode.json``, ``step_profile.json``, ``throughput.json`` and ``tp.json`` are in DIR and prints one line
per figure; what a run did not produce is left out.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any


def test_counts(path: Path) -> str:
    """``passed / failed / errors / skipped`` of a pytest JUnit XML file."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return f"{passed} passed, {total['failures']} failed, {total['errors']} errors, {total['skipped']} skipped"


def kernel_lines(data: dict[str, Any]) -> list[str]:
    """The worst decode GEMM against cuBLAS and against copy bandwidth, and each kernel family's range."""
    rows = data["rows"]
    lines = [f"kernels ({data['gpu']}, {data['commit']}, copy {data['copy_gbps']:.0f} GB/s)"]
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault(row["kernel"].split()[0], []).append(row)
    for family, members in families.items():
        ratios = [r["ratio"] for r in members if r["ratio"] is not None]
        roofs = [r["roofline_pct"] for r in members if r["roofline_pct"] is not None]
        parts = []
        if roofs:
            parts.append(f"{min(roofs):.0f}-{max(roofs):.0f}% of copy")
        if ratios:
            parts.append(f"{min(ratios):.2f}-{max(ratios):.2f}x {members[0]['peer']}")
        lines.append(f"  {family:<14} {len(members):3d} rows  " + ", ".join(parts))
    spills = [r["kernel"] for r in data.get("resources", []) if r["local_bytes"]]
    lines.append(f"  local memory (spills) in: {', '.join(sorted(set(spills))) or 'none'}")
    return lines


def decode_lines(data: dict[str, Any]) -> list[str]:
    one = data["batch1"]
    lines = [f"decode ({data['gpu']}, {data['commit']}, {data['layers']} layers)",
             f"  batch 1: {one['decode_tok_s']:.1f} tok/s, {one['roofline_pct']:.1f}% of roofline (target 85%), "
             f"host {one['host_pct']:.1f}%"]
    parts = one.get("host_parts_us")
    if parts:
        lines.append("  batch-1 host parts (us): " + ", ".join(
            f"{name} {parts[name]:.0f}" for name in ("schedule", "fill", "upload", "launch", "wait", "detokenize")))
    for row in data["batches"]:
        lines.append(f"  batch {row['batch']}: {row['decode_tok_s']:.0f} tok/s, host {row['host_pct']:.1f}%, "
                     f"TTFT {row['ttft_ms']:.0f} ms")
    for row in data.get("sampled", []):
        sampling = ", ".join(f"{name} {value}" for name, value in row["sampling"].items())
        lines.append(f"  sampled ({sampling}) batch {row['batch']}: {row['decode_tok_s']:.0f} tok/s, "
                     f"host {row['host_pct']:.1f}%")
    for row in data.get("step_by_step", []):
        roof = f", {row['roofline_pct']:.1f}% of roofline" if "roofline_pct" in row else ""
        lines.append(f"  step by step batch {row['batch']}: {row['decode_tok_s']:.1f} tok/s{roof}, "
                     f"host {row['host_pct']:.1f}%")
    hf = data.get("hf")
    if hf:
        lines.append(f"  HF transformers batch 1: {hf['decode_tok_s']:.1f} tok/s "
                     f"({one['decode_tok_s'] / hf['decode_tok_s']:.1f}x)")
    ablation = data.get("ablation_gpu_ms")
    if ablation:
        fused = ablation["fused"]
        lines.append("  fusions undone, PDL switched, step GPU time: " + ", ".join(
            f"{name} {ms - fused:+.3f} ms" for name, ms in ablation.items() if name != "fused"))
    if "long_prompt_ttft_ms" in data:
        peer = f", HF {hf['long_ttft_ms']:.1f} ms" if hf and "long_ttft_ms" in hf else ""
        lines.append(f"  TTFT of {data.get('long_prompt', '?')} tokens: {data['long_prompt_ttft_ms']:.1f} ms{peer}")
    return lines


def step_profile_lines(data: dict[str, Any]) -> list[str]:
    """The decode step's costliest kernels and its idle time (bench/step_profile.py)."""
    top = ", ".join(f"{name} {micros:.0f} us" for name, _, micros in data["kernels"][:4])
    return [f"step profile ({data['title']}): {top}; idle {data['idle_us']:.1f} us of {data['span_us']:.0f}"]


def throughput_lines(data: dict[str, Any]) -> list[str]:
    ours, hf = data["ours"], data.get("hf")
    line = f"throughput: {ours['output_tok_s']:.0f} output tok/s over {ours['requests']} requests"
    if "step_by_step_output_tok_s" in ours:
        line += f" ({ours['step_by_step_output_tok_s']:.0f} step by step)"
    if hf:
        line += f"; HF transformers {hf['output_tok_s']:.0f} ({ours['output_tok_s'] / hf['output_tok_s']:.1f}x)"
    return [line]


def tp_lines(data: dict[str, Any]) -> list[str]:
    one = data["tp1"]
    many = next(value for key, value in data.items() if key.startswith("tp") and key != "tp1")
    return [f"tensor parallel tp={many['tp']}: top-1 agreement {100 * many['agreement']:.1f}%, "
            f"decode {one['decode_tok_s']:.1f} -> {many['decode_tok_s']:.1f} tok/s"]


def summary(directory: Path) -> list[str]:
    """Every line of the table for what ``directory`` holds."""
    lines = [f"tests{xml.stem[len('gpu-tests'):]}: {test_counts(xml)}" for xml in sorted(directory.glob("gpu-tests*.xml"))]
    for name, describe in (("kernels.json", kernel_lines), ("decode.json", decode_lines),
                           ("step_profile.json", step_profile_lines), ("throughput.json", throughput_lines),
                           ("tp.json", tp_lines)):
        path = directory / name
        if path.exists():
            lines += describe(json.loads(path.read_text()))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    print("\n".join(["", "== summary =="] + summary(Path(args[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
