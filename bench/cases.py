"""Benchmark layouts and the work they hold: visible (query, key) pairs, FLOP and byte counts.

Layout of a case with ``n`` tokens and ``k`` branches (SPEC section 1), one sequence:

    [serial prefix P][parallel section: k branches of L tokens][serial suffix S]

``P = n // 2`` (plus the rounding remainder), ``L = (n - P - S) // k``. Prefill cases end with a serial suffix
``S = n // 16`` that sees every branch; decode cases stop inside the section (``S = 0``) and their queries are the
newest token of every branch (the last ``k`` slots). ``storage``: "interleaved" stores one token per branch per
decoding step; "contiguous" stores the branches one after another (for decode: the branches' first ``L - 1``
tokens contiguous, as after a chunked prefill of branch prompts, then one interleaved step).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from aspd_kernels import BranchLayout


@dataclass(frozen=True)
class AttnCase:
    n: int
    k: int
    storage: str
    hq: int
    hkv: int
    d: int
    sweep: str  # which grid axis this case belongs to: "tokens", "branches" or "heads"

    def key(self) -> str:
        return f"N={self.n} K={self.k} {self.storage} H={self.hq}/{self.hkv} D={self.d}"

    def as_dict(self) -> dict:
        return asdict(self)


def section_lengths(n: int, k: int, decode: bool) -> tuple[int, int, int]:
    """(prefix P, branch length L, suffix S) with P + k*L + S == n."""
    suffix = 0 if decode else n // 16
    branch_len = max(1, (n - n // 2 - suffix) // k)
    prefix = n - suffix - k * branch_len
    if prefix < 1:
        raise ValueError(f"n={n} is too small for k={k} branches")
    return prefix, branch_len, suffix


def build_layout(n: int, k: int, storage: str, decode: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """int32 ``(segment [n], branch [n])`` and a description of the layout (for the JSONL ``layout`` field)."""
    prefix, length, suffix = section_lengths(n, k, decode)
    if decode:
        lay = BranchLayout()
        lay.append_serial(prefix)
        lay.open_parallel()
        if storage == "contiguous":
            for j in range(1, k + 1):
                lay.append_branch(j, length - 1)
            lay.append_step(range(1, k + 1))
        else:
            for _ in range(length):
                lay.append_step(range(1, k + 1))
        lay.close_parallel()
    else:
        sections = [("serial", prefix), ("parallel", [length] * k)] + ([("serial", suffix)] if suffix else [])
        lay = BranchLayout.from_sections(sections, storage=storage)
    info = {"storage": storage, "K": k, "prefix": prefix, "branch_len": length, "suffix": suffix}
    return lay.segment, lay.branch, info


def visible_counts(segment: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]``: how many keys each slot sees under SPEC section 2, in O(N log N) without an N x N mask.

    A slot sees every key of the sections before its own, plus the keys of its own (segment, branch) group stored
    no later than itself (a serial section is one group: branch 0).
    """
    n = segment.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    seg, br = segment.long().cpu(), branch.long().cpu()
    idx = torch.arange(n)
    new_section = torch.ones(n, dtype=torch.bool)
    new_section[1:] = seg[1:] != seg[:-1]
    section_start = torch.cummax(torch.where(new_section, idx, torch.zeros_like(idx)), 0).values
    group = seg * (int(br.max()) + 1) + br
    order = torch.sort(group, stable=True).indices
    sorted_group = group[order]
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = sorted_group[1:] != sorted_group[:-1]
    pos = torch.arange(n)
    group_start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = pos - group_start
    return section_start + rank + 1


def attention_flops(hq: int, d: int, pairs: int) -> int:
    """Forward FLOP counting visible pairs only: ``q.k`` (2D) and ``p.v`` (2D) per pair and query head."""
    return 4 * hq * d * pairs


def prefill_bytes(nq: int, nk: int, hq: int, hkv: int, d: int, elt: int) -> int:
    """Fewest bytes of ``branch_attention``: q read, out written, k and v read once, segment and branch read
    (int32 each), lse written (float32 per query head)."""
    return elt * (2 * nq * hq * d + 2 * nk * hkv * d) + 8 * nk + 4 * hq * nq


def decode_bytes(nq: int, nk: int, hq: int, hkv: int, d: int, elt: int) -> int:
    """Fewest bytes of ``branch_attention_with_kvcache``: q read, out written, the valid cache slots of k and v
    read once, their segment and branch ids read."""
    return elt * (2 * nq * hq * d + 2 * nk * hkv * d) + 8 * nk


def attention_cases(grid: str, cuda: bool) -> list[AttnCase]:
    """The grid: sweeps around a base case rather than the full Cartesian product (which would not fit a
    10-minute command once FlexAttention recompiles for every shape).

    full (GPU):  tokens 1k..128k interleaved (8k: the key prefill case; contiguous too at 4k, 32k) at K=16,
                 Hq/Hkv 32/8, D=128; K in {1, 4, 64} at 32k; Hq/Hkv/D 8/8/128 and 32/8/64 at 32k, K=16 (14 cases, one
                 FlexAttention compile each: the stage fits a 10-minute command).
    quick (GPU): tokens {4k, 32k}, K {4, 16}, interleaved, 32/8, D=128.
    cpu:         tokens {256, 768} x both storages at K=4, K {1, 16} at 512, heads 8/8 and 8/2 at D=64.
    """
    out: list[AttnCase] = []
    if grid == "full":
        base = dict(hq=32, hkv=8, d=128)
        for n in (1024, 4096, 8192, 16384, 32768, 65536, 131072):
            out.append(AttnCase(n, 16, "interleaved", sweep="tokens", **base))
            if n in (4096, 32768):
                out.append(AttnCase(n, 16, "contiguous", sweep="tokens", **base))
        for k in (1, 4, 64):
            out.append(AttnCase(32768, k, "interleaved", sweep="branches", **base))
        for hq, hkv, d in ((8, 8, 128), (32, 8, 64)):
            out.append(AttnCase(32768, 16, "interleaved", hq, hkv, d, sweep="heads"))
    elif grid == "quick":
        for n in (4096, 32768):
            for k in (4, 16):
                out.append(AttnCase(n, k, "interleaved", 32, 8, 128, sweep="tokens" if k == 16 else "branches"))
    elif grid == "cpu":
        for n in (256, 768):
            for s in ("contiguous", "interleaved"):
                out.append(AttnCase(n, 4, s, 8, 2, 64, sweep="tokens"))
        for k in (1, 16):
            out.append(AttnCase(512, k, "interleaved", 8, 2, 64, sweep="branches"))
        out.append(AttnCase(512, 4, "interleaved", 8, 8, 64, sweep="heads"))
    else:
        raise ValueError(f"unknown grid {grid!r}")
    return out
