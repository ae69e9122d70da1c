"""The CUDA C++ backend (csrc/, ``aspd_kernels._C``) against the float64 reference, on a GPU.

Skipped, with the reason printed (``pytest -rs``), where there is no CUDA device or the extension is not built
(``pip install --no-build-isolation -e .`` with a CUDA torch and nvcc, or ``ASPD_JIT=1``).
Outputs are poisoned: the allocator's free blocks are filled with NaN before each call, so a row the kernel
forgets to write comes back NaN; unused cache slots hold NaN (``make_cache``), so a kernel that reads past
``cache_seqlens`` produces NaN.
"""
import importlib
import math

import pytest
import torch
from kv_helpers import make_cache
from layouts import random_batch

from aspd_kernels import branch_attention_with_kvcache, remap_positions, rope_append_kv, rope_cos_sin_cache
from aspd_kernels import _cuda, _dispatch
from aspd_kernels import reference as R


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device: the CUDA kernels need a GPU"
    if not _cuda.available():
        return f"the CUDA extension aspd_kernels._C is not built ({_cuda.load_error()})"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")

DEV = "cuda"
TOL = {torch.bfloat16: 2.5e-2, torch.float16: 4e-3, torch.float32: 2e-5, torch.float64: 1e-10}


def poison_allocator(mib: int = 64) -> None:
    """Leave all-ones bytes (NaN in fp16, bf16, fp32 and fp64) in the caching allocator's free blocks, so that
    an output element the kernel forgets to write shows up as NaN.

    Requests of at most 1 MiB come from a separate pool of 2 MiB segments, which one large block would never
    reach: most outputs here are that small. Free segments holding stale (finite) results are released first so
    that the best fit of the next request is a poisoned block."""
    torch.cuda.empty_cache()
    junk = [torch.full((1 << 19,), -1, dtype=torch.int16, device=DEV) for _ in range(16)]  # 1 MiB each: small pool
    junk.append(torch.full((mib << 19,), -1, dtype=torch.int16, device=DEV))  # large pool
    del junk


def to_dev(cache: dict) -> dict:
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in cache.items()}


def reference(cache, q, q_seqlens, scale=None):
    k, v, seg, br = cache["logical"]
    return R.branch_attention_with_kvcache(q.double().cpu(), k.double(), v.double(), cache["cache_seqlens"], seg, br,
                                           softmax_scale=scale, q_seqlens=q_seqlens)


def run_cuda(cache, q, q_seqlens, num_splits=0, scale=None):
    dc = to_dev(cache)
    poison_allocator()
    if num_splits:  # the backend function directly, to force the split-KV + merge path on small inputs
        qs = q_seqlens.to(DEV) if q_seqlens is not None else torch.full((q.shape[0],), q.shape[1], dtype=torch.int32,
                                                                       device=DEV)
        return _cuda.branch_attention_with_kvcache(
            q.to(DEV), dc["k_cache"], dc["v_cache"], dc["cache_seqlens"], dc["segment"], dc["branch"], qs,
            dc["block_table"], scale or 1.0 / math.sqrt(q.shape[-1]), num_splits)
    return branch_attention_with_kvcache(
        q.to(DEV), dc["k_cache"], dc["v_cache"], dc["cache_seqlens"], dc["segment"], dc["branch"],
        softmax_scale=scale, q_seqlens=None if q_seqlens is None else q_seqlens.to(DEV),
        block_table=dc["block_table"], backend="cuda")


def check(out, ref, q_seqlens, dtype):
    out = out.cpu()
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "NaN/inf: an unwritten row or a read past cache_seqlens"
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
    if q_seqlens is not None:
        for b, n in enumerate(q_seqlens.tolist()):
            assert (out[b, n:] == 0).all(), "padding rows must be zeros"


def ragged(lq: int, lens: torch.Tensor) -> torch.Tensor:
    want = [lq, max(lq // 2, 1), 0, max(lq - 3, 1)][: lens.numel()]
    return torch.minimum(torch.tensor(want, dtype=torch.int32), lens)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (28, 4)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("lq", [1, 2, 7, 16, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_vs_reference(dtype, lq, d, hq, hkv, paged):
    seed = lq * 131 + d + hq * 7 + paged
    cache = make_cache(seed, batch=4, hkv=hkv, d=d, dtype=dtype, paged=paged, block_size=16, max_tokens=300,
                       extra=lq + 29)
    q_seqlens = ragged(lq, cache["cache_seqlens"])
    q = torch.randn(4, lq, hq, d).to(dtype)
    check(run_cuda(cache, q, q_seqlens), reference(cache, q, q_seqlens), q_seqlens, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_forced_splits(dtype, d, paged, num_splits):
    """Split-KV + merge on short caches: some splits are empty, some rows see nothing in a split. Both head sizes
    (their own ring depth and merge kernel): caches this short never split under the heuristic."""
    cache = make_cache(17 + num_splits, batch=3, hkv=2, d=d, dtype=dtype, paged=paged, block_size=32,
                       max_tokens=400, extra=40)
    q_seqlens = ragged(16, cache["cache_seqlens"])
    q = torch.randn(3, 16, 8, d).to(dtype)
    check(run_cuda(cache, q, q_seqlens, num_splits=num_splits), reference(cache, q, q_seqlens), q_seqlens, dtype)


GENERIC_CASES = [(dt, d) for dt in (torch.float32, torch.float64) for d in (32, 64, 96, 128, 256)] + [
    (dt, d) for dt in (torch.bfloat16, torch.float16) for d in (32, 96, 256)]


@pytest.mark.parametrize("dtype,d", GENERIC_CASES)
def test_decode_generic_kernel(dtype, d):
    """float32/float64, and fp16/bf16 head sizes off the tensor-core path (32, 96, 256), go to the warp-per-row
    kernel. The scale 0.3 has no exact fp32 form: a scale rounded to fp32 on the float64 path is off by ~1e-7, far
    outside the fp64 tolerance."""
    cache = make_cache(d, batch=3, hkv=2, d=d, dtype=dtype, paged=d in (96, 256), max_tokens=200)
    q_seqlens = ragged(7, cache["cache_seqlens"])
    q = torch.randn(3, 7, 6, d).to(dtype)
    check(run_cuda(cache, q, q_seqlens, scale=0.3), reference(cache, q, q_seqlens, scale=0.3), q_seqlens, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_default_q_seqlens_and_strided_q(dtype):
    cache = make_cache(3, batch=2, hkv=2, d=64, dtype=dtype, max_tokens=120)
    big = torch.randn(2, 5, 8, 3 * 64, device=DEV).to(dtype)
    q = big[..., 64:128]  # last dim contiguous, other strides not
    out = run_cuda(cache, q, None)
    check(out, reference(cache, q, None), None, dtype)


@pytest.mark.parametrize("offset", [0, 4])
def test_decode_views_of_wider_buffers(offset):
    """k/v caches that are views of wider buffers: 16-byte aligned rows stay on the tensor-core kernel, rows
    shifted by 8 bytes go to the generic kernel (no misaligned 16-byte copy); q is shifted too (copied)."""
    dtype, d = torch.float16, 64
    cache = make_cache(4, batch=2, hkv=2, d=d, dtype=dtype, max_tokens=150)
    dc = to_dev(cache)
    views = {}
    for name in ("k_cache", "v_cache"):
        t = dc[name]
        wide = torch.full(t.shape[:-1] + (d + 8,), float("nan"), dtype=dtype, device=DEV)
        wide[..., offset:offset + d] = t
        views[name] = wide[..., offset:offset + d]
    qw = torch.randn(2, 3, 4, d + 8, device=DEV).to(dtype)
    q = qw[..., offset:offset + d]
    q_seqlens = ragged(3, cache["cache_seqlens"])
    poison_allocator()
    out = branch_attention_with_kvcache(q, views["k_cache"], views["v_cache"], dc["cache_seqlens"], dc["segment"],
                                        dc["branch"], q_seqlens=q_seqlens.to(DEV), backend="cuda")
    check(out, reference(cache, q, q_seqlens), q_seqlens, dtype)


def test_decode_long_cache_128k():
    """One sequence of 128k slots: a serial prefix, then 16 interleaved branches decoding their 16 new tokens."""
    torch.manual_seed(1)
    dtype, hq, hkv, d, k_branches = torch.bfloat16, 8, 2, 128, 16
    prefix, per_branch = 131072 - 16 * 40, 40
    n = prefix + k_branches * per_branch
    seg = torch.cat([torch.zeros(prefix, dtype=torch.int32), torch.ones(n - prefix, dtype=torch.int32)])
    br = torch.cat([torch.zeros(prefix, dtype=torch.int32),
                    torch.arange(1, k_branches + 1, dtype=torch.int32).repeat(per_branch)])
    cap = n + 64
    k = torch.full((1, cap, hkv, d), float("nan"), dtype=dtype, device=DEV)
    v = torch.full_like(k, float("nan"))
    k[0, :n] = torch.randn(n, hkv, d, device=DEV).to(dtype)
    v[0, :n] = torch.randn(n, hkv, d, device=DEV).to(dtype)
    segc = torch.full((1, cap), -7, dtype=torch.int32, device=DEV)
    brc = segc.clone()
    segc[0, :n], brc[0, :n] = seg.to(DEV), br.to(DEV)
    lens = torch.tensor([n], dtype=torch.int32, device=DEV)
    q = torch.randn(1, k_branches, hq, d, device=DEV).to(dtype)
    poison_allocator()
    out = branch_attention_with_kvcache(q, k, v, lens, segc, brc, backend="cuda")
    # the tiled torch backend in float64 is the yardstick here (the dense reference would need an N x N mask)
    ref = branch_attention_with_kvcache(q.double(), k.double(), v.double(), lens, segc, brc, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_unchecked_lengths_are_clamped():
    """cache_seqlens beyond capacity and q_seqlens beyond Lq, unchecked: no out-of-bounds access, no error."""
    cache = to_dev(make_cache(9, batch=2, hkv=2, d=64, dtype=torch.float16, max_tokens=100))
    cap = cache["k_cache"].shape[1]
    lens = torch.tensor([cap + 1000, -5], dtype=torch.int32, device=DEV)
    q = torch.randn(2, 4, 4, 64, device=DEV, dtype=torch.float16)
    out = branch_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], lens, cache["segment"],
                                        cache["branch"], q_seqlens=torch.tensor([9, 2], dtype=torch.int32,
                                                                                device=DEV),
                                        check_values=False, backend="cuda")
    torch.cuda.synchronize()
    assert (out[1] == 0).all()  # a negative length clamps to an empty sequence


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_empty_paged_cache_is_never_indexed(dtype):
    """A paged cache with no block at all (k_cache.shape[0] == 0) and unchecked lengths: every row comes back
    zero and nothing is written (clamping a block id into [0, num_blocks - 1] would give -1 here)."""
    d = 64
    k_cache = torch.empty(0, 16, 2, d, dtype=dtype, device=DEV)
    v_cache = torch.empty_like(k_cache)
    seg_c, br_c = (torch.empty(0, 16, dtype=torch.int32, device=DEV) for _ in range(2))
    table = torch.zeros(2, 4, dtype=torch.int32, device=DEV)
    lens = torch.tensor([40, 3], dtype=torch.int32, device=DEV)
    qs = torch.tensor([3, 2], dtype=torch.int32, device=DEV)
    q = torch.randn(2, 3, 4, d, device=DEV, dtype=dtype)
    outs = [branch_attention_with_kvcache(q, k_cache, v_cache, lens, seg_c, br_c, q_seqlens=qs, block_table=table,
                                          check_values=False, backend="cuda")]
    outs.append(_cuda.branch_attention_with_kvcache(q, k_cache, v_cache, lens, seg_c, br_c, qs, table, 0.125, 3))
    k = torch.randn(2, 3, 2, d, device=DEV, dtype=dtype)
    ids = torch.ones(2, 3, dtype=torch.int32, device=DEV)
    csc = rope_cos_sin_cache(_inv_freq(d), 8).to(DEV)
    q_rot = rope_append_kv(q, k, k.clone(), torch.zeros(2, 3, dtype=torch.int32, device=DEV), csc, k_cache, v_cache,
                           seg_c, br_c, lens, ids, ids, q_seqlens=qs, block_table=table, check_values=False,
                           backend="cuda")
    torch.cuda.synchronize()
    for out in outs:
        assert (out == 0).all()
    torch.testing.assert_close(q_rot, q, atol=0, rtol=0)  # position 0: cos 1, sin 0


def test_decode_cuda_graph_capture():
    dtype = torch.bfloat16
    raw = make_cache(21, batch=3, hkv=2, d=128, dtype=dtype, paged=True, max_tokens=250)
    cache = to_dev(raw)
    q_seqlens = ragged(4, raw["cache_seqlens"]).to(DEV)
    q = torch.randn(3, 4, 8, 128, device=DEV).to(dtype)

    def step():
        return branch_attention_with_kvcache(q, cache["k_cache"], cache["v_cache"], cache["cache_seqlens"],
                                             cache["segment"], cache["branch"], q_seqlens=q_seqlens,
                                             block_table=cache["block_table"], check_values=False, backend="cuda")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (kernel attributes, allocator pools)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    q.copy_(torch.randn_like(q))  # new inputs in the captured buffers
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, step(), atol=0, rtol=0)
    check(static_out, reference(raw, q.cpu(), q_seqlens.cpu()), q_seqlens.cpu(), dtype)


def _direct_decode_args() -> dict:
    c = to_dev(make_cache(41, batch=2, hkv=2, d=64, dtype=torch.float16, paged=True, max_tokens=60, poison=False))
    return dict(q=torch.randn(2, 3, 4, 64, device=DEV).half(), k_cache=c["k_cache"], v_cache=c["v_cache"],
                cache_seqlens=c["cache_seqlens"], segment=c["segment"], branch=c["branch"],
                q_seqlens=torch.tensor([3, 1], dtype=torch.int32, device=DEV), block_table=c["block_table"],
                softmax_scale=0.125, num_splits=0)


def _strided_last(t: torch.Tensor) -> torch.Tensor:
    """t's shape with a last-dim stride of 2."""
    return torch.stack([t, t], dim=-1)[..., 0]


DIRECT_DECODE_CASES = [
    ("q must be a CUDA tensor", ValueError, lambda a: dict(q=a["q"].cpu())),
    ("k_cache and v_cache must have q's dtype", TypeError,
     lambda a: dict(k_cache=a["k_cache"].float(), v_cache=a["v_cache"].float())),
    ("k_cache must have a contiguous last dimension", ValueError,
     lambda a: dict(k_cache=_strided_last(a["k_cache"]), v_cache=_strided_last(a["v_cache"]))),
    ("multiple of Hkv", ValueError, lambda a: dict(q=a["q"][:, :, :3])),
    ("head size 320", ValueError, lambda a: dict(q=torch.zeros(2, 3, 4, 320, device=DEV).half(),
                                                 k_cache=torch.zeros(*a["k_cache"].shape[:3], 320, device=DEV).half(),
                                                 v_cache=torch.zeros(*a["v_cache"].shape[:3], 320, device=DEV).half())),
    ("unsupported dtype", TypeError, lambda a: dict(q=a["q"].int(), k_cache=a["k_cache"].int(),
                                                    v_cache=a["v_cache"].int())),
    ("cache_seqlens must be int32", TypeError, lambda a: dict(cache_seqlens=a["cache_seqlens"].long())),
    ("q_seqlens must have B entries", ValueError, lambda a: dict(q_seqlens=a["q_seqlens"][:1])),
    ("segment must be contiguous", ValueError, lambda a: dict(segment=a["segment"].t().contiguous().t())),
    ("segment and branch must be", ValueError, lambda a: dict(segment=a["segment"][:, :5].contiguous())),
    ("block_table must be", ValueError, lambda a: dict(block_table=a["block_table"][:1])),
    ("a contiguous k_cache must have B rows", ValueError, lambda a: dict(block_table=None)),
    ("num_splits", ValueError, lambda a: dict(num_splits=5000)),
]


@pytest.mark.parametrize("what,exc,change", DIRECT_DECODE_CASES, ids=[c[0] for c in DIRECT_DECODE_CASES])
def test_direct_decode_call_rejects(what, exc, change):
    """torch.ops.aspd.cuda_decode_attention called directly (no Python checks): an exception naming the
    argument, never a launch on bad pointers."""
    a = _direct_decode_args()
    a.update(change(a))
    with pytest.raises(exc, match=what):
        torch.ops.aspd.cuda_decode_attention(**a)
    torch.cuda.synchronize()


def test_direct_rope_and_remap_calls_reject():
    c = to_dev(make_cache(43, batch=2, hkv=2, d=64, dtype=torch.float16, max_tokens=60, poison=False))
    q = torch.randn(2, 3, 4, 64, device=DEV).half()
    k = torch.randn(2, 3, 2, 64, device=DEV).half()
    ids = torch.ones(2, 3, dtype=torch.int32, device=DEV)
    csc = rope_cos_sin_cache(_inv_freq(64), 16).to(DEV)
    base = dict(q=q, k=k, v=k.clone(), positions=torch.zeros(2, 3, dtype=torch.int32, device=DEV), cos_sin_cache=csc,
                k_cache=c["k_cache"], v_cache=c["v_cache"], segment_cache=c["segment"], branch_cache=c["branch"],
                cache_seqlens=c["cache_seqlens"], segment=ids, branch=ids,
                q_seqlens=torch.tensor([3, 3], dtype=torch.int32, device=DEV), block_table=None)
    torch.ops.aspd.cuda_rope_append_kv(**base)
    cases = [
        ("k must have q's dtype", TypeError, dict(k=k.float())),
        ("positions must be int32 or int64", TypeError, dict(positions=base["positions"].float())),
        ("positions must be a contiguous", ValueError, dict(positions=torch.zeros(3, 2, dtype=torch.int32,
                                                                                  device=DEV).t())),
        ("cos_sin_cache must be float32", TypeError, dict(cos_sin_cache=csc.double())),
        ("cos_sin_cache must be \\[P > 0, rot_dim\\]", ValueError, dict(cos_sin_cache=csc[:, :3].contiguous())),
        ("k and v must be", ValueError, dict(v=k[:, :2].contiguous())),
        ("k_cache and v_cache must be", ValueError, dict(k=k[:, :, :1].contiguous(), v=k[:, :, :1].contiguous())),
        ("segment_cache and branch_cache must be", ValueError, dict(segment_cache=c["segment"][:, :4].contiguous())),
        ("segment and branch must be \\[B, L\\]", ValueError, dict(segment=ids[:, :2].contiguous())),
        ("block_table must be int32", TypeError, dict(block_table=torch.zeros(2, 1, device=DEV))),
    ]
    for what, exc, change in cases:
        with pytest.raises(exc, match=what):
            torch.ops.aspd.cuda_rope_append_kv(**{**base, **change})
    seg = torch.zeros(4, dtype=torch.int32, device=DEV)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEV)
    for what, exc, args in [
        ("strategy code", ValueError, (seg, seg, cu, 7, 0)),
        ("cu_seqlens must hold", ValueError, (seg, seg, cu[:1], 0, 0)),
        ("branch must have segment's length", ValueError, (seg, seg[:3], cu, 0, 0)),
        ("segment must be int32", TypeError, (seg.long(), seg, cu, 0, 0)),
    ]:
        with pytest.raises(exc, match=what):
            torch.ops.aspd.cuda_remap_positions(*args)
    torch.cuda.synchronize()


def test_auto_picks_cuda():
    assert _dispatch.resolve("branch_attention_with_kvcache", torch.device(DEV)) == "cuda"
    assert _dispatch.resolve("rope_append_kv", torch.device(DEV)) == "cuda"
    assert _dispatch.resolve("remap_positions", torch.device(DEV)) == "cuda"


@pytest.mark.parametrize("dtype, d, expect", [
    (torch.bfloat16, 128, "cuda"),    # the tensor-core kernel
    (torch.float16, 96, "triton"),    # the extension would run its generic kernel: auto passes it over
    (torch.float32, 64, "triton"),
    (torch.float64, 64, "cuda"),      # Triton computes in float32 at most: the generic kernel keeps float64
])
def test_auto_keeps_the_generic_kernel_off_the_default_path(monkeypatch, dtype, d, expect):
    # the package re-exports the op under its module's name: `import a.b as m` would give the function
    op_module = importlib.import_module("aspd_kernels.branch_attention_with_kvcache")

    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    ran = []
    real = op_module.implementation
    monkeypatch.setattr(op_module, "implementation", lambda backend, op: ran.append(backend) or real(backend, op))
    q = torch.randn(1, 2, 4, d, dtype=dtype, device=DEV)
    k = torch.randn(1, 32, 2, d, dtype=dtype, device=DEV)
    ids = torch.zeros(1, 32, dtype=torch.int32, device=DEV)
    lens = torch.tensor([20], dtype=torch.int32, device=DEV)
    branch_attention_with_kvcache(q, k, k, lens, ids, ids)
    assert ran == [expect]


def _inv_freq(rot_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("rot_dim,d", [(128, 128), (64, 128), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_append_kv_vs_reference(dtype, rot_dim, d, paged, pos_dtype):
    bsz, lq, hq, hkv = 3, 7, 8, 2
    cache = make_cache(5 + paged + d, batch=bsz, hkv=hkv, d=d, dtype=dtype, paged=paged, extra=12)
    q_seqlens = torch.tensor([7, 3, 0], dtype=torch.int32)
    after = cache["cache_seqlens"] + q_seqlens
    q = torch.randn(bsz, lq, hq, d).to(dtype)
    k = torch.randn(bsz, lq, hkv, d).to(dtype)
    v = torch.randn(bsz, lq, hkv, d).to(dtype)
    pos = torch.randint(0, 4000, (bsz, lq)).to(pos_dtype)
    seg = torch.full((bsz, lq), 60, dtype=torch.int32)
    br = torch.randint(1, 5, (bsz, lq), dtype=torch.int32)
    csc = rope_cos_sin_cache(_inv_freq(rot_dim), 4096)
    names = ("k_cache", "v_cache", "segment", "branch")
    ref_caches = [cache[n].clone() for n in names]
    ref_q = R.rope_append_kv(q, k, v, pos, csc, *ref_caches, after, seg, br, q_seqlens=q_seqlens,
                             block_table=cache["block_table"])
    dev_caches = [cache[n].to(DEV) for n in names]
    poison_allocator()
    q_rot = rope_append_kv(q.to(DEV), k.to(DEV), v.to(DEV), pos.to(DEV), csc.to(DEV), *dev_caches, after.to(DEV),
                           seg.to(DEV), br.to(DEV), q_seqlens=q_seqlens.to(DEV),
                           block_table=None if cache["block_table"] is None else cache["block_table"].to(DEV),
                           backend="cuda")
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    # one rounding of the fp32 result vs the reference's rounding of its float64 result: one ulp apart at most
    torch.testing.assert_close(q_rot.cpu().double(), ref_q.double(), atol=tol, rtol=tol)
    for got, ref in zip(dev_caches, ref_caches):
        torch.testing.assert_close(got.cpu().double(), ref.double(), atol=tol, rtol=tol, equal_nan=True)


def test_rope_append_kv_prefill_longer_than_65535():
    """One launch for a 70k-token prefill: the grid's x dimension is the token index (no 65535 limit there)."""
    dtype, L, d = torch.float16, 70_000, 64
    q = torch.randn(1, L, 2, d, device=DEV).to(dtype)
    k = torch.randn(1, L, 1, d, device=DEV).to(dtype)
    v = torch.randn(1, L, 1, d, device=DEV).to(dtype)
    pos = torch.arange(L, device=DEV, dtype=torch.int32)[None]
    csc = rope_cos_sin_cache(_inv_freq(d), L).to(DEV)
    k_cache = torch.full((1, L + 8, 1, d), float("nan"), dtype=dtype, device=DEV)
    v_cache = torch.full_like(k_cache, float("nan"))
    seg_c, br_c = (torch.full((1, L + 8), -7, dtype=torch.int32, device=DEV) for _ in range(2))
    seg = torch.zeros(1, L, dtype=torch.int32, device=DEV)
    lens = torch.tensor([L], dtype=torch.int32, device=DEV)
    q_rot = rope_append_kv(q, k, v, pos, csc, k_cache, v_cache, seg_c, br_c, lens, seg, seg, backend="cuda")
    cs = csc.double()[pos[0].long()][:, None, :]
    cos, sin = cs[..., : d // 2], cs[..., d // 2:]
    tol = TOL[dtype]
    torch.testing.assert_close(q_rot[0].double(), R.rotate_half(q[0].double(), cos, sin), atol=tol, rtol=tol)
    torch.testing.assert_close(k_cache[0, :L].double(), R.rotate_half(k[0].double(), cos, sin), atol=tol, rtol=tol)
    assert torch.equal(v_cache[0, :L], v[0])
    assert (seg_c[0, :L] == 0).all() and (br_c[0, :L] == 0).all() and (seg_c[0, L:] == -7).all()
    assert torch.isnan(k_cache[0, L:]).all()


@pytest.mark.parametrize("width", [None, 5])
@pytest.mark.parametrize("strategy", R.STRATEGIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_remap_positions_vs_reference(seed, strategy, width):
    if width is not None and strategy != "fixed-length":
        pytest.skip("width only matters for fixed-length")
    seg, br, cu = random_batch(seed, batch=5, max_tokens=700)
    ref = R.remap_positions(seg, br, strategy, cu, width)
    got = remap_positions(seg.to(DEV), br.to(DEV), strategy, cu.to(DEV), width, backend="cuda")
    assert got.dtype == torch.int32
    torch.testing.assert_close(got.cpu(), ref, atol=0, rtol=0)


def test_remap_positions_large_branch_ids_and_long_sections():
    """Branch ids beyond the shared-memory table (1024) take the global-count path; sections span many chunks."""
    seg = torch.tensor([0] * 70 + [1] * 300 + [2] * 5, dtype=torch.int32)
    ids = torch.tensor([3, 2000, 7, 1500], dtype=torch.int32)
    br = torch.cat([torch.zeros(70, dtype=torch.int32), ids[torch.randint(0, 4, (300,))],
                    torch.zeros(5, dtype=torch.int32)])
    for strategy in R.STRATEGIES:
        ref = R.remap_positions(seg, br, strategy)
        got = remap_positions(seg.to(DEV), br.to(DEV), strategy, check_values=False, backend="cuda")
        torch.testing.assert_close(got.cpu(), ref, atol=0, rtol=0)


def test_opcheck_and_compile_with_cuda_backend():
    """The public ops stay opcheck-clean and compile with fullgraph=True when they run the CUDA kernels."""
    dtype = torch.bfloat16
    raw = make_cache(31, batch=2, hkv=2, d=64, dtype=dtype, paged=True, max_tokens=120, extra=8, poison=False)
    c = to_dev(raw)
    q = torch.randn(2, 3, 4, 64, device=DEV).to(dtype)
    qs = torch.tensor([3, 1], dtype=torch.int32, device=DEV)
    torch.library.opcheck(torch.ops.aspd.branch_attention_with_kvcache.default,
                          (q, c["k_cache"], c["v_cache"], c["cache_seqlens"], c["segment"], c["branch"], qs,
                           c["block_table"], 0.125, "cuda"))
    seg, br, cu = (t.to(DEV) for t in random_batch(4, batch=2, max_tokens=50))
    torch.library.opcheck(torch.ops.aspd.remap_positions.default, (seg, br, cu, "fixed-length", 0, "cuda"))
    k = torch.randn(2, 3, 2, 64, device=DEV).to(dtype)
    pos = torch.randint(0, 50, (2, 3), dtype=torch.int32, device=DEV)
    ids = torch.full((2, 3), 99, dtype=torch.int32, device=DEV)
    csc = rope_cos_sin_cache(_inv_freq(64), 64).to(DEV)
    after = (c["cache_seqlens"] + qs).to(torch.int32)
    torch.library.opcheck(torch.ops.aspd.rope_append_kv.default,
                          (q, k, k.clone(), pos, csc, c["k_cache"], c["v_cache"], c["segment"], c["branch"], after,
                           ids, ids, qs, c["block_table"], "cuda"))

    def step(q):
        return branch_attention_with_kvcache(q, c["k_cache"], c["v_cache"], c["cache_seqlens"], c["segment"],
                                             c["branch"], q_seqlens=qs, block_table=c["block_table"],
                                             check_values=False, backend="cuda")

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q), step(q), atol=0, rtol=0)


# ---------------------------------------------------------------- offsets past 2**31 elements

import large_buffers as lb  # noqa: E402

# The large-offset scenarios of test_large_offsets.py on the CUDA kernels: caches, q/k/v views and outputs whose
# rows or heads lie past element 2**31, compared with the float64 reference on small copies. Real GPU memory: up to
# ~30 GiB for a scenario (each buffer has a 2**31-element guard in front, where a wrapped offset would land), and
# 24 GiB for the positions at N = 2**31 - 1; each test frees its buffers.
LARGE_SCENARIOS = [lb.decode_contiguous_cache, lb.decode_paged_cache, lb.decode_query_rows,
                   lb.decode_head_major_views, lb.decode_output_rows, lb.rope_contiguous_cache, lb.rope_paged_cache,
                   lb.positions_at_int32_limit]


@pytest.fixture
def free_gpu_after():
    yield
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("scenario", LARGE_SCENARIOS, ids=lambda f: f.__name__)
def test_offsets_beyond_2_31(scenario, free_gpu_after):
    scenario("cuda", DEV)


@pytest.mark.parametrize("layout", ["head-major", "batch-major"])
def test_rope_input_views_beyond_2_31(layout, free_gpu_after):
    lb.rope_input_views(layout, "cuda", DEV)
