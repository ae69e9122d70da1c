"""The torch backend's per-step sharing (``step_cache.step_scope``): inside a scope, every layer of a decoding step
reuses the first layer's rotary factors, cache slots and masks; the results must equal unscoped calls exactly, and
different tensors must never share an entry."""
import pytest
import torch
from kv_helpers import make_cache

from aspd_kernels import branch_attention_with_kvcache, rope_append_kv, rope_cos_sin_cache
from aspd_kernels.torch_backend import step_cache


def _step(bsz=3, lq=4, hq=4, hkv=2, d=16, paged=False, seed=0):
    """Two layers' caches (same ids, lengths, block table) and one step's new tokens; q_seqlens has a 0 and a
    partial row, so the append's gather path runs too."""
    torch.manual_seed(seed)
    c = make_cache(3 + paged, batch=bsz, hkv=hkv, d=d, dtype=torch.float32, paged=paged, extra=8, poison=False)
    q_seqlens = torch.tensor([lq, 2, 0][:bsz], dtype=torch.int32)
    layers = [[c["k_cache"].clone(), c["v_cache"].clone()] for _ in range(2)]
    step = dict(
        positions=torch.randint(0, 60, (bsz, lq), dtype=torch.int32),
        cos_sin_cache=rope_cos_sin_cache(1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d), 64),
        segment_cache=c["segment"].clone(), branch_cache=c["branch"].clone(),
        cache_seqlens=c["cache_seqlens"] + q_seqlens, segment=torch.full((bsz, lq), 90, dtype=torch.int32),
        branch=torch.randint(1, 3, (bsz, lq), dtype=torch.int32), q_seqlens=q_seqlens, block_table=c["block_table"],
    )
    qkv = [[torch.randn(bsz, lq, h, d) for h in (hq, hkv, hkv)] for _ in range(2)]
    return step, layers, qkv


def _run(step, layers, qkv, scoped: bool):
    """Both layers' (q_rot, attention out), and the caches they leave, with or without a step scope."""
    outs = []
    caches = [[t.clone() for t in kv] for kv in layers]
    ids = [step["segment_cache"].clone(), step["branch_cache"].clone()]
    s = dict(step, segment_cache=ids[0], branch_cache=ids[1])
    ctx = step_cache.step_scope() if scoped else torch.no_grad()
    with ctx:
        for (q, k, v), (kc, vc) in zip(qkv, caches):
            q_rot = rope_append_kv(q, k, v, s["positions"], s["cos_sin_cache"], kc, vc, ids[0], ids[1],
                                   s["cache_seqlens"], s["segment"], s["branch"], s["q_seqlens"], s["block_table"],
                                   check_values=False)
            o = branch_attention_with_kvcache(q_rot, kc, vc, s["cache_seqlens"], ids[0], ids[1],
                                              q_seqlens=s["q_seqlens"], block_table=s["block_table"],
                                              check_values=False)
            outs += [q_rot, o]
    return outs, [t for kv in caches for t in kv] + ids


@pytest.mark.parametrize("paged", [False, True])
def test_scoped_layers_equal_unscoped(paged):
    step, layers, qkv = _step(paged=paged)
    got, got_caches = _run(step, layers, qkv, scoped=True)
    ref, ref_caches = _run(step, layers, qkv, scoped=False)
    for a, b in zip(got + got_caches, ref + ref_caches):
        assert torch.equal(a, b)


def test_scope_keys_by_identity():
    """Inside one scope, a call with other position and length tensors (same shapes) must not reuse the first
    call's plan: it must equal its own unscoped call."""
    step, layers, qkv = _step()
    other = dict(step, positions=torch.randint(0, 60, step["positions"].shape, dtype=torch.int32),
                 q_seqlens=torch.tensor([1, 4, 3], dtype=torch.int32))
    other["cache_seqlens"] = step["cache_seqlens"] - step["q_seqlens"] + other["q_seqlens"]
    with step_cache.step_scope():
        _run(step, layers, qkv, scoped=False)  # fills the scope's entries for `step`
        got, got_caches = _run(other, layers, qkv, scoped=False)
    ref, ref_caches = _run(other, layers, qkv, scoped=False)
    for a, b in zip(got + got_caches, ref + ref_caches):
        assert torch.equal(a, b)


def test_shared_builds_once_per_scope_and_always_outside():
    t = torch.zeros(2)
    calls = []
    build = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert step_cache.shared("x", (t,), (), build) == 1
    assert step_cache.shared("x", (t,), (), build) == 2  # no scope: nothing kept
    with step_cache.step_scope():
        assert step_cache.shared("x", (t,), (), build) == 3
        assert step_cache.shared("x", (t,), (), build) == 3
        assert step_cache.shared("x", (t.clone(),), (), build) == 4  # another tensor, another entry
        assert step_cache.shared("x", (t,), ("other shape",), build) == 5
    assert step_cache.shared("x", (t,), (), build) == 6  # the scope's entries went with it
