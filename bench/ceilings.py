"""The two hardware ceilings every row is compared with, measured in the same run as the rows.

- copy bandwidth: a large device-to-device ``copy_``; bytes = read + written = 2 x buffer size.
- matmul rate: a square matrix product on random data (never zeros: they run faster); FLOP = 2 n^3.

On a GPU: a 1 GiB bf16 buffer and n = 8192 in bf16 (the dtype of the benchmarks). On the CPU: 64 MiB and n = 1024
in float32 (CPU numbers are for checking the harness, not the point).
"""
from __future__ import annotations

import torch

from .timing import measure


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """``{"copy_gbps", "matmul_tflops", "copy_bytes", "matmul_n", "dtype"}`` for ``device``."""
    cuda = device.type == "cuda"
    copy_bytes = (1 << 30) if cuda else (64 << 20)
    n = 8192 if cuda else 1024
    mm_dtype = dtype if cuda else torch.float32
    elt = torch.finfo(mm_dtype).bits // 8
    src = torch.randn(copy_bytes // elt, dtype=mm_dtype, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, budget_s=1.0, min_reps=10, flush=False)
    del src, dst
    a = torch.randn(n, n, dtype=mm_dtype, device=device)
    b = torch.randn(n, n, dtype=mm_dtype, device=device)
    mm = measure(lambda: torch.mm(a, b), device, budget_s=1.0, min_reps=10, flush=False)
    del a, b
    return {
        "copy_gbps": 2 * copy_bytes / (copy.ms * 1e-3) / 1e9,
        "matmul_tflops": 2 * n ** 3 / (mm.ms * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "matmul_n": n,
        "dtype": str(mm_dtype).replace("torch.", ""),
        "copy_ms": copy.ms,
        "matmul_ms": mm.ms,
    }
