"""What a compiled Triton kernel costs on its target, read with no GPU, and the four defects CI refuses.

- ``jit_attrs``: the divisibility hints the JIT adds on a GPU (``tt.divisibility = 16`` on 16-byte aligned
  pointers and on integer arguments divisible by 16), so that an ahead-of-time compile is the compile the JIT does
  for aligned tensors and strides, with the same vectorised loads, registers and shared memory.
- ``resources``: shared memory (Triton's metadata), registers and stack frame (``cuobjdump -res-usage`` of the
  cubin, with the cuobjdump that ships in the triton wheel). A stack frame in these kernels means spilled registers.
- ``problems``: a ``tl.dot`` on float32 operands that the compiler runs in TF32 (``inputPrecision = tf32`` in the
  TTIR: ~1e-3 relative error where the float32 contract promises ~1e-6); a stack frame above ``SPILL_BUDGET`` in a
  kernel whose operands are 16-bit; shared memory above the target's per-block limit (the kernel would not launch);
  and, for a spec marked ``overlap``, a loop whose copies do not overlap its compute (``loop_overlap``).
- ``loop_overlap``: per ``scf.for`` of the TTGIR, the async copy groups one iteration commits and the ``num`` of
  the ``ttg.async_wait`` at its top (the groups it lets stay in flight). ``num >= commits`` means the wait leaves
  at least one whole tile's copies in flight while this tile computes; ``num = 0`` means every copy is drained
  first (a load of the iteration that the next tile's addresses depend on, or 2 stages), and a loop with no
  async copy was not pipelined at all. Issue 21: the paged decode and the prefill loops waited with 0.
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


_FOR = re.compile(r"\bscf\.for\b")
_WAIT = re.compile(r"ttg\.async_wait\b.*\{num = (\d+) : i32\}")


def loop_overlap(ttgir: str) -> list[dict]:
    """``[{"line", "commits", "wait"}]`` for every innermost ``scf.for`` of ``ttgir``: the line number of the loop,
    the ``ttg.async_commit_group`` ops in its body and the ``num`` of the first ``ttg.async_wait`` in it (None: no
    wait). Regions are tracked by brace depth (MLIR prints one op per line; attribute braces close on their line)."""
    loops, stack, depth = [], [], 0
    for number, line in enumerate(ttgir.splitlines(), 1):
        if _FOR.search(line) and line.rstrip().endswith("{"):
            stack.append({"line": number, "commits": 0, "wait": None, "depth": depth, "inner": False})
        elif stack:
            top = stack[-1]
            if "ttg.async_commit_group" in line:
                top["commits"] += 1
            match = _WAIT.search(line)
            if match and top["wait"] is None:
                top["wait"] = int(match.group(1))
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1]["depth"]:
            done = stack.pop()
            if stack:
                stack[-1]["inner"] = True
            if not done.pop("inner"):
                done.pop("depth")
                loops.append(done)
    return loops


def overlap_problems(ttgir: str) -> list[str]:
    """Why the loops of ``ttgir`` do not keep a tile in flight (empty when every innermost loop does)."""
    loops = loop_overlap(ttgir)
    if not loops:
        return ["no overlap: the kernel has no loop"]
    found = []
    for loop in loops:
        if loop["commits"] == 0 or loop["wait"] is None:
            found.append(f"no overlap: the loop at TTGIR line {loop['line']} has no async copies (not pipelined: "
                         f"num_stages <= 1, or loads the pipeliner cannot prefetch)")
        elif loop["wait"] < loop["commits"]:
            found.append(f"no overlap: the async wait at the top of the loop at TTGIR line {loop['line']} leaves "
                         f"{loop['wait']} of the {loop['commits']} copy groups an iteration issues in flight (less "
                         f"than one tile: the copies of the next tile wait for this one's compute). Fetch addresses "
                         f"a tile ahead (loop-carried) or raise num_stages")
    return found


def sixteen_bit(signature: dict[str, str]) -> bool:
    """Whether the kernel's floating-point tensors are fp16/bf16 (float32 scratch buffers aside)."""
    return any(v in ("*fp16", "*bf16") for v in signature.values())


def problems(compiled, signature: dict[str, str], capability: int,
             smem_capabilities: tuple[int, ...] | None = None, overlap: bool = False) -> list[str]:
    """The defects of one compile: TF32 on float32 operands, spills over budget (16-bit kernels), shared memory
    over the limit of any of ``smem_capabilities`` (default: the compile target), and with ``overlap`` a loop whose
    async wait leaves less than one tile in flight."""
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
    if overlap:
        found += overlap_problems(compiled.asm["ttgir"])
    return found
