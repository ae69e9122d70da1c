"""Backend choice: auto picks cuda, then triton, for CUDA tensors and torch for CPU tensors; forcing works or says why."""
import pytest
import torch

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
