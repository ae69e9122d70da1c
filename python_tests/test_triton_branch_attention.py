"""Triton branch_attention (forward and backward) against the float64 reference, and its block skipping.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors (set here before triton is imported; the torch-backend tests of
the same pytest process do not look at it), or on a GPU when the variable is set to 0 and CUDA is present.
"""
import os

# TRITON_INTERPRET: conftest.py sets it to 1 only where there is no GPU; on a GPU the kernels run compiled.

import pytest  # noqa: E402
import torch  # noqa: E402
from layouts import layout_ids, random_batch, random_layout  # noqa: E402

import aspd_kernels.triton.branch_attention as tba  # noqa: E402
from aspd_kernels import branch_attention, reference as R  # noqa: E402
from aspd_kernels._dispatch import triton_interpret  # noqa: E402
from aspd_kernels.triton.tile_ranges import tile_classes, tile_lists  # noqa: E402

INTERPRET = triton_interpret()
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                       reason="TRITON_INTERPRET=0 and no CUDA device: the triton kernels cannot run"),
    pytest.mark.skipif(INTERPRET and type(tba.fwd_kernel).__name__ != "InterpretedFunction",
                       reason="aspd_kernels.triton was imported before TRITON_INTERPRET=1 was set"),
]

# fp32: the kernels accumulate in fp32, so only summation order differs. fp16: the stored outputs are rounded.
TOL = {
    torch.float32: dict(out=dict(atol=2e-4, rtol=2e-4), grad=dict(atol=5e-4, rtol=1e-3)),
    torch.float16: dict(out=dict(atol=2e-3, rtol=2e-3), grad=dict(atol=8e-3, rtol=8e-3)),
}
LSE_TOL = dict(atol=2e-4, rtol=2e-4)
SMALL = tba.Config(32, 32, 4, 1)  # more tiles per sequence: every class (skip/masked/full) shows up


def make_inputs(seg, cu_k, hq, hkv, d, dtype, q_lens=None):
    lens_k = cu_k.diff().tolist()
    q_lens = lens_k if q_lens is None else q_lens
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, dtype=dtype, device=DEVICE)
    k = torch.randn(seg.numel(), hkv, d, dtype=dtype, device=DEVICE)
    v = torch.randn(seg.numel(), hkv, d, dtype=dtype, device=DEVICE)
    return q, k, v, cu_q.to(DEVICE), max(q_lens + [0]), max(lens_k + [0])


def reference(q, k, v, seg, br, cu_q, cu_k, dout, dlse=None):
    """float64 out, lse and (dq, dk, dv) of ``sum(out * dout) + sum(lse * dlse)``."""
    args = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out, lse = R.branch_attention(*args, seg.cpu(), br.cpu(), cu_q.cpu(), cu_k.cpu())
    loss = (out * dout.cpu().double()).sum()
    if dlse is not None:
        loss = loss + (lse.double() * dlse.cpu().double()).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, args)


def assert_close(got, want, tol, what):
    torch.testing.assert_close(got.cpu().double(), want, **tol, msg=lambda m: f"{what}: {m}")


def run_direct(q, k, v, seg, br, cu_q, cu_k, mq, mk, dout, dlse=None, config=None):
    """The backend functions on NaN-poisoned output buffers: every element the contract defines must be written."""
    scale = q.shape[-1] ** -0.5
    nan = float("nan")
    out = torch.full_like(q, nan)
    lse = torch.full((q.shape[1], q.shape[0]), nan, device=q.device)
    tba.branch_attention_fwd(q, k, v, seg, br, cu_q, cu_k, mq, mk, scale, out=out, lse=lse, config=config)
    grads = [torch.full_like(t, nan) for t in (q, k, v)]
    tba.branch_attention_bwd(dout, dlse, q, k, v, out, lse, seg, br, cu_q, cu_k, mq, mk, scale,
                             dq=grads[0], dk=grads[1], dv=grads[2], config=config)
    return out, lse, grads


def check_all(q, k, v, seg, br, cu_q, cu_k, mq, mk, dtype, config=None, with_dlse=True):
    dout = torch.randn_like(q)
    dlse = torch.randn(q.shape[1], q.shape[0], device=q.device) if with_dlse else None
    out, lse, grads = run_direct(q, k, v, seg, br, cu_q, cu_k, mq, mk, dout, dlse, config)
    rout, rlse, rgrads = reference(q, k, v, seg, br, cu_q, cu_k, dout, dlse)
    assert_close(out, rout, TOL[dtype]["out"], "out")
    torch.testing.assert_close(lse.cpu(), rlse, **LSE_TOL)
    for name, g, rg in zip("dq dk dv".split(), grads, rgrads):
        assert_close(g, rg, TOL[dtype]["grad"], name)


def ids(seg, br, cu):
    return seg.to(DEVICE), br.to(DEVICE), cu.to(DEVICE)


@pytest.mark.parametrize("seed,hq,hkv,dtype,d", [
    (0, 2, 2, torch.float32, 32),
    (1, 4, 2, torch.float16, 64),
    (2, 4, 1, torch.float32, 32),
    (3, 2, 1, torch.float16, 32),
])
def test_op_random_batch(seed, hq, hkv, dtype, d):
    """Through the public op and autograd: out, lse, and gradients of a loss on both."""
    seg, br, cu = ids(*random_batch(100 + seed, batch=3, max_tokens=60))
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, hq, hkv, d, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = branch_attention(q, k, v, seg, br, cu_q, cu, mq, mk, return_lse=True, backend="triton")
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if seed % 2 == 0 else torch.zeros_like(lse)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    rout, rlse, rgrads = reference(q, k, v, seg, br, cu_q, cu, dout, dlse)
    assert_close(out, rout, TOL[dtype]["out"], "out")
    torch.testing.assert_close(lse.cpu(), rlse, **LSE_TOL)
    for name, g, rg in zip("dq dk dv".split(), grads, rgrads):
        assert_close(g, rg, TOL[dtype]["grad"], name)


def test_fewer_queries_than_keys():
    """Bottom-right alignment on a contiguous, an interleaved and a mixed sequence: a decode step, a chunk that does
    not start on a tile boundary, a whole sequence; small tiles so that skip, masked and full tiles all occur."""
    layouts = [random_layout(7 + i, 80, storage) for i, storage in enumerate(["contiguous", "interleaved", "mixed"])]
    seg, br = torch.cat([s for s, _ in layouts]), torch.cat([b for _, b in layouts])
    cu = torch.tensor([0] + torch.tensor([s.numel() for s, _ in layouts]).cumsum(0).tolist(), dtype=torch.int32)
    seg, br, cu = ids(seg, br, cu)
    lens = cu.diff().tolist()
    q_lens = [1, min(37, lens[1]), lens[2]]
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 1, 32, torch.float32, q_lens=q_lens)
    check_all(q, k, v, seg, br, cu_q, cu, mq, mk, torch.float32, config=SMALL)


def test_empty_sequences_and_queryless_keys():
    """An empty sequence, a sequence with keys but no query (its dk, dv are 0), and an empty last sequence."""
    s1, b1 = random_layout(3, 60)
    s2, b2 = random_layout(4, 45)
    seg, br = torch.cat([s1, s2, s1]), torch.cat([b1, b2, b1])
    n1, n2 = s1.numel(), s2.numel()
    cu = torch.tensor([0, n1, n1, n1 + n2, 2 * n1 + n2, 2 * n1 + n2], dtype=torch.int32)
    seg, br, cu = ids(seg, br, cu)
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 1, 32, torch.float32, q_lens=[n1, 0, 0, 5, 0])
    check_all(q, k, v, seg, br, cu_q, cu, mq, mk, torch.float32)


def test_no_queries_at_all():
    seg, br, cu = ids(*random_batch(5, batch=2, max_tokens=40))
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 2, 32, torch.float32, q_lens=[0, 0])
    check_all(q, k, v, seg, br, cu_q, cu, mq, mk, torch.float32)


def test_head_size_not_a_power_of_two():
    """D = 96: the head dimension is padded to 128 lanes and masked."""
    seg, br, cu = ids(*random_batch(21, batch=2, max_tokens=50))
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 1, 96, torch.float32)
    check_all(q, k, v, seg, br, cu_q, cu, mq, mk, torch.float32)


def test_float64_rejected():
    seg, br, cu = random_batch(1, batch=1, max_tokens=20)
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, 2, 2, 32, torch.float64)
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        tba.branch_attention_fwd(q, k, v, seg.to(DEVICE), br.to(DEVICE), cu_q, cu.to(DEVICE), mq, mk, 0.1)


# ----------------------------------------------------------------------------------------------------------------
# Block skipping


def _dense_tiles(seg, br, cu_q, cu_k, bm, bn):
    """(b, m, n, visible pairs [bm', bn']) for every (query tile, key tile) of every sequence, from dense_mask."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(ck) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        mask = R.dense_mask(seg[ck[b]:ck[b + 1]].cpu(), br[ck[b]:ck[b + 1]].cpu())[lk - lq:]  # query rows
        for m in range(0, lq, bm):
            for n in range(0, lk, bn):
                yield b, m // bm, n // bn, mask[m:m + bm, n:n + bn]


def _check_classes(seg, br, cu_q, cu_k, mq, mk, bm, bn):
    classes = tile_classes(seg, br, cu_q, cu_k, int(cu_q[-1]), mq, mk, bm, bn).cpu()
    seen = torch.zeros_like(classes, dtype=torch.bool)
    for b, m, n, vis in _dense_tiles(seg, br, cu_q, cu_k, bm, bn):
        c = int(classes[b, m, n])
        seen[b, m, n] = True
        assert c in (0, 1, 2), (b, m, n, c)
        if c == 0:
            assert not bool(vis.any()), f"tile ({b}, {m}, {n}) classified skip but has visible pairs"
        if c == 2:
            assert bool(vis.all()) and vis.shape == (bm, bn), f"tile ({b}, {m}, {n}) classified full but is not"
    assert bool((classes[~seen] == -1).all()), "a tile that does not exist was classified"
    return classes


@pytest.mark.parametrize("storage", ["contiguous", "interleaved", "mixed"])
@pytest.mark.parametrize("bm,bn", [(32, 32), (16, 32), (64, 16)])
def test_tile_classification_is_exact(storage, bm, bn):
    """Skip means no visible pair, full means every pair visible, against the dense mask, with len_q < len_k."""
    seg, br, cu = ids(*random_batch(11, batch=3, max_tokens=160, storage=storage))
    lens = cu.diff().tolist()
    q_lens = [lens[0], max(lens[1] - 29, 0), lens[2] // 2]
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    _check_classes(seg, br, cu_q, cu, max(q_lens), max(lens), bm, bn)


@pytest.mark.parametrize("key_major", [False, True])
def test_tile_lists_match_classes(key_major):
    """The lists the compute kernels loop over hold exactly the full tiles (front) and the masked tiles (back) of
    ``tile_classes``, query-major (forward, dQ) and key-major (dK/dV)."""
    seg, br, cu = ids(*random_batch(12, batch=3, max_tokens=160, storage="mixed"))
    lens = cu.diff().tolist()
    q_lens = [lens[0], max(lens[1] - 45, 0), lens[2] // 3]
    cu_q = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    mq, mk, bm, bn = max(q_lens), max(lens), 32, 16
    classes = tile_classes(seg, br, cu_q, cu, int(cu_q[-1]), mq, mk, bm, bn).cpu()
    lists, counts = (t.cpu() for t in tile_lists(seg, br, cu_q, cu, int(cu_q[-1]), mq, mk, bm, bn, key_major))
    if key_major:
        classes = classes.transpose(1, 2)  # [B, key tile, query tile]
    for b in range(classes.shape[0]):
        for t in range(classes.shape[1]):
            if int(classes[b, t].max()) < 0:
                continue  # no such tile
            n_full, n_masked = counts[b, t].tolist()
            row = classes[b, t]
            assert sorted(lists[b, t, :n_full].tolist()) == (row == 2).nonzero().flatten().tolist()
            masked = lists[b, t, lists.shape[2] - n_masked:].tolist()
            assert sorted(masked) == (row == 1).nonzero().flatten().tolist()


def _long_branches():
    """Serial prompt, three long contiguous branches, serial suffix: the ASPD training layout."""
    seg, br = layout_ids([("serial", 40), ("parallel", [70, 90, 64]), ("serial", 30)], "contiguous", None)
    seg, br = torch.tensor(seg, dtype=torch.int32), torch.tensor(br, dtype=torch.int32)
    return ids(seg, br, torch.tensor([0, seg.numel()], dtype=torch.int32))


def test_contiguous_branches_skip_sibling_tiles():
    seg, br, cu = _long_branches()
    n = seg.numel()
    classes = _check_classes(seg, br, cu, cu, n, n, 32, 32)[0]
    tiles = torch.arange(classes.shape[0])
    behind = tiles[None, :] <= tiles[:, None]  # key tile not causally ahead of the query tile
    sibling_skips = int(((classes == 0) & behind).sum())
    # 32-slot tiles: prompt 0-39, branch 1 40-109, branch 2 110-199, branch 3 200-263, suffix 264-293. Query tiles of
    # branches (4, 5: branch 2; 6: branches 2-3; 7: branch 3) against key tiles of earlier siblings only (2: branch 1;
    # 3: branches 1-2; 4, 5: branch 2) hold no visible pair and must be skipped; no other tile may be.
    for m, n in [(4, 2), (5, 2), (6, 2), (7, 2), (7, 3), (7, 4), (7, 5)]:
        assert int(classes[m, n]) == 0, f"sibling tile ({m}, {n}) not skipped:\n{classes}"
    assert sibling_skips == 7, classes
    # the prompt's first tile, seen from every later whole tile of a later section, needs no mask
    assert bool((classes[2:9, 0] == 2).all()), f"prompt tiles not full:\n{classes}"


def test_kernel_visits_follow_classification():
    """The forward kernel counts its (query tile, key tile, head) visits per class: they match ``tile_classes``
    over the causal range, so the skipping really happens in the kernel; the result stays exact."""
    seg, br, cu = _long_branches()
    n = seg.numel()
    hq = 2
    q, k, v, cu_q, mq, mk = make_inputs(seg, cu, hq, 1, 32, torch.float32)
    stats = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    out, lse = tba.branch_attention_fwd(q, k, v, seg, br, cu_q, cu, mq, mk, 32 ** -0.5, config=SMALL, stats=stats)
    classes = tile_classes(seg, br, cu_q, cu, n, n, n, 32, 32)[0].cpu()
    tiles = torch.arange(classes.shape[0])
    visited = classes[tiles[None, :] <= tiles[:, None]]  # the kernel stops at the causal limit
    want = [hq * int((visited == c).sum()) for c in range(3)]
    assert stats.tolist() == want
    assert want[0] > 0 and want[2] > 0
    check_all(q, k, v, seg, br, cu_q, cu, mq, mk, torch.float32, config=SMALL)
