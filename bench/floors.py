"""The two floors of the key benchmark cases before anything runs: fewest bytes / bandwidth and visible-pair
FLOP / matmul rate, for the same layouts the benchmark builds (``bench.cases``). Predictions to check a GPU run
against (METHOD: "two numbers first"), not measurements.

    python -m bench.floors                      # at 4.3 TB/s and 780 TFLOP/s (an H200 of this workplace)
    python -m bench.floors --gbps 3000 --tflops 650
"""
from __future__ import annotations

import argparse

from .cases import attention_flops, build_layout, decode_bytes, prefill_bytes, visible_counts

PREFILL = ((4096, 16), (32768, 1), (32768, 16), (32768, 64), (131072, 16))
DECODE = ((16384, 4), (16384, 16), (16384, 64), (32768, 16), (131072, 16))


def floors(gbps: float, tflops: float, hq: int = 32, hkv: int = 8, d: int = 128, elt: int = 2) -> list[dict]:
    """One dict per case: op, N, K, visible pairs, bytes, FLOP, and the two floor times in microseconds."""
    bw, mm = gbps * 1e9, tflops * 1e12
    out = []
    for op, cases, decode in (("branch_attention", PREFILL, False), ("branch_attention_with_kvcache", DECODE, True)):
        for n, k in cases:
            seg, br, _ = build_layout(n, k, "interleaved", decode=decode)
            vis = visible_counts(seg, br)
            nq = k if decode else n
            pairs = int(vis[-nq:].sum())
            nbytes = (decode_bytes if decode else prefill_bytes)(nq, n, hq, hkv, d, elt)
            flop = attention_flops(hq, d, pairs)
            out.append(dict(op=op, N=n, K=k, pairs=pairs, bytes=nbytes, flop=flop,
                            bytes_us=nbytes / bw * 1e6, flop_us=flop / mm * 1e6))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gbps", type=float, default=4300.0, help="copy bandwidth, GB/s (read + write counted)")
    ap.add_argument("--tflops", type=float, default=780.0, help="bf16 matmul rate, TFLOP/s")
    args = ap.parse_args(argv)
    print(f"Hq/Hkv 32/8, D 128, bf16, interleaved; {args.gbps:.0f} GB/s, {args.tflops:.0f} TFLOP/s\n")
    print("| op | N | K | MB | GFLOP | bytes floor (us) | FLOP floor (us) | bound by |")
    print("|---|---|---|---|---|---|---|---|")
    for r in floors(args.gbps, args.tflops):
        bound = "memory" if r["bytes_us"] >= r["flop_us"] else "compute"
        print(f"| {r['op']} | {r['N']} | {r['K']} | {r['bytes'] / 1e6:.1f} | {r['flop'] / 1e9:.1f} | "
              f"{r['bytes_us']:.1f} | {r['flop_us']:.1f} | {bound} |")


if __name__ == "__main__":
    main()
