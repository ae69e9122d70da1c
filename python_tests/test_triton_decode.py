"""branch_attention_with_kvcache, triton backend (interpreter on CPU), against the dense float64 reference.

Random branch layouts, ragged cache lengths and new-token counts (one sequence with none), 1..64 new tokens, GQA
1/2/4, contiguous and paged caches (shuffled block tables, block sizes 16 and 32), float32 and float16, forced
split-KV. Cache slots beyond ``cache_seqlens`` hold NaN, so a kernel that reads one returns NaN.
"""
import os

# TRITON_INTERPRET: conftest.py sets it to 1 only where there is no GPU; on a GPU the kernels run compiled.

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from kv_helpers import make_cache  # noqa: E402

from aspd_kernels import branch_attention_with_kvcache  # noqa: E402
from aspd_kernels import reference as R  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")
kernel = importlib.import_module("aspd_kernels.triton.branch_attention_with_kvcache")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def to_dev(cache: dict) -> dict:
    out = {}
    for key, val in cache.items():
        if isinstance(val, torch.Tensor):
            out[key] = val.to(DEVICE)
        elif isinstance(val, tuple):
            out[key] = tuple(t.to(DEVICE) for t in val)
        else:
            out[key] = val
    return out


def reference(cache: dict, q: torch.Tensor, q_seqlens: torch.Tensor, cache_seqlens=None) -> torch.Tensor:
    k, v, seg, br = cache["logical"]
    n = cache["cache_seqlens"] if cache_seqlens is None else cache_seqlens
    return R.branch_attention_with_kvcache(q.double(), k.double(), v.double(), n, seg, br, q_seqlens=q_seqlens)


def run(cache: dict, q: torch.Tensor, q_seqlens: torch.Tensor, num_splits=None, cache_seqlens=None):
    n = cache["cache_seqlens"] if cache_seqlens is None else cache_seqlens
    if num_splits is None:  # the public op: checks, dispatch, custom op
        return branch_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], n, cache["segment"],
                                             cache["branch"], q_seqlens=q_seqlens, block_table=cache["block_table"],
                                             backend="triton")
    return kernel.branch_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], n, cache["segment"],
                                                cache["branch"], q_seqlens, cache["block_table"],
                                                q.shape[-1] ** -0.5, num_splits=num_splits)


def new_tokens(lens: torch.Tensor, lq: int) -> torch.Tensor:
    """Ragged counts: the full step, about half of it, and none."""
    want = torch.tensor([lq, max(lq // 2, 1), 0], dtype=torch.int32, device=lens.device)[: lens.numel()]
    return torch.minimum(want, lens)


def check(cache, q, q_seqlens, dtype, **kw):
    out = run(cache, q, q_seqlens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), "a poisoned (NaN) slot beyond cache_seqlens was read"
    for b in range(q.shape[0]):
        assert (out[b, int(q_seqlens[b]):] == 0).all(), "padding rows must be zero"
    torch.testing.assert_close(out.double().cpu(), reference(cache, q, q_seqlens).cpu(), atol=TOL[dtype],
                               rtol=TOL[dtype])
    return out


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 2)])
@pytest.mark.parametrize("lq", [1, 2, 7, 16, 64])
def test_decode_float32(lq, hq, hkv, paged):
    cache = to_dev(make_cache(lq * 13 + hq, batch=3, hkv=hkv, d=32, dtype=torch.float32, paged=paged,
                              block_size=16 if lq % 2 else 32, max_tokens=260))
    q = torch.randn(3, lq, hq, 32, device=DEVICE)
    check(cache, q, new_tokens(cache["cache_seqlens"], lq), torch.float32)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("lq", [1, 16, 64])
def test_decode_float16(lq, paged):
    cache = to_dev(make_cache(lq + 5, batch=3, hkv=1, d=64, dtype=torch.float16, paged=paged, block_size=32,
                              max_tokens=300))
    q = torch.randn(3, lq, 4, 64, device=DEVICE).half()
    check(cache, q, new_tokens(cache["cache_seqlens"], lq), torch.float16)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_kv(splits, paged):
    """Forced splits: some cover nothing for the shorter sequences, and the LSE merge must ignore them."""
    cache = to_dev(make_cache(40 + splits, batch=3, hkv=2, d=32, dtype=torch.float32, paged=paged, block_size=16,
                              max_tokens=400))
    q = torch.randn(3, 7, 4, 32, device=DEVICE)
    q_seqlens = new_tokens(cache["cache_seqlens"], 7)
    single = check(cache, q, q_seqlens, torch.float32, num_splits=1)
    split = check(cache, q, q_seqlens, torch.float32, num_splits=splits)
    torch.testing.assert_close(split, single, atol=1e-5, rtol=1e-5)


def test_many_rows_tile_over_the_grid():
    """64 new tokens x G = 4 = 256 rows: more than one row tile per (sequence, KV head), with splits."""
    cache = to_dev(make_cache(77, batch=2, hkv=1, d=32, dtype=torch.float32, max_tokens=200))
    q = torch.randn(2, 64, 4, 32, device=DEVICE)
    q_seqlens = torch.minimum(torch.tensor([64, 33], dtype=torch.int32), cache["cache_seqlens"].cpu()).to(DEVICE)
    check(cache, q, q_seqlens, torch.float32, num_splits=3)


def test_head_dim_96_pads_to_128():
    cache = to_dev(make_cache(9, batch=2, hkv=2, d=96, dtype=torch.float32, paged=True, block_size=16,
                              max_tokens=120))
    q = torch.randn(2, 3, 4, 96, device=DEVICE)
    check(cache, q, new_tokens(cache["cache_seqlens"], 3), torch.float32)


def test_default_split_heuristic_depends_on_shapes_only():
    dev = torch.device(DEVICE)
    assert kernel.num_splits_for(1, 1, 1, 100, dev) == 1  # short cache: never split below _MIN_SPLIT_SLOTS
    many = kernel.num_splits_for(1, 1, 1, 1 << 16, dev)
    assert 1 < many <= kernel._MAX_SPLITS
    assert kernel.num_splits_for(64, 8, 4, 1 << 16, dev) == 1  # enough programs to fill the device


@pytest.mark.parametrize("programs, capacity, want", [
    (8, 32768, 15),    # K = 1 and 16 at Hkv = 8: 120 CTAs, 0.91 of a wave (16 splits were the H100 probe's best)
    (16, 32768, 8),    # K = 64, 128-row tiles at Hkv = 8: 128 CTAs
    (1, 32768, 57),    # one program: 64 is the cap; 55 and 56 split 512 tiles as 54 does (10 tiles each)
    (8, 1000, 3),      # short caches stay at >= _MIN_SPLIT_SLOTS per split
    (106, 32768, 1),   # 80% of the SMs already busy: no split
    (100, 32768, 5),   # 0.76 of a wave unsplit; 5 splits fill 3.79 of 4 waves
])
def test_split_rule_is_fa3s(programs, capacity, want):
    """FA3's num_splits_heuristic on 132 SMs (H100/H200): the fewest eligible splits within 0.85 of the best wave
    efficiency."""
    assert kernel.splits_for(programs, 132, capacity) == want


@pytest.mark.parametrize("paged", [False, True])
def test_lengths_beyond_capacity_are_clamped(paged):
    """Unchecked, too-large cache_seqlens read at most the capacity (no out-of-bounds access)."""
    cache = to_dev(make_cache(3, batch=2, hkv=2, d=32, dtype=torch.float32, paged=paged, poison=False,
                              max_tokens=90))
    cap = cache["block_table"].shape[1] * cache["k_cache"].shape[1] if paged else cache["k_cache"].shape[1]
    bad = cache["cache_seqlens"].clone()
    bad[0] = cap + 1000
    q = torch.randn(2, 2, 4, 32, device=DEVICE)
    q_seqlens = torch.tensor([2, 2], dtype=torch.int32, device=DEVICE)
    out = branch_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], bad, cache["segment"],
                                        cache["branch"], q_seqlens=q_seqlens, block_table=cache["block_table"],
                                        backend="triton", check_values=False)
    clamped = torch.clamp(bad, max=cap)
    k, v, seg, br = cache["logical"]
    if not paged:
        ref = R.branch_attention_with_kvcache(q.double(), k.double(), v.double(), clamped, seg, br,
                                              q_seqlens=q_seqlens)
    else:
        ref = R.branch_attention_with_kvcache(q.double(), cache["k_cache"].double(), cache["v_cache"].double(),
                                              clamped, cache["segment"], cache["branch"], q_seqlens=q_seqlens,
                                              block_table=cache["block_table"])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_opcheck_triton_backend():
    cache = to_dev(make_cache(2, batch=2, hkv=2, d=32, dtype=torch.float32, paged=True, poison=False, max_tokens=60))
    q = torch.randn(2, 3, 4, 32, device=DEVICE)
    qs = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(torch.ops.aspd.branch_attention_with_kvcache.default,
                          (q, cache["k_cache"], cache["v_cache"], cache["cache_seqlens"], cache["segment"],
                           cache["branch"], qs, cache["block_table"], 0.25, "triton"))


def test_strided_query_view():
    """q as a view into a fused qkv projection (head stride != D, token stride != Hq * D)."""
    cache = to_dev(make_cache(21, batch=2, hkv=2, d=32, dtype=torch.float32, max_tokens=80))
    qkv = torch.randn(2, 5, 4 + 2 * 2, 32, device=DEVICE)
    q = qkv[:, :, :4]
    assert not q.is_contiguous()
    check(cache, q, new_tokens(cache["cache_seqlens"], 5), torch.float32)
