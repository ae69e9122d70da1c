"""Host overhead of each public op: the Python and dispatcher cost of one call with the kernel replaced by a no-op,
beside the floor of a bare ``torch.library.custom_op`` of the same arity, on the same tiny CPU tensors.

Two measures of the same calls: wall time (minimum over batches of the per-call mean: the least disturbed batch on a
shared machine) and instructions counted by valgrind's callgrind (stable where wall time is not). For the second the
same cases run again in a child process under ``valgrind --tool=callgrind --collect-atstart=no``; a tiny C helper
built with gcc from ``valgrind/callgrind.h`` switches collection on around each case's loop and dumps a file per case.
"""
from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable

import torch
from torch import Tensor

from aspd_kernels import _dispatch, branch_attention, branch_attention_with_kvcache, remap_positions, rope_append_kv

LOOPS = 200  # calls per timed batch and per callgrind case

# ---------------------------------------------------------------------------------------------- no-op kernels


def _noop_backend() -> types.SimpleNamespace:
    """A backend whose functions only allocate their outputs: what remains of a call is the host path."""
    return types.SimpleNamespace(
        branch_attention_fwd=lambda q, k, v, *a: (q.new_empty(q.shape[:-1] + (v.shape[-1],)),
                                                  q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)),
        branch_attention_with_kvcache=lambda q, k_cache, v_cache, *a: q.new_empty(q.shape[:-1] + (v_cache.shape[-1],)),
        remap_positions=lambda segment, *a: torch.empty_like(segment),
        rope_append_kv=lambda q, *a: torch.empty_like(q),
    )


_FLOORS: dict[int, Callable] = {}


def floor_op(arity: int) -> Callable:
    """A bare ``custom_op`` taking ``arity - 1`` tensors and a str (as ours take their backend name) that returns
    an empty tensor: the least a registered op costs per call."""
    if arity not in _FLOORS:
        names = [f"t{i}" for i in range(arity - 1)]
        src = (f"def floor{arity}({', '.join(n + ': Tensor' for n in names)}, s: str) -> Tensor:\n"
               f"    return t0.new_empty(0)\n")
        scope: dict = {"Tensor": Tensor}
        exec(src, scope)  # noqa: S102 - custom_op reads the annotations of a real signature
        fn = torch.library.custom_op(f"aspd_bench::floor{arity}", mutates_args=())(scope[f"floor{arity}"])
        fn.register_fake(lambda t0, *rest: t0.new_empty(0))
        _FLOORS[arity] = fn
    return _FLOORS[arity]


_LEAN_LIB = torch.library.Library("aspd_bench_lean", "DEF")
_LEAN: dict[int, Callable] = {}


def lean_floor_op(arity: int) -> Callable:
    """The same op defined on a ``torch.library.Library`` with its function as the CompositeExplicitAutograd
    kernel, the registration the aspd ops use: the least any Python-implemented op costs per call."""
    if arity not in _LEAN:
        params = ", ".join(f"Tensor t{i}" for i in range(arity - 1))
        _LEAN_LIB.define(f"floor{arity}({params}, str s) -> Tensor")
        _LEAN_LIB.impl(f"floor{arity}", lambda t0, *rest: t0.new_empty(0), "CompositeExplicitAutograd")
        _LEAN[arity] = getattr(torch.ops.aspd_bench_lean, f"floor{arity}").default
    return _LEAN[arity]


def cases() -> list[tuple[str, int, Callable[[], object]]]:
    """(name, arity of the registered op, call) for every public op with checks off and on, and the floors.
    Tiny shapes: 16 tokens, 2 heads, D 16 (the kernels are no-ops anyway)."""
    n, h, d, cap = 16, 2, 16, 32
    q, k, v = (torch.randn(n, h, d) for _ in range(3))
    ids = torch.zeros(n, dtype=torch.int32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    q4 = torch.randn(1, 4, h, d)
    kc, vc = torch.zeros(1, cap, h, d), torch.zeros(1, cap, h, d)
    seg_c, br_c = torch.zeros(1, cap, dtype=torch.int32), torch.zeros(1, cap, dtype=torch.int32)
    lens, qlens = torch.tensor([8], dtype=torch.int32), torch.tensor([4], dtype=torch.int32)
    pos = torch.arange(4, dtype=torch.int32)[None]
    cos_sin = torch.randn(64, d)
    new_ids = torch.zeros(1, 4, dtype=torch.int32)
    out: list[tuple[str, int, Callable[[], object]]] = []
    for check in (False, True):
        tag = f"check_values={check}"
        out += [
            (f"branch_attention {tag}", 11,
             lambda c=check: branch_attention(q, k, v, ids, ids, cu, cu, n, n, check_values=c)),
            (f"branch_attention_with_kvcache {tag}", 10,
             lambda c=check: branch_attention_with_kvcache(q4, kc, vc, lens, seg_c, br_c, None, qlens,
                                                           check_values=c)),
            (f"remap_positions {tag}", 6, lambda c=check: remap_positions(ids, ids, check_values=c)),
            (f"rope_append_kv {tag}", 15,
             lambda c=check: rope_append_kv(q4, q4, q4, pos, cos_sin, kc, vc, seg_c, br_c, lens, new_ids, new_ids,
                                            qlens, check_values=c)),
        ]
    for arity in (6, 10, 11, 15):
        args = [q] * (arity - 1) + ["torch"]
        out.append((f"floor: bare custom_op, {arity} arguments", arity, lambda f=floor_op(arity), a=args: f(*a)))
        out.append((f"lean floor: Library op, {arity} arguments", arity,
                    lambda f=lean_floor_op(arity), a=args: f(*a)))
    return out


class noop_kernels:
    """Context: the torch backend's functions replaced by :func:`_noop_backend` (restored on exit)."""

    def __enter__(self) -> None:
        _dispatch._load("torch")
        self.saved = _dispatch._loaded["torch"]
        _dispatch._loaded["torch"] = _noop_backend()

    def __exit__(self, *exc) -> None:
        _dispatch._loaded["torch"] = self.saved


def wall_us(fn: Callable[[], object], batches: int = 15) -> float:
    """Minimum over ``batches`` of the mean time of ``LOOPS`` calls, in microseconds."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(LOOPS):
            fn()
        best = min(best, (time.perf_counter() - t) / LOOPS)
    return best * 1e6


# ---------------------------------------------------------------------------------------------- callgrind

_HELPER_C = r"""
#include <valgrind/callgrind.h>
void cg_on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_TOGGLE_COLLECT; }
void cg_off(const char *name) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS_AT(name); }
"""


def callgrind_missing() -> str | None:
    if shutil.which("valgrind") is None:
        return "valgrind not installed (apt-get install valgrind)"
    if shutil.which("gcc") is None or not os.path.exists("/usr/include/valgrind/callgrind.h"):
        return "gcc or valgrind/callgrind.h missing"
    return None


def _helper(folder: str) -> ctypes.CDLL:
    src, lib = os.path.join(folder, "cg.c"), os.path.join(folder, "libcg.so")
    with open(src, "w") as f:
        f.write(_HELPER_C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", lib, src], check=True)
    return ctypes.CDLL(lib)


def callgrind_child(folder: str) -> None:
    """Runs under callgrind: each case's loop with collection on, one dump per case (named by its index)."""
    lib = _helper(folder)
    with noop_kernels():
        for i, (_, _, fn) in enumerate(cases()):
            for _ in range(20):
                fn()
            lib.cg_on()
            for _ in range(LOOPS):
                fn()
            lib.cg_off(f"case{i}".encode())


def callgrind_counts(timeout_s: float = 1800) -> dict[str, float] | str:
    """Instructions per call of every case (by name), or the reason they could not be counted."""
    missing = callgrind_missing()
    if missing:
        return missing
    names = [name for name, _, _ in cases()]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "callgrind.out")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, "-c", f"from bench.host_ops import callgrind_child; callgrind_child({folder!r})"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if run.returncode != 0:
            return f"callgrind run failed: {run.stderr[-300:]}"
        counts = {}
        for path in glob.glob(out + "*"):
            text = open(path).read()
            trigger = [ln for ln in text.splitlines() if ln.startswith("desc: Trigger:")]
            total = [ln for ln in text.splitlines() if ln.startswith("totals:") or ln.startswith("summary:")]
            if not trigger or not total or "case" not in trigger[0]:
                continue
            i = int(trigger[0].rsplit("case", 1)[1].strip())
            counts[names[i]] = int(total[0].split()[1]) / LOOPS
        return counts


def measure(with_callgrind: bool = True) -> list[dict]:
    """One dict per case: name, arity, wall_us, instr (None where not counted), floor name."""
    with noop_kernels():
        rows = [dict(name=name, arity=arity, wall_us=wall_us(fn)) for name, arity, fn in cases()]
    counts = callgrind_counts() if with_callgrind else "not requested"
    for r in rows:
        r["instr"] = counts.get(r["name"]) if isinstance(counts, dict) else None
        r["floor"] = f"floor: bare custom_op, {r['arity']} arguments"
    return rows + ([] if isinstance(counts, dict) else [dict(name="callgrind", reason=counts)])
