#!/usr/bin/env bash
# Whole source trees side by side in one device run: scripts/bench.py in each tree (its own Python side,
# kernels and kernel cache), the trees taking turns for ROUNDS rounds, then one line per case with
# each tree's median time. For changes that kernel_ab.py cannot compare (it swaps kernels_src only,
# under this tree's Python side, so two trees that pin different shared memory or tensor-map boxes
# need this instead).
#
#   bash scripts/bench_trees.sh OUT ROUNDS "BENCH ARGS" TREE [TREE ...]
#   e.g. git archive main | tar -x -C .scratch/main    (a tree: flashmla_cupy/, kernels_src/, scripts/)
#        bash scripts/bench_trees.sh /tmp/ab 2 "--dtype fp8 --cases issue" .scratch/main .
#
# The carried wheels (.whl/, .peerwheels/) of the repository this script is in are installed first
# (carried.sh, as for gpu_check.sh); BENCH ARGS may say --only to leave the peers out. Results:
# OUT/<tree>-<round>.json (bench.py's; <tree> is t<position>-<directory>) and the printed table;
# OUT/trees.tgz bundles them (the device returns few files).
set -uo pipefail
OUT=$1; ROUNDS=$2; ARGS=$3; shift 3
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$(command -v "${PYTHON:-python3}") || exit 1
[[ $PY == /* ]] || PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # the trees run from their own directories
source "$HERE/scripts/carried.sh"
carry_wheels "$HERE" "$PY"
EXTRA=$CARRIED_SITE${CARRIED_PEERS:+${CARRIED_SITE:+:}$CARRIED_PEERS}
mkdir -p "$OUT"
names=()  # t1-<dir>, t2-<dir>, ...: two trees may share a directory name
i=0
for tree in "$@"; do
  i=$((i + 1))
  names+=("t$i-$(basename "$(cd "$tree" && pwd)")")
done
for ((round = 1; round <= ROUNDS; round++)); do
  i=0
  for tree in "$@"; do
    name=${names[$i]}; i=$((i + 1))
    (cd "$tree" && PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${EXTRA:+:$EXTRA} FLASHMLA_CUPY_CACHE_DIR=/tmp/bench_trees_cache/$name \
      $PY scripts/bench.py $ARGS --json "$OUT/$name-$round.json" > "$OUT/$name-$round.log" 2>&1)
    echo "round $round, $name: rc=$?"
  done
done
$PY - "$OUT" "${names[@]}" <<'EOF'
import glob, json, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
times = {}  # (dtype, case) -> name -> [us]
for name in names:
    for path in sorted(glob.glob(f"{out}/{name}-*.json")):
        for row in json.load(open(path)).get("results", []):
            ours = row["libraries"].get("flashmla_cupy", {})
            if "graph" in ours:
                times.setdefault((row["dtype"], row["id"]), {}).setdefault(name, []).append(ours["graph"]["us"])
print("us, CUDA-graph replay, median over rounds:", " | ".join(names), "| each / first")
for (dtype, case), by_name in times.items():
    med = [statistics.median(by_name[n]) if n in by_name else float("nan") for n in names]
    print(f"{dtype} {case}: " + " | ".join(f"{m:.1f}" for m in med) + " | "
          + " ".join(f"{m / med[0]:.3f}" for m in med[1:]))
EOF
tar -czf /tmp/bench_trees.tgz -C "$OUT" --exclude trees.tgz . && mv /tmp/bench_trees.tgz "$OUT/trees.tgz"
