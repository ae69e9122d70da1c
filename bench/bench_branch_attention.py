"""``branch_attention`` (prefill / training forward) on one sequence of N tokens against its baselines.

Work counted for every implementation of a case (so the rates compare like with like):
FLOP = 4 * Hq * D * visible pairs (cases.attention_flops); bytes = cases.prefill_bytes.
"""
from __future__ import annotations

import torch

from aspd_kernels import branch_attention

from . import baselines
from .cases import AttnCase, attention_cases, attention_flops, build_layout, prefill_bytes, visible_counts
from .common import Context, add_ratios, package_backends
from .runner import time_impl

OP = "branch_attention"


def cases(ctx: Context) -> list[AttnCase]:
    return attention_cases(ctx.grid, ctx.cuda)


def run_case(ctx: Context, case: AttnCase) -> list[dict]:
    seg, br, layout = build_layout(case.n, case.k, case.storage, decode=False)
    pairs = int(visible_counts(seg, br).sum())
    n = case.n
    layout.update(visible_pairs=pairs, causal_pairs=n * (n + 1) // 2, sweep=case.sweep)
    dev = ctx.device
    seg, br = seg.to(dev), br.to(dev)
    gen = torch.Generator(device=dev).manual_seed(n * 131 + case.k)
    q = torch.randn(n, case.hq, case.d, device=dev, dtype=ctx.dtype, generator=gen)
    k = torch.randn(n, case.hkv, case.d, device=dev, dtype=ctx.dtype, generator=gen)
    v = torch.randn(n, case.hkv, case.d, device=dev, dtype=ctx.dtype, generator=gen)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    common = dict(shape={"B": 1, "total_q": n, "total_k": n, "Hq": case.hq, "Hkv": case.hkv, "D": case.d},
                  layout=layout, nbytes=prefill_bytes(n, n, case.hq, case.hkv, case.d, ctx.elt),
                  flops=attention_flops(case.hq, case.d, pairs))
    rows = []
    for name, why in package_backends("branch_attention_fwd", ctx, n):
        def setup(name=name):
            # check_values=False: the value checks read the device (a host sync) and are not the kernel's cost
            return {"fn": lambda: branch_attention(q, k, v, seg, br, cu, cu, n, n, check_values=False,
                                                   backend=name)}
        rows.append(time_impl(ctx, OP, None if why else setup, why, backend=name, graph=name != "torch",
                              **common))
    for name, setup, why in baselines.prefill(case, q, k, v, seg, br, layout, ctx.mask_cap_bytes, ctx.cuda):
        rows.append(time_impl(ctx, OP, setup, why, baseline=name, **common))
    add_ratios(rows)
    return rows
