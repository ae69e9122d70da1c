"""Triton kernels address tensors beyond 2**31 elements in 64-bit: no silent int32 wraparound.

The bug class: ``index * stride`` computed in int32 wraps once a tensor passes 2**31 elements, and on a GPU the load
then reads (or the store writes) another place without any error. The other tests use small tensors and never get
there. Here every tensor a kernel indexes is as large as it must be, at almost no memory cost (``large_buffers``:
lazily committed buffers, only the rows a kernel reads are written, a guard before each buffer catches wrapped
offsets). The Triton interpreter computes int32 arithmetic in int32 (numpy), wrapping as the GPU does, so these
tests fail on a kernel that forgets a 64-bit cast: each docstring names the casts whose removal it was seen to
catch. Resident memory per test stays below ~300 MiB; address space reserved at once below 120 GiB, no single
buffer above 17 GiB (Linux's default overcommit refuses one mapping larger than RAM + swap).

Which products can pass 2**31: a row (token, slot, page, sequence) index times its stride in any tensor of more
than 2**31 elements, and a head index times the head stride of a view (a head-major ``[B, H, N, D]`` cache seen as
``[B, N, H, D]``, Hugging Face's layout), where each stride alone fits in int32. The public ops copy only when the
last dimension is not contiguous (``_checks.last_dim_contiguous``), so such views reach the kernels as they are.

One thing the interpreter does not reproduce: a ``range`` loop counter reaches the kernel as a Python int, which
Triton types as int32 when it fits, where compiled code gives the counter the type of its bounds; a kernel written
``start + u0 + lane`` (int64 ``start``) is right under both.

On a GPU (TRITON_INTERPRET=0) the same tests run compiled, on real memory (a test whose buffers do not fit skips
with the reason: the prefill ones need ~110 GiB with their guards, the positions one ~50 GiB), with two more that
the interpreter cannot afford (2**18 programs, or one per 1024 of 2**31 tokens). Head sizes 32, few heads and
tokens: each interpreted test launches a handful of programs.
"""
import os

# TRITON_INTERPRET: conftest.py sets it to 1 only where there is no GPU; on a GPU the kernels run compiled.

import gc  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import large_buffers as lb  # noqa: E402
from large_buffers import INT32_LIMIT, exact_layouts, guard_written, lazy, lazy_view  # noqa: E402

from aspd_kernels import branch_attention  # noqa: E402
from aspd_kernels import reference as R  # noqa: E402

tba = importlib.import_module("aspd_kernels.triton.branch_attention")
rp = importlib.import_module("aspd_kernels.triton.remap_positions")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cpu" if INTERPRET else "cuda"
gpu_only = pytest.mark.skipif(INTERPRET, reason="needs a GPU: too many programs for the Triton interpreter")


@pytest.fixture(autouse=True)
def _release():
    """Large buffers go back to the OS (CPU) or the driver (GPU) after each test."""
    yield
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- branch_attention_with_kvcache

def test_decode_contiguous_cache_beyond_2_31():
    """Sequence 2 of a contiguous cache starts past element 2**31. Fails with ``b64 = b`` in ``_decode_kernel``."""
    lb.decode_contiguous_cache("triton", DEVICE)


def test_decode_paged_cache_pages_beyond_2_31():
    """Pages past element 2**31. Fails without the ``.to(tl.int64)`` of the block ids in ``_decode_kernel``."""
    lb.decode_paged_cache("triton", DEVICE)


def test_decode_query_rows_beyond_2_31():
    """q's sequence 2 past element 2**31. Fails with ``b64 = b`` in ``_decode_kernel``."""
    lb.decode_query_rows("triton", DEVICE)


def test_decode_head_major_views_beyond_2_31():
    """Head-major q and cache views, the last heads past element 2**31. Failed before the kernels' int64 head
    indices (``head * stride_qh``, ``hk * stride_kh``: int32 times int32); fails with ``hk64 = hk``."""
    lb.decode_head_major_views("triton", DEVICE)


@gpu_only
def test_decode_output_rows_beyond_2_31_gpu():
    """A real q/out of more than 2**31 elements (``b * stride_qb``, ``b * stride_ob``)."""
    lb.decode_output_rows("triton", DEVICE)


# ---------------------------------------------------------------- rope_append_kv

def test_rope_contiguous_cache_beyond_2_31():
    """Sequence 2's cache slots past element 2**31. Fails with ``b64 = b`` in ``_rope_append_kernel``."""
    lb.rope_contiguous_cache("triton", DEVICE)


def test_rope_paged_cache_pages_beyond_2_31():
    """Pages past element 2**31. Fails without the ``.to(tl.int64)`` of the block id in ``_rope_append_kernel``."""
    lb.rope_paged_cache("triton", DEVICE)


@pytest.mark.parametrize("layout", ["head-major", "batch-major"])
def test_rope_input_views_beyond_2_31(layout):
    """q, k, v views with heads (head-major) or sequences (batch-major) past element 2**31. Head-major failed
    before the kernel's int64 head indices; fails with ``h64 = h``. Batch-major fails with ``b64 = b``."""
    lb.rope_input_views(layout, "triton", DEVICE)


# ---------------------------------------------------------------- branch_attention (prefill, forward and backward)

def _prefill_case(q, k, v, lens, seed=0):
    """Random q, k, v written through their views; the public op (which passes last-dim-contiguous views to the
    kernels as they are) forward and backward, with an lse gradient, against the float64 reference on small
    contiguous copies."""
    dtype = q.dtype
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape).to(dtype).to(DEVICE))
    ids = exact_layouts(lens, seed)
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
    ``bwd_preprocess_kernel`` (the kernel before this test: ``rows * stride_ot`` wrapped)."""
    lens, hq, hkv, d = [36, 28], 4, 2, 32
    total, stride_t = sum(lens), (1 << 26) + 64
    assert lens[0] * stride_t >= INT32_LIMIT

    def packed(heads):
        return lazy_view((total, heads, d), (stride_t, d, 1), torch.float16, DEVICE)

    q, k, v, out, dout, dq, dk, dv = (packed(h) for h in (hq, hkv, hkv, hq, hq, hq, hkv, hkv))
    stride_lh = (INT32_LIMIT // (hq - 1)) + 64
    lse = lazy_view((hq, total), (stride_lh, 1), torch.float32, DEVICE)
    for t in (q, k, v, dout):
        t.copy_(torch.randn(t.shape).to(t.dtype).to(DEVICE))
    for t in (out, lse, dq, dk, dv):
        t.fill_(float("nan"))  # every element the backend defines must be written
    ids = exact_layouts(lens, seed=4)
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
    q = lazy_view((total, hq, d), (d, (1 << 29) + 64, 1), torch.float16, DEVICE)
    k = lazy_view((total, hkv, d), (d, (1 << 30) + 128, 1), torch.float16, DEVICE)
    v = lazy_view((total, hkv, d), (d, (1 << 30) + 128, 1), torch.float16, DEVICE)
    for t in (q, k, v):
        assert (t.shape[1] - 1) * t.stride(1) >= INT32_LIMIT > t.stride(1)
    _prefill_case(q, k, v, lens, seed=5)


# ---------------------------------------------------------------- remap_positions

@pytest.mark.skipif(not INTERPRET, reason="interpreter only: 96 GiB of guarded buffers on a GPU, where "
                    "test_positions_at_the_int32_limit_gpu runs both kernels through the public op instead")
def test_positions_walk_at_the_int32_limit():
    """``remap_positions`` packs int32 ``cu_seqlens``, so N < 2**31, but the walk's tiles run past a sequence's end:
    a sequence ending at N = 2**31 - 1 has lanes ``t0 + offs >= 2**31`` that wrap to negative indices, pass the
    ``t < end`` mask and read and write before the tensors (on a GPU the tile loop itself overflows and spins).

    The walk kernel runs on one sequence of 131 tokens ending there (``cu = [N - 131, N]``: no other sequence to
    walk), for every strategy; its outputs are turned into positions here as ``_positions_kernel`` does (that
    kernel's grid covers all N tokens: too many programs for the interpreter; ``test_positions_at_the_int32_limit_gpu``
    runs it on a GPU). Fails with the int32 ``start``/``end`` of the kernel before this test."""
    n, length = INT32_LIMIT - 1, 131
    start = n - length
    seg_small, br_small = exact_layouts([length], seed=6)[0]
    bufs = {name: lazy((n,), torch.int32, DEVICE) for name in ("seg", "br", "rank", "sec_start", "sec_c0", "sec_w")}
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


_STORE_OFFSETS = r"""
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

rp = importlib.import_module("aspd_kernels.triton.remap_positions")
ptrs = {name: "*i32" for name in ("BR", "RANK", "SEC_START", "SEC_C0", "SEC_W", "OUT")}
cases = [(rp._positions_kernel, {**ptrs, "N": "i32"}, dict(FIXED=fixed, BLOCK=1024)) for fixed in (False, True)]
walk = {name: "*i32" for name in ("SEG", "BR", "CU", "RANK", "SEC_START", "SEC_C0", "SEC_W")}
cases.append((rp._walk_kernel, {**walk, "N": "i32", "width": "i32"},
              dict(STRATEGY=3, BLOCK=rp._BLOCK, MAX_BRANCHES=rp.MAX_BRANCHES)))
target = GPUTarget("cuda", 90, 32)
options = make_backend(target).parse_options({"num_warps": 4})
result = []
for kernel, signature, constexprs in cases:
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs)
    ttir = triton.compile(src, target=target, options=options.__dict__).asm["ttir"]
    addptr = {m[1]: (m[2], m[3])
              for m in re.finditer(r"(%[\w.#]+) = tt\.addptr (%[\w.#]+), %[\w.#]+ : .+?, (\S+) loc", ttir)}
    chains = []
    for store in re.finditer(r"tt\.store (%[\w.#]+),", ttir):
        ptr, types = store[1], []
        while ptr in addptr:  # the tt.addptr chain that forms the stored-to pointer
            ptr, offset_type = addptr[ptr]
            types.append(offset_type)
        chains.append(types)
    result.append([kernel.__name__, constexprs, chains])
json.dump(result, sys.stdout)
"""


def test_positions_kernels_store_through_int64_offsets():
    """``_positions_kernel`` indexes the tokens of its tile by ``pid * BLOCK + lane``: its last tile passes 2**31
    when N is within a tile of it, and the interpreter cannot run the 2**21 programs that get there. So this looks
    at the compiled code instead (TTIR for sm_90, no GPU needed; in a fresh process, as this one interprets the
    kernels): every store of the positions kernels, and of the walk in its sequential form, must address through
    int64 offsets. Fails on the kernels before this test (int32 ``t``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _STORE_OFFSETS], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]
    for name, constexprs, chains in json.loads(run.stdout):
        assert chains, f"{name}: no store found in the TTIR: the parser is out of date"
        for types in chains:
            assert types and all(t.endswith("i64>") or t == "i64" for t in types), (name, constexprs, types)


@gpu_only
def test_positions_at_the_int32_limit_gpu():
    """The public op, both kernels, N = 2**31 - 1 (``_positions_kernel``'s last tile has lanes past 2**31)."""
    lb.positions_at_int32_limit("triton", DEVICE)
