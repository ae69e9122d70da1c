#!/usr/bin/env python3
"""Compile every Triton kernel of ``aspd_kernels.triton`` ahead of time for real GPUs (sm_90 and sm_80), with no GPU.

Each module of the package lists its kernels in ``AOT_SPECS``:
``[{"name": str, "fn": jitted kernel, "signature": {arg: "*fp16" | "*bf16" | "*i32" | "i32" | "fp32" ...},
"constexprs": {arg: value}, "num_warps": int (optional), "num_stages": int (optional)}]``.
The interpreter cannot tell whether a kernel lowers to PTX (layouts, dot shapes, register use): this does, down to
cubin with the ptxas that ships in the triton wheel. Prints one line per (kernel, target) and exits non-zero when
any compile fails, when an argument has no type, or when no spec is found.

Usage: python .ci/aot_compile_triton.py [-j JOBS] [--only SUBSTRING] [--targets 90,80]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import multiprocessing
import os
import pkgutil
import sys
import tempfile
import time
import traceback

# The interpreter replaces @triton.jit kernels by Python functions that cannot be compiled: make sure it is off
# before triton is imported, and compile into a fresh cache so that every "ok" is a real compile.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="aspd_aot_"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

PACKAGE = "aspd_kernels.triton"


def collect_specs() -> list[tuple[str, dict]]:
    """(module, spec) for every spec of every module of the package; an import error is fatal, not skipped."""
    package = importlib.import_module(PACKAGE)
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        for spec in getattr(module, "AOT_SPECS", []):
            found.append((info.name, spec))
    return found


def _check_signature(spec: dict) -> dict:
    """The full signature triton expects: every argument typed, constexprs marked as such."""
    fn = spec["fn"]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise TypeError(f"{spec['name']}: fn is {type(fn).__name__}, not a @triton.jit kernel")
    sig = dict(spec["signature"])
    constexprs = spec.get("constexprs", {})
    unknown = (set(sig) | set(constexprs)) - set(fn.arg_names)
    if unknown:
        raise KeyError(f"{spec['name']}: {sorted(unknown)} are not arguments of {fn.__name__}")
    for name in constexprs:
        sig[name] = "constexpr"
    missing = [a for a in fn.arg_names if a not in sig]
    if missing:
        raise KeyError(f"{spec['name']}: no type for arguments {missing}")
    return {a: sig[a] for a in fn.arg_names}


def compile_one(spec: dict, capability: int) -> tuple[bool, float, str]:
    """(ok, seconds, error text) of compiling ``spec`` for ``sm_<capability>``."""
    start = time.perf_counter()
    try:
        sig = _check_signature(spec)
        src = ASTSource(fn=spec["fn"], signature=sig, constexprs=spec.get("constexprs", {}))
        target = GPUTarget("cuda", capability, 32)
        options = make_backend(target).parse_options(
            {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
        )
        compiled = triton.compile(src, target=target, options=options.__dict__)
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        return True, time.perf_counter() - start, ""
    except Exception:  # noqa: BLE001 - every failure is reported, with its traceback
        return False, time.perf_counter() - start, traceback.format_exc()


_SPECS: list[tuple[str, dict]] = []


def _job(args: tuple[int, int]) -> tuple[int, int, bool, float, str]:
    index, capability = args
    return (index, capability, *compile_one(_SPECS[index][1], capability))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="compile only the specs whose name contains this")
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma separated")
    args = parser.parse_args()

    _SPECS.extend(s for s in collect_specs() if args.only in s[1]["name"])
    if not _SPECS:
        print(f"no AOT_SPECS found in {PACKAGE}" + (f" matching {args.only!r}" if args.only else ""))
        return 1
    targets = [int(t) for t in args.targets.split(",")]
    work = [(i, cap) for i in range(len(_SPECS)) for cap in targets]
    print(f"{len(_SPECS)} kernels x {len(targets)} targets, triton {triton.__version__}, {args.jobs} jobs")

    results = []
    if args.jobs > 1:
        # fork: the workers inherit the imported kernels (jitted functions do not pickle)
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_job, work))
    else:
        results = [_job(w) for w in work]

    width = max(len(s["name"]) + len(m) + 1 for m, s in _SPECS)
    print(f"{'kernel':<{width}}  target  ok    seconds")
    failures = []
    for index, cap, ok, seconds, error in sorted(results, key=lambda r: (r[0], -r[1])):
        module, spec = _SPECS[index]
        print(f"{module + '.' + spec['name']:<{width}}  sm_{cap}   {'ok' if ok else 'FAIL':<5} {seconds:7.2f}")
        if not ok:
            failures.append((f"{module}.{spec['name']} sm_{cap}", error))
    for what, error in failures:
        print(f"\n--- {what} ---\n{error}")
    print(f"\n{len(results) - len(failures)}/{len(results)} compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
