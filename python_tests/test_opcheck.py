"""Every op passes torch.library.opcheck (schema, fake kernel, autograd registration) and runs inside
torch.compile(fullgraph=True)."""
import pytest
import torch
from kv_helpers import make_cache
from layouts import random_batch

import aspd_kernels
from aspd_kernels import (branch_attention, branch_attention_with_kvcache, remap_positions, rope_append_kv,
                          rope_cos_sin_cache)

OPS = ["branch_attention", "branch_attention_backward", "branch_attention_with_kvcache", "remap_positions",
       "rope_append_kv"]


def test_ops_registered_under_torch_ops_aspd():
    for name in OPS:
        assert hasattr(torch.ops.aspd, name), name
    for name in ("branch_attention", "branch_attention_with_kvcache", "remap_positions", "rope_append_kv",
                 "BranchLayout"):
        assert hasattr(aspd_kernels, name)


def attention_args(dtype=torch.float32, requires_grad=True):
    seg, br, cu = random_batch(1, batch=2, max_tokens=60)
    n = seg.numel()
    q = torch.randn(n, 4, 16, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(n, 2, 16, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(n, 2, 16, dtype=dtype, requires_grad=requires_grad)
    m = int(cu.diff().max())
    return q, k, v, seg, br, cu, cu, m, m


def kv_args():
    c = make_cache(2, batch=2, hkv=2, d=16, dtype=torch.float32, poison=False)
    q = torch.randn(2, 3, 4, 16)
    return c, q


def rope_args():
    c = make_cache(3, batch=2, hkv=2, d=16, dtype=torch.float32, extra=6, poison=False)
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 2, 16), torch.randn(2, 3, 2, 16)
    pos = torch.randint(0, 50, (2, 3), dtype=torch.int32)
    ids = torch.ones(2, 3, dtype=torch.int32) * 99
    after = c["cache_seqlens"] + 3
    csc = rope_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, 16, 2) / 16), 64)
    return q, k, v, pos, csc, c, after, ids


def test_opcheck_branch_attention():
    q, k, v, seg, br, cu_q, cu_k, mq, mk = attention_args()
    torch.library.opcheck(torch.ops.aspd.branch_attention.default,
                          (q, k, v, seg, br, cu_q, cu_k, mq, mk, 0.25, "torch"))
    out, lse = torch.ops.aspd.branch_attention(q, k, v, seg, br, cu_q, cu_k, mq, mk, 0.25, "torch")
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.aspd.branch_attention_backward.default,
                          (dout, None, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), seg, br, cu_q,
                           cu_k, mq, mk, 0.25, "torch"))


def test_opcheck_kvcache():
    c, q = kv_args()
    qs = torch.tensor([3, 1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.aspd.branch_attention_with_kvcache.default,
                          (q, c["k_cache"], c["v_cache"], c["cache_seqlens"], c["segment"], c["branch"], qs, None,
                           0.25, "torch"))


def test_opcheck_remap_positions():
    seg, br, cu = random_batch(4, batch=2, max_tokens=50)
    for strategy in ("same-sequential", "fixed-length"):
        torch.library.opcheck(torch.ops.aspd.remap_positions.default, (seg, br, cu, strategy, 0, "torch"))


def test_opcheck_rope_append_kv():
    q, k, v, pos, csc, c, after, ids = rope_args()
    qs = torch.tensor([3, 2], dtype=torch.int32)
    torch.library.opcheck(torch.ops.aspd.rope_append_kv.default,
                          (q, k, v, pos, csc, c["k_cache"], c["v_cache"], c["segment"], c["branch"], after, ids, ids,
                           qs, None, "torch"))


def test_compile_fullgraph_over_all_ops():
    """One compiled function calls every op; value checks switch themselves off while compiling."""
    torch._dynamo.reset()
    q, k, v, seg, br, cu_q, cu_k, mq, mk = attention_args(requires_grad=False)
    c, qd = kv_args()
    rq, rk, rv, pos, csc, rc, after, ids = rope_args()

    def step(q, k, v):
        out = branch_attention(q, k, v, seg, br, cu_q, cu_k, mq, mk)
        positions = remap_positions(seg, br, cu_seqlens=cu_q)
        q_rot = rope_append_kv(rq, rk, rv, pos, csc, rc["k_cache"], rc["v_cache"], rc["segment"], rc["branch"],
                               after, ids, ids)
        dec = branch_attention_with_kvcache(qd, c["k_cache"], c["v_cache"], c["cache_seqlens"], c["segment"],
                                            c["branch"])
        return out * 2, positions + 1, q_rot.sum(), dec.sum()

    eager = step(q, k, v)
    rc_snapshot = rc["k_cache"].clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v)
    for e, g in zip(eager, compiled):
        torch.testing.assert_close(e, g)
    torch.testing.assert_close(rc["k_cache"], rc_snapshot)  # same values rewritten


def test_compile_fullgraph_backward():
    torch._dynamo.reset()
    q, k, v, seg, br, cu_q, cu_k, mq, mk = attention_args()

    def loss(q, k, v):
        return branch_attention(q, k, v, seg, br, cu_q, cu_k, mq, mk).square().sum()

    g_eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    g_comp = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    for a, b in zip(g_eager, g_comp):
        torch.testing.assert_close(a, b)
