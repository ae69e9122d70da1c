"""``remap_positions``: SPEC section 3, on the device of its inputs."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as chk
from ._dispatch import implementation, resolve
from .reference import STRATEGIES


@torch.library.custom_op("aspd::remap_positions", mutates_args=())
def _remap_positions(segment: Tensor, branch: Tensor, cu_seqlens: Tensor, strategy: str, width: int,
                     backend: str) -> Tensor:
    return implementation(backend, "remap_positions")(
        segment, branch, cu_seqlens, strategy, None if width <= 0 else width
    )


@_remap_positions.register_fake
def _(segment, branch, cu_seqlens, strategy, width, backend):
    return torch.empty_like(segment, dtype=torch.int32)


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
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width <= 0):
        raise ValueError(f"width must be a positive int or None, got {width!r}")
    chk.tensor("segment", segment, 1, (torch.int32,))
    dev = segment.device
    chk.tensor("branch", branch, 1, (torch.int32,), dev)
    chk.shape("branch", branch, segment.shape)
    n = segment.shape[0]
    check = chk.values_checkable(check_values)
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=dev)
    else:
        chk.tensor("cu_seqlens", cu_seqlens, device=dev)
    chk.cu_seqlens("cu_seqlens", cu_seqlens, n, check)
    if check and n:
        starts = chk.sequence_starts(cu_seqlens, n)
        chk.ids("segment", segment[None], "branch", branch[None], torch.ones_like(starts)[None], starts[None])
        _check_sections(segment, branch, starts)
    name = resolve("remap_positions", dev, backend)
    return _remap_positions(segment.contiguous(), branch.contiguous(), cu_seqlens.contiguous(), strategy,
                            width or 0, name)


def _check_sections(segment: Tensor, branch: Tensor, starts: Tensor) -> None:
    """A section is either serial (every branch 0) or parallel (every branch >= 1): positions need to know which."""
    new = starts.clone()
    new[1:] |= segment[1:] != segment[:-1]
    sec = torch.cumsum(new.long(), 0) - 1
    n_sec = int(sec[-1]) + 1
    lo = torch.full((n_sec,), 1 << 30, dtype=torch.int32, device=segment.device).scatter_reduce(0, sec, branch, "amin")
    hi = torch.zeros(n_sec, dtype=torch.int32, device=segment.device).scatter_reduce(0, sec, branch, "amax")
    mixed = (lo == 0) & (hi > 0)
    if bool(mixed.any()):
        s = int(mixed.nonzero()[0, 0])
        raise ValueError(f"branch: section {s} mixes serial tokens (branch 0) with branch tokens")
