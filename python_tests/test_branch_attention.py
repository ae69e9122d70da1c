"""branch_attention (torch backend, the CPU path) against the dense float64 reference on random layouts."""
import pytest
import torch
from layouts import random_batch, random_layout

import aspd_kernels.torch_backend.attention as tb
import aspd_kernels.torch_backend.sdpa_tiles as st
from aspd_kernels import branch_attention, reference as R

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5)}


def make_inputs(seg, cu_k, hq, hkv, d, dtype, q_lens=None, requires_grad=False):
    """Packed q/k/v for key layout ``seg`` and ``cu_k``; ``q_lens`` (default: all keys) queries per sequence."""
    total_k = seg.numel()
    lens_k = cu_k.diff().tolist()
    q_lens = q_lens or lens_k
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(total_k, hkv, d, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(total_k, hkv, d, dtype=dtype, requires_grad=requires_grad)
    return q, k, v, cu_q, max(q_lens), max(lens_k)


def reference(q, k, v, seg, br, cu_q, cu_k):
    args = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = R.branch_attention(*args, seg, br, cu_q, cu_k)
    return args, out, lse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("seed", range(3))
def test_forward_backward_random_batch(seed, hq, hkv, dtype):
    seg, br, cu = random_batch(seed, batch=3, max_tokens=130)
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, hq, hkv, 24, dtype, requires_grad=True)
    out, lse = branch_attention(q, k, v, seg, br, cu_q, cu, mq, mk, return_lse=True)
    (rq, rk, rv), rout, rlse = reference(q, k, v, seg, br, cu_q, cu)
    torch.testing.assert_close(out.double(), rout, **TOL[dtype])
    torch.testing.assert_close(lse, rlse, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(rout)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    rgrads = torch.autograd.grad(rout, (rq, rk, rv), dout)
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g.double(), rg, **TOL[dtype])


@pytest.mark.parametrize("storage", ["contiguous", "interleaved", "mixed"])
def test_queries_bottom_right_aligned(storage):
    seg, br, cu = random_batch(7, batch=2, max_tokens=150, storage=storage)
    q_lens = [1, 17]  # a decode step and a chunk
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 4, 2, 16, torch.float64, q_lens=q_lens)
    out = branch_attention(q, k, v, seg, br, cu_q, cu, mq, mk)
    torch.testing.assert_close(out, reference(q, k, v, seg, br, cu_q, cu)[1], **TOL[torch.float64])


def test_empty_sequence_in_batch():
    s1, b1 = random_layout(3, 60)
    seg = torch.cat([s1, s1])
    br = torch.cat([b1, b1])
    n = s1.numel()
    cu = torch.tensor([0, n, n, 2 * n], dtype=torch.int32)  # sequence 1 is empty
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 2, 8, torch.float64)
    out = branch_attention(q, k, v, seg, br, cu_q, cu, mq, mk)
    torch.testing.assert_close(out, reference(q, k, v, seg, br, cu_q, cu)[1])


def test_gradient_of_lse():
    seg, br = random_layout(11, 80)
    cu = torch.tensor([0, seg.numel()], dtype=torch.int32)
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 1, 8, torch.float64, requires_grad=True)
    _, lse = branch_attention(q, k, v, seg, br, cu_q, cu, mq, mk, return_lse=True)
    w = torch.randn_like(lse)
    g = torch.autograd.grad((lse * w).sum(), q)[0]
    # lse is float32 in the reference too; compare against float64 autograd of a logsumexp written out
    qq = q.detach().requires_grad_()
    full = R.dense_mask(seg, br)
    s = torch.einsum("qhd,khd->hqk", qq, k.detach().repeat_interleave(2, 1)) / 8 ** 0.5
    rl = torch.logsumexp(s.masked_fill(~full[None], float("-inf")), -1)
    rg = torch.autograd.grad((rl * w.double()).sum(), qq)[0]
    torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k_branches", [1, 3, 16, 64])
def test_branch_in_one_sequence_equals_prefix_plus_branch_alone(k_branches):
    """SPEC section 3's identity at the attention level: with same-sequential positions, branch j of one sequence
    sees exactly what ``prefix + branch j`` sees alone, so its outputs are equal."""
    g = torch.Generator().manual_seed(k_branches)
    prefix, d = 19, 16
    lengths = torch.randint(1, 9, (k_branches,), generator=g).tolist()
    sections = [("serial", prefix), ("parallel", lengths)]
    from aspd_kernels import BranchLayout

    for storage in ("contiguous", "interleaved"):
        lay = BranchLayout.from_sections(sections, storage=storage)
        seg, br = lay.segment, lay.branch
        n = seg.numel()
        # token features depend only on (branch, rank in branch): the same token in both runs
        feats = torch.randn(k_branches + 1, max(prefix, max(lengths)), 3, 2, d, dtype=torch.float64, generator=g)
        pos = lay.positions("same-sequential")
        rank = torch.where(br == 0, pos, pos - prefix)
        qkv = feats[br.long(), rank.long()]  # [N, 3, H, D]
        cu = torch.tensor([0, n], dtype=torch.int32)
        out = branch_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], seg, br, cu, cu, n, n)
        for j in range(1, k_branches + 1):
            alone = torch.cat([feats[0, :prefix], feats[j, :lengths[j - 1]]])
            m = alone.shape[0]
            z = torch.zeros(m, dtype=torch.int32)
            cu1 = torch.tensor([0, m], dtype=torch.int32)
            ref = branch_attention(alone[:, 0], alone[:, 1], alone[:, 2], z, z, cu1, cu1, m, m)
            torch.testing.assert_close(out[br == j], ref[prefix:], atol=1e-12, rtol=1e-12)


def test_broken_mask_is_caught(monkeypatch):
    """The comparison must fail on a real bug: a mask that forgets the branch rule (siblings visible)."""
    seg, br, cu = random_batch(2, batch=1, max_tokens=120, storage="interleaved")
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 2, 8, torch.float64)
    good = branch_attention(q, k, v, seg, br, cu_q, cu, mq, mk)
    ref = reference(q, k, v, seg, br, cu_q, cu)[1]
    torch.testing.assert_close(good, ref)

    def causal_only(q_index, q_seg, q_br, k_start, k_seg, k_br):
        k_index = torch.arange(k_start, k_start + k_seg.shape[0])
        return k_index[None, :] <= q_index[:, None]

    monkeypatch.setattr(tb, "visible", causal_only)  # the online-softmax tiles (other devices)
    monkeypatch.setattr(st, "visible", causal_only)  # SDPA per query tile (the CPU path)
    bad = branch_attention(q, k, v, seg, br, cu_q, cu, mq, mk)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad, ref, **TOL[torch.float32])


def test_long_sequence_memory_is_tiled():
    """A 32k-token call must not allocate an N x N mask: the tile bounds the score buffer."""
    n, h = 32768, 32
    bq = tb._block_q(h)
    assert bq * tb._BLOCK_K * h <= tb._TILE_ELEMENTS
    assert bq * tb._BLOCK_K < n * n // 1000
    # the CPU path: one [tile, span] additive mask at a time, the span at most n
    spans = [(qs.stop - qs.start) * ke for qs, ke in st._tiles(torch.arange(n), n)]
    assert max(spans) <= st.MASK_ELEMENTS and max(spans) < n * n // 100
    assert sum(qs.stop - qs.start for qs, _ in st._tiles(torch.arange(n), n)) == n
