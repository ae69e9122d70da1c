"""The per-row plan of the CPU decoding op: which keys each query attends to and how, computed from the lengths,
the block table and the cache ids only (so inside a ``step_scope`` every layer of a step shares it).

Why numpy: a plan is a dozen small index operations on ``[Lq, n]`` booleans; at the sizes of a decoding step each
torch op costs several microseconds of dispatch, numpy's about one, and at N = 512 the plan is a fifth of the call.
The plan reads CPU tensors only (``sdpa_tiles.supported``) and shares their memory (``Tensor.numpy``: no copy).

A row is attended in one of three ways (``decode.py`` runs them):
- **split** (the usual decoding step): the keys ``[0, c)`` that every query sees form a shared prefix, attended by
  all queries in one matmul with no mask; each query's other visible keys (its own branch, the causal part) are
  gathered into a padded ``[Lq, m]`` list. Sibling branches are never read, so an interleaved step over K branches
  costs about ``c + n / K`` keys per query instead of ``n``.
- **flash**: one fused-kernel call over the row with an ``[Lq, n]`` additive mask, when the lists would not be
  shorter than the row (a prefill-like row: ``Lq * m > n``), the scores would exceed the tile bound, or a cache is
  not contiguous (the split gathers through a flat view).
- **tiles** (``mask is None`` and ``split is None``): ``sdpa_tiles.attend_fwd``, when even the ``[Lq, n]`` mask
  would exceed the tile bound; memory stays O(n * tile).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import sdpa_tiles

_TRI: dict[int, np.ndarray] = {}


class Split(NamedTuple):
    """A row attended as a shared prefix plus per-query key lists."""
    c: int  # keys [0, c) are visible to every query
    prefix: Tensor | None  # paged: int64 [c], the prefix's flat slots in the pool; None: contiguous row, a slice
    tail: Tensor | None  # int64 [Hkv * Lq * m]: rows of cache.view(-1, D) in (kv head, query, list entry) order
    m: int  # longest per-query list (0: no tail)
    pad: Tensor | None  # bool [Lq, m]: True past the end of a query's list; None when no list is short


class Row(NamedTuple):
    b: int  # cache row
    n: int  # valid slots (clamped to the capacity)
    lq: int  # queries: the last lq of the n slots
    split: Split | None
    mask: Tensor | None  # flash: [lq, n] additive (0 / -inf) in the accumulation dtype
    slots: tuple[Tensor, Tensor] | None  # paged: (block, offset) int64 [n] of each slot; None if contiguous


class Plan(NamedTuple):
    rows: list[Row]  # the rows with queries
    covered: bool  # every row of the output is written (no zero fill needed)


def _causal(lq: int) -> np.ndarray:
    """bool ``[lq, lq]`` lower triangle: among the new tokens, query i sees j <= i (cached)."""
    t = _TRI.get(lq)
    if t is None:
        t = _TRI[lq] = np.tri(lq, dtype=bool)
    return t


def visible(seg: np.ndarray, br: np.ndarray, lq: int) -> np.ndarray:
    """bool ``[lq, n]``: SPEC section 2 for the queries at the last ``lq`` of the ``n`` slots with ids ``seg, br``
    (int32 ``[n]``). Keys before the first query are never ahead of one, so causality only touches the last ``lq``
    columns."""
    n = seg.shape[0]
    vis = seg != seg[n - lq:, None]
    vis |= br == br[n - lq:, None]
    vis[:, n - lq:] &= _causal(lq)
    return vis


def _lists(vis: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's visible keys at or after slot ``c``, in slot order, padded with slot 0: int64 ``[lq, m]``, and
    their counts ``[lq]``."""
    # array methods, not np.* functions: each np.* call adds a dispatch layer, and this runs on every direct call
    vt = vis[:, c:]
    cnt = vt.sum(1)
    m = int(cnt.max())
    flat = vt.ravel().nonzero()[0]  # row-major: by query, then by slot
    q = flat // vt.shape[1]
    first = cnt.cumsum() - cnt  # where each query's entries start in ``flat``
    lists = np.zeros((vis.shape[0], m), dtype=np.int64)
    lists[q, np.arange(flat.size) - first[q]] = flat - q * vt.shape[1] + c
    return lists, cnt


def _split(vis: np.ndarray, n: int, lq: int, hq: int, hkv: int, phys: np.ndarray | None, base: int) -> Split | None:
    """The split of a row, or None where it would not pay or not fit (see the module). ``phys``: paged rows' flat
    pool slot of each of the ``n`` slots; contiguous rows start at flat slot ``base``."""
    every = vis.all(0)
    c = int(every.argmin())
    if every[c]:
        c = n  # every query sees every key: a prefix only
    lists, cnt = _lists(vis, c) if c < n else (np.zeros((lq, 0), dtype=np.int64), np.zeros(lq, dtype=np.int64))
    m = lists.shape[1]
    if lq * m > n or hq * lq * (c + m) > sdpa_tiles.MASK_ELEMENTS:
        return None
    tail = pad = prefix = None
    if m:
        slots = phys[lists] if phys is not None else lists + base
        tail = torch.from_numpy((slots[None] * hkv + np.arange(hkv)[:, None, None]).reshape(-1))
        if int(cnt.min()) < m:
            pad = torch.from_numpy(np.arange(m) >= cnt[:, None])
    if phys is not None:
        prefix = torch.from_numpy(phys[:c])
    return Split(c, prefix, tail, m, pad)


def plan(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, q_seqlens: Tensor, segment: Tensor,
         branch: Tensor, block_table: Tensor | None, acc: torch.dtype) -> Plan:
    """The rows with queries, each with its way of attending (see the module). ``q [B, Lq, Hq, D]``; the caches
    are read for their shapes and contiguity only. Unchecked bad lengths and block ids are clamped: never an index
    out of bounds."""
    lq_max, hq = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    per_row = k_cache.shape[1]
    capacity = per_row if block_table is None else block_table.shape[1] * per_row
    flat_ok = k_cache.is_contiguous() and v_cache.is_contiguous()
    seg_all, br_all = segment.numpy().reshape(-1), branch.numpy().reshape(-1)
    table = None if block_table is None else block_table.numpy().clip(0, k_cache.shape[0] - 1).astype(np.int64)
    rows = []
    covered = True
    for b, (n, lq) in enumerate(zip(cache_seqlens.tolist(), q_seqlens.tolist())):
        n = max(0, min(n, capacity))  # clamp: unchecked values never read out of bounds
        lq = max(0, min(lq, lq_max, n))
        covered &= lq == lq_max
        if lq == 0:
            continue
        if table is None:
            phys, slots = None, None
            seg, br = seg_all[b * per_row:b * per_row + n], br_all[b * per_row:b * per_row + n]
        else:
            s = np.arange(n)
            phys = table[b, s // per_row] * per_row + s % per_row
            slots = (torch.from_numpy(phys // per_row), torch.from_numpy(phys % per_row))
            seg, br = seg_all[phys], br_all[phys]
        if lq * n > sdpa_tiles.MASK_ELEMENTS:  # even the mask would not fit: query tiles
            rows.append(Row(b, n, lq, None, None, slots))
            continue
        vis = visible(seg, br, lq)
        split = _split(vis, n, lq, hq, hkv, phys, b * per_row) if flat_ok else None
        mask = None
        if split is None:
            mask = torch.zeros((lq, n), dtype=acc).masked_fill_(torch.from_numpy(~vis), float("-inf"))
        rows.append(Row(b, n, lq, split, mask, slots))
    return Plan(rows, covered)
