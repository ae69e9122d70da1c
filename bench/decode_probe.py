"""The decode kernels' split-KV count, measured: every backend at every split count on the key decode cases, beside
the heuristic's choice, and the L2-flush method's effect on the timing.

    python -m bench.decode_probe [--n 32768] [--ks 1,4,16,64] [--splits 8,16,32,64,128] [--out probe.jsonl]
    python -m bench.decode_probe --plot probe.jsonl          # probe.png: time against split count (any machine)

Each timing is the median of CUDA-graph replays (one decoding step: kernel plus merge) with L2 emptied before
every replay by *reading* a buffer four times L2 (a write-flush leaves dirty lines whose write-back the timed kernel
then pays, which a real decoding step does not). Every output is checked against the torch backend first.
GPU only.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

from aspd_kernels import _cuda
from aspd_kernels import branch_attention_with_kvcache as public_op

from .cases import build_layout
from .timing import measure

# the package re-exports the op under its module's name: import the module itself
tk = importlib.import_module("aspd_kernels.triton.branch_attention_with_kvcache")


def _time(fn, flush: str, reps: int = 40) -> float:
    """Median ms of ``reps`` CUDA-graph replays of ``fn``; ``flush`` in ("read", "write", "none")."""
    return measure(fn, torch.device("cuda"), min_reps=reps, max_reps=reps, warmup=1, graph=True,
                   flush=flush != "none", flush_by="write" if flush == "none" else flush).ms


def _read_bandwidth() -> float:
    """GB/s of a 1 GiB read-only reduction (decoding reads and barely writes)."""
    x = torch.randn(1 << 29, dtype=torch.bfloat16, device="cuda")
    sink = torch.empty((), dtype=torch.bfloat16, device="cuda")
    ms = _time(lambda: torch.amax(x, dim=0, out=sink), "none", reps=20)
    return x.numel() * 2 / (ms * 1e-3) / 1e9


def plot(jsonl: str) -> str:
    """``jsonl`` -> a PNG beside it: microseconds against the split count, one line per (K, backend), the
    heuristic's choice marked; the read-flush timings only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(jsonl) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    head, rows = lines[0], [r for r in lines[1:] if r["flush"] == "read"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (k, name), color in zip(dict.fromkeys((r["K"], r["backend"]) for r in rows), plt.cm.tab10.colors):
        rs = [r for r in rows if r["K"] == k and r["backend"] == name]
        fixed = sorted((r["splits"], r["ms"] * 1e3) for r in rs if r["splits"] != "auto")
        style = "-" if name == "triton" else "--"
        ax.plot([x for x, _ in fixed], [y for _, y in fixed], style, marker="o", color=color, label=f"K={k} {name}")
        auto = next(r for r in rs if r["splits"] == "auto")
        ax.axhline(auto["ms"] * 1e3, color=color, lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV splits (dotted: the heuristic before the probe)")
    ax.set_ylabel("us per decoding step (graph replay)")
    ax.set_title(f"{head['device']}: decode, N={rows[0]['n']}, Hq/Hkv 32/8, D=128, bf16", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    out = jsonl[: -len(".jsonl")] + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if len(argv) == 2 and argv[0] == "--plot":
        print(plot(argv[1]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.decode_probe", description=__doc__)
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--splits", default="4,8,16,24,32,48,64,96,128")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("decode_probe: needs a CUDA GPU")
    dev, dt, hq, hkv, d, n = torch.device("cuda"), torch.bfloat16, 32, 8, 128, args.n
    read_bw = _read_bandwidth()
    print(f"{torch.cuda.get_device_name()}: read-only bandwidth {read_bw:.0f} GB/s (1 GiB bf16 amax)")
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        seg, br, _ = build_layout(n, k, "interleaved", decode=True)
        seg, br = seg.to(dev)[None], br.to(dev)[None]
        kc = torch.randn(1, n, hkv, d, device=dev, dtype=dt)
        vc = torch.randn(1, n, hkv, d, device=dev, dtype=dt)
        q = torch.randn(1, k, hq, d, device=dev, dtype=dt)
        lens = torch.tensor([n], dtype=torch.int32, device=dev)
        qlens = torch.tensor([k], dtype=torch.int32, device=dev)
        scale = d ** -0.5
        nbytes = 2 * n * hkv * d * 2 + 8 * n + 2 * 2 * k * hq * d
        want = public_op(q, kc, vc, lens, seg, br, backend="torch").float()
        impls = {
            "cuda": lambda s: _cuda.branch_attention_with_kvcache(q, kc, vc, lens, seg, br, qlens, None, scale, s),
            "triton": lambda s: tk.branch_attention_with_kvcache(q, kc, vc, lens, seg, br, qlens, None, scale,
                                                                 num_splits=s or None),
        }
        for name, fn in impls.items():
            for s in [0] + [int(x) for x in args.splits.split(",")]:
                out = fn(s)
                err = ((out.float() - want).norm() / want.norm()).item()
                flushes = ("read", "write", "none") if s == 0 else ("read",)
                for fl in flushes:
                    ms = _time(lambda: fn(s), fl)
                    r = dict(K=k, backend=name, splits=s or "auto", flush=fl, ms=ms, gbps=nbytes / ms / 1e6,
                             frac_read_bw=nbytes / ms / 1e6 / read_bw, rel_err=err, n=n)
                    rows.append(r)
                    print(f"K={k:3d} {name:6s} splits={str(r['splits']):>4s} flush={fl:5s} {ms * 1e3:8.1f} us "
                          f"{r['gbps']:6.0f} GB/s {100 * r['frac_read_bw']:5.1f}% of read  err {err:.1e}")
        del kc, vc
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps({"read_gbps": read_bw, "device": torch.cuda.get_device_name()}) + "\n")
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("\nbest split count per (K, backend), read-flush:")
    for k in dict.fromkeys(r["K"] for r in rows):
        for name in ("cuda", "triton"):
            rs = [r for r in rows if r["K"] == k and r["backend"] == name and r["flush"] == "read"]
            best, auto = min(rs, key=lambda r: r["ms"]), next(r for r in rs if r["splits"] == "auto")
            print(f"K={k:3d} {name:6s} auto {auto['ms'] * 1e3:7.1f} us, best splits={best['splits']} "
                  f"{best['ms'] * 1e3:7.1f} us ({100 * best['frac_read_bw']:.0f}% of read bandwidth)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
