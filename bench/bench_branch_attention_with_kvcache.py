"""``branch_attention_with_kvcache``: one decoding step (the newest token of each of K branches) over a cache of N
valid slots, batch 1, against its baselines.

Work counted for every implementation of a case: FLOP = 4 * Hq * D * visible pairs of the K queries;
bytes = cases.decode_bytes (the cache read once dominates: the step is memory-bound).
"""
from __future__ import annotations

import torch

from aspd_kernels import branch_attention_with_kvcache

from . import baselines
from .cases import AttnCase, attention_cases, attention_flops, build_layout, decode_bytes, visible_counts
from .common import Context, add_ratios, package_backends
from .runner import time_impl

OP = "branch_attention_with_kvcache"


def cases(ctx: Context) -> list[AttnCase]:
    return attention_cases(ctx.grid, ctx.cuda)


def run_case(ctx: Context, case: AttnCase) -> list[dict]:
    seg, br, layout = build_layout(case.n, case.k, case.storage, decode=True)
    n, kq = case.n, case.k
    pairs = int(visible_counts(seg, br)[n - kq:].sum())
    layout.update(visible_pairs=pairs, sweep=case.sweep)
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(n * 977 + kq)
    cap = n  # exactly the valid slots: the cache read is the op's real traffic
    k_cache = torch.randn(1, cap, case.hkv, case.d, device=dev, dtype=ctx.dtype, generator=gen)
    v_cache = torch.randn(1, cap, case.hkv, case.d, device=dev, dtype=ctx.dtype, generator=gen)
    q = torch.randn(1, kq, case.hq, case.d, device=dev, dtype=ctx.dtype, generator=gen)
    segment, branch = seg.to(dev)[None], br.to(dev)[None]
    seqlens = torch.tensor([n], dtype=torch.int32, device=dev)
    common = dict(shape={"B": 1, "Lq": kq, "cache_len": n, "Hq": case.hq, "Hkv": case.hkv, "D": case.d},
                  layout=layout, nbytes=decode_bytes(kq, n, case.hq, case.hkv, case.d, ctx.elt),
                  flops=attention_flops(case.hq, case.d, pairs))
    rows = []
    for name, why in package_backends("branch_attention_with_kvcache", ctx):
        def setup(name=name):
            return {"fn": lambda: branch_attention_with_kvcache(q, k_cache, v_cache, seqlens, segment, branch,
                                                                check_values=False, backend=name)}
        rows.append(time_impl(ctx, OP, None if why else setup, why, backend=name, graph=name != "torch",
                              **common))
    for name, setup, why in baselines.decode(case, q, k_cache, v_cache, segment, branch, layout,
                                             ctx.mask_cap_bytes, ctx.cuda):
        rows.append(time_impl(ctx, OP, setup, why, baseline=name, **common))
    add_ratios(rows)
    return rows
