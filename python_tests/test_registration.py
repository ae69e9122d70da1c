"""What the lean registration (``aspd_kernels/_registration.py``) promises beside opcheck: the ops without a
derivative refuse a backward by name, the torch backend records no autograd graph, the mutating op bumps the
version counters of what it writes, and the differentiable op refuses a double backward."""
import types

import pytest
import torch
from test_opcheck import attention_args, kv_args, rope_args

from aspd_kernels import _dispatch, branch_attention, branch_attention_with_kvcache, rope_append_kv


def _decode(q, c=None):
    c = c or kv_args()[0]
    return branch_attention_with_kvcache(q, c["k_cache"], c["v_cache"], c["cache_seqlens"], c["segment"], c["branch"])


def test_decode_output_refuses_backward_by_name():
    q = torch.randn(2, 3, 4, 16, requires_grad=True)
    out = _decode(q)
    assert out.requires_grad
    # the torch backend ran under no_grad: the only node is the refusing one, with q as its input
    assert type(out.grad_fn).__name__ == "_NotDifferentiableBackward"
    with pytest.raises(RuntimeError, match="aspd::branch_attention_with_kvcache is not differentiable"):
        out.sum().backward()


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_decode_output_plain_without_grad_mode(context):
    q = torch.randn(2, 3, 4, 16, requires_grad=True)
    c = kv_args()[0]
    with context():
        out = _decode(q, c)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, _decode(q.detach(), c))


@pytest.mark.parametrize("writes", ["torch backend", "raw pointers"])
def test_rope_append_kv_bumps_versions_and_refuses_backward(writes, monkeypatch):
    """The Triton and CUDA kernels write the caches through raw pointers, invisible to autograd: the registration
    bumps the counters itself (stood in for here by a backend that writes nothing)."""
    if writes == "raw pointers":
        _dispatch._load("torch")
        monkeypatch.setitem(_dispatch._loaded, "torch", types.SimpleNamespace(
            rope_append_kv=lambda q, *rest: torch.empty_like(q)))
    q, k, v, pos, csc, c, after, ids = rope_args()
    caches = [c["k_cache"], c["v_cache"], c["segment"], c["branch"]]
    before = [t._version for t in caches]
    q = q.requires_grad_()
    q_rot = rope_append_kv(q, k, v, pos, csc, *caches, after, ids, ids)
    assert all(t._version > b for t, b in zip(caches, before))
    with pytest.raises(RuntimeError, match="aspd::rope_append_kv is not differentiable"):
        q_rot.sum().backward()


def test_rope_append_kv_invalidates_a_saved_cache():
    """A cache saved for backward and then written by the op: autograd refuses the stale value, as it does after
    any in-place op."""
    q, k, v, pos, csc, c, after, ids = rope_args()
    w = torch.ones((), requires_grad=True)
    loss = (c["k_cache"] * w).sum()  # saves k_cache
    rope_append_kv(q, k, v, pos, csc, c["k_cache"], c["v_cache"], c["segment"], c["branch"], after, ids, ids)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_branch_attention_first_order_and_double_backward_refused():
    q, k, v, seg, br, cu_q, cu_k, mq, mk = attention_args()
    out = branch_attention(q, k, v, seg, br, cu_q, cu_k, mq, mk)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    assert dq.requires_grad
    with pytest.raises(RuntimeError, match="aspd::branch_attention_backward is not differentiable"):
        dq.sum().backward()

