"""The one place that chooses a backend.

Every public op resolves ``backend`` here *before* it calls its ``torch.ops.aspd`` custom op, so the choice reaches
the op as a plain string (a constant under ``torch.compile``) and each backend module only ever sees inputs that the
op's boundary checks have already accepted.

Backend contract. A backend is a module that exposes a subset of these functions; the custom ops call them with
validated, last-dim-contiguous tensors, every optional tensor materialised and the softmax scale resolved:

- ``branch_attention_fwd(q, k, v, segment, branch, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  softmax_scale) -> (out [total_q, Hq, D] q.dtype, lse [Hq, total_q] float32)``
- ``branch_attention_bwd(dout, dlse, q, k, v, out, lse, segment, branch, cu_seqlens_q, cu_seqlens_k,
  max_seqlen_q, max_seqlen_k, softmax_scale) -> (dq, dk, dv)``; ``dlse`` may be None.
- ``branch_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table,
  softmax_scale) -> out [B, Lq, Hq, D]``; ``block_table`` is None for a contiguous cache.
- ``remap_positions(segment, branch, cu_seqlens, strategy, width) -> int32 [N]``; ``strategy`` is one of
  ``reference.STRATEGIES``, ``width`` an int or None.
- ``rope_append_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache,
  cache_seqlens, segment, branch, q_seqlens, block_table) -> q_rot``; writes the caches in place.

The three backends: ``torch`` (``aspd_kernels.torch_backend``, any device), ``triton`` (``aspd_kernels.triton``,
CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``cuda`` (the compiled extension, ``csrc/``).
Backends never import each other.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "aspd_kernels.torch_backend", "triton": "aspd_kernels.triton", "cuda": "aspd_kernels._cuda"}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_loaded: dict[str, ModuleType | None] = {}


def _load(name: str) -> ModuleType | None:
    # a plain dict, not functools.cache: torch.compile traces a hit as a dict lookup, while it refuses to trace
    # into a cached function's body (importlib), which broke fullgraph=True on torch 2.11
    if name in _loaded:
        return _loaded[name]
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        module = None
    if module is not None and name == "cuda" and not module.available():
        module = None
    _loaded[name] = module
    return module


def has_backend(name: str, op: str) -> bool:
    module = _load(name)
    return module is not None and hasattr(module, op)


def resolve(op: str, device: torch.device, backend: str | None = None, avoid: frozenset[str] = frozenset(),
            refusals: Mapping[str, str] | None = None) -> str:
    """Name of the backend that runs ``op`` on tensors of ``device``.

    ``backend`` (argument) wins over ``ASPD_BACKEND`` (environment), which wins over ``"auto"``. ``auto`` picks
    cuda, then triton, for CUDA tensors and torch for CPU tensors, passing over the backends in ``avoid`` (the
    caller's knowledge that, for these inputs, a backend would only run a slow fallback) while another can run.
    ``refusals`` maps each backend that cannot run these inputs at all (a head size outside its range, see
    ``_checks.head_dim_refusals``) to a message naming the argument: ``auto`` never picks one and falls back to the
    next (torch last, on any device); a forced one raises ``ValueError`` with that message.
    Raises ``ValueError`` when a forced backend cannot run here, rather than falling back silently; ``avoid``
    never overrides a forced backend.
    """
    refusals = refusals or {}
    requested = backend or os.environ.get("ASPD_BACKEND") or "auto"
    if requested == "auto":
        if device.type == "cuda":
            usable = [name for name in ("cuda", "triton") if has_backend(name, op) and name not in refusals]
            if usable:
                return next((name for name in usable if name not in avoid), usable[0])
        if "torch" in refusals:  # not even the fallback runs these inputs
            raise ValueError(refusals["torch"])
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {requested!r}")
    if requested == "triton" and device.type != "cuda" and not triton_interpret():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run it on the CPU"
        )
    if requested == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device.type}")
    if not has_backend(requested, op):
        if requested == "cuda" and _load("cuda") is None:
            why = "the CUDA extension aspd_kernels._C is not built"
        elif requested == "cuda":
            why = "the CUDA extension has no kernel for it"
        else:
            why = "it is not importable"
        raise ValueError(f"backend={requested!r} cannot run {op}: {why}")
    if requested in refusals:
        raise ValueError(refusals[requested])
    return requested


def implementation(backend: str, op: str):
    """The function ``op`` of an already resolved backend."""
    return getattr(_load(backend), op)
