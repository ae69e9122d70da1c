"""branch_attention_with_kvcache (torch backend) against the dense reference: contiguous and paged caches,
ragged new-token counts, GQA, poisoned unused slots."""
import pytest
import torch
from kv_helpers import make_cache

from aspd_kernels import branch_attention_with_kvcache, reference as R


def check(cache, q, q_seqlens, dtype, backend=None, atol=None):
    out = branch_attention_with_kvcache(
        q, cache["k_cache"], cache["v_cache"], cache["cache_seqlens"], cache["segment"], cache["branch"],
        q_seqlens=q_seqlens, block_table=cache["block_table"], backend=backend,
    )
    k, v, seg, br = cache["logical"]
    ref = R.branch_attention_with_kvcache(q.double(), k.double(), v.double(), cache["cache_seqlens"], seg, br,
                                          q_seqlens=q_seqlens)
    tol = atol or (1e-10 if dtype == torch.float64 else 3e-5)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    return out


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("lq", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_step(lq, hq, hkv, paged, dtype):
    cache = make_cache(lq * 7 + hq, batch=3, hkv=hkv, d=16, dtype=dtype, paged=paged, max_tokens=160)
    lens = cache["cache_seqlens"]
    q_seqlens = torch.minimum(torch.tensor([lq, max(lq // 2, 1), 0], dtype=torch.int32), lens)
    q = torch.randn(3, lq, hq, 16, dtype=dtype)
    out = check(cache, q, q_seqlens, dtype)
    assert torch.isfinite(out).all()
    for b in range(3):  # padding rows are zero
        assert (out[b, int(q_seqlens[b]):] == 0).all()


def test_default_q_seqlens():
    cache = make_cache(5, batch=2, hkv=2, d=8, dtype=torch.float64)
    q = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    check(cache, q, None, torch.float64)
