#!/usr/bin/env bash
# The whole GPU check in one go, for a Hopper machine (the lent H200): environment, warm-up, the GPU
# test suite, the demo, compute-sanitizer on a representative subset, and the side-by-side benchmark.
# JSON results, the benchmark's markdown and chart, and sanitizer logs go to $OUT (default: a temp dir),
# with summary.json (card, commit, test counts, worst errors, sanitizer verdicts, ours / best peer per
# benchmark case); a short table is printed last.
#
#   bash scripts/gpu_check.sh [full|tests|bench|quick|ncu]     (default: full)
#
# full: everything, the benchmark on issue 7's table in bf16 and fp16 (the tests and sanitizers need
# the rest of a 10-minute device command); bench: warm-up, host time and the whole benchmark (issue 7's
# table and SPEC.md's matrix, both dtypes, ~3-5 min); tests/quick: tests only; ncu: Nsight Compute on
# our decode kernel and FlashMLA's (scripts/ncu_compare.py, arguments from NCU_ARGS, e.g.
# NCU_ARGS="--case b64-q1-h128-1024"). BENCH_ARGS replaces the benchmark's case selection
# (e.g. BENCH_ARGS="--cases all" for the whole benchmark in full mode).
#
# Carried wheels in .whl/ (nvidia-cutlass) and peer tarballs in .peerwheels/ (see
# ../shared/scripts/build_peer_carry.sh) are installed into temp dirs first when present.
set -uo pipefail
MODE=${1:-full}
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
LOGS=$(mktemp -d)  # plain-text step outputs: they are in the printed log already
export PYTHONUNBUFFERED=1
export FLASHMLA_CUPY_CACHE_DIR=${FLASHMLA_CUPY_CACHE_DIR:-/tmp/flashmla_cupy_cache}
PY=${PYTHON:-python3}
EXTRA=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fmla_site .whl/*.whl
  EXTRA=$EXTRA:/tmp/fmla_site
fi
if ls .peerwheels/*.tar.xz >/dev/null 2>&1; then
  mkdir -p /tmp/fmla_peers && for f in .peerwheels/*.tar.xz; do tar -C /tmp/fmla_peers -xJf "$f"; done
  PEERS=/tmp/fmla_peers
fi
export PYTHONPATH=$EXTRA${PYTHONPATH:+:$PYTHONPATH}
status=0
step() { echo; echo "=== $1"; }

step "info";   $PY -m flashmla_cupy info 2>&1
step "warmup"; $PY -m flashmla_cupy warmup 2>&1 || status=1

# Each step has a time limit, so that a hang in one still leaves the others' results under $OUT.
if [[ $MODE == full || $MODE == tests || $MODE == quick ]]; then
  step "GPU tests"
  sel=(); [[ $MODE == quick ]] && sel=(-k "matrix and (b1- or b2- or b3-) or empty or frameworks")
  per_test=(); $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
  FLASHMLA_CUPY_TEST_REPORT="$OUT/accuracy.json" \
  timeout 300 $PY -m pytest -q -rA -m gpu tests "${sel[@]}" "${per_test[@]}" -p no:cacheprovider 2>&1 \
    | tee "$LOGS/gpu_tests.txt" || status=1
  step "demo"
  timeout 120 $PY -m flashmla_cupy demo 2>&1 | tee "$LOGS/demo.txt" || status=1
fi
if [[ $MODE == full || $MODE == bench ]]; then
  step "host time per call"
  timeout 60 $PY scripts/host_profile.py --repeats 5 2>&1 | head -n 45
  step "benchmark"
  # The benchmark stops itself (results kept) before its budget; the timeout is the backstop.
  if [[ $MODE == full ]]; then bench_args="--cases issue"; budget=210; else bench_args="--cases all"; budget=450; fi
  PYTHONPATH=$PYTHONPATH${PEERS:+:$PEERS} timeout $((budget + 30)) $PY scripts/bench.py ${BENCH_ARGS-$bench_args} \
    --budget-s $budget --json "$OUT/bench.json" 2>&1 | tee "$LOGS/bench.txt" || status=1
fi
if [[ $MODE == ncu ]]; then
  step "ncu: decode kernels side by side"
  PYTHONPATH=$PYTHONPATH${PEERS:+:$PEERS} timeout 540 $PY scripts/ncu_compare.py ${NCU_ARGS-} --out "$OUT/ncu" 2>&1 \
    || status=1
  exit $status
fi
if [[ $MODE == full || $MODE == tests ]] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer --tool $tool"
    # The first reports name the kernel, the instruction and the kind of hazard; the summary is last.
    timeout 90 compute-sanitizer --tool $tool --print-limit 12 --error-exitcode 9 $PY scripts/sanitize_cases.py \
      > "$OUT/sanitizer_$tool.txt" 2>&1
    [[ $? == 0 ]] || status=1
    head -n 60 "$OUT/sanitizer_$tool.txt"; tail -n 3 "$OUT/sanitizer_$tool.txt"
  done
fi

step "summary"
GPU_CHECK_MODE=$MODE $PY scripts/summarize_gpu_check.py "$OUT" "$LOGS" || status=1
[[ -f $LOGS/demo.txt ]] && tail -n 2 "$LOGS/demo.txt"
if [[ -f $OUT/bench.json ]]; then
  echo; $PY scripts/bench_report.py "$OUT/bench.json" --md "$OUT/bench.md" --png "$OUT/bench.png" --brief || status=1
fi
exit $status
