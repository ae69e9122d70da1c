"""One decoding step's inputs at benchmark shapes, contiguous or paged, shared by the decode sweep
(``tune_decode``) and the bandwidth stage (``decode_bandwidth``).

The layout is the benchmark's decode layout (``cases.build_layout``: a serial prefix of N/2, then K interleaved
branches, the last K slots the new tokens). A paged cache uses ``page``-slot blocks in a shuffled block table, as
an engine's allocator leaves them after a while.
"""
from __future__ import annotations

import importlib

import torch

from .cases import build_layout

# the package re-exports the op under its module's name: import the module itself
tk = importlib.import_module("aspd_kernels.triton.branch_attention_with_kvcache")


def decode_inputs(n: int, k: int, hq: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device,
                  paged: bool = False, page: int = 16, seed: int = 0) -> dict:
    """``{"q", "k_cache", "v_cache", "cache_seqlens", "segment", "branch", "q_seqlens", "block_table",
    "bytes"}`` for one sequence of ``n`` cached tokens and ``k`` new ones (``q [1, k, hq, d]``). ``bytes``: the
    fewest a step moves (bench/README.md's decode formula)."""
    g = torch.Generator(device).manual_seed(seed)  # generated where it is used: 128k-token caches in a blink
    seg, br, _ = build_layout(n, k, "interleaved", decode=True)
    seg, br = seg.to(device), br.to(device)
    kc = torch.randn(1, n, hkv, d, generator=g, device=device).to(dtype)
    vc = torch.randn(1, n, hkv, d, generator=g, device=device).to(dtype)
    table = None
    if paged:
        blocks = -(-n // page)
        pad = blocks * page - n
        perm = torch.randperm(blocks, generator=g, device=device)

        def pages(x, fill):
            x = torch.cat([x[0], x.new_full((pad, *x.shape[2:]), fill)]) if pad else x[0]
            out = torch.empty_like(x.view(blocks, page, *x.shape[1:]))
            out[perm] = x.view(blocks, page, *x.shape[1:])
            return out
        kc, vc = pages(kc, 0), pages(vc, 0)
        seg, br = pages(seg[None], -1), pages(br[None], -1)
        table = perm[None].to(torch.int32)
    else:
        seg, br = seg[None], br[None]
    elt = torch.finfo(dtype).bits // 8
    out = dict(q=torch.randn(1, k, hq, d, generator=g, device=device).to(dtype), k_cache=kc, v_cache=vc,
               cache_seqlens=torch.tensor([n], dtype=torch.int32, device=device), segment=seg, branch=br,
               q_seqlens=torch.tensor([k], dtype=torch.int32, device=device), block_table=table)
    out["bytes"] = elt * (2 * k * hq * d + 2 * n * hkv * d) + 8 * n
    return out


def triton_step(x: dict, **kw) -> torch.Tensor:
    """The Triton decode launcher on ``x`` (``kw``: ``num_splits``, ``config``)."""
    return tk.branch_attention_with_kvcache(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], x["segment"],
                                            x["branch"], x["q_seqlens"], x["block_table"],
                                            x["q"].shape[-1] ** -0.5, **kw)
