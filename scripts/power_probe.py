"""Power and SM clock while each library runs one case for seconds: does ours slow down more under
sustained load because it draws more power?

On the H200, h_q = 128, 4096 timed twice in a row read ours 2.5-5.3 % slower the second time and
FlashMLA 1-2 % (docs/PERF_NOTES.md, seventeenth session). Both are compute-bound, so a clock that power
or heat holds back should slow both alike. This script runs each library's CUDA-graph replay back to back
(no L2 flush: the steady state of a serving loop) for `--seconds`, in turns with an idle gap between,
while `nvidia-smi` samples the board's power draw, the SM clock and the temperature; it reports per run
the time per call, the median power and clock, the largest temperature and the energy per call.

    python scripts/power_probe.py [--case b128-q1-h128-4096] [--dtype bf16] [--seconds 3] [--turns 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import bench  # scripts/ is this script's first sys.path entry
import bench_cases

QUERY = "power.draw,clocks.sm,temperature.gpu"


class Sampler:
    """nvidia-smi printing one CSV line of QUERY every `interval_ms` for one GPU, read back at stop()."""

    def __init__(self, device: int, interval_ms: int, exe: str = "nvidia-smi"):
        self.command = [exe, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}",
                        f"--id={device}"]
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> list[tuple[float, float, float]]:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=10)
        return parse_samples(out)


def parse_samples(text: str) -> list[tuple[float, float, float]]:
    """(watts, MHz, degrees C) of each complete CSV line; lines with a missing or unknown field skipped."""
    samples = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        try:
            watts, mhz, celsius = (float(f) for f in fields)
        except ValueError:   # "[N/A]", a header, a line cut by the terminate
            continue
        samples.append((watts, mhz, celsius))
    return samples


def summarize(samples: list[tuple[float, float, float]], calls: int, seconds: float) -> dict:
    """One run: time per call, median power and SM clock over the samples, hottest sample, energy per call."""
    us = seconds / calls * 1e6
    if not samples:
        return {"us_per_call": us, "samples": 0}
    watts = statistics.median(s[0] for s in samples)
    return {"us_per_call": us, "samples": len(samples), "power_w": watts,
            "sm_mhz": statistics.median(s[1] for s in samples), "max_temp_c": max(s[2] for s in samples),
            "mj_per_call": watts * us / 1e3}


def smi_index(device: int) -> str:
    """nvidia-smi's id of CUDA device `device`: CUDA_VISIBLE_DEVICES renumbers the GPUs, nvidia-smi not."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[device] if device < len(visible) else str(device)


def run_for(torch, replay, seconds: float) -> tuple[int, float]:
    """Replays back to back for about `seconds` (synchronising every 50): (calls, elapsed seconds)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            replay()
        calls += 50
        torch.cuda.synchronize()
    return calls, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="b128-q1-h128-4096")
    parser.add_argument("--dtype", default="bf16", choices=bench_cases.DTYPES)
    parser.add_argument("--libs", default="flashmla_cupy,FlashMLA", help="comma-separated library names")
    parser.add_argument("--seconds", type=float, default=3.0, help="each run's length")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle before each run")
    parser.add_argument("--turns", type=int, default=2, help="runs of each library, in turns")
    parser.add_argument("--interval-ms", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    (case,) = bench_cases.select(args.case, [args.dtype])
    libs = {lib.name: lib for lib in bench.LIBRARIES}
    inputs = bench.make_inputs(torch, case, seed=1)
    replays = {}
    for name in args.libs.split(","):
        fn = libs[name].make(torch, case, inputs)
        fn()
        replays[name] = bench.captured(torch, fn)
    sampler = Sampler(smi_index(torch.cuda.current_device()), args.interval_ms)
    runs = []
    for turn in range(args.turns):
        for name, replay in replays.items():
            time.sleep(args.idle)
            sampler.start()
            calls, seconds = run_for(torch, replay, args.seconds)
            row = {"library": name, "turn": turn, **summarize(sampler.stop(), calls, seconds)}
            runs.append(row)
            print(json.dumps(row), flush=True)
    report = {"card": torch.cuda.get_device_name(), "driver": bench.driver_version(), "commit": bench.commit(),
              "case": case.id, "dtype": case.dtype, "how": __doc__.split("\n\n")[1].replace("\n", " "),
              "runs": runs}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
