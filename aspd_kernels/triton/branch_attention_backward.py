"""Triton ``branch_attention``, backward kernels: FlashAttention-2's backward under the branch mask.

``delta = rowsum(dO * O) - dlse`` (preprocess kernel), then two kernels that recompute the probabilities from
``lse``: one program per (key tile, sequence, KV head) accumulates dK/dV over the query tiles *and* over the query
heads of its GQA group, one program per (query tile, sequence, query head) accumulates dQ over the key tiles.
Two kernels instead of atomics: every output element is written once by one program, so the gradients are
deterministic and dK/dV of a GQA group need no float atomics; the price is computing Q K^T and dO V^T twice.
Head dimension padded to ``BLOCK_D`` with masked loads and stores, as the forward kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .branch_attention_forward import LOG2E, tile_operand
from .tile_ranges import PACK_SIZES, seq_bounds

@triton.jit(do_not_specialize=["total_q"])
def bwd_preprocess_kernel(OUT, DOUT, DLSE, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
                           total_q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                           HAS_DLSE: tl.constexpr):
    """``DELTA[h, t] = sum_d dO[t, h, d] * O[t, h, d] - dlse[h, t]`` (float32): d(loss)/d(score) = P * (dP - delta),
    where the dlse term comes from d lse / d score = P."""
    h = tl.program_id(1).to(tl.int64)
    # int64 rows: rows * stride_t passes 2**31 once out holds more than 2**31 elements (about 512k tokens at
    # Hq * D = 4096), and the last tile's padding rows must not wrap around to negative (in-bounds) indices
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < total_q
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    o = tile_operand(OUT, rows, ok, stride_ot, h * stride_oh, dims, d_ok, True)
    do = tile_operand(DOUT, rows, ok, stride_dot, h * stride_doh, dims, d_ok, True)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + h * stride_lh + rows, mask=ok, other=0.0)
    tl.store(DELTA + h * stride_lh + rows, delta, mask=ok)


@triton.jit
def _row_stats(LSE, DELTA, h, stride_lh, q_start, rows, row_ok):
    """Base-2 lse and delta of a query tile. A row that saw nothing (lse = -inf) and a padding row get lse = +inf,
    so its probabilities exp2(s - lse) are exactly 0 without relying on the mask."""
    lse = tl.load(LSE + h * stride_lh + q_start + rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + h * stride_lh + q_start + rows, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, k_slot, k_seg, k_br, Q, DOUT, LSE, DELTA, SEG, BR, q_start, k_start, off, len_q, hk,
                stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, dims, d_ok, qk_scale, LIST, count,
                STEP: tl.constexpr, MASKED: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK/dV of one key tile from the ``count`` query tiles listed at ``LIST + i * STEP``, times the ``GROUP``
    query heads that share its KV head (one flat loop, so every iteration is a plain load-and-compute step)."""
    # the query tile index is fetched one iteration ahead (loop-carried), as in the forward's ``_fwd_tiles``: the
    # q/dO addresses then never wait on a load of their own iteration, so 3 or more stages can overlap them
    nxt = tl.load(LIST, mask=count > 0, other=0)
    for i in range(0, count * GROUP):
        rows = nxt * BLOCK_M + tl.arange(0, BLOCK_M)
        nxt = tl.load(LIST + ((i + 1) // GROUP) * STEP, mask=i + 1 < count * GROUP, other=0)
        h = hk * GROUP + i % GROUP
        row_ok = rows < len_q
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + dims[None, :], qd_ok, 0.0)
        do = tl.load(DOUT + (q_start + rows)[:, None] * stride_dot + h * stride_doh + dims[None, :], qd_ok, 0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse, delta = _row_stats(LSE, DELTA, h, stride_lh, q_start, rows, row_ok)
        # Transposed, [BLOCK_N keys, BLOCK_M queries]: every product has the key tile as its M dimension, so with
        # 32-row query tiles (D = 128) all five dots stay on Hopper's wgmma, which needs M >= 64 (q @ k^T had M = 32
        # and fell back to mma.sync for two of them).
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            q_seg = tl.load(SEG + k_start + off + rows, mask=row_ok, other=0)
            q_br = tl.load(BR + k_start + off + rows, mask=row_ok, other=0)
            # padding keys sit after every query (causal term); padding rows have p = 0 already (lse = +inf)
            visible = (k_slot[:, None] <= (off + rows)[None, :]) & (
                (k_seg[:, None] != q_seg[None, :]) | (k_br[:, None] == q_br[None, :]))
            pt = tl.where(visible, pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=[*PACK_SIZES, "max_ktiles", "max_qtiles"])
def bwd_dkdv_kernel(Q, K, V, DOUT, LSE, DELTA, SEG, BR, CU_Q, CU_K, LISTS, COUNTS, DK, DV,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                     stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
                     total_q, total_k, max_seqlen_q, max_seqlen_k, max_ktiles, max_qtiles, softmax_scale,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (key tile, sequence, KV head): the listed full query tiles, then the listed masked ones."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2).to(tl.int64)
    q_start, len_q, k_start, len_k = seq_bounds(CU_Q, CU_K, b, total_q, total_k, max_seqlen_q, max_seqlen_k)
    if pid_n * BLOCK_N >= len_k:
        return
    off = len_k - len_q
    k_slot = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = k_slot < len_k
    k_seg = tl.load(SEG + k_start + k_slot, mask=key_ok, other=0)
    k_br = tl.load(BR + k_start + k_slot, mask=key_ok, other=0)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    k = tile_operand(K, k_start + k_slot, key_ok, stride_kt, hk * stride_kh, dims, d_ok, UPCAST)
    v = tile_operand(V, k_start + k_slot, key_ok, stride_vt, hk * stride_vh, dims, d_ok, UPCAST)
    qk_scale = softmax_scale * LOG2E

    tile = (b * max_ktiles + pid_n).to(tl.int64)
    lists = LISTS + tile * max_qtiles
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_slot, k_seg, k_br, Q, DOUT, LSE, DELTA, SEG, BR, q_start, k_start, off,
                         len_q, hk, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, dims, d_ok, qk_scale,
                         lists, tl.load(COUNTS + tile * 2), 1, False, GROUP, BLOCK_M, UPCAST, DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, k_slot, k_seg, k_br, Q, DOUT, LSE, DELTA, SEG, BR, q_start, k_start, off,
                         len_q, hk, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, dims, d_ok, qk_scale,
                         lists + max_qtiles - 1, tl.load(COUNTS + tile * 2 + 1), -1, True, GROUP, BLOCK_M, UPCAST,
                         DOT_PRECISION)
    dk *= softmax_scale
    tl.store(DK + (k_start + k_slot)[:, None] * stride_dkt + hk * stride_dkh + dims[None, :],
             dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & d_ok[None, :])
    tl.store(DV + (k_start + k_slot)[:, None] * stride_dvt + hk * stride_dvh + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None] & d_ok[None, :])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, q_slot, q_seg, q_br, K, V, SEG, BR, k_start, len_k, k_head, v_head,
              stride_kt, stride_vt, dims, d_ok, qk_scale, LIST, count,
              STEP: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """dQ of one query tile (unscaled) from the ``count`` key tiles listed at ``LIST + i * STEP``."""
    cols = tl.arange(0, BLOCK_N)
    nxt = tl.load(LIST, mask=count > 0, other=0)  # one iteration ahead, as in ``_fwd_tiles``
    for i in range(0, count):
        k_slot = nxt * BLOCK_N + cols
        nxt = tl.load(LIST + (i + 1) * STEP, mask=i + 1 < count, other=0)
        kv_ok = (k_slot < len_k)[:, None] & d_ok[None, :]
        k = tl.load(K + (k_start + k_slot)[:, None] * stride_kt + k_head + dims[None, :], kv_ok, 0.0)
        v = tl.load(V + (k_start + k_slot)[:, None] * stride_vt + v_head + dims[None, :], kv_ok, 0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            k_seg = tl.load(SEG + k_start + k_slot, mask=k_slot < len_k, other=0)
            k_br = tl.load(BR + k_start + k_slot, mask=k_slot < len_k, other=0)
            visible = (k_slot[None, :] <= q_slot[:, None]) & (
                (k_seg[None, :] != q_seg[:, None]) | (k_br[None, :] == q_br[:, None]))
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=[*PACK_SIZES, "max_qtiles", "max_ktiles"])
def bwd_dq_kernel(Q, K, V, DOUT, LSE, DELTA, SEG, BR, CU_Q, CU_K, LISTS, COUNTS, DQ,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dqt, stride_dqh, stride_lh,
                   total_q, total_k, max_seqlen_q, max_seqlen_k, max_qtiles, max_ktiles, softmax_scale,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (query tile, sequence, query head): the listed full key tiles, then the listed masked ones."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    q_start, len_q, k_start, len_k = seq_bounds(CU_Q, CU_K, b, total_q, total_k, max_seqlen_q, max_seqlen_k)
    if pid_m * BLOCK_M >= len_q:
        return
    off = len_k - len_q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    q_slot = off + rows
    q_seg = tl.load(SEG + k_start + q_slot, mask=row_ok, other=0)
    q_br = tl.load(BR + k_start + q_slot, mask=row_ok, other=0)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q = tile_operand(Q, q_start + rows, row_ok, stride_qt, h * stride_qh, dims, d_ok, UPCAST)
    do = tile_operand(DOUT, q_start + rows, row_ok, stride_dot, h * stride_doh, dims, d_ok, UPCAST)
    lse, delta = _row_stats(LSE, DELTA, h, stride_lh, q_start, rows, row_ok)
    hk = h // GROUP
    qk_scale = softmax_scale * LOG2E

    tile = (b * max_qtiles + pid_m).to(tl.int64)
    lists = LISTS + tile * max_ktiles
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, q_slot, q_seg, q_br, K, V, SEG, BR, k_start, len_k, hk * stride_kh,
                   hk * stride_vh, stride_kt, stride_vt, dims, d_ok, qk_scale, lists, tl.load(COUNTS + tile * 2),
                   1, False, BLOCK_N, UPCAST, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, q_slot, q_seg, q_br, K, V, SEG, BR, k_start, len_k, hk * stride_kh,
                   hk * stride_vh, stride_kt, stride_vt, dims, d_ok, qk_scale, lists + max_ktiles - 1,
                   tl.load(COUNTS + tile * 2 + 1), -1, True, BLOCK_N, UPCAST, DOT_PRECISION)
    dq *= softmax_scale
    tl.store(DQ + (q_start + rows)[:, None] * stride_dqt + h * stride_dqh + dims[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
