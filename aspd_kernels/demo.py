"""A short tour: build an ASPD-style layout, run every op on each available backend and print the error against
the dense float64 reference.

    python -m aspd_kernels.demo [--device cuda] [--tokens 600]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from . import (BranchLayout, branch_attention, branch_attention_with_kvcache, reference as R, remap_positions,
               rope_append_kv, rope_cos_sin_cache)
from ._dispatch import BACKENDS, resolve


def _layout(tokens: int) -> BranchLayout:
    """A prompt, a parallel section of 6 ragged branches decoded interleaved, a serial tail, a second section."""
    prefix = max(8, tokens // 4)
    branches = [max(1, tokens // 10 - 7 * j) for j in range(6)]
    return BranchLayout.from_sections(
        [("serial", prefix), ("parallel", branches), ("serial", 9), ("parallel", [5, 3, 8]), ("serial", 4)],
        storage="interleaved",
    )


def _rows(device: torch.device, tokens: int):
    lay = _layout(tokens)
    seg, br = lay.segment.to(device), lay.branch.to(device)
    n, hq, hkv, d = seg.numel(), 8, 2, 64
    dtype = torch.float32
    q, k, v = (torch.randn(n, h, d, device=device, dtype=dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    ref_out = R.branch_attention(q.double(), k.double(), v.double(), seg, br, cu, cu)[0]
    ref_pos = R.remap_positions(seg, br)
    lq = 6  # one decoding step of six live branches
    qd = q[-lq:][None]
    ref_dec = R.branch_attention_with_kvcache(qd.double(), k[None].double(), v[None].double(),
                                              torch.tensor([n], dtype=torch.int32, device=device), seg[None], br[None])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    csc = rope_cos_sin_cache(inv_freq, 2 * n)
    backends = []
    for b in BACKENDS:
        try:
            resolve("branch_attention_with_kvcache", device, b)
            backends.append(b)
        except ValueError:
            pass
    yield "layout", f"{n} tokens, {len(set(seg.tolist()))} sections, {int(br.max())} branches max", "", ""
    seqlens = torch.tensor([n], dtype=torch.int32, device=device)
    for b in backends:
        ops = {
            "branch_attention": (lambda: branch_attention(q, k, v, seg, br, cu, cu, n, n, backend=b), ref_out),
            "branch_attention_with_kvcache": (lambda: branch_attention_with_kvcache(
                qd, k[None], v[None], seqlens, seg[None], br[None], backend=b), ref_dec),
            "remap_positions": (lambda: remap_positions(seg, br, backend=b), ref_pos),
            "rope_append_kv": _rope(q, k, v, seg, br, csc, b),
        }
        for op, (run, ref) in ops.items():
            try:
                run()  # warm-up: the first custom-op call imports torch's compiler stack
                t0 = time.perf_counter()
                got = run()
                ms = (time.perf_counter() - t0) * 1e3
                err = (got.double() - ref.double()).abs().max().item()
                yield op, b, f"{err:.2e}", f"{ms:.1f}"
            except ValueError as exc:
                yield op, b, "n/a", str(exc)[:40]


def _rope(q, k, v, seg, br, csc, backend):
    """(op call returning rotated q and the written k cache, the same from the reference)."""
    n = q.shape[0]
    pos = R.remap_positions(seg, br)[None]
    seqlens = torch.tensor([n], dtype=torch.int32, device=q.device)

    def caches():
        kv = [torch.zeros(1, n, k.shape[1], k.shape[2], device=q.device, dtype=q.dtype) for _ in range(2)]
        return kv + [torch.zeros(1, n, dtype=torch.int32, device=q.device) for _ in range(2)]

    ref_caches = caches()
    ref = R.rope_append_kv(q[None], k[None], v[None], pos, csc, *ref_caches, seqlens, seg[None], br[None])

    def run():
        c = caches()
        got = rope_append_kv(q[None], k[None], v[None], pos, csc, *c, seqlens, seg[None], br[None], backend=backend)
        return torch.cat([got.flatten(), c[0].flatten()])

    return run, torch.cat([ref.flatten(), ref_caches[0].flatten()])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=600)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    from . import _cuda

    why = _cuda.load_error()
    print(f"CUDA extension: {'loaded' if _cuda.available() else 'not available'}" + (f" ({why})" if why else ""))
    rows = list(_rows(torch.device(args.device), args.tokens))
    widths = [max(len(str(r[i])) for r in rows + [("op", "backend", "max |err|", "ms")]) for i in range(4)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    print(line(("op", "backend", "max |err|", "ms")))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    print("(errors against the dense float64 reference, float32 inputs; times after one warm-up call)")


if __name__ == "__main__":
    main()
