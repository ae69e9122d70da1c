#!/usr/bin/env bash
# The GPU pass, in stages planned for the lent device's budget: 15 minutes of device time in all per issue, machine
# start (1-2 min) and idle included, 10 minutes at most per command.
#
#   bash bench/gpu_suite.sh STAGE [STAGE ...]
#
# first   the first call on a fresh machine, at most ~6.5 minutes of wall time by design (per-step limits below):
#           0. refuse to run without a GPU; TRITON_INTERPRET=0 (the Triton kernels run compiled, never interpreted);
#              the extension prebuilt here against torch 2.11+cu130 / Python 3.12 and carried
#              (aspd_kernels/_C.cpython-312-x86_64-linux-gnu.so: bash .ci/build_gpu_extension.sh), else built
#                                                                                                  <=  20 s (+60)
#           1. the kernel tests, compiled Triton and CUDA, pytest-xdist over the CPUs              <= 180 s
#              beside them, compute-sanitizer memcheck then racecheck on bench/sanitizer_case.py    (parallel)
#           2. the key benchmark: decode at N=32k, K in {1, 4, 16, 64}, Hq/Hkv 32/8, D=128, bf16, every
#              backend against FlexAttention (with and without its block-mask build), SDPA with a dense
#              mask, flash SDPA without a mask, K separate sequences, and the measured copy bandwidth
#                                                                                                  <= 150 s
#           3. prefill at N=8k, K=16, the same baselines                                           <=  90 s
#           4. a one-screen summary (bench.gpu_summary) and one tarball of every log
# second  the next session's first call, <= 6 minutes: the kernel tests (the tile tables, transposed dK/dV and the
#         occupancy-based CUDA splits changed since the first run), the split probe with the new auto choices
#         (decides issue 12 item 7: serial decoding to Triton, or a keys-across-warps CUDA kernel) and Llama-3-8B
#         end to end
# bandwidth  issue 21's call, <= 10 minutes of wall time by design (550 s of limits, 595 s if every kill waits) (per-step limits below; every step writes its
#         results as it goes and copies them into $OUT when it ends, so a cut call still returns them):
#           1. ceilings (copy, read, matmul), then decode through auto and through Triton, decode and merge timed
#              apart (profiler), K in {1, 4, 16, 64} x N in {16k, 64k, 128k} (bench.decode_bandwidth)   <=  80 s
#           2. the tile sweep, writing aspd_kernels/triton/tuned/<device>.json (bench.tune_decode)     <= 160 s
#           3. prefill at N=8k, K=16 beside FlexAttention (with and without its block-mask build)      <=  90 s
#           4. Llama-3-8B end to end on the quick grid (K = 1 and 8, 64-token branches, the mixed
#              workload), rows written as they finish                                              <=  90 s
#           5. the kernel tests of the files issue 21 changed, last, SIGINT at their limit             <= 100 s
#         DRY=1 runs every step on the CPU (Triton interpreted, tiny shapes, no GPU refused): 3.5 minutes measured
#         on a shared 2-core machine
#
# Older single-purpose stages (each builds the extension first if it is not importable):
#   build | test | sanitizer | prefill | backward | decode | small | e2e-1b | e2e-8b | e2e-qwen | train | key |
#   quick | report
#
# Output: $OUT if set (the device tool brings back at most 8 files per call: the suite writes everything under a
# work folder and copies back suite.log, summary.md, the bench .md tables and one .tgz of the rest), else
# bench/results/gpu-run/. Environment: ASPD_COMMIT (the commit the copied tree was made from, for the tables),
# TIME_LIMIT (seconds, default 450) for the older bench stages, RESUME=path/to/earlier.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ] || [ "${DRY:-0}" = 1 ]; then RES=$(mktemp -d /tmp/gpu_suite.XXXXXX); else RES=bench/results/gpu-run; fi
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
  # the kernels on the GPU first (kernel_tests), so a stage that hits its limit has already judged them; then
  # everything else (decoder, transformers, bench harness), whose GPU use is light. Each part has its own limit.
  kernel_tests kernels 300
  local ignore=() f
  for f in "${KERNEL_TESTS[@]}"; do ignore+=(--ignore "$f"); done
  log "test: pytest on the rest"
  timeout 240 "$PY" -m pytest python_tests "${ignore[@]}" -x -q -p no:cacheprovider --benchmark-disable -rs \
    >"$RES/tests-rest.log" 2>&1
  local rc=$?
  tail -15 "$RES/tests-rest.log"
  log "test: rest exit $rc"
  [ $rc -eq 0 ] || status=1
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

require_gpu() {  # never run anything interpreted, or anything at all, on a machine without a GPU
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_suite: no CUDA GPU visible to $PY (nvidia-smi or torch.cuda.is_available() failed): this script is for"
    echo "the lent GPU machine only; on a CPU run 'python -m pytest' (Triton interpreted) and 'python -m bench'."
    exit 3
  fi
  export TRITON_INTERPRET=0
}

KEY_DECODE="N=32768 K=1 interleaved H=32/8 D=128;N=32768 K=4 interleaved H=32/8 D=128;N=32768 K=16 interleaved H=32/8 D=128;N=32768 K=64 interleaved H=32/8 D=128"
KEY_PREFILL="N=8192 K=16 interleaved H=32/8 D=128"
KERNEL_TESTS=(python_tests/test_cuda_kernels.py python_tests/test_triton_branch_attention.py
              python_tests/test_triton_decode.py python_tests/test_triton_positions_rope.py
              python_tests/test_large_offsets.py python_tests/test_capturable.py
              python_tests/test_branch_attention_with_kvcache.py python_tests/test_branch_attention.py)

kernel_tests() {  # kernel_tests TAG LIMIT_S: compiled Triton + CUDA against the float64 reference, over the CPUs
  local tag=$1 limit=$2 workers
  workers=${WORKERS:-$(( $(nproc) > 4 ? $(nproc) - 3 : 1 ))}
  log "tests-$tag: ${#KERNEL_TESTS[@]} files, xdist -n $workers, limit ${limit}s, TRITON_INTERPRET=$TRITON_INTERPRET"
  # SIGINT at the limit: pytest then still prints which tests failed and why (a KILL would lose the summary)
  timeout -s INT -k 25 "$limit" "$PY" -m pytest "${KERNEL_TESTS[@]}" -n "$workers" -p no:cacheprovider \
    --benchmark-disable -v --tb=short -rfEs --timeout 150 >"$RES/tests-$tag.log" 2>&1
  local rc=$?
  grep -m1 "TRITON_INTERPRET" "$RES/tests-$tag.log" | tee -a "$RES/suite.log"
  grep -E "^(FAILED|ERROR) " "$RES/tests-$tag.log" | cut -c1-220 | head -40
  tail -3 "$RES/tests-$tag.log" | tee -a "$RES/suite.log"
  log "tests-$tag: exit $rc$([ $rc -eq 124 ] || [ $rc -eq 2 ] && echo ' (time limit: interrupted)')"
  [ $rc -eq 0 ] || status=1
}

sanitizer_bg() {  # memcheck then racecheck of the small case of every op, in the background
  # racecheck instruments every shared-memory access: by default only the kernels whose name holds SAN_RACE_FILTER
  # ("decode"; set it empty for every kernel). SAN_MEM_LIMIT / SAN_RACE_LIMIT: seconds for each tool.
  local cs filter=()
  cs="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  [ -n "$cs" ] || { log "sanitizer: compute-sanitizer not found"; status=1; return; }
  [ -n "${SAN_RACE_FILTER-decode}" ] && filter=(--kernel-name "kns=${SAN_RACE_FILTER-decode}")
  (
    if [ "${SAN_MEMCHECK:-1}" = 1 ]; then
      timeout "${SAN_MEM_LIMIT:-100}" "$cs" --tool memcheck --error-exitcode 9 "$PY" -m bench.sanitizer_case \
        >"$RES/sanitizer-memcheck.log" 2>&1
      echo "memcheck exit $?" >>"$RES/sanitizer-memcheck.log"
    fi
    timeout "${SAN_RACE_LIMIT:-75}" "$cs" --tool racecheck --racecheck-report all --error-exitcode 9 "${filter[@]}" \
      "$PY" -m bench.sanitizer_case >"$RES/sanitizer-racecheck.log" 2>&1
    echo "racecheck exit $?" >>"$RES/sanitizer-racecheck.log"
  ) &
  SAN_PID=$!
}

sanitizer_wait() {
  [ -n "${SAN_PID:-}" ] || return 0  # not started (compute-sanitizer missing: already logged and counted)
  wait "$SAN_PID"
  for tool in $([ "${SAN_MEMCHECK:-1}" = 1 ] && echo memcheck) racecheck; do
    tail -4 "$RES/sanitizer-$tool.log"
    local line; line=$(tail -1 "$RES/sanitizer-$tool.log")
    log "sanitizer: $line$([ "${line##* }" = 124 ] && echo ' (time limit)')"
    [ "${line##* }" = 0 ] || status=1
  done
}

key_bench() {  # key_bench TAG OPS CASES LIMIT_S
  local tag=$1 ops=$2 cases=$3 limit=$4
  log "bench $tag: --ops $ops (limit ${limit}s)"
  timeout $((limit + 40)) "$PY" -m bench --out "$RES" --tag "$tag" --time-limit "$limit" --ops "$ops" \
    --cases "$cases" >"$RES/bench-$tag.log" 2>&1
  local rc=$?
  grep -E "ceilings:|failed|Error" "$RES/bench-$tag.log" | head -5
  log "bench $tag: exit $rc"
  [ $rc -eq 0 ] || status=1
}

summary() { "$PY" -m bench.gpu_summary "$RES" | tee "$RES/summary.md"; }

first() {
  build
  sanitizer_bg
  kernel_tests first 180
  sanitizer_wait
  key_bench decode branch_attention_with_kvcache "$KEY_DECODE" 110
  key_bench prefill branch_attention "$KEY_PREFILL" 50
  summary
}

diagnose() {  # the second call of the first lent session: which kernel tests fail and why; the split-count probe
  build
  SAN_MEMCHECK=0; SAN_RACE_LIMIT=160
  sanitizer_bg
  kernel_tests diagnose 170
  sanitizer_wait
  log "probe: python -m bench.decode_probe"
  timeout 60 "$PY" -m bench.decode_probe --ks 1,16,64 --splits 8,16,32,64,128 --out "$RES/decode-probe.jsonl" \
    >"$RES/decode-probe.log" 2>&1
  log "probe: exit $?"
  tail -12 "$RES/decode-probe.log"
  summary >/dev/null
}

verify() {  # the third call of the first lent session: the tests that failed or were cut, after the fixes
  build
  KERNEL_TESTS=(python_tests/test_triton_decode.py python_tests/test_branch_attention.py python_tests/test_capturable.py
                python_tests/test_triton_branch_attention.py
                python_tests/test_cuda_kernels.py::test_auto_keeps_the_generic_kernel_off_the_default_path
                python_tests/test_cuda_kernels.py::test_opcheck_and_compile_with_cuda_backend)
  kernel_tests verify 130
  # alone: beside other workers the large buffers do not fit and the tests skip
  KERNEL_TESTS=(python_tests/test_large_offsets.py); WORKERS=0
  kernel_tests large-offsets 45
  log "probe: python -m bench.decode_probe"
  timeout 50 "$PY" -m bench.decode_probe --ks 16,64,1 --splits 8,16,32,64,128 --out "$RES/decode-probe.jsonl" \
    >"$RES/decode-probe.log" 2>&1
  log "probe: exit $?"
  tail -8 "$RES/decode-probe.log"
  summary >/dev/null
}

keep() {  # keep FILE...: copy finished results into $OUT now (a call cut at its limit still returns them)
  [ -n "${OUT:-}" ] || return 0
  local f; for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/"; done
}

step_run() {  # step_run NAME LIMIT_S CMD...: one step under its limit (SIGINT first), logged, failures counted
  local name=$1 limit=$2; shift 2
  log "$name: $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout -s INT -k "${KILL_AFTER:-5}" "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -"${TAIL:-14}" "$RES/$name.log" | tee -a "$RES/suite.log"
  log "$name: exit $rc in $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (time limit: interrupted)')"
  [ $rc -eq 0 ] || status=1
  keep "$RES/suite.log"
}

bandwidth() {  # issue 21: is decode at the bandwidth limit, which tiles, and does prefill / end to end hold up
  local dry=() slug
  if [ "${DRY:-0}" = 1 ]; then dry=(--dry); export TRITON_INTERPRET=1; else build; fi
  slug=$("$PY" -c "import torch; from aspd_kernels.triton.tuned_tiles import device_slug
print(device_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else 'cpu-dry')")
  step_run decode-bandwidth 80 "$PY" -m bench.decode_bandwidth "${dry[@]}" --time-limit 65 \
    --out "$RES/decode-bandwidth.jsonl"
  keep "$RES/decode-bandwidth.jsonl"
  # the sweep writes the table into the tree (commit it from $OUT) and its timings beside it
  step_run tune 160 "$PY" -m bench.tune_decode "${dry[@]}" --time-limit 140 --out-json "$RES/$slug.json" \
    --results "$RES/tune-sweep.jsonl"
  keep "$RES/$slug.json" "$RES/tune-sweep.jsonl"
  if [ "${DRY:-0}" = 1 ]; then
    step_run prefill 90 "$PY" -m bench --out "$RES" --tag prefill --ops branch_attention --time-limit 60 \
      --cases "N=256 K=4 interleaved"
    step_run e2e-8b 90 "$PY" -m bench --out "$RES" --tag e2e --ops e2e --time-limit 70
  else
    step_run prefill 90 "$PY" -m bench --out "$RES" --tag prefill --time-limit 50 --ops branch_attention \
      --cases "$KEY_PREFILL"
    step_run e2e-8b 90 "$PY" -m bench --out "$RES" --tag e2e-8b --quick --time-limit 70 --ops e2e \
      --models llama-3-8b
  fi
  keep "$RES"/*-e2e*.partial.jsonl
  KERNEL_TESTS=(python_tests/test_triton_decode_pipeline.py python_tests/test_triton_decode.py
                python_tests/test_triton_branch_attention.py python_tests/test_tuned_tiles.py
                python_tests/test_triton_head_sizes.py python_tests/test_capturable.py)
  if [ "${DRY:-0}" = 1 ]; then  # the same files, stopped at a short limit as on the GPU (SIGINT: failures listed)
    KILL_AFTER=20 step_run tests 60 "$PY" -m pytest python_tests/test_triton_decode_pipeline.py -q -p no:cacheprovider
  else
    kernel_tests bandwidth 100
    keep "$RES/tests-bandwidth.log"
  fi
  summary >/dev/null 2>&1
  keep "$RES/summary.md" "$RES/suite.log"
}
# $OUT of the bandwidth stage (8 files at most): suite.log, decode-bandwidth.jsonl, <device>.json,
# tune-sweep.jsonl, the e2e partial rows, tests-bandwidth.log, summary.md and the .tgz of everything

second() {  # the next lent session: re-judge the kernels after the CPU-side changes, then the decisions NOTES.md lists
  build
  kernel_tests second 170
  log "probe: python -m bench.decode_probe (auto per backend and every split count, K = 1, 4, 16, 64)"
  timeout 80 "$PY" -m bench.decode_probe --out "$RES/decode-probe.jsonl" >"$RES/decode-probe.log" 2>&1
  log "probe: exit $?"
  tail -10 "$RES/decode-probe.log"
  key_bench e2e-8b e2e llama-3-8b 50
  summary
}

[ $# -ge 1 ] || { sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >>"$RES/suite.log" 2>&1
for stage in "$@"; do
  # every stage but the report (and a DRY=1 bandwidth stage) needs the GPU: refuse at once without one
  [ "$stage" = report ] || { [ "$stage" = bandwidth ] && [ "${DRY:-0}" = 1 ]; } || require_gpu
  case "$stage" in
    build) build ;;
    test) build; run_tests ;;
    sanitizer) build; SAN_MEM_LIMIT=240; SAN_RACE_LIMIT=180; SAN_RACE_FILTER=""; sanitizer_bg; sanitizer_wait ;;
    first) first ;;
    second) second ;;
    bandwidth) bandwidth ;;
    diagnose) diagnose ;;
    verify) verify ;;
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
if [ -n "${OUT:-}" ]; then  # the device tool returns at most 8 files: the summary, the log, the tables, one .tgz
  tar czf "$OUT/gpu-$(echo "$*" | tr ' ' '-').tgz" -C "$RES" .
  cp "$RES/suite.log" "$OUT/"
  [[ " $* " == *" bandwidth "* ]] || ls "$RES"/*.md 2>/dev/null | head -5 | xargs -r cp -t "$OUT/"
fi
exit $status
