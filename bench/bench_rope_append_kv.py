"""``rope_append_kv`` (rotary on q and k, k/v/segment/branch written into the cache, one op) against the unfused
torch a transformers-style engine runs: rotate-half on q and k, then four indexed cache writes.

Bytes counted (fewest): q read and written, k and v read and written into the cache, the new tokens' ids read and
written (int32), positions read, one ``cos_sin_cache`` row (float32) read per token. FLOP: 3 per rotated element
(two products, one sum), (Hq + Hkv) * L * rot_dim * 3: the op is memory-bound, the FLOP rate is only reported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from aspd_kernels import rope_append_kv, rope_cos_sin_cache

from .cases import build_layout
from .common import Context, add_ratios, package_backends
from .runner import time_impl

OP = "rope_append_kv"


@dataclass(frozen=True)
class RopeCase:
    tokens: int  # new tokens appended by the call
    cache: int  # cache capacity
    hq: int
    hkv: int
    d: int
    sweep: str  # "decode" (one step of K branches) or "prefill" (a chunk)

    def key(self) -> str:
        return f"L={self.tokens} cache={self.cache} H={self.hq}/{self.hkv} D={self.d}"

    def as_dict(self) -> dict:
        return asdict(self)


def cases(ctx: Context) -> list[RopeCase]:
    if ctx.grid == "full":
        out = [RopeCase(k, 32768, 32, 8, 128, "decode") for k in (1, 4, 16, 64)]
        out += [RopeCase(n, n, 32, 8, 128, "prefill") for n in (1024, 4096, 16384, 65536)]
        return out + [RopeCase(16, 32768, 8, 8, 64, "decode"), RopeCase(16384, 16384, 8, 8, 64, "prefill")]
    if ctx.grid == "quick":
        return [RopeCase(16, 32768, 32, 8, 128, "decode"), RopeCase(4096, 4096, 32, 8, 128, "prefill")]
    return [RopeCase(4, 2048, 8, 2, 64, "decode"), RopeCase(1024, 1024, 8, 2, 64, "prefill")]


def rope_bytes(case: RopeCase, elt: int) -> int:
    n = case.tokens
    return elt * n * case.d * (2 * case.hq + 4 * case.hkv) + n * (8 + 8 + 4 + 4 * case.d)


def unfused(q, k, v, positions, cos_sin, k_cache, v_cache, seg_cache, br_cache, slots, segment, branch):
    """transformers' ``apply_rotary_pos_emb`` (rotate-half) plus indexed writes: the baseline, batch 1."""
    half = cos_sin.shape[1] // 2
    rows = cos_sin[positions[0].long()]  # [L, rot]
    cos = torch.cat([rows[:, :half], rows[:, :half]], -1)[:, None, :].to(q.dtype)
    sin = torch.cat([rows[:, half:], rows[:, half:]], -1)[:, None, :].to(q.dtype)

    def rotate(x):
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    q_rot = rotate(q[0])
    k_cache[0, slots] = rotate(k[0])
    v_cache[0, slots] = v[0]
    seg_cache[0, slots] = segment[0]
    br_cache[0, slots] = branch[0]
    return q_rot


def run_case(ctx: Context, case: RopeCase) -> list[dict]:
    dev, dt, n = ctx.device, ctx.dtype, case.tokens
    gen = torch.Generator(device=dev).manual_seed(n * 7 + case.cache)
    q = torch.randn(1, n, case.hq, case.d, device=dev, dtype=dt, generator=gen)
    k = torch.randn(1, n, case.hkv, case.d, device=dev, dtype=dt, generator=gen)
    v = torch.randn(1, n, case.hkv, case.d, device=dev, dtype=dt, generator=gen)
    # the new tokens: one decoding step of n branches, or a chunk of a prefill (the tail of an ASPD layout)
    seg_all, br_all, layout = build_layout(max(case.cache, 2 * n + 2), min(n, 64) if case.sweep == "decode" else 4,
                                           "interleaved", decode=case.sweep == "decode")
    segment, branch = seg_all[-n:].to(dev)[None], br_all[-n:].to(dev)[None]
    positions = torch.arange(case.cache - n, case.cache, device=dev, dtype=torch.int32)[None]
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, case.d, 2, dtype=torch.float64) / case.d))
    cos_sin = rope_cos_sin_cache(inv_freq, case.cache).to(dev)
    k_cache = torch.randn(1, case.cache, case.hkv, case.d, device=dev, dtype=dt, generator=gen)
    v_cache = torch.randn_like(k_cache)
    seg_cache = torch.zeros(1, case.cache, dtype=torch.int32, device=dev)
    br_cache = torch.zeros_like(seg_cache)
    seqlens = torch.tensor([case.cache], dtype=torch.int32, device=dev)
    slots = torch.arange(case.cache - n, case.cache, device=dev)
    layout = {"sweep": case.sweep, "new_tokens": n}
    common = dict(shape={"B": 1, "L": n, "cache": case.cache, "Hq": case.hq, "Hkv": case.hkv, "D": case.d,
                         "rot_dim": case.d},
                  layout=layout, nbytes=rope_bytes(case, ctx.elt), flops=(case.hq + case.hkv) * n * case.d * 3)
    rows = []
    for name, why in package_backends("rope_append_kv", ctx):
        def setup(name=name):
            return {"fn": lambda: rope_append_kv(q, k, v, positions, cos_sin, k_cache, v_cache, seg_cache, br_cache,
                                                 seqlens, segment, branch, check_values=False, backend=name)}
        rows.append(time_impl(ctx, OP, None if why else setup, why, backend=name, graph=name != "torch",
                              **common))

    def base():
        return {"fn": lambda: unfused(q, k, v, positions, cos_sin, k_cache, v_cache, seg_cache, br_cache, slots,
                                      segment, branch)}

    rows.append(time_impl(ctx, OP, base, None, baseline="unfused_torch", **common))
    add_ratios(rows)
    return rows
