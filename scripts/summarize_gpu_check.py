"""Collect one `scripts/gpu_check.sh` run into a JSON summary: card, commit, GPU test counts, the worst
accuracy figures, sanitizer verdicts, the demo's last line and ours / best peer per benchmark case.

    python scripts/summarize_gpu_check.py OUT_DIR LOG_DIR  -> writes OUT_DIR/summary.json
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from bench import headline  # scripts/ is this script's first sys.path entry


def read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def card_name() -> str | None:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
        return names[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def pytest_counts(text: str | None) -> dict:
    """The counts from pytest's final line ('80 passed, 2 skipped in 160.3s')."""
    if not text:
        return {"ran": False}
    last = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error)", line)]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", last[-1] if last else "")}
    return {"ran": True, "final_line": last[-1].strip("= ") if last else None, **counts}


def sanitizer_verdict(text: str | None) -> str | None:
    if text is None:
        return None
    lines = [line for line in text.splitlines() if "SUMMARY" in line]
    return lines[-1].replace("=========", "").strip() if lines else "no summary line (timed out or crashed)"


def bench_ratios(report: dict | None) -> list[dict]:
    rows = []
    for row in (report or {}).get("results", []):
        _, unit, values, best, ratio = headline(row, "graph_")
        rows.append({
            "case": {k: row[k] for k in ("batch", "seqlen_q", "heads_q", "heads_kv", "seqlen", "causal")},
            "unit": unit,
            "cuda_graph": {name: round(v, 1) for name, v in values.items()},
            "ours_over_best_peer": round(ratio, 3) if ratio is not None else None,
            "best_peer": best,
        })
    return rows


def main(out_dir: str, log_dir: str) -> int:
    accuracy = read(os.path.join(out_dir, "accuracy.json"))
    accuracy = json.loads(accuracy) if accuracy else None
    bench = read(os.path.join(out_dir, "bench.json"))
    bench = json.loads(bench) if bench else None
    demo = read(os.path.join(log_dir, "demo.txt"))
    summary = {
        "card": card_name() or (bench or {}).get("card"),
        "commit": os.environ.get("FLASHMLA_COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d"),
        "command": "bash scripts/gpu_check.sh " + os.environ.get("GPU_CHECK_MODE", "full"),
        "gpu_tests": pytest_counts(read(os.path.join(log_dir, "gpu_tests.txt"))),
        "decode_accuracy": None if accuracy is None else
        {k: accuracy[k] for k in ("checked", "passed", "worst")},
        "sanitizers": {tool: sanitizer_verdict(read(os.path.join(out_dir, f"sanitizer_{tool}.txt")))
                       for tool in ("memcheck", "racecheck", "synccheck")},
        "demo": demo.strip().splitlines()[-3:] if demo else None,
        "benchmark": bench_ratios(bench),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: summary[k] for k in ("card", "commit", "gpu_tests", "decode_accuracy", "sanitizers")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
