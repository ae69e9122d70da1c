"""One cache row attended as a shared prefix plus per-query key lists (``decode_plan.Split``), with batched matmuls
and one softmax over both parts.

Why matmuls and not the fused flash kernel: with a decoding step's few queries the flash kernel runs each query
head as its own ``[Lq, D]`` tile, while GQA lets a matmul take all ``G = Hq / Hkv`` query heads of a KV head as one
``[G * Lq, D]`` operand against the keys read once; on the CPU that runs the prefix about a tenth faster, and it
needs no mask at all. The per-query lists are gathered (a copy of ``Hkv * Lq * m`` rows, at most about the row's
size: ``decode_plan`` checks ``Lq * m <= n``) and attended in a batch of ``Hkv * Lq`` small matmuls. Scores of both
parts are joined before the softmax, so no log-sum-exp merge is needed; they are ``Hq * Lq * (c + m)`` elements,
bounded by ``sdpa_tiles.MASK_ELEMENTS``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .decode_plan import Split


def _as_acc(t: Tensor, acc: torch.dtype) -> Tensor:
    return t if t.dtype == acc else t.to(acc)


def attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, b: int, sp: Split, scale: float, acc: torch.dtype) -> Tensor:
    """``q [Lq, Hq, D]`` (one row's queries) against contiguous caches (``[B, Ncap, Hkv, D]`` or paged
    ``[blocks, block_size, Hkv, D]``); ``b`` is the row of a contiguous cache. Returns ``[Hkv, Lq, G, Dv]`` in
    ``acc`` (query head ``h * G + g`` at ``[h, :, g]``)."""
    lq, hq, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    g = hq // hkv
    c, m = sp.c, sp.m
    # queries grouped by KV head, scaled once here rather than on the (larger) scores
    qh = torch.empty((hkv, lq, g, d), dtype=acc)
    heads = q.view(lq, hkv, g, d).transpose(0, 1)
    if q.dtype == acc:
        torch.mul(heads, scale, out=qh)
    else:  # in acc: a low-precision product would round the scaled queries
        qh.copy_(heads).mul_(scale)
    if sp.prefix is None:
        kp, vp = k_cache[b, :c], v_cache[b, :c]  # [c, Hkv, D] views
    else:
        kp = k_cache.view(-1, hkv, d).index_select(0, sp.prefix)
        vp = v_cache.view(-1, hkv, dv).index_select(0, sp.prefix)
    kp, vp = _as_acc(kp, acc), _as_acc(vp, acc)
    scores = torch.bmm(qh.view(hkv, lq * g, d), kp.permute(1, 2, 0)).view(hkv, lq, g, c)
    if m:
        kt = _as_acc(k_cache.view(-1, d).index_select(0, sp.tail), acc).view(hkv * lq, m, d)
        tail = torch.bmm(qh.view(hkv * lq, g, d), kt.transpose(1, 2)).view(hkv, lq, g, m)
        scores = torch.cat([scores, tail], -1)
        if sp.pad is not None:
            scores[..., c:].masked_fill_(sp.pad.view(1, lq, 1, m), float("-inf"))
    p = torch.softmax(scores, -1)
    out = torch.bmm(p.view(hkv, lq * g, c + m)[..., :c], vp.transpose(0, 1))
    if m:
        vt = _as_acc(v_cache.view(-1, dv).index_select(0, sp.tail), acc).view(hkv * lq, m, dv)
        out = torch.baddbmm(out.view(hkv * lq, g, dv), p.view(hkv * lq, g, c + m)[..., c:], vt)
    return out.view(hkv, lq, g, dv)
