"""``remap_positions``: SPEC section 3, on the device of its inputs."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as chk
from ._dispatch import implementation, resolve
from ._plan_cache import PlanCache, signature
from ._registration import define
from .reference import STRATEGIES


def _remap_positions(segment: Tensor, branch: Tensor, cu_seqlens: Tensor, strategy: str, width: int,
                     backend: str) -> Tensor:
    return implementation(backend, "remap_positions")(
        segment, branch, cu_seqlens, strategy, None if width <= 0 else width
    )


def _fake(segment, branch, cu_seqlens, strategy, width, backend):
    return torch.empty_like(segment, dtype=torch.int32)


_overload = define("remap_positions", _remap_positions, _fake)


def remap_positions(
    segment: Tensor,
    branch: Tensor,
    strategy: str = "same-sequential",
    cu_seqlens: Tensor | None = None,
    width: int | None = None,
    *,
    check_values: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Rotary position ids of every token (SPEC section 3).

    Shapes: ``segment, branch int32 [N]`` for one sequence, or a packed batch with ``cu_seqlens int32 [B + 1]``.
    ``strategy``: "same-sequential" (default; branches restart at the section start, the text after continues
    after the sum of branch lengths), "same-max" (continues after the longest branch), "fixed-length" (branch j
    starts at ``(j - 1) * width``; ``width`` defaults to each section's longest branch) or "sequential" (storage
    index). Returns int32 ``[N]`` on the inputs' device; counters restart at 0 for each sequence.
    """
    key = signature((segment, branch, cu_seqlens), (strategy, width, type(width), backend))
    name = _PLANS.get(key) or _PLANS.put(key, _plan(segment, branch, strategy, cu_seqlens, width, backend))
    n = segment.shape[0]
    if cu_seqlens is None:
        cu_seqlens = _whole(n, segment.device)
    if chk.values_checkable(check_values) and n:
        bad = chk.Violations()
        chk.cu_seqlens_values(bad, "cu_seqlens", cu_seqlens, n)
        starts = chk.sequence_starts(cu_seqlens, n)
        chk.ids(bad, "segment", segment[None], "branch", branch[None], None, starts[None])
        _section_values(bad, segment, branch, starts)
        bad.raise_first()
    return _overload(segment.contiguous(), branch.contiguous(), cu_seqlens.contiguous(), strategy, width or 0, name)


_PLANS = PlanCache()


def _plan(segment: Tensor, branch: Tensor, strategy: str, cu_seqlens: Tensor | None, width: int | None,
          backend: str | None) -> str:
    """The structural checks and the backend choice: the backend's name."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width <= 0):
        raise ValueError(f"width must be a positive int or None, got {width!r}")
    chk.tensor("segment", segment, 1, (torch.int32,))
    dev = segment.device
    chk.tensor("branch", branch, 1, (torch.int32,), dev)
    chk.shape("branch", branch, segment.shape)
    if cu_seqlens is not None:
        chk.tensor("cu_seqlens", cu_seqlens, device=dev)
        chk.cu_seqlens("cu_seqlens", cu_seqlens)
    return resolve("remap_positions", dev, backend)


def _whole(n: int, device: torch.device) -> Tensor:
    """``cu_seqlens`` of one sequence of ``n`` tokens: int32 ``[0, n]``."""
    return torch.tensor([0, n], dtype=torch.int32, device=device)


def _section_values(bad: chk.Violations, segment: Tensor, branch: Tensor, starts: Tensor) -> None:
    """A section is either serial (every branch 0) or parallel (every branch >= 1): positions need to know which.
    Sized by the token count, an upper bound of the section count, so that nothing is read to size it."""
    n = segment.shape[0]
    new = starts.clone()
    new[1:] |= segment[1:] != segment[:-1]
    sec = torch.cumsum(new.long(), 0) - 1
    lo = torch.full((n,), 1 << 30, dtype=torch.int32, device=segment.device).scatter_reduce(0, sec, branch, "amin")
    hi = torch.zeros(n, dtype=torch.int32, device=segment.device).scatter_reduce(0, sec, branch, "amax")
    mixed = (lo == 0) & (hi > 0)
    bad.add(mixed, lambda: f"branch: section {int(mixed.nonzero()[0, 0])} mixes serial tokens (branch 0) with "
                           "branch tokens")
