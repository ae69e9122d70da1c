#!/usr/bin/env bash
# Compile every csrc/*.cu and csrc/*.cpp with nvcc against the installed torch's headers (the CPU wheel is
# enough: it ships c10/cuda), so the CUDA sources cannot rot on machines without a GPU. Object files only, no
# link. Flags come from csrc/build_flags.py (the same as setup.py's). Two files at a time; one line per file
# with its time; non-zero exit on any failure. Without nvcc: says so and exits 0 (CI may lack it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: nvcc not found; CUDA sources NOT compiled (install the CUDA toolkit to check them)"
  exit 0
fi

# include dirs of torch and Python, and the nvcc flags of the real build, one per line
mapfile -t TORCH_INC < <("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print("\n".join(include_paths()))')
PY_INC=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
mapfile -t NVCC_FLAGS < <("$PYTHON" csrc/build_flags.py --cmake)
INC=(-Icsrc -I"$PY_INC")
for d in "${TORCH_INC[@]}"; do INC+=(-I"$d"); done

OUT=$(mktemp -d /tmp/aspd_cuda_objs.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
export NVCC OUT
export COMMON="-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Xcompiler -fPIC ${INC[*]}"
export CU_FLAGS="${NVCC_FLAGS[*]}"
"$NVCC" --version | tail -1

compile_one() {
  local src=$1 start end status=0 log
  start=$(date +%s.%N)
  log="$OUT/$(basename "$src").log"
  if [[ $src == *.cu ]]; then
    # shellcheck disable=SC2086
    "$NVCC" $COMMON $CU_FLAGS -c "$src" -o "$OUT/$(basename "$src").o" >"$log" 2>&1 || status=$?
  else
    # host code: the host compiler through nvcc, C++20 like the real build
    # shellcheck disable=SC2086
    "$NVCC" $COMMON -O3 -std=c++20 -c "$src" -o "$OUT/$(basename "$src").o" >"$log" 2>&1 || status=$?
  fi
  end=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  if [[ $status -eq 0 ]]; then
    printf 'ok    %6.1fs  %s\n' "$secs" "$src"
    grep -i "warning" "$log" | head -5 || true
  else
    printf 'FAIL  %6.1fs  %s\n' "$secs" "$src"
    head -60 "$log"
  fi
  return $status
}
export -f compile_one

start=$(date +%s)
status=0
ls csrc/*.cu csrc/*.cpp | xargs -P 2 -I{} bash -c 'compile_one "$@"' _ {} || status=$?
echo "compile_cuda: $(ls csrc/*.cu csrc/*.cpp | wc -l) files in $(( $(date +%s) - start ))s"
if [[ $status -ne 0 ]]; then
  echo "compile_cuda: FAILED"
  exit 1
fi
echo "compile_cuda: all CUDA sources compile"
