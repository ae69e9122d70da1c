"""Four deliberately broken kernels and one clean one: ``aot_compile_triton.py --self-test`` compiles them and
requires each of the four checks of ``triton_resources.problems`` to fire on its kernel, and none on the clean
one (which is also held to the overlap check) -- so a check that silently stopped working fails CI instead of
passing every real kernel.

Specs use the format of the package's ``AOT_SPECS``, plus ``expect``: the substring of the problem each must raise
(None: no problem allowed).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot_kernel(A, B, C, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """C[BM, BN] = A[BM, K] @ B[K, BN], row-major, one program."""
    m, n, kk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(A + m[:, None] * K + (k0 + kk)[None, :])
        b = tl.load(B + (k0 + kk)[:, None] * BN + n[None, :])
        acc += tl.dot(a, b, input_precision=PRECISION)
    tl.store(C + m[:, None] * BN + n[None, :], acc)


@triton.jit
def _register_hog_kernel(X, Y, ROUNDS: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
    """A [R, C] float32 tile kept live across a loop: with one warp it cannot fit in registers."""
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    x = tl.load(X + offs).to(tl.float32)
    y = x
    for _ in tl.static_range(ROUNDS):
        y = y * x + tl.sum(y, 1)[:, None]
    tl.store(Y + offs, y.to(tl.float16))


@triton.jit
def _gathered_dot_kernel(A, B, IDX, C, n, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C = sum over i < n of A[BM, BK] @ B[tile IDX[i]]: the pattern issue 21 found in the paged decode and the
    prefill, a tile index loaded in the iteration that uses it, so the wait at the loop top drains every copy."""
    m, nn, kk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    a = tl.load(A + m[:, None] * BK + kk[None, :])
    acc = tl.zeros([BM, BN], tl.float32)
    for i in range(0, n):
        t = tl.load(IDX + i)
        b = tl.load(B + (t * BK + kk)[:, None] * BN + nn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + m[:, None] * BN + nn[None, :], acc)


def specs() -> list[dict]:
    dot_sig = {"A": "*fp32", "B": "*fp32", "C": "*fp32", "K": "i32"}
    half_sig = {"A": "*fp16", "B": "*fp16", "C": "*fp32", "K": "i32"}
    return [
        dict(name="selftest_clean_fp16_dot", fn=_dot_kernel, signature=half_sig,
             constexprs=dict(BM=64, BN=64, BK=32, PRECISION="tf32"), overlap=True, expect=None),
        dict(name="selftest_tf32_on_fp32", fn=_dot_kernel, signature=dot_sig,
             constexprs=dict(BM=64, BN=64, BK=32, PRECISION="tf32"), expect="TF32"),
        dict(name="selftest_spills", fn=_register_hog_kernel, signature={"X": "*fp16", "Y": "*fp16"},
             constexprs=dict(ROUNDS=4, R=128, C=128), num_warps=1, expect="spills"),
        dict(name="selftest_shared_memory", fn=_dot_kernel, signature=half_sig,
             constexprs=dict(BM=256, BN=256, BK=128, PRECISION="tf32"), num_warps=8, num_stages=4,
             expect="shared memory"),
        dict(name="selftest_no_overlap", fn=_gathered_dot_kernel,
             signature={"A": "*fp16", "B": "*fp16", "IDX": "*i32", "C": "*fp32", "n": "i32"},
             constexprs=dict(BM=64, BN=64, BK=64), num_stages=3, overlap=True, expect="no overlap"),
    ]
