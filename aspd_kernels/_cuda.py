"""The only place the compiled extension ``aspd_kernels._C`` is imported.

Importing ``_C`` registers the CUDA kernels (``csrc/``) as ``torch.ops.aspd.cuda_*``; this module adapts them to
the backend contract of ``_dispatch``. Without the extension (CPU wheels, no nvcc), ``available()`` is False and
``backend="auto"`` falls back to Triton on CUDA tensors. With ``ASPD_JIT=1`` a missing extension is built from
``csrc/`` on first import (``_jit.load_extension``, ninja).

Kernels: the decoding attention runs on tensor cores for fp16/bf16 with head size 64 or 128 and on a generic
warp-per-row kernel otherwise (float32, float64, head sizes up to 256); prefill attention stays in Triton.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sysconfig

import torch
from torch import Tensor

from .reference import STRATEGIES


def _not_built_reason() -> str:
    """Why ``aspd_kernels._C`` cannot be imported, in words a user can act on. (Python's own message for a missing
    submodule imported during the package's ``__init__`` -- "partially initialized module ... circular import" --
    names a cause that is not the one.)"""
    here = os.path.dirname(os.path.abspath(__file__))
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    others = sorted(os.path.basename(p) for p in glob.glob(os.path.join(here, "_C*.so")))
    if others:
        return (f"the CUDA extension aspd_kernels._C was built for another Python or platform ({', '.join(others)}; "
                f"this interpreter loads _C{suffix}): rebuild it with pip install --no-build-isolation -e .")
    if torch.version.cuda is None:
        return (f"the CUDA extension aspd_kernels._C is not built: torch {torch.__version__} is a CPU build, so the "
                f"install skipped it (the Triton and torch backends remain)")
    return ("the CUDA extension aspd_kernels._C is not built: install with pip install --no-build-isolation -e . "
            "where nvcc is on PATH, or set ASPD_JIT=1 to build it on first import")


_error: str | None = None
if importlib.util.find_spec(f"{__package__}._C") is None:  # the extension is optional
    _error = _not_built_reason()
else:
    try:
        from . import _C  # noqa: F401  (registers the ops; the only import of _C in the package)
    except ImportError as exc:  # built, but does not load (a torch/CUDA mismatch, a missing library)
        _error = f"the CUDA extension aspd_kernels._C does not load: {exc}"
if _error is not None:
    if os.environ.get("ASPD_JIT") == "1" and torch.cuda.is_available():
        try:
            from ._jit import load_extension

            load_extension()
            _error = None
        except Exception as jit_exc:  # a failed JIT build leaves the other backends usable
            _error = f"JIT build failed: {jit_exc}"


def available() -> bool:
    return _error is None and torch.cuda.is_available() and hasattr(torch.ops.aspd, "cuda_decode_attention")


def load_error() -> str | None:
    """Why the extension is missing (None when it loaded)."""
    return _error


def decode_on_tensor_cores(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether ``cuda_decode_attention`` would run its tensor-core kernel for these inputs (csrc's
    ``decode_uses_mma``): fp16/bf16, head size 64 or 128, and k/v rows that allow 16-byte copies (base pointer and
    every outer stride; q is copied when it does not). Anything else runs the generic warp-per-row kernel, which
    re-reads the cache for every query row and has no split-KV: correct, and slow."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        return False
    if torch.compiler.is_compiling():  # traced tensors have no address: assume the usual aligned cache
        return True
    for t in (k_cache, v_cache):
        elems = 16 // t.element_size()
        if t.data_ptr() % 16 or any(st % elems for st in t.stride()[:-1]):
            return False
    return True


def branch_attention_with_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    q_seqlens: Tensor, block_table: Tensor | None, softmax_scale: float, num_splits: int = 0,
) -> Tensor:
    """``out [B, Lq, Hq, D]`` (q's dtype). ``num_splits`` 0 lets the host heuristic choose the KV split count
    (from shapes and the SM count only, so the op can be captured in a CUDA graph); > 0 forces it."""
    return torch.ops.aspd.cuda_decode_attention(
        q, k_cache, v_cache, cache_seqlens, segment, branch, q_seqlens, block_table, float(softmax_scale), num_splits
    )


def rope_append_kv(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin_cache: Tensor, k_cache: Tensor, v_cache: Tensor,
    segment_cache: Tensor, branch_cache: Tensor, cache_seqlens: Tensor, segment: Tensor, branch: Tensor,
    q_seqlens: Tensor, block_table: Tensor | None,
) -> Tensor:
    """Rotated q ``[B, L, Hq, D]``; writes rotated k, v, segment, branch into the caches (one launch)."""
    return torch.ops.aspd.cuda_rope_append_kv(
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, segment_cache, branch_cache, cache_seqlens, segment,
        branch, q_seqlens, block_table,
    )


def remap_positions(segment: Tensor, branch: Tensor, cu_seqlens: Tensor, strategy: str, width: int | None) -> Tensor:
    """int32 ``[N]`` positions (SPEC section 3); one warp per sequence, one launch."""
    return torch.ops.aspd.cuda_remap_positions(segment, branch, cu_seqlens, STRATEGIES.index(strategy), width or 0)
