"""Position ids (SPEC section 3) as a segmented scan on the device, in Triton: two launches, no host sync.

1. ``_walk_kernel``, one program per sequence, walks it in tiles of ``BLOCK`` tokens carrying the state of the
   section left open at the tile boundary: the counter ``c`` at its start, its per-branch token counts (a
   ``MAX_BRANCHES`` vector), its longest branch and highest branch id. Inside a tile, sections are numbered by a
   cumulative sum of "new section" flags; a token's rank in its branch is the carried count of its branch (for the
   carried section) plus its same-(section, branch) predecessors in the tile (a ``BLOCK x BLOCK`` comparison).
   At each section's last token the section's advance is known (its length, its longest branch or ``K * W``), and
   the counter at every section start is ``c`` plus an exclusive cumulative sum of the advances ending before it.
   The kernel writes each token's rank and section start, and, at the section start's index, the section's counter
   and width (the width of ``fixed-length`` is the section's longest branch, known only at its end).
2. ``_positions_kernel``, one program per tile of tokens: ``c0 + rank + (branch - 1) * W`` (the last term for
   ``fixed-length`` only), with ``c0, W`` read at the token's section start.

``sequential`` needs only step 1, which then writes ``t - start`` of each sequence.
Branch ids must be below ``MAX_BRANCHES`` (a bound of the carried count vector); larger ids give wrong positions
but no out-of-bounds access, and the wrapper rejects them when it may read the device.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BRANCHES = 256
_BLOCK = 64
_WALK_WARPS = 8  # the [BLOCK, MAX_BRANCHES] one-hot tiles need the registers of 8 warps to avoid spilling
_STRATEGY_CODE = {"same-sequential": 0, "same-max": 1, "fixed-length": 2, "sequential": 3}


@triton.jit
def _walk_kernel(
    SEG, BR, CU, RANK, SEC_START, SEC_C0, SEC_W, N, width,
    STRATEGY: tl.constexpr, BLOCK: tl.constexpr, MAX_BRANCHES: tl.constexpr,
):
    seq = tl.program_id(0)
    # int64 token indices: a tile's lanes run up to BLOCK - 1 past the sequence's end, which wraps around (to
    # negative indices that pass ``t < end``; on a GPU the tile loop's counter too) when N is close to 2**31.
    # The loops count from 0 and add the int64 start: the interpreter hands a loop counter over as a Python int,
    # which Triton then types as int32 when it fits.
    start = tl.minimum(tl.maximum(tl.load(CU + seq).to(tl.int64), 0), N)
    end = tl.minimum(tl.maximum(tl.load(CU + seq + 1).to(tl.int64), start), N)
    offs = tl.arange(0, BLOCK)
    if STRATEGY == 3:  # sequential: the storage index inside the sequence
        for u0 in range(0, end - start, BLOCK):
            t = start + u0 + offs
            tl.store(RANK + t, (t - start).to(tl.int32), mask=t < end)
    else:
        ids = tl.arange(0, MAX_BRANCHES)
        earlier = offs[None, :] < offs[:, None]  # [t, t']: t' before t
        upto = offs[None, :] <= offs[:, None]
        zero = start * 0
        counts = tl.zeros([MAX_BRANCHES], tl.int32)  # the open section's tokens per branch
        longest = zero  # its longest branch so far
        top_branch = zero  # its highest branch id so far
        open_start = start  # its first token
        c = zero  # the counter at its start
        for u0 in range(0, end - start, BLOCK):
            t = start + u0 + offs
            ok = t < end
            seg = tl.load(SEG + t, mask=ok, other=0)
            br = tl.load(BR + t, mask=ok, other=0)
            prev = tl.load(SEG + t - 1, mask=ok & (t > start), other=0)
            nxt = tl.load(SEG + t + 1, mask=ok & (t + 1 < end), other=0)
            opens = ok & ((t == start) | (seg != prev))
            closes = ok & ((t + 1 == end) | (nxt != seg))
            local = tl.cumsum(opens.to(tl.int32), 0)  # 0: the section carried in from the previous tile
            carried = local == 0
            same = (local[:, None] == local[None, :]) & ok[None, :]

            onehot = br[:, None] == ids[None, :]
            carried_count = tl.sum(tl.where(onehot, counts[None, :], 0), 1)
            same_branch = same & (br[:, None] == br[None, :]) & earlier
            rank = tl.where(carried, carried_count, 0) + tl.sum(same_branch.to(tl.int32), 1)
            sec_start = tl.max(tl.where(upto & opens[None, :], t[None, :], open_start), 1)

            # statistics of each section, complete at its last token
            long_sec = tl.max(tl.where(same, rank[None, :] + 1, 0), 1)
            long_sec = tl.where(carried, tl.maximum(long_sec, longest), long_sec)
            top_sec = tl.max(tl.where(same, br[None, :], 0), 1)
            top_sec = tl.where(carried, tl.maximum(top_sec, top_branch), top_sec)
            length = t - sec_start + 1
            parallel = br > 0
            if STRATEGY == 2:
                w = tl.where(width > 0, width, long_sec)
                advance = tl.where(parallel, top_sec * w, length)
            elif STRATEGY == 1:
                w = long_sec
                advance = tl.where(parallel, long_sec, length)
            else:
                w = long_sec
                advance = length
            advance = tl.where(closes, advance, 0)
            before = tl.cumsum(advance, 0) - advance  # advances of the sections closed before each token
            tl.store(RANK + t, rank, mask=ok)
            tl.store(SEC_START + t, sec_start.to(tl.int32), mask=ok)
            tl.store(SEC_C0 + sec_start, (c + before).to(tl.int32), mask=closes)
            tl.store(SEC_W + sec_start, w.to(tl.int32), mask=closes)

            # carry the section open at the tile's end (if the tile closed it, the next tile opens a new one and
            # never reads the carried values)
            last = tl.max(tl.where(ok, local, 0), 0)
            in_last = ok & (local == last)
            hist = tl.sum(tl.where(onehot & in_last[:, None], 1, 0), 0)
            tile_long = tl.max(tl.where(in_last, rank + 1, 0), 0)
            tile_top = tl.max(tl.where(in_last, br, 0), 0)
            counts = tl.where(last == 0, counts, 0) + hist
            longest = tl.where(last == 0, tl.maximum(longest, tile_long), tile_long)
            top_branch = tl.where(last == 0, tl.maximum(top_branch, tile_top), tile_top)
            open_start = tl.max(tl.where(in_last, sec_start, 0), 0)
            c = c + tl.sum(advance, 0)


@triton.jit
def _positions_kernel(BR, RANK, SEC_START, SEC_C0, SEC_W, OUT, N, FIXED: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # the last tile's lanes may pass 2**31
    ok = t < N
    rank = tl.load(RANK + t, mask=ok, other=0)
    sec = tl.minimum(tl.maximum(tl.load(SEC_START + t, mask=ok, other=0), 0), N - 1)
    c0 = tl.load(SEC_C0 + sec, mask=ok, other=0)
    pos = c0 + rank
    if FIXED:
        br = tl.load(BR + t, mask=ok, other=0)
        w = tl.load(SEC_W + sec, mask=ok, other=0)
        pos += tl.where(br > 0, (br - 1) * w, 0)
    tl.store(OUT + t, pos, mask=ok)


def _host_checks_allowed(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def remap_positions(segment, branch, cu_seqlens, strategy: str, width):
    """Backend entry point (see ``aspd_kernels._dispatch``): int32 ``[N]`` positions."""
    n = segment.shape[0]
    out = torch.empty(n, dtype=torch.int32, device=segment.device)
    if n == 0:
        return out
    code = _STRATEGY_CODE[strategy]
    if code != 3 and _host_checks_allowed(branch) and int(branch.max()) >= MAX_BRANCHES:
        raise ValueError(f"branch: ids up to {MAX_BRANCHES - 1} are supported by the triton remap_positions, "
                         f"got {int(branch.max())}")
    bsz = cu_seqlens.shape[0] - 1
    if code == 3:
        _walk_kernel[(bsz,)](segment, branch, cu_seqlens, out, out, out, out, n, 0,
                             STRATEGY=3, BLOCK=_BLOCK, MAX_BRANCHES=MAX_BRANCHES)
        return out
    scratch = torch.empty((3, n), dtype=torch.int32, device=segment.device)
    sec_start, sec_c0, sec_w = scratch[0], scratch[1], scratch[2]
    _walk_kernel[(bsz,)](segment, branch, cu_seqlens, out, sec_start, sec_c0, sec_w, n, width or 0,
                         STRATEGY=code, BLOCK=_BLOCK, MAX_BRANCHES=MAX_BRANCHES, num_warps=_WALK_WARPS)
    _positions_kernel[(triton.cdiv(n, 1024),)](branch, out, sec_start, sec_c0, sec_w, out, n,
                                               FIXED=code == 2, BLOCK=1024)
    return out


def _aot_specs() -> list[dict]:
    walk_sig = {name: "*i32" for name in ("SEG", "BR", "CU", "RANK", "SEC_START", "SEC_C0", "SEC_W")}
    walk_sig.update(N="i32", width="i32")
    specs = [dict(name=f"positions_walk_{strategy}", fn=_walk_kernel, signature=dict(walk_sig),
                  num_warps=_WALK_WARPS if code != 3 else 4,
                  constexprs=dict(STRATEGY=code, BLOCK=_BLOCK, MAX_BRANCHES=MAX_BRANCHES))
             for strategy, code in _STRATEGY_CODE.items()]
    pos_sig = {name: "*i32" for name in ("BR", "RANK", "SEC_START", "SEC_C0", "SEC_W", "OUT")}
    pos_sig.update(N="i32")
    specs += [dict(name=f"positions_final{'_fixed' if fixed else ''}", fn=_positions_kernel, signature=dict(pos_sig),
                   constexprs=dict(FIXED=fixed, BLOCK=1024)) for fixed in (False, True)]
    return specs


AOT_SPECS = _aot_specs()
