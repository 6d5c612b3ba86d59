"""Collect one `scripts/gpu_check.sh` run into a JSON summary: card, commit, GPU test counts, the worst
accuracy figures, sanitizer verdicts, the demo's last lines and, per benchmark case, each library's
CUDA-graph figure and `ours_over_best_peer`.

    python scripts/summarize_gpu_check.py OUT_DIR LOG_DIR  -> writes OUT_DIR/summary.json
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import bench_report  # scripts/ is this script's first sys.path entry


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


def _rounded(x: float | None) -> float | None:
    return round(x, 3) if x is not None else None


def bench_summary(report: dict | None) -> dict | None:
    """Per case (CUDA-graph replay): each library's figure, the best peer and ours / best peer; peers
    that disagreed with ours or failed; then the spread over all cases."""
    if report is None:
        return None
    cases = []
    for row in report["results"]:
        graph = bench_report.headline(row, "graph")
        cases.append({
            "case": row["id"], "dtype": row["dtype"], "unit": graph.unit,
            "cuda_graph": {name: round(v, 1) for name, v in graph.values.items()},
            "best_peer": graph.best_peer,
            "ours_over_best_peer": _rounded(graph.ratio),
            "ours_over_best_peer_eager": _rounded(bench_report.headline(row, "eager").ratio),
            "ours_over_best_peer_by_round": _rounded(bench_report.ratio_by_round(row, graph.best_peer)),
        })
    ratios = [c["ours_over_best_peer"] for c in cases if c["ours_over_best_peer"] is not None]
    worst = min((c for c in cases if c["ours_over_best_peer"] is not None), key=lambda c: c["ours_over_best_peer"],
                default=None)
    return {
        "complete": report.get("complete", True),
        "not_run": len(report.get("not_run", [])),
        "ceilings": report.get("ceilings"),
        "cases_with_ratio": len(ratios),
        "cases_at_or_above_1": sum(r >= 1 for r in ratios),
        "worst": None if worst is None else {k: worst[k] for k in ("case", "dtype", "ours_over_best_peer")},
        "problems": bench_report.problems(report),
        "cases": cases,
    }


def reliability(out_dir: str, log_dir: str) -> dict:
    """The verdict of each part of scripts/reliability.py and of the guard cases that ran."""
    parts = {}
    for name in ("fresh_processes", "concurrent_warmups", "threads", "devices"):
        text = read(os.path.join(out_dir, f"reliability_{name}.json"))
        if text:
            report = json.loads(text)
            parts[name] = {k: report[k] for k in ("passed", "total_wall_seconds", "processes", "succeeded",
                                                   "processes_with_an_empty_nvrtc_log", "repetitions",
                                                   "bit_identical", "failures") if k in report}
    guards = read(os.path.join(out_dir, "guards.json"))
    if guards:
        report = json.loads(guards)
        parts["guard_cases"] = {"checked": report["checked"], "failed": report["failed"]}
    tests = read(os.path.join(log_dir, "guard_tests.txt"))
    if tests:
        parts["guard_tests"] = pytest_counts(tests)
    return parts


def main(out_dir: str, log_dir: str) -> int:
    accuracy = read(os.path.join(out_dir, "accuracy.json"))
    accuracy = json.loads(accuracy) if accuracy else None
    bench_path = os.path.join(out_dir, "bench.json")
    bench = bench_report.load(bench_path) if os.path.exists(bench_path) else None
    demo = read(os.path.join(log_dir, "demo.txt"))
    summary = {
        "card": card_name() or (bench or {}).get("card"),
        # The benchmark's own record (bench.commit: FLASHMLA_COMMIT, else git) where a benchmark ran.
        "commit": os.environ.get("FLASHMLA_COMMIT") or (bench or {}).get("commit") or "unknown",
        "date": time.strftime("%Y-%m-%d"),
        "command": "bash scripts/gpu_check.sh " + os.environ.get("GPU_CHECK_MODE", "full"),
        "gpu_tests": pytest_counts(read(os.path.join(log_dir, "gpu_tests.txt"))),
        "decode_accuracy": None if accuracy is None else
        {k: accuracy[k] for k in ("checked", "passed", "worst")},
        "sanitizers": {tool: sanitizer_verdict(read(os.path.join(out_dir, f"sanitizer_{tool}.txt")))
                       for tool in ("memcheck", "racecheck", "synccheck", "guards_memcheck")},
        "demo": demo.strip().splitlines()[-3:] if demo else None,
        "benchmark": bench_summary(bench),
        "reliability": reliability(out_dir, log_dir),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    shown = {k: summary[k] for k in ("card", "commit", "gpu_tests", "decode_accuracy", "sanitizers", "reliability")}
    if summary["benchmark"] is not None:
        shown["benchmark"] = {k: v for k, v in summary["benchmark"].items() if k not in ("cases", "problems")}
    print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
