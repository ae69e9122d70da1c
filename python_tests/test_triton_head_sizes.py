"""Every multiple of 8 up to 256 on the Triton backend: prefill forward, backward and decode against the float64
reference, for head sizes that pad (8 -> 16 lanes, 40 -> 64, 80 -> 128, 112 -> 128) and that do not (16, 256).

The padding lanes must never be read or written. So every input is a view into a buffer whose guard lanes after
``D`` (as many as the kernels pad, at least 8) hold NaN -- an unmasked load pulls NaN into every dot product, and
stays inside the buffer, so the test fails instead of crashing -- and every output is a view into a NaN-filled
buffer with the same guard lanes: the outputs must come back finite and right (every element written) and the guard
lanes still NaN (no store past ``D``). Shapes stay tiny: the interpreter pays per operation.
"""
import importlib

import pytest
import torch
from kv_helpers import make_cache
from layouts import random_layout

import aspd_kernels.triton.branch_attention as tba
from aspd_kernels import branch_attention, branch_attention_with_kvcache
from aspd_kernels import reference as R
from aspd_kernels._dispatch import triton_interpret

decode = importlib.import_module("aspd_kernels.triton.branch_attention_with_kvcache")
INTERPRET = triton_interpret()
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET=0 and no CUDA device: the triton kernels cannot run")

HEAD_SIZES = [8, 16, 40, 80, 112, 256]
TILES = tba.Config(16, 16, 4, 1)  # several tiles per sequence even at ~30 tokens: skipped, masked and full ones
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=8e-3, rtol=8e-3)}


def guard(d: int) -> int:
    """NaN lanes after each row of ``d``: the kernels' padding (``block_d(d) - d``), at least 8."""
    return max(8, tba.block_d(d) - d)


def guarded(shape, d: int, dtype, fill=None) -> torch.Tensor:
    """A ``[..., d]`` view into a NaN ``[..., d + guard(d)]`` buffer; the view holds ``fill`` (NaN when None)."""
    buf = torch.full((*shape, d + guard(d)), float("nan"), dtype=dtype, device=DEVICE)
    view = buf[..., :d]
    if fill is not None:
        view.copy_(fill)
    return view


def guard_lanes(view: torch.Tensor) -> torch.Tensor:
    """The guard lanes that follow each row of a ``guarded`` view (rows ``stride(-2)`` apart)."""
    d = view.shape[-1]
    return view.as_strided(view.shape[:-1] + (view.stride(-2) - d,), view.stride(), view.storage_offset() + d)


def assert_written_inside(view: torch.Tensor, what: str) -> None:
    assert torch.isnan(guard_lanes(view)).all(), f"{what}: a store went past the head dimension"


def small_batch(seed: int):
    """Two short sequences (a few branches each), the second with fewer queries than keys (bottom-right)."""
    layouts = [random_layout(seed * 10 + i, max_tokens=18, max_branches=4) for i in range(2)]
    seg = torch.cat([s for s, _ in layouts]).to(DEVICE)
    br = torch.cat([b for _, b in layouts]).to(DEVICE)
    lens_k = [s.numel() for s, _ in layouts]
    lens_q = [lens_k[0], max(1, lens_k[1] - 5)]
    cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32, device=DEVICE)
    cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32, device=DEVICE)
    return seg, br, cu_q, cu_k, max(lens_q), max(lens_k)


def prefill_reference(q, k, v, seg, br, cu_q, cu_k, dout, dlse):
    """float64 out, lse and the gradients of ``sum(out * dout) + sum(lse * dlse)``."""
    args = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out, lse = R.branch_attention(*args, seg.cpu(), br.cpu(), cu_q.cpu(), cu_k.cpu())
    loss = (out * dout.cpu().double()).sum() + (lse.double() * dlse.cpu().double()).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, args)


def close(got: torch.Tensor, want: torch.Tensor, dtype, what: str) -> None:
    torch.testing.assert_close(got.cpu().double(), want, **TOL[dtype], msg=lambda m: f"{what}: {m}")


# float16 where the padding is widest in relative terms (8 of 16 lanes) and at phi-2's 80
@pytest.mark.parametrize("d,dtype", [(d, torch.float32) for d in HEAD_SIZES] + [(8, torch.float16),
                                                                              (80, torch.float16)])
def test_prefill_forward_and_backward(d, dtype):
    seg, br, cu_q, cu_k, mq, mk = small_batch(d)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = guarded((total_q, 4), d, dtype, torch.randn(total_q, 4, d))
    k = guarded((total_k, 2), d, dtype, torch.randn(total_k, 2, d))
    v = guarded((total_k, 2), d, dtype, torch.randn(total_k, 2, d))
    dout = guarded((total_q, 4), d, dtype, torch.randn(total_q, 4, d))
    dlse = torch.randn(4, total_q, device=DEVICE)
    out = guarded((total_q, 4), d, dtype)
    lse = torch.full((4, total_q), float("nan"), device=DEVICE)
    grads = [guarded(t.shape[:-1], d, dtype) for t in (q, k, v)]
    scale = d ** -0.5

    tba.branch_attention_fwd(q, k, v, seg, br, cu_q, cu_k, mq, mk, scale, out=out, lse=lse, config=TILES)
    tba.branch_attention_bwd(dout, dlse, q, k, v, out, lse, seg, br, cu_q, cu_k, mq, mk, scale,
                             dq=grads[0], dk=grads[1], dv=grads[2], config=TILES)

    rout, rlse, rgrads = prefill_reference(q, k, v, seg, br, cu_q, cu_k, dout, dlse)
    close(out, rout, dtype, "out")
    torch.testing.assert_close(lse.cpu(), rlse, atol=2e-4, rtol=2e-4)
    assert_written_inside(out, "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
        close(g, rg, dtype, name)
        assert_written_inside(g, name)


def guarded_cache(d: int, batch: int, hkv: int, paged: bool = False, max_tokens: int = 40):
    """``make_cache`` (float32) with NaN guard lanes after every row of k and v. Returns the cache dict (its
    ``logical`` tensors for the reference; slice them to ``[..., :d]``) and the device tensors
    ``(k_cache, v_cache, segment, branch, cache_seqlens, block_table)``."""
    cache = make_cache(d, batch=batch, hkv=hkv, d=d + guard(d), dtype=torch.float32, paged=paged,
                       max_tokens=max_tokens)
    k_cache, v_cache = (cache[n].to(DEVICE)[..., :d] for n in ("k_cache", "v_cache"))
    guard_lanes(k_cache).fill_(float("nan"))
    guard_lanes(v_cache).fill_(float("nan"))
    seg, br, lens = (cache[n].to(DEVICE) for n in ("segment", "branch", "cache_seqlens"))
    table = None if cache["block_table"] is None else cache["block_table"].to(DEVICE)
    return cache, (k_cache, v_cache, seg, br, lens, table)


def decode_reference(cache: dict, q: torch.Tensor, q_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    k, v, seg, br = cache["logical"]
    d = q.shape[-1]
    return R.branch_attention_with_kvcache(q.cpu().double(), k[..., :d].double(), v[..., :d].double(),
                                           cache["cache_seqlens"], seg, br,
                                           q_seqlens=None if q_seqlens is None else q_seqlens.cpu())


@pytest.mark.parametrize("d", HEAD_SIZES)
def test_decode(d):
    """Contiguous cache in one split, and paged with three splits (the merge kernel pads D too)."""
    paged = d in (8, 40, 112)
    # paged: a cache long enough for three splits of 64-slot tiles, else the launcher clamps them to one
    cache, (k_cache, v_cache, seg, br, lens, table) = guarded_cache(d, batch=2, hkv=2, paged=paged,
                                                                    max_tokens=200 if paged else 40)
    if paged:
        assert table.shape[1] * k_cache.shape[1] > 2 * 64
    q = guarded((2, 3, 4), d, torch.float32, torch.randn(2, 3, 4, d))
    q_seqlens = torch.tensor([3, 1], dtype=torch.int32, device=DEVICE)
    out = guarded((2, 3, 4), d, torch.float32)

    decode.branch_attention_with_kvcache(q, k_cache, v_cache, lens, seg, br, q_seqlens, table, d ** -0.5,
                                         num_splits=3 if paged else 1, out=out)

    close(out, decode_reference(cache, q, q_seqlens), torch.float32, "out")  # padding rows (q_seqlens) included: the reference has them zero
    assert_written_inside(out, "out")


@pytest.mark.parametrize("d", [8, 80])
def test_public_ops_accept_padded_head_sizes(d):
    """Through the checks, dispatch and custom ops with ``backend="triton"``: forward, autograd and decode."""
    seg, br, cu_q, cu_k, mq, mk = small_batch(d + 1)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q = guarded((total_q, 2), d, torch.float32, torch.randn(total_q, 2, d)).requires_grad_()
    k = guarded((total_k, 1), d, torch.float32, torch.randn(total_k, 1, d)).requires_grad_()
    v = guarded((total_k, 1), d, torch.float32, torch.randn(total_k, 1, d)).requires_grad_()
    out = branch_attention(q, k, v, seg, br, cu_q, cu_k, mq, mk, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    rout, _, rgrads = prefill_reference(q, k, v, seg, br, cu_q, cu_k, dout, torch.zeros(2, q.shape[0]))
    close(out, rout, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
        close(g, rg, torch.float32, name)

    cache, (k_cache, v_cache, seg, br, lens, _) = guarded_cache(d, batch=2, hkv=1)
    qd = guarded((2, 2, 2), d, torch.float32, torch.randn(2, 2, 2, d))
    got = branch_attention_with_kvcache(qd, k_cache, v_cache, lens, seg, br, backend="triton")
    close(got, decode_reference(cache, qd), torch.float32, "decode out")


@pytest.mark.parametrize("d", [12, 264])
def test_forced_triton_refuses_other_head_sizes(d):
    """Not a multiple of 8, or past 256: a ValueError naming q and the backend, before any launch."""
    seg, br, cu_q, cu_k, mq, mk = small_batch(3)
    q = torch.randn(int(cu_q[-1]), 2, d, device=DEVICE)
    k = v = torch.randn(int(cu_k[-1]), 1, d, device=DEVICE)
    with pytest.raises(ValueError, match=rf"q: head size {d} is not supported by backend='triton'"):
        branch_attention(q, k, v, seg, br, cu_q, cu_k, mq, mk, backend="triton")
    cache = make_cache(1, batch=1, hkv=1, d=d, dtype=torch.float32, max_tokens=20, poison=False)
    with pytest.raises(ValueError, match=rf"q: head size {d} is not supported by backend='triton'"):
        branch_attention_with_kvcache(q[None, :1], cache["k_cache"].to(DEVICE), cache["v_cache"].to(DEVICE),
                                      cache["cache_seqlens"].to(DEVICE), cache["segment"].to(DEVICE),
                                      cache["branch"].to(DEVICE), backend="triton")
