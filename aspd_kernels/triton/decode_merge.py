"""The split-KV merge of the decode kernel (``branch_attention_with_kvcache``): one program per (sequence, new
token, query head) row, every split's partial loaded at once.

Split ``s`` of a row left its normalised partial output ``o_s [D]`` and its base-2 log-sum-exp ``lse_s`` (``-inf``
when it saw no key). The merged row is ``sum_s exp2(lse_s - m) o_s / sum_s exp2(lse_s - m)`` with ``m = max_s
lse_s``; a row no split saw (or a padding row, ``i >= q_seqlens[b]``) is written as zeros.

Why this shape: the former merge walked the splits one after another for a block of 32 rows, so at one new token
(``Lq * Hq = 32`` rows) it ran as a single program paying ``num_splits`` dependent loads. Here the ``CHUNK_S``
partials of a row are one masked ``[CHUNK_S, BLOCK_D]`` load -- one memory round trip for up to ``CHUNK_S`` splits
(the launcher's maximum) -- and there are ``B * Lq * Hq`` programs, 32 at K = 1 for Hq = 32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tile_configs import block_d

CHUNK_S = 64  # splits loaded per step: the decode launcher never uses more (``_MAX_SPLITS``), so one step


@triton.jit(do_not_specialize=["Lq", "Hq", "capacity", "num_splits"])
def _merge_kernel(
    O_PART, LSE_PART, OUT, CACHE_SEQLENS, Q_SEQLENS,
    stride_ps, stride_pb, stride_pi, stride_ph,
    stride_ls, stride_lb, stride_li,
    stride_ob, stride_oi, stride_oh,
    Lq, Hq, capacity, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Grid ``(B, Lq * Hq)``. ``O_PART float32 [S, B, Lq, Hq, D]``, ``LSE_PART float32 [S, B, Lq, Hq]`` (any
    strides, last one 1) -> ``OUT [B, Lq, Hq, D]`` row ``(i, h)`` of sequence ``b``."""
    b = tl.program_id(0)
    r = tl.program_id(1)
    b64 = b.to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(CACHE_SEQLENS + b), 0), capacity)
    lq = tl.minimum(tl.maximum(tl.load(Q_SEQLENS + b), 0), tl.minimum(Lq, n))
    i = (r // Hq).to(tl.int64)  # int64: i * stride_oi may pass 2**31
    h = (r % Hq).to(tl.int64)
    live = i < lq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    lse_row = LSE_PART + b64 * stride_lb + i * stride_li + h
    o_row = O_PART + b64 * stride_pb + i * stride_pi + h * stride_ph

    m = tl.full([], float("-inf"), tl.float32)
    den = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):  # one step for every split count the launcher uses
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = (s < num_splits) & live
        s64 = s.to(tl.int64)
        lse = tl.load(lse_row + s64 * stride_ls, mask=s_ok, other=float("-inf"))
        o = tl.load(o_row + s64[:, None] * stride_ps + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_safe)  # 0 for splits that saw nothing (lse = -inf) and for masked lanes
        scale = tl.exp2(m - m_safe)  # rescales what earlier steps summed; 0 on the first step (m = -inf)
        den = den * scale + tl.sum(w, 0)
        acc = acc * scale + tl.sum(w[:, None] * o, 0)
        m = m_new
    out = acc / tl.where(den > 0.0, den, 1.0)
    tl.store(OUT + b64 * stride_ob + i * stride_oi + h * stride_oh + d, out.to(OUT.dtype.element_ty),
             mask=(i < Lq) & d_ok)


def merge_launch(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, cache_seqlens: torch.Tensor,
                 q_seqlens: torch.Tensor, capacity: int, splits: int, kernel=None, chunk: int | None = None) -> None:
    """Merge ``splits`` partials into ``out [B, Lq, Hq, D]`` (shapes as ``_merge_kernel``). ``kernel``: the jitted
    kernel to launch (the decode module passes its own global, so tests can swap it); ``chunk``: splits per load
    step (tests force a small one to run the multi-step path)."""
    bsz, lq, hq, d = out.shape
    kernel = _merge_kernel if kernel is None else kernel
    kernel[(bsz, lq * hq)](
        o_part, lse_part, out, cache_seqlens, q_seqlens,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lq, hq, capacity, splits,
        HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_S=chunk or merge_chunk(splits), num_warps=merge_warps(d),
    )


def merge_chunk(splits: int) -> int:
    """Splits loaded per step: the next power of two of ``splits`` (at least 2), at most ``CHUNK_S``."""
    return min(max(2, triton.next_power_of_2(max(1, splits))), CHUNK_S)


def merge_warps(head_dim: int) -> int:
    """Warps of a merge program: the ``[CHUNK_S, BLOCK_D]`` float32 tile at 64 splits is 32-64 registers a thread
    at 4 warps (D <= 128), twice that at width 256, hence 8 there."""
    return 8 if block_d(head_dim) > 128 else 4
