"""``branch_attention_with_kvcache``: the decoding step over a contiguous or paged KV cache."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks as chk
from . import _cuda
from ._dispatch import implementation, resolve
from ._plan_cache import PlanCache, signature
from ._registration import define


def _branch_attention_with_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    q_seqlens: Tensor, block_table: Tensor | None, softmax_scale: float, backend: str,
) -> Tensor:
    return implementation(backend, "branch_attention_with_kvcache")(
        q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table, softmax_scale
    )


def _fake(q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table, softmax_scale, backend):
    return q.new_empty(q.shape[:-1] + (v_cache.shape[-1],))


_overload = define("branch_attention_with_kvcache", _branch_attention_with_kvcache, _fake)


def check_cache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    q_seqlens: Tensor | None, block_table: Tensor | None, k_name: str = "k_cache", v_name: str = "v_cache",
    seg_name: str = "segment", br_name: str = "branch",
) -> None:
    """Shape, dtype and device checks shared by the ops that take a KV cache (values: :func:`cache_values`)."""
    dev = q.device
    bsz, lq, hq, d = q.shape
    chk.tensor(k_name, k_cache, 4, device=dev)
    chk.tensor(v_name, v_cache, 4, device=dev)
    hkv = k_cache.shape[2]
    if block_table is None:
        chk.shape(k_name, k_cache, (bsz, None, hkv, d))
    else:
        chk.tensor("block_table", block_table, 2, (torch.int32,), dev)
        chk.shape("block_table", block_table, (bsz, None))
        chk.shape(k_name, k_cache, (None, None, hkv, d))
    chk.shape(v_name, v_cache, k_cache.shape)
    chk.heads("q", hq, k_name, hkv)
    for name, t in ((seg_name, segment), (br_name, branch)):
        chk.tensor(name, t, 2, (torch.int32,), dev)
        chk.shape(name, t, k_cache.shape[:2])
    chk.tensor("cache_seqlens", cache_seqlens, 1, (torch.int32,), dev)
    chk.shape("cache_seqlens", cache_seqlens, (bsz,))
    if q_seqlens is not None:
        chk.tensor("q_seqlens", q_seqlens, 1, (torch.int32,), dev)
        chk.shape("q_seqlens", q_seqlens, (bsz,))


def default_q_seqlens(q: Tensor, q_seqlens: Tensor | None) -> Tensor:
    """``q_seqlens`` as given, or ``Lq = q.shape[1]`` for every sequence (int32 ``[B]``)."""
    if q_seqlens is not None:
        return q_seqlens
    return torch.full((q.shape[0],), q.shape[1], dtype=torch.int32, device=q.device)


def cache_values(
    v: chk.Violations, q: Tensor, k_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    q_seqlens: Tensor, block_table: Tensor | None, seg_name: str = "segment", br_name: str = "branch",
    check_ids: bool = True,
) -> None:
    """Value rules of a KV-cache call, added to ``v``: lengths in range, block ids of used blocks inside the pool,
    and (``check_ids``; off where an append is about to overwrite some of them) the ids of every valid slot."""
    bsz, lq = q.shape[:2]
    if bsz == 0:
        return
    dev = q.device
    capacity = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    v.add(cache_seqlens.clamp(0, capacity) != cache_seqlens,
          lambda: f"cache_seqlens must lie in [0, {capacity}] (the cache capacity), got "
                  f"[{int(cache_seqlens.min())}, {int(cache_seqlens.max())}]")
    v.add(q_seqlens.clamp(0, lq) != q_seqlens,
          lambda: f"q_seqlens must lie in [0, {lq}] (q.shape[1]), got [{int(q_seqlens.min())}, {int(q_seqlens.max())}]")
    v.add(q_seqlens > cache_seqlens,
          lambda: "q_seqlens must not exceed cache_seqlens: the new tokens are already in the cache")
    if block_table is not None:
        bs = k_cache.shape[1]
        used = torch.arange(block_table.shape[1], device=dev)[None, :] * bs < cache_seqlens[:, None]
        v.add(used & ((block_table < 0) | (block_table >= k_cache.shape[0])),
              lambda: f"block_table holds block ids outside [0, {k_cache.shape[0]}) for used blocks")
    if not check_ids:
        return
    if block_table is not None:
        gather = lambda t: t[block_table.long().clamp(0, k_cache.shape[0] - 1)].reshape(bsz, -1)  # noqa: E731
        seg_l, br_l = gather(segment), gather(branch)
    else:
        seg_l, br_l = segment, branch
    valid = torch.arange(seg_l.shape[1], device=dev)[None, :] < cache_seqlens[:, None]
    chk.ids(v, seg_name, seg_l, br_name, br_l, valid)


def branch_attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    segment: Tensor,
    branch: Tensor,
    softmax_scale: float | None = None,
    q_seqlens: Tensor | None = None,
    block_table: Tensor | None = None,
    *,
    check_values: bool = True,
    backend: str | None = None,
) -> Tensor:
    """One decoding step: the newest tokens of each sequence attend to its cache under the branch mask.

    Shapes:
        q:              [B, Lq, Hq, D]   the new tokens (one per live branch while decoding), already in the cache
        k_cache, v_cache: [B, Ncap, Hkv, D] contiguous, or paged [num_blocks, block_size, Hkv, D]; q's dtype
        cache_seqlens:  int32 [B]        valid slots per sequence, the new tokens included
        segment, branch: int32 [B, Ncap] (paged: [num_blocks, block_size]) the ids of every cache slot
        q_seqlens:      int32 [B]        new tokens per sequence (default Lq); rows beyond come back as zeros
        block_table:    int32 [B, max_blocks] for a paged cache (vLLM's layout), else None

    Query i of sequence b sits at slot ``cache_seqlens[b] - q_seqlens[b] + i`` and sees slot k iff
    ``k <= q and (segment[k] != segment[q] or branch[k] == branch[q])``.
    Returns ``out [B, Lq, Hq, D]`` in q's dtype.
    """
    return _overload(*prepare(q, k_cache, v_cache, cache_seqlens, segment, branch, softmax_scale, q_seqlens,
                              block_table, check_values=check_values, backend=backend))


def prepare(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    softmax_scale: float | None = None, q_seqlens: Tensor | None = None, block_table: Tensor | None = None, *,
    check_values: bool = True, backend: str | None = None,
) -> tuple:
    """The checks of :func:`branch_attention_with_kvcache` and its backend choice: returns the arguments of
    ``torch.ops.aspd.branch_attention_with_kvcache`` (scale and backend name last). The plan half of a plan/run
    split: every layer of a decoding step has the same shapes, so it may reuse the plan's backend and scale."""
    # the CUDA extension's choice of kernel reads the caches' strides and alignment (decode_on_tensor_cores)
    key = signature((q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table),
                    (softmax_scale, backend), strided=(k_cache, v_cache), aligned=(k_cache, v_cache))
    scale, name = _PLANS.get(key) or _PLANS.put(key, _plan(q, k_cache, v_cache, cache_seqlens, segment, branch,
                                                          softmax_scale, q_seqlens, block_table, backend))
    q_seqlens = default_q_seqlens(q, q_seqlens)
    if chk.values_checkable(check_values):
        v = chk.Violations()
        cache_values(v, q, k_cache, cache_seqlens, segment, branch, q_seqlens, block_table)
        v.raise_first()
    return (
        chk.last_dim_contiguous(q), chk.last_dim_contiguous(k_cache), chk.last_dim_contiguous(v_cache),
        cache_seqlens.contiguous(), segment.contiguous(), branch.contiguous(), q_seqlens.contiguous(),
        None if block_table is None else block_table.contiguous(), scale, name,
    )


_PLANS = PlanCache()


def _plan(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
          softmax_scale: float | None, q_seqlens: Tensor | None, block_table: Tensor | None,
          backend: str | None) -> tuple[float, str]:
    """The structural checks and the backend choice: ``(softmax scale, backend name)``."""
    chk.tensor("q", q, 4, chk.FLOAT_DTYPES)
    chk.tensor("k_cache", k_cache, 4)
    chk.same_dtype("k_cache", k_cache, q)
    chk.tensor("v_cache", v_cache, 4)
    chk.same_dtype("v_cache", v_cache, q)
    check_cache(q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table)
    # auto: the CUDA extension only for what its tensor-core kernel covers; its generic kernel stays for float64
    # (Triton computes in float32 at most) and for an explicit backend="cuda"
    slow_cuda = q.dtype != torch.float64 and not _cuda.decode_on_tensor_cores(q, k_cache, v_cache)
    # (head sizes off the tensor-core kernel land here: D = 80 goes to Triton, D = 12 to the generic CUDA kernel,
    # which Triton refuses); a head size no GPU backend runs falls back to torch, or raises when one is forced
    name = resolve("branch_attention_with_kvcache", q.device, backend,
                   avoid=frozenset({"cuda"}) if slow_cuda else frozenset(),
                   refusals=chk.head_dim_refusals("q", q.shape[-1]))
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return scale, name
