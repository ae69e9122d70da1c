"""Timing one implementation into one row, whatever goes wrong: a skipped implementation gives a ``skipped`` row
with its reason, a failing one an ``error`` row with the exception (out-of-memory included), never a crash."""
from __future__ import annotations

import gc
import traceback
from typing import Callable

import torch

from .common import Context, row
from .timing import measure


def _free(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def time_impl(ctx: Context, op: str, setup: Callable[[], dict] | None, reason: str | None, *,
              backend: str | None = None, baseline: str | None = None, graph: bool = True, **fields) -> dict:
    """``setup()`` returns ``{"fn": callable, "build": callable or None}``; the row holds the median of ``fn``, and
    when ``build`` is given its own median as ``extra_ms["build"]`` and the sum as ``extra_ms["layout_changes"]``
    (the cost per call when the layout changes every call). On a GPU with ``graph`` the timed call is a CUDA-graph
    replay when it can be captured (the kernels' device time), and ``extra_ms["eager"]`` the plain call with its
    host overhead; ``graph=False`` for implementations that sync the host (the tiled torch backend)."""
    if setup is None:
        return row(ctx, op, backend=backend, baseline=baseline, status="skipped", reason=reason, **fields)
    try:
        made = setup()
        extra = {}
        if ctx.cuda and graph:
            timing = measure(made["fn"], ctx.device, budget_s=ctx.budget_s / 2, graph=True)
            if timing.mode == "cuda_graph":
                extra["eager"] = measure(made["fn"], ctx.device, budget_s=ctx.budget_s / 2).ms
        else:
            timing = measure(made["fn"], ctx.device, budget_s=ctx.budget_s)
        if made.get("build") is not None:
            build = measure(made["build"], ctx.device, budget_s=ctx.budget_s / 2, min_reps=3, max_reps=50, wall=True,
                            flush=False)
            extra.update(build=build.ms, layout_changes=timing.ms + build.ms)
        made = None
        return row(ctx, op, backend=backend, baseline=baseline, timing=timing, extra_ms=extra, **fields)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a row; the run goes on
        kind = "out of memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else type(exc).__name__
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
        return row(ctx, op, backend=backend, baseline=baseline, status="error", reason=f"{kind}: {msg}{where}",
                   **fields)
    finally:
        _free(ctx)
