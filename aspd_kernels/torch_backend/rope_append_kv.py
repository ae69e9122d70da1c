"""Rotary embedding of the new tokens and their append into the KV cache, in plain torch (vectorised)."""
from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half on the first ``2 * half`` features; ``cos, sin [B, L, 1, half]``."""
    half = cos.shape[-1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x1, x2 = x[..., :half].to(acc), x[..., half:2 * half].to(acc)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if x.shape[-1] > 2 * half:  # features beyond rot_dim pass through (a few calls' worth of host time saved)
        parts.append(x[..., 2 * half:].to(acc))
    return torch.cat(parts, dim=-1).to(x.dtype)


def rope_append_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens,
                   segment, branch, q_seqlens, block_table):
    bsz, lq = q.shape[:2]
    half = cos_sin_cache.shape[1] // 2
    pos = positions.long().clamp(0, cos_sin_cache.shape[0] - 1)
    cs = cos_sin_cache[pos].to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    cos, sin = cs[..., None, :half], cs[..., None, half:]
    q_rot, k_rot = _rotate(q, cos, sin), _rotate(k, cos, sin)

    i = torch.arange(lq, device=q.device)
    slot = (cache_seqlens.long() - q_seqlens.long())[:, None] + i[None, :]  # [B, L]
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    valid = (i[None, :] < q_seqlens.long()[:, None]) & (slot >= 0) & (slot < capacity)
    b_idx = torch.arange(bsz, device=q.device)[:, None].expand(bsz, lq)[valid]
    slot = slot[valid]
    if block_table is None:
        where = (b_idx, slot)
    else:
        bs = k_cache.shape[1]
        where = (block_table.long()[b_idx, slot // bs], slot % bs)
    k_cache[where] = k_rot[valid].to(k_cache.dtype)
    v_cache[where] = v[valid].to(v_cache.dtype)
    segment_cache[where] = segment[valid]
    branch_cache[where] = branch[valid]
    return q_rot
