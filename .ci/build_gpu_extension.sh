#!/usr/bin/env bash
# Build aspd_kernels._C on a machine with no GPU for the lent GPU machines' stack (Python 3.12, torch 2.11.0+cu130),
# so that no device time goes to compiling: the result, aspd_kernels/_C.cpython-312-x86_64-linux-gnu.so (ignored by
# git), travels with `run`'s carry argument and bench/gpu_suite.sh finds it importable.
#
#   bash .ci/build_gpu_extension.sh [VENV]        # default VENV: /tmp/aspd-cp312-torch211
#
# Needs a CPython 3.12 (python3.12 on PATH, or pyenv's) and nvcc 13. torch is installed with its CUDA libraries
# (several GB) because importing a CUDA torch loads them. Not part of .ci/run: it installs a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/aspd-cp312-torch211}
PY312=$(command -v python3.12 || ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | head -1 || true)
[[ -n "$PY312" ]] || { echo "build_gpu_extension: no CPython 3.12 found (the GPU image runs 3.12)"; exit 2; }
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip wheel "setuptools<82" ninja numpy
  "$VENV/bin/pip" install -q torch==2.11.0
fi
"$VENV/bin/python" -c "import torch, sys; assert torch.version.cuda, 'need a CUDA torch'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"

SRC=$(mktemp -d /tmp/aspd_ext.XXXXXX)  # a clean copy of the tracked sources: the build writes beside them
git ls-files -z | xargs -0 cp --parents -t "$SRC"
(cd "$SRC" && MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace >"$SRC/build.log" 2>&1) \
  || { tail -30 "$SRC/build.log"; exit 1; }
so=$(ls "$SRC"/aspd_kernels/_C.cpython-312-*.so)
"$VENV/bin/python" -c "
import torch
torch.ops.load_library('$so')
for op in ('cuda_decode_attention', 'cuda_rope_append_kv', 'cuda_remap_positions'):
    print(getattr(torch.ops.aspd, op).default._schema.name, 'registered')
"
cp "$so" aspd_kernels/
echo "built $(basename "$so") from $(git rev-parse --short HEAD)$(git diff --quiet -- csrc || echo ' (csrc modified)'): carry it"
