"""The CPU decoding op's three ways of attending a cache row (``torch_backend.decode_plan``: split, flash, query
tiles) against the float64 reference, on random layouts (1..64 branches, ragged and dropped branches, contiguous,
interleaved and mixed storage), GQA ratios, odd head sizes, contiguous and paged caches, float32/float64/bfloat16,
with the output poisoned before the run. Each path and both sides of each threshold are checked to be taken."""
import random

import pytest
import torch
from kv_helpers import make_cache

from aspd_kernels import branch_attention_with_kvcache, reference as R
from aspd_kernels.torch_backend import decode, decode_plan, sdpa_tiles

TOL = {torch.float64: 1e-10, torch.float32: 3e-5, torch.bfloat16: 2e-2}
HEADS = [(1, 1), (4, 1), (8, 2), (6, 3), (4, 4), (16, 2)]


@pytest.fixture(autouse=True)
def poisoned_output(monkeypatch):
    """Every output the op allocates starts as NaN unless it must be zeros: a row left unwritten shows."""
    new = decode._new_out
    monkeypatch.setattr(decode, "_new_out", lambda shape, dtype, covered: new(shape, dtype, covered) if not covered
                        else torch.full(shape, float("nan"), dtype=dtype))


def _case(seed: int):
    """A random batch of cache rows and one step's queries: the newest ``q_seqlens[b]`` slots of each row."""
    rng = random.Random(seed)
    hq, hkv = rng.choice(HEADS)
    d = rng.choice([8, 12, 24, 64, 80])
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
    batch = rng.randint(1, 3)
    cache = make_cache(seed, batch=batch, hkv=hkv, d=d, dtype=dtype, paged=rng.random() < 0.4,
                       max_tokens=rng.choice([60, 200, 400]))
    lens = cache["cache_seqlens"]
    lq = rng.choice([1, 2, 5, 16, 33, 64])
    ragged = rng.random() < 0.3
    qlens = torch.tensor([min(int(n), rng.randint(0, lq) if ragged else lq) for n in lens], dtype=torch.int32)
    q = torch.randn(batch, lq, hq, d).to(dtype)
    return cache, q, qlens


def _run_and_check(cache, q, qlens):
    out = branch_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], cache["cache_seqlens"],
                                        cache["segment"], cache["branch"], q_seqlens=qlens,
                                        block_table=cache["block_table"])
    k, v, seg, br = cache["logical"]
    ref = R.branch_attention_with_kvcache(q.double(), k.double(), v.double(), cache["cache_seqlens"], seg, br,
                                          q_seqlens=qlens)
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for b, n in enumerate(qlens.tolist()):  # padding query rows are zeros, not poison
        assert (out[b, n:] == 0).all()


def _kinds(cache, q, qlens) -> set[str]:
    """How the plan attends each row: split (with / without padded lists, prefix only), flash or tiles."""
    p = decode_plan.plan(q, cache["k_cache"], cache["v_cache"], cache["cache_seqlens"], qlens, cache["segment"],
                         cache["branch"], cache["block_table"], torch.float32)
    kinds = set()
    for r in p.rows:
        s = r.split
        if s is None:
            kinds.add("flash" if r.mask is not None else "tiles")
        else:
            kinds.add("prefix only" if s.m == 0 else "padded lists" if s.pad is not None else "even lists")
            kinds.add("paged split" if s.prefix is not None else "contiguous split")
    return kinds


@pytest.mark.parametrize("seed", range(48))
def test_random_layouts_match_reference(seed):
    _run_and_check(*_case(seed))


def test_every_path_is_taken():
    """The random cases above cover both sides of the split's thresholds: rows with padded and even per-query lists,
    rows every query sees whole, and prefill-like rows (lists as long as the row) that go to the flash kernel."""
    kinds = set().union(*(_kinds(*_case(seed)) for seed in range(48)))
    assert kinds >= {"padded lists", "even lists", "prefix only", "flash", "paged split", "contiguous split"}, kinds


@pytest.mark.parametrize("bound", [64, 2048])
@pytest.mark.parametrize("seed", range(6))
def test_small_tile_bound(monkeypatch, seed, bound):
    """With a small tile bound, rows whose scores would exceed it leave the split for the flash kernel, and rows
    whose ``[Lq, n]`` mask would exceed it take the query tiles: both still match the reference."""
    monkeypatch.setattr(sdpa_tiles, "MASK_ELEMENTS", bound)
    case = _case(seed)
    kinds = _kinds(*case)
    assert "tiles" in kinds or bound > 64
    _run_and_check(*case)


def test_tile_bound_sides():
    """One decoding step (four interleaved branches after a prompt) planned just under and just over each bound."""
    from aspd_kernels import BranchLayout
    lay = BranchLayout.from_sections([("serial", 40), ("parallel", [6, 6, 5, 6])], storage="interleaved")
    n, lq, hq, hkv = len(lay), 4, 4, 2
    seg, br = lay.segment[None].clone(), lay.branch[None].clone()
    q = torch.randn(1, lq, hq, 8)
    kc = torch.randn(1, n, hkv, 8)
    lens, qlens = torch.tensor([n], dtype=torch.int32), torch.tensor([lq], dtype=torch.int32)
    split = decode_plan.plan(q, kc, kc, lens, qlens, seg, br, None, torch.float32).rows[0].split
    assert split is not None and split.c == 40 and split.m == 6 and split.pad is not None
    scores = hq * lq * (split.c + split.m)
    cache = dict(k_cache=kc, v_cache=torch.randn_like(kc), cache_seqlens=lens, segment=seg, branch=br,
                 block_table=None, logical=(kc, None, seg, br))
    cache["logical"] = (kc, cache["v_cache"], seg, br)
    for bound, kind in ((scores, "even"), (scores - 1, "flash"), (lq * n - 1, "tiles")):
        mp = pytest.MonkeyPatch()
        mp.setattr(sdpa_tiles, "MASK_ELEMENTS", bound)
        try:
            got = _kinds(cache, q, qlens)
            assert (kind in got) if kind != "even" else ("padded lists" in got), (bound, got)
            _run_and_check(cache, q, qlens)
        finally:
            mp.undo()


def test_non_contiguous_cache_takes_flash():
    """The split gathers through a flat view of the cache; a head-major (non-contiguous) cache keeps the flash
    kernel, with the same numbers."""
    cache, q, qlens = _case(3)
    if cache["block_table"] is not None:
        cache, q, qlens = _case(5)
    for name in ("k_cache", "v_cache"):
        t = cache[name]
        cache[name] = t.transpose(1, 2).contiguous().transpose(1, 2)
    assert "flash" in _kinds(cache, q, qlens) or "tiles" in _kinds(cache, q, qlens)
    assert not ({"contiguous split", "paged split"} & _kinds(cache, q, qlens))
    _run_and_check(cache, q, qlens)
