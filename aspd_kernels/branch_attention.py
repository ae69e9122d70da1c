"""``branch_attention``: packed variable-length attention under the branch mask (prefill and training)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks as chk
from ._dispatch import implementation, resolve
from ._plan_cache import PlanCache, signature
from ._registration import define


def _branch_attention(
    q: Tensor, k: Tensor, v: Tensor, segment: Tensor, branch: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, backend: str,
) -> tuple[Tensor, Tensor]:
    return implementation(backend, "branch_attention_fwd")(
        q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale
    )


def _fake(q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, backend):
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _branch_attention_backward(
    dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, segment: Tensor,
    branch: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    softmax_scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return implementation(backend, "branch_attention_bwd")(
        dout, dlse, q, k, v, out, lse, segment, branch, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale,
    )


def _fake_backward(dout, dlse, q, k, v, out, lse, segment, branch, cu_q, cu_k, max_q, max_k, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_backward_overload = define("branch_attention_backward", _branch_attention_backward, _fake_backward)


def _setup_context(ctx, inputs, output):
    q, k, v, segment, branch, cu_q, cu_k, max_q, max_k, scale, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], segment, branch, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, segment, branch, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale, backend = ctx.args
    dq, dk, dv = _backward_overload(
        dout.contiguous(), dlse, q, k, v, out, lse, segment, branch, cu_q, cu_k, max_q, max_k, scale, backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_overload = define("branch_attention", _branch_attention, _fake, autograd=(_backward, _setup_context))


def branch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment: Tensor,
    branch: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    *,
    check_values: bool = True,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of packed variable-length sequences under the branch mask. Differentiable in q, k, v.

    Shapes (FlashAttention's varlen convention; B sequences packed along the first dimension):
        q:              [total_q, Hq, D]    float16 / bfloat16 / float32 / float64
        k, v:           [total_k, Hkv, D]   q's dtype; Hq % Hkv == 0 (GQA, MQA)
        segment:        int32 [total_k]     section id of every key token, non-decreasing inside a sequence
        branch:         int32 [total_k]     0 for serial tokens, 1..K for branch k of a parallel section
        cu_seqlens_q:   int32 [B + 1]       query offsets; cu_seqlens_k likewise for keys
        max_seqlen_q/k: int                 the longest query / key length (kernels size their grids by it)

    The queries of sequence b are its last ``len_q[b]`` tokens: query i sits at slot ``len_k[b] - len_q[b] + i``
    (bottom-right aligned). Query slot q sees key slot k iff::

        k <= q  and  (segment[k] != segment[q]  or  branch[k] == branch[q])

    e.g. serial prefix P, branches A and B, serial suffix S (rows = queries, 1 = visible)::

            P P A A B B S
        P   1 . . . . . .
        P   1 1 . . . . .
        A   1 1 1 . . . .
        A   1 1 1 1 . . .
        B   1 1 . . 1 . .
        B   1 1 . . 1 1 .
        S   1 1 1 1 1 1 1

    Returns ``out [total_q, Hq, D]`` in q's dtype, and with ``return_lse`` also ``lse float32 [Hq, total_q]``
    (natural log of the softmax denominator, for merging partial results).
    ``check_values=False`` skips the checks that read the device (they are skipped automatically while compiling
    or capturing a CUDA graph). ``backend``: "auto" (default, or ``ASPD_BACKEND``), "cuda", "triton" or "torch".
    """
    key = signature((q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k),
                    (max_seqlen_q, type(max_seqlen_q), max_seqlen_k, type(max_seqlen_k), softmax_scale, backend))
    scale, name = _PLANS.get(key) or _PLANS.put(key, _plan(q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k,
                                                          max_seqlen_q, max_seqlen_k, softmax_scale, backend))
    if chk.values_checkable(check_values):
        _check_values(q, k, segment, branch, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args = (chk.last_dim_contiguous(q), chk.last_dim_contiguous(k), chk.last_dim_contiguous(v), segment.contiguous(),
            branch.contiguous(), cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), max_seqlen_q, max_seqlen_k,
            scale, name)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) or \
            torch.compiler.is_compiling():
        out, lse = _overload(*args)
    else:  # no graph to record: skip the Python trip through the op's Autograd kernel (a third of the call)
        with _below_autograd():
            out, lse = _overload(*args)
    return (out, lse) if return_lse else out


_PLANS = PlanCache()
_below_autograd = torch._C._AutoDispatchBelowAutograd


def _plan(q: Tensor, k: Tensor, v: Tensor, segment: Tensor, branch: Tensor, cu_seqlens_q: Tensor,
          cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float | None,
          backend: str | None) -> tuple[float, str]:
    """The structural checks and the backend choice: ``(softmax scale, backend name)``."""
    chk.tensor("q", q, 3, chk.FLOAT_DTYPES)
    dev = q.device
    chk.tensor("k", k, 3, device=dev)
    chk.tensor("v", v, 3, device=dev)
    chk.same_dtype("k", k, q)
    chk.same_dtype("v", v, q)
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    chk.shape("k", k, (total_k, hkv, d))
    chk.shape("v", v, (total_k, hkv, d))
    chk.heads("q", hq, "k", hkv)
    for name, t in (("segment", segment), ("branch", branch)):
        chk.tensor(name, t, 1, (torch.int32,), dev)
        chk.shape(name, t, (total_k,))
    chk.tensor("cu_seqlens_q", cu_seqlens_q, device=dev)
    chk.tensor("cu_seqlens_k", cu_seqlens_k, device=dev)
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise TypeError(f"{name} must be a non-negative int, got {n!r}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must hold B + 1 entries each, got {cu_seqlens_q.shape[0]} and "
            f"{cu_seqlens_k.shape[0]}"
        )
    # a backend that cannot run this head size is passed over by auto (falling back to torch), refused when forced
    refusals = chk.head_dim_refusals("q", d)
    if q.dtype == torch.float64:  # Triton computes in float32 at most: float64 stays on the torch backend
        refusals.setdefault("triton", "q: backend='triton' runs float16/bfloat16/float32, got torch.float64")
    name = resolve("branch_attention_fwd", dev, backend, refusals=refusals)
    chk.cu_seqlens("cu_seqlens_q", cu_seqlens_q)
    chk.cu_seqlens("cu_seqlens_k", cu_seqlens_k)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    return scale, name


def _check_values(q: Tensor, k: Tensor, segment: Tensor, branch: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                  max_seqlen_q: int, max_seqlen_k: int) -> None:
    """The value rules of one call, read back in one transfer."""
    bad = chk.Violations()
    chk.cu_seqlens_values(bad, "cu_seqlens_q", cu_seqlens_q, q.shape[0])
    chk.cu_seqlens_values(bad, "cu_seqlens_k", cu_seqlens_k, k.shape[0])
    len_q, len_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()

    def more_queries() -> str:
        b = int((len_q > len_k).nonzero()[0, 0])
        return f"cu_seqlens_q: sequence {b} has {int(len_q[b])} queries but only {int(len_k[b])} keys"

    bad.add(len_q > len_k, more_queries)
    bad.add(len_q > max_seqlen_q,
            lambda: f"max_seqlen_q ({max_seqlen_q}) is below the longest query run ({int(len_q.max())})")
    bad.add(len_k > max_seqlen_k,
            lambda: f"max_seqlen_k ({max_seqlen_k}) is below the longest key run ({int(len_k.max())})")
    starts = chk.sequence_starts(cu_seqlens_k, k.shape[0])
    chk.ids(bad, "segment", segment[None], "branch", branch[None], None, starts[None])
    bad.raise_first()
