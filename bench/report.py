"""JSONL rows -> a Markdown report and a PNG plot.

    python -m bench.report bench/results/2026-11-22-cpu.jsonl [more.jsonl ...] [--out PREFIX]

writes ``PREFIX.md`` and ``PREFIX.png`` (default: the first file's name without ``.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict, defaultdict

OP_ORDER = ("ceiling", "branch_attention", "branch_attention_backward", "branch_attention_with_kvcache",
            "rope_append_kv", "remap_positions", "e2e")
CPU_NOTE = ("**CPU run: these numbers are not the point.** The CPU grid is reduced to tiny shapes so that the "
            "harness, the schema and the report can be checked anywhere; the package's kernels are GPU kernels and "
            "only the torch fallback runs here. Read GPU result files for performance.")


def load(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def impl(r: dict) -> str:
    return f"aspd:{r['backend']}" if r["backend"] else r["baseline"] or "?"


def case_label(r: dict) -> str:
    s, lay = r["shape"], r["layout"]
    if r["op"] in ("branch_attention", "branch_attention_backward"):
        return (f"N={s.get('total_k')} K={lay.get('K')} {str(lay.get('storage', ''))[:6]} "
                f"H={s.get('Hq')}/{s.get('Hkv')} D={s.get('D')}")
    if r["op"] == "branch_attention_with_kvcache":
        return (f"N={s.get('cache_len')} K={lay.get('K')} {str(lay.get('storage', ''))[:6]} "
                f"H={s.get('Hq')}/{s.get('Hkv')} D={s.get('D')}")
    if r["op"] == "remap_positions":
        return f"N={s.get('N')} K={lay.get('K')} {str(lay.get('storage', ''))[:6]}"
    if r["op"] == "rope_append_kv":
        return f"{lay.get('sweep')} L={s.get('L')} H={s.get('Hq')}/{s.get('Hkv')} D={s.get('D')}"
    if r["op"] == "e2e":
        return f"{s.get('model')} {lay.get('workload', '')} K={lay.get('K', '')} L={lay.get('branch_len', '')}"
    return json.dumps(s)


def _f(x, fmt="{:.3g}") -> str:
    return "" if x is None else fmt.format(x)


def ratio(x) -> str:
    """A ratio with the digits it needs: three significant ones (0.00420x, 0.310x, 1.89x, 12.3x), whole numbers from
    100x on; never 0.00x."""
    if x is None:
        return ""
    if x >= 100:
        return f"{x:,.0f}x"
    if x == 0:
        return "0x"
    return f"{x:#.3g}".rstrip(".") + "x" if x >= 1e-4 else f"{x:.1e}x"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _by_case(rows: list[dict]) -> "OrderedDict[str, list[dict]]":
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(case_label(r), []).append(r)
    return groups


def summary_table(op: str, rows: list[dict]) -> str:
    """One line per case: the fastest package backend, its rates, and its speed ratio to every baseline."""
    ok = [r for r in rows if r["status"] == "ok"]
    baselines = list(OrderedDict.fromkeys(k for r in ok if r["backend"] for k in r["ratio"]))
    lines = []
    for label, group in _by_case(ok).items():
        ours = [r for r in group if r["backend"]]
        if not ours:
            lines.append([label, "(no package backend ran)"] + [""] * (5 + len(baselines)))
            continue
        best = min(ours, key=lambda r: r["ms"])
        fr = best["fraction_of_ceiling"]
        lines.append([label, best["backend"], _f(best["ms"]), _f(best["gbps"]), _f(best["tflops"]),
                      _pct(fr.get("bandwidth")), _pct(fr.get("compute"))]
                     + [ratio(best["ratio"].get(b)) for b in baselines])
    header = ["case", "best", "ms", "GB/s", "TFLOP/s", "% copy BW", "% matmul"] + [f"vs {b}" for b in baselines]
    return _table(header, lines)


def detail_table(rows: list[dict]) -> str:
    lines = []
    for label, group in _by_case([r for r in rows if r["status"] == "ok"]).items():
        for r in sorted(group, key=lambda r: r["ms"]):
            fr = r["fraction_of_ceiling"]
            build, eager = r["extra_ms"].get("build"), r["extra_ms"].get("eager")
            lines.append([label, impl(r), _f(r["ms"]), r.get("timing_mode") or "", _f(eager), _f(build),
                          _f(r["gbps"]), _f(r["tflops"]), _pct(fr.get("bandwidth")), _pct(fr.get("compute"))])
    return _table(["case", "implementation", "ms", "timed as", "eager ms", "build ms", "GB/s", "TFLOP/s",
                   "% copy BW", "% matmul"], lines)


def e2e_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["status"] != "ok" or not r["backend"]:
            continue
        e, lay = r.get("e2e", {}), r["layout"]
        speedup = ratio(e.get("speedup"))
        if e.get("over_limit"):  # noise, not a result: the run must be repeated on a quieter machine
            speedup += " (above its limit: a noisy run, not a result)"
        lines.append([r["shape"].get("model", ""), lay.get("workload", ""), _f(lay.get("K")),
                      str(lay.get("branch_len")),
                      _f(r["ms"], "{:.1f}"), _f(e.get("tokens_per_s"), "{:.1f}"), str(e.get("forward_passes")),
                      str(e.get("serial_forward_passes")), speedup,
                      ratio(e.get("speedup_limit")), _pct(r["fraction_of_ceiling"].get("bandwidth"))])
    return _table(["model", "workload", "K", "L", "parallel ms/answer", "tokens/s", "passes", "serial passes",
                   "speedup vs serial", "limit", "weights GB/s % copy"], lines)


def e2e_examples(rows: list[dict]) -> list[str]:
    """The real answers the end-to-end runs decoded (real models only), as Markdown lines."""
    out = []
    for r in rows:
        ex = r.get("e2e", {}).get("example") if r["status"] == "ok" else None
        if ex:
            out += [f"An answer of {r['shape'].get('model')} decoded in parallel, {len(ex['answer'])} branches in "
                    f"one sequence ({ex['tokens']} tokens in {ex['forward_passes']} forward passes; greedy, each "
                    f"branch ends at its first newline, no two start alike; untimed):", "",
                    f"> **{ex['question']}**", ">"] + [f"> {a}  " for a in ex["answer"]] + [""]
    return out


def problems_table(rows: list[dict]) -> str:
    seen: OrderedDict[tuple, int] = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            key = (r["op"], impl(r), r["status"], r["reason"])
            seen[key] = seen.get(key, 0) + 1
    return _table(["op", "implementation", "status", "reason", "cases"],
                  [[op, name, st, str(reason).replace("|", "/"), str(n)] for (op, name, st, reason), n in seen.items()])


def markdown(rows: list[dict], detail: bool = True) -> str:
    if not rows:
        return "(no rows)\n"
    first = rows[0]
    cpu = str(first["device"]).startswith("cpu")
    out = [f"# aspd_kernels benchmarks: {first['device']}, {first['date']}", ""]
    if cpu:
        out += [CPU_NOTE, ""]
    ceil = next((r["ceilings"] for r in rows if r["ceilings"].get("copy_gbps")), {})
    out += [f"torch {first['torch']}, triton {first['triton']}, CUDA {first['cuda']}, commit `{first['commit']}`, "
            f"grid `{first['grid']}`, dtype {first['dtype']}.", "",
            f"Ceilings measured in this run: copy bandwidth **{_f(ceil.get('copy_gbps'), '{:.1f}')} GB/s** "
            f"(read + write), matmul **{_f(ceil.get('matmul_tflops'), '{:.2f}')} TFLOP/s**. Ratios are "
            f"baseline time / package time (> 1: the package is faster); `+build` adds the baseline's per-layout "
            f"preparation (FlexAttention's `create_block_mask`, the dense mask), paid every call when the layout "
            f"changes every call, as in decoding. Rates use the op's useful work (visible pairs, fewest bytes) for "
            f"every implementation; formulas in bench/README.md. On a GPU, `ms` is a CUDA-graph replay where the call "
            f"could be captured (device time without host overhead; the eager call is in the detail tables).", ""]
    by_op = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    for op in sorted(by_op, key=lambda o: OP_ORDER.index(o) if o in OP_ORDER else 99):
        if op == "ceiling":
            continue
        out += [f"## {op}", ""]
        if op == "e2e":
            if cpu and any(r["shape"].get("model") == "tiny-llama-cpu" for r in by_op[op]):
                out += ["`tiny-llama-cpu`: a tiny random Llama (2 layers, hidden 64) that checks the harness only.",
                        ""]
            out += ["Speedup: the serial runs' time / the parallel run's, each the fastest of interleaved rounds; "
                    "its limit is K (a memory-bound step costs about as much for K tokens as for one).", "",
                    e2e_table(by_op[op]), "", *e2e_examples(by_op[op])]
            continue
        out += [summary_table(op, by_op[op]), ""]
        if detail:
            out += ["<details><summary>every implementation</summary>", "", detail_table(by_op[op]), "",
                    "</details>", ""]
    if any(r["status"] != "ok" for r in rows):
        out += ["## Skipped and failed", "", problems_table(rows), ""]
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> bool:
    """Time against the swept axis for each op (interleaved storage), and the end-to-end speedup against K."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for op in OP_ORDER[1:-1]:
        for sweep, axis in (("tokens", "N"), ("branches", "K"), ("decode", "L"), ("prefill", "L")):
            sel = [r for r in rows if r["op"] == op and r["status"] == "ok" and r["layout"].get("sweep") == sweep
                   and r["layout"].get("storage", "interleaved") == "interleaved"]
            if sel:
                panels.append((f"{op} ({sweep})", axis, sel))
    e2e = [r for r in rows if r["op"] == "e2e" and r["status"] == "ok" and r["backend"]
           and r["layout"].get("workload") == "branches"]
    n = len(panels) + (1 if e2e else 0)
    if n == 0:
        return False
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.5 * cols, 4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, (title, axis, sel) in zip(axes.flat, panels):
        lines = defaultdict(dict)
        for r in sel:
            x = {"N": r["shape"].get("total_k") or r["shape"].get("cache_len") or r["shape"].get("N"),
                 "K": r["layout"].get("K"), "L": r["shape"].get("L")}[axis]
            lines[impl(r)][x] = r["ms"]
        for name, pts in sorted(lines.items()):
            xs = sorted(pts)
            style = "-" if name.startswith("aspd") else "--"
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name, linestyle=style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("ms (median)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    if e2e:
        ax = axes.flat[len(panels)]
        by_model = defaultdict(dict)
        for r in e2e:
            by_model[(r["shape"]["model"], r["layout"]["branch_len"])][r["layout"]["K"]] = r["e2e"]["speedup"]
        kmax = 1
        for (model, length), pts in sorted(by_model.items()):
            xs = sorted(pts)
            kmax = max(kmax, xs[-1])
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=f"{model} L={length}")
        ax.plot([1, kmax], [1, kmax], color="gray", linestyle=":", label="limit K")
        ax.set_xlabel("K branches")
        ax.set_ylabel("speedup vs serial")
        ax.set_title("end to end", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    first = rows[0]
    fig.suptitle(f"aspd_kernels, {first['device']}, {first['dtype']}, {first['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(rows: list[dict], prefix: str) -> tuple[str, str | None]:
    md = prefix + ".md"
    with open(md, "w") as f:
        f.write(markdown(rows))
    png = prefix + ".png"
    return md, png if plot(rows, png) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--out", help="output prefix (default: the first file without .jsonl)")
    args = ap.parse_args(argv)
    rows = load(args.jsonl)
    prefix = args.out or os.path.splitext(args.jsonl[0])[0]
    md, png = write(rows, prefix)
    print(markdown(rows, detail=False))
    print(f"wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
