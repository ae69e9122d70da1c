"""How the ``aspd`` ops are registered: on a ``torch.library.Library`` fragment directly, not through
``torch.library.custom_op``.

Why: ``custom_op`` reaches the implementation through Python trampolines on every call (an Autograd kernel that
re-enters the dispatcher, then a backend wrapper that checks output aliasing and disables dynamo): about 8 of the
11 microseconds a bare custom op of ten arguments costs on the CPU. Here the implementation is the op's
``CompositeExplicitAutograd`` kernel, one Python call from the dispatcher, and a fake kernel serves
``torch.compile``, as with ``custom_op``. ``python -m bench --ops host`` measures both floors.

What the registration promises, per kind of op:
- differentiable (``branch_attention``): ``torch.library.register_autograd``, the same Autograd kernel ``custom_op``
  would use;
- not differentiable (every other op): the Autograd key falls through. When grad mode is on and an input requires
  grad, the implementation runs under ``no_grad`` (so the torch backend records nothing) and each output gets a node
  whose backward raises, naming the op: the error ``custom_op`` gives, rather than a silently missing gradient;
- mutating (``rope_append_kv``): the kernel bumps the version counters of the tensors it writes, which is what
  torch's ADInplaceOrView kernel of a mutating op does (autograd then refuses a backward through a stale saved
  tensor); ``torch.compile`` functionalizes the op from the ``(a!)`` annotations of its schema.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

_LIB = torch.library.Library("aspd", "FRAGMENT")  # a fragment: the CUDA extension defines aspd::cuda_* beside these


class _NotDifferentiable(torch.autograd.Function):
    """Passes ``out`` through; its backward raises: marks the output of an op without a derivative."""

    @staticmethod
    def forward(ctx, op: str, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.op = op
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"aspd::{ctx.op} is not differentiable: no gradient flows back through it")


def _refusing_grad(name: str, impl: Callable, mutated: Sequence[int]) -> Callable:
    def kernel(*args):
        if mutated:
            torch._C._increment_version([args[i] for i in mutated])
        if not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
            return impl(*args)
        with torch.no_grad():
            outs = impl(*args)
        inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if isinstance(outs, tuple):
            return tuple(_NotDifferentiable.apply(name, o, *inputs) for o in outs)
        return _NotDifferentiable.apply(name, outs, *inputs)

    return kernel


def define(name: str, impl: Callable, fake: Callable, *, mutates_args: Sequence[str] = (),
           autograd: tuple[Callable, Callable] | None = None) -> torch._ops.OpOverload:
    """Register ``aspd::<name>`` with the schema read from ``impl``'s annotations (as ``custom_op`` infers it) and
    return its default overload. ``autograd``: ``(backward, setup_context)`` for a differentiable op, else None."""
    schema = torch.library.infer_schema(impl, mutates_args=tuple(mutates_args))
    _LIB.define(name + schema)
    qualname = f"aspd::{name}"
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if autograd is not None:
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    else:
        params = list(torch._C.parse_schema(qualname + schema).arguments)
        mutated = [i for i, a in enumerate(params) if a.name in mutates_args]
        _LIB.impl(name, _refusing_grad(name, impl, mutated), "CompositeExplicitAutograd")
        _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    return getattr(torch.ops.aspd, name).default
