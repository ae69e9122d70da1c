"""One screen after a GPU run (``bench/gpu_suite.sh``): device and versions, the two measured ceilings, the test and
sanitizer verdicts, every implementation of every benchmarked case beside the ceilings, and the project's targets
stated as met or missed.

    python -m bench.gpu_summary RESULT_FOLDER        # Markdown on stdout

Reads the folder's ``*.jsonl`` (``python -m bench``), ``tests-*.log`` (pytest), ``sanitizer-*.log`` and
``suite.log``; computes nothing that is not in them.
"""
from __future__ import annotations

import glob
import os
import re
import sys

from .report import impl, load

# targets of the GPU issues (decode bandwidth, layout-changing decode against FlexAttention, prefill)
DECODE_BW_TARGET = 0.85
DECODE_FLEX_TARGET = 3.0
PREFILL_FLEX_TARGET = 1.0


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _last_line(path: str, pattern: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if re.search(pattern, ln)]
    except OSError:
        return "(missing)"
    return lines[-1] if lines else "(no such line: cut short?)"


def _verdicts(folder: str) -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "tests-*.log"))):
        name = os.path.basename(path)[:-4]
        out.append(f"- {name}: {_last_line(path, r'(passed|failed|error|no tests ran)')}")
        out.append(f"  - {_last_line(path, r'TRITON_INTERPRET=')}")
    for path in sorted(glob.glob(os.path.join(folder, "sanitizer-*.log"))):
        name = os.path.basename(path)[:-4]
        out.append(f"- {name}: {_last_line(path, r'ERROR SUMMARY|RACECHECK SUMMARY')}; "
                   f"{_last_line(path, r'exit -?[0-9]+$')}")
    return out


def _case_table(rows: list[dict]) -> list[str]:
    """Rows of one op, grouped by case: time, rates beside the ceilings, and each package backend's ratio to
    FlexAttention with and without its block-mask build."""
    out = ["| case | implementation | ms | GB/s | % copy | TFLOP/s | % matmul | flex / this | (flex+build) / this |",
           "|---|---|---|---|---|---|---|---|---|"]
    cases: dict[str, list[dict]] = {}
    for r in rows:
        cases.setdefault(r.get("case", "?"), []).append(r)
    for case, rs in cases.items():
        flex = next((r for r in rs if r.get("baseline") == "flex" and r["status"] == "ok"), None)
        for r in rs:
            if r["status"] != "ok":
                out.append(f"| {case} | {impl(r)} | {r['status']}: {str(r.get('reason'))[:90]} | | | | | | |")
                continue
            frac = r.get("fraction_of_ceiling") or {}
            vs = vs_build = None
            if flex and r.get("backend"):
                vs = flex["ms"] / r["ms"]
                build = (flex.get("extra_ms") or {}).get("layout_changes")
                vs_build = build / r["ms"] if build else None
            out.append(f"| {case} | {impl(r)} | {r['ms']:.4g} | {_fmt(r.get('gbps'), '.0f')} | "
                       f"{_fmt(frac.get('bandwidth') and 100 * frac['bandwidth'], '.0f')} | "
                       f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(frac.get('compute') and 100 * frac['compute'], '.0f')} | "
                       f"{_fmt(vs, '.2f')} | {_fmt(vs_build, '.2f')} |")
    return out


def _best(rs: list[dict]) -> dict | None:
    ok = [r for r in rs if r["status"] == "ok" and r.get("backend")]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def _targets(decode: list[dict], prefill: list[dict]) -> list[str]:
    out = []
    for case in dict.fromkeys(r.get("case") for r in decode):
        rs = [r for r in decode if r.get("case") == case]
        best, flex = _best(rs), next((r for r in rs if r.get("baseline") == "flex" and r["status"] == "ok"), None)
        k = (best or {}).get("layout", {}).get("K")
        if best is None:
            out.append(f"- decode {case}: no package backend ran")
            continue
        bw = (best.get("fraction_of_ceiling") or {}).get("bandwidth") or 0.0
        if k in (4, 16, 64):
            out.append(f"- decode {case}: {impl(best)} at {100 * bw:.0f}% of copy bandwidth "
                       f"({'met' if bw >= DECODE_BW_TARGET else 'MISSED'}, target {100 * DECODE_BW_TARGET:.0f}%)")
        build = (flex or {}).get("extra_ms", {}).get("layout_changes")
        if build:
            ratio = build / best["ms"]
            out.append(f"- decode {case}: {ratio:.1f}x FlexAttention with its per-step block-mask build "
                       f"({'met' if ratio >= DECODE_FLEX_TARGET else 'MISSED'}, target {DECODE_FLEX_TARGET:.0f}x)")
    for case in dict.fromkeys(r.get("case") for r in prefill):
        rs = [r for r in prefill if r.get("case") == case]
        best, flex = _best(rs), next((r for r in rs if r.get("baseline") == "flex" and r["status"] == "ok"), None)
        build = (flex or {}).get("extra_ms", {}).get("layout_changes")
        if best and build:
            ratio = build / best["ms"]
            out.append(f"- prefill {case}: {ratio:.2f}x FlexAttention including its block-mask build "
                       f"({'met' if ratio >= PREFILL_FLEX_TARGET else 'MISSED'}); without the build "
                       f"{flex['ms'] / best['ms']:.2f}x")
    return out


def _bandwidth_lines(folder: str) -> list[str]:
    """``bench.decode_bandwidth``'s rows (decode-bandwidth.jsonl) against issue 21's targets: 85% of the measured
    copy bandwidth for K <= 16, 50% for K = 64."""
    path = os.path.join(folder, "decode-bandwidth.jsonl")
    if not os.path.exists(path):
        return []
    rows = load([path])
    out = ["", "## Decode against the copy ceiling (bench.decode_bandwidth)", "",
           "| N | K | backend | us | % copy | decode us | merge us | target |", "|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        if r.get("status") != "ok":
            out.append(f"| {r.get('n')} | {r.get('K')} | {r.get('backend')} | {r.get('reason', '?')[:60]} |||||")
            continue
        want = 0.5 if r["K"] >= 64 else 0.85
        parts = (r["n"], r["K"], f"{r['backend']} ({r['resolved']})", f"{r['total_us']:.1f}",
                 f"{100 * r['frac_copy']:.0f}%", _fmt(r.get("decode_us"), ".1f"), _fmt(r.get("merge_us"), ".1f"),
                 f"{'met' if r['frac_copy'] >= want else 'MISSED'} ({100 * want:.0f}%)")
        out.append("| " + " | ".join(str(x) for x in parts) + " |")
    return out


def summarize(folder: str) -> str:
    # bench rows only (schema 1): not decode_probe's, the sweep's or the partial files that repeat a run's rows
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*.jsonl")) if not p.endswith(".partial.jsonl"))
    rows = [r for r in (load(paths) if paths else []) if r.get("schema") == 1 and "op" in r]
    lines = ["# GPU run summary", ""]
    env = next((r for r in rows if r.get("device")), {})
    smi = _last_line(os.path.join(folder, "suite.log"), r"(NVIDIA|H100|H200).*MiB")
    lines += [f"- device: {env.get('device', '?')}; nvidia-smi: {smi}",
              f"- torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
              f"commit {env.get('commit')}, date {env.get('date')}"]
    ceil = next((r.get("ceilings") for r in rows if r.get("ceilings", {}).get("copy_gbps")), None)
    if ceil:
        lines.append(f"- measured ceilings: copy {ceil['copy_gbps']:.0f} GB/s (read + write), "
                     f"bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s")
    lines += ["", "## Tests and sanitizer", ""] + _verdicts(folder)
    by_op: dict[str, list[dict]] = {}
    for r in rows:
        if r["op"] != "ceiling":
            by_op.setdefault(r["op"], []).append(r)
    for op, rs in by_op.items():
        lines += ["", f"## {op}", ""] + _case_table(rs)
    lines += _bandwidth_lines(folder)
    lines += ["", "## Targets", ""] + (_targets(by_op.get("branch_attention_with_kvcache", []),
                                                by_op.get("branch_attention", [])) or ["- no benchmark rows"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        sys.exit("usage: python -m bench.gpu_summary RESULT_FOLDER")
    print(summarize(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
