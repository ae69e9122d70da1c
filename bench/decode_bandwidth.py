"""Decode against the copy bandwidth, with the decode kernel and the split merge timed apart (issue 21).

    python -m bench.decode_bandwidth [--ks 1,4,16,64] [--ns 16384,65536,131072] [--out PATH.jsonl]
    python -m bench.decode_bandwidth --dry     # CPU, Triton interpreted, tiny shapes: the flow only

First the ceilings of this device, measured here: copy (1 GiB ``copy_``, read + write) and read-only (1 GiB
``amax``; decoding reads and barely writes) bandwidth, and the bf16 matmul rate. Then, for every (K, N), one
decoding step (Hq/Hkv 32/8, D = 128, bf16, one sequence, the benchmark's interleaved layout) through the public op
with ``backend="auto"`` and with ``backend="triton"``: the step as CUDA-graph replays with L2 emptied by reading
(``total_us``), then under ``torch.profiler`` the device time of the decode kernel(s) and of the merge kernel per
step (``decode_us``, ``merge_us``: kernels named ``*merge*`` and ``*decode*``). ``frac_copy`` = the step's fewest
bytes / ``total_us`` / the copy ceiling (the issue's target: 0.85 for K <= 16, 0.5 for K = 64). Every row is
written (and flushed) as it is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--dry" in sys.argv[1:]:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from aspd_kernels import branch_attention_with_kvcache as public_op  # noqa: E402
from aspd_kernels._dispatch import resolve  # noqa: E402

from .decode_inputs import decode_inputs, tk  # noqa: E402
from .timing import measure  # noqa: E402


def split_kernel_times(events: list[tuple[str, float]], steps: int) -> dict:
    """``{"decode_us", "merge_us"}`` per step from ``(kernel name, device us)`` pairs of ``steps`` steps; kernels
    that are neither (the L2 flush's reduction) are left out."""
    merge = sum(us for name, us in events if "merge" in name)
    decode = sum(us for name, us in events if "decode" in name and "merge" not in name)
    return {"decode_us": decode / steps, "merge_us": merge / steps}


def _profiled(fn, device: torch.device, steps: int = 20) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from .timing import _flusher

    flush = _flusher(device, "read")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            flush()
            fn()
        torch.cuda.synchronize()
    events = [(e.key, getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0))
              for e in prof.key_averages()]
    return split_kernel_times(events, steps)


def ceilings(device: torch.device) -> dict:
    from .ceilings import measure_ceilings

    c = measure_ceilings(device, torch.bfloat16)
    if device.type == "cuda":
        from .decode_probe import _read_bandwidth

        c["read_gbps"] = _read_bandwidth()
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.decode_bandwidth", description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,4,16,64")
    ap.add_argument("--ns", default="16384,65536,131072")
    ap.add_argument("--out", default="")
    ap.add_argument("--time-limit", type=float, default=0.0, help="seconds; cases after it are not run")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args(argv)
    start = time.monotonic()
    if args.dry:
        device, ks, ns, shape = torch.device("cpu"), [1, 4], [160], dict(hq=4, hkv=1, d=16, dtype=torch.float16)
        backends = ("triton",)
    else:
        if not torch.cuda.is_available():
            sys.exit("decode_bandwidth: needs a CUDA GPU (or --dry)")
        device = torch.device("cuda")
        ks = [int(k) for k in args.ks.split(",")]
        ns = [int(n) for n in args.ns.split(",")]
        shape, backends = dict(hq=32, hkv=8, d=128, dtype=torch.bfloat16), ("auto", "triton")
    out = open(args.out, "w") if args.out else None
    ceil = ceilings(device)
    head = {"ceilings": ceil, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry)"}
    print(json.dumps(head), flush=True)
    if out:
        out.write(json.dumps(head) + "\n")
        out.flush()
    rows = []
    for n in ns:
        for k in ks:
            if args.time_limit and time.monotonic() - start > args.time_limit:
                print(f"time limit: N={n} K={k} not run", flush=True)
                continue
            x = decode_inputs(n, k, shape["hq"], shape["hkv"], shape["d"], shape["dtype"], device)
            args_ = (x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], x["segment"], x["branch"])
            for backend in backends:
                def step(backend=backend):
                    return public_op(*args_, q_seqlens=x["q_seqlens"], backend=backend, check_values=False)

                used = resolve("branch_attention_with_kvcache", device) if backend == "auto" else backend
                g = shape["hq"] // shape["hkv"]
                cfg = tk.decode_config_for(k * g, shape["d"], shape["dtype"], device, False)
                r = dict(K=k, n=n, backend=backend, resolved=used, bytes=x["bytes"],
                         triton_splits=tk.num_splits_for(1, shape["hkv"], -(-k * g // cfg.block_m), n, device,
                                                         cfg.block_n),
                         triton_tiles=[cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages])
                try:
                    t = measure(step, device, min_reps=30, max_reps=60, warmup=1, graph=True, flush=True,
                                flush_by="read")
                    r.update(status="ok", total_us=t.ms * 1e3, timing=t.mode,
                             gbps=x["bytes"] / (t.ms * 1e-3) / 1e9)
                    r["frac_copy"] = r["gbps"] / ceil["copy_gbps"]
                    if "read_gbps" in ceil:
                        r["frac_read"] = r["gbps"] / ceil["read_gbps"]
                    if device.type == "cuda":
                        r.update(_profiled(step, device))
                except Exception as exc:  # noqa: BLE001 - one failing case is a row, not a lost run
                    r.update(status="error", reason=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                rows.append(r)
                if out:
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                print(_line(r), flush=True)
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\ncopy {ceil['copy_gbps']:.0f} GB/s, read {ceil.get('read_gbps', float('nan')):.0f} GB/s, matmul "
          f"{ceil['matmul_tflops']:.0f} TFLOP/s; {len(rows)} rows in {time.monotonic() - start:.0f}s")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"N={r['n']:6d} K={r['K']:2d} {r['backend']:6s}: {r['reason']}"
    parts = [f"N={r['n']:6d} K={r['K']:2d} {r['backend']:6s}({r['resolved']}) {r['total_us']:8.1f} us",
             f"{100 * r['frac_copy']:5.1f}% of copy"]
    if "decode_us" in r:
        parts.append(f"decode {r['decode_us']:7.1f} us + merge {r['merge_us']:5.1f} us")
    return "  ".join(parts) + f"  (triton splits {r['triton_splits']}, tiles {r['triton_tiles']})"


if __name__ == "__main__":
    raise SystemExit(main())
