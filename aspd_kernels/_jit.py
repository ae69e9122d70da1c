"""Build the CUDA extension on first use (``ASPD_JIT=1``) with ``torch.utils.cpp_extension.load`` and ninja.

Same sources and flags as setup.py (``csrc/sources.txt``, ``csrc/build_flags.py``); needs a source checkout (the
wheel does not ship ``csrc/``), a CUDA build of torch, nvcc and ninja. The library is loaded with
``torch.ops.load_library`` semantics (``is_python_module=False``): its static registrations define
``torch.ops.aspd.cuda_*``.
"""
from __future__ import annotations

import os
import runpy

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def load_extension(verbose: bool = False) -> None:
    """Compile (cached under torch's extension directory; rebuilt when a source changes) and load the kernels."""
    if not os.path.isfile(os.path.join(CSRC, "build_flags.py")):
        raise ImportError(f"ASPD_JIT=1 needs the source tree: {CSRC} not found")
    flags = runpy.run_path(os.path.join(CSRC, "build_flags.py"))
    home = flags["cuda_home"]()
    if home:  # before cpp_extension reads CUDA_HOME at import
        os.environ["CUDA_HOME"] = home
    from torch.utils.cpp_extension import load

    load(
        name="aspd_kernels_cuda",
        sources=[os.path.join(CSRC, s) for s in flags["SOURCES"]],
        extra_include_paths=[CSRC],
        extra_cflags=flags["CXX_FLAGS"],
        extra_cuda_cflags=flags["NVCC_FLAGS"],
        is_python_module=False,
        verbose=verbose or os.environ.get("ASPD_JIT_VERBOSE") == "1",
    )
