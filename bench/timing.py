"""Medians of many timed runs: CUDA events on a GPU (L2 flushed before every run), ``perf_counter`` on the CPU.

On a GPU each rep first overwrites a buffer larger than L2 (as ``triton.testing.do_bench`` does), so every run
reads its inputs from device memory, not from a cache warmed by the previous run; the flush is outside the events.
With ``graph=True`` the call is captured once in a CUDA graph and its replays are timed: the device time of the
kernels without the host's launch and Python overhead (which, for a decoding step over a few MB, can exceed the
kernel itself). Callers also time the plain eager call, so both numbers are reported.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

_flush_buffers: dict[int, torch.Tensor] = {}


@dataclass
class Timing:
    ms: float  # median
    p25: float
    p75: float
    reps: int
    mode: str = "eager"  # "cuda_graph", "eager" (CUDA events around the call), "wall" or "cpu"

    def as_dict(self) -> dict:
        return {"ms": self.ms, "ms_p25": self.p25, "ms_p75": self.p75, "reps": self.reps}


def _summary(samples: list[float], mode: str) -> Timing:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
    return Timing(ms=statistics.median(samples), p25=q[0], p75=q[2], reps=len(samples), mode=mode)


def capture(fn: Callable[[], object], device: torch.device) -> Callable[[], None] | None:
    """``fn`` captured in a CUDA graph (its replay), or None when it cannot be captured (host syncs, ...)."""
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fn()  # warm-up on a side stream, as torch.cuda.graphs recommends
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize(device)
        return graph.replay
    except Exception:  # noqa: BLE001 - not capturable: time it eagerly
        torch.cuda.synchronize(device)
        return None


def l2_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 50 << 20)


def _flush(device: torch.device) -> torch.Tensor:
    """A buffer four times L2 (at least 256 MiB): writing it evicts every input of the previous run."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _flush_buffers:
        n = max(4 * l2_bytes(device), 256 << 20)
        _flush_buffers[idx] = torch.empty(n // 4, dtype=torch.int32, device=device)
    return _flush_buffers[idx]


def _flusher(device: torch.device, by: str) -> Callable[[], object]:
    """Empty L2 of the timed call's inputs: by writing the flush buffer (what ``triton.testing.do_bench`` does; it
    leaves dirty lines the timed kernel then writes back) or by reading it (a reduction: clean lines only)."""
    if by not in ("write", "read"):
        raise ValueError(f"flush_by must be 'write' or 'read', got {by!r}")
    buf = _flush(device)
    if by == "write":
        return buf.zero_
    sink = torch.empty((), dtype=buf.dtype, device=device)
    return lambda: torch.amax(buf, dim=0, out=sink)


def measure(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.5, min_reps: int = 5,
            max_reps: int = 200, warmup: int = 2, wall: bool = False, flush: bool = True, flush_by: str = "write",
            graph: bool = False) -> Timing:
    """Median time of ``fn()`` in milliseconds.

    ``warmup`` untimed calls first (compilation, autotuning, allocator growth), then as many reps as fit in
    ``budget_s`` (within ``[min_reps, max_reps]``). ``wall=True`` times host work too (synchronize, then
    ``perf_counter``): for functions such as ``create_block_mask`` or a decoding loop whose cost is partly on the
    host. CPU timings are always wall-clock. ``graph=True`` (GPU) times replays of a CUDA graph of ``fn`` when it
    can be captured (``Timing.mode`` says which happened). ``flush_by``: how L2 is emptied before each rep
    (``_flusher``).
    """
    cuda = device.type == "cuda"
    mode = "cpu" if not cuda else "wall" if wall else "eager"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if not cuda:  # no compilation or autotuning to absorb, and CPU calls are slow: keep the CPU run short
        warmup, min_reps = min(warmup, 1), min(min_reps, 3)
    for _ in range(warmup):
        fn()
    sync()
    if cuda and graph and not wall:
        replay = capture(fn, device)
        if replay is not None:
            fn, mode = replay, "cuda_graph"
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / once)))
    samples: list[float] = []
    if cuda and not wall:
        empty_l2 = _flusher(device, flush_by) if flush else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            if empty_l2 is not None:
                empty_l2()
            start.record()
            fn()
            end.record()
        sync()
        samples = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            if cuda and flush:
                _flusher(device, flush_by)()
                sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _summary(samples, mode)
