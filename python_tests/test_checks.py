"""Bad input raises ValueError/TypeError naming the argument, before anything is launched."""
import pytest
import torch
from kv_helpers import make_cache

from aspd_kernels import (branch_attention, branch_attention_with_kvcache, remap_positions, rope_append_kv,
                          rope_cos_sin_cache)


def att():
    n = 10
    seg = torch.tensor([0] * 4 + [1] * 6, dtype=torch.int32)
    br = torch.tensor([0] * 4 + [1, 2, 1, 2, 1, 2], dtype=torch.int32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    return dict(q=torch.randn(n, 4, 16), k=torch.randn(n, 2, 16), v=torch.randn(n, 2, 16), segment=seg, branch=br,
                cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=n, max_seqlen_k=n)


def with_(base, **kw):
    d = dict(base)
    d.update(kw)
    return d


ATTENTION_CASES = [
    ("q", TypeError, lambda a: with_(a, q=a["q"].numpy())),
    ("q", ValueError, lambda a: with_(a, q=a["q"][0])),
    ("q", TypeError, lambda a: with_(a, q=a["q"].int())),
    ("k", TypeError, lambda a: with_(a, k=a["k"].double())),
    ("v", ValueError, lambda a: with_(a, v=a["v"][:5])),
    ("head count of q", ValueError, lambda a: with_(a, k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16))),
    ("k", ValueError, lambda a: with_(a, k=torch.randn(10, 2, 8), v=torch.randn(10, 2, 8))),
    ("segment", TypeError, lambda a: with_(a, segment=a["segment"].long())),
    ("branch", ValueError, lambda a: with_(a, branch=a["branch"][:3])),
    ("cu_seqlens_q", TypeError, lambda a: with_(a, cu_seqlens_q=a["cu_seqlens_q"].long())),
    ("cu_seqlens_k", ValueError, lambda a: with_(a, cu_seqlens_k=torch.tensor([0, 11], dtype=torch.int32))),
    ("cu_seqlens_q", ValueError, lambda a: with_(a, cu_seqlens_q=torch.tensor([1, 10], dtype=torch.int32))),
    ("cu_seqlens_k", ValueError, lambda a: with_(a, cu_seqlens_k=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                                                 cu_seqlens_q=torch.tensor([0, 3, 3, 10], dtype=torch.int32))),
    ("cu_seqlens_q", ValueError, lambda a: with_(a, q=torch.randn(12, 4, 16),
                                                 cu_seqlens_q=torch.tensor([0, 12], dtype=torch.int32))),
    ("max_seqlen_q", ValueError, lambda a: with_(a, max_seqlen_q=3)),
    ("max_seqlen_k", TypeError, lambda a: with_(a, max_seqlen_k=-1)),
    ("segment", ValueError, lambda a: with_(a, segment=torch.tensor([0, 0, 1, 1, 0, 1, 1, 1, 1, 1],
                                                                      dtype=torch.int32))),
    ("branch", ValueError, lambda a: with_(a, branch=a["branch"] - 3)),
    ("backend", ValueError, lambda a: with_(a, backend="cudnn")),
    ("backend='cuda'", ValueError, lambda a: with_(a, backend="cuda")),
    # no backend runs an empty head (auto's last resort refuses too), rather than a ZeroDivisionError in the scale
    ("q: head size 0 is not supported", ValueError,
     lambda a: with_(a, q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0])),
]


@pytest.mark.parametrize("name,exc,make", ATTENTION_CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(ATTENTION_CASES)])
def test_branch_attention_rejects(name, exc, make):
    with pytest.raises(exc, match=name.replace("(", "\\(")):
        branch_attention(**make(att()))


def test_segment_may_restart_at_a_sequence_boundary():
    a = att()
    seg = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.int32)
    br = torch.tensor([0, 0, 1, 2, 1, 0, 0, 1, 1, 2], dtype=torch.int32)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    branch_attention(**with_(a, segment=seg, branch=br, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5,
                             max_seqlen_k=5))


def kv():
    c = make_cache(1, batch=2, hkv=2, d=16, dtype=torch.float32)
    return dict(q=torch.randn(2, 3, 4, 16), k_cache=c["k_cache"], v_cache=c["v_cache"],
                cache_seqlens=c["cache_seqlens"], segment=c["segment"], branch=c["branch"])


KV_CASES = [
    ("q", ValueError, lambda a: with_(a, q=a["q"][0])),
    ("k_cache", TypeError, lambda a: with_(a, k_cache=a["k_cache"].half())),
    ("k_cache", ValueError, lambda a: with_(a, k_cache=a["k_cache"][:1], v_cache=a["v_cache"][:1])),
    ("cache_seqlens", TypeError, lambda a: with_(a, cache_seqlens=a["cache_seqlens"].long())),
    ("cache_seqlens", ValueError, lambda a: with_(a, cache_seqlens=a["cache_seqlens"] + 10_000)),
    ("q_seqlens", ValueError, lambda a: with_(a, q_seqlens=torch.tensor([4, 1], dtype=torch.int32))),
    ("q_seqlens", ValueError, lambda a: with_(a, q_seqlens=torch.tensor([1], dtype=torch.int32))),
    ("segment", ValueError, lambda a: with_(a, segment=a["segment"][:, :5])),
    ("block_table", TypeError, lambda a: with_(a, block_table=torch.zeros(2, 4))),
    ("branch", ValueError, lambda a: with_(a, branch=torch.full_like(a["branch"], -1))),
    ("q: head size 0 is not supported", ValueError,
     lambda a: with_(a, q=a["q"][..., :0], k_cache=a["k_cache"][..., :0], v_cache=a["v_cache"][..., :0])),
]


@pytest.mark.parametrize("name,exc,make", KV_CASES, ids=[f"{i}-{c[0]}" for i, c in enumerate(KV_CASES)])
def test_kvcache_rejects(name, exc, make):
    with pytest.raises(exc, match=name):
        branch_attention_with_kvcache(**make(kv()))


def test_kvcache_rejects_bad_block_ids():
    c = make_cache(2, batch=2, hkv=2, d=16, dtype=torch.float32, paged=True)
    table = c["block_table"].clone()
    table[0, 0] = 10_000
    with pytest.raises(ValueError, match="block_table"):
        branch_attention_with_kvcache(torch.randn(2, 1, 2, 16), c["k_cache"], c["v_cache"], c["cache_seqlens"],
                                      c["segment"], c["branch"], block_table=table)


def test_remap_positions_rejects():
    seg = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    br = torch.tensor([0, 0, 1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="strategy"):
        remap_positions(seg, br, "same_sequential")
    with pytest.raises(ValueError, match="width"):
        remap_positions(seg, br, "fixed-length", width=0)
    with pytest.raises(TypeError, match="segment"):
        remap_positions(seg.long(), br)
    with pytest.raises(ValueError, match="segment"):
        remap_positions(torch.tensor([0, 1, 0, 1], dtype=torch.int32), br)
    with pytest.raises(ValueError, match="branch"):
        remap_positions(seg, torch.tensor([0, 1, 1, 2], dtype=torch.int32))  # section 0 mixes 0 and 1
    with pytest.raises(ValueError, match="cu_seqlens"):
        remap_positions(seg, br, cu_seqlens=torch.tensor([0, 3, 2, 4], dtype=torch.int32))


def test_rope_append_kv_rejects():
    c = make_cache(3, batch=1, hkv=2, d=16, dtype=torch.float32, extra=4, poison=False)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    ids = torch.zeros(1, 2, dtype=torch.int32)
    csc = rope_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, 16, 2) / 16), 32)
    after = c["cache_seqlens"] + 2
    base = dict(q=q, k=k, v=v, positions=torch.zeros(1, 2, dtype=torch.int32), cos_sin_cache=csc,
                k_cache=c["k_cache"], v_cache=c["v_cache"], segment_cache=c["segment"], branch_cache=c["branch"],
                cache_seqlens=after, segment=ids, branch=ids)
    rope_append_kv(**base)
    cases = [
        ("positions", ValueError, dict(positions=torch.full((1, 2), 99, dtype=torch.int32))),
        ("positions", TypeError, dict(positions=torch.zeros(1, 2))),
        ("cos_sin_cache", ValueError, dict(cos_sin_cache=csc[:, :3])),
        ("cos_sin_cache", TypeError, dict(cos_sin_cache=csc.double())),
        ("k_cache", ValueError, dict(k_cache=c["k_cache"].transpose(1, 2).contiguous().transpose(1, 2))),
        ("cache_seqlens", ValueError, dict(cache_seqlens=after + 100)),
        ("k", ValueError, dict(k=torch.randn(1, 2, 1, 16), v=torch.randn(1, 2, 1, 16))),
        ("branch", ValueError, dict(branch=ids - 1)),
    ]
    for name, exc, kw in cases:
        with pytest.raises(exc, match=name):
            rope_append_kv(**with_(base, **kw))


def test_check_values_false_never_reads_out_of_bounds():
    """With checks off, lengths beyond capacity are clamped by the kernel, not read past the cache."""
    a = kv()
    a["cache_seqlens"] = a["cache_seqlens"] + 10_000
    out = branch_attention_with_kvcache(**a, check_values=False)
    assert out.shape == a["q"].shape


@pytest.mark.parametrize("cache_len, new", [(11, 5), (-3, 2), (4, -1), (2, 3)])
def test_unchecked_bad_values_stay_in_bounds_on_cpu(cache_len, new):
    """check_values=False: bad lengths, positions and ids may give wrong numbers but never an out-of-bounds read or
    write. The caches are views into larger buffers with guard bands on both sides: the bands must come back
    untouched and the calls must not fail on an index. With the default checks the same call is refused."""
    lq, h, d, cap, pad = 3, 2, 8, 6, 4
    k_band = torch.full((1, cap + 2 * pad, h, d), 7.0)
    v_band = k_band.clone()
    s_band = torch.full((1, cap + 2 * pad), 7, dtype=torch.int32)
    b_band = s_band.clone()
    caches = [t[:, pad:pad + cap] for t in (k_band, v_band, s_band, b_band)]  # batch 1: contiguous views
    assert all(c.is_contiguous() for c in caches)
    q = torch.randn(1, lq, h, d)
    lens, qlens = torch.tensor([cache_len], dtype=torch.int32), torch.tensor([new], dtype=torch.int32)
    pos = torch.tensor([[-5, 0, 10 ** 6]], dtype=torch.int32)  # outside the rotary table
    ids = torch.tensor([[-1, 3, -7]], dtype=torch.int32)
    cos_sin = torch.randn(16, d)
    with pytest.raises(ValueError):
        rope_append_kv(q, q, q, pos, cos_sin, *caches, lens, ids, ids, qlens)
    rope_append_kv(q, q, q, pos, cos_sin, *caches, lens, ids, ids, qlens, check_values=False)
    out = branch_attention_with_kvcache(q, caches[0], caches[1], lens, caches[2], caches[3], q_seqlens=qlens,
                                        check_values=False)
    assert out.shape == q.shape
    for band, fill in ((k_band, 7.0), (v_band, 7.0), (s_band, 7), (b_band, 7)):
        assert (band[:, :pad] == fill).all() and (band[:, pad + cap:] == fill).all()
