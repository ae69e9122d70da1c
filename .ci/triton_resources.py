"""What a compiled Triton kernel costs on its target, read with no GPU, and the three defects CI refuses.

- ``jit_attrs``: the divisibility hints the JIT adds on a GPU (``tt.divisibility = 16`` on 16-byte aligned
  pointers and on integer arguments divisible by 16), so that an ahead-of-time compile is the compile the JIT does
  for aligned tensors and strides, with the same vectorised loads, registers and shared memory.
- ``resources``: shared memory (Triton's metadata), registers and stack frame (``cuobjdump -res-usage`` of the
  cubin, with the cuobjdump that ships in the triton wheel). A stack frame in these kernels means spilled registers.
- ``problems``: a ``tl.dot`` on float32 operands that the compiler runs in TF32 (``inputPrecision = tf32`` in the
  TTIR: ~1e-3 relative error where the float32 contract promises ~1e-6); a stack frame above ``SPILL_BUDGET`` in a
  kernel whose operands are 16-bit; shared memory above the target's per-block limit (the kernel would not launch).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

# opt-in shared memory per block, bytes (CUDA programming guide, compute capabilities table)
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Stack bytes allowed in a kernel whose operands are fp16/bf16: none. Every fp16/bf16 tile config was chosen not
# to spill; float32 kernels (a correctness path, twice the registers per element) are reported, not refused.
SPILL_BUDGET = 0

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_TF32_DOT = re.compile(r"tt\.dot .*inputPrecision = tf32\b(?!x3).*:\s*tensor<[^>]*xf32>\s*\*\s*tensor<[^>]*xf32>")


def jit_attrs(arg_names: list[str], signature: dict[str, str], aligned: set[str] | None = None) -> dict:
    """``{(index,): [["tt.divisibility", 16]]}`` for every pointer argument and every integer argument named in
    ``aligned`` (default: the ``stride_*`` arguments, multiples of 16 for contiguous tensors with D >= 16)."""
    attrs = {}
    for i, name in enumerate(arg_names):
        kind = signature.get(name, "")
        if kind.startswith("*") or (kind.startswith("i") and (name in aligned if aligned is not None
                                                                 else name.startswith("stride"))):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def resources(compiled) -> dict:
    """``{"shared": bytes, "regs": int, "stack": bytes}`` of a compiled kernel (regs/stack -1 if unreadable)."""
    out = {"shared": int(compiled.metadata.shared), "regs": -1, "stack": -1}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if m:
        out["regs"], out["stack"] = int(m.group(1)), int(m.group(2))
    return out


def sixteen_bit(signature: dict[str, str]) -> bool:
    """Whether the kernel's floating-point tensors are fp16/bf16 (float32 scratch buffers aside)."""
    return any(v in ("*fp16", "*bf16") for v in signature.values())


def problems(compiled, signature: dict[str, str], capability: int,
             smem_capabilities: tuple[int, ...] | None = None) -> list[str]:
    """The defects of one compile: TF32 on float32 operands, spills over budget (16-bit kernels), shared memory
    over the limit of any of ``smem_capabilities`` (default: the compile target)."""
    found = []
    tf32 = [line.strip() for line in compiled.asm["ttir"].splitlines() if _TF32_DOT.search(line)]
    if tf32:
        found.append(f"tl.dot on float32 operands runs in TF32 ({len(tf32)} dot(s)); pass input_precision='ieee' "
                     f"(or 'tf32x3'): {tf32[0][:160]}")
    res = resources(compiled)
    if sixteen_bit(signature) and res["stack"] > SPILL_BUDGET:
        found.append(f"spills: {res['stack']} bytes of stack frame ({res['regs']} registers) in a fp16/bf16 kernel; "
                     f"budget {SPILL_BUDGET}")
    for cap in smem_capabilities or (capability,):
        limit = SMEM_LIMIT.get(cap)
        if limit is not None and res["shared"] > limit:
            found.append(f"shared memory {res['shared']} B > sm_{cap}'s limit {limit} B: the launch would fail there")
    return found
