#!/usr/bin/env bash
# The GPU machines' software stack, on a machine with no GPU: torch 2.11+cu130 and triton 3.6.0 (what the lent
# H100/H200 image runs), in a venv of their own. Checks what can fail there before any kernel runs:
#   1. setup.py builds aspd_kernels._C and it LINKS against a CUDA torch (CI's CPU torch can only compile);
#   2. the library loads and registers torch.ops.aspd.cuda_* (schema strings are parsed at load time);
#   3. the CMake route (CMakeLists.txt) builds and loads the same library;
#   4. the whole test suite on torch 2.11 + triton 3.6 (CPU: CUDA tests skip, Triton runs under the interpreter,
#      where triton 3.6 cannot run some kernels; see the skip reasons).
# NOT part of .ci/run: it installs a CUDA torch (several GiB of wheels), which CI must never pull.
#
#   bash .ci/gpu_image_stack.sh [VENV]        # default VENV: /tmp/aspd-gpu-stack
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/aspd-gpu-stack}
# setup.py finds the toolkit itself (build_flags.cuda_home); CMake wants the real nvcc first on PATH
home=${CUDA_HOME:-$(python3 -c "import sys; sys.path.insert(0, 'csrc'); from build_flags import cuda_home; print(cuda_home() or '')")}
[[ -n "$home" ]] && export PATH="$home/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-2}
echo "nvcc: $(command -v nvcc)"

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 wheel
  "$VENV/bin/pip" install -q $(grep -v -i -E '^(#|torch|triton)' requirements.txt)
fi
PY="$VENV/bin/python"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

SRC=$(mktemp -d /tmp/aspd_stack.XXXXXX)  # a clean copy: the build writes _C*.so beside the package
git ls-files -z | xargs -0 cp --parents -t "$SRC"
cd "$SRC"

echo "=== 1-2. setup.py build, link, load"
"$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "
import torch
from aspd_kernels import _cuda
assert _cuda.load_error() is None, _cuda.load_error()
for op in ('cuda_decode_attention', 'cuda_rope_append_kv', 'cuda_remap_positions'):
    print(getattr(torch.ops.aspd, op).default._schema)
"

echo "=== 3. CMake build and load"
nvrtc=$("$PY" -c "import glob, os, torch; print((glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', '*', 'lib', 'libnvrtc.so*')) + [''])[0])")
cmake -S . -B build-cmake -DCMAKE_BUILD_TYPE=Release -DPython3_EXECUTABLE="$PY" \
  ${nvrtc:+-DCUDA_nvrtc_LIBRARY=$nvrtc} >/dev/null
cmake --build build-cmake -j "$MAX_JOBS" >/dev/null
"$PY" -c "
import glob, torch
torch.ops.load_library(glob.glob('build-cmake/_C*.so')[0])
print('cmake library:', torch.ops.aspd.cuda_decode_attention.default._schema.name)
"

echo "=== 4. tests on torch 2.11 + triton 3.6"
"$PY" -m pytest -q -p no:cacheprovider --benchmark-disable
