"""Block skipping for the branch-attention kernels: per-tile id ranges, the tile classification, per-tile lists.

A tile is a run of ``BLOCK`` consecutive slots of one sequence. Its summary is four int32 numbers over its valid
slots: ``(segment min, segment max, branch min, branch max)``. A (query tile, key tile) pair is classified from the
two summaries and the slot ranges alone, so no block mask is built on the host and a new layout costs two tiny
kernel launches (``_tile_ranges_kernel``, then ``_tile_lists_kernel``), not a host-side re-plan:

- ``TILE_SKIP``   no pair of the tile can be visible: the kernels read neither K nor V for it;
- ``TILE_FULL``   every pair is visible: the kernels skip the per-element mask;
- ``TILE_MASKED`` anything else: the mask of SPEC section 2 is evaluated per element.

The rules are sound by construction (a sufficient condition on the ranges, never a guess): "skip" implies no visible
pair, "full" implies all pairs visible; ``python_tests/test_triton_branch_attention.py`` checks both against the
dense mask. They are not complete: an interleaved section mixes branches inside a tile and is always "masked".
Per call, the lists cost O(tiles^2) integer work and ``B * q_tiles * k_tiles`` int32 of memory (512 KiB for one
32k-token sequence with 128 x 64 tiles), next to O(tokens^2 * D) for the attention itself.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_SKIP = tl.constexpr(0)
TILE_MASKED = tl.constexpr(1)
TILE_FULL = tl.constexpr(2)
_INT32_MAX = tl.constexpr(2147483647)


# Packed lengths vary from batch to batch: specialising on their value (== 1, % 16) would compile a new kernel
# for the same code while training on varying packs; the strides keep their alignment hints.
PACK_SIZES = ("total_q", "total_k", "max_seqlen_q", "max_seqlen_k")


@triton.jit
def seq_bounds(CU_Q, CU_K, b, total_q, total_k, max_seqlen_q, max_seqlen_k):
    """``(q_start, len_q, k_start, len_k)`` of sequence ``b``, clamped so that no input, however wrong
    (``check_values=False``), can make a kernel read or write outside the packed tensors or its tile buffers."""
    q_start = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), total_q)
    q_end = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), q_start), total_q)
    k_start = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), total_k)
    k_end = tl.minimum(tl.maximum(tl.load(CU_K + b + 1), k_start), total_k)
    len_k = tl.minimum(k_end - k_start, max_seqlen_k)
    len_q = tl.minimum(tl.minimum(q_end - q_start, max_seqlen_q), len_k)  # queries are the last len_q keys
    # int64 starts make every row * stride product 64-bit: packed tensors may exceed 2**31 elements
    return q_start.to(tl.int64), len_q, k_start.to(tl.int64), len_k


@triton.jit
def id_range(seg, br, ok):
    """(segment min, segment max, branch min, branch max) over the lanes where ``ok``; empty -> (MAX, -1, MAX, -1)."""
    s_min = tl.min(tl.where(ok, seg, _INT32_MAX), 0)
    s_max = tl.max(tl.where(ok, seg, -1), 0)
    b_min = tl.min(tl.where(ok, br, _INT32_MAX), 0)
    b_max = tl.max(tl.where(ok, br, -1), 0)
    return s_min, s_max, b_min, b_max


@triton.jit
def tile_class(q_lo, q_hi, q_whole, qs_min, qs_max, qb_min, qb_max,
               k_lo, k_hi, k_whole, ks_min, ks_max, kb_min, kb_max):
    """Classify a (query tile, key tile) pair. ``q_lo..q_hi`` / ``k_lo..k_hi``: slot ranges of the valid tokens;
    ``*_whole``: the tile has no padding lane. Visibility is ``k <= q and (seg[k] != seg[q] or br[k] == br[q])``."""
    # Skip, rule 1: the first key comes after the last query, so k <= q fails for every pair.
    ahead = k_lo > q_hi
    # Skip, rule 2: every token of both tiles lies in one section s (so seg[k] == seg[q] for every pair) and the
    # branch ranges do not overlap (so br[k] != br[q] for every pair): both terms of the "or" fail. This is the
    # sibling branch's contiguous span. Serial sections have branch 0 on both sides, so they never match it.
    one_section = (qs_min == qs_max) & (ks_min == ks_max) & (qs_min == ks_min)
    disjoint = (kb_max < qb_min) | (kb_min > qb_max)
    skip = ahead | (one_section & disjoint)
    # Full: the last key is at or before the first query (k <= q for every pair) and either every key section is
    # below every query section (seg[k] != seg[q]) or both tiles hold one and the same branch id (br[k] == br[q]).
    # Padding lanes need the mask, so only tiles without padding qualify.
    before = k_hi <= q_lo
    earlier_sections = ks_max < qs_min
    same_branch = (kb_min == kb_max) & (qb_min == qb_max) & (kb_min == qb_min)
    full = before & (earlier_sections | same_branch) & q_whole & k_whole
    return tl.where(skip, TILE_SKIP, tl.where(full, TILE_FULL, TILE_MASKED))


@triton.jit(do_not_specialize=[*PACK_SIZES, "max_tiles"])
def _tile_ranges_kernel(SEG, BR, CU_Q, CU_K, RANGES, total_q, total_k, max_seqlen_q, max_seqlen_k, max_tiles,
                        BLOCK: tl.constexpr, QUERY_TILES: tl.constexpr):
    """``RANGES[b, t, 0:4]`` = id range of tile ``t`` of sequence ``b``. Key tiles start at slot 0; query tiles
    start at the first query's slot ``len_k - len_q`` (bottom-right alignment), so they match the kernels' tiling.
    Tiles past the end of a sequence get the empty range (MAX, -1, MAX, -1) and are never classified."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    q_start, len_q, k_start, len_k = seq_bounds(CU_Q, CU_K, b, total_q, total_k, max_seqlen_q, max_seqlen_k)
    if QUERY_TILES:
        first = len_k - len_q
        n = len_q
    else:
        first = len_k * 0
        n = len_k
    idx = t * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    seg = tl.load(SEG + k_start + first + idx, mask=ok, other=0)
    br = tl.load(BR + k_start + first + idx, mask=ok, other=0)
    s_min, s_max, b_min, b_max = id_range(seg, br, ok)
    out = RANGES + (b * max_tiles + t) * 4
    tl.store(out, s_min)
    tl.store(out + 1, s_max)
    tl.store(out + 2, b_min)
    tl.store(out + 3, b_max)


def tile_ranges(segment: torch.Tensor, branch: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                total_q: int, max_seqlen_q: int, max_seqlen_k: int, block: int, query_tiles: bool) -> torch.Tensor:
    """int32 ``[B, max_tiles, 4]`` id ranges of every key tile (``query_tiles=False``, ``max_tiles =
    cdiv(max_seqlen_k, block)``) or query tile (``max_seqlen_q`` likewise) of every sequence."""
    batch = cu_seqlens_k.shape[0] - 1
    max_tiles = max(triton.cdiv(max_seqlen_q if query_tiles else max_seqlen_k, block), 1)
    ranges = torch.empty((batch, max_tiles, 4), dtype=torch.int32, device=segment.device)
    if batch > 0:
        _tile_ranges_kernel[(max_tiles, batch)](
            segment, branch, cu_seqlens_q, cu_seqlens_k, ranges, total_q, segment.shape[0], max_seqlen_q,
            max_seqlen_k, max_tiles, BLOCK=block, QUERY_TILES=query_tiles,
        )
    return ranges


@triton.jit(do_not_specialize=[*PACK_SIZES, "max_own", "max_other"])
def _tile_lists_kernel(SEG, BR, CU_Q, CU_K, RANGES, LISTS, COUNTS, total_q, total_k, max_seqlen_q, max_seqlen_k,
                       max_own, max_other, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       KEY_MAJOR: tl.constexpr, CHUNK: tl.constexpr):
    """For the tile ``t`` a compute program will own (a query tile, or with ``KEY_MAJOR`` a key tile) of sequence
    ``b``: the tiles of the other side it must visit, in two runs of ``LISTS[b, t, :]`` -- the ``COUNTS[b, t, 0]``
    full tiles from the front, the ``COUNTS[b, t, 1]`` masked tiles from the back. Skipped tiles are not listed.
    ``RANGES`` holds the other side's id ranges (``_tile_ranges_kernel``); the owned tile's are computed here.

    The compute kernels then loop over plain index lists with unconditional loads (which the software pipeliner can
    prefetch) and the mask is a compile-time property of each loop, not a branch per tile."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    q_start, len_q, k_start, len_k = seq_bounds(CU_Q, CU_K, b, total_q, total_k, max_seqlen_q, max_seqlen_k)
    off = len_k - len_q
    if KEY_MAJOR:
        first = t * 0
        own_len = len_k
        OWN: tl.constexpr = BLOCK_N
    else:
        first = off
        own_len = len_q
        OWN: tl.constexpr = BLOCK_M
    idx = t * OWN + tl.arange(0, OWN)
    ok = idx < own_len
    s_min, s_max, b_min, b_max = id_range(tl.load(SEG + k_start + first + idx, mask=ok, other=0),
                                          tl.load(BR + k_start + first + idx, mask=ok, other=0), ok)
    lo = first + t * OWN
    hi = first + tl.minimum(own_len, (t + 1) * OWN) - 1
    whole = (t + 1) * OWN <= own_len
    if KEY_MAJOR:
        start = tl.maximum(lo - off, 0) // BLOCK_M  # query tiles ending before this key tile are causally blind
        end = tl.cdiv(len_q, BLOCK_M)
    else:
        start = t * 0
        end = tl.cdiv(tl.minimum(len_k, hi + 1), BLOCK_N)  # key tiles past the last query are causally ahead
    end = tl.where(t * OWN < own_len, tl.minimum(end, max_other), 0)
    row = (b * max_own + t).to(tl.int64)
    n_full = t * 0
    n_masked = t * 0
    for c in range(start, end, CHUNK):
        j = c + tl.arange(0, CHUNK)
        j_ok = j < end
        r = RANGES + (b * max_other + j) * 4
        o_smin = tl.load(r, mask=j_ok, other=0)
        o_smax = tl.load(r + 1, mask=j_ok, other=0)
        o_bmin = tl.load(r + 2, mask=j_ok, other=0)
        o_bmax = tl.load(r + 3, mask=j_ok, other=0)
        if KEY_MAJOR:
            cls = tile_class(off + j * BLOCK_M, off + tl.minimum(len_q, (j + 1) * BLOCK_M) - 1,
                             (j + 1) * BLOCK_M <= len_q, o_smin, o_smax, o_bmin, o_bmax,
                             lo, hi, whole, s_min, s_max, b_min, b_max)
        else:
            cls = tile_class(lo, hi, whole, s_min, s_max, b_min, b_max,
                             j * BLOCK_N, tl.minimum(len_k, (j + 1) * BLOCK_N) - 1, (j + 1) * BLOCK_N <= len_k,
                             o_smin, o_smax, o_bmin, o_bmax)
        is_full = (j_ok & (cls == TILE_FULL)).to(tl.int32)
        is_masked = (j_ok & (cls == TILE_MASKED)).to(tl.int32)
        # stream compaction: the k-th listed tile of this chunk goes to slot (tiles listed before) + k
        full_at = n_full + tl.cumsum(is_full, 0) - 1
        masked_at = max_other - (n_masked + tl.cumsum(is_masked, 0))
        tl.store(LISTS + row * max_other + full_at, j, mask=is_full != 0)
        tl.store(LISTS + row * max_other + masked_at, j, mask=is_masked != 0)
        n_full += tl.sum(is_full, 0)
        n_masked += tl.sum(is_masked, 0)
    tl.store(COUNTS + row * 2, n_full)
    tl.store(COUNTS + row * 2 + 1, n_masked)


def tile_lists(segment: torch.Tensor, branch: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
               total_q: int, max_seqlen_q: int, max_seqlen_k: int, block_m: int, block_n: int, key_major: bool,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lists int32 [B, own_tiles, other_tiles], counts int32 [B, own_tiles, 2])`` of ``_tile_lists_kernel``:
    query-major (``key_major=False``, for the forward and dQ kernels) or key-major (for the dK/dV kernel)."""
    batch = cu_seqlens_k.shape[0] - 1
    max_qtiles = max(triton.cdiv(max_seqlen_q, block_m), 1)
    max_ktiles = max(triton.cdiv(max_seqlen_k, block_n), 1)
    max_own, max_other = (max_ktiles, max_qtiles) if key_major else (max_qtiles, max_ktiles)
    ranges = tile_ranges(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q, max_seqlen_k,
                         block_m if key_major else block_n, query_tiles=key_major)
    lists = torch.empty((batch, max_own, max_other), dtype=torch.int32, device=segment.device)
    counts = torch.empty((batch, max_own, 2), dtype=torch.int32, device=segment.device)
    if batch > 0:
        _tile_lists_kernel[(max_own, batch)](
            segment, branch, cu_seqlens_q, cu_seqlens_k, ranges, lists, counts, total_q, segment.shape[0],
            max_seqlen_q, max_seqlen_k, max_own, max_other, BLOCK_M=block_m, BLOCK_N=block_n,
            KEY_MAJOR=key_major, CHUNK=_LIST_CHUNK,
        )
    return lists, counts


_LIST_CHUNK = 128  # other-side tiles classified per vector step of _tile_lists_kernel


@triton.jit(do_not_specialize=[*PACK_SIZES, "max_qtiles", "max_ktiles"])
def _classify_kernel(SEG, BR, CU_Q, CU_K, KRANGES, CLASSES, total_q, total_k, max_seqlen_q, max_seqlen_k,
                     max_qtiles, max_ktiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KTILES: tl.constexpr):
    """Debug view: ``CLASSES[b, m, n]`` = the class the forward kernel gives (query tile m, key tile n) of sequence
    b, with the query summary computed on the fly exactly as there; -1 where a tile does not exist. All key tiles
    are classified at once (``tile_class`` is elementwise), ``KTILES`` >= ``max_ktiles`` lanes."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    q_start, len_q, k_start, len_k = seq_bounds(CU_Q, CU_K, b, total_q, total_k, max_seqlen_q, max_seqlen_k)
    off = len_k - len_q
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < len_q
    qs_min, qs_max, qb_min, qb_max = id_range(tl.load(SEG + k_start + off + rows, mask=row_ok, other=0),
                                              tl.load(BR + k_start + off + rows, mask=row_ok, other=0), row_ok)
    q_lo = off + pid_m * BLOCK_M
    q_hi = off + tl.minimum(len_q, (pid_m + 1) * BLOCK_M) - 1
    q_whole = (pid_m + 1) * BLOCK_M <= len_q
    kt = tl.arange(0, KTILES)
    kt_ok = kt < max_ktiles
    r = KRANGES + (b * max_ktiles + kt) * 4
    k_lo = kt * BLOCK_N
    cls = tile_class(q_lo, q_hi, q_whole, qs_min, qs_max, qb_min, qb_max,
                     k_lo, tl.minimum(len_k, k_lo + BLOCK_N) - 1, k_lo + BLOCK_N <= len_k,
                     tl.load(r, mask=kt_ok, other=0), tl.load(r + 1, mask=kt_ok, other=0),
                     tl.load(r + 2, mask=kt_ok, other=0), tl.load(r + 3, mask=kt_ok, other=0))
    exists = (pid_m * BLOCK_M < len_q) & (k_lo < len_k)
    tl.store(CLASSES + (b * max_qtiles + pid_m) * max_ktiles + kt, tl.where(exists, cls, -1), mask=kt_ok)


def tile_classes(segment: torch.Tensor, branch: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, total_q: int, max_seqlen_q: int, max_seqlen_k: int, block_m: int,
                 block_n: int) -> torch.Tensor:
    """int32 ``[B, cdiv(max_seqlen_q, block_m), cdiv(max_seqlen_k, block_n)]``: 0 skip, 1 masked, 2 full, -1 no
    such tile. For tests and for inspecting how much a layout skips; the kernels never build this matrix."""
    batch = cu_seqlens_k.shape[0] - 1
    kranges = tile_ranges(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q, max_seqlen_k,
                          block_n, query_tiles=False)
    max_qtiles = max(triton.cdiv(max_seqlen_q, block_m), 1)
    max_ktiles = kranges.shape[1]
    classes = torch.full((batch, max_qtiles, max_ktiles), -1, dtype=torch.int32, device=segment.device)
    if batch > 0:
        _classify_kernel[(max_qtiles, batch)](
            segment, branch, cu_seqlens_q, cu_seqlens_k, kranges, classes, total_q, segment.shape[0],
            max_seqlen_q, max_seqlen_k, max_qtiles, max_ktiles, BLOCK_M=block_m, BLOCK_N=block_n,
            KTILES=triton.next_power_of_2(max_ktiles),
        )
    return classes


def _aot_specs() -> list[dict]:
    ids = {n: "*i32" for n in ("SEG", "BR", "CU_Q", "CU_K")}
    sizes = {n: "i32" for n in ("total_q", "total_k", "max_seqlen_q", "max_seqlen_k")}
    specs = []
    for block in (16, 32, 64, 128):  # every BLOCK_M / BLOCK_N of the branch_attention tile tables
        for query in (False, True):
            specs.append(dict(
                name=f"tile_ranges_b{block}_{'q' if query else 'k'}", fn=_tile_ranges_kernel,
                signature={**ids, "RANGES": "*i32", **sizes, "max_tiles": "i32"},
                constexprs=dict(BLOCK=block, QUERY_TILES=query),
            ))
    # the (BLOCK_M, BLOCK_N) pairs of the branch_attention tile tables
    for bm, bn in ((128, 64), (128, 32), (64, 64), (32, 64), (64, 32), (32, 32), (32, 16), (16, 16)):
        for key_major in (False, True):
            specs.append(dict(
                name=f"tile_lists_m{bm}_n{bn}_{'k' if key_major else 'q'}", fn=_tile_lists_kernel,
                signature={**ids, "RANGES": "*i32", "LISTS": "*i32", "COUNTS": "*i32", **sizes, "max_own": "i32",
                           "max_other": "i32"},
                constexprs=dict(BLOCK_M=bm, BLOCK_N=bn, KEY_MAJOR=key_major, CHUNK=_LIST_CHUNK),
            ))
    specs.append(dict(
        name="tile_classes_b64", fn=_classify_kernel,
        signature={**ids, "KRANGES": "*i32", "CLASSES": "*i32", **sizes, "max_qtiles": "i32", "max_ktiles": "i32"},
        constexprs=dict(BLOCK_M=64, BLOCK_N=64, KTILES=512),
    ))
    return specs


AOT_SPECS = _aot_specs()
