"""Triton ``branch_attention``, forward kernel: FlashAttention-2 (Dao, 2023) under the branch mask.

One program per (query tile, sequence, query head) walks the key tiles listed for it (``tile_ranges.tile_lists``:
the full tiles, then the masked ones) with an online softmax in base 2 (``exp2``; the scale carries ``log2(e)``)
and stores ``out`` and the natural-log ``lse``. The mask of SPEC section 2 is evaluated in registers:

    visible(q, k) = k <= q and (segment[k] != segment[q] or branch[k] == branch[q])

The head dimension is padded to ``BLOCK_D`` (a power of two, at least 16: the K extent of a ``tl.dot``) with masked
loads (padding lanes read 0, so they add nothing to ``q k^T`` nor to ``p v``) and masked stores: every multiple of
8 up to 256 runs. The launcher and tile tables are in ``branch_attention.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tile_ranges import PACK_SIZES, seq_bounds

LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln(2): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # lse = ln(2) * (base-2 log-sum-exp)


@triton.jit
def tile_operand(PTR, rows, ok, stride_t, head_offset, dims, d_ok, UPCAST: tl.constexpr):
    """``[len(rows), BLOCK_D]`` rows of one head; padding lanes read as 0 (masked load, never out of bounds)."""
    x = tl.load(PTR + rows[:, None] * stride_t + head_offset + dims[None, :], ok[:, None] & d_ok[None, :], 0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, q_slot, q_seg, q_br, K, V, SEG, BR, k_start, len_k, k_head, v_head,
               stride_kt, stride_vt, dims, d_ok, qk_scale, LIST, count, STATS,
               STEP: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, COUNT: tl.constexpr):
    """Online-softmax update of one query tile by the ``count`` key tiles listed at ``LIST + i * STEP``. ``MASKED``
    evaluates the mask per element; otherwise every pair of these tiles is visible (``tile_class``)."""
    cols = tl.arange(0, BLOCK_N)
    # the tile index is fetched one iteration ahead, as a loop-carried value: loaded in the same iteration, it made
    # the K/V addresses wait on it and the wait at the loop top drained every copy (compiled for sm_90 and sm_80:
    # an async wait of 0 at any stage count); carried, the copies of the next tiles are in flight during compute
    nxt = tl.load(LIST, mask=count > 0, other=0)
    for i in range(0, count):
        k_slot = nxt * BLOCK_N + cols
        nxt = tl.load(LIST + (i + 1) * STEP, mask=i + 1 < count, other=0)
        kv_ok = (k_slot < len_k)[:, None] & d_ok[None, :]
        k = tl.load(K + (k_start + k_slot)[:, None] * stride_kt + k_head + dims[None, :], kv_ok, 0.0)
        v = tl.load(V + (k_start + k_slot)[:, None] * stride_vt + v_head + dims[None, :], kv_ok, 0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
        if MASKED:
            k_seg = tl.load(SEG + k_start + k_slot, mask=k_slot < len_k, other=0)
            k_br = tl.load(BR + k_start + k_slot, mask=k_slot < len_k, other=0)
            # padding keys sit at slots >= len_k, after every query, so the causal term hides them
            visible = (k_slot[None, :] <= q_slot[:, None]) & (
                (k_seg[None, :] != q_seg[:, None]) | (k_br[None, :] == q_br[:, None]))
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen nothing yet keeps m = -inf; shifting it by 0 keeps exp2 free of (-inf) - (-inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        if COUNT:
            if MASKED:
                tl.atomic_add(STATS + 1, 1)
            else:
                tl.atomic_add(STATS + 2, 1)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=[*PACK_SIZES, "max_qtiles", "max_ktiles"])
def fwd_kernel(Q, K, V, SEG, BR, CU_Q, CU_K, LISTS, COUNTS, OUT, LSE, STATS,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
                total_q, total_k, max_seqlen_q, max_seqlen_k, max_qtiles, max_ktiles, qk_scale,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT: tl.constexpr):
    """One (query tile, sequence, query head): the listed full key tiles, then the listed masked ones."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)  # h * stride_h passes 2**31 in a head-major view of > 2**31 elements
    q_start, len_q, k_start, len_k = seq_bounds(CU_Q, CU_K, b, total_q, total_k, max_seqlen_q, max_seqlen_k)
    if pid_m * BLOCK_M >= len_q:
        return
    off = len_k - len_q  # slot of query 0 (bottom-right alignment)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    q_slot = off + rows
    q_seg = tl.load(SEG + k_start + q_slot, mask=row_ok, other=0)
    q_br = tl.load(BR + k_start + q_slot, mask=row_ok, other=0)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q = tile_operand(Q, q_start + rows, row_ok, stride_qt, h * stride_qh, dims, d_ok, UPCAST)
    hk = h // GROUP

    tile = (b * max_qtiles + pid_m).to(tl.int64)
    n_full = tl.load(COUNTS + tile * 2)
    n_masked = tl.load(COUNTS + tile * 2 + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_slot, q_seg, q_br, K, V, SEG, BR, k_start, len_k,
                               hk * stride_kh, hk * stride_vh, stride_kt, stride_vt, dims, d_ok, qk_scale,
                               LISTS + tile * max_ktiles, n_full, STATS, 1, False, BLOCK_N, UPCAST,
                               DOT_PRECISION, COUNT)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_slot, q_seg, q_br, K, V, SEG, BR, k_start, len_k,
                               hk * stride_kh, hk * stride_vh, stride_kt, stride_vt, dims, d_ok, qk_scale,
                               LISTS + tile * max_ktiles + max_ktiles - 1, n_masked, STATS, -1, True, BLOCK_N,
                               UPCAST, DOT_PRECISION, COUNT)
    if COUNT:  # tiles up to the causal limit that were listed in neither run: skipped
        q_hi = off + tl.minimum(len_q, (pid_m + 1) * BLOCK_M) - 1
        tl.atomic_add(STATS, tl.cdiv(tl.minimum(len_k, q_hi + 1), BLOCK_N) - n_full - n_masked)

    seen = l_i > 0.0  # a row that sees no key gets out = 0 and lse = -inf, as the reference
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    tl.store(OUT + (q_start + rows)[:, None] * stride_ot + h * stride_oh + dims[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * stride_lh + q_start + rows, lse, mask=row_ok)
