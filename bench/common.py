"""What every benchmark shares: the run context, the JSONL row (its schema is in bench/README.md) and the
package backends' availability."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from dataclasses import dataclass, field
from typing import Callable

import torch

from aspd_kernels import _dispatch

SCHEMA_VERSION = 1
# Every row carries these keys (values may be null where the README says so).
ROW_KEYS = (
    "schema", "op", "backend", "baseline", "status", "reason", "device", "dtype", "shape", "layout", "ms",
    "ms_p25", "ms_p75", "reps", "timing_mode", "extra_ms", "bytes", "flops", "gbps", "tflops",
    "fraction_of_ceiling", "ratio", "ceilings", "grid", "torch", "triton", "cuda", "commit", "date",
)
STATUSES = ("ok", "skipped", "error")


@dataclass
class Context:
    """One benchmark run: the device, dtype, ceilings and limits shared by every op."""
    device: torch.device
    dtype: torch.dtype
    grid: str  # "full", "quick" or "cpu"
    ceilings: dict
    budget_s: float  # per timed implementation
    mask_cap_bytes: int  # dense N x N baselines are skipped above this
    torch_backend_max_tokens: int  # the tiled torch backend syncs per tile: too slow beyond this on a GPU
    env: dict = field(default_factory=dict)
    # called with each row as soon as an op measures it (``python -m bench`` writes them to ``<prefix>.partial.jsonl``
    # and flushes), so a run killed inside a long case keeps its finished rows; None: rows are only returned
    stream: Callable[[dict], None] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def elt(self) -> int:
        return torch.finfo(self.dtype).bits // 8


def git_commit() -> str | None:
    """HEAD (with "-dirty" for uncommitted tracked changes), or ``ASPD_COMMIT`` where the tree is a copy without
    ``.git`` (the lent GPU machines get the working tree, not the repository)."""
    if os.environ.get("ASPD_COMMIT"):
        return os.environ["ASPD_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: "cpu", "nvidia-h100-80gb-hbm3", ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def row(ctx: Context, op: str, *, backend: str | None = None, baseline: str | None = None, status: str = "ok",
        reason: str | None = None, shape: dict | None = None, layout: dict | None = None, timing=None,
        extra_ms: dict | None = None, nbytes: int | None = None, flops: int | None = None,
        dtype: torch.dtype | None = None) -> dict:
    """One JSONL row. Rates are computed from ``nbytes``/``flops`` (the op's useful work, the same for every
    implementation of a case) over the median time."""
    ms = timing.ms if timing is not None else None
    gbps = nbytes / (ms * 1e-3) / 1e9 if ms and nbytes else None
    tflops = flops / (ms * 1e-3) / 1e12 if ms and flops else None
    ceil = ctx.ceilings or {}
    frac = {
        "bandwidth": gbps / ceil["copy_gbps"] if gbps and ceil.get("copy_gbps") else None,
        "compute": tflops / ceil["matmul_tflops"] if tflops and ceil.get("matmul_tflops") else None,
    }
    return {
        "schema": SCHEMA_VERSION, "op": op, "backend": backend, "baseline": baseline, "status": status,
        "reason": reason, "device": ctx.env.get("device"), "dtype": str(dtype or ctx.dtype).replace("torch.", ""),
        "shape": shape or {}, "layout": layout or {}, "ms": ms,
        "ms_p25": timing.p25 if timing is not None else None, "ms_p75": timing.p75 if timing is not None else None,
        "reps": timing.reps if timing is not None else None,
        "timing_mode": getattr(timing, "mode", None) if timing is not None else None, "extra_ms": extra_ms or {},
        "bytes": nbytes, "flops": flops, "gbps": gbps, "tflops": tflops, "fraction_of_ceiling": frac, "ratio": {},
        "ceilings": {k: ceil.get(k) for k in ("copy_gbps", "matmul_tflops")}, "grid": ctx.grid,
        "torch": ctx.env.get("torch"), "triton": ctx.env.get("triton"), "cuda": ctx.env.get("cuda"),
        "commit": ctx.env.get("commit"), "date": ctx.env.get("date"),
    }


def add_ratios(rows: list[dict]) -> None:
    """Give every package-backend row of one case ``ratio[baseline] = baseline ms / its ms`` (> 1: faster than that
    baseline). A row's ``extra_ms["layout_changes"]`` (a baseline's time including its per-layout build: FlexAttention's
    block mask, the dense mask) adds the ratio ``<baseline>+build``."""
    refs: dict[str, float] = {}
    for r in rows:
        if r["baseline"] and r["status"] == "ok" and r["ms"]:
            refs[r["baseline"]] = r["ms"]
            if r["extra_ms"].get("layout_changes"):
                refs[r["baseline"] + "+build"] = r["extra_ms"]["layout_changes"]
    for r in rows:
        if r["backend"] and r["status"] == "ok" and r["ms"]:
            r["ratio"] = {name: ms / r["ms"] for name, ms in refs.items()}


def validate_row(r: dict) -> list[str]:
    """Schema problems of one row (empty list: valid)."""
    problems = [f"missing key {k!r}" for k in ROW_KEYS if k not in r]
    if problems:
        return problems
    if r["status"] not in STATUSES:
        problems.append(f"status {r['status']!r} not in {STATUSES}")
    if not isinstance(r["op"], str) or not r["op"]:
        problems.append("op must be a non-empty string")
    if r["status"] == "ok":
        if r["backend"] is None and r["baseline"] is None and r["op"] not in ("ceiling",):
            problems.append("an ok row names a backend or a baseline")
        if not isinstance(r["ms"], (int, float)) or not r["ms"] > 0:
            problems.append(f"ms must be a positive number, got {r['ms']!r}")
    elif not r["reason"]:
        problems.append(f"a {r['status']} row must give a reason")
    for k in ("shape", "layout", "extra_ms", "fraction_of_ceiling", "ratio", "ceilings"):
        if not isinstance(r[k], dict):
            problems.append(f"{k} must be an object")
    for k in ("gbps", "tflops"):
        if r[k] is not None and not (isinstance(r[k], (int, float)) and r[k] > 0):
            problems.append(f"{k} must be null or positive")
    return problems


def package_backends(op_fn: str, ctx: Context, n_tokens: int | None = None) -> list[tuple[str, str | None]]:
    """``[(backend, None if runnable else why not)]`` for this package's three backends and one backend function
    of the dispatch contract (e.g. ``"branch_attention_fwd"``)."""
    out = []
    for name in _dispatch.BACKENDS:
        why = None
        try:
            _dispatch.resolve(op_fn, ctx.device, name)
        except ValueError as exc:
            why = str(exc)
            if name == "cuda":
                from aspd_kernels import _cuda
                err = _cuda.load_error()
                if err:
                    why += f" ({err.splitlines()[0][:160]})"
        if why is None and name == "triton" and not ctx.cuda:
            why = "triton runs on the CPU only under TRITON_INTERPRET=1, far too slow for timings"
        if why is None and name == "torch" and ctx.cuda and n_tokens and n_tokens > ctx.torch_backend_max_tokens:
            why = (f"the tiled torch backend syncs the host per tile; skipped above "
                   f"{ctx.torch_backend_max_tokens} tokens on a GPU (--torch-max-tokens)")
        out.append((name, why))
    return out
