"""``branch_attention`` forward + backward (training) on one sequence of N tokens against the baselines that have
a backward: dense-mask SDPA, FlexAttention (compiled; it has no backward on the CPU) and the mask-free causal flash
ceiling. Each call runs the forward and ``torch.autograd.grad`` of q, k, v for a fixed random ``dout``.

Work counted: FLOP = 14 * Hq * D * visible pairs (forward 4, backward 10: ``q.k`` recomputed, then ``dv``, ``dp``,
``dq``, ``dk``, 2D each, as the Triton tutorial's 2.5x); bytes = forward (cases.prefill_bytes) + backward (q, k, v,
out, dout, lse read; dq, dk, dv written). Timed eagerly (CUDA events, no graph): the kernels take milliseconds,
so host overhead does not matter here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aspd_kernels import branch_attention
from aspd_kernels.reference import dense_mask

from . import baselines
from .cases import AttnCase, build_layout, prefill_bytes, visible_counts
from .common import Context, add_ratios, package_backends
from .runner import time_impl

OP = "branch_attention_backward"


def cases(ctx: Context) -> list[AttnCase]:
    if ctx.grid == "full":
        out = [AttnCase(n, 16, "interleaved", 32, 8, 128, "tokens") for n in (4096, 16384, 32768, 65536)]
        return out + [AttnCase(16384, k, "interleaved", 32, 8, 128, "branches") for k in (4, 64)]
    if ctx.grid == "quick":
        return [AttnCase(16384, 16, "interleaved", 32, 8, 128, "tokens")]
    return [AttnCase(256, 4, s, 8, 2, 64, "tokens") for s in ("contiguous", "interleaved")]


def backward_bytes(n: int, hq: int, hkv: int, d: int, elt: int) -> int:
    return elt * (4 * n * hq * d + 4 * n * hkv * d) + 4 * hq * n + 8 * n


def run_case(ctx: Context, case: AttnCase) -> list[dict]:
    seg, br, layout = build_layout(case.n, case.k, case.storage, decode=False)
    pairs = int(visible_counts(seg, br).sum())
    n, g = case.n, case.hq // case.hkv
    layout.update(visible_pairs=pairs, causal_pairs=n * (n + 1) // 2, sweep=case.sweep)
    dev, dt = ctx.device, ctx.dtype
    seg, br = seg.to(dev), br.to(dev)
    gen = torch.Generator(device=dev).manual_seed(n * 31 + case.k)
    q = torch.randn(n, case.hq, case.d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(n, case.hkv, case.d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(n, case.hkv, case.d, device=dev, dtype=dt, generator=gen)
    dout = torch.randn(n, case.hq, case.d, device=dev, dtype=dt, generator=gen)
    cu = torch.tensor([0, n], dtype=torch.int32, device=dev)
    scale = case.d ** -0.5
    common = dict(shape={"B": 1, "total_q": n, "total_k": n, "Hq": case.hq, "Hkv": case.hkv, "D": case.d},
                  layout=layout, flops=14 * case.hq * case.d * pairs,
                  nbytes=prefill_bytes(n, n, case.hq, case.hkv, case.d, ctx.elt)
                  + backward_bytes(n, case.hq, case.hkv, case.d, ctx.elt))

    def leaves(*ts):
        return [t.detach().clone().requires_grad_(True) for t in ts]

    rows = []
    for name, why in package_backends("branch_attention_bwd", ctx, n):
        def setup(name=name):
            ql, kl, vl = leaves(q, k, v)

            def fb():
                out = branch_attention(ql, kl, vl, seg, br, cu, cu, n, n, check_values=False, backend=name)
                return torch.autograd.grad(out, (ql, kl, vl), dout)
            return {"fn": fb}
        rows.append(time_impl(ctx, OP, None if why else setup, why, backend=name, graph=False, **common))

    d_b = baselines._bhnd(dout)

    def dense():
        ql, kl, vl = leaves(baselines._bhnd(q), baselines._bhnd(k), baselines._bhnd(v))
        mask = dense_mask(seg, br)

        def fb():  # k, v expanded to Hq heads inside the graph so that their gradients flow (transformers' repeat_kv)
            out = F.scaled_dot_product_attention(ql, kl.repeat_interleave(g, 1), vl.repeat_interleave(g, 1),
                                                 attn_mask=mask, scale=scale)
            return torch.autograd.grad(out, (ql, kl, vl), d_b)
        return {"fn": fb, "build": lambda: dense_mask(seg, br)}

    need = n * n * 5
    rows.append(time_impl(ctx, OP, dense if need <= ctx.mask_cap_bytes else None,
                          f"N x N mask needs {need / 2**30:.1f} GiB > cap {ctx.mask_cap_bytes / 2**30:.1f} GiB",
                          baseline="sdpa_dense", graph=False, **common))

    def flex():
        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & ((seg[ki] != seg[qi]) | (br[ki] == br[qi]))

        build = baselines._block_mask_builder(mask_mod, n, n, dev, True)
        bm = build()
        ql, kl, vl = leaves(baselines._bhnd(q), baselines._bhnd(k), baselines._bhnd(v))
        attn = baselines._flex()

        def fb():
            out = attn(ql, kl, vl, block_mask=bm, scale=scale, enable_gqa=g > 1)
            return torch.autograd.grad(out, (ql, kl, vl), d_b)
        return {"fn": fb, "build": build}

    rows.append(time_impl(ctx, OP, flex if ctx.cuda else None, "FlexAttention has no backward on the CPU",
                          baseline="flex", graph=False, **common))

    def causal():
        ql, kl, vl = leaves(baselines._bhnd(q), baselines._bhnd(k), baselines._bhnd(v))

        def fb():
            out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True, scale=scale, enable_gqa=g > 1)
            return torch.autograd.grad(out, (ql, kl, vl), d_b)
        return {"fn": baselines._flash(fb, dev)}

    rows.append(time_impl(ctx, OP, causal, None, baseline="flash_causal", graph=False, **common))
    add_ratios(rows)
    return rows
