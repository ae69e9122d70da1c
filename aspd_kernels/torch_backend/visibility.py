"""What every path of the torch backend shares: the visibility rule of SPEC section 2 on a tile of ids, and the
accumulation dtype."""
from __future__ import annotations

import torch


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def visible(q_slots: torch.Tensor, q_seg: torch.Tensor, q_br: torch.Tensor, k_start: int, k_seg: torch.Tensor,
            k_br: torch.Tensor) -> torch.Tensor:
    """bool ``[bq, bk]``: whether the queries at slots ``q_slots`` (ids ``q_seg, q_br``, each ``[bq]``) see the keys
    at slots ``k_start + j`` (ids ``k_seg, k_br``, each ``[bk]``)."""
    k_slots = torch.arange(k_start, k_start + k_seg.shape[0], device=q_slots.device)
    return (k_slots[None, :] <= q_slots[:, None]) & (
        (k_seg[None, :] != q_seg[:, None]) | (k_br[None, :] == q_br[:, None])
    )
