"""Backend choice: auto picks cuda, then triton, for CUDA tensors and torch for CPU tensors; forcing works or says why."""
import importlib
import types

import pytest
import torch

from aspd_kernels import _checks as chk
from aspd_kernels import _cuda, _dispatch

OPS = ["branch_attention_fwd", "branch_attention_bwd", "branch_attention_with_kvcache", "remap_positions",
       "rope_append_kv"]


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_is_torch(op, monkeypatch):
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    assert _dispatch.resolve(op, torch.device("cpu")) == "torch"


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cuda_without_extension_is_triton(op, monkeypatch):
    """Resolution only looks at the device type, so it is checked here without a GPU."""
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    expect = "cuda" if _cuda.available() and _dispatch.has_backend("cuda", op) else "triton"
    assert _dispatch.resolve(op, torch.device("cuda")) == expect
    if not _cuda.available():
        assert expect == "triton"


def test_every_backend_module_implements_the_contract():
    for op in OPS:
        assert _dispatch.has_backend("torch", op)
        assert _dispatch.has_backend("triton", op)


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv("ASPD_BACKEND", "torch")
    assert _dispatch.resolve("remap_positions", torch.device("cuda")) == "torch"
    monkeypatch.setenv("ASPD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be"):
        _dispatch.resolve("remap_positions", torch.device("cpu"))


def test_argument_wins_over_environment(monkeypatch):
    monkeypatch.setenv("ASPD_BACKEND", "nonsense")
    assert _dispatch.resolve("remap_positions", torch.device("cpu"), "torch") == "torch"


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        _dispatch.resolve("remap_positions", torch.device("cpu"), "triton")


def test_forced_cuda_says_why_it_cannot_run():
    with pytest.raises(ValueError, match="cuda"):
        _dispatch.resolve("remap_positions", torch.device("cpu"), "cuda")
    if not _cuda.available():
        with pytest.raises(ValueError, match="not built"):
            _dispatch.resolve("remap_positions", torch.device("cuda"), "cuda")


def test_auto_passes_over_avoided_backends(monkeypatch):
    """``avoid`` steers auto away from a backend that would only run a slow fallback, never a forced choice."""
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "has_backend", lambda name, op: True)
    cuda = torch.device("cuda")
    op = "branch_attention_with_kvcache"
    assert _dispatch.resolve(op, cuda) == "cuda"
    assert _dispatch.resolve(op, cuda, avoid=frozenset({"cuda"})) == "triton"
    assert _dispatch.resolve(op, cuda, avoid=frozenset({"cuda", "triton"})) == "cuda"  # nothing better: keep it
    assert _dispatch.resolve(op, cuda, "cuda", avoid=frozenset({"cuda"})) == "cuda"
    monkeypatch.setenv("ASPD_BACKEND", "cuda")
    assert _dispatch.resolve(op, cuda, avoid=frozenset({"cuda"})) == "cuda"


@pytest.mark.parametrize("dtype, d, view, expect", [
    (torch.bfloat16, 128, "contiguous", True),
    (torch.float16, 64, "contiguous", True),
    (torch.bfloat16, 96, "contiguous", False),   # head size the mma kernel does not cover
    (torch.float32, 128, "contiguous", False),
    (torch.float64, 64, "contiguous", False),
    (torch.bfloat16, 128, "offset", False),      # rows start 2 bytes past a 16-byte boundary
    (torch.bfloat16, 64, "odd-stride", False),   # a slot stride of 65 elements
])
def test_decode_on_tensor_cores_mirrors_the_extension(dtype, d, view, expect):
    """``_cuda.decode_on_tensor_cores`` is csrc's ``decode_uses_mma`` condition, which auto uses to keep the
    CUDA extension's generic kernel (re-reads the cache per row, no split-KV) off the default path."""
    q = torch.empty(1, 2, 8, d, dtype=dtype)
    if view == "contiguous":
        k = torch.empty(1, 32, 2, d, dtype=dtype)
    elif view == "offset":
        k = torch.empty(1 * 32 * 2 * d + 1, dtype=dtype)[1:].view(1, 32, 2, d)
    else:
        k = torch.empty(1, 32, 2, d + 1, dtype=dtype)[..., :d]
    assert _cuda.decode_on_tensor_cores(q, k, k) is expect


def test_missing_extension_is_explained():
    """Without the CUDA extension, the reason names it and what to do -- not Python's 'partially initialized
    module ... circular import', which the bare import of a missing submodule during __init__ reports."""
    from aspd_kernels import _cuda

    if _cuda.load_error() is None:
        pytest.skip("the CUDA extension is built and loads here")
    err = _cuda.load_error()
    assert "aspd_kernels._C" in err and "circular" not in err


def test_head_size_rules_per_backend():
    """triton: multiples of 8 from 8 to 256; cuda: 1..256 (csrc/ops.cpp); torch: any positive size."""
    for d in (8, 16, 40, 80, 112, 256):
        assert chk.head_dim_refusals("q", d) == {}
    for d, refused in ((12, {"triton"}), (4, {"triton"}), (264, {"triton", "cuda"}), (0, set(_dispatch.BACKENDS))):
        assert set(chk.head_dim_refusals("q", d)) == refused, d
    assert chk.head_dim_refusals("q", 12)["triton"] == (
        "q: head size 12 is not supported by backend='triton' (multiples of 8 from 8 to 256)")


@pytest.mark.parametrize("d, with_cuda, expect", [
    (80, True, "cuda"),      # both GPU backends run it: the usual order
    (12, True, "cuda"),      # triton refuses; the CUDA extension's generic kernel runs it
    (12, False, "torch"),    # no extension and triton refuses: torch
    (264, True, "torch"),    # no GPU backend runs it: torch, on the CUDA tensors
])
def test_auto_passes_over_backends_that_refuse_the_head_size(d, with_cuda, expect, monkeypatch):
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "has_backend", lambda name, op: name != "cuda" or with_cuda)
    op = "branch_attention_with_kvcache"
    assert _dispatch.resolve(op, torch.device("cuda"), refusals=chk.head_dim_refusals("q", d)) == expect
    # a refusal outranks avoid: auto never picks a backend that cannot run the inputs, however slow the others
    assert _dispatch.resolve(op, torch.device("cuda"), avoid=frozenset({"cuda"}),
                             refusals=chk.head_dim_refusals("q", d)) == ("triton" if d == 80 else expect)


def test_forced_backend_that_refuses_the_head_size_raises(monkeypatch):
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "has_backend", lambda name, op: True)
    cuda = torch.device("cuda")
    op = "branch_attention_fwd"
    with pytest.raises(ValueError, match=r"q: head size 12 is not supported by backend='triton' \(multiples of 8"):
        _dispatch.resolve(op, cuda, "triton", refusals=chk.head_dim_refusals("q", 12))
    with pytest.raises(ValueError, match=r"q: head size 264 is not supported by backend='cuda' \(1 to 256\)"):
        _dispatch.resolve(op, cuda, "cuda", refusals=chk.head_dim_refusals("q", 264))
    monkeypatch.setenv("ASPD_BACKEND", "triton")  # forcing through the environment is forcing too
    with pytest.raises(ValueError, match="q: head size 12"):
        _dispatch.resolve(op, cuda, refusals=chk.head_dim_refusals("q", 12))
    monkeypatch.delenv("ASPD_BACKEND")
    assert _dispatch.resolve(op, cuda, "torch", refusals=chk.head_dim_refusals("q", 12)) == "torch"
    with pytest.raises(ValueError, match="q: head size 0 is not supported by backend='torch'"):
        _dispatch.resolve(op, torch.device("cpu"), refusals=chk.head_dim_refusals("q", 0))


def test_forced_cuda_without_a_kernel_for_the_op_says_so(monkeypatch):
    """The extension loaded but has no prefill kernel: the message must not claim it is not built."""
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    monkeypatch.setitem(_dispatch._loaded, "cuda", types.SimpleNamespace())
    with pytest.raises(ValueError, match="the CUDA extension has no kernel for it"):
        _dispatch.resolve("branch_attention_fwd", torch.device("cuda"), "cuda")


@pytest.mark.parametrize("op_module, op_name", [("aspd_kernels.branch_attention", "branch_attention_fwd"),
                                                 ("aspd_kernels.branch_attention_with_kvcache",
                                                  "branch_attention_with_kvcache")])
def test_public_ops_hand_their_head_size_to_dispatch(op_module, op_name, monkeypatch):
    """Each attention op passes the refusals for q's head size to ``resolve``: D = 12 on CUDA tensors without the
    extension resolves to torch under auto. (CPU tensors here; the spy resolves the same call for a CUDA device.)"""
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    module = importlib.import_module(op_module)
    real = _dispatch.resolve
    seen = []

    def spy(op, device, backend=None, avoid=frozenset(), refusals=None):
        if op == op_name:
            with monkeypatch.context() as m:
                m.setattr(_dispatch, "has_backend", lambda name, op: name != "cuda")
                seen.append((set(refusals or {}), real(op, torch.device("cuda"), backend, avoid, refusals)))
        return real(op, device, backend, avoid, refusals)

    monkeypatch.setattr(module, "resolve", spy)
    seg = torch.zeros(6, dtype=torch.int32)
    q = torch.randn(6, 2, 12)
    if op_name == "branch_attention_fwd":
        cu = torch.tensor([0, 6], dtype=torch.int32)
        module.branch_attention(q, q, q, seg, seg, cu, cu, 6, 6)
    else:
        module.branch_attention_with_kvcache(q[None, -2:], q[None], q[None], torch.tensor([6], dtype=torch.int32),
                                             seg[None], seg[None])
    assert seen == [({"triton"}, "torch")]


def test_float64_prefill_on_cuda_stays_off_triton(monkeypatch):
    """Triton computes in float32 at most: float64 prefill on CUDA tensors resolves to torch under auto (the
    extension has no prefill kernel) instead of Triton raising a TypeError. The spy resolves for a CUDA device."""
    monkeypatch.delenv("ASPD_BACKEND", raising=False)
    module = importlib.import_module("aspd_kernels.branch_attention")
    real = _dispatch.resolve
    seen = []

    def spy(op, device, backend=None, avoid=frozenset(), refusals=None):
        seen.append(real(op, torch.device("cuda"), backend, avoid, refusals))
        return real(op, device, backend, avoid, refusals)

    monkeypatch.setattr(module, "resolve", spy)
    seg = torch.zeros(6, dtype=torch.int32)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    q = torch.randn(6, 2, 16, dtype=torch.float64)
    module.branch_attention(q, q, q, seg, seg, cu, cu, 6, 6)
    assert seen == ["torch"]
