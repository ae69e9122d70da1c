"""One step of a parallel section, placed into a request: the stop rules every engine applies to branch tokens.

``BranchesMode._branch_loop`` (tokens sampled here) and the vLLM engine (tokens sampled by vLLM, replayed in
``aspd_kernels.vllm.replay``) both place a section's tokens through these functions, so the two engines agree slot
for slot and reason for reason.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .request import Request

# most severe first: the one a section (and so the result) reports
REASONS = ("max_seq_len", "max_new_tokens", "stop", "eos")


def place_step(req: Request, out: list[list[int]], live: list[int], toks: list[int], limit: int, stop: set[int],
               keep: set[int], budget: list[int] | None, reasons: set[str], eos: set[int] | None = None,
               limit_reason: str = "max_new_tokens",
               ends: Callable[[int, list[int]], bool] | None = None) -> list[tuple[int, int]]:
    """Place ``toks[i]``, sampled for branch ``live[i]`` (1-based), and return ``(branch, slot)`` of every branch
    still live after this step.

    A branch stops on a token in ``stop`` (placed only if also in ``keep``; else it ends on its previous token,
    already in the cache), when ``ends(branch, its tokens)`` is true (that token kept), at ``limit`` tokens, or when
    ``budget[0]`` (sampled tokens left to the whole request, decremented here) runs out. Why each branch stopped goes
    into ``reasons``: "eos" for a stop token in ``eos`` (default: all of ``stop``), "stop" for another stop token or
    ``ends``, ``limit_reason`` at the limit, "max_new_tokens" for the budget."""
    eos = stop if eos is None else eos
    cut = False
    if budget is not None:
        budget[0] -= len(toks)
        cut = budget[0] <= 0
    still: list[tuple[int, int]] = []
    for j, t in zip(live, toks):
        if t in stop and t not in keep:
            reasons.add("eos" if t in eos else "stop")
            continue
        out[j - 1].append(t)
        slot = req.place(t, j, sampled=True)
        if t in stop:
            reasons.add("eos" if t in eos else "stop")
        elif ends is not None and ends(j, out[j - 1]):
            reasons.add("stop")
        elif len(out[j - 1]) >= limit:
            reasons.add(limit_reason)
        elif cut:
            reasons.add("max_new_tokens")
        else:
            still.append((j, slot))
    return still


def close_section(req: Request, out: list[list[int]], keep: set[int], close: Sequence[int],
                  reasons: set[str]) -> list[list[int]]:
    """``close`` after every branch not ending on a ``keep`` token, and ``req.stop_reason`` from the most severe of
    ``reasons``; returns ``out``."""
    for j, b in enumerate(out, start=1):
        if close and not (b and b[-1] in keep):
            for t in close:
                req.place(t, j)
            b.extend(close)
    req.end(next((r for r in REASONS if r in reasons), ""))
    return out
