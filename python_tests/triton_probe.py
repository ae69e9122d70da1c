"""Can this triton's interpreter run our kernels? (No tests here.)

triton 3.6's interpreter (the version the GPU image pairs with torch 2.11), with numpy >= 2.4, holds a program's
scalars as 1-element arrays and fails on ``for i in range(start, end)`` when the bounds are tensors -- which every
kernel here with a data-dependent loop has. Compiled kernels are not affected. Rather than trust a version number,
run a loop of that form once and see.
"""
from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def interpreter_problem() -> str | None:
    """None when the interpreter runs a tensor-bounded loop correctly, else why not (only meaningful when
    ``interpreting()``)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        return f"triton is not importable: {exc}"

    @triton.jit
    def _loop(X, OUT, N):
        start = tl.program_id(0) * 0
        end = tl.load(N)
        acc = tl.zeros([4], tl.float32)
        for i in range(start, end):
            acc += tl.load(X + i * 4 + tl.arange(0, 4))
        tl.store(OUT + tl.arange(0, 4), acc)

    x = torch.arange(12, dtype=torch.float32)
    out = torch.full((4,), float("nan"))
    try:
        _loop[(1,)](x, out, torch.tensor([3], dtype=torch.int32))
    except Exception as exc:  # noqa: BLE001 - any failure means the kernels cannot run here
        return f"triton {triton.__version__}'s interpreter cannot run a loop with tensor bounds ({type(exc).__name__})"
    if not torch.equal(out, x.view(3, 4).sum(0)):
        return f"triton {triton.__version__}'s interpreter computes a tensor-bounded loop wrongly"
    return None
