"""Where a decode call's CUDA-graph time goes, per library: the benchmark's own runs (L2 flush, start
event, graph replay, end event; `--flush memset`, the benchmark's standard, or `read`, which leaves L2
clean) under the torch profiler, each run cut into the flush's end to the first kernel's start (launch
gap), each kernel's own interval, and the last kernel's end. Answers whether a library that matches
another's kernel time loses the difference between kernels or around them. GPU.

    python devtools/graph_gaps.py --cases b64-q1-h128-1024,b16-q1-h128-2048 --dtype bf16 \
        --only flashmla_cupy,FlashMLA --json out.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import bench  # noqa: E402  (scripts/)
import bench_cases  # noqa: E402


def runs_of(torch, replay, flush, runs: int) -> list[dict]:
    """`runs` benchmark runs of `replay` under the profiler: for each, the flush kernel's end, every
    kernel of the call (name, start, end: us from the flush's end) and the events' elapsed time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for start, end in events:
            flush()
            start.record()
            replay()
            end.record()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    return cut_runs(kernels, [start.elapsed_time(end) * 1000 for start, end in events], flush.mode)


# The flush's kernel in a profile, per bench.L2Flush mode: the byte fill, or the int64 sum that reads the buffer.
FLUSH_KERNELS = {"memset": "FillFunctor<unsigned char>", "read": "sum_functor<long"}


def cut_runs(kernels: list[tuple[float, float, str]], event_us: list[float], flush: str = "memset") -> list[dict]:
    """(start, end, name) device intervals (us) of len(event_us) runs -> one dict per run: its kernels
    (name, start, end: us from the end of the run's flush, FLUSH_KERNELS[flush] over FLUSH_BYTES; the
    kernels up to the next flush are the call's) and its event time."""
    kernels = sorted(kernels)
    flushes = [i for i, (s, t, name) in enumerate(kernels) if FLUSH_KERNELS[flush] in name and t - s > 10]
    out = []
    for n, i in enumerate(flushes[:len(event_us)]):
        stop = flushes[n + 1] if n + 1 < len(flushes) else len(kernels)
        base = kernels[i][1]
        call = [(name[:50], s - base, t - base) for s, t, name in kernels[i + 1:stop]]
        out.append({"kernels": call, "event_us": event_us[n]})
    return out


def summary(runs: list[dict]) -> dict:
    """Medians over the runs: launch gap, each kernel's start and end, the call's end, the event time."""
    names = [k[0] for k in runs[0]["kernels"]] if runs else []
    same = [r for r in runs if [k[0] for k in r["kernels"]] == names]
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731
    return {
        "runs": len(same),
        "event_us": med([r["event_us"] for r in same]),
        "kernels": [{"name": name, "start_us": med([r["kernels"][j][1] for r in same]),
                     "end_us": med([r["kernels"][j][2] for r in same])} for j, name in enumerate(names)],
        "last_end_us": med([max(k[2] for k in r["kernels"]) for r in same]),
    }


# Diagnostic forms of our call (--ours-forms): "nocombine" launches the decode alone (the output of a
# call whose plan cuts a request is then wrong: for timing only), "nopdl" the combine without
# programmatic dependent launch (it starts once the decode grid has ended).
OUR_FORMS = ("nocombine", "nopdl")


def with_form(form: str | None, make):
    """`make` with our combine launch patched into `form` while the graph is captured."""
    from flashmla_cupy import kernels

    def patched(torch, case, x):
        plain = kernels.CombineLaunch.__call__
        if form == "nocombine":
            kernels.CombineLaunch.__call__ = lambda self, *args: None
        elif form == "nopdl":
            def no_pdl(self, *args):
                config = self._launch._config
                kept, config.num_attrs = config.num_attrs, 0
                try:
                    plain(self, *args)
                finally:
                    config.num_attrs = kept
            kernels.CombineLaunch.__call__ = no_pdl
        try:
            return bench.captured(torch, make(torch, case, x))
        finally:
            kernels.CombineLaunch.__call__ = plain
    return patched


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="b64-q1-h128-1024,b16-q1-h128-2048,b1-q1-h128-32768")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--only", default="flashmla_cupy,FlashMLA,FlashInfer-fa3")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--flush", choices=tuple(FLUSH_KERNELS), default="memset",
                        help="how L2 is flushed before each run (bench.py --flush): memset, or read (left clean)")
    parser.add_argument("--ours-forms", default="", help=f"comma-separated, of {OUR_FORMS}: our call also so")
    parser.add_argument("--json")
    args = parser.parse_args()
    import torch

    flush = bench.L2Flush(torch, args.flush)
    libs = [(lib.name, with_form(None, lib.make)) for lib in bench.LIBRARIES
            if lib.name in args.only.split(",") and args.dtype in lib.dtypes]
    ours = next(lib for lib in bench.LIBRARIES if lib.name == bench.bench_report.OURS)
    libs += [(f"{ours.name}[{form}]", with_form(form, ours.make)) for form in filter(None, args.ours_forms.split(","))
             if form in OUR_FORMS]
    report = []
    for case_id in args.cases.split(","):
        case = bench_cases.parse(case_id, args.dtype)
        x = bench.make_inputs(torch, case, seed=0)
        for name, make in libs:
            try:
                replay = make(torch, case, x)
                got = summary(runs_of(torch, replay, flush, args.runs))
            except Exception as exc:  # a peer that does not run here is reported, not fatal
                got = {"error": bench.error_text(exc)}
            row = {"case": case_id, "dtype": args.dtype, "flush": args.flush, "library": name, **got}
            report.append(row)
            if "error" in got:
                print(f"{case_id} {name}: {got['error']}")
                continue
            parts = "  ".join(f"{k['name'][:28]} {k['start_us']:.1f}-{k['end_us']:.1f}" for k in got["kernels"])
            print(f"{case_id} {name:24s} event {got['event_us']:.1f} us, last kernel end "
                  f"{got['last_end_us']:.1f}: {parts}")
    if args.json:
        header = {"card": torch.cuda.get_device_name(), "driver": bench.driver_version(), "commit": bench.commit(),
                  "command": " ".join(["graph_gaps.py", *sys.argv[1:]]), "torch": torch.__version__,
                  "libraries": {lib.name: bench.library_info(lib) for lib in bench.LIBRARIES
                                if lib.name in args.only.split(",")}}
        pathlib.Path(args.json).write_text(json.dumps({**header, "results": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
