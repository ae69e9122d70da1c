"""Logits processors for the caller's branches (``generate_branches(..., logits_processor=...)``)."""
from __future__ import annotations

from typing import Sequence

import torch

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
