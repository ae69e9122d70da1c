"""``rope_append_kv``: rotary embedding on q and k, and k, v, segment, branch written into the cache, in one op."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as chk
from ._dispatch import implementation, resolve
from ._plan_cache import PlanCache, signature
from ._registration import define
from .branch_attention_with_kvcache import cache_values, check_cache, default_q_seqlens


def _rope_append_kv(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin_cache: Tensor, k_cache: Tensor, v_cache: Tensor,
    segment_cache: Tensor, branch_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    q_seqlens: Tensor, block_table: Tensor | None, backend: str,
) -> Tensor:
    return implementation(backend, "rope_append_kv")(
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens, segment,
        branch, q_seqlens, block_table,
    )


def _fake(q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens, segment,
          branch, q_seqlens, block_table, backend):
    return torch.empty_like(q)


_overload = define("rope_append_kv", _rope_append_kv, _fake,
                   mutates_args=("k_cache", "v_cache", "segment_cache", "branch_cache"))


def rope_cos_sin_cache(inv_freq: Tensor, max_position: int, attention_scaling: float = 1.0) -> Tensor:
    """The ``cos_sin_cache float32 [max_position, rot_dim]`` that :func:`rope_append_kv` reads:
    ``[:, :rot_dim/2] = cos(p * inv_freq) * s`` and ``[:, rot_dim/2:] = sin(p * inv_freq) * s``.

    ``inv_freq [rot_dim/2]`` carries any frequency scaling (llama3, linear, ...), as transformers computes it.
    """
    p = torch.arange(max_position, dtype=torch.float64, device=inv_freq.device)
    angles = p[:, None] * inv_freq.double()[None, :]
    return (torch.cat([angles.cos(), angles.sin()], dim=1) * attention_scaling).float()


def rope_append_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    segment_cache: Tensor,
    branch_cache: Tensor,
    cache_seqlens: Tensor,
    segment: Tensor,
    branch: Tensor,
    q_seqlens: Tensor | None = None,
    block_table: Tensor | None = None,
    *,
    check_values: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Rotate q and k at ``positions`` (rotate-half, as Llama/Qwen2 in transformers) and write the rotated k, v and
    the new tokens' ``segment``/``branch`` into their cache slots. Returns the rotated q; mutates the four caches.

    Shapes:
        q:             [B, L, Hq, D]        new tokens' queries; k, v: [B, L, Hkv, D] (all one dtype)
        positions:     int32/int64 [B, L]   rotary position of each new token (see remap_positions)
        cos_sin_cache: float32 [P, rot_dim] cos | sin halves (rope_cos_sin_cache); rot_dim even, <= D;
                                            features beyond rot_dim pass through
        k_cache, v_cache, segment_cache, branch_cache, block_table: as in branch_attention_with_kvcache
        cache_seqlens: int32 [B]            valid slots per sequence *after* this append (the attention op's value)
        segment, branch: int32 [B, L]       ids of the new tokens
        q_seqlens:     int32 [B]            new tokens per sequence (default L); padding rows are not written

    Token i of sequence b goes to slot ``cache_seqlens[b] - q_seqlens[b] + i``.
    """
    return _overload(*prepare(q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache,
                              cache_seqlens, segment, branch, q_seqlens, block_table, check_values=check_values,
                              backend=backend))


def prepare(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin_cache: Tensor, k_cache: Tensor, v_cache: Tensor,
    segment_cache: Tensor, branch_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    q_seqlens: Tensor | None = None, block_table: Tensor | None = None, *, check_values: bool = True,
    backend: str | None = None,
) -> tuple:
    """The checks of :func:`rope_append_kv` and its backend choice: returns the arguments of
    ``torch.ops.aspd.rope_append_kv`` (the backend's name last). The plan half of a plan/run split: a caller that
    repeats the call with tensors of the same shapes (every layer of a decoding step) may reuse the backend name
    and call the op directly."""
    tensors = (q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens,
               segment, branch, q_seqlens, block_table)
    key = signature(tensors, (backend,), strided=(k_cache, v_cache, segment_cache, branch_cache))
    name = _PLANS.get(key) or _PLANS.put(key, _plan(*tensors, backend))
    q_seqlens = default_q_seqlens(q, q_seqlens)
    if chk.values_checkable(check_values) and q.shape[0]:
        bad = chk.Violations()
        cache_values(bad, q, k_cache, cache_seqlens, segment_cache, branch_cache, q_seqlens, block_table,
                     check_ids=False)
        rows = cos_sin_cache.shape[0]
        bad.add(positions.clamp(0, rows - 1) != positions,
                lambda: f"positions must lie in [0, {rows}) (cos_sin_cache rows), got "
                        f"[{int(positions.min())}, {int(positions.max())}]")
        live = torch.arange(q.shape[1], device=q.device)[None, :] < q_seqlens[:, None]
        chk.ids(bad, "segment", segment, "branch", branch, live)
        bad.raise_first()
    return (
        chk.last_dim_contiguous(q), chk.last_dim_contiguous(k), chk.last_dim_contiguous(v), positions.contiguous(),
        cos_sin_cache.contiguous(), k_cache, v_cache, segment_cache, branch_cache, cache_seqlens.contiguous(),
        segment.contiguous(), branch.contiguous(), q_seqlens.contiguous(),
        None if block_table is None else block_table.contiguous(), name,
    )


_PLANS = PlanCache()


def _plan(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin_cache: Tensor, k_cache: Tensor,
          v_cache: Tensor, segment_cache: Tensor, branch_cache: Tensor, cache_seqlens: Tensor, segment: Tensor,
          branch: Tensor, q_seqlens: Tensor | None, block_table: Tensor | None, backend: str | None) -> str:
    """The structural checks and the backend choice: the backend's name."""
    chk.tensor("q", q, 4, chk.FLOAT_DTYPES)
    dev = q.device
    bsz, lq, hq, d = q.shape
    chk.tensor("k", k, 4, device=dev)
    chk.tensor("v", v, 4, device=dev)
    chk.same_dtype("k", k, q)
    chk.same_dtype("v", v, q)
    chk.shape("k", k, (bsz, lq, None, d))
    chk.shape("v", v, k.shape)
    chk.tensor("k_cache", k_cache, 4, device=dev)
    chk.same_dtype("k_cache", k_cache, q)
    chk.tensor("v_cache", v_cache, 4, device=dev)
    chk.same_dtype("v_cache", v_cache, q)
    if k_cache.shape[2] != k.shape[2]:
        raise ValueError(f"k has {k.shape[2]} heads but k_cache has {k_cache.shape[2]}")
    chk.tensor("positions", positions, 2, chk.INDEX_DTYPES, dev)
    chk.shape("positions", positions, (bsz, lq))
    chk.tensor("cos_sin_cache", cos_sin_cache, 2, (torch.float32,), dev)
    rot = cos_sin_cache.shape[1]
    if rot % 2 or rot == 0 or rot > d:
        raise ValueError(f"cos_sin_cache: rotary dim (shape[1] = {rot}) must be even, positive and <= D ({d})")
    for name, t in (("segment", segment), ("branch", branch)):
        chk.tensor(name, t, 2, (torch.int32,), dev)
        chk.shape(name, t, (bsz, lq))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("segment_cache", segment_cache),
                    ("branch_cache", branch_cache)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is written in place")
    check_cache(q, k_cache, v_cache, cache_seqlens, segment_cache, branch_cache, q_seqlens, block_table,
                seg_name="segment_cache", br_name="branch_cache")
    return resolve("rope_append_kv", dev, backend)
