"""remap_positions and rope_append_kv, triton backend (interpreter on CPU), against the reference.

Positions: every strategy on random layouts and packed batches (empty sequences included), sections longer than a
kernel tile, many branches, ids the kernel cannot hold. Rope: contiguous and paged caches, rot_dim < D, padding
rows, float32 and float16, int64 positions; caches are NaN-poisoned so that the set of written slots must match the
reference exactly, and every other slot must come back unchanged.
"""
import os

# TRITON_INTERPRET: conftest.py sets it to 1 only where there is no GPU; on a GPU the kernels run compiled.

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from kv_helpers import make_cache  # noqa: E402
from layouts import random_batch, random_layout  # noqa: E402

from aspd_kernels import reference as R  # noqa: E402
from aspd_kernels import remap_positions, rope_append_kv, rope_cos_sin_cache  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")
positions_kernel = importlib.import_module("aspd_kernels.triton.remap_positions")
torch_backend = importlib.import_module("aspd_kernels.torch_backend")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"


def positions(seg, br, strategy, cu=None, width=None, **kw):
    cu_dev = None if cu is None else cu.to(DEVICE)
    out = remap_positions(seg.to(DEVICE), br.to(DEVICE), strategy, cu_seqlens=cu_dev, width=width,
                          backend="triton", **kw)
    assert out.dtype == torch.int32 and out.device.type == DEVICE
    return out.cpu()


# ---------------------------------------------------------------- remap_positions

@pytest.mark.parametrize("strategy", R.STRATEGIES)
@pytest.mark.parametrize("seed", range(3))
def test_positions_one_sequence(seed, strategy):
    seg, br = random_layout(seed, max_tokens=300)
    assert torch.equal(positions(seg, br, strategy), R.remap_positions(seg, br, strategy))


@pytest.mark.parametrize("strategy", R.STRATEGIES)
@pytest.mark.parametrize("width", [None, 5])
def test_positions_packed_batch(strategy, width):
    seg, br, cu = random_batch(11, batch=3, max_tokens=150)
    got = positions(seg, br, strategy, cu, width)
    assert torch.equal(got, R.remap_positions(seg, br, strategy, cu_seqlens=cu, width=width))


@pytest.mark.parametrize("strategy", ["same-sequential", "same-max", "fixed-length"])
def test_positions_sections_longer_than_a_tile(strategy):
    """One serial and one interleaved parallel section, each over several tiles: the carried counts matter."""
    lengths = [70, 41, 90, 3]
    order = []
    left = lengths[:]
    while any(left):
        order += [j + 1 for j in range(len(left)) if left[j]]
        left = [max(x - 1, 0) for x in left]
    br = torch.tensor([0] * 150 + order + [0] * 5, dtype=torch.int32)
    seg = torch.tensor([0] * 150 + [1] * len(order) + [2] * 5, dtype=torch.int32)
    assert torch.equal(positions(seg, br, strategy), R.remap_positions(seg, br, strategy))


@pytest.mark.parametrize("strategy", ["same-max", "fixed-length"])
def test_positions_many_branches_and_sparse_segments(strategy):
    k = 200
    br = torch.tensor([0] * 4 + list(range(1, k + 1)) * 2 + [0] * 3, dtype=torch.int32)
    seg = torch.tensor([3] * 4 + [8] * (2 * k) + [9] * 3, dtype=torch.int32)
    assert torch.equal(positions(seg, br, strategy), R.remap_positions(seg, br, strategy))


def test_positions_empty_and_one_token_sequences():
    seg = torch.tensor([0, 0, 1, 1, 5, 0, 2, 2, 2], dtype=torch.int32)
    br = torch.tensor([0, 0, 1, 2, 0, 0, 1, 1, 3], dtype=torch.int32)
    cu = torch.tensor([0, 4, 4, 5, 5, 9], dtype=torch.int32)
    for strategy in R.STRATEGIES:
        got = positions(seg, br, strategy, cu)
        assert torch.equal(got, R.remap_positions(seg, br, strategy, cu_seqlens=cu)), strategy
    assert positions(seg[:0], br[:0], "same-max").numel() == 0


def test_positions_branch_ids_beyond_the_kernel_bound_raise():
    bound = positions_kernel.MAX_BRANCHES
    seg = torch.zeros(3, dtype=torch.int32)
    br = torch.tensor([1, bound, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="branch"):
        positions(seg, br, "same-sequential")
    assert positions(seg, br, "sequential").tolist() == [0, 1, 2]  # needs no ids


# ---------------------------------------------------------------- rope_append_kv

def inv_freq(rot_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)


def rope_case(seed, paged, dtype, d=32, hq=4, hkv=2, lq=5, pos_dtype=torch.int32):
    torch.manual_seed(seed)
    bsz = 3
    cache = make_cache(seed, batch=bsz, hkv=hkv, d=d, dtype=dtype, paged=paged, block_size=16 if seed % 2 else 32,
                       extra=8, max_tokens=60)
    q_seqlens = torch.tensor([lq, 2, 0], dtype=torch.int32)
    after = cache["cache_seqlens"] + q_seqlens  # the new tokens go after the cached ones
    args = dict(
        q=torch.randn(bsz, lq, hq, d).to(dtype), k=torch.randn(bsz, lq, hkv, d).to(dtype),
        v=torch.randn(bsz, lq, hkv, d).to(dtype), positions=torch.randint(0, 200, (bsz, lq)).to(pos_dtype),
        segment=torch.randint(40, 50, (bsz, lq), dtype=torch.int32).sort(dim=1).values,
        branch=torch.randint(1, 70, (bsz, lq), dtype=torch.int32),
        cache_seqlens=after, q_seqlens=q_seqlens, block_table=cache["block_table"],
    )
    caches = {n: cache[n] for n in ("k_cache", "v_cache", "segment", "branch")}
    return args, caches


def call_rope(fn, args, caches, cos_sin, **kw):
    return fn(args["q"], args["k"], args["v"], args["positions"], cos_sin, caches["k_cache"], caches["v_cache"],
              caches["segment"], caches["branch"], args["cache_seqlens"], args["segment"], args["branch"],
              q_seqlens=args["q_seqlens"], block_table=args["block_table"], **kw)


def to_dev(d: dict) -> dict:
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


def rope_vs(ref_fn, args, caches, cos_sin, tol=1e-5, **kw):
    """Run the triton rope on ``caches`` and ``ref_fn`` on copies; assert the rotated q and every cache agree.
    Returns (triton q_rot, triton caches, reference caches), all on the CPU."""
    ref_caches = {n: c.clone() for n, c in caches.items()}
    ref_q = call_rope(ref_fn, args, ref_caches, cos_sin)
    dev_caches = to_dev(caches)
    q_rot = call_rope(rope_append_kv, to_dev(args), dev_caches, cos_sin.to(DEVICE), backend="triton", **kw).cpu()
    torch.testing.assert_close(q_rot, ref_q, atol=tol, rtol=tol)
    got = {n: c.cpu() for n, c in dev_caches.items()}
    for name in got:
        torch.testing.assert_close(got[name], ref_caches[name], atol=tol, rtol=tol, equal_nan=True)
    return q_rot, got, ref_caches


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("rot_dim", [32, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_against_reference(paged, rot_dim, dtype):
    args, caches = rope_case(3 + paged, paged, dtype)
    cos_sin = rope_cos_sin_cache(inv_freq(rot_dim), 256)
    before = {n: c.clone() for n, c in caches.items()}
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    q_rot, got_caches, ref_caches = rope_vs(R.rope_append_kv, args, caches, cos_sin, tol)
    assert q_rot.dtype == dtype
    for name, got in got_caches.items():
        # every slot the reference left alone is bit-identical to before (NaN poison included)
        untouched = (ref_caches[name] == before[name]) | (ref_caches[name] != ref_caches[name])
        same = (got == before[name]) | ((got != got) & (before[name] != before[name]))
        assert same[untouched].all(), f"{name}: a slot outside the new tokens' slots changed"
    if rot_dim < 32:  # features beyond rot_dim pass through
        assert torch.equal(q_rot[..., rot_dim:], args["q"][..., rot_dim:])


def test_rope_int64_positions_and_many_heads():
    args, caches = rope_case(8, True, torch.float32, d=64, hq=8, hkv=1, lq=3, pos_dtype=torch.int64)
    cos_sin = rope_cos_sin_cache(inv_freq(48), 256)
    rope_vs(R.rope_append_kv, args, caches, cos_sin)


@pytest.mark.parametrize("d, rot_dim", [(8, 8), (40, 40), (80, 32), (112, 112)])
def test_rope_head_sizes_that_pad(d, rot_dim):
    """Head sizes that are not powers of two (the kernel pads them to BLOCK_D and masks), with phi-2's partial
    rotary (32 of 80 features rotated): every cache lane outside the new tokens' heads must stay as it was."""
    args, caches = rope_case(20 + d, d % 16 == 0, torch.float32, d=d)
    rope_vs(R.rope_append_kv, args, caches, rope_cos_sin_cache(inv_freq(rot_dim), 256))


@pytest.mark.parametrize("paged", [False, True])
def test_rope_unchecked_bad_values_stay_in_bounds(paged):
    """Positions outside [0, P) are clamped; slots beyond the capacity or before 0 are not written: the triton
    kernel agrees with the torch backend, which applies the same rules."""
    args, caches = rope_case(5, paged, torch.float32)
    cap = (args["block_table"].shape[1] * caches["k_cache"].shape[1]) if paged else caches["k_cache"].shape[1]
    args["positions"][0, 0] = -9
    args["positions"][1, 1] = 10_000
    args["cache_seqlens"][0] = cap + 3  # the last 3 new tokens of sequence 0 fall beyond the capacity
    args["q_seqlens"][1] = 4  # more new tokens than the cache holds before them? slot may go negative
    args["cache_seqlens"][1] = 2
    cos_sin = rope_cos_sin_cache(inv_freq(32), 256)
    rope_vs(torch_backend.rope_append_kv, args, caches, cos_sin, check_values=False)


def test_opcheck_triton_backend():
    seg, br, cu = random_batch(4, batch=2, max_tokens=50)
    for strategy in ("same-sequential", "fixed-length"):
        torch.library.opcheck(torch.ops.aspd.remap_positions.default,
                              (seg.to(DEVICE), br.to(DEVICE), cu.to(DEVICE), strategy, 0, "triton"))
    args, caches = rope_case(6, True, torch.float32, lq=3)
    args, caches = to_dev(args), to_dev(caches)
    cos_sin = rope_cos_sin_cache(inv_freq(32), 256).to(DEVICE)
    torch.library.opcheck(torch.ops.aspd.rope_append_kv.default,
                          (args["q"], args["k"], args["v"], args["positions"], cos_sin, caches["k_cache"],
                           caches["v_cache"], caches["segment"], caches["branch"], args["cache_seqlens"],
                           args["segment"], args["branch"], args["q_seqlens"], args["block_table"], "triton"))


def test_rope_strided_views_of_fused_qkv():
    args, caches = rope_case(12, False, torch.float32, hq=4, hkv=2, lq=4)
    qkv = torch.cat([args["q"], args["k"], args["v"]], dim=2)  # [B, L, Hq + 2 Hkv, D]
    args.update(q=qkv[:, :, :4], k=qkv[:, :, 4:6], v=qkv[:, :, 6:])
    cos_sin = rope_cos_sin_cache(inv_freq(32), 256)
    rope_vs(R.rope_append_kv, args, caches, cos_sin)
