"""``branch_attention_with_kvcache`` on the CPU: per cache row, attend only to the keys some query can see.

A decoding step has few queries (one per live branch) against a long row, and each sees the shared text before its
section plus its own branch: an interleaved step over K branches visits about ``c + n / K`` keys per query, where
dense SDPA over the row (and a fused kernel with a mask) visits all ``n``. ``decode_plan`` finds, per row, the
prefix of keys every query sees and each query's other visible keys; ``decode_split`` attends the prefix in one
GQA-grouped matmul with no mask and the per-query lists as a batch of small matmuls, joined in one softmax. Rows
where that would not pay (prefill-like rows: the lists would be as long as the row) or not fit take one call of
torch's fused CPU flash kernel with an ``[Lq, n]`` additive mask, and rows whose mask would exceed the tile bound
take the query tiles of ``sdpa_tiles``; memory stays O(n * tile) on every path.

The plan depends only on the lengths, the block table and the cache ids, so inside a ``step_scope`` every layer of
a step reuses the first layer's (``step_cache``). Outside one (a direct call) each call plans for itself, which is
why the plan runs in numpy: its dozen small index operations would cost several times more as torch ops.
"""
from __future__ import annotations

import torch

from . import decode_split, sdpa_tiles
from .decode_plan import plan
from .step_cache import shared
from .visibility import acc_dtype


def _new_out(shape: tuple[int, ...], dtype: torch.dtype, covered: bool) -> torch.Tensor:
    """The output, zero-filled only when some query rows are padding (``q_seqlens < Lq``): otherwise every element
    is written by its row's attention, and a fill would be one more pass. (The tests poison it through here.)"""
    return (torch.empty if covered else torch.zeros)(shape, dtype=dtype)


def branch_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table,
                                  softmax_scale):
    """CPU tensors only (``sdpa_tiles.supported``); the contract of ``attention.branch_attention_with_kvcache``."""
    acc = acc_dtype(q)
    p = shared("decode", (cache_seqlens, q_seqlens, segment, branch, block_table),
               (tuple(k_cache.shape[:3]), tuple(q.shape[1:3]), acc, k_cache.is_contiguous(),
                v_cache.is_contiguous()),
               lambda: plan(q, k_cache, v_cache, cache_seqlens, q_seqlens, segment, branch, block_table, acc))
    bsz, lq_max, hq = q.shape[:3]
    if bsz == 1 and lq_max == 1 and p.covered and p.rows[0].split is not None and acc == q.dtype:
        # one query of one row (a serial step): [Hkv, 1, G, Dv] is already the [1, 1, Hq, Dv] output's layout,
        # so it is returned as is instead of copied into a fresh output
        o = decode_split.attend(q[0], k_cache, v_cache, 0, p.rows[0].split, softmax_scale, acc)
        return o.view(1, 1, hq, o.shape[-1])
    out = _new_out(q.shape[:-1] + (v_cache.shape[-1],), q.dtype, p.covered)
    for r in p.rows:
        if r.split is not None:
            o = decode_split.attend(q[r.b, :r.lq], k_cache, v_cache, r.b, r.split, softmax_scale, acc)
            hkv, _, g, dv = o.shape
            out[r.b, :r.lq].view(r.lq, hkv, g, dv).copy_(o.transpose(0, 1))
            continue
        if r.slots is None:
            k, v = k_cache[r.b, :r.n], v_cache[r.b, :r.n]
        else:
            k, v = k_cache[r.slots], v_cache[r.slots]
        if r.mask is None:  # a long prefill-like row: query tiles keep the mask O(tile)
            seg = segment[r.b, :r.n] if r.slots is None else segment[r.slots]
            br = branch[r.b, :r.n] if r.slots is None else branch[r.slots]
            q_index = torch.arange(r.n - r.lq, r.n, device=q.device)
            out[r.b, :r.lq] = sdpa_tiles.attend_fwd(q[r.b, :r.lq], k, v, seg, br, q_index, softmax_scale)[0]
            continue
        heads = sdpa_tiles.as_heads
        o = sdpa_tiles.flash_fwd(heads(q[r.b, :r.lq].to(acc)), heads(k.to(acc)), heads(v.to(acc)),
                                 attn_mask=r.mask, scale=softmax_scale)[0]
        out[r.b, :r.lq] = o[0].transpose(0, 1)
    return out
