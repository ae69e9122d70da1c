"""SPEC section 3 as data-parallel torch ops: no Python loop over sections or tokens.

1. Sections are the runs of equal ``segment`` inside a sequence: ``section = cumsum(run starts)``.
2. A token's rank inside its branch is its place among the tokens with the same (section, branch) key, read off
   a stable sort of the keys.
3. Each section advances the counter by its length (serial, same-sequential), its longest branch (same-max) or
   ``K * W`` (fixed-length); the counter at a section's start is an exclusive scan of those advances, restarted at
   every sequence.
"""
from __future__ import annotations

import torch


def _restart_scan(values: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of ``values`` restarted where ``first`` is true."""
    excl = torch.cumsum(values, 0) - values
    base = torch.where(first, excl, torch.zeros_like(excl))
    return excl - torch.cummax(base, 0).values  # excl is non-decreasing, so the latest restart is the max


def _run_starts(first: torch.Tensor) -> torch.Tensor:
    """For each element, the index of the latest element where ``first`` is true."""
    idx = torch.arange(first.shape[0], device=first.device)
    return torch.cummax(torch.where(first, idx, torch.zeros_like(idx)), 0).values


def remap_positions(segment, branch, cu_seqlens, strategy: str, width):
    n = segment.shape[0]
    device = segment.device
    if n == 0:
        return torch.empty(0, dtype=torch.int32, device=device)
    idx = torch.arange(n, device=device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), idx, right=True)
    new_seq = torch.ones(n, dtype=torch.bool, device=device)
    new_seq[1:] = seq[1:] != seq[:-1]
    if strategy == "sequential":
        return (idx - _run_starts(new_seq)).to(torch.int32)

    seg, br = segment.long(), branch.long()
    new_sec = new_seq.clone()
    new_sec[1:] |= seg[1:] != seg[:-1]
    sec = torch.cumsum(new_sec.long(), 0) - 1  # [N] section id
    n_sec = int(sec[-1]) + 1
    sec_len = torch.bincount(sec, minlength=n_sec)
    k_max = int(br.max()) + 1
    counts = torch.bincount(sec * k_max + br, minlength=n_sec * k_max).view(n_sec, k_max)
    longest = counts.amax(1)  # L_max per section (a serial section: its length)
    n_branches = torch.zeros(n_sec, dtype=torch.long, device=device).scatter_reduce(0, sec, br, "amax")
    parallel = n_branches > 0

    # rank of each token inside its (section, branch)
    key = sec * k_max + br
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    group_first = torch.ones(n, dtype=torch.bool, device=device)
    group_first[1:] = sorted_key[1:] != sorted_key[:-1]
    rank = torch.empty_like(idx)
    rank[order] = idx - _run_starts(group_first)

    w = torch.full_like(longest, width) if width is not None else longest
    if strategy == "same-sequential":
        advance = sec_len
    elif strategy == "same-max":
        advance = torch.where(parallel, longest, sec_len)
    else:  # fixed-length
        advance = torch.where(parallel, n_branches * w, sec_len)
    sec_first = new_seq[new_sec]  # does each section open a sequence?
    start = _restart_scan(advance, sec_first)[sec]  # counter at each token's section start

    serial_off = idx - _run_starts(new_sec)
    par_off = rank + (torch.clamp(br - 1, min=0) * w[sec] if strategy == "fixed-length" else 0)
    return (start + torch.where(parallel[sec], par_off, serial_off)).to(torch.int32)
