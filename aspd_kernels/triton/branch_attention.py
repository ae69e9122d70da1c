"""Triton ``branch_attention``: packed varlen attention under the branch mask, forward and backward.

FlashAttention-2 (Dao, 2023) with the mask of SPEC section 2 evaluated in registers from ``segment``/``branch``:

    visible(q, k) = k <= q and (segment[k] != segment[q] or branch[k] == branch[q])

Forward (``branch_attention_forward.py``): one program per (query tile, sequence, query head), online softmax in
base 2. Backward (``branch_attention_backward.py``): a preprocess kernel for ``delta``, then one kernel for dK/dV
(per key tile and KV head, over its GQA group) and one for dQ (per query tile and query head), no atomics.
This module holds the launchers (the backend contract); the tile tables are ``tile_configs.py``, the AOT compile
specs ``aot_specs.py``.

Block skipping (``tile_ranges.py``): per-tile id ranges (segment and branch min/max) classify each (query tile,
key tile) pair as skip, full (every pair visible) or masked. Two tiny kernels run once per call and layout: one
writes the id ranges of every tile, one turns them into per-tile lists -- for each tile a compute program owns, the
full tiles of the other side, then the masked ones; skipped tiles are not listed. The compute kernels loop over the
two lists: skipped tiles cost nothing (K/V never read), full tiles run without the per-element mask, and no loop
carries a data-dependent branch, so the loads stay pipelinable.

A tile never straddles two packed sequences; slots (storage indices) are relative to the sequence.
Under ``TRITON_INTERPRET=1`` (CPU) operands are cast to float32 after loading: the interpreter mishandles half
precision arithmetic; on a GPU fp16/bf16 operands feed the tensor cores and accumulate in float32.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton

from .branch_attention_backward import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .branch_attention_forward import fwd_kernel
from .tile_configs import Config, block_d, capability, dot_precision
from .tile_configs import bwd_configs as gpu_bwd_configs
from .tile_configs import fwd_config as gpu_fwd_config
from .tile_ranges import tile_lists


_INTERPRET_CONFIG = Config(64, 64, 4, 1)  # the interpreter pays per operation, not per element: few, large tiles


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fwd_config(q: torch.Tensor) -> Config:
    """The forward tiles for ``q``'s head size, dtype and GPU (``tile_configs``)."""
    return _INTERPRET_CONFIG if _interpreting() else gpu_fwd_config(q.shape[-1], q.dtype, capability(q.device))


def bwd_configs(q: torch.Tensor) -> tuple[Config, Config]:
    if _interpreting():
        return (_INTERPRET_CONFIG,) * 2
    return gpu_bwd_configs(q.shape[-1], q.dtype, capability(q.device))


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: the triton backend of branch_attention runs float16/bfloat16/float32, got {q.dtype}")


def _common(q: torch.Tensor) -> dict:
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D=block_d(q.shape[-1]), UPCAST=_interpreting(),
                DOT_PRECISION=dot_precision(q.dtype))


def preprocess_rows(width: int) -> int:
    """Rows per preprocess program at padded head width ``width``: 8192 elements per operand tile, 64 per thread at
    4 warps (no spills)."""
    return max(16, 8192 // width)


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def branch_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment: torch.Tensor,
                         branch: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, *,
                         out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                         config: Config | None = None, stats: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend contract (``_dispatch``). ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` (last dim contiguous),
    ``segment, branch int32 [total_k]``, ``cu_seqlens_* int32 [B+1]``. Returns ``out [total_q, Hq, D]`` (q.dtype)
    and ``lse float32 [Hq, total_q]`` (natural log; -inf for a row that sees no key).

    ``out``/``lse``: optional preallocated outputs (contiguous, as returned). ``config`` overrides the tile table;
    ``stats`` (int32 [3], zeroed by the caller) counts the (query tile, key tile, head) triples up to the causal
    limit that the kernel skipped / ran masked / ran unmasked -- both for tests and inspection only.
    """
    _check_dtype(q)
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((hq, total_q), dtype=torch.float32, device=q.device) if lse is None else lse
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch == 0:
        return out, lse
    cfg = config or fwd_config(q)
    with _device_guard(q):
        lists, counts = tile_lists(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q,
                                   max_seqlen_k, cfg.block_m, cfg.block_n, key_major=False)
        fwd_kernel[(lists.shape[1], batch, hq)](
            q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k, lists, counts, out, lse,
            stats if stats is not None else counts,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), lse.stride(0), total_q, total_k, max_seqlen_q, max_seqlen_k, lists.shape[1],
            lists.shape[2], softmax_scale * 1.4426950408889634,  # base-2 logits: exp(x) = exp2(x * log2(e))
            GROUP=hq // hkv, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, COUNT=stats is not None, **_common(q),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, lse


def branch_attention_bwd(dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, segment: torch.Tensor,
                         branch: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, *,
                         dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                         dv: torch.Tensor | None = None, config: Config | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend contract (``_dispatch``): ``(dq, dk, dv)`` shaped and typed as ``(q, k, v)``. ``dout`` as ``out``;
    ``dlse [Hq, total_q]`` float32 or None (gradient of the returned lse); ``lse`` from the forward.
    ``dq``/``dk``/``dv``: optional preallocated outputs (contiguous); every row of every sequence is written."""
    _check_dtype(q)
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    batch = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or batch == 0:  # no query: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    kv_cfg, q_cfg = (config, config) if config is not None else bwd_configs(q)
    lse = lse.float().contiguous()
    common = _common(q)
    with _device_guard(q):
        delta = torch.empty_like(lse)
        block_t = preprocess_rows(common["BLOCK_D"])
        bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), hq)](
            out, dout, dlse.float().contiguous() if dlse is not None else lse, delta, out.stride(0), out.stride(1),
            dout.stride(0), dout.stride(1), lse.stride(0), total_q,
            HEAD_DIM=d, BLOCK_D=common["BLOCK_D"], BLOCK_T=block_t, HAS_DLSE=dlse is not None,
        )
        sizes = (total_q, total_k, max_seqlen_q, max_seqlen_k)
        lists, counts = tile_lists(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q,
                                   max_seqlen_k, kv_cfg.block_m, kv_cfg.block_n, key_major=True)
        bwd_dkdv_kernel[(lists.shape[1], batch, hkv)](
            q, k, v, dout, lse, delta, segment, branch, cu_seqlens_q, cu_seqlens_k, lists, counts, dk, dv,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            *sizes, lists.shape[1], lists.shape[2], softmax_scale,
            GROUP=hq // hkv, BLOCK_M=kv_cfg.block_m, BLOCK_N=kv_cfg.block_n, **common,
            num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        )
        lists, counts = tile_lists(segment, branch, cu_seqlens_q, cu_seqlens_k, total_q, max_seqlen_q,
                                   max_seqlen_k, q_cfg.block_m, q_cfg.block_n, key_major=False)
        bwd_dq_kernel[(lists.shape[1], batch, hq)](
            q, k, v, dout, lse, delta, segment, branch, cu_seqlens_q, cu_seqlens_k, lists, counts, dq,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            *sizes, lists.shape[1], lists.shape[2], softmax_scale,
            GROUP=hq // hkv, BLOCK_M=q_cfg.block_m, BLOCK_N=q_cfg.block_n, **common,
            num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        )
    return dq, dk, dv
