"""How fast can a memory-bound decode case be at all, under the benchmark's L2 flush? (GPU; torch, CuPy,
and the peers where importable.)

For each case: a plain all-SM read kernel (devtools/l2_resident_probe.py's) over a contiguous buffer of
the case's bytes (SPEC's accounting: cache, q and output), then the libraries on scripts/bench.py's inputs
(CUDA-graph replay), each timed after the memset flush scripts/bench.py uses and after a read flush
(which leaves L2 clean): the memset leaves L2 full of dirty lines that any kernel running next writes back
to DRAM while it reads, so the read kernel after the memset is the floor that flush method puts under
every library's time.

    python devtools/read_floor.py [CASE-DTYPE ...]   (default: b128-q1-h16-4096-fp8 b128-q1-h32-8192-fp8
                                                      b128-q1-h16-4096-bf16 b128-q1-h32-8192-bf16)
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "devtools")]

import torch  # noqa: E402

import bench  # noqa: E402
from l2_resident_probe import read_kernel  # noqa: E402

FLUSHES = ("memset", "read")


def main(labels: list[str]) -> None:
    timers = {flush: bench.Timer(torch, flush=flush) for flush in FLUSHES}
    print(f"{torch.cuda.get_device_name()}; times in us, CUDA-event median; " +
          ", ".join(bench.flush_description(f) for f in FLUSHES), flush=True)
    for label in labels:
        case_id, _, dtype = label.rpartition("-")
        case = bench.bench_cases.parse(case_id, dtype)
        _, nbytes = case.accounting()
        rows = {"read kernel": (None, read_kernel(nbytes))}
        inputs = bench.make_inputs(torch, case, seed=1)   # not checked against each other: timing only
        for lib in bench.LIBRARIES:
            if dtype not in lib.dtypes:
                continue
            try:   # the call stays referenced: its plan lives in its closure, which the graph replays
                fn = lib.make(torch, case, inputs)
                rows[lib.name] = (fn, bench.captured(torch, fn))
            except Exception as exc:  # a peer that does not import or run here
                print(f"  {lib.name}: {bench.error_text(exc)}")
        for name, (_, replay) in rows.items():
            times = {flush: timers[flush].us(replay) for flush in FLUSHES}
            print(f"{label:24s} {nbytes / 1e6:7.1f} MB  {name:20s} " +
                  "  ".join(f"{flush} {us:7.1f} us ({nbytes / us / 1e6:.2f} TB/s)" for flush, us in times.items()),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["b128-q1-h16-4096-fp8", "b128-q1-h32-8192-fp8", "b128-q1-h16-4096-bf16",
                          "b128-q1-h32-8192-bf16"])
