"""Placing engine-sampled tokens into a decoder request exactly where ``ParallelDecoder`` would have placed them.

A branch sampled by vLLM as its own request comes back whole; ``ParallelDecoder`` places the tokens of a section
step by step, one per live branch per step (storage order = feeding order), which fixes every slot's segment,
branch and rotary position and the forward passes counted. These functions replay that placement through the
decoder's own section step (``decoder.section_step``, which ``BranchesMode._branch_loop`` runs too) and
``SerialMode._serial_steps``' rules, so the result is the decoder's slot for slot.
No vLLM here.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..decoder.request import Request
from ..decoder.section_step import close_section, place_step


def place_branches(req: Request, outs: list[list[int]], limit: int, stop: set[int], keep: set[int],
                   close: Sequence[int], budget: list[int] | None,
                   progress: Callable[[int], None] | None, eos: set[int] | None = None,
                   limit_reason: str = "max_new_tokens") -> list[list[int]]:
    """Place the open section's branch tokens (``outs[j-1]``: branch j's sampled tokens, its stop token included)
    step by step. A branch stops on a token in ``stop`` (placed only if in ``keep``), at ``limit`` tokens, or when
    ``budget[0]`` runs out (then every branch stops after that step). Then ``close`` goes after every branch not
    ending on a ``keep`` token. Counts one forward pass per step after which a branch is still live. Returns each
    branch's tokens after its prompt."""
    out: list[list[int]] = [[] for _ in outs]
    live = list(range(1, len(outs) + 1))
    reasons: set[str] = set()
    step = 0
    while True:
        try:
            toks = [outs[j - 1][step] for j in live]
        except IndexError:
            raise RuntimeError("the engine returned fewer tokens for a branch than its stop rules allow") from None
        still = place_step(req, out, live, toks, limit, stop, keep, budget, reasons, eos, limit_reason)
        if progress is not None:
            progress(len(toks))
        if not still:
            break
        req.forward_passes += 1
        live = [j for j, _ in still]
        step += 1
    return close_section(req, out, keep, close, reasons)


def place_serial(req: Request, toks: list[int], n: int, stop: set[int],
                 progress: Callable[[int], None] | None) -> list[int]:
    """Place up to ``n`` engine-sampled serial tokens, ending after a token in ``stop`` or before a token the
    sequence has no slot for; one forward pass per token but the last (which is never fed). Returns the tokens
    placed; sets ``req.stop_reason`` as ``SerialMode._serial_steps`` does."""
    out: list[int] = []
    for i, t in enumerate(toks[:n]):
        if req.room() < 1:
            req.end("max_seq_len")
            return out
        out.append(t)
        req.place(t, sampled=True)
        if progress is not None:
            progress(1)
        if t in stop or i == n - 1:
            req.end("eos" if t in stop else "max_new_tokens")
            return out
        req.forward_passes += 1
    if n:
        raise RuntimeError("the engine stopped a serial run before its stop rules")
    return out
