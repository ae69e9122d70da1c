"""The only place the compiled extension ``aspd_kernels._C`` is imported.

Importing ``_C`` registers the CUDA kernels (``csrc/``) as ``torch.ops.aspd.cuda_*``; this module adapts them to
the backend contract of ``_dispatch``. Without the extension (CPU wheels, no nvcc), ``available()`` is False and
``backend="auto"`` falls back to Triton on CUDA tensors.
"""
from __future__ import annotations

import os

import torch

_error: str | None = None
try:
    from . import _C  # noqa: F401  (registers the ops)
except ImportError as exc:  # the extension is optional
    _error = str(exc)
    if os.environ.get("ASPD_JIT") == "1" and torch.cuda.is_available():
        from ._jit import load_extension

        load_extension()
        _error = None


def available() -> bool:
    return _error is None and torch.cuda.is_available() and hasattr(torch.ops.aspd, "cuda_decode_attention")


def load_error() -> str | None:
    """Why the extension is missing (None when it loaded)."""
    return _error
