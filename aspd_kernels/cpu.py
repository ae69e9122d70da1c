"""Which dtype a CPU decodes fastest in.

On a CPU with native bfloat16 dot products (AVX512-BF16 or AMX-BF16), oneDNN's bfloat16 matmuls cost about the same
for 1 to 8 rows: a decode step is bound by reading the weights, half as many bytes as float32. In float32 a 2-row
matmul already costs twice a 1-row one on one thread (the 1-row case takes a GEMV path), which is exactly the cost a
parallel section's extra rows add. Elsewhere bfloat16 is emulated and slower, so float32 stays the default there.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def native_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (Linux: ``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(name: str) -> torch.dtype:
    """``"auto"`` -> bfloat16 where :func:`native_bf16`, else float32; ``"float32"``/``"bfloat16"`` as named."""
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    return getattr(torch, name)
