"""Logits processors for the caller's branches (``generate_branches(..., logits_processor=...)``)."""
from __future__ import annotations

from typing import Sequence

import torch

from ..tokens import AspdTokens
from .driver import LogitsProcessor


def distinct_starts(prefix_len: int, prompts: Sequence[Sequence[int]]) -> LogitsProcessor:
    """No two branches start with the same token: at the branches' first step (every row's history is the prefix
    of ``prefix_len`` tokens and its branch prompt, rows in branch order), each branch's likeliest token is ruled out
    for the branches after it; every other step is left alone. The branches cannot see each other, so an instruct
    model given "1.", "2.", "3." tends to start every item alike. Branch 1 still equals decoding alone; the others
    do from their second token on, given their first."""
    lengths = [prefix_len + len(p) for p in prompts]

    def proc(logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        if [len(h) for h in histories] != lengths:
            return logits
        out = logits.clone()
        for r in range(1, out.shape[0]):
            out[r, out[:r].argmax(dim=-1)] = float("-inf")
        return out

    return proc


def no_sibling_repeat(tokens: AspdTokens, n: int = 4) -> LogitsProcessor:
    """For model-driven ``generate`` (``logits_processor=no_sibling_repeat(tokens)``): a branch may not write an
    ``n``-gram that one of its siblings in the same section has already written. The branches cannot see each
    other, but the engine sees them all: greedy decoding of a small model otherwise gives
    sibling items that say the same thing in the same words. Serial steps (one row) are left alone; a finished
    sibling's text still counts. The same rule as ``no_repeat_ngram_size`` in transformers' ``generate``, applied
    across siblings instead of within one text.

    Each row's branch text is its history after its last ``<|branch|>`` (a row whose history closes that branch is
    serial); its section is identified by the history before that token, which every sibling shares. Stateful:
    make one per ``generate`` call."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    sections: dict[int, list[list[int]]] = {}  # section key -> every sibling's branch text so far

    def proc(logits: torch.Tensor, histories: list[list[int]]) -> torch.Tensor:
        if len(histories) < 2 and not sections:
            return logits
        out = logits
        step: dict[int, list[tuple[int, ...]]] = {}  # section key -> this step's n-grams of the rows before
        for r, h in enumerate(histories):
            try:
                at = len(h) - 1 - h[::-1].index(tokens.branch)
            except ValueError:
                continue  # a serial row before any section
            key, own = hash(tuple(h[:at])), h[at + 1:]
            if tokens.branch_end in own:
                continue  # a serial row after a section
            texts = sections.setdefault(key, [])
            # this row's entry is its text one step ago (or a new branch); replace it with the text now
            for k, t in enumerate(texts):
                if len(t) + 1 == len(own) and own[:-1] == t:
                    texts[k] = own
                    break
            else:
                texts.append(own)
            if len(own) < n - 1:
                continue
            tail = tuple(own[len(own) - (n - 1):]) if n > 1 else ()
            banned = {t[i + n - 1] for t in texts if t is not own
                      for i in range(len(t) - n + 1) if tuple(t[i:i + n - 1]) == tail}
            # siblings decode in lockstep: an earlier row's token of this very step counts too (its likeliest
            # token, which is the token greedy decoding takes)
            banned |= {g[-1] for g in step.get(key, ()) if g[:-1] == tail}
            if banned:
                if out is logits:
                    out = logits.clone()
                out[r, list(banned)] = float("-inf")
            step.setdefault(key, []).append(tail + (int(out[r].argmax()),))
        return out

    return proc
