"""``branch_attention_with_kvcache`` on the CPU: per cache row, one call of torch's fused CPU flash kernel over the
row's valid slots, with the ``[Lq, n]`` additive mask built from the ids in a few broadcast compares.

Why not the query tiles of ``sdpa_tiles``: a decoding step has few queries (one per live branch), so a single tile
covers them, and at small caches the fixed cost around the kernel (index tensors, the mask, output copies) is what
separates us from dense SDPA. Here the mask and the row plan depend only on the lengths and the cache ids, so inside
a ``step_scope`` every layer of a step reuses the first layer's (``step_cache``); a layer then costs one kernel call
and one output copy per row. Rows whose mask would exceed the tile bound fall back to the query tiles, so memory
stays O(N * tile).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import sdpa_tiles
from .step_cache import shared
from .visibility import acc_dtype

_AHEAD: dict[tuple[int, torch.device], Tensor] = {}


class _Row(NamedTuple):
    b: int  # cache row
    n: int  # valid slots (clamped to the capacity)
    lq: int  # queries: the last lq of the n slots
    mask: Tensor | None  # [lq, n] additive (0 / -inf), accumulation dtype; None: use the query tiles
    slots: tuple[Tensor, Tensor] | None  # paged cache: (block, offset) int64 [n] of each slot; None if contiguous


def _ahead(lq: int, device: torch.device) -> Tensor:
    """bool ``[lq, lq]``, True strictly above the diagonal: the new tokens a query must not see (cached)."""
    key = (lq, device)
    if key not in _AHEAD:
        _AHEAD[key] = torch.ones((lq, lq), dtype=torch.bool, device=device).triu(1)
    return _AHEAD[key]


def _mask(seg: Tensor, br: Tensor, lq: int, acc: torch.dtype) -> Tensor:
    """Additive mask ``[lq, n]`` for the queries at the last ``lq`` of the ``n`` slots whose ids are ``seg, br
    int32 [n]``: SPEC section 2. Keys before the first query are never ahead of one, so causality only touches the
    last ``lq`` columns."""
    n = seg.shape[0]
    hidden = (seg == seg[n - lq:, None]) & (br != br[n - lq:, None])  # same section, a sibling branch
    hidden[:, n - lq:] |= _ahead(lq, seg.device)
    return torch.zeros(hidden.shape, dtype=acc, device=seg.device).masked_fill_(hidden, float("-inf"))


def _rows(cache_seqlens: Tensor, q_seqlens: Tensor, segment: Tensor, branch: Tensor, block_table: Tensor | None,
          per_row: int, lq_max: int, acc: torch.dtype) -> list[_Row]:
    """The rows with queries, each with its mask and (paged) slot index: what every layer of a step shares."""
    capacity = per_row if block_table is None else block_table.shape[1] * per_row
    rows = []
    for b, (n, lq) in enumerate(zip(cache_seqlens.tolist(), q_seqlens.tolist())):
        n = max(0, min(n, capacity))  # clamp: unchecked values never read out of bounds
        lq = max(0, min(lq, lq_max, n))
        if lq == 0:
            continue
        slots = None
        if block_table is None:
            seg, br = segment[b, :n], branch[b, :n]
        else:
            s = torch.arange(n, device=segment.device)
            slots = (block_table[b, s // per_row].long(), s % per_row)
            seg, br = segment[slots], branch[slots]
        small = lq * n <= sdpa_tiles.MASK_ELEMENTS
        rows.append(_Row(b, n, lq, _mask(seg, br, lq, acc) if small else None, slots))
    return rows


def branch_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table,
                                  softmax_scale):
    """CPU tensors only (``sdpa_tiles.supported``); the contract of ``attention.branch_attention_with_kvcache``."""
    acc = acc_dtype(q)
    rows = shared("decode", (cache_seqlens, q_seqlens, segment, branch, block_table),
                  (tuple(k_cache.shape[:2]), q.shape[1], acc),
                  lambda: _rows(cache_seqlens, q_seqlens, segment, branch, block_table, k_cache.shape[1],
                                q.shape[1], acc))
    out = torch.zeros(q.shape[:-1] + (v_cache.shape[-1],), dtype=q.dtype, device=q.device)
    for r in rows:
        if r.slots is None:
            k, v = k_cache[r.b, :r.n], v_cache[r.b, :r.n]
        else:
            k, v = k_cache[r.slots], v_cache[r.slots]
        if r.mask is None:  # a long prefill-like row: query tiles keep the mask O(tile)
            seg = segment[r.b, :r.n] if r.slots is None else segment[r.slots]
            br = branch[r.b, :r.n] if r.slots is None else branch[r.slots]
            q_index = torch.arange(r.n - r.lq, r.n, device=q.device)
            out[r.b, :r.lq] = sdpa_tiles.attend_fwd(q[r.b, :r.lq], k, v, seg, br, q_index, softmax_scale)[0]
            continue
        heads = sdpa_tiles.as_heads
        o = sdpa_tiles.flash_fwd(heads(q[r.b, :r.lq].to(acc)), heads(k.to(acc)), heads(v.to(acc)),
                                 attn_mask=r.mask, scale=softmax_scale)[0]
        out[r.b, :r.lq] = o[0].transpose(0, 1)
    return out
