"""rope_append_kv (torch backend) against the reference and against transformers' rotary convention."""
import pytest
import torch
from kv_helpers import make_cache

from aspd_kernels import reference as R
from aspd_kernels import rope_append_kv, rope_cos_sin_cache


def inv_freq(rot_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("rot_dim", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_against_reference(paged, rot_dim, dtype):
    bsz, lq, hq, hkv, d = 3, 5, 4, 2, 16
    cache = make_cache(1 + paged, batch=bsz, hkv=hkv, d=d, dtype=dtype, paged=paged, extra=8, poison=False)
    # the new tokens go after the existing ones: cache_seqlens grows by q_seqlens
    q_seqlens = torch.tensor([5, 2, 0], dtype=torch.int32)
    after = cache["cache_seqlens"] + q_seqlens
    q = torch.randn(bsz, lq, hq, d, dtype=dtype)
    k = torch.randn(bsz, lq, hkv, d, dtype=dtype)
    v = torch.randn(bsz, lq, hkv, d, dtype=dtype)
    pos = torch.randint(0, 200, (bsz, lq), dtype=torch.int32)
    seg = torch.full((bsz, lq), 50, dtype=torch.int32)
    br = torch.randint(1, 4, (bsz, lq), dtype=torch.int32)
    csc = rope_cos_sin_cache(inv_freq(rot_dim), 256)
    caches = [cache[n] for n in ("k_cache", "v_cache", "segment", "branch")]
    ref_caches = [c.clone() for c in caches]
    q_rot = rope_append_kv(q, k, v, pos, csc, *caches, after, seg, br, q_seqlens=q_seqlens,
                           block_table=cache["block_table"])
    ref_q = R.rope_append_kv(q, k, v, pos, csc, *ref_caches, after, seg, br, q_seqlens=q_seqlens,
                             block_table=cache["block_table"])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(q_rot, ref_q, atol=tol, rtol=tol)
    for got, ref in zip(caches, ref_caches):
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol, equal_nan=True)


def test_matches_transformers_rotary():
    transformers = pytest.importorskip("transformers", reason="transformers is needed to compare conventions")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d, n = 32, 9
    freqs = inv_freq(d)
    pos = torch.arange(3, 3 + n)
    emb = torch.cat([pos[:, None] * freqs[None], pos[:, None] * freqs[None]], -1)
    q = torch.randn(1, 2, n, d, dtype=torch.float64)
    k = torch.randn(1, 1, n, d, dtype=torch.float64)
    hq, hk = apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    kc = torch.zeros(1, 16, 1, d, dtype=torch.float64)
    sc = torch.zeros(1, 16, dtype=torch.int32)
    ids = torch.zeros(1, n, dtype=torch.int32)
    q_rot = rope_append_kv(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2), pos[None].int(),
                           rope_cos_sin_cache(freqs, 64), kc, kc.clone(), sc, sc.clone(),
                           torch.tensor([n], dtype=torch.int32), ids, ids)
    torch.testing.assert_close(q_rot, hq.transpose(1, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(kc[0, :n], hk[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
