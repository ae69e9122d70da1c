"""One source list and one flag set for every build of ``aspd_kernels._C``: setup.py (``CUDAExtension``), the JIT
route (``aspd_kernels/_jit.py``), the CI compile check (``.ci/compile_cuda.sh``) and CMakeLists.txt (which reads
``sources.txt`` and prints these flags through ``python csrc/build_flags.py --cmake``).

Targets: sm_80 (A100), sm_89 (L40/4090), sm_90a (H100/H200), and compute_80 PTX for newer GPUs. No
``--use_fast_math``: the softmax uses exp2f and the accuracy of the default path costs nothing measurable in a
memory-bound kernel.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

with open(os.path.join(HERE, "sources.txt")) as f:
    SOURCES = [line.strip() for line in f if line.strip() and not line.startswith("#")]

ARCHS = ["80", "89", "90a"]
# plus compute_80 PTX, which the driver JIT-compiles on GPUs newer than these (sm_100, sm_120): without it the
# extension loads there and every launch fails with "no kernel image is available"
GENCODE = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS] + ["-gencode=arch=compute_80,code=compute_80"]
CXX_STD = "-std=c++20"  # torch 2.11+ headers need C++20 (torch.utils.cpp_extension uses 17 only for older torch)
CXX_FLAGS = ["-O3", CXX_STD]
NVCC_FLAGS = ["-O3", CXX_STD, "-lineinfo", "--expt-relaxed-constexpr", *GENCODE]



def cuda_home() -> str | None:
    """The CUDA toolkit root for torch.utils.cpp_extension, when CUDA_HOME/CUDA_PATH are unset and torch's own
    guess would be wrong. torch takes the parent of the ``nvcc`` found on PATH; a wrapper script such as
    ``/usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc`` makes that ``/usr/local``, which has no CUDA
    headers. nvcc itself knows its root: ``--dryrun`` prints it as ``TOP``. None: leave torch's guess alone."""
    import shutil
    import subprocess

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.isfile(os.path.join(guess, "include", "cuda_runtime.h")):
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line[len("#$ TOP="):].strip())
            if os.path.isfile(os.path.join(top, "include", "cuda_runtime.h")):
                return top
    return None


if __name__ == "__main__" and "--cmake" in sys.argv:
    # CMake reads one flag per line
    print("\n".join(NVCC_FLAGS))
