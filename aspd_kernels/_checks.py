"""Argument checks at the op boundary: every message names the argument.

Shape/dtype/device checks read no data and always run (memoised per signature by ``_plan_cache``). Value checks
read the device (a host sync), so they run only when ``check_values`` is true and we are neither compiling nor
capturing a CUDA graph, and all the rules of one call are read back together (:class:`Violations`); the kernels
clamp lengths to capacity so that unchecked values can give wrong numbers but never an out-of-bounds access or a
hang.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def values_checkable(check_values: bool) -> bool:
    if not check_values or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def tensor(name: str, t, ndim: int | None = None, dtypes=None, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {t.device}")


def shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """``expected`` may hold None for a free dimension."""
    got = t.shape
    if len(got) == len(expected):
        for size, want in zip(got, expected):
            if want is not None and size != want:
                break
        else:
            return
    want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
    raise ValueError(f"{name} must have shape {want}, got {list(got)}")


def same_dtype(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "q") -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def heads(q_name: str, hq: int, kv_name: str, hkv: int) -> None:
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the head count of {q_name} ({hq}) must be a multiple of that of {kv_name} ({hkv})")


# Head sizes per backend, as (predicate, rule in words). torch runs any. triton: FlashAttention's rule, every
# multiple of 8 up to 256 -- its kernels pad D to a power of two >= 16 with masked loads and stores (what the tests
# and the AOT specs cover), and past 256 the tiles no longer fit registers and shared memory. cuda: the decode
# extension's own check (csrc/ops.cpp: 1..256; tensor cores for 64/128, the generic kernel for the rest).
_HEAD_SIZES = {
    "torch": (lambda d: d >= 1, "any positive size"),
    "triton": (lambda d: 8 <= d <= 256 and d % 8 == 0, "multiples of 8 from 8 to 256"),
    "cuda": (lambda d: 1 <= d <= 256, "1 to 256"),
}


def head_dim_refusals(name: str, d: int) -> dict[str, str]:
    """``{backend: message}`` for each backend that cannot run head size ``d`` (the last dimension of the tensor
    ``name``); ``_dispatch.resolve`` passes over them under ``auto`` and raises the message when one is forced."""
    refusals = {}
    for backend, (runs, rule) in _HEAD_SIZES.items():
        if not runs(d):
            refusals[backend] = f"{name}: head size {d} is not supported by backend={backend!r} ({rule})"
    return refusals


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Copy only when the innermost stride is not 1 (FlashAttention's rule)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cu_seqlens(name: str, cu: torch.Tensor) -> None:
    """The structure of an offsets tensor: int32 ``[B + 1]``, B >= 0 (its values: :func:`cu_seqlens_values`)."""
    tensor(name, cu, 1, (torch.int32,))
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must hold at least 2 entries (B + 1), got {cu.shape[0]}")


def cu_seqlens_values(v: "Violations", name: str, cu: Tensor, total: int) -> None:
    """Offsets from 0, non-decreasing, ending at the packed token count ``total``."""
    v.add(cu[0], lambda: f"{name}[0] must be 0, got {int(cu[0])}")  # nonzero: any() of an int is "!= 0"
    v.add(cu[1:] < cu[:-1], lambda: f"{name} must be non-decreasing")
    v.add(cu[-1] != total, lambda: f"{name}[-1] ({int(cu[-1])}) must equal the packed token count ({total})")


def sequence_starts(cu: torch.Tensor, n: int) -> torch.Tensor:
    """bool ``[n]``: the packed slots where a sequence of ``cu`` (int32 ``[B + 1]``) starts."""
    starts = torch.zeros(n, dtype=torch.bool, device=cu.device)
    if n:
        starts[cu[:-1].long().clamp(max=n - 1)] = True
    return starts


def ids(v: "Violations", seg_name: str, segment: Tensor, br_name: str, branch: Tensor, valid: Tensor | None,
        new_sequence: Tensor | None = None) -> None:
    """Value rules of the per-token ids: ``branch >= 0``, ``segment >= 0`` and ``segment`` non-decreasing along each
    row of valid slots.

    ``segment, branch`` are int32 ``[rows, length]``; ``valid`` (bool, same shape, or None when every slot holds a
    token) marks the slots that hold tokens and must be a prefix of each row; ``new_sequence`` (bool, same shape)
    marks the slots where a new sequence starts inside a row (packed batches).
    """
    if segment.numel() == 0:
        return
    # one rule for both signs: the bitwise or of two int32 is negative iff one of them is; the message tells which
    negative = (segment | branch) < 0
    down = segment[:, 1:] < segment[:, :-1]
    if valid is not None:
        negative &= valid
        down &= valid[:, 1:]  # a prefix: slot j + 1 valid implies slot j valid
    if new_sequence is not None:
        down &= ~new_sequence[:, 1:]

    def which() -> str:
        ok = torch.ones_like(segment, dtype=torch.bool) if valid is None else valid
        if bool((ok & (branch < 0)).any()):
            return f"{br_name} must be >= 0 (0 = serial, 1..K = branch), got {int(branch[ok].min())}"
        return f"{seg_name} must be >= 0, got {int(segment[ok].min())}"

    def where() -> str:
        row, col = (int(x) for x in down.nonzero()[0])
        return f"{seg_name} must be non-decreasing within a sequence; row {row} decreases at slot {col + 1}"

    v.add(negative, which)
    v.add(down, where)


class Violations:
    """The value rules of one call, read back from the device together.

    ``add(bad, message)`` takes a bool or integer tensor (any nonzero element breaks the rule) and a function that
    words the error naming the argument (it may read more: it runs only for a broken rule). ``raise_first()`` reads
    every rule in one transfer, a single host sync on a GPU, and raises the first broken rule's ``ValueError``, in
    the order the rules were added.
    """

    def __init__(self) -> None:
        self._bad: list[Tensor] = []
        self._messages: list[Callable[[], str]] = []

    def add(self, bad: Tensor, message: Callable[[], str]) -> None:
        self._bad.append(bad.any())
        self._messages.append(message)

    def raise_first(self) -> None:
        if not self._bad:
            return
        broken = torch.stack(self._bad).tolist()  # the one device read
        for is_broken, message in zip(broken, self._messages):
            if is_broken:
                raise ValueError(message())
