"""Rotary embedding of the new tokens and their append into the KV cache, in plain torch (vectorised).

Split in two (a plan/run split, see ``step_cache``): :func:`_plan` derives from the positions and lengths alone the
rotary factors and the flat cache slots to write; :func:`rope_append_kv` runs one layer with them. Inside a
``step_scope`` every layer of a decoding step shares the first layer's plan, so a layer costs a handful of aten
calls: a rotation of q and of k (multiply, flip, multiply, add) and one ``index_copy_`` per K/V cache; the segment
and branch ids, the same for every layer, are written by the first layer's call only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .step_cache import shared


class _Plan(NamedTuple):
    cos: Tensor  # [B, L, 1, rot] accumulation dtype: cos | cos
    sin: Tensor  # [B, L, 1, rot] accumulation dtype: -sin | sin, so rotate-half is x * cos + swap_halves(x) * sin
    dst: Tensor  # int64 [n]: flat row of each written token in the cache viewed as [rows * slots_per_row, ...]
    src: Tensor | None  # int64 [n]: which of the B * L new tokens those are; None when all of them, in order


def _plan(positions: Tensor, cos_sin_cache: Tensor, cache_seqlens: Tensor, q_seqlens: Tensor,
          block_table: Tensor | None, cache_shape: torch.Size, acc: torch.dtype) -> _Plan:
    """What every layer of a step shares. ``positions [B, L]``, ``cos_sin_cache float32 [P, rot]``, lengths
    int32 ``[B]``, ``cache_shape`` the K cache's (``[B, Ncap, ...]`` or paged ``[num_blocks, block_size, ...]``).
    Bad values stay in bounds: positions are clamped to the table, and slots outside ``[0, capacity)`` or in a block
    outside the pool are not written."""
    bsz, lq = positions.shape
    dev = positions.device
    half = cos_sin_cache.shape[1] // 2
    pos = positions.long().clamp(0, cos_sin_cache.shape[0] - 1)
    cs = cos_sin_cache[pos]
    if cs.dtype != acc:
        cs = cs.to(acc)
    cos, sin = cs[..., :half], cs[..., half:]
    cos2 = torch.cat((cos, cos), -1).unsqueeze(2)
    sin2 = torch.cat((-sin, sin), -1).unsqueeze(2)

    i = torch.arange(lq, device=dev)
    q_len = q_seqlens.long()[:, None]
    slot = (cache_seqlens.long()[:, None] - q_len) + i  # [B, L]
    rows, per_row = cache_shape[0], cache_shape[1]
    capacity = per_row if block_table is None else block_table.shape[1] * per_row
    valid = (i < q_len) & (slot >= 0) & (slot < capacity)
    if block_table is None:
        flat = torch.arange(bsz, device=dev)[:, None] * per_row + slot
    else:
        slot = slot.clamp(0, max(capacity - 1, 0))  # the gather below must stay inside the table
        block = block_table.long().gather(1, slot // per_row) if capacity else slot
        valid &= (block >= 0) & (block < rows)
        flat = block * per_row + slot % per_row
    if bool(valid.all()):  # the usual case: every new token is written, in order, with no gather of the sources
        return _Plan(cos2, sin2, flat.reshape(-1), None)
    return _Plan(cos2, sin2, flat[valid], valid.reshape(-1).nonzero().squeeze(1))


def _rotate(x: Tensor, plan: _Plan, acc: torch.dtype) -> Tensor:
    """Rotate-half on the first ``rot`` features of ``x [B, L, H, D]``; features beyond pass through. The products
    and sums are the textbook ones (``x1 cos - x2 sin | x2 cos + x1 sin``): negating sin is exact."""
    rot, d = plan.cos.shape[-1], x.shape[-1]
    xa = x if x.dtype == acc else x.to(acc)
    xr = xa if rot == d else xa[..., :rot]
    swapped = xr.view(*xr.shape[:-1], 2, rot // 2).flip(-2).view(xr.shape)  # [x2 | x1]
    out = xr * plan.cos + swapped * plan.sin
    if rot < d:
        out = torch.cat((out, xa[..., rot:]), -1)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _write(cache: Tensor, values: Tensor, plan: _Plan) -> None:
    """``cache`` (contiguous, ``[rows, slots, ...]``) at ``plan.dst`` <- the new tokens ``values [B, L, ...]``."""
    src = values.reshape(-1, *values.shape[2:])
    if plan.src is not None:
        src = src.index_select(0, plan.src)
    if src.dtype != cache.dtype:
        src = src.to(cache.dtype)
    cache.view(-1, *cache.shape[2:]).index_copy_(0, plan.dst, src)


def rope_append_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens,
                   segment, branch, q_seqlens, block_table):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    plan = shared("rope", (positions, cos_sin_cache, cache_seqlens, q_seqlens, block_table),
                  (tuple(k_cache.shape[:2]), acc),
                  lambda: _plan(positions, cos_sin_cache, cache_seqlens, q_seqlens, block_table, k_cache.shape, acc))
    q_rot = _rotate(q, plan, acc)
    _write(k_cache, _rotate(k, plan, acc), plan)
    _write(v_cache, v, plan)

    def write_ids() -> bool:
        _write(segment_cache, segment, plan)
        _write(branch_cache, branch, plan)
        return True

    # the ids once per scope: every layer of a step writes the same ids at the same slots (the scope's promise), so
    # a later layer's write would change nothing; outside a scope every call writes them
    shared("rope-ids", (segment_cache, branch_cache, segment, branch, positions, cache_seqlens, q_seqlens,
                        block_table), (), write_ids)
    return q_rot
