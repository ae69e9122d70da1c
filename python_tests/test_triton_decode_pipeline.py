"""Issue 21's decode changes against the float64 reference: the paged path's block ids fetched one tile ahead, the
per-row split merge, and the 64-key tiles of 128-row (K = 64) programs.

The prefetch is wrong if a tile uses the block ids of any tile but its own: block sizes below, equal to and above
the key tile (so a tile spans several pages, exactly one, or part of one), split starts that fall mid-page, and a
shuffled block table whose unused blocks hold NaN make every such mistake visible. The merge is checked directly on
random partials (splits that saw nothing, rows no split saw, padding rows) with a small load chunk, so the
multi-step path runs too.
"""
import os

# TRITON_INTERPRET: conftest.py sets it to 1 only where there is no GPU; on a GPU the kernels run compiled.

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from kv_helpers import make_cache  # noqa: E402
from test_triton_decode import DEVICE, check, new_tokens, to_dev  # noqa: E402

from aspd_kernels.triton import decode_merge  # noqa: E402
from aspd_kernels.triton.tile_configs import decode_config  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")
kernel = importlib.import_module("aspd_kernels.triton.branch_attention_with_kvcache")


@pytest.mark.parametrize("block_size", [4, 32, 64, 128])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_block_ids_one_tile_ahead(block_size, splits, dtype):
    """Key tiles of 32 (float32) or 64 (float16) slots over pages of 4..128 slots; 3 splits start mid-page."""
    cache = to_dev(make_cache(block_size + splits, batch=2, hkv=2, d=32, dtype=dtype, paged=True,
                              block_size=block_size, max_tokens=330))
    q = torch.randn(2, 3, 4, 32, device=DEVICE).to(dtype)
    check(cache, q, new_tokens(cache["cache_seqlens"], 3), dtype, num_splits=splits)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("lq", [1, 2, 4, 8, 16, 32, 64])
def test_rows_1_to_64_new_tokens_split(lq, paged):
    """K = 1..64 new tokens at GQA 2 (2..128 rows: every BLOCK_M, the 128-row tile with 64 keys included) with 2
    splits, float16 (the tiles of the 16-bit table)."""
    cache = to_dev(make_cache(lq + 40, batch=2, hkv=1, d=16, dtype=torch.float16, paged=paged, block_size=16,
                              max_tokens=200))
    q = torch.randn(2, lq, 2, 16, device=DEVICE).half()
    check(cache, q, new_tokens(cache["cache_seqlens"], lq), torch.float16, num_splits=2)


def test_128_row_tiles_take_64_keys():
    cfg = decode_config(256, 128, torch.bfloat16, 90)
    assert (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages) == (128, 64, 8, 4)


def _merge_reference(o_part, lse_part, q_seqlens, lq_max):
    """float64 ``sum_s 2^lse_s o_s / sum_s 2^lse_s`` per row; zero where no split saw a key or i >= q_seqlens."""
    lse = lse_part.double()
    m = lse.amax(0).clamp_min(-1e300)
    w = torch.exp2(lse - m)
    w = torch.where(torch.isfinite(lse), w, torch.zeros_like(w))
    den = w.sum(0)
    out = (w[..., None] * o_part.double()).sum(0) / torch.where(den > 0, den, 1.0)[..., None]
    live = torch.arange(lq_max)[None, :] < q_seqlens.cpu()[:, None]
    return torch.where(live[:, :, None, None], out, torch.zeros_like(out))


@pytest.mark.parametrize("splits, chunk", [(2, None), (5, None), (5, 2), (9, 4), (64, None)])
def test_merge_against_float64(splits, chunk):
    """Random partials; a third of the (split, row) pairs saw no key (lse = -inf, output 0 as the decode kernel
    writes it), one row saw nothing in any split, one sequence has padding rows; ``out`` starts as NaN."""
    g = torch.Generator().manual_seed(splits * 10 + (chunk or 0))
    b, lq, hq, d = 2, 3, 4, 24
    o_part = torch.randn(splits, b, lq, hq, d, generator=g)
    lse_part = torch.randn(splits, b, lq, hq, generator=g) * 4
    unseen = torch.rand(splits, b, lq, hq, generator=g) < 0.33
    unseen[:, 0, 1, 2] = True  # a row no split saw: out = 0
    lse_part[unseen] = float("-inf")
    o_part[unseen] = 0.0  # the decode kernel writes 0 / 1 = 0 there
    q_seqlens = torch.tensor([3, 2], dtype=torch.int32)
    want = _merge_reference(o_part, lse_part, q_seqlens, lq)
    out = torch.full((b, lq, hq, d), float("nan"), device=DEVICE)
    decode_merge.merge_launch(o_part.to(DEVICE), lse_part.to(DEVICE), out, torch.tensor([50, 50], dtype=torch.int32,
                              device=DEVICE), q_seqlens.to(DEVICE), 64, splits, chunk=chunk)
    assert torch.isfinite(out).all(), "every element of out is written"
    assert (out[0, 1, 2] == 0).all() and (out[1, 2:] == 0).all()
    torch.testing.assert_close(out.double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_merge_detects_a_wrong_weighting():
    """The reference above is sharp enough to fail a merge that drops the max shift's rescale (chunked)."""
    g = torch.Generator().manual_seed(3)
    o_part = torch.randn(6, 1, 1, 2, 16, generator=g)
    lse_part = torch.randn(6, 1, 1, 2, generator=g) * 8
    q_seqlens = torch.tensor([1], dtype=torch.int32)
    want = _merge_reference(o_part, lse_part, q_seqlens, 1)
    wrong = (o_part.double()).mean(0)  # equal weights: what a merge that ignored lse would return
    assert not torch.allclose(wrong, want, atol=1e-3)
    out = torch.empty(1, 1, 2, 16, device=DEVICE)
    decode_merge.merge_launch(o_part.to(DEVICE), lse_part.to(DEVICE), out, torch.tensor([9], dtype=torch.int32,
                              device=DEVICE), q_seqlens.to(DEVICE), 16, 6, chunk=2)
    torch.testing.assert_close(out.double().cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 3, 4, 5, 7])
def test_every_split_boundary(splits):
    """One sequence, every split count up to 7 over 4 key tiles of 32 (float32): splits with no tile at all, a
    split ending mid-page, and the last tile partial."""
    cache = to_dev(make_cache(60 + splits, batch=1, hkv=1, d=16, dtype=torch.float32, paged=True, block_size=8,
                              max_tokens=120))
    q = torch.randn(1, 2, 2, 16, device=DEVICE)
    check(cache, q, new_tokens(cache["cache_seqlens"], 2), torch.float32, num_splits=splits)


@pytest.mark.parametrize("d", [8, 64, 80, 128, 256])
@pytest.mark.parametrize("paged", [False, True])
def test_16_bit_tiles_at_every_head_size_class(d, paged):
    """The 16-bit tile table at every padded width (16, 64, 128 with D = 80 padded, 256: 32-key tiles), 5 new
    tokens at GQA 4 (20 rows: a 32-row tile), split in 3, pages of 16."""
    cache = to_dev(make_cache(d + int(paged), batch=2, hkv=1, d=d, dtype=torch.float16, paged=paged, block_size=16,
                              max_tokens=150))
    q = torch.randn(2, 5, 4, d, device=DEVICE).half()
    check(cache, q, new_tokens(cache["cache_seqlens"], 5), torch.float16, num_splits=3)
