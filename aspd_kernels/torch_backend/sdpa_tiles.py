"""Branch-masked attention on the CPU as SDPA per query tile: each tile of queries runs torch's fused CPU flash
kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) over its visible key span ``[0, last query]``, with
the tile's additive mask built from the ids.

Why: the online-softmax loop in ``attention.py`` runs a dozen small aten ops per (query, key) tile, which on a CPU
costs more than the arithmetic; the fused kernel does the softmax in one pass and skips nothing we need. Against
SDPA with a dense ``N x N`` mask this does about half the work (the causally hidden upper triangle is never
visited), and memory stays O(N * tile): one ``[tile, span]`` mask at a time, never ``N x N``.

GQA is native: the kernel takes ``k, v`` with ``Hkv`` heads and ``Hq % Hkv == 0`` as strided views (no copy, no
head repetition). Computes in float32 (float64 for float64 inputs): gradients of ``k, v`` accumulate over tiles.
"""
from __future__ import annotations

import torch

from .visibility import acc_dtype, visible

MASK_ELEMENTS = 1 << 22  # one tile's additive mask: 16 MiB of float32
_MAX_TILE = 256  # rows per tile; smaller tiles skip more of the causal triangle but pay more calls

flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def supported(q: torch.Tensor) -> bool:
    """The fused kernel exists for CPU tensors only; other devices keep the online-softmax tiles."""
    return q.device.type == "cpu"


def _tiles(q_index: torch.Tensor, lk: int):
    """(query slice, key span end) per tile; ``q_index`` int64 [Lq] increasing (bottom-right aligned: the last
    query sits at ``lk - 1``, so query ``i``'s slot is ``lk - lq + i`` and the span ends after the tile's last)."""
    lq = q_index.shape[0]
    first = lk - lq
    bq = max(16, min(_MAX_TILE, MASK_ELEMENTS // max(lk, 1)))
    for qs in range(0, lq, bq):
        qe = min(qs + bq, lq)
        yield slice(qs, qe), min(first + qe, lk)


def _mask(q_slots: torch.Tensor, q_seg, q_br, k_seg, k_br, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[bq, span]``: 0 where SPEC section 2 lets the query see the key, -inf elsewhere."""
    vis = visible(q_slots, q_seg, q_br, 0, k_seg, k_br)
    return torch.zeros(vis.shape, dtype=dtype, device=q_slots.device).masked_fill_(~vis, float("-inf"))


def as_heads(t: torch.Tensor) -> torch.Tensor:
    """``[L, H, D] -> [1, H, L, D]`` as a view (the kernel reads strides)."""
    return t.permute(1, 0, 2)[None]


def attend_fwd(q, k, v, segment, branch, q_index, scale: float):
    """One sequence, as ``attention.attend_fwd``: ``q [Lq, Hq, D]`` at the last ``Lq`` of ``Lk`` slots,
    ``k, v [Lk, Hkv, D]``, ``segment, branch int32 [Lk]``. Returns ``out [Lq, Hq, D]`` (q.dtype) and
    ``lse [Hq, Lq]`` in the accumulation dtype."""
    lq, hq, _ = q.shape
    lk = k.shape[0]
    acc = acc_dtype(q)
    qa, ka, va = as_heads(q.to(acc)), as_heads(k.to(acc)), as_heads(v.to(acc))
    q_seg, q_br = segment[q_index], branch[q_index]
    out = torch.empty((lq, hq, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, lq), dtype=acc, device=q.device)
    for qs, ke in _tiles(q_index, lk):
        m = _mask(q_index[qs], q_seg[qs], q_br[qs], segment[:ke], branch[:ke], acc)
        o, l = flash_fwd(qa[:, :, qs], ka[:, :, :ke], va[:, :, :ke], attn_mask=m, scale=scale)
        out[qs] = o[0].transpose(0, 1)
        lse[:, qs] = l[0]
    return out, lse


def attend_bwd(dout, q, k, v, out, lse, segment, branch, q_index, scale: float):
    """Gradients of :func:`attend_fwd` (no ``dlse``: the caller handles that case). ``lse [Hq, Lq]``."""
    lk = k.shape[0]
    acc = acc_dtype(q)
    qa, ka, va = as_heads(q.to(acc)), as_heads(k.to(acc)), as_heads(v.to(acc))
    doa, oa = as_heads(dout.to(acc)), as_heads(out.to(acc))
    lse_a = lse.to(acc)[None]
    q_seg, q_br = segment[q_index], branch[q_index]
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for qs, ke in _tiles(q_index, lk):
        m = _mask(q_index[qs], q_seg[qs], q_br[qs], segment[:ke], branch[:ke], acc)
        g_q, g_k, g_v = flash_bwd(doa[:, :, qs], qa[:, :, qs], ka[:, :, :ke], va[:, :, :ke], oa[:, :, qs],
                             lse_a[:, :, qs], 0.0, False, attn_mask=m, scale=scale)
        dq[qs] = g_q[0].transpose(0, 1)
        dk[:ke] += g_k[0].transpose(0, 1)
        dv[:ke] += g_v[0].transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
