"""A per-op memo of the structural checks and the backend choice, keyed by the call's signature.

Why: the shape, dtype, device and stride checks of an op and the backend it resolves to depend only on each tensor
argument's metadata, the non-tensor arguments and the environment (``ASPD_BACKEND``, ``TRITON_INTERPRET``), never on
the data. A decoding step calls every op once per layer with identical metadata, so after the first call one key
(a tuple of that metadata) and one dict lookup replace some thirty Python checks: on the CPU the checks cost more
than the registered op itself. The checks stay the one source of every error message: a key that misses runs them.

Not memoised: the value checks (they read the data, see ``_checks.Violations``) and anything while compiling
(dynamo traces the checks; a cache would only add guards), and a call whose key cannot be built (a non-tensor where
a tensor belongs: the checks name it).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor

_MAX_PLANS = 256  # per op; a workload cycling through more signatures than this only re-runs checks


def signature(tensors: Sequence[Tensor | None], extra: tuple, strided: Sequence[Tensor] = (),
              aligned: Sequence[Tensor] = ()) -> tuple | None:
    """The key of one call: ``(shape, dtype, device)`` of each tensor (None for an absent optional), the strides of
    the ``strided`` ones and the 16-byte alignment of the ``aligned`` ones (where a check or a kernel choice reads
    them; elsewhere a stride only decides a copy, made on every call), ``extra`` (the op's non-tensor arguments) and
    the environment variables the backend choice reads. None when compiling or when an argument is not a tensor."""
    if torch.compiler.is_compiling():
        return None
    try:
        meta = [None if t is None else (t.shape, t.dtype, t.device) for t in tensors]
        layout = [t.stride() for t in strided] + [t.data_ptr() % 16 for t in aligned]
    except (AttributeError, TypeError, RuntimeError):  # not a tensor, or one without strides (sparse)
        return None
    return (*meta, *layout, *extra, *_environment())


if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict):
    # CPython keeps POSIX os.environ as bytes -> bytes in ``_data`` (every write through os.environ updates it):
    # two dict lookups instead of two trips through the Mapping protocol and str encoding, a third of the key's cost
    _RAW = os.environ._data

    def _environment() -> tuple:
        return _RAW.get(b"ASPD_BACKEND"), _RAW.get(b"TRITON_INTERPRET")
else:
    def _environment() -> tuple:
        return os.environ.get("ASPD_BACKEND"), os.environ.get("TRITON_INTERPRET")


class PlanCache:
    """``{signature: plan}`` with a bound; a plan is whatever the op's checks return (its scale, backend name...)."""

    def __init__(self) -> None:
        self._plans: dict[tuple, Any] = {}

    def get(self, key: tuple | None) -> Any:
        if key is None:
            return None
        try:
            return self._plans.get(key)
        except TypeError:  # an unhashable argument (a tensor where a float belongs): the checks name it
            return None

    def put(self, key: tuple | None, plan: Any) -> Any:
        if key is not None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            try:
                self._plans[key] = plan
            except TypeError:
                pass
        return plan
