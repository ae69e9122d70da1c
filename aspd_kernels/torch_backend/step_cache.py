"""What one decoding step's torch-backend calls share across layers (FlashInfer's plan/run split on the CPU).

Every layer of a decoding step calls ``rope_append_kv`` and ``branch_attention_with_kvcache`` with the same
positions, lengths, block table and cache ids; only q, k, v and the K/V caches differ. The index tensors and masks
derived from the shared ones (rotary cos/sin rows, the flat slots an append writes, each row's attention mask) are
computed by the first layer's call and reused by the others, inside a :func:`step_scope`.

The scope is the caller's promise, for its duration: the tensors it passes as positions, cos/sin table, lengths and
block table are not written, and the segment/branch caches change only by appends of the same ids at the same
slots (every layer of a step writes the same ids: the decoder's case). Keys are object identities, so the scope
holds a reference to every keyed tensor: no id can be reused by another tensor while the scope lives. Outside a
scope nothing is kept and every call computes its own.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TypeVar

from torch import Tensor

T = TypeVar("T")

# a context variable, not a global: two threads (or two interleaved generators) each see their own scope
_SCOPE: ContextVar[dict | None] = ContextVar("aspd_step_scope", default=None)


@contextmanager
def step_scope() -> Iterator[None]:
    """Share the per-step index tensors of the torch backend between the calls made inside (see the module)."""
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def shared(kind: str, tensors: tuple[Tensor | None, ...], extra: tuple, build: Callable[[], T]) -> T:
    """``build()`` once per scope for these tensor objects (by identity) and ``extra`` (hashable: shapes, dtypes),
    or on every call outside a scope."""
    scope = _SCOPE.get()
    if scope is None:
        return build()
    key = (kind, *[id(t) for t in tensors], *extra)
    hit = scope.get(key)
    if hit is None:
        hit = scope[key] = (tensors, build())  # the tensors ride along: their ids stay theirs while the scope lives
    return hit[1]
