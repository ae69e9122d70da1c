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

if __name__ == "__main__" and "--cmake" in sys.argv:
    # CMake reads one flag per line
    print("\n".join(NVCC_FLAGS))
