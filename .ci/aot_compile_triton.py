#!/usr/bin/env python3
"""Compile every Triton kernel of ``aspd_kernels.triton`` ahead of time for real GPUs (sm_90 and sm_80), with no GPU,
as the JIT would compile it there, and refuse the four defects a CPU run cannot see.

Each module of the package lists its kernels in ``AOT_SPECS``:
``[{"name": str, "fn": jitted kernel, "signature": {arg: "*fp16" | "*bf16" | "*i32" | "i32" | "fp32" ...},
"constexprs": {arg: value}, "num_warps": int (optional), "num_stages": int (optional), "target": int (optional:
compile for this capability only, when it is among --targets), "smem_capabilities": tuple (optional: hold shared
memory to these GPUs' limits instead of the target's, e.g. (80, 89) for the sm_80 compile of a table entry that
99 KB parts also run), "overlap": bool (optional: every loop must keep at least one tile's async copies in flight
at its top wait)}]``.
Every compile carries the JIT's divisibility hints (aligned pointers and strides: ``triton_resources.jit_attrs``)
and is checked by ``triton_resources.problems``: a TF32 dot on float32 operands, spills in a fp16/bf16 kernel,
shared memory over the target's limit, and for specs marked ``overlap`` a loop whose copies do not overlap
compute (``triton_resources.loop_overlap``). Prints one line per (kernel, target) with registers, stack and shared
memory, and exits non-zero on any failed compile or defect, when an argument has no type, or when no spec is found.
``--self-test`` instead compiles the deliberately broken kernels of ``broken_kernels.py`` and fails unless each
check fires on its kernel and none on the clean one.

Usage: python .ci/aot_compile_triton.py [-j JOBS] [--only SUBSTRING] [--targets 90,80] [--self-test]
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

import triton_resources  # noqa: E402

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


def compile_one(spec: dict, capability: int) -> tuple[bool, float, str, dict]:
    """(ok, seconds, error text, resources) of compiling ``spec`` for ``sm_<capability>`` and checking it."""
    start = time.perf_counter()
    res: dict = {}
    try:
        sig = _check_signature(spec)
        attrs = triton_resources.jit_attrs(spec["fn"].arg_names, sig)
        src = ASTSource(fn=spec["fn"], signature=sig, constexprs=spec.get("constexprs", {}), attrs=attrs)
        target = GPUTarget("cuda", capability, 32)
        options = make_backend(target).parse_options(
            {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
        )
        compiled = triton.compile(src, target=target, options=options.__dict__)
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        res = triton_resources.resources(compiled)
        found = triton_resources.problems(compiled, spec["signature"], capability, spec.get("smem_capabilities"),
                                          spec.get("overlap", False))
        res["overlap"] = ",".join(f"{'-' if loop['wait'] is None else loop['wait']}/{loop['commits']}"
                                  for loop in triton_resources.loop_overlap(compiled.asm["ttgir"]))
        if found:
            return False, time.perf_counter() - start, "\n".join(found), res
        return True, time.perf_counter() - start, "", res
    except Exception:  # noqa: BLE001 - every failure is reported, with its traceback
        return False, time.perf_counter() - start, traceback.format_exc(), res


_SPECS: list[tuple[str, dict]] = []


def _job(args: tuple[int, int]) -> tuple[int, int, bool, float, str, dict]:
    index, capability = args
    return (index, capability, *compile_one(_SPECS[index][1], capability))


def self_test(capability: int) -> int:
    """Each check must fire on its broken kernel, and none on the clean one."""
    import broken_kernels

    failed = 0
    for spec in broken_kernels.specs():
        ok, _, error, res = compile_one(spec, capability)
        expect = spec["expect"]
        if expect is None:
            good = ok
        else:
            good = not ok and expect in error and "Traceback" not in error
        failed += not good
        said = error.splitlines()[-1] if error else "no problem"
        print(f"{'ok  ' if good else 'FAIL'} {spec['name']:<28} sm_{capability} expected "
              f"{expect or 'no problem'!r}: {said[:150]} {res}")
    print(f"self-test: {'all four checks fire' if not failed else f'{failed} expectation(s) not met'}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="compile only the specs whose name contains this")
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma separated")
    parser.add_argument("--self-test", action="store_true", help="compile the deliberately broken kernels")
    args = parser.parse_args()
    targets = [int(t) for t in args.targets.split(",")]
    if args.self_test:
        return max(self_test(cap) for cap in targets)

    _SPECS.extend(s for s in collect_specs() if args.only in s[1]["name"])
    if not _SPECS:
        print(f"no AOT_SPECS found in {PACKAGE}" + (f" matching {args.only!r}" if args.only else ""))
        return 1
    work = [(i, cap) for i in range(len(_SPECS)) for cap in targets if _SPECS[i][1].get("target", cap) == cap]
    if not work:
        print(f"no spec compiles for targets {targets}")
        return 1
    print(f"{len(work)} compiles ({len(_SPECS)} specs, targets {targets}), triton {triton.__version__}, "
          f"{args.jobs} jobs")

    results = []
    if args.jobs > 1:
        # fork: the workers inherit the imported kernels (jitted functions do not pickle)
        with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_job, work))
    else:
        results = [_job(w) for w in work]

    width = max(len(s["name"]) + len(m) + 1 for m, s in _SPECS)
    print(f"{'kernel':<{width}}  target  ok    seconds  regs  stack  shared  wait/commits per loop")
    failures = []
    for index, cap, ok, seconds, error, res in sorted(results, key=lambda r: (r[0], -r[1])):
        module, spec = _SPECS[index]
        print(f"{module + '.' + spec['name']:<{width}}  sm_{cap}   {'ok' if ok else 'FAIL':<5} {seconds:7.2f}  "
              f"{res.get('regs', '-'):>4}  {res.get('stack', '-'):>5}  {res.get('shared', '-'):>6}  "
              f"{res.get('overlap') or '-'}{' (asserted)' if spec.get('overlap') else ''}")
        if not ok:
            failures.append((f"{module}.{spec['name']} sm_{cap}", error))
    for what, error in failures:
        print(f"\n--- {what} ---\n{error}")
    print(f"\n{len(results) - len(failures)}/{len(results)} compiled clean")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
