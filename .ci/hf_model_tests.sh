#!/usr/bin/env bash
# transformers' own Llama and Qwen2 model tests (tests/models/{llama,qwen2}/test_modeling_*.py and the shared test
# mixins they import), run twice on the installed transformers: stock, and with attn_implementation="aspd" forced
# as the default (.ci/hf_force_aspd.py). Writes OUT/{stock,aspd}.xml and OUT/summary.md (counts of each run, the
# tests failing only with aspd). Not in .ci/run: the two runs take far longer than CI's budget allows.
#
#   bash .ci/hf_model_tests.sh SRC [OUT]
#
# SRC: a transformers source tree of the installed version (its tests/ folder; the wheel ships none), e.g. the
# release tag's checkout:  git clone --depth 1 --branch v5.19.0 https://github.com/huggingface/transformers
# The script fetches nothing but the release's sdist from PyPI, to check that SRC is that release: every tests/ file
# the sdist ships must be byte-identical in SRC. Needs pytest, parameterized (transformers' test deps).
set -euo pipefail
SRC=$(cd "${1:?usage: bash .ci/hf_model_tests.sh TRANSFORMERS_SRC [OUT]}" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${2:-$ROOT/hf-model-tests}" && cd "${2:-$ROOT/hf-model-tests}" && pwd)
PY=${PYTHON:-python}
VER=$($PY -c "import transformers; print(transformers.__version__)")
TESTS="tests/models/llama/test_modeling_llama.py tests/models/qwen2/test_modeling_qwen2.py"

# 1. SRC is the installed release: the sdist's tests/ files (PyPI) against SRC's
SDIST=$(mktemp -d)
trap 'rm -rf "$SDIST"' EXIT
$PY -m pip download --quiet --no-deps --no-binary :all: "transformers==$VER" -d "$SDIST"
tar xzf "$SDIST"/transformers-"$VER".tar.gz -C "$SDIST"
mismatch=0
for f in $(cd "$SDIST/transformers-$VER" && find tests -type f -name '*.py'); do
  cmp -s "$SDIST/transformers-$VER/$f" "$SRC/$f" || { echo "differs from the $VER sdist: $f"; mismatch=1; }
done
[ "$mismatch" = 0 ] || { echo "SRC is not transformers $VER's source: stop"; exit 2; }
for t in $TESTS; do [ -f "$SRC/$t" ] || { echo "SRC lacks $t"; exit 2; }; done
commit=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo n/a)
echo "SRC matches the transformers $VER sdist (tests/ files compared); commit: $commit"

# 2. the two runs (a failing test is a result here, not an error of the script)
run() {
  local tag=$1; shift
  (cd "$SRC" && OMP_NUM_THREADS=1 PYTHONPATH="$ROOT/.ci:$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
     $PY -m pytest $TESTS -p no:cacheprovider -q -rfE --junitxml="$OUT/$tag.xml" "$@" > "$OUT/$tag.log" 2>&1) || true
  tail -n 1 "$OUT/$tag.log"
}
run stock
run aspd -p hf_force_aspd
$PY "$ROOT/.ci/hf_model_tests_compare.py" "$OUT/stock.xml" "$OUT/aspd.xml" | tee "$OUT/summary.md"
