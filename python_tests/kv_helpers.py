"""Build decoding caches (contiguous or paged) from random layouts, shared by the KV-cache tests of every backend."""
from __future__ import annotations

import random

import torch
from layouts import random_layout


def make_cache(seed: int, batch: int, hkv: int, d: int, dtype, paged: bool = False, block_size: int = 16,
               max_tokens: int = 150, extra: int = 13, poison: bool = True):
    """Random per-sequence layouts written into a cache of capacity ``max(len) + extra``.

    Returns a dict with k_cache, v_cache, segment, branch (cache layout), block_table (or None), cache_seqlens,
    and the per-sequence logical tensors (for building references). Unused slots hold NaN (``poison``) so that a
    kernel that reads them produces NaN.
    """
    rng = random.Random(seed)
    layouts = [random_layout(seed * 100 + b, rng.randint(max_tokens // 3, max_tokens)) for b in range(batch)]
    lens = [s.numel() for s, _ in layouts]
    cap = max(lens) + extra
    fill = float("nan") if poison else 0.0
    k = torch.full((batch, cap, hkv, d), fill, dtype=dtype)
    v = torch.full((batch, cap, hkv, d), fill, dtype=dtype)
    seg = torch.full((batch, cap), -7, dtype=torch.int32)
    br = torch.full((batch, cap), -7, dtype=torch.int32)
    for b, (s, r) in enumerate(layouts):
        n = s.numel()
        k[b, :n] = torch.randn(n, hkv, d).to(dtype)
        v[b, :n] = torch.randn(n, hkv, d).to(dtype)
        seg[b, :n], br[b, :n] = s, r
    out = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32), logical=(k, v, seg, br), block_table=None)
    if not paged:
        out.update(k_cache=k, v_cache=v, segment=seg, branch=br)
        return out
    per_seq = -(-cap // block_size)
    n_blocks = batch * per_seq + 3
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))[: batch * per_seq]
    table = perm.view(batch, per_seq).to(torch.int32)
    pk = torch.full((n_blocks, block_size, hkv, d), fill, dtype=dtype)
    pv = torch.full_like(pk, fill)
    ps = torch.full((n_blocks, block_size), -7, dtype=torch.int32)
    pb = torch.full_like(ps, -7)
    padded = per_seq * block_size
    for name, src, dst in (("k", k, pk), ("v", v, pv), ("s", seg, ps), ("b", br, pb)):
        full = torch.nn.functional.pad(src, (0, 0) * (src.dim() - 2) + (0, padded - cap),
                                       value=fill if name in "kv" else -7)
        dst[table.long()] = full.view(batch, per_seq, block_size, *src.shape[2:])
    out.update(k_cache=pk, v_cache=pv, segment=ps, branch=pb, block_table=table)
    return out
