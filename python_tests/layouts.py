"""Random branch layouts for the tests: random section counts, 1..64 branches, ragged and empty (dropped) branches,
contiguous, interleaved and mixed storage, packed batches, lengths that are multiples of nothing."""
from __future__ import annotations

import random

import torch


def random_sections(rng: random.Random, max_tokens: int = 200, max_branches: int = 64) -> list:
    """A section list for ``BranchLayout.from_sections``-like use: ``[("serial", n) | ("parallel", [L...])]``."""
    sections = []
    total = 0
    while total < max_tokens:
        if rng.random() < 0.45:
            n = rng.randint(1, 23)
            sections.append(("serial", n))
            total += n
        else:
            k = rng.choice([1, 2, 3, 5, 7, rng.randint(1, max_branches)])
            lengths = [rng.randint(0, 9) if rng.random() < 0.15 else rng.randint(1, 13) for _ in range(k)]
            if sum(lengths) == 0:
                lengths[0] = 1
            sections.append(("parallel", lengths))
            total += sum(lengths)
    return sections


def layout_ids(sections, storage: str, rng: random.Random) -> tuple[list[int], list[int]]:
    """(segment, branch) lists. ``storage``: contiguous, interleaved or mixed (each section picks one, and an
    interleaved section may start with a contiguous prompt chunk per branch as after a branch-prompt prefill)."""
    seg: list[int] = []
    br: list[int] = []
    for s, (kind, size) in enumerate(sections):
        if kind == "serial":
            seg += [s] * size
            br += [0] * size
            continue
        lengths = list(size)
        mode = storage if storage != "mixed" else rng.choice(["contiguous", "interleaved", "prompt+interleaved"])
        if mode == "contiguous":
            order = [j for j, n in enumerate(lengths, 1) for _ in range(n)]
        else:
            left = lengths[:]
            order = []
            if mode == "prompt+interleaved":
                for j in range(len(left)):
                    p = min(left[j], rng.randint(0, 3))
                    order += [j + 1] * p
                    left[j] -= p
            while any(left):
                for j in range(len(left)):
                    if left[j]:
                        order.append(j + 1)
                        left[j] -= 1
        seg += [s] * len(order)
        br += order
    return seg, br


def random_layout(seed: int, max_tokens: int = 200, storage: str | None = None, max_branches: int = 64):
    """int32 ``(segment, branch)`` of one random sequence."""
    rng = random.Random(seed)
    storage = storage or rng.choice(["contiguous", "interleaved", "mixed"])
    seg, br = layout_ids(random_sections(rng, max_tokens, max_branches), storage, rng)
    return torch.tensor(seg, dtype=torch.int32), torch.tensor(br, dtype=torch.int32)


def random_batch(seed: int, batch: int, max_tokens: int = 200, storage: str | None = None):
    """A packed batch: ``(segment, branch, cu_seqlens)``, int32, each sequence with its own layout."""
    segs, brs, cu = [], [], [0]
    for b in range(batch):
        s, br = random_layout(seed * 1000 + b, max_tokens, storage)
        segs.append(s)
        brs.append(br)
        cu.append(cu[-1] + s.numel())
    return torch.cat(segs), torch.cat(brs), torch.tensor(cu, dtype=torch.int32)
