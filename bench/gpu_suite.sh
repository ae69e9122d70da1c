#!/usr/bin/env bash
# The GPU pass of issue 8, in stages that each fit a 10-minute command on a fresh GPU machine.
#
#   bash bench/gpu_suite.sh STAGE [STAGE ...]
#
# Stages (each builds the CUDA extension first if it is not importable yet):
#   build         pip install --no-build-isolation --no-deps -e . (falls back to ASPD_JIT=1); import check
#   test          pytest python_tests -x -q on CUDA (every backend against the reference; test_cuda_kernels.py)
#   sanitizer     compute-sanitizer memcheck (and racecheck) over bench/sanitizer_case.py
#   prefill       python -m bench --ops branch_attention                      (full grid)
#   backward      python -m bench --ops branch_attention_backward             (forward + backward)
#   decode        python -m bench --ops branch_attention_with_kvcache         (full grid)
#   small         python -m bench --ops rope_append_kv,remap_positions        (full grid)
#   e2e-1b | e2e-8b | e2e-qwen   python -m bench --ops e2e --models <one model>
#   train         python -m bench.bench_hf_training: a transformers training step (forward + backward) with
#                 attn_implementation="aspd" against eager/SDPA with the dense mask and FlexAttention (issue 7)
#   key           issue 6's quoted ratios first, in one short stage: decode and prefill at N=32k, K=16 (every
#                 backend and baseline), then the end-to-end Llama-3-8B sweep (K=8 among it)
#   quick         python -m bench --quick (every op, a few cases): a smoke run
#   report        merge every results/*.jsonl of this folder into one .md + .png
#   first         build + test (about the first 10 minutes)
#
# Output: $OUT if set (the device tool brings back at most 8 files per call: one log, .jsonl, .md, .png per stage),
# else bench/results/gpu-run/. Environment: RESUME=path/to/earlier.jsonl continues a bench stage that hit its
# time limit (finished cases are copied, not rerun); TIME_LIMIT (seconds, default 450) stops starting new cases.
set -uo pipefail
cd "$(dirname "$0")/.."
RES="${OUT:-bench/results/gpu-run}"
mkdir -p "$RES"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
TIME_LIMIT="${TIME_LIMIT:-450}"
status=0

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$RES/suite.log"; }

have_ext() { "$PY" -c "from aspd_kernels import _cuda; import sys; sys.exit(0 if _cuda.available() else 1)" 2>/dev/null; }

build() {
  if have_ext; then log "build: extension already importable"; return 0; fi
  log "build: pip install --no-build-isolation --no-deps -e ."
  local t0=$SECONDS
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$RES/build.log" 2>&1; then
    log "build: pip install failed (tail of build.log below); trying ASPD_JIT=1"
    tail -20 "$RES/build.log"
  fi
  if ! have_ext; then
    export ASPD_JIT=1
    "$PY" -c "from aspd_kernels import _cuda; print('jit:', _cuda.available(), _cuda.load_error())" >>"$RES/build.log" 2>&1
  fi
  "$PY" - >>"$RES/build.log" 2>&1 <<'PYEOF'
import torch, aspd_kernels
from aspd_kernels import _cuda, _dispatch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("extension available:", _cuda.available(), "error:", _cuda.load_error())
for op in ("branch_attention_fwd", "branch_attention_with_kvcache", "remap_positions", "rope_append_kv"):
    print(op, {b: _dispatch.has_backend(b, op) for b in _dispatch.BACKENDS})
PYEOF
  tail -8 "$RES/build.log"
  if have_ext; then log "build: ok in $((SECONDS - t0)) s"; else log "build: CUDA extension NOT available"; status=1; fi
}

run_tests() {
  # the kernels on the GPU first, so a stage that hits its limit has already judged them; then everything else
  # (decoder, transformers, bench harness), whose GPU use is light. Each part gets its own time limit.
  local gpu_files=(python_tests/test_cuda_kernels.py python_tests/test_triton_branch_attention.py
                   python_tests/test_triton_decode.py python_tests/test_triton_positions_rope.py
                   python_tests/test_large_offsets.py python_tests/test_capturable.py)
  local ignore=()
  for f in "${gpu_files[@]}"; do ignore+=(--ignore "$f"); done
  log "test: pytest on the kernels (${#gpu_files[@]} files)"
  timeout 300 "$PY" -m pytest "${gpu_files[@]}" -q -p no:cacheprovider --benchmark-disable -rs \
    >"$RES/tests-kernels.log" 2>&1
  local rc=$?
  tail -15 "$RES/tests-kernels.log"
  log "test: kernels exit $rc"
  [ $rc -eq 0 ] || status=1
  log "test: pytest on the rest"
  timeout 240 "$PY" -m pytest python_tests "${ignore[@]}" -x -q -p no:cacheprovider --benchmark-disable -rs \
    >"$RES/tests-rest.log" 2>&1
  rc=$?
  tail -15 "$RES/tests-rest.log"
  log "test: rest exit $rc"
  [ $rc -eq 0 ] || status=1
}

sanitizer() {
  local cs
  cs="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  if [ -z "$cs" ]; then log "sanitizer: compute-sanitizer not found"; status=1; return; fi
  local limit
  for tool in memcheck racecheck; do
    limit=$([ "$tool" = memcheck ] && echo 240 || echo 180)
    log "sanitizer: $tool (timeout ${limit}s)"
    timeout "$limit" "$cs" --tool "$tool" --error-exitcode 1 "$PY" -m bench.sanitizer_case >"$RES/sanitizer-$tool.log" 2>&1
    local rc=$?
    tail -15 "$RES/sanitizer-$tool.log"
    log "sanitizer: $tool exit $rc"
    [ $rc -eq 0 ] || status=1
  done
}

bench() {  # bench TAG ARGS...
  local tag="$1"; shift
  local resume=()
  [ -n "${RESUME:-}" ] && resume=(--resume "$RESUME")
  log "bench $tag: python -m bench $* (time limit ${TIME_LIMIT}s)"
  "$PY" -m bench --out "$RES" --tag "$tag" --time-limit "$TIME_LIMIT" "${resume[@]}" "$@" 2>&1 | tee "$RES/bench-$tag.log" | tail -60
  local rc=${PIPESTATUS[0]}
  log "bench $tag: exit $rc"
  [ $rc -eq 0 ] || status=1
}

[ $# -ge 1 ] || { sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >>"$RES/suite.log" 2>&1
for stage in "$@"; do
  case "$stage" in
    build) build ;;
    test) build; run_tests ;;
    sanitizer) build; sanitizer ;;
    first) build; run_tests ;;
    prefill) build; bench prefill --ops branch_attention ;;
    backward) build; bench backward --ops branch_attention_backward ;;
    decode) build; bench decode --ops branch_attention_with_kvcache ;;
    small) build; bench small --ops rope_append_kv,remap_positions ;;
    e2e-1b) build; bench e2e-1b --ops e2e --models llama-3.2-1b ;;
    e2e-8b) build; bench e2e-8b --ops e2e --models llama-3-8b ;;
    e2e-qwen) build; bench e2e-qwen --ops e2e --models qwen2.5-7b ;;
    train) build; log "train: python -m bench.bench_hf_training"
           timeout "$TIME_LIMIT" "$PY" -m bench.bench_hf_training --out "$RES/train.jsonl" 2>&1 | tee "$RES/train.log" \
             || { status=1; log "train: failed"; } ;;
    key) build
         bench key-attention --ops branch_attention_with_kvcache,branch_attention --cases "N=32768 K=16 interleaved H=32/8 D=128"
         bench key-e2e --ops e2e --models llama-3-8b ;;
    quick) build; bench quick --quick ;;
    report) "$PY" -m bench.report "$RES"/*.jsonl --out "$RES/report" | tail -80 ;;
    *) echo "unknown stage $stage"; sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2 ;;
  esac
done
log "done: $* (exit $status)"
exit $status
