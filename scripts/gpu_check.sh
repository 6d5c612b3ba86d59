#!/usr/bin/env bash
# The whole GPU check in one go, for a Hopper machine (H100, H200): environment, warm-up, the GPU
# test suite, the demo, compute-sanitizer on a representative subset, and the side-by-side benchmark.
# JSON results, the benchmark's markdown and chart, and sanitizer logs go to $OUT (default: a temp dir),
# with summary.json (card, commit, test counts, worst errors, sanitizer verdicts, ours / best peer per
# benchmark case); a short table is printed last.
# full writes eight files to $OUT, as many as the device tool brings back: keep other files (a log) elsewhere.
#
#   bash scripts/gpu_check.sh [full|tests|bench|quick|ncu|power]     (default: full)
#
# full: everything, the benchmark on issue 7's table in bf16, fp16 and fp8 for at most 150 s (on an H200
# the GPU tests, 148 with the FP8 ones, take ~5 min, and with the sanitizers fill the rest of a 10-minute
# device command); bench: warm-up, host time and the whole benchmark (issue 7's table and docs/API.md's
# matrix, all dtypes, ~5-7 min); tests/quick: tests only; ncu: Nsight Compute on
# our decode kernel and FlashMLA's (scripts/ncu_compare.py, arguments from NCU_ARGS, e.g.
# NCU_ARGS="--case b64-q1-h128-1024"). BENCH_ARGS replaces the benchmark's case selection
# (e.g. BENCH_ARGS="--cases all" for the whole benchmark in full mode). power: power draw and SM clock
# while ours and FlashMLA run a case for seconds in turns (scripts/power_probe.py, arguments from
# POWER_ARGS; ~40 s).
#
#   bash scripts/gpu_check.sh integration
#
# integration (issue 9; not part of full/tests, whose test step has 5 minutes): the GPU tests of
# tests/gpu/test_integration_gpu.py (torch.compile fullgraph and CUDA-graph trees, opcheck, jax.jit also
# under XLA command buffers, CuPy graph capture, out= buffers), then, when .baseline/ holds another
# version's source tree (`mkdir .baseline && git archive <commit> | tar -x -C .baseline`, carried), the
# eager host time per call of both, taking turns (scripts/host_profile.py --baseline).
#
#   bash scripts/gpu_check.sh reliability [fresh warmups guards threads devices]   (default: all five)
#
# reliability (issue 8): fresh processes whose first call compiles (torch, JAX, CuPy imported first),
# concurrent cold warm-ups, the guard tests and the guard cases under memcheck, two threads racing
# on their first calls, inputs on cuda:1 and explicit streams; one JSON per part under $OUT
# (scripts/reliability.py, scripts/guard_cases.py). The whole of it takes about 8 minutes on an
# H200; split the parts over several commands where a command may run 10 minutes at most.
#
# Carried wheels in .whl/ (nvidia-cutlass) and peer tarballs in .peerwheels/ (made by
# scripts/peer_wheels.sh) are installed into temp dirs first when present (scripts/carried.sh).
set -uo pipefail
MODE=${1:-full}
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
LOGS=$(mktemp -d)  # plain-text step outputs: they are in the printed log already
export PYTHONUNBUFFERED=1
export FLASHMLA_CUPY_CACHE_DIR=${FLASHMLA_CUPY_CACHE_DIR:-/tmp/flashmla_cupy_cache}
PY=${PYTHON:-python3}
source scripts/carried.sh
carry_wheels "$PWD" "$PY"
EXTRA=$PWD${CARRIED_SITE:+:$CARRIED_SITE}
PEERS=$CARRIED_PEERS
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
  timeout 420 $PY -m pytest -q -rA -m gpu tests --ignore=tests/gpu/test_integration_gpu.py "${sel[@]}" \
    "${per_test[@]}" -p no:cacheprovider 2>&1 | tee "$LOGS/gpu_tests.txt" || status=1
  step "demo"
  timeout 120 $PY -m flashmla_cupy demo 2>&1 | tee "$LOGS/demo.txt" || status=1
fi
if [[ $MODE == full || $MODE == bench ]]; then
  step "host time per call"
  timeout 60 $PY scripts/host_profile.py --repeats 5 2>&1 | head -n 45
  timeout 60 $PY scripts/host_profile.py --repeats 5 --dtype fp8 --no-profile 2>&1
  step "benchmark"
  # The benchmark stops itself (results kept) before its budget; the timeout is the backstop.
  if [[ $MODE == full ]]; then bench_args="--cases issue"; budget=150; else bench_args="--cases all"; budget=450; fi
  PYTHONPATH=$PYTHONPATH${PEERS:+:$PEERS} timeout $((budget + 30)) $PY scripts/bench.py ${BENCH_ARGS-$bench_args} \
    --budget-s $budget --json "$OUT/bench.json" 2>&1 | tee "$LOGS/bench.txt" || status=1
fi
if [[ $MODE == ncu ]]; then
  step "ncu: decode kernels side by side"
  PYTHONPATH=$PYTHONPATH${PEERS:+:$PEERS} timeout 540 $PY scripts/ncu_compare.py ${NCU_ARGS-} --out "$OUT/ncu" 2>&1 \
    || status=1
  exit $status
fi
if [[ $MODE == power ]]; then
  step "power: each library's graph replay for seconds, in turns (scripts/power_probe.py, POWER_ARGS)"
  PYTHONPATH=$PYTHONPATH${PEERS:+:$PEERS} timeout 300 $PY scripts/power_probe.py ${POWER_ARGS-} \
    --json "$OUT/power.json" || status=1
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

if [[ $MODE == integration ]]; then
  step "integration: torch.compile, CUDA-graph trees, opcheck, jax.jit (XLA command buffers), CuPy graphs, out="
  timeout 480 $PY -m pytest -q -rA -m gpu tests/gpu/test_integration_gpu.py -p no:cacheprovider 2>&1 \
    | tee "$LOGS/integration_tests.txt" || status=1
  if [[ -d .baseline ]]; then
    step "eager host time per call: .baseline -> this tree"
    timeout 240 $PY scripts/host_profile.py --baseline .baseline --repeats 5 --rounds 5 2>&1 || status=1
  fi
fi

if [[ $MODE == reliability ]]; then
  parts=("${@:2}"); [[ ${#parts[@]} == 0 ]] && parts=(fresh warmups guards threads devices)
  for part in "${parts[@]}"; do
    case $part in
      fresh)
        step "reliability: fresh processes, first call compiles (torch, JAX, CuPy imported first)"
        timeout 480 $PY scripts/reliability.py fresh-processes --in-a-row --json "$OUT/reliability_fresh_processes.json" 2>&1 \
          | tail -n 25 || status=1 ;;
      warmups)
        step "reliability: concurrent cold warm-ups, one cache dir and separate dirs"
        timeout 400 $PY scripts/reliability.py concurrent-warmups --json "$OUT/reliability_concurrent_warmups.json" \
          2>&1 || status=1 ;;
      guards)
        step "reliability: guard tests (bad device contents, checked mode)"
        timeout 300 $PY -m pytest -q -rA -m gpu tests/gpu/test_guards_gpu.py -p no:cacheprovider 2>&1 \
          | tee "$LOGS/guard_tests.txt" || status=1
        if command -v compute-sanitizer >/dev/null; then
          step "reliability: guard cases under compute-sanitizer memcheck"
          timeout 400 compute-sanitizer --tool memcheck --print-limit 12 --error-exitcode 9 \
            $PY scripts/guard_cases.py --json "$OUT/guards.json" > "$OUT/sanitizer_guards_memcheck.txt" 2>&1
          [[ $? == 0 ]] || status=1
          head -n 60 "$OUT/sanitizer_guards_memcheck.txt"; tail -n 3 "$OUT/sanitizer_guards_memcheck.txt"
        fi ;;
      threads)
        step "reliability: two threads, first calls at the same moment"
        timeout 300 $PY scripts/reliability.py threads --json "$OUT/reliability_threads.json" 2>&1 || status=1 ;;
      devices)
        step "reliability: inputs on cuda:1, explicit streams"
        timeout 200 $PY scripts/reliability.py devices --json "$OUT/reliability_devices.json" 2>&1 || status=1 ;;
      *) echo "unknown reliability part: $part"; status=1 ;;
    esac
  done
fi

step "summary"
GPU_CHECK_MODE=$MODE $PY scripts/summarize_gpu_check.py "$OUT" "$LOGS" || status=1
[[ -f $LOGS/demo.txt ]] && tail -n 2 "$LOGS/demo.txt"
if [[ -f $OUT/bench.json ]]; then
  echo; $PY scripts/bench_report.py "$OUT/bench.json" --md "$OUT/bench.md" --png "$OUT/bench.png" --brief || status=1
fi
exit $status
