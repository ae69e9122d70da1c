"""Triton kernels address tensors beyond 2**31 elements in 64-bit: no silent int32 wraparound.

The bug class: ``row * stride`` computed in int32 wraps once a tensor passes 2**31 elements, and on a GPU the load
then reads (or the store writes) another place without any error. The other tests use small tensors and never get
there. Here every tensor the kernels index is as large as it must be, but on the CPU it costs almost nothing:
``torch.empty`` of several GiB only reserves address space (Linux commits a page when it is first written, and an
untouched page reads as the shared zero page), and a test writes only the few rows a kernel reads. The Triton
interpreter computes int32 arithmetic in int32 (numpy), wrapping exactly as the GPU does, so these tests fail on a
kernel that forgets a 64-bit cast (checked by removing casts one at a time: see each test's docstring).

Every large buffer starts with ``GUARD`` elements nobody writes: an offset that wrapped (to ``o - 2**32``, which
lies in ``[-2**31, 0)`` for ``o < 2**32``) lands there, in mapped memory, so a wraparound shows up as a wrong
number or an output row left NaN, not as a crash. Resident memory per test stays below ~300 MiB (the written rows,
the checks' temporaries); address space reserved at once is below 25 GiB, each buffer below 12 GiB (Linux's
default overcommit refuses a single mapping larger than RAM + swap). On a GPU (where these tests also run, on
the triton backend) the same buffers are real memory: the largest test needs about 30 GiB.

Head sizes 32, few heads and tokens, so each test launches a handful of interpreted programs.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import gc  # noqa: E402
import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from layouts import random_layout  # noqa: E402

from aspd_kernels import branch_attention, branch_attention_with_kvcache, rope_append_kv, rope_cos_sin_cache  # noqa: E402,E501
from aspd_kernels import reference as R  # noqa: E402

tba = importlib.import_module("aspd_kernels.triton.branch_attention")
rp = importlib.import_module("aspd_kernels.triton.remap_positions")

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
INT32_LIMIT = 2 ** 31
GUARD = 2 ** 31  # elements reserved before every large view; a wrapped int32 offset falls into them
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def _release():
    """Large buffers go back to the OS (CPU) or the driver (GPU) after each test."""
    yield
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def lazy_view(shape, strides, dtype) -> torch.Tensor:
    """A view ``shape``/``strides`` into a fresh buffer of ``GUARD`` + its extent, all left unwritten.

    Skips the test (with the reason) only when the address space itself cannot be reserved."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    size = GUARD + extent
    try:
        buf = torch.empty(size, dtype=dtype, device=DEVICE)
    except (RuntimeError, MemoryError) as exc:  # the allocation, not the kernel
        gib = size * torch.empty((), dtype=dtype).element_size() / 2 ** 30
        pytest.skip(f"cannot reserve {gib:.1f} GiB for a large-offset buffer: {exc}")
    return buf.as_strided(shape, strides, GUARD)


def lazy(shape, dtype) -> torch.Tensor:
    """A contiguous ``lazy_view``."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.insert(0, acc)
        acc *= n
    return lazy_view(shape, strides, dtype)


def guard_written(t: torch.Tensor, n: int = 1 << 16) -> bool:
    """Whether a kernel wrote into the first ``n`` guard elements of ``lazy_view`` ``t``: where an index just past
    2**31 lands once it wraps around (``GUARD + i - 2**32 = i - 2**31``)."""
    return bool(torch.count_nonzero(t._base[:n]))


def last_element(t: torch.Tensor) -> int:
    """Offset, in elements from the view's start, of the last element (the largest offset a kernel may form)."""
    return sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


# ---------------------------------------------------------------- branch_attention_with_kvcache

def _layouts(lens, seed):
    """Random branch layouts of exactly ``lens[b]`` tokens (prefixes of longer random layouts)."""
    out = []
    for b, n in enumerate(lens):
        seg, br = random_layout(seed * 10 + b, max_tokens=n + 40)
        assert seg.numel() >= n
        out.append((seg[:n], br[:n]))
    return out


def _decode_case(q, k_cache, v_cache, seg_cache, br_cache, lens, lq, block_table=None, seed=0):
    """Writes random K/V and layouts into the slots sequence ``b`` uses (``lens[b]``), NaN into the next 8 slots
    (a kernel that reads past ``cache_seqlens`` returns NaN), runs the triton op and compares it with the float64
    reference run on small gathered copies."""
    bsz, _, hq, d = q.shape
    hkv = k_cache.shape[2]
    dtype = q.dtype
    page = k_cache.shape[1] if block_table is not None else None
    nmax = max(lens)
    k_small = torch.zeros(bsz, nmax, hkv, d, dtype=torch.float64)
    v_small = torch.zeros_like(k_small)
    seg_small = torch.zeros(bsz, nmax, dtype=torch.int32)
    br_small = torch.zeros_like(seg_small)

    def where(b, slots):
        if block_table is None:
            return (b, slots)
        return (block_table[b, slots // page].long().cpu(), slots % page)

    for b, (seg, br) in enumerate(_layouts(lens, seed)):
        n = lens[b]
        kb = torch.randn(n, hkv, d).to(dtype)
        vb = torch.randn(n, hkv, d).to(dtype)
        k_small[b, :n], v_small[b, :n], seg_small[b, :n], br_small[b, :n] = kb.double(), vb.double(), seg, br
        idx = where(b, torch.arange(n))
        k_cache[idx], v_cache[idx] = kb.to(DEVICE), vb.to(DEVICE)
        seg_cache[idx], br_cache[idx] = seg.to(DEVICE), br.to(DEVICE)
        spare = torch.arange(n, n + 8)
        if block_table is None or int(spare[-1]) < block_table.shape[1] * page:
            k_cache[where(b, spare)] = float("nan")
            v_cache[where(b, spare)] = float("nan")
    q_small = torch.randn(bsz, lq, hq, d).to(dtype)
    q.copy_(q_small.to(DEVICE))
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    q_seqlens = torch.minimum(torch.full((bsz,), lq, dtype=torch.int32), cache_seqlens)
    q_seqlens[0] = max(1, lq // 2)  # a ragged step: padding rows must come back 0
    out = branch_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens.to(DEVICE), seg_cache, br_cache,
                                        q_seqlens=q_seqlens.to(DEVICE), block_table=block_table, backend="triton")
    ref = R.branch_attention_with_kvcache(q_small.double(), k_small, v_small, cache_seqlens, seg_small, br_small,
                                          q_seqlens=q_seqlens)
    assert torch.isfinite(out).all(), "NaN: a kernel read a poisoned slot (or the wrapped guard of a buffer)"
    torch.testing.assert_close(out.double().cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_decode_contiguous_cache_beyond_2_31():
    """Cache ``[3, Ncap, 2, 32]``: sequence 2 starts at element ``2 * Ncap * 64 > 2**31`` (``b * stride_b``).
    Fails with ``b64 = b`` in place of ``b.to(tl.int64)`` in ``_decode_kernel``."""
    bsz, cap, hkv, d = 3, (1 << 24) + 3, 2, 32
    k_cache, v_cache = lazy((bsz, cap, hkv, d), torch.float16), lazy((bsz, cap, hkv, d), torch.float16)
    assert 2 * k_cache.stride(0) >= INT32_LIMIT > k_cache.stride(0)  # an int32 stride, an int64 product
    seg, br = lazy((bsz, cap), torch.int32), lazy((bsz, cap), torch.int32)
    q = torch.empty(bsz, 3, 4, d, dtype=torch.float16, device=DEVICE)
    _decode_case(q, k_cache, v_cache, seg, br, lens=[50, 97, 130], lq=3)


def test_decode_paged_cache_pages_beyond_2_31():
    """Paged cache whose block tables point at pages past element 2**31 (``block * stride_page``), interleaved
    with pages below it. Fails without the ``.to(tl.int64)`` of the block ids in ``_decode_kernel``."""
    page, hkv, d = 16, 2, 32
    num_pages = (3 << 30) // (page * hkv * d)  # 3 * 2**30 elements
    k_cache = lazy((num_pages, page, hkv, d), torch.float16)
    v_cache = lazy((num_pages, page, hkv, d), torch.float16)
    seg, br = lazy((num_pages, page), torch.int32), lazy((num_pages, page), torch.int32)
    first_high = INT32_LIMIT // k_cache.stride(0)  # the first page starting at element 2**31
    lens = [40, 120]
    per_seq = 9
    table = torch.tensor([[first_high + 5 * j if j % 2 else 7 + j for j in range(per_seq)],
                          [num_pages - 1 - j for j in range(per_seq)]], dtype=torch.int32)
    q = torch.empty(2, 4, 4, d, dtype=torch.float16, device=DEVICE)
    _decode_case(q, k_cache, v_cache, seg, br, lens=lens, lq=4, block_table=table.to(DEVICE), seed=1)


def test_decode_query_rows_beyond_2_31():
    """``q`` a view whose sequence 2 starts past element 2**31 (``b * stride_qb``). Fails with ``b64 = b``."""
    bsz, lq, hq, d = 3, 2, 4, 32
    q = lazy_view((bsz, lq, hq, d), ((1 << 30) + 64, hq * d, d, 1), torch.float16)
    assert last_element(q) >= INT32_LIMIT
    k_cache = torch.empty(bsz, 160, 2, d, dtype=torch.float16, device=DEVICE)
    seg = torch.zeros(bsz, 160, dtype=torch.int32, device=DEVICE)
    br = torch.zeros_like(seg)
    _decode_case(q, k_cache, torch.empty_like(k_cache), seg, br, lens=[31, 150, 77], lq=lq, seed=2)


def test_decode_head_major_views_beyond_2_31():
    """q and the cache as head-major views (``[B, H, N, D]`` storage, as Hugging Face keeps its cache, seen as
    ``[B, N, H, D]``): head ``h`` starts at ``h * N * D``, past 2**31 for the last heads of one sequence
    (``head * stride_h``, an int32 index times an int32 stride)."""
    bsz, cap, hkv, d, lq, hq = 1, (1 << 25) + 16, 3, 32, 2, 6
    k_cache = lazy_view((bsz, cap, hkv, d), (hkv * cap * d, d, cap * d, 1), torch.float16)
    v_cache = lazy_view((bsz, cap, hkv, d), (hkv * cap * d, d, cap * d, 1), torch.float16)
    assert (hkv - 1) * k_cache.stride(2) >= INT32_LIMIT > k_cache.stride(2)
    q_stride_h = (1 << 29) + 64
    q = lazy_view((bsz, lq, hq, d), (hq * q_stride_h, d, q_stride_h, 1), torch.float16)
    assert (hq - 1) * q_stride_h >= INT32_LIMIT
    seg, br = lazy((bsz, cap), torch.int32), lazy((bsz, cap), torch.int32)
    _decode_case(q, k_cache, v_cache, seg, br, lens=[90], lq=lq, seed=3)


# ---------------------------------------------------------------- rope_append_kv

def _rope_case(q, k, v, k_cache, v_cache, seg_cache, br_cache, lens, block_table=None, pos_dtype=torch.int32):
    """Random q, k, v (written through their views), the cache slots the step may touch poisoned (NaN, ids -7),
    the triton op against the float64 reference run on small copies of those slots: q_rot and every poisoned slot
    must match (written ones rotated, the others untouched)."""
    bsz, lq, hq, d = q.shape
    dtype = q.dtype
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape).to(dtype).to(DEVICE))
    if block_table is None:
        sel = (slice(None), slice(0, max(lens) + 8))
        small_table = None
    else:
        used = torch.unique(block_table.cpu()).long()
        sel = (used.to(DEVICE),)
        small_table = torch.searchsorted(used, block_table.cpu().long()).to(torch.int32)
    caches = (k_cache, v_cache, seg_cache, br_cache)
    for c in caches:
        c[sel] = float("nan") if c.is_floating_point() else -7
    small = [c[sel].cpu().clone() for c in caches]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    cos_sin = rope_cos_sin_cache(inv_freq, 4096)
    positions = torch.randint(0, 4096, (bsz, lq), dtype=pos_dtype)
    seg = torch.sort(torch.randint(0, 4, (bsz, lq), dtype=torch.int32), dim=1).values
    br = torch.randint(0, 3, (bsz, lq), dtype=torch.int32)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    q_seqlens = torch.minimum(torch.full((bsz,), lq, dtype=torch.int32), cache_seqlens)
    q_seqlens[0] = max(1, lq // 2)  # padding rows: nothing written for them
    q_rot = rope_append_kv(q, k, v, positions.to(DEVICE), cos_sin.to(DEVICE), k_cache, v_cache, seg_cache, br_cache,
                           cache_seqlens.to(DEVICE), seg.to(DEVICE), br.to(DEVICE), q_seqlens=q_seqlens.to(DEVICE),
                           block_table=block_table, backend="triton")
    ref_q = R.rope_append_kv(q.cpu(), k.cpu(), v.cpu(), positions, cos_sin, *small, cache_seqlens, seg, br,
                             q_seqlens=q_seqlens, block_table=small_table)
    tol = TOL[dtype]
    torch.testing.assert_close(q_rot.cpu().double(), ref_q.double(), atol=tol, rtol=tol)
    for c, ref in zip(caches, small):
        got = c[sel].cpu()
        if c.is_floating_point():
            torch.testing.assert_close(got.double(), ref.double(), atol=tol, rtol=tol, equal_nan=True)
        else:
            assert torch.equal(got, ref)


def test_rope_contiguous_cache_beyond_2_31():
    """Cache ``[3, Ncap, 2, 32]``: sequence 2's slots lie past element 2**31 (``b * stride_cb``). Fails with
    ``b64 = b`` in ``_rope_append_kernel``."""
    bsz, cap, hkv, d = 3, (1 << 24) + 3, 2, 32
    k_cache, v_cache = lazy((bsz, cap, hkv, d), torch.float16), lazy((bsz, cap, hkv, d), torch.float16)
    assert 2 * k_cache.stride(0) >= INT32_LIMIT > k_cache.stride(0) and k_cache.is_contiguous()
    seg, br = lazy((bsz, cap), torch.int32), lazy((bsz, cap), torch.int32)
    q = torch.empty(bsz, 4, 4, d, dtype=torch.float16, device=DEVICE)
    k = torch.empty(bsz, 4, hkv, d, dtype=torch.float16, device=DEVICE)
    _rope_case(q, k, torch.empty_like(k), k_cache, v_cache, seg, br, lens=[9, 60, 131])


def test_rope_paged_cache_pages_beyond_2_31():
    """Block tables pointing at pages past element 2**31, int64 positions. Fails without the
    ``.to(tl.int64)`` of the block id in ``_rope_append_kernel``."""
    page, hkv, d = 16, 2, 32
    num_pages = (3 << 30) // (page * hkv * d)
    k_cache = lazy((num_pages, page, hkv, d), torch.float16)
    v_cache = lazy((num_pages, page, hkv, d), torch.float16)
    seg, br = lazy((num_pages, page), torch.int32), lazy((num_pages, page), torch.int32)
    first_high = INT32_LIMIT // k_cache.stride(0)
    table = torch.tensor([[first_high + 3 * j if j % 2 else 11 + j for j in range(6)],
                          [num_pages - 1 - j for j in range(6)]], dtype=torch.int32)
    q = torch.empty(2, 5, 4, d, dtype=torch.float16, device=DEVICE)
    k = torch.empty(2, 5, hkv, d, dtype=torch.float16, device=DEVICE)
    _rope_case(q, k, torch.empty_like(k), k_cache, v_cache, seg, br, lens=[21, 90], block_table=table.to(DEVICE),
               pos_dtype=torch.int64)


@pytest.mark.parametrize("layout", ["head-major", "batch-major"])
def test_rope_input_views_beyond_2_31(layout):
    """q, k, v as views whose last heads (head-major: ``h * stride_h``) or last sequence (batch-major:
    ``b * stride_b``) lie past element 2**31; the cache is small. Head-major fails with ``h`` / ``hk`` times an
    int32 stride (the kernel before its int64 head indices)."""
    bsz, lq, hq, hkv, d = (1 if layout == "head-major" else 3), 3, 6, 3, 32

    def view(heads, stride):
        if layout == "head-major":  # [B, H, L, D] storage seen as [B, L, H, D]
            return lazy_view((bsz, lq, heads, d), (heads * stride, d, stride, 1), torch.float16)
        return lazy_view((bsz, lq, heads, d), (stride, heads * d, d, 1), torch.float16)

    stride = (1 << 29) + 64 if layout == "head-major" else (1 << 30) + 64
    kv_stride = 2 * stride if layout == "head-major" else stride  # 3 KV heads: the last one past 2**31 too
    q, k, v = view(hq, stride), view(hkv, kv_stride), view(hkv, kv_stride)
    for t in (q, k, v):
        assert last_element(t) >= INT32_LIMIT
    k_cache = torch.empty(bsz, 64, hkv, d, dtype=torch.float16, device=DEVICE)
    seg = torch.empty(bsz, 64, dtype=torch.int32, device=DEVICE)
    _rope_case(q, k, v, k_cache, torch.empty_like(k_cache), seg, torch.empty_like(seg), lens=[5, 40, 17][:bsz])


# ---------------------------------------------------------------- branch_attention (prefill, forward and backward)

def _prefill_case(q, k, v, lens, seed=0):
    """Random q, k, v written through their views; the public op (which passes last-dim-contiguous views to the
    kernels as they are) forward and backward, with an lse gradient, against the float64 reference on small
    contiguous copies."""
    dtype = q.dtype
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape).to(dtype).to(DEVICE))
    ids = _layouts(lens, seed)
    seg = torch.cat([s for s, _ in ids]).to(DEVICE)
    br = torch.cat([b for _, b in ids]).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = branch_attention(*leaves, seg, br, cu, cu, max(lens), max(lens), return_lse=True, backend="triton")
    dout = torch.randn(out.shape).to(dtype).to(DEVICE)
    dlse = torch.randn(lse.shape, device=DEVICE)
    grads = torch.autograd.grad((out * dout).float().sum() + (lse * dlse).sum(), leaves)

    _compare_prefill(q, k, v, seg, br, cu, dout, dlse, out, lse, grads)


def _compare_prefill(q, k, v, seg, br, cu, dout, dlse, out, lse, grads):
    """out, lse and the gradients of ``sum(out * dout) + sum(lse * dlse)`` against the float64 reference."""
    small = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    rout, rlse = R.branch_attention(*small, seg.cpu(), br.cpu(), cu.cpu(), cu.cpu())
    rgrads = torch.autograd.grad((rout * dout.cpu().double()).sum() + (rlse * dlse.cpu().double()).sum(), small)
    out_tol, grad_tol = 2e-3, 1e-2  # fp16 outputs and gradients, rounded once from fp32
    torch.testing.assert_close(out.detach().cpu().double(), rout.detach(), atol=out_tol, rtol=out_tol)
    torch.testing.assert_close(lse.detach().cpu().double(), rlse.detach().double(), atol=2e-4, rtol=2e-4)
    for name, g, r in zip("qkv", grads, rgrads):
        torch.testing.assert_close(g.cpu().double(), r, atol=grad_tol, rtol=grad_tol, msg=lambda m: f"d{name}: {m}")


def test_prefill_packed_rows_beyond_2_31():
    """Every tensor of the forward and the backward (q, k, v, out, dout, dq, dk, dv) a view whose token stride puts
    the second (last) packed sequence past element 2**31: the ``row * stride_t`` products of a packed batch of more
    than 2**31 elements (about 512k tokens at H * D = 4096), reached with 64 tokens. ``lse`` is a head-strided view
    (``h * stride_lh``). The backend functions are called directly: the public op hands its own contiguous ``out``
    and ``dout.contiguous()`` to the backward, so only a truly large batch would reach these products through it.
    (``cu_seqlens`` are int32, so a token index fits; its product with a stride does not.)

    Fails when ``seq_bounds`` returns int32 starts (forward, dK/dV, dQ), and without the int64 rows of
    ``_bwd_preprocess_kernel`` (the kernel before this test: ``rows * stride_ot`` wrapped)."""
    lens, hq, hkv, d = [36, 28], 4, 2, 32
    total, stride_t = sum(lens), (1 << 26) + 64
    assert lens[0] * stride_t >= INT32_LIMIT

    def packed(heads):
        return lazy_view((total, heads, d), (stride_t, d, 1), torch.float16)

    q, k, v, out, dout, dq, dk, dv = (packed(h) for h in (hq, hkv, hkv, hq, hq, hq, hkv, hkv))
    stride_lh = (INT32_LIMIT // (hq - 1)) + 64
    lse = lazy_view((hq, total), (stride_lh, 1), torch.float32)
    for t in (q, k, v, dout):
        t.copy_(torch.randn(t.shape).to(t.dtype).to(DEVICE))
    for t in (out, lse, dq, dk, dv):
        t.fill_(float("nan"))  # every element the backend defines must be written
    ids = _layouts(lens, seed=4)
    seg = torch.cat([s for s, _ in ids]).to(DEVICE)
    br = torch.cat([b for _, b in ids]).to(DEVICE)
    cu = torch.tensor([0, lens[0], total], dtype=torch.int32, device=DEVICE)
    dlse = torch.randn(hq, total, device=DEVICE)
    scale = d ** -0.5
    tba.branch_attention_fwd(q, k, v, seg, br, cu, cu, max(lens), max(lens), scale, out=out, lse=lse)
    tba.branch_attention_bwd(dout, dlse, q, k, v, out, lse, seg, br, cu, cu, max(lens), max(lens), scale,
                             dq=dq, dk=dk, dv=dv)
    _compare_prefill(q, k, v, seg, br, cu, dout, dlse, out, lse, (dq, dk, dv))


def test_prefill_head_major_views_beyond_2_31():
    """q, k, v as head-major views (``[H, T, D]`` storage seen as ``[T, H, D]``, e.g. Hugging Face's
    ``[1, H, T, D]`` attention inputs transposed): the last heads start past element 2**31 (``h * stride_h``)."""
    lens, hq, hkv, d = [30, 34], 6, 3, 32
    total = sum(lens)
    q = lazy_view((total, hq, d), (d, (1 << 29) + 64, 1), torch.float16)
    k = lazy_view((total, hkv, d), (d, (1 << 30) + 128, 1), torch.float16)
    v = lazy_view((total, hkv, d), (d, (1 << 30) + 128, 1), torch.float16)
    for t in (q, k, v):
        assert (t.shape[1] - 1) * t.stride(1) >= INT32_LIMIT > t.stride(1)
    _prefill_case(q, k, v, lens, seed=5)


# ---------------------------------------------------------------- remap_positions

def test_positions_walk_at_the_int32_limit():
    """``remap_positions`` packs int32 ``cu_seqlens``, so N < 2**31, but the walk's tiles run past a sequence's end:
    a sequence ending at N = 2**31 - 1 has lanes ``t0 + offs >= 2**31`` that wrap to negative indices, pass the
    ``t < end`` mask and read and write before the tensors (on a GPU the tile loop itself overflows and spins).

    The walk kernel runs on one sequence of 131 tokens ending there (``cu = [N - 131, N]``: no other sequence to
    walk), for every strategy; its outputs are turned into positions here as ``_positions_kernel`` does (that
    kernel's grid covers all N tokens: too many programs for the interpreter; ``test_positions_final_step_gpu``
    runs it on a GPU). Fails with the int32 ``start``/``end`` of the kernel before this test."""
    n, length = INT32_LIMIT - 1, 131
    start = n - length
    seg_small, br_small = _layouts([length], seed=6)[0]
    bufs = {name: lazy((n,), torch.int32) for name in ("seg", "br", "rank", "sec_start", "sec_c0", "sec_w")}
    bufs["seg"][start:] = seg_small.to(DEVICE)
    bufs["br"][start:] = br_small.to(DEVICE)
    cu = torch.tensor([start, n], dtype=torch.int32, device=DEVICE)
    for strategy, code in rp._STRATEGY_CODE.items():
        for name in ("rank", "sec_start", "sec_c0", "sec_w"):
            bufs[name][start:] = -1
        rp._walk_kernel[(1,)](bufs["seg"], bufs["br"], cu, bufs["rank"], bufs["sec_start"], bufs["sec_c0"],
                              bufs["sec_w"], n, 0, STRATEGY=code, BLOCK=rp._BLOCK, MAX_BRANCHES=rp.MAX_BRANCHES)
        rank = bufs["rank"][start:].long().cpu()
        if code == 3:
            got = rank
        else:
            sec = bufs["sec_start"][start:].long().cpu()
            assert ((sec >= start) & (sec < n)).all(), f"{strategy}: section starts outside the sequence"
            c0 = bufs["sec_c0"][sec.to(DEVICE)].long().cpu()
            w = bufs["sec_w"][sec.to(DEVICE)].long().cpu()
            got = c0 + rank + (torch.where(br_small > 0, (br_small - 1) * w, 0) if code == 2 else 0)
        want = R.remap_positions(seg_small, br_small, strategy)
        assert torch.equal(got.to(torch.int32), want), strategy
        for name in ("rank", "sec_start", "sec_c0", "sec_w"):
            assert not guard_written(bufs[name]), f"{strategy}: {name} written at a wrapped (negative) index"
