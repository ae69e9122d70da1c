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
