"""Rotary embedding of the new tokens and their append into the KV cache, fused in one Triton launch.

Grid ``(B * L, Hq + Hkv)``: program ``(token, h)`` rotates query head ``h`` into the returned tensor, or, for
``h >= Hq``, rotates key head ``h - Hq`` and writes it with the value head into the token's cache slot; key head 0
also writes the token's ``segment``/``branch`` there.

Rotate-half (Llama/Qwen2 in transformers) over the first ``rot_dim`` features, the rest passing through:
``out[f] = x[f] cos[f] - x[f + rot/2] sin[f]`` and ``out[f + rot/2] = x[f + rot/2] cos[f] + x[f] sin[f]`` for
``f < rot/2``, with ``cos | sin`` read from row ``positions[b, i]`` of ``cos_sin_cache float32 [P, rot_dim]``.
Computed in float32. Token ``i`` of sequence ``b`` goes to slot ``cache_seqlens[b] - q_seqlens[b] + i``; padding
rows (``i >= q_seqlens[b]``) and slots outside ``[0, capacity)`` are not written, positions are clamped to
``[0, P)`` and block ids to ``[0, num_blocks)``, so unchecked inputs cannot write out of bounds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_append_kernel(
    Q, K, V, POS, CS, K_CACHE, V_CACHE, SEG_CACHE, BR_CACHE, CACHE_SEQLENS, SEG, BR, Q_SEQLENS, BLOCK_TABLE, Q_OUT,
    stride_qb, stride_qi, stride_qh,
    stride_kb, stride_ki, stride_kh,
    stride_vb, stride_vi, stride_vh,
    stride_ob, stride_oi, stride_oh,
    stride_cb, stride_cn, stride_ch,
    stride_sb, stride_bt,
    L, Hq, num_positions, capacity, block_size, num_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROT_HALF: tl.constexpr, PAGED: tl.constexpr,
):
    token = tl.program_id(0)
    h = tl.program_id(1)
    b = token // L
    i = token % L
    # int64 indices wherever they multiply a stride: q, k, v may be views (head-major, fused projections) whose
    # heads lie past element 2**31 while every stride fits in int32
    b64 = b.to(tl.int64)
    i64 = i.to(tl.int64)
    h64 = h.to(tl.int64)

    pos = tl.load(POS + token).to(tl.int32)
    pos = tl.minimum(tl.maximum(pos, 0), num_positions - 1)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rot = d < 2 * ROT_HALF
    first = d < ROT_HALF
    freq = tl.where(first, d, d - ROT_HALF)
    partner = tl.where(first, d + ROT_HALF, d - ROT_HALF)
    cs_row = CS + pos.to(tl.int64) * (2 * ROT_HALF)
    cos = tl.load(cs_row + freq, mask=rot, other=1.0)
    sin = tl.load(cs_row + ROT_HALF + freq, mask=rot, other=0.0)
    sign = tl.where(first, -1.0, 1.0)

    if h < Hq:
        src = Q + b64 * stride_qb + i64 * stride_qi + h64 * stride_qh
        x = tl.load(src + d, mask=d_ok, other=0.0).to(tl.float32)
        x_p = tl.load(src + partner, mask=rot, other=0.0).to(tl.float32)
        y = tl.where(rot, x * cos + sign * x_p * sin, x)
        dst = Q_OUT + b64 * stride_ob + i64 * stride_oi + h64 * stride_oh
        tl.store(dst + d, y.to(Q_OUT.dtype.element_ty), mask=d_ok)
    else:
        hk = h - Hq
        hk64 = h64 - Hq
        n = tl.load(CACHE_SEQLENS + b)
        lq = tl.load(Q_SEQLENS + b)
        slot = n - lq + i
        if (i < lq) & (slot >= 0) & (slot < capacity):
            if PAGED:
                blk = tl.load(BLOCK_TABLE + b64 * stride_bt + slot // block_size)
                blk = tl.minimum(tl.maximum(blk, 0), num_blocks - 1).to(tl.int64)
                row = blk * stride_cb + (slot % block_size) * stride_cn
                id_off = blk * stride_sb + slot % block_size
            else:
                row = b64 * stride_cb + slot.to(tl.int64) * stride_cn
                id_off = b64 * stride_sb + slot
            src = K + b64 * stride_kb + i64 * stride_ki + hk64 * stride_kh
            x = tl.load(src + d, mask=d_ok, other=0.0).to(tl.float32)
            x_p = tl.load(src + partner, mask=rot, other=0.0).to(tl.float32)
            y = tl.where(rot, x * cos + sign * x_p * sin, x)
            tl.store(K_CACHE + row + hk64 * stride_ch + d, y.to(K_CACHE.dtype.element_ty), mask=d_ok)
            val = tl.load(V + b64 * stride_vb + i64 * stride_vi + hk64 * stride_vh + d, mask=d_ok)
            tl.store(V_CACHE + row + hk64 * stride_ch + d, val, mask=d_ok)
            if hk == 0:
                tl.store(SEG_CACHE + id_off, tl.load(SEG + token))
                tl.store(BR_CACHE + id_off, tl.load(BR + token))


def rope_append_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens,
                   segment, branch, q_seqlens, block_table):
    """Backend entry point (see ``aspd_kernels._dispatch``): returns the rotated q, writes the caches in place."""
    bsz, lq, hq, d = q.shape
    hkv = k.shape[2]
    q_rot = torch.empty_like(q, memory_format=torch.contiguous_format)
    if bsz * lq == 0:
        return q_rot
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    table = block_table if paged else cache_seqlens  # a placeholder pointer when contiguous
    positions = positions.contiguous()
    segment, branch = segment.contiguous(), branch.contiguous()
    _rope_append_kernel[(bsz * lq, hq + hkv)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens, segment,
        branch, q_seqlens, table, q_rot,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_rot.stride(0), q_rot.stride(1), q_rot.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        segment_cache.stride(0), table.stride(0),
        lq, hq, cos_sin_cache.shape[0], capacity, k_cache.shape[1], k_cache.shape[0],
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), ROT_HALF=cos_sin_cache.shape[1] // 2, PAGED=paged,
        num_warps=1 if d <= 64 else 2,
    )
    return q_rot


def _aot_specs() -> list[dict]:
    """fp16/bf16, D = 64/128; int32 positions with a contiguous cache and int64 positions with a paged one."""
    ints = ("stride_qb stride_qi stride_qh stride_kb stride_ki stride_kh stride_vb stride_vi stride_vh stride_ob "
            "stride_oi stride_oh stride_cb stride_cn stride_ch stride_sb stride_bt L Hq num_positions capacity "
            "block_size num_blocks").split()
    specs = []
    for dtype in ("fp16", "bf16"):
        for d in (64, 128):
            for pos_t, paged in (("i32", False), ("i64", True)):
                sig = {name: f"*{dtype}" for name in ("Q", "K", "V", "K_CACHE", "V_CACHE", "Q_OUT")}
                sig.update({name: "*i32" for name in ("SEG_CACHE", "BR_CACHE", "CACHE_SEQLENS", "SEG", "BR",
                                                      "Q_SEQLENS", "BLOCK_TABLE")})
                sig.update(POS=f"*{pos_t}", CS="*fp32", **{name: "i32" for name in ints})
                specs.append(dict(name=f"rope_append_{dtype}_d{d}_pos{pos_t}{'_paged' if paged else ''}",
                                  fn=_rope_append_kernel, signature=sig, num_warps=1 if d <= 64 else 2,
                                  constexprs=dict(HEAD_DIM=d, BLOCK_D=d, ROT_HALF=d // 2, PAGED=paged)))
    return specs


AOT_SPECS = _aot_specs()
