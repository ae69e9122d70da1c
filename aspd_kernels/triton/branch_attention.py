"""Triton ``branch_attention``: packed varlen attention under the branch mask, forward and backward.

FlashAttention-2 (Dao, 2023) with the mask of SPEC section 2 evaluated in registers from ``segment``/``branch``:

    visible(q, k) = k <= q and (segment[k] != segment[q] or branch[k] == branch[q])

Forward: one program per (query tile, sequence, query head) walks the key tiles listed for it with an
online softmax in base 2 (``exp2``; the scale carries ``log2(e)``) and stores ``out`` and the natural-log ``lse``.
Backward: ``delta = rowsum(dO * O) - dlse`` (preprocess kernel), then two kernels that recompute the probabilities
from ``lse``: one program per (key tile, sequence, KV head) accumulates dK/dV over the query tiles *and* over the
query heads of its GQA group, one program per (query tile, sequence, query head) accumulates dQ over the key tiles.
Two kernels instead of atomics: every output element is written once by one program, so the gradients are
deterministic and dK/dV of a GQA group need no float atomics; the price is computing Q K^T and dO V^T twice.

Block skipping (``tile_ranges.py``): per-tile id ranges (segment and branch min/max) classify each (query tile,
key tile) pair as skip, full (every pair visible) or masked. Two tiny kernels run once per call and layout: one
writes the id ranges of every tile, one turns them into per-tile lists -- for each tile a compute program owns, the
full tiles of the other side, then the masked ones; skipped tiles are not listed. The compute kernels loop over the
two lists: skipped tiles cost nothing (K/V never read), full tiles run without the per-element mask, and no loop
carries a data-dependent branch, so the loads stay pipelinable.

A tile never straddles two packed sequences; slots (storage indices) are relative to the sequence.
Under ``TRITON_INTERPRET=1`` (CPU) operands are cast to float32 after loading: the interpreter mishandles half
precision arithmetic; on a GPU fp16/bf16 operands feed the tensor cores and accumulate in float32.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tile_ranges import seq_bounds, tile_lists

LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln(2): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # lse = ln(2) * (base-2 log-sum-exp)


@triton.jit
def _tile_operand(PTR, rows, ok, stride_t, head_offset, dims, d_ok, UPCAST: tl.constexpr):
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
    for i in range(0, count):
        k_slot = tl.load(LIST + i * STEP) * BLOCK_N + cols
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


@triton.jit
def _fwd_kernel(Q, K, V, SEG, BR, CU_Q, CU_K, LISTS, COUNTS, OUT, LSE, STATS,
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
    q = _tile_operand(Q, q_start + rows, row_ok, stride_qt, h * stride_qh, dims, d_ok, UPCAST)
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


@triton.jit
def _bwd_preprocess_kernel(OUT, DOUT, DLSE, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
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
    o = _tile_operand(OUT, rows, ok, stride_ot, h * stride_oh, dims, d_ok, True)
    do = _tile_operand(DOUT, rows, ok, stride_dot, h * stride_doh, dims, d_ok, True)
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
    for i in range(0, count * GROUP):
        rows = tl.load(LIST + (i // GROUP) * STEP) * BLOCK_M + tl.arange(0, BLOCK_M)
        h = hk * GROUP + i % GROUP
        row_ok = rows < len_q
        qd_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + (q_start + rows)[:, None] * stride_qt + h * stride_qh + dims[None, :], qd_ok, 0.0)
        do = tl.load(DOUT + (q_start + rows)[:, None] * stride_dot + h * stride_doh + dims[None, :], qd_ok, 0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse, delta = _row_stats(LSE, DELTA, h, stride_lh, q_start, rows, row_ok)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            q_seg = tl.load(SEG + k_start + off + rows, mask=row_ok, other=0)
            q_br = tl.load(BR + k_start + off + rows, mask=row_ok, other=0)
            # padding keys sit after every query (causal term); padding rows have p = 0 already (lse = +inf)
            visible = (k_slot[None, :] <= (off + rows)[:, None]) & (
                (k_seg[None, :] != q_seg[:, None]) | (k_br[None, :] == q_br[:, None]))
            p = tl.where(visible, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DOUT, LSE, DELTA, SEG, BR, CU_Q, CU_K, LISTS, COUNTS, DK, DV,
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
    k = _tile_operand(K, k_start + k_slot, key_ok, stride_kt, hk * stride_kh, dims, d_ok, UPCAST)
    v = _tile_operand(V, k_start + k_slot, key_ok, stride_vt, hk * stride_vh, dims, d_ok, UPCAST)
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
    for i in range(0, count):
        k_slot = tl.load(LIST + i * STEP) * BLOCK_N + cols
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


@triton.jit
def _bwd_dq_kernel(Q, K, V, DOUT, LSE, DELTA, SEG, BR, CU_Q, CU_K, LISTS, COUNTS, DQ,
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
    q = _tile_operand(Q, q_start + rows, row_ok, stride_qt, h * stride_qh, dims, d_ok, UPCAST)
    do = _tile_operand(DOUT, q_start + rows, row_ok, stride_dot, h * stride_doh, dims, d_ok, UPCAST)
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


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration. No autotuning: the key-tile summaries must be built with the block size the kernel uses,
# and one fixed table keeps CUDA-graph capture and torch.compile free of benchmarking runs.


@dataclass(frozen=True)
class Config:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


_INTERPRET_CONFIG = Config(64, 64, 4, 1)  # the interpreter pays per operation, not per element: few, large tiles


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Tile tables, checked by compiling for sm_90 with the JIT's alignment specialisation and reading the cubin's
# resource usage (cuobjdump -res-usage): none of the fp16/bf16 D=64/128 entries spills registers.

def gpu_fwd_config(head_dim: int, dtype: torch.dtype) -> Config:
    """Forward tiles: a tall query tile amortises the K/V reads; fp32 operands and D=256 halve the tiles to stay
    within registers and shared memory."""
    half = dtype != torch.float32
    if head_dim <= 64 and half:
        return Config(128, 64, 4, 3)
    if head_dim <= 128 and half:
        return Config(128, 64, 8, 2)
    return Config(64, 32, 4, 2)


def gpu_bwd_configs(head_dim: int, dtype: torch.dtype) -> tuple[Config, Config]:
    """(dK/dV tiles, dQ tiles). The dK/dV program holds two fp32 ``[BLOCK_N, D]`` accumulators plus its K and V
    tiles, so at D=128 its query tile shrinks to 32 rows (64 rows spill); the dQ program holds one accumulator."""
    half = dtype != torch.float32
    if head_dim <= 64 and half:
        return Config(64, 64, 4, 2), Config(64, 64, 4, 2)
    if head_dim <= 128 and half:
        return Config(32, 64, 8, 2), Config(64, 64, 8, 2)
    return Config(32, 32, 4, 1), Config(32, 32, 4, 1)


def fwd_config(head_dim: int, dtype: torch.dtype) -> Config:
    return _INTERPRET_CONFIG if _interpreting() else gpu_fwd_config(head_dim, dtype)


def bwd_configs(head_dim: int, dtype: torch.dtype) -> tuple[Config, Config]:
    return (_INTERPRET_CONFIG,) * 2 if _interpreting() else gpu_bwd_configs(head_dim, dtype)


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: the triton backend of branch_attention runs float16/bfloat16/float32, got {q.dtype}")


def _common(q: torch.Tensor) -> dict:
    fp32 = q.dtype == torch.float32
    return dict(
        HEAD_DIM=q.shape[-1], BLOCK_D=max(triton.next_power_of_2(q.shape[-1]), 16), UPCAST=_interpreting(),
        # full fp32 products for fp32 inputs (tf32 would lose ~3 digits); fp16/bf16 ignore the setting
        DOT_PRECISION="ieee" if fp32 else "tf32",
    )


def _preprocess_rows(block_d: int) -> int:
    """Rows per preprocess program: 8192 elements per operand tile, 64 per thread at 4 warps (no spills)."""
    return max(16, 8192 // block_d)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def branch_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor,
                         branch: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, *,
                         out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                         config: Config | None = None, stats: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend contract (``_dispatch``). ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` (last dim contiguous),
    ``segment, branch int32 [total_k]``, ``cu_seqlens_* int32 [B+1]``. Returns ``out [total_q, Hq, D]`` (q.dtype)
    and ``lse float32 [Hq, total_q]`` (natural log; -inf for a row that sees no key).

    ``out``/``lse``: optional preallocated outputs (contiguous, as returned). ``config`` overrides the tile table;
    ``stats`` (int32 [3], zeroed by the caller) counts the (query tile, key tile, head) triples up to the causal
    limit that the kernel skipped / ran masked / ran unmasked -- both for tests and inspection only.
    """
    _check_dtype(q)
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device) if lse is None else lse
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch == 0:
        return out, lse
    cfg = config or fwd_config(d, q.dtype)
    with _device_guard(q):
        lists, counts = tile_lists(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q,
                                   max_seqlen_k, cfg.block_m, cfg.block_n, key_major=False)
        _fwd_kernel[(lists.shape[1], batch, hq)](
            q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k, lists, counts, out, lse,
            stats if stats is not None else counts,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), lse.stride(0), total_q, total_k, max_seqlen_q, max_seqlen_k, lists.shape[1],
            lists.shape[2], softmax_scale * 1.4426950408889634,  # base-2 logits: exp(x) = exp2(x * log2(e))
            GROUP=hq // hkv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, COUNT=stats is not None, **_common(q),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def branch_attention_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, segment: torch.Tensor,
                         branch: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, *,
                         dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                         dv: torch.Tensor | None = None, config: Config | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend contract (``_dispatch``): ``(dq, dk, dv)`` shaped and typed as ``(q, k, v)``. ``dout`` as ``out``;
    ``dlse [Hq, total_q]`` float32 or None (gradient of the returned lse); ``lse`` from the forward.
    ``dq``/``dk``/``dv``: optional preallocated outputs (contiguous); every row of every sequence is written."""
    _check_dtype(q)
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch == 0:  # no query: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    kv_cfg, q_cfg = (config, config) if config is not None else bwd_configs(d, q.dtype)
    lse = lse.float().contiguous()
    common = _common(q)
    with _device_guard(q):
        delta = torch.empty_like(lse)
        block_t = _preprocess_rows(common["BLOCK_D"])
        _bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), hq)](
            out, dout, dlse.float().contiguous() if dlse is not None else lse, delta, out.stride(0), out.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), total_q,
            HEAD_DIM=d, BLOCK_D=common["BLOCK_D"], BLOCK_T=block_t, HAS_DLSE=dlse is not None,
        )
        sizes = (total_q, total_k, max_seqlen_q, max_seqlen_k)
        lists, counts = tile_lists(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q,
                                   max_seqlen_k, kv_cfg.block_m, kv_cfg.block_n, key_major=True)
        _bwd_dkdv_kernel[(lists.shape[1], batch, hkv)](
            q, k, v, dout, lse, delta, segment, branch, cu_seqlens_q, cu_seqlens_k, lists, counts, dk, dv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            *sizes, lists.shape[1], lists.shape[2], softmax_scale,
            GROUP=hq // hkv, BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n, **common,
            num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        )
        lists, counts = tile_lists(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q,
                                   max_seqlen_k, q_cfg.block_m, q_cfg.block_n, key_major=False)
        _bwd_dq_kernel[(lists.shape[1], batch, hq)](
            q, k, v, dout, lse, delta, segment, branch, cu_seqlens_q, cu_seqlens_k, lists, counts, dq,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            *sizes, lists.shape[1], lists.shape[2], softmax_scale,
            GROUP=hq // hkv, BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n, **common,
            num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (.ci/aot_compile_triton.py): every kernel with the GPU tile table, for the dtypes and
# head sizes that matter (fp16/bf16, D = 64 and 128), GQA group 4.

def _aot_specs() -> list[dict]:
    specs = []
    i32, f32 = "i32", "fp32"
    for dt, torch_dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        ptr = f"*{dt}"
        for d in (64, 128):
            common = dict(GROUP=4, HEAD_DIM=d, BLOCK_D=d, UPCAST=False, DOT_PRECISION="tf32")
            fc, (kc, qc) = gpu_fwd_config(d, torch_dt), gpu_bwd_configs(d, torch_dt)
            ids = {n: "*i32" for n in ("SEG", "BR", "CU_Q", "CU_K")}
            sizes = {n: i32 for n in ("total_q", "total_k", "max_seqlen_q", "max_seqlen_k")}
            strides = lambda *names: {f"stride_{n}{a}": i32 for n in names for a in "th"}  # noqa: E731
            specs.append(dict(
                name=f"branch_attention_fwd_{dt}_d{d}", fn=_fwd_kernel,
                signature={"Q": ptr, "K": ptr, "V": ptr, **ids, "LISTS": "*i32", "COUNTS": "*i32", "OUT": ptr,
                           "LSE": "*fp32", "STATS": "*i32", **strides("q", "k", "v", "o"), "stride_lh": i32,
                           **sizes, "max_qtiles": i32, "max_ktiles": i32, "qk_scale": f32},
                constexprs=dict(common, BLOCK_M=fc.block_m, BLOCK_N=fc.block_n, COUNT=False),
                num_warps=fc.num_warps, num_stages=fc.num_stages,
            ))
            specs.append(dict(
                name=f"branch_attention_bwd_preprocess_{dt}_d{d}", fn=_bwd_preprocess_kernel,
                signature={"OUT": ptr, "DOUT": ptr, "DLSE": "*fp32", "DELTA": "*fp32", **strides("o", "do"),
                           "stride_lh": i32, "total_q": i32},
                constexprs=dict(HEAD_DIM=d, BLOCK_D=d, BLOCK_T=_preprocess_rows(d), HAS_DLSE=True),
            ))
            bwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "DOUT": ptr, "LSE": "*fp32", "DELTA": "*fp32", **ids,
                       "LISTS": "*i32", "COUNTS": "*i32"}
            specs.append(dict(
                name=f"branch_attention_bwd_dkdv_{dt}_d{d}", fn=_bwd_dkdv_kernel,
                signature={**bwd_sig, "DK": ptr, "DV": ptr, **strides("q", "k", "v", "do", "dk", "dv"),
                           "stride_lh": i32, **sizes, "max_ktiles": i32, "max_qtiles": i32, "softmax_scale": f32},
                constexprs=dict(common, BLOCK_M=kc.block_m, BLOCK_N=kc.block_n),
                num_warps=kc.num_warps, num_stages=kc.num_stages,
            ))
            specs.append(dict(
                name=f"branch_attention_bwd_dq_{dt}_d{d}", fn=_bwd_dq_kernel,
                signature={**bwd_sig, "DQ": ptr, **strides("q", "k", "v", "do", "dq"), "stride_lh": i32,
                           **sizes, "max_qtiles": i32, "max_ktiles": i32, "softmax_scale": f32},
                constexprs=dict(common, BLOCK_M=qc.block_m, BLOCK_N=qc.block_n),
                num_warps=qc.num_warps, num_stages=qc.num_stages,
            ))
    return specs


AOT_SPECS = _aot_specs()
