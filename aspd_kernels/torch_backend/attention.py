"""Branch-masked attention in plain torch. On the CPU: SDPA per query tile (``sdpa_tiles.py``); elsewhere
(query block x key block) tiles with an online softmax.

The CPU path of ``branch_attention`` and ``branch_attention_with_kvcache`` and the backend of last resort on any
device. Memory stays O(tile) whatever the length: no ``N x N`` mask, no ``N x N`` scores. Tiles with no visible
pair (causally ahead, or a sibling branch's span) are skipped. Accumulates in float64 for float64 inputs, float32
otherwise.
"""
from __future__ import annotations

import torch

from . import decode, sdpa_tiles
from .visibility import acc_dtype, visible

_TILE_ELEMENTS = 1 << 22  # scores held at once per tile, over all heads (32 MiB of float64)
_BLOCK_K = 512


def _block_q(heads: int) -> int:
    return max(16, _TILE_ELEMENTS // (heads * _BLOCK_K))


def _tiles(q_index: torch.Tensor, lk: int, heads: int):
    """(q slice, k start, k end) over the tiles a causal query block can see; ``q_index`` is increasing."""
    bq = _block_q(heads)
    for qs in range(0, q_index.shape[0], bq):
        qe = min(qs + bq, q_index.shape[0])
        last = min(int(q_index[qe - 1]) + 1, lk)
        for ks in range(0, last, _BLOCK_K):
            yield slice(qs, qe), ks, min(ks + _BLOCK_K, last)


def attend_fwd(q, k, v, segment, branch, q_index, scale: float):
    """One sequence. ``q [Lq, Hq, D]`` at increasing slots ``q_index [Lq]``; ``k, v [Lk, Hkv, D]``;
    ``segment, branch [Lk]``. Returns ``out [Lq, Hq, D]`` (q.dtype, zero rows where nothing is visible) and
    ``lse [Hq, Lq]`` float32 (``-inf`` there). On the CPU: SDPA per query tile (``sdpa_tiles``)."""
    if sdpa_tiles.supported(q):
        return sdpa_tiles.attend_fwd(q, k, v, segment, branch, q_index, scale)
    lq, hq, d = q.shape
    lk, hkv, dv = v.shape
    g = hq // hkv
    acc_t = acc_dtype(q)
    qh = q.to(acc_t).reshape(lq, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, Lq, D]
    kh = k.to(acc_t).permute(1, 0, 2)  # [Hkv, Lk, D]
    vh = v.to(acc_t).permute(1, 0, 2)
    q_seg, q_br = segment[q_index], branch[q_index]
    m = torch.full((hkv, g, lq), float("-inf"), dtype=acc_t, device=q.device)
    l = torch.zeros((hkv, g, lq), dtype=acc_t, device=q.device)
    acc = torch.zeros((hkv, g, lq, dv), dtype=acc_t, device=q.device)
    for qs, ks, ke in _tiles(q_index, lk, hq):
        vis = visible(q_index[qs], q_seg[qs], q_br[qs], ks, segment[ks:ke], branch[ks:ke])
        if not bool(vis.any()):
            continue  # a sibling branch's span: nothing to read
        s = torch.matmul(qh[:, :, qs], kh[:, None, ks:ke].transpose(-1, -2)) * scale
        s = s.masked_fill(~vis, float("-inf"))
        m_old = m[:, :, qs]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe[..., None])
        alpha = torch.exp(m_old - m_safe)
        l[:, :, qs] = l[:, :, qs] * alpha + p.sum(-1)
        acc[:, :, qs] = acc[:, :, qs] * alpha[..., None] + torch.matmul(p, vh[:, None, ks:ke])
        m[:, :, qs] = m_new
    seen = l > 0
    out = torch.where(seen[..., None], acc / torch.where(seen, l, torch.ones_like(l))[..., None], 0.0)
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, torch.ones_like(l))), float("-inf"))
    out = out.permute(2, 0, 1, 3).reshape(lq, hq, dv).to(q.dtype)
    return out, lse.reshape(hq, lq)  # accumulation dtype: callers store float32


def attend_bwd(dout, dlse, q, k, v, out, lse, segment, branch, q_index, scale: float):
    """Gradients of :func:`attend_fwd` (FlashAttention-2's recomputation). ``dlse [Hq, Lq]`` or None."""
    lq, hq, d = q.shape
    lk, hkv, dv_dim = v.shape
    g = hq // hkv
    acc_t = acc_dtype(q)
    to_h = lambda t: t.to(acc_t).reshape(lq, hkv, g, t.shape[-1]).permute(1, 2, 0, 3)  # noqa: E731
    qh, doh, oh = to_h(q), to_h(dout), to_h(out)
    kh = k.to(acc_t).permute(1, 0, 2)
    vh = v.to(acc_t).permute(1, 0, 2)
    # the fused CPU backward has no lse gradient: a used lse (dlse not all zero) takes the tiles below
    if sdpa_tiles.supported(q) and (dlse is None or not bool(dlse.any())):
        if q.dtype == torch.float64:
            lse = sdpa_tiles.attend_fwd(q, k, v, segment, branch, q_index, scale)[1]
        return sdpa_tiles.attend_bwd(dout, q, k, v, out, lse, segment, branch, q_index, scale)
    if q.dtype == torch.float64:
        # the stored lse is float32 (the op's contract); float64 gradients need it exact, so recompute it
        lse = attend_fwd(q, k, v, segment, branch, q_index, scale)[1]
    lse_h = lse.to(acc_t).reshape(hkv, g, lq)
    delta = (doh * oh).sum(-1)  # [Hkv, G, Lq]
    if dlse is not None:
        delta = delta - dlse.to(acc_t).reshape(hkv, g, lq)  # d lse / d s = p
    lse_safe = torch.where(torch.isinf(lse_h), torch.zeros_like(lse_h), lse_h)
    q_seg, q_br = segment[q_index], branch[q_index]
    dq = torch.zeros_like(qh)
    dk = torch.zeros((hkv, lk, d), dtype=acc_t, device=q.device)
    dv = torch.zeros((hkv, lk, dv_dim), dtype=acc_t, device=q.device)
    for qs, ks, ke in _tiles(q_index, lk, hq):
        vis = visible(q_index[qs], q_seg[qs], q_br[qs], ks, segment[ks:ke], branch[ks:ke])
        if not bool(vis.any()):
            continue
        s = torch.matmul(qh[:, :, qs], kh[:, None, ks:ke].transpose(-1, -2)) * scale
        p = torch.exp(s - lse_safe[:, :, qs, None]).masked_fill(~vis, 0.0)  # [Hkv, G, bq, bk]
        dv[:, ks:ke] += torch.matmul(p.transpose(-1, -2), doh[:, :, qs]).sum(1)
        dp = torch.matmul(doh[:, :, qs], vh[:, None, ks:ke].transpose(-1, -2))
        ds = p * (dp - delta[:, :, qs, None]) * scale
        dq[:, :, qs] += torch.matmul(ds, kh[:, None, ks:ke])
        dk[:, ks:ke] += torch.matmul(ds.transpose(-1, -2), qh[:, :, qs]).sum(1)
    dq = dq.permute(2, 0, 1, 3).reshape(lq, hq, d).to(q.dtype)
    return dq, dk.permute(1, 0, 2).to(k.dtype), dv.permute(1, 0, 2).to(v.dtype)


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q range, k range, q slots) of each packed sequence; queries are the last ``len_q`` keys."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        yield slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1]), torch.arange(lk - lq, lk, device=cu_seqlens_k.device)


def branch_attention_fwd(q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         softmax_scale):
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    for qr, kr, q_index in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q_index.numel() == 0:
            continue
        out[qr], lse[:, qr] = attend_fwd(q[qr], k[kr], v[kr], segment[kr], branch[kr], q_index, softmax_scale)
    return out, lse


def branch_attention_bwd(dout, dlse, q, k, v, out, lse, segment, branch, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k, softmax_scale):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qr, kr, q_index in _sequences(cu_seqlens_q, cu_seqlens_k):
        if q_index.numel() == 0:
            continue
        dq[qr], dk[kr], dv[kr] = attend_bwd(
            dout[qr], None if dlse is None else dlse[:, qr], q[qr], k[kr], v[kr], out[qr], lse[:, qr],
            segment[kr], branch[kr], q_index, softmax_scale,
        )
    return dq, dk, dv


def _cache_view(cache, block_table, b: int, n: int):
    if block_table is None:
        return cache[b, :n]
    bs = cache.shape[1]
    slots = torch.arange(n, device=cache.device)
    return cache[block_table[b, slots // bs].long(), slots % bs]


def branch_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table,
                                  softmax_scale):
    if sdpa_tiles.supported(q):
        return decode.branch_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens,
                                                    block_table, softmax_scale)
    bsz, lq_max = q.shape[:2]
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    out = torch.zeros(q.shape[:-1] + (v_cache.shape[-1],), dtype=q.dtype, device=q.device)
    for b, (n, lq) in enumerate(zip(cache_seqlens.tolist(), q_seqlens.tolist())):
        n = max(0, min(n, capacity))  # clamp: unchecked values never read out of bounds
        lq = max(0, min(lq, lq_max, n))
        if lq == 0:
            continue
        q_index = torch.arange(n - lq, n, device=q.device)
        out[b, :lq] = attend_fwd(
            q[b, :lq], _cache_view(k_cache, block_table, b, n), _cache_view(v_cache, block_table, b, n),
            _cache_view(segment, block_table, b, n), _cache_view(branch, block_table, b, n), q_index, softmax_scale,
        )[0]
    return out
