"""Packing examples into one row: padding-free batches for ``attn_implementation="aspd"``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .packing import IGNORE_INDEX


@dataclass
class AspdCollator:
    """Concatenate examples (dicts from :func:`build_example`; ``segment``/``branch``/``position_ids`` optional:
    serial and ``0..n-1`` when absent) into a single row, ``B = 1``, with no padding. Returns the keyword arguments
    of a causal-LM forward::

        input_ids, labels, position_ids   int64 [1, T]     positions restart at 0 in every example
        aspd_segment, aspd_branch         int32 [1, T]     per-example ids (restart at 0 too)
        cu_seq_lens_q, cu_seq_lens_k      int32 [n + 1]    example boundaries (one tensor, twice)
        max_length_q, max_length_k        int              the longest example

    so ``model(**collator(examples))`` computes every example as if alone (the loss included: each example's first
    label is ``-100``). ``max_tokens``: refuse rows longer than this (see :func:`group_by_tokens` to split).
    """

    max_tokens: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Tensor]]) -> dict:
        if not examples:
            raise ValueError("AspdCollator: no examples")
        cols: dict[str, list[Tensor]] = {k: [] for k in ("input_ids", "labels", "position_ids", "segment", "branch")}
        lengths = []
        for i, ex in enumerate(examples):
            ids = torch.as_tensor(ex["input_ids"], dtype=torch.int64).reshape(-1)
            n = ids.numel()
            if n == 0:
                raise ValueError(f"AspdCollator: example {i} is empty")
            labels = torch.as_tensor(ex.get("labels", ids), dtype=torch.int64).reshape(-1).clone()
            labels[0] = IGNORE_INDEX
            pos = ex.get("position_ids")
            pos = torch.arange(n) if pos is None else torch.as_tensor(pos, dtype=torch.int64).reshape(-1)
            seg, br = ex.get("segment"), ex.get("branch")
            zeros = torch.zeros(n, dtype=torch.int32)
            seg = zeros if seg is None else torch.as_tensor(seg).reshape(-1).to(torch.int32)
            br = zeros if br is None else torch.as_tensor(br).reshape(-1).to(torch.int32)
            for name, t in (("labels", labels), ("position_ids", pos), ("segment", seg), ("branch", br)):
                if t.numel() != n:
                    raise ValueError(f"AspdCollator: example {i}: {name} has {t.numel()} entries, input_ids {n}")
            for name, t in zip(cols, (ids, labels, pos, seg, br)):
                cols[name].append(t)
            lengths.append(n)
        total = sum(lengths)
        if self.max_tokens is not None and total > self.max_tokens:
            raise ValueError(f"AspdCollator: {total} tokens exceed max_tokens={self.max_tokens}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        row = {k: torch.cat(v)[None] for k, v in cols.items()}
        return {
            "input_ids": row["input_ids"],
            "labels": row["labels"],
            "position_ids": row["position_ids"],
            "aspd_segment": row["segment"],
            "aspd_branch": row["branch"],
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
        }


def group_by_tokens(examples: Sequence[Mapping[str, Tensor]], max_tokens: int) -> list[list[Mapping[str, Tensor]]]:
    """Split ``examples`` in order into groups of at most ``max_tokens`` tokens (an example longer than that forms
    a group alone), one :class:`AspdCollator` row each."""
    groups: list[list] = []
    size = 0
    for ex in examples:
        n = len(ex["input_ids"])
        if not groups or size + n > max_tokens:
            groups.append([])
            size = 0
        groups[-1].append(ex)
        size += n
    return groups
