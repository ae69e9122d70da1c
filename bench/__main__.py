"""Run the benchmarks: ``python -m bench`` runs everything this device can run (the reduced grid on a CPU, the full
grid on a GPU) and writes ``<out>/<date>-<device>[-<tag>].jsonl``, ``.md`` and ``.png``; ``<out>`` is ``bench-out/``
in the current directory (ignored by git at the repository root) unless ``--out`` says otherwise; the project's
committed results go to ``bench/results/`` only when asked (``--out bench/results``).

    python -m bench                                   # everything, default grid for this device
    python -m bench --quick                           # a few cases per op (GPU smoke run)
    python -m bench --ops branch_attention_with_kvcache,e2e --out /tmp/res --tag decode
    python -m bench --ops e2e --models llama-3-8b
    python -m bench --ops branch_attention_with_kvcache --cases "N=32768 K=16 interleaved H=32/8 D=128"
    python -m bench --ops host                        # the host-path report (bench/host.py), CPU only
    python -m bench --ops host --cases model          # only its real-model section (SmolLM2)
    python -m bench --ops vllm                        # parallel sections through vLLM (bench/bench_vllm.py), CPU
    python -m bench --ops aspd-real                   # ASPD end to end on SmolLM2 (bench/bench_aspd_real.py), CPU

Exit status 1 when any implementation failed (an ``error`` row); skipped implementations (not available here,
over a memory cap) are listed with their reason and do not fail the run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import torch

from . import (bench_branch_attention, bench_branch_attention_backward, bench_branch_attention_with_kvcache, bench_e2e,
               bench_remap_positions, bench_rope_append_kv, report)
from .ceilings import measure_ceilings
from .common import Context, device_slug, environment, row
from .timing import Timing

OPS = {
    "branch_attention": bench_branch_attention,
    "branch_attention_backward": bench_branch_attention_backward,
    "branch_attention_with_kvcache": bench_branch_attention_with_kvcache,
    "rope_append_kv": bench_rope_append_kv,
    "remap_positions": bench_remap_positions,
    "e2e": bench_e2e,
}
RESULTS = "bench-out"  # a user's run: beside them, never into the repository's bench/results/ unless asked


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    grid = ap.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true", help="a few cases per op")
    grid.add_argument("--full", action="store_true", help="the full grid (the default on a GPU)")
    ap.add_argument("--out", default=RESULTS, help="output folder (default bench-out/ in the current directory; "
                                                   "bench/results/ holds the project's committed results)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="",
                    help="e2e models, comma-separated (default: smollm2-135m, the real model, on a CPU; the random "
                         "llama-3.2-1b, llama-3-8b, qwen2.5-7b on a GPU; tiny-llama-cpu: a tiny random one)")
    ap.add_argument("--cases", default="",
                    help="run only the cases whose key contains one of these ';'-separated strings "
                         "(keys look like 'N=32768 K=16 interleaved H=32/8 D=128'; e2e keys are model names)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds of timed reps per implementation and case (default 0.4 GPU, 0.25 CPU)")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="stop starting new cases after this many seconds (0: none); the rest become skipped rows")
    ap.add_argument("--resume", default="",
                    help="an earlier JSONL of the same ops: its finished cases are copied, not rerun")
    ap.add_argument("--mask-cap-gb", type=float, default=None,
                    help="skip dense N x N baselines above this (default: 20%% of GPU memory, 1 GiB on CPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice, less the cores the load average says are busy)")
    ap.add_argument("--torch-max-tokens", type=int, default=16384,
                    help="largest N for the tiled torch backend on a GPU (it syncs the host per tile)")
    return ap.parse_args(argv)


def cpu_threads(requested: int) -> tuple[int, str | None]:
    """Torch CPU threads for a run: ``requested`` if given, else torch's choice less the cores other work keeps
    busy (the 1-minute load average), at least 1; with a note when it is fewer than torch's choice. On a shared
    machine two threads whose partner is descheduled wait out whole time slices at every barrier: runs of the same
    call then vary by 10x and more, which no timing can use."""
    default = torch.get_num_threads()
    if requested:
        return requested, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return default, None
    n = max(1, min(default, int(cores - busy + 0.5)))
    if n >= default:
        return default, None
    return n, (f"the CPU is busy (load average {busy:.1f} on {cores} cores): torch threads {default} -> {n} "
               "(--threads N to choose)")


def make_context(args: argparse.Namespace) -> Context:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda or args.threads:
        n, note = cpu_threads(args.threads)
        torch.set_num_threads(n)
        if note:
            print(f"note: {note}", file=sys.stderr)
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    grid = "quick" if args.quick else "full" if (args.full or cuda) else "cpu"
    if cuda and args.quick:
        grid = "quick"
    if not cuda and grid != "cpu":
        print(f"note: grid {grid!r} on the CPU may take very long", file=sys.stderr)
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.mask_cap_gb is not None:
        cap = int(args.mask_cap_gb * 2**30)
    elif cuda:
        cap = int(0.2 * torch.cuda.get_device_properties(device).total_memory)
    else:
        cap = 1 << 30
    budget = args.budget_s if args.budget_s is not None else (0.4 if cuda else 0.25)
    return Context(device=device, dtype=dtype, grid=grid, ceilings={}, budget_s=budget, mask_cap_bytes=cap,
                   torch_backend_max_tokens=args.torch_max_tokens, env=environment(device))


def ceiling_rows(ctx: Context) -> list[dict]:
    c = ctx.ceilings
    dt = getattr(torch, c["dtype"])
    mode = "eager" if ctx.cuda else "cpu"
    return [
        row(ctx, "ceiling", baseline="copy", timing=Timing(c["copy_ms"], c["copy_ms"], c["copy_ms"], 1, mode),
            nbytes=2 * c["copy_bytes"], shape={"bytes": c["copy_bytes"]}, dtype=dt),
        row(ctx, "ceiling", baseline="matmul", timing=Timing(c["matmul_ms"], c["matmul_ms"], c["matmul_ms"], 1, mode),
            flops=2 * c["matmul_n"] ** 3, shape={"n": c["matmul_n"]}, dtype=dt),
    ]


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if ops == ["host"]:
        from . import host

        if args.threads:
            torch.set_num_threads(args.threads)
        # --cases picks the report's sections by name (ops, step, model, attention, memory); default all
        picked = [c for c in host.SECTIONS if not args.cases or any(k and k in c for k in args.cases.split(";"))]
        host.report(sys.argv[1:] if argv is None else argv, args.out, sections=tuple(picked), tag=args.tag)
        return 0
    if ops == ["vllm"]:  # starts vLLM engines (minutes): only when asked, never in the default run
        from . import bench_vllm

        return bench_vllm.main(["--out", args.out])
    if ops == ["aspd-real"]:  # the fine-tuned real model (minutes to an hour on a CPU): only when asked
        from . import bench_aspd_real

        return bench_aspd_real.main(["--out", args.out])
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        sys.exit(f"unknown op(s) {unknown}; choose from {list(OPS)}")
    ctx = make_context(args)
    wanted = [w.strip() for w in args.cases.split(";") if w.strip()]
    os.makedirs(args.out, exist_ok=True)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    prefix = os.path.join(args.out, f"{date}-{device_slug(ctx.device)}" + (f"-{args.tag}" if args.tag else ""))
    path = prefix + ".jsonl"
    print(f"device {ctx.env['device']}, grid {ctx.grid}, dtype {ctx.dtype}, torch {ctx.env['torch']}, "
          f"commit {ctx.env['commit']}", file=sys.stderr)
    if not ctx.cuda:
        print("CPU run: a reduced grid that checks the harness; CPU numbers are not the point.", file=sys.stderr)
    start = time.monotonic()
    ctx.ceilings = measure_ceilings(ctx.device, ctx.dtype)
    print(f"ceilings: copy {ctx.ceilings['copy_gbps']:.1f} GB/s, matmul {ctx.ceilings['matmul_tflops']:.2f} "
          f"TFLOP/s ({ctx.ceilings['dtype']})", file=sys.stderr)
    rows = ceiling_rows(ctx)
    done: dict[tuple[str, str], list[dict]] = {}
    if args.resume:
        for r in report.load([args.resume]):
            if r.get("case") and not (r["status"] == "skipped" and str(r["reason"]).startswith("--time-limit")):
                done.setdefault((r["op"], r["case"]), []).append(r)
    partial = prefix + ".partial.jsonl"  # rows as measured, for ops that stream (e2e); absent when none does
    if os.path.exists(partial):
        os.remove(partial)

    def stream(r: dict) -> None:
        with open(partial, "a") as pf:
            pf.write(json.dumps(r) + "\n")

    ctx.stream = stream
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for op in ops:
            mod = OPS[op]
            if op == "e2e":
                models = [m for m in args.models.split(",") if m] or None
                case_list = mod.cases(ctx, models)
            else:
                case_list = mod.cases(ctx)
            if wanted:
                case_list = [c for c in case_list if any(w in c.key() for w in wanted)]
                if not case_list:
                    print(f"note: no {op} case matches --cases {args.cases!r}", file=sys.stderr)
            for case in tqdm(case_list, desc=op, file=sys.stderr, dynamic_ncols=True):
                if (op, case.key()) in done:
                    new = done[(op, case.key())]
                elif args.time_limit and time.monotonic() - start > args.time_limit:
                    new = [row(ctx, op, status="skipped", shape=case.as_dict(),
                               reason=f"--time-limit {args.time_limit:.0f}s reached before this case")]
                else:
                    try:
                        new = mod.run_case(ctx, case)
                    except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others
                        new = [row(ctx, op, status="error", shape=case.as_dict(),
                                   reason=f"{type(exc).__name__}: {str(exc)[:300]}")]
                    if ctx.cuda:
                        torch.cuda.empty_cache()
                for r in new:
                    r["case"] = case.key()
                    f.write(json.dumps(r) + "\n")
                f.flush()
                rows += new
    md, png = report.write(rows, prefix)
    print(report.markdown(rows, detail=False))
    print(f"wrote {path}, {md}" + (f", {png}" if png else "") + f" in {time.monotonic() - start:.0f}s")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print(f"{len(errors)} implementation(s) failed: see 'Skipped and failed' above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
