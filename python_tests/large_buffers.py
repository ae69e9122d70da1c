"""Tensors past 2**31 elements at almost no memory cost, and the large-offset scenarios of the KV-cache ops, shared by
the Triton tests (``test_large_offsets.py``, interpreter on the CPU) and the CUDA tests (``test_cuda_kernels.py``).

On Linux ``torch.empty`` of several GiB only reserves address space: a page is committed when it is first written,
and an untouched page reads as the shared zero page. A scenario writes only the rows a kernel reads, so a tensor of
3 * 2**30 elements costs a few hundred KiB. Every large buffer starts with ``GUARD`` elements nobody writes: an
offset that wrapped around in int32 (``o - 2**32``, in ``[-2**31, 0)`` for ``o < 2**32``) lands there, in mapped
memory, so a wraparound shows up as a wrong number, not as a crash. On a GPU the same buffers are real memory.
"""
from __future__ import annotations

import pytest
import torch
from layouts import random_layout

from aspd_kernels import branch_attention_with_kvcache, remap_positions, rope_append_kv, rope_cos_sin_cache
from aspd_kernels import reference as R

INT32_LIMIT = 2 ** 31
GUARD = 2 ** 31  # elements reserved before every large view; a wrapped int32 offset falls into them
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}


def lazy_view(shape, strides, dtype, device, guard: bool = True) -> torch.Tensor:
    """A view ``shape``/``strides`` into a fresh buffer of ``GUARD`` (unless ``guard`` is false: for small
    buffers, whose offsets cannot wrap) + its extent, all left unwritten.

    Skips the test (with the reason) only when the buffer itself cannot be allocated."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    size = (GUARD if guard else 0) + extent
    try:
        buf = torch.empty(size, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:  # the allocation (torch.OutOfMemoryError is a RuntimeError)
        gib = size * torch.empty((), dtype=dtype).element_size() / 2 ** 30
        pytest.skip(f"cannot allocate {gib:.1f} GiB for a large-offset buffer: {exc}")
    if guard and buf.is_cuda:  # device memory comes uninitialised; the guard must read as zeros (guard_written)
        buf[:GUARD].zero_()
    return buf.as_strided(shape, strides, GUARD if guard else 0)


def need_device_memory(gib: float, device) -> None:
    """Skips (with the reason) when a GPU has less than ``gib`` GiB free for a scenario's real allocations."""
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0] / 2 ** 30
        if free < gib:
            pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free:.1f} GiB free")


def lazy(shape, dtype, device, guard: bool = True) -> torch.Tensor:
    """A contiguous ``lazy_view``."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.insert(0, acc)
        acc *= n
    return lazy_view(shape, strides, dtype, device, guard)


def id_buffers(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lazily allocated int32 ``(segment, branch)`` buffers of a cache; below 2**31 elements, so unguarded."""
    return lazy(shape, torch.int32, device, guard=False), lazy(shape, torch.int32, device, guard=False)


def guard_written(t: torch.Tensor, n: int = 1 << 16) -> bool:
    """Whether a kernel wrote into the first ``n`` guard elements of ``lazy_view`` ``t``: where an index just past
    2**31 lands once it wraps around (``GUARD + i - 2**32 = i - 2**31``). The guard is never written by a test."""
    return bool(torch.count_nonzero(t._base[:n]))


def last_element(t: torch.Tensor) -> int:
    """Offset, in elements from the view's start, of its last element (the largest offset a kernel may form)."""
    return sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def exact_layouts(lens, seed):
    """Random branch layouts of exactly ``lens[b]`` tokens (prefixes of longer random layouts)."""
    out = []
    for b, n in enumerate(lens):
        seg, br = random_layout(seed * 10 + b, max_tokens=n + 40)
        assert seg.numel() >= n
        out.append((seg[:n], br[:n]))
    return out


# ---------------------------------------------------------------- branch_attention_with_kvcache

def decode_case(q, k_cache, v_cache, seg_cache, br_cache, lens, lq, backend, block_table=None, seed=0):
    """Writes random K/V and layouts into the slots sequence ``b`` uses (``lens[b]``), NaN into the next 8 slots
    (a kernel that reads past ``cache_seqlens`` returns NaN), runs the op and compares it with the float64
    reference run on small gathered copies."""
    device = q.device
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
            return (b, slots.to(device))
        return (block_table[b, (slots // page).to(device)].long(), (slots % page).to(device))

    for b, (seg, br) in enumerate(exact_layouts(lens, seed)):
        n = lens[b]
        kb = torch.randn(n, hkv, d).to(dtype)
        vb = torch.randn(n, hkv, d).to(dtype)
        k_small[b, :n], v_small[b, :n], seg_small[b, :n], br_small[b, :n] = kb.double(), vb.double(), seg, br
        idx = where(b, torch.arange(n))
        k_cache[idx], v_cache[idx] = kb.to(device), vb.to(device)
        seg_cache[idx], br_cache[idx] = seg.to(device), br.to(device)
        spare = torch.arange(n, n + 8)
        if block_table is None or int(spare[-1]) < block_table.shape[1] * page:
            k_cache[where(b, spare)] = float("nan")
            v_cache[where(b, spare)] = float("nan")
    q_small = torch.randn(bsz, lq, hq, d).to(dtype)
    q.copy_(q_small.to(device))
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    q_seqlens = torch.minimum(torch.full((bsz,), lq, dtype=torch.int32), cache_seqlens)
    q_seqlens[0] = max(1, lq // 2)  # a ragged step: padding rows must come back 0
    out = branch_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens.to(device), seg_cache, br_cache,
                                        q_seqlens=q_seqlens.to(device), block_table=block_table, backend=backend)
    ref = R.branch_attention_with_kvcache(q_small.double(), k_small, v_small, cache_seqlens, seg_small, br_small,
                                          q_seqlens=q_seqlens)
    assert torch.isfinite(out).all(), "NaN: a kernel read a poisoned slot"
    torch.testing.assert_close(out.double().cpu(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def decode_contiguous_cache(backend, device):
    """Cache ``[3, Ncap, 2, 32]``: sequence 2 starts at element ``2 * Ncap * 64 > 2**31`` (``b * stride_b``)."""
    bsz, cap, hkv, d = 3, (1 << 24) + 3, 2, 32
    k_cache = lazy((bsz, cap, hkv, d), torch.float16, device)
    v_cache = lazy((bsz, cap, hkv, d), torch.float16, device)
    assert 2 * k_cache.stride(0) >= INT32_LIMIT > k_cache.stride(0)  # an int32 stride, an int64 product
    seg, br = id_buffers((bsz, cap), device)
    q = torch.empty(bsz, 3, 4, d, dtype=torch.float16, device=device)
    decode_case(q, k_cache, v_cache, seg, br, lens=[50, 97, 130], lq=3, backend=backend)


def decode_paged_cache(backend, device):
    """Paged cache whose block tables point at pages past element 2**31 (``block * stride_page``), interleaved
    with pages below it."""
    page, hkv, d = 16, 2, 32
    num_pages = (3 << 30) // (page * hkv * d)  # 3 * 2**30 elements
    k_cache = lazy((num_pages, page, hkv, d), torch.float16, device)
    v_cache = lazy((num_pages, page, hkv, d), torch.float16, device)
    seg, br = id_buffers((num_pages, page), device)
    first_high = INT32_LIMIT // k_cache.stride(0)  # the first page starting at element 2**31
    per_seq = 9
    table = torch.tensor([[first_high + 5 * j if j % 2 else 7 + j for j in range(per_seq)],
                          [num_pages - 1 - j for j in range(per_seq)]], dtype=torch.int32)
    q = torch.empty(2, 4, 4, d, dtype=torch.float16, device=device)
    decode_case(q, k_cache, v_cache, seg, br, lens=[40, 120], lq=4, backend=backend, block_table=table.to(device),
                seed=1)


def decode_query_rows(backend, device):
    """``q`` a view whose sequence 2 starts past element 2**31 (``b * stride_qb``)."""
    bsz, lq, hq, d = 3, 2, 4, 32
    q = lazy_view((bsz, lq, hq, d), ((1 << 30) + 64, hq * d, d, 1), torch.float16, device)
    assert last_element(q) >= INT32_LIMIT
    k_cache = torch.empty(bsz, 160, 2, d, dtype=torch.float16, device=device)
    seg = torch.zeros(bsz, 160, dtype=torch.int32, device=device)
    decode_case(q, k_cache, torch.empty_like(k_cache), seg, torch.zeros_like(seg), lens=[31, 150, 77], lq=lq,
                backend=backend, seed=2)


def decode_head_major_views(backend, device):
    """q and the cache as head-major views (``[B, H, N, D]`` storage, as Hugging Face keeps its cache, seen as
    ``[B, N, H, D]``): head ``h`` starts at ``h * N * D``, past 2**31 for the last heads of one sequence."""
    bsz, cap, hkv, d, lq, hq = 1, (1 << 25) + 16, 3, 32, 2, 6
    k_cache = lazy_view((bsz, cap, hkv, d), (hkv * cap * d, d, cap * d, 1), torch.float16, device)
    v_cache = lazy_view((bsz, cap, hkv, d), (hkv * cap * d, d, cap * d, 1), torch.float16, device)
    assert (hkv - 1) * k_cache.stride(2) >= INT32_LIMIT > k_cache.stride(2)
    q_stride_h = (1 << 29) + 64
    q = lazy_view((bsz, lq, hq, d), (hq * q_stride_h, d, q_stride_h, 1), torch.float16, device)
    assert (hq - 1) * q_stride_h >= INT32_LIMIT
    seg, br = id_buffers((bsz, cap), device)
    decode_case(q, k_cache, v_cache, seg, br, lens=[90], lq=lq, backend=backend, seed=3)


def decode_output_rows(backend, device):
    """A real ``q``/``out`` of more than 2**31 elements (2**14 + 3 sequences of 16 new tokens, 64 query heads over
    one KV head, D = 128: 4 GiB each in fp16; the CUDA op takes at most 65535 sequences): the last sequences'
    rows lie past element 2**31. GPU only (2**18 programs); checks the first and the last sequences."""
    bsz, lq, cap, hq, d = (1 << 14) + 3, 16, 32, 64, 128
    need_device_memory(10, device)
    q = torch.randn(bsz, lq, hq, d, dtype=torch.float16, device=device)
    assert q.numel() > INT32_LIMIT
    k_cache = torch.randn(bsz, cap, 1, d, dtype=torch.float16, device=device)
    v_cache = torch.randn_like(k_cache)
    seg = torch.zeros(bsz, cap, dtype=torch.int32, device=device)
    br = torch.zeros_like(seg)
    lens = torch.randint(lq, cap + 1, (bsz,), dtype=torch.int32, device=device)
    out = branch_attention_with_kvcache(q, k_cache, v_cache, lens, seg, br, backend=backend)
    for rows in (slice(0, 3), slice(bsz - 5, bsz)):
        ref = R.branch_attention_with_kvcache(q[rows].double().cpu(), k_cache[rows].double().cpu(),
                                              v_cache[rows].double().cpu(), lens[rows].cpu(), seg[rows].cpu(),
                                              br[rows].cpu())
        torch.testing.assert_close(out[rows].double().cpu(), ref, atol=TOL[torch.float16], rtol=TOL[torch.float16])


# ---------------------------------------------------------------- rope_append_kv

def rope_case(q, k, v, k_cache, v_cache, seg_cache, br_cache, lens, backend, block_table=None,
              pos_dtype=torch.int32):
    """Random q, k, v (written through their views), the cache slots the step may touch poisoned (NaN, ids -7),
    the op against the float64 reference run on small copies of those slots: q_rot and every poisoned slot must
    match (written ones rotated, the others untouched)."""
    device = q.device
    bsz, lq, hq, d = q.shape
    dtype = q.dtype
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape).to(dtype).to(device))
    if block_table is None:
        sel = (slice(None), slice(0, max(lens) + 8))
        small_table = None
    else:
        used = torch.unique(block_table.cpu()).long()
        sel = (used.to(device),)
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
    q_rot = rope_append_kv(q, k, v, positions.to(device), cos_sin.to(device), k_cache, v_cache, seg_cache,
                           br_cache, cache_seqlens.to(device), seg.to(device), br.to(device),
                           q_seqlens=q_seqlens.to(device), block_table=block_table, backend=backend)
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


def rope_contiguous_cache(backend, device):
    """Cache ``[3, Ncap, 2, 32]``: sequence 2's slots lie past element 2**31 (``b * stride_cb``)."""
    bsz, cap, hkv, d = 3, (1 << 24) + 3, 2, 32
    k_cache = lazy((bsz, cap, hkv, d), torch.float16, device)
    v_cache = lazy((bsz, cap, hkv, d), torch.float16, device)
    assert 2 * k_cache.stride(0) >= INT32_LIMIT > k_cache.stride(0) and k_cache.is_contiguous()
    seg, br = id_buffers((bsz, cap), device)
    q = torch.empty(bsz, 4, 4, d, dtype=torch.float16, device=device)
    k = torch.empty(bsz, 4, hkv, d, dtype=torch.float16, device=device)
    rope_case(q, k, torch.empty_like(k), k_cache, v_cache, seg, br, lens=[9, 60, 131], backend=backend)


def rope_paged_cache(backend, device):
    """Block tables pointing at pages past element 2**31, int64 positions."""
    page, hkv, d = 16, 2, 32
    num_pages = (3 << 30) // (page * hkv * d)
    k_cache = lazy((num_pages, page, hkv, d), torch.float16, device)
    v_cache = lazy((num_pages, page, hkv, d), torch.float16, device)
    seg, br = id_buffers((num_pages, page), device)
    first_high = INT32_LIMIT // k_cache.stride(0)
    table = torch.tensor([[first_high + 3 * j if j % 2 else 11 + j for j in range(6)],
                          [num_pages - 1 - j for j in range(6)]], dtype=torch.int32)
    q = torch.empty(2, 5, 4, d, dtype=torch.float16, device=device)
    k = torch.empty(2, 5, hkv, d, dtype=torch.float16, device=device)
    rope_case(q, k, torch.empty_like(k), k_cache, v_cache, seg, br, lens=[21, 90], backend=backend,
              block_table=table.to(device), pos_dtype=torch.int64)


def rope_input_views(layout, backend, device):
    """q, k, v as views whose last heads (head-major: ``h * stride_h``) or last sequence (batch-major:
    ``b * stride_b``) lie past element 2**31; the cache is small."""
    bsz, lq, hq, hkv, d = (1 if layout == "head-major" else 3), 3, 6, 3, 32

    def view(heads, stride):
        if layout == "head-major":  # [B, H, L, D] storage seen as [B, L, H, D]
            return lazy_view((bsz, lq, heads, d), (heads * stride, d, stride, 1), torch.float16, device)
        return lazy_view((bsz, lq, heads, d), (stride, heads * d, d, 1), torch.float16, device)

    stride = (1 << 29) + 64 if layout == "head-major" else (1 << 30) + 64
    kv_stride = 2 * stride if layout == "head-major" else stride  # 3 KV heads: the last one past 2**31 too
    q, k, v = view(hq, stride), view(hkv, kv_stride), view(hkv, kv_stride)
    for t in (q, k, v):
        assert last_element(t) >= INT32_LIMIT
    k_cache = torch.empty(bsz, 64, hkv, d, dtype=torch.float16, device=device)
    seg = torch.empty(bsz, 64, dtype=torch.int32, device=device)
    rope_case(q, k, v, k_cache, torch.empty_like(k_cache), seg, torch.empty_like(seg), lens=[5, 40, 17][:bsz],
              backend=backend)


# ---------------------------------------------------------------- remap_positions

def positions_at_int32_limit(backend, device):
    """The public op on N = 2**31 - 1 tokens (the most int32 ``cu_seqlens`` can hold): 2**15 serial sequences of
    65535 tokens, then a random branch layout of the remaining tokens, ending at the int32 limit, where the last
    tiles' lanes pass 2**31. Real memory: 3 x 8 GiB of int32 (plus the backend's scratch). GPU only."""
    n = INT32_LIMIT - 1
    need_device_memory(52 if backend == "triton" else 28, device)  # + the triton walk's 3 x 8 GiB scratch
    seqs, per = 1 << 15, (1 << 16) - 1
    tail = n - seqs * per
    seg_tail, br_tail = exact_layouts([tail], seed=7)[0]
    seg = torch.zeros(n, dtype=torch.int32, device=device)
    br = torch.zeros(n, dtype=torch.int32, device=device)
    seg[n - tail:], br[n - tail:] = seg_tail.to(device), br_tail.to(device)
    cu = torch.arange(seqs + 1, dtype=torch.int64, device=device) * per
    cu = torch.cat([cu, torch.tensor([n], device=device)]).to(torch.int32)
    for strategy in R.STRATEGIES:
        pos = remap_positions(seg, br, strategy, cu_seqlens=cu, check_values=False, backend=backend)
        assert torch.equal(pos[n - tail:].cpu(), R.remap_positions(seg_tail, br_tail, strategy)), strategy
        first = torch.arange(per, dtype=torch.int32, device=device)
        assert torch.equal(pos[:per], first) and torch.equal(pos[n - tail - per:n - tail], first), strategy
        del pos
