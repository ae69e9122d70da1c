"""Decoding attention over a contiguous or paged KV cache under the branch mask (SPEC section 4.2), in Triton.

One program owns one sequence ``b``, one KV head ``h`` and one slice of the cache (split-KV, as flash-decoding).
Its rows are *every* new token of the sequence times *every* query head that reads head ``h``
(``rows = Lq * G``, row ``r`` = token ``r // G``, query head ``h * G + r % G``), so each KV tile is loaded once and
multiplied against all of them with one ``tl.dot``: a step with 64 live branches reads the cache once, like a step
with one. Rows beyond ``BLOCK_M`` (a prefill chunk) tile over the grid's first axis.

Per KV tile (``BLOCK_N`` slots): ``s = q k^T``, the mask ``k <= q and (seg[k] != seg[q] or br[k] == br[q])`` from
the ids of the tile and of the query slots (the new tokens are already in the cache, so their ids are read there),
then the online softmax of FlashAttention-2 in base 2. With one split the program writes ``out``; with several, each
writes its partial output and log-sum-exp and ``decode_merge._merge_kernel`` combines them (LSE merge, one
program per row, every split loaded at once).

Paged caches translate each slot through ``block_table`` per token (any ``block_size``), the block ids of tile
``j + 1`` loaded during tile ``j`` so that the pipelined K/V copies never wait on a table read of their own
iteration (``.ci/aot_compile_triton.py`` asserts the overlap for both cache kinds). Lengths are clamped to the
capacity and block ids to ``[0, num_blocks)``, so unchecked inputs cannot read out of bounds. The number of splits
depends only on shapes and the device (never on ``cache_seqlens``), so a step is CUDA-graph capturable.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .decode_merge import _merge_kernel, merge_launch
from .tile_configs import Config, block_d, decode_config_for, dot_precision

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
_MIN_SPLIT_SLOTS = 256  # a split shorter than this costs more in merging than it gains in parallelism
_MAX_SPLITS = 64  # the merge loads every split of a row at once up to this many (decode_merge.CHUNK_S)
_WAVE_EFFICIENCY = 0.85  # FA3's rule: the fewest splits within this fraction of the best wave efficiency


@triton.jit
def _block_ids(TABLE, slot, hi, block_size, num_blocks):
    """int64 cache block of each ``slot`` (< ``hi``; others read block 0), clamped to ``[0, num_blocks)``."""
    blk = tl.load(TABLE + slot // block_size, mask=slot < hi, other=0)
    return tl.minimum(tl.maximum(blk, 0), num_blocks - 1).to(tl.int64)


# Lengths and counts vary from step to step and from pack to pack: specialising on their value (== 1, % 16) would
# compile a new kernel for the same code; the strides keep their alignment hints.
@triton.jit(do_not_specialize=["Lq", "capacity", "block_size", "num_blocks", "row_tiles", "num_splits"])
def _decode_kernel(
    Q, K, V, SEG, BR, CACHE_SEQLENS, Q_SEQLENS, BLOCK_TABLE, OUT, O_PART, LSE_PART,
    qk_scale,
    stride_qb, stride_qi, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_sb, stride_bt,
    stride_ob, stride_oi, stride_oh,
    stride_ps, stride_pb, stride_pi, stride_ph,
    stride_ls, stride_lb, stride_li,
    Lq, capacity, block_size, num_blocks, row_tiles, num_splits,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, SPLIT: tl.constexpr, CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    b = pid // row_tiles
    mt = pid % row_tiles
    b64 = b.to(tl.int64)

    n = tl.minimum(tl.maximum(tl.load(CACHE_SEQLENS + b), 0), capacity)
    lq = tl.minimum(tl.maximum(tl.load(Q_SEQLENS + b), 0), tl.minimum(Lq, n))

    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    i = rows // G
    head = hk * G + rows % G
    live = i < lq
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # every index that multiplies a stride is int64: a view (a head-major cache, a fused projection) can put a
    # head or a row past element 2**31 of its tensor even when each stride fits in int32
    i64 = i.to(tl.int64)
    head64 = head.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_ptr = Q + b64 * stride_qb + i64[:, None] * stride_qi + head64[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr, mask=live[:, None] & d_ok[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)

    # the new tokens' own ids, read from their cache slots
    q_slot = n - lq + i
    if PAGED:
        q_blk = tl.load(BLOCK_TABLE + b64 * stride_bt + q_slot // block_size, mask=live, other=0)
        q_blk = tl.minimum(tl.maximum(q_blk, 0), num_blocks - 1).to(tl.int64)
        q_id = q_blk * stride_sb + q_slot % block_size
    else:
        q_id = b64 * stride_sb + q_slot
    q_seg = tl.load(SEG + q_id, mask=live, other=-1)
    q_br = tl.load(BR + q_id, mask=live, other=-1)

    # this split's slice of [0, n), in whole tiles
    chunk = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    lo = sp * chunk
    # no key past this tile's last live query is visible to it; a tile with no live row (q_seqlens below Lq, the
    # padding rows of a CUDA-graph bucket) reads nothing
    first_i = (mt * BLOCK_M) // G
    last_i = tl.minimum(((mt + 1) * BLOCK_M - 1) // G, lq - 1)
    hi = tl.minimum(tl.minimum(lo + chunk, n), n - lq + last_i + 1)
    hi = tl.where(first_i < lq, hi, lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    table = BLOCK_TABLE + b64 * stride_bt
    if PAGED:  # the first tile's block ids; each iteration then fetches the next tile's (see the loop)
        blk_next = _block_ids(table, lo + cols, hi, block_size, num_blocks)
    for start in range(lo, hi, BLOCK_N):
        slot = start + cols
        k_ok = slot < hi
        if PAGED:
            # this tile's block ids came with the previous iteration, as a loop-carried value: the K/V addresses
            # do not wait on a load of this iteration, so the pipeliner can issue their copies a tile or more
            # ahead (with the ids loaded here, the copies of tile j+1 waited on tile j+1's table read and the wait
            # at the loop top drained every copy: no overlap at all, compiled for sm_90 and sm_80)
            blk = blk_next
            blk_next = _block_ids(table, slot + BLOCK_N, hi, block_size, num_blocks)
            within = slot % block_size
            k_row = blk * stride_kb + within * stride_kn
            v_row = blk * stride_vb + within * stride_vn
            id_off = blk * stride_sb + within
        else:
            k_row = b64 * stride_kb + slot.to(tl.int64) * stride_kn
            v_row = b64 * stride_vb + slot.to(tl.int64) * stride_vn
            id_off = b64 * stride_sb + slot
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_row[:, None] + hk64 * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        k_seg = tl.load(SEG + id_off, mask=k_ok, other=-1)
        k_br = tl.load(BR + id_off, mask=k_ok, other=-1)
        if CAST_F32:
            k = k.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (live[:, None] & k_ok[None, :] & (slot[None, :] <= q_slot[:, None])
                   & ((k_seg[None, :] != q_seg[:, None]) | (k_br[None, :] == q_br[:, None])))
        s = tl.where(visible, s, float("-inf"))

        # online softmax; rows that have seen nothing yet keep m = -inf and contribute exact zeros
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_row[:, None] + hk64 * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        if CAST_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    rows_ok = i < Lq
    if SPLIT:
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        base = sp.to(tl.int64) * stride_ps + b64 * stride_pb + i64 * stride_pi + head64 * stride_ph
        tl.store(O_PART + base[:, None] + d[None, :], o, mask=rows_ok[:, None] & d_ok[None, :])
        l_base = sp.to(tl.int64) * stride_ls + b64 * stride_lb + i64 * stride_li + head64
        tl.store(LSE_PART + l_base, lse, mask=rows_ok)
    else:
        o_ptr = OUT + b64 * stride_ob + i64[:, None] * stride_oi + head64[:, None] * stride_oh + d[None, :]
        tl.store(o_ptr, o.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])


def _cast_to_f32(dtype: torch.dtype) -> bool:
    """Multiply in float32 under the interpreter (it mishandles 16-bit arithmetic) and for float32 inputs;
    on a GPU, 16-bit tiles go to the tensor cores as they are, with float32 accumulation."""
    return dtype == torch.float32 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _sm_count(device_index: int | None) -> int:
    if device_index is None:  # the interpreter on CPU: a few "SMs" keep the program count small
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def splits_for(programs: int, sms: int, capacity: int, block_n: int = 64) -> int:
    """KV splits for ``programs`` (sequence, KV head, row tile) programs on ``sms`` SMs, by FlashAttention-3's rule
    (``num_splits_heuristic``): the wave efficiency of ``s`` splits is ``w / ceil(w)`` with ``w = programs * s /
    sms`` waves; take the fewest splits whose efficiency is within ``_WAVE_EFFICIENCY`` of the best over
    ``1..max_splits``. ``max_splits`` is bounded by ``_MAX_SPLITS``, by ``sms``, by the key tiles of the capacity,
    and by ``capacity // _MIN_SPLIT_SLOTS`` (a shorter split costs more in merging than it gains); a split count
    whose splits round to the same tile count as one fewer is skipped (FA3's ``is_split_eligible``), and a grid
    that already fills 80% of the SMs is not split.

    At N = 32k, Hkv = 8 on 132 SMs: 15 splits at K = 1 and 16 (8 programs: 120 CTAs, efficiency 0.91 of one
    wave), 8 at K = 64 with 128-row tiles (16 programs: 128 CTAs). The H100 probe of the former rule (SMs //
    programs) measured 16 and 8 best among {8, 16, 32, 64, 128}
    (bench/results/2026-11-25-nvidia-h100-80gb-hbm3-*); the parallel merge makes extra splits cheaper, which the
    next GPU call's sweep re-measures (bench/tune_decode.py).
    """
    programs = max(1, programs)
    if programs >= 0.8 * sms:
        return 1
    tiles = max(1, -(-capacity // block_n))
    max_splits = max(1, min(_MAX_SPLITS, sms, tiles, capacity // _MIN_SPLIT_SLOTS))

    def efficiency(s: int) -> float:
        waves = programs * s / sms
        return waves / -(-waves // 1)

    def eligible(s: int) -> bool:  # s splits of whole tiles differ from s - 1 splits
        return s == 1 or -(-tiles // s) != -(-tiles // (s - 1))

    best = max(efficiency(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if eligible(s) and efficiency(s) >= _WAVE_EFFICIENCY * best)


def num_splits_for(batch: int, hkv: int, row_tiles: int, capacity: int, device: torch.device,
                   block_n: int = 64) -> int:
    """``splits_for`` on ``device``. Uses shapes and the device only: the same value on every step of a captured
    graph."""
    if device.type == "cuda":
        sms = _sm_count(torch.cuda.current_device() if device.index is None else device.index)
    else:
        sms = _sm_count(None)
    return splits_for(batch * hkv * row_tiles, sms, capacity, block_n)


def branch_attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  cache_seqlens: torch.Tensor, segment: torch.Tensor, branch: torch.Tensor,
                                  q_seqlens: torch.Tensor, block_table: torch.Tensor | None, softmax_scale: float,
                                  num_splits: int | None = None, *, out: torch.Tensor | None = None,
                                  config: Config | None = None) -> torch.Tensor:
    """Backend entry point (see ``aspd_kernels._dispatch``): ``out [B, Lq, Hq, D]`` in q's dtype from
    ``q [B, Lq, Hq, D]``, ``k_cache, v_cache [B, Ncap, Hkv, D]`` (paged: ``[num_blocks, block_size, Hkv, D]``),
    ``cache_seqlens, q_seqlens int32 [B]``, ``segment, branch int32`` shaped as the cache's first two dimensions.
    ``num_splits`` forces the split count (tests, the sweep); ``out`` is an optional preallocated output (any
    strides, last one 1), every element of which is written; ``config`` forces the tiles (the sweep; its
    ``block_m`` must hold at least 16 rows)."""
    bsz, lq, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if out.numel() == 0:
        return out
    cfg = config or decode_config_for(lq * g, d, q.dtype, q.device, paged)
    block_m, block_n = cfg.block_m, cfg.block_n
    row_tiles = triton.cdiv(lq * g, block_m)
    splits = num_splits or num_splits_for(bsz, hkv, row_tiles, capacity, q.device, block_n)
    splits = max(1, min(int(splits), triton.cdiv(max(capacity, 1), block_n)))
    if splits > 1:
        o_part = torch.empty((splits, bsz, lq, hq, d), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((splits, bsz, lq, hq), dtype=torch.float32, device=q.device)
    else:  # unused: any float32 tensor satisfies the signature
        o_part = lse_part = out.new_empty((1, 1, 1, 1, 1), dtype=torch.float32)
    table = block_table if paged else cache_seqlens  # a placeholder pointer when contiguous
    seg_stride = segment.stride(0)
    _decode_kernel[(bsz * row_tiles, hkv, splits)](
        q, k_cache, v_cache, segment, branch, cache_seqlens, q_seqlens, table, out, o_part, lse_part,
        softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        seg_stride, table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), o_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        lq, capacity, k_cache.shape[1], k_cache.shape[0], row_tiles, splits,
        G=g, HEAD_DIM=d, BLOCK_D=block_d(d), BLOCK_M=block_m, BLOCK_N=block_n,
        PAGED=paged, SPLIT=splits > 1, CAST_F32=_cast_to_f32(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        merge_launch(o_part, lse_part, out, cache_seqlens, q_seqlens, capacity, splits, kernel=_merge_kernel)
    return out
