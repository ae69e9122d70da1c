"""From one-sequence storage back to text: every branch's tokens together, branches in order.

The decoder stores a parallel section interleaved (one token per live branch per step, after the branch prompts
prefilled together); training data stores it contiguously. Both orders hold the same tokens with the same
``(segment, branch)`` ids, so converting is a stable sort.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def _ids(x) -> Tensor:
    return torch.as_tensor(x).reshape(-1).to(torch.int64)


def contiguous_order(segment, branch) -> Tensor:
    """int64 permutation ``[N]`` putting a layout in reading order: sections in order, inside a parallel section
    branch 1's tokens, then branch 2's, ..., each branch in generation (storage) order."""
    seg, br = _ids(segment), _ids(branch)
    if seg.numel() == 0:
        return seg
    key = seg * (int(br.max()) + 1) + br
    return torch.sort(key, stable=True).indices


def interleaved_order(segment, branch) -> Tensor:
    """int64 permutation ``[N]`` to the decoder's storage: in each parallel section, step ``t`` holds token ``t`` of
    every branch still running, in branch order (a finished branch adds no more)."""
    seg, br = _ids(segment), _ids(branch)
    n = seg.numel()
    if n == 0:
        return seg
    # rank of every token inside its (segment, branch) run, counted over the reading order
    order = contiguous_order(seg, br)
    s, b = seg[order], br[order]
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = (s[1:] != s[:-1]) | (b[1:] != b[:-1])
    run_start = torch.cummax(torch.where(new_run, torch.arange(n), 0), 0).values
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - run_start
    rank = torch.where(br == 0, torch.arange(n), rank)  # serial tokens keep their order
    kb = int(br.max()) + 1
    key = (seg * (n + 1) + rank) * kb + br
    return torch.sort(key, stable=True).indices


def to_reading_order(ids, segment, branch) -> tuple[list[int], list[int], list[int]]:
    """``ids, segment, branch`` reordered by :func:`contiguous_order` (lists)."""
    perm = contiguous_order(segment, branch)
    return [_ids(x)[perm].tolist() for x in (ids, segment, branch)]  # type: ignore[return-value]


def layout_to_text(ids: Sequence[int] | Tensor, segment, branch, tokenizer, *,
                   skip_special_tokens: bool = False) -> str:
    """Readable text of a sequence in any storage order (e.g. ``ParallelDecoder`` results: ``sequence``,
    ``segment``, ``branch``): the tokens in reading order, decoded with ``tokenizer``. With the default
    ``skip_special_tokens=False`` the ASPD markers stay, so the text parses back into the same layout."""
    reading, _, _ = to_reading_order(ids, segment, branch)
    return tokenizer.decode(reading, skip_special_tokens=skip_special_tokens)
