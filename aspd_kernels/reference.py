"""The yardstick: dense, obviously-correct torch implementations of SPEC sections 2-4.

Nothing here is fast and nothing here imports the rest of the package. Every kernel is tested against these
functions in float64. ``dense_mask`` is the only place in the package that builds an ``N x N`` mask.
"""
from __future__ import annotations

import math

import torch

STRATEGIES = ("same-sequential", "same-max", "fixed-length", "sequential")


def dense_mask(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """Boolean visibility ``[N, N]`` (row = query slot, column = key slot) of one sequence (SPEC section 2).

    ``mask[q, k] = k <= q and (segment[k] != segment[q] or branch[k] == branch[q])``.
    """
    n = segment.shape[0]
    idx = torch.arange(n, device=segment.device)
    causal = idx[None, :] <= idx[:, None]
    other_section = segment[None, :] != segment[:, None]
    same_branch = branch[None, :] == branch[:, None]
    return causal & (other_section | same_branch)


def attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment: torch.Tensor,
    branch: torch.Tensor,
    q_index: torch.Tensor,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention of the queries ``q [Lq, Hq, D]`` at storage slots ``q_index [Lq]`` over one sequence's keys.

    ``k, v [Lk, Hkv, D]``, ``segment, branch [Lk]``. Returns ``out [Lq, Hq, D]`` (q's dtype; rows that see no key
    are zero) and ``lse [Hq, Lq]`` float32 (``-inf`` for such rows). Computed in float64.
    """
    lq, hq, d = q.shape
    hkv = k.shape[1]
    full = dense_mask(segment, branch)
    mask = full[q_index.long()]  # [Lq, Lk]
    qf, kf, vf = q.double(), k.double(), v.double()
    kf = kf.repeat_interleave(hq // hkv, dim=1)
    vf = vf.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", qf, kf) * softmax_scale
    scores = scores.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", probs, vf)
    return out.to(q.dtype), lse.float()


def branch_attention(q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k, softmax_scale=None):
    """Dense reference of ``aspd_kernels.branch_attention`` (packed varlen, bottom-right aligned queries)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        q_index = torch.arange(lk - lq, lk, device=q.device)
        o, l = attention_dense(
            q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
            segment[ck[b]:ck[b + 1]], branch[ck[b]:ck[b + 1]], q_index, scale,
        )
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses, dim=1)


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, b: int, n: int) -> torch.Tensor:
    """The first ``n`` slots of sequence ``b`` from a paged ``[num_blocks, block_size, ...]`` tensor."""
    bs = cache.shape[1]
    slots = torch.arange(n, device=cache.device)
    return cache[block_table[b, slots // bs].long(), slots % bs]


def branch_attention_with_kvcache(
    q, k_cache, v_cache, cache_seqlens, segment, branch, softmax_scale=None, q_seqlens=None, block_table=None
):
    """Dense reference of ``aspd_kernels.branch_attention_with_kvcache``; padding query rows are zero."""
    bsz, lq_max = q.shape[:2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    for b in range(bsz):
        n = int(cache_seqlens[b])
        lq = int(q_seqlens[b]) if q_seqlens is not None else lq_max
        if lq == 0:
            continue
        if block_table is None:
            kb, vb, sb, bb = k_cache[b, :n], v_cache[b, :n], segment[b, :n], branch[b, :n]
        else:
            kb, vb = gather_paged(k_cache, block_table, b, n), gather_paged(v_cache, block_table, b, n)
            sb, bb = gather_paged(segment, block_table, b, n), gather_paged(branch, block_table, b, n)
        q_index = torch.arange(n - lq, n, device=q.device)
        out[b, :lq] = attention_dense(q[b, :lq], kb, vb, sb, bb, q_index, scale)[0]
    return out


def positions_one(segment: list[int], branch: list[int], strategy: str = "same-sequential", width=None) -> list[int]:
    """SPEC section 3 for one sequence, by walking its sections with a counter: plain Python lists in and out."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    n = len(segment)
    if strategy == "sequential":
        return list(range(n))
    pos = [0] * n
    c = 0
    start = 0
    while start < n:
        end = start
        while end < n and segment[end] == segment[start]:
            end += 1
        ids = range(start, end)
        if all(branch[t] == 0 for t in ids):
            for t in ids:
                pos[t] = c + (t - start)
            c += end - start
        else:
            lengths: dict[int, int] = {}
            rank = []
            for t in ids:
                rank.append(lengths.get(branch[t], 0))
                lengths[branch[t]] = rank[-1] + 1
            w = width if width is not None else max(lengths.values())
            for t, r in zip(ids, rank):
                j = branch[t]
                pos[t] = c + r + ((j - 1) * w if strategy == "fixed-length" else 0)
            if strategy == "same-sequential":
                c += end - start
            elif strategy == "same-max":
                c += max(lengths.values())
            else:
                c += max(lengths) * w
        start = end
    return pos


def remap_positions(segment, branch, strategy="same-sequential", cu_seqlens=None, width=None) -> torch.Tensor:
    """Dense reference of ``aspd_kernels.remap_positions``: int32 positions, same shape and device as ``segment``."""
    seg, br = segment.tolist(), branch.tolist()
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, len(seg)]
    out: list[int] = []
    for b in range(len(bounds) - 1):
        s, e = bounds[b], bounds[b + 1]
        out += positions_one(seg[s:e], br[s:e], strategy, width)
    return torch.tensor(out, dtype=torch.int32, device=segment.device)


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention of Llama/Qwen2 in transformers, on the first ``2 * cos.shape[-1]``
    features of ``x [..., D]``; ``cos, sin [..., rot_dim/2]`` broadcast over heads."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def rope_append_kv(
    q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens,
    segment, branch, q_seqlens=None, block_table=None,
):
    """Dense reference of ``aspd_kernels.rope_append_kv`` (mutates the caches, returns rotated q), in float64."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.double()[positions.long()]  # [B, L, rot]
    cos, sin = cs[..., None, :half], cs[..., None, half:]
    q_rot = rotate_half(q.double(), cos, sin).to(q.dtype)
    k_rot = rotate_half(k.double(), cos, sin).to(k.dtype)
    bsz, lq_max = q.shape[:2]
    for b in range(bsz):
        lq = int(q_seqlens[b]) if q_seqlens is not None else lq_max
        n = int(cache_seqlens[b])
        for i in range(lq):
            slot = n - lq + i
            if block_table is None:
                idx = (b, slot)
            else:
                bs = k_cache.shape[1]
                idx = (int(block_table[b, slot // bs]), slot % bs)
            k_cache[idx] = k_rot[b, i]
            v_cache[idx] = v[b, i]
            segment_cache[idx] = segment[b, i]
            branch_cache[idx] = branch[b, i]
    return q_rot
