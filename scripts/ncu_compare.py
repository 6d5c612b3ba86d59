"""Nsight Compute side by side: our decode kernel and FlashMLA's (and FlashInfer's, if asked) on one case.

Each library runs in a process of its own, this script with `--launch`, under ncu: the same inputs
as scripts/bench.py, two warm-up calls, then ncu profiles the next launch of the library's decode
kernel (KERNELS) with the clocks left alone (`--clock-control none`, so durations compare with the
benchmark's) and caches flushed before every replay pass (ncu's default). The raw page of each report
is saved as CSV and the metrics below are printed side by side, then the warp stall reasons, largest
first.

    python scripts/ncu_compare.py --case b128-q1-h128-4096 [--dtype bf16] [--libs flashmla_cupy,FlashMLA]
                                  [--out DIR] [--ncu PATH]
    python scripts/ncu_compare.py --from DIR [--libs ...]    # the table again from DIR's CSVs; no GPU

With `--flush memset` (or `read`), ncu leaves the caches alone and replays the whole process for each
pass (`--cache-control none --replay-mode application`), and the process flushes L2 before every call
the way scripts/bench.py does (a 256 MiB memset, which leaves L2 full of dirty lines; or a read): the
kernel as the benchmark times it, rather than on ncu's clean caches (`--flush ncu`, the default). It is
slower: the process (torch import, inputs) runs once per pass, dozens of times with `--source`.

With `--source`, ncu also samples where the warps stall (its SourceCounters section), and the SASS
instructions with the most stall samples are listed per library (from `--page source`, saved as
<library>-source.csv), so that a stall reason can be traced to the instructions that wait.

With `--kernel combine`, each library's kernel that merges split requests is profiled instead of its decode
kernel (COMBINE_KERNELS; under ncu it runs after the decode has ended, its partials out of the caches).

With `--variant "NAME: ITEM ..."` (scripts/kernel_ab.py's variant spec: `tree=DIR`,
`patch=devtools/candidates/NAME.patch`, `-D...`, `maxparts=N`, ...) our library runs that build instead of the shipped one, so that a candidate is
profiled beside the peers without a copy of the repository.

Peers must import (scripts/gpu_check.sh ncu sets that up on the device).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile

import bench  # scripts/ is this script's first sys.path entry
import bench_cases

# Regular expressions over kernel names (ncu --kernel-name regex:...): each library's decode kernel.
KERNELS = {"flashmla_cupy": "flashmla_decode", "FlashMLA": "flash_fwd_splitkv_mla",
           "FlashMLA-fp8": "flash_fwd_splitkv_mla", "FlashInfer-fa3": "BatchMLAPageAttentionHopper"}
# With `--kernel combine`: each library's kernel that merges split requests (FlashInfer has none).
COMBINE_KERNELS = {"flashmla_cupy": "flashmla_combine", "FlashMLA": "flash_fwd_mla_combine",
                   "FlashMLA-fp8": "flash_fwd_splitkv_mla_combine"}   # the legacy kernels' name
WARMUP_LAUNCHES = 2
NCU_TIMEOUT_S = 300

# Section names have been stable across ncu releases; they collect most of the metrics below.
SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "SchedulerStats",
            "WarpStateStats", "Occupancy", "LaunchStats", "InstructionStats")
# Asked for by name as well, each only if this ncu lists it (an unknown name would fail the run).
EXTRA_METRICS = (
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "sm__inst_issued.avg.pct_of_peak_sustained_active",
    "sm__inst_issued.avg.per_cycle_active",
    "smsp__inst_issued.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__bytes.sum.per_second",
    "lts__t_sector_hit_rate.pct",
    "l1tex__t_sector_hit_rate.pct",
)

# (label, display scale from the base unit, candidate metric names: the first one present is shown).
ROWS = (
    ("duration (us)", 1e6, ("gpu__time_duration.sum",)),
    ("grid size (CTAs)", 1, ("launch__grid_size",)),
    ("block size (threads)", 1, ("launch__block_size",)),
    ("registers per thread", 1, ("launch__registers_per_thread",)),
    ("dynamic shared memory per CTA (KB)", 1e-3, ("launch__shared_mem_per_block_dynamic",)),
    ("tensor pipe, wgmma (% of active cycles)", 1,
     ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",)),
    ("tensor pipe, all (% of active cycles)", 1, ("sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",)),
    ("SM busy (%)", 1, ("sm__instruction_throughput.avg.pct_of_peak_sustained_active",)),
    ("compute throughput (% of peak)", 1, ("sm__throughput.avg.pct_of_peak_sustained_elapsed",)),
    ("issue slots busy (%)", 1, ("sm__inst_issued.avg.pct_of_peak_sustained_active",
                                 "smsp__issue_active.avg.pct_of_peak_sustained_active")),
    ("issued IPC (per SM, active cycles)", 1, ("sm__inst_issued.avg.per_cycle_active",)),
    ("instructions issued (M)", 1e-6, ("smsp__inst_issued.sum", "sm__inst_issued.sum")),
    ("instructions executed (M)", 1e-6, ("smsp__inst_executed.sum", "sm__inst_executed.sum")),
    ("warp cycles per issued instruction", 1, ("smsp__average_warp_latency_per_inst_issued.ratio",)),
    ("eligible warps per scheduler per cycle", 1, ("smsp__warps_eligible.avg.per_cycle_active",)),
    ("achieved occupancy (%)", 1, ("sm__warps_active.avg.pct_of_peak_sustained_active",)),
    ("DRAM throughput (% of peak)", 1, ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                                        "dram__throughput.avg.pct_of_peak_sustained_elapsed")),
    ("DRAM bandwidth (GB/s)", 1e-9, ("dram__bytes.sum.per_second",)),
    ("DRAM read (MB)", 1e-6, ("dram__bytes_read.sum",)),
    ("DRAM written (MB)", 1e-6, ("dram__bytes_write.sum",)),
    ("L2 hit rate (%)", 1, ("lts__t_sector_hit_rate.pct",)),
    ("L1/TEX hit rate (%)", 1, ("l1tex__t_sector_hit_rate.pct",)),
    ("L2 compression input sectors (M)", 1e-6, ("lts__gcomp_input_sectors.sum",)),
)
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")
STALL_ROWS = 12
SOURCE_ROWS = 20  # instructions listed per library with --source

_PREFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
# Both spellings occur: 'usecond', 'Gbyte/second' (older ncu) and 'us', 'Tbyte/s', 'Kbyte/block' (the
# H200 image's ncu, 2026-11-30).
_SCALED_UNIT = re.compile(r"([numKMGT]?)(second|s|byte|byte/second|byte/s|byte/block)")


def to_base(value: float, unit: str) -> float:
    """A value in ncu's printed unit ('usecond' or 'us', 'Kbyte', 'Gbyte/second' or 'Tbyte/s', ...) in
    seconds, bytes or bytes per second; other units (%, cycle, inst, ...) are left as they are."""
    match = _SCALED_UNIT.fullmatch(unit.strip())
    return value * _PREFIX[match.group(1)] if match else value


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_raw_csv(text: str) -> list[dict[str, float]]:
    """Kernels of an `ncu --import R --page raw --csv` listing, each {metric: value in base units}.

    Reads the wide form (a header of metric names, a units row, one row per kernel) and the long form
    (one "Metric Name"/"Metric Unit"/"Metric Value" row per metric); ncu's own `==PROF==` lines are skipped."""
    rows = list(csv.reader(line for line in text.splitlines() if line.strip() and not line.startswith("==")))
    if not rows:
        return []
    header = rows[0]
    kernels: dict[str, dict[str, float]] = {}
    if "Metric Name" in header and "Metric Value" in header:
        at = {name: header.index(name) for name in ("ID", "Metric Name", "Metric Unit", "Metric Value")}
        for row in rows[1:]:
            value = _number(row[at["Metric Value"]])
            if value is not None:
                kernels.setdefault(row[at["ID"]], {})[row[at["Metric Name"]]] = to_base(value, row[at["Metric Unit"]])
        return list(kernels.values())
    units = rows[1] if len(rows) > 1 and not rows[1][0] else [""] * len(header)
    for row in rows[1:]:
        if not row[0]:
            continue  # the units row
        values = {}
        for name, unit, text in zip(header, units, row):
            value = _number(text)
            if value is not None:
                values[name] = to_base(value, unit)
        kernels[row[0]] = values
    return list(kernels.values())


def metric(values: dict[str, float], candidates) -> float | None:
    return next((values[name] for name in candidates if name in values), None)


def _format(value: float | None, scale: float) -> str:
    if value is None:
        return "n/a"
    shown = value * scale
    return f"{shown:.0f}" if abs(shown) >= 1000 or shown == int(shown) else f"{shown:.3g}"


def compare_table(profiles: dict[str, dict[str, float]]) -> str:
    """Markdown: the ROWS for every library, then the warp stall reasons (cycles per issued
    instruction) largest first; rows no library reports are left out."""
    names = list(profiles)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, scale, candidates in ROWS:
        values = [metric(profiles[name], candidates) for name in names]
        if any(v is not None for v in values):
            lines.append(f"| {label} | " + " | ".join(_format(v, scale) for v in values) + " |")
    stalls: dict[str, list] = {}
    for i, name in enumerate(names):
        for key, value in profiles[name].items():
            match = STALL.fullmatch(key)
            if match:
                stalls.setdefault(match.group(1), [None] * len(names))[i] = value
    ranked = sorted(stalls.items(), key=lambda item: -max(v or 0.0 for v in item[1]))[:STALL_ROWS]
    for reason, values in ranked:
        lines.append(f"| stall: {reason} (cycles per issued instruction) | "
                     + " | ".join(_format(v, 1) for v in values) + " |")
    return "\n".join(lines) + "\n"


def known_metrics(ncu: str) -> set[str] | None:
    """Base metric names this ncu lists for the GPU here, or None when it cannot say."""
    try:
        listing = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    names = {m.group(1) for m in re.finditer(r"^\s*([a-z0-9]+__[a-z0-9_]+)", listing, re.MULTILINE)}
    return names or None


def extra_metrics(known: set[str] | None) -> list[str]:
    return [] if known is None else [m for m in EXTRA_METRICS if m.split(".")[0] in known]


def hot_instructions(text: str, top: int = SOURCE_ROWS) -> list[tuple[str, str, float, float | None]]:
    """The instructions of an `ncu --import R --page source --csv --print-source sass` listing with the
    most warp stall samples: (address, SASS, all samples, not-issued samples or None), most first. The
    columns are found by name ("Address", "Source", "Warp Stall Sampling (All Samples)", ... "(Not-issued
    Samples)"), so that a few spellings across ncu releases read alike; [] when there are none."""
    rows = list(csv.reader(line for line in text.splitlines() if line.strip() and not line.startswith("==")))
    for at, header in enumerate(rows):
        sampled = [i for i, name in enumerate(header) if name.startswith("Warp Stall Sampling (All")]
        if sampled:
            break
    else:
        return []
    def column(*names):
        return next((i for i, name in enumerate(header) if name.strip("# ") in names), None)
    address, source = column("Address"), column("Source")
    not_issued = next((i for i, name in enumerate(header) if name.startswith("Warp Stall Sampling (Not")), None)
    found = []
    for row in rows[at + 1:]:
        if len(row) != len(header):
            continue
        samples = _number(row[sampled[0]])
        if samples:
            found.append((row[address] if address is not None else "", row[source] if source is not None else "",
                          samples, _number(row[not_issued]) if not_issued is not None else None))
    return sorted(found, key=lambda item: -item[2])[:top]


def hot_table(library: str, hot: list[tuple[str, str, float, float | None]]) -> str:
    """Markdown: a library's most stalled instructions with their share of its stall samples."""
    total = sum(samples for _, _, samples, _ in hot) or 1.0
    lines = [f"{library}: the {len(hot)} SASS instructions with the most warp stall samples",
             "", "| address | instruction | samples (all) | not issued | share of these |", "|---|---|---|---|---|"]
    for address, sass, samples, not_issued in hot:
        shown = "n/a" if not_issued is None else f"{not_issued:.0f}"
        lines.append(f"| {address} | `{sass.strip()}` | {samples:.0f} | {shown} | {samples / total:.1%} |")
    return "\n".join(lines) + "\n"


# How L2 is flushed before the profiled launch: by ncu (clean caches), or by the process as bench.py does.
FLUSH_MODES = ("ncu",) + tuple(mode for mode in bench.FLUSH_MODES if mode != "none")


def ncu_command(ncu: str, library: str, case: bench_cases.Case, export: str, extra: list[str],
                source: bool = False, flush: str = "ncu", variant: str | None = None,
                kernels: dict = KERNELS) -> list[str]:
    sections = [arg for section in SECTIONS + (("SourceCounters",) if source else ()) for arg in ("--section", section)]
    metrics = ["--metrics", ",".join(extra)] if extra else []
    # The process's own flush must precede the launch in every pass: application replay, caches untouched.
    caches = [] if flush == "ncu" else ["--cache-control", "none", "--replay-mode", "application"]
    child_flush = [] if flush == "ncu" else ["--flush", flush]
    child_variant = ["--variant", variant] if variant and library == "flashmla_cupy" else []
    return [ncu, "--clock-control", "none", *caches, "--target-processes", "all",
            "--kernel-name", f"regex:{kernels[library]}", "--launch-skip", str(WARMUP_LAUNCHES), "--launch-count", "1",
            *sections, *metrics, "--force-overwrite", "--export", export,
            sys.executable, os.path.abspath(__file__), "--launch", library, "--case", case.id, "--dtype", case.dtype,
            *child_flush, *child_variant]


def profile(ncu: str, library: str, case: bench_cases.Case, out_dir: str, extra: list[str],
            source: bool = False, flush: str = "ncu", variant: str | None = None, kernels: dict = KERNELS) -> str:
    """Profile one library; returns the path of the raw-page CSV (and, with `source`, writes the source
    page's CSV beside it, or says in the log why not). Raises RuntimeError with ncu's output."""
    export = os.path.join(out_dir, library)
    run = subprocess.run(ncu_command(ncu, library, case, export, extra, source, flush, variant, kernels),
                         capture_output=True, text=True, timeout=NCU_TIMEOUT_S)
    with open(export + ".log", "w") as f:
        f.write(run.stdout + run.stderr)
    if run.returncode != 0 or not os.path.exists(export + ".ncu-rep"):
        raise RuntimeError(f"ncu for {library} exited {run.returncode}:\n{(run.stdout + run.stderr)[-3000:]}")
    listing = subprocess.run([ncu, "--import", export + ".ncu-rep", "--page", "raw", "--csv"], capture_output=True,
                             text=True, timeout=NCU_TIMEOUT_S)
    if listing.returncode != 0:
        raise RuntimeError(f"ncu --import for {library} exited {listing.returncode}:\n{listing.stderr[-3000:]}")
    with open(export + ".csv", "w") as f:
        f.write(listing.stdout)
    if source:
        page = subprocess.run([ncu, "--import", export + ".ncu-rep", "--page", "source", "--csv", "--print-source",
                               "sass"], capture_output=True, text=True, timeout=NCU_TIMEOUT_S)
        if page.returncode == 0:
            with open(export + "-source.csv", "w") as f:
                f.write(page.stdout)
        else:  # the metrics table still stands
            with open(export + ".log", "a") as f:
                f.write(f"\nncu --page source exited {page.returncode}:\n{page.stdout}{page.stderr}")
    return export + ".csv"


def read_profiles(out_dir: str, libraries: list[str]) -> dict[str, dict[str, float]]:
    """The profiled kernel of each library whose CSV is in out_dir (the last kernel when there are several)."""
    profiles = {}
    for library in libraries:
        path = os.path.join(out_dir, library + ".csv")
        if os.path.exists(path):
            with open(path) as f:
                kernels = parse_raw_csv(f.read())
            if kernels:
                profiles[library] = kernels[-1]
    return profiles


def launch(library: str, case: bench_cases.Case, flush: str = "ncu", variant: str | None = None) -> None:
    """The profiled process: the benchmark's inputs, then enough calls for ncu to skip the warm-up ones,
    each after the L2 flush bench.py does unless ncu flushes. `variant`: our build (kernel_ab's spec)."""
    if variant:
        import kernel_ab

        kernel_ab.apply(kernel_ab.parse_variant(variant))
    import torch

    lib = next(lib for lib in bench.LIBRARIES if lib.name == library)
    fn = lib.make(torch, case, bench.make_inputs(torch, case, seed=1))
    flush_l2 = bench.L2Flush(torch, flush) if flush != "ncu" else None
    for _ in range(WARMUP_LAUNCHES + 1):
        if flush_l2 is not None:
            flush_l2()
        fn()
    torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="b128-q1-h128-4096", help="a case id (scripts/bench.py --list shows some)")
    parser.add_argument("--dtype", default="bf16", choices=bench_cases.DTYPES)
    parser.add_argument("--libs", default="flashmla_cupy,FlashMLA", help="comma-separated, of " + ", ".join(KERNELS))
    parser.add_argument("--out", help="where the reports, CSVs, logs and compare.md go (default: a new temp dir)")
    parser.add_argument("--ncu", default="ncu", help="the ncu executable")
    parser.add_argument("--from", dest="from_dir", metavar="DIR",
                        help="print the table from DIR's CSVs, profile nothing")
    parser.add_argument("--source", action="store_true",
                        help="also sample stalls per instruction and list each library's most stalled ones")
    parser.add_argument("--flush", choices=FLUSH_MODES, default="ncu",
                        help="who flushes L2 before the profiled launch: ncu (clean caches, the default), or the "
                             "process as bench.py does, by a memset (dirty lines, the benchmark's setting) or a read")
    parser.add_argument("--variant", metavar="'NAME: ITEM ...'",
                        help="profile this build of our kernels (scripts/kernel_ab.py's variant spec)")
    parser.add_argument("--kernel", choices=("decode", "combine"), default="decode",
                        help="which kernel of each library's call to profile (combine: the merge of split requests)")
    parser.add_argument("--launch", help=argparse.SUPPRESS)  # the profiled child process
    args = parser.parse_args(argv)
    try:
        case = bench_cases.parse(args.case, args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    libraries = args.libs.split(",")
    kernels = KERNELS if args.kernel == "decode" else COMBINE_KERNELS
    unknown = [name for name in libraries if name not in kernels]
    if unknown:
        parser.error(f"--libs {', '.join(unknown)}: choose from {', '.join(kernels)}")
    if args.launch:
        launch(args.launch, case, args.flush, args.variant)
        return 0
    if args.variant:
        import kernel_ab

        kernel_ab.parse_variant(args.variant)  # a bad spec stops here, before ncu runs

    out_dir = args.from_dir
    failed = []
    if out_dir is None:
        out_dir = args.out or tempfile.mkdtemp(prefix="ncu_compare_")
        os.makedirs(out_dir, exist_ok=True)
        known = known_metrics(args.ncu)
        extra = extra_metrics(known)
        if known is None:
            print("ncu --query-metrics listed nothing: profiling with the sections alone", file=sys.stderr)
        for library in libraries:
            print(f"profiling {library} ({kernels[library]}) on {case.label} ...", flush=True)
            for metrics in ([extra, []] if extra else [[]]):  # then without the extras, should ncu refuse one
                try:
                    profile(args.ncu, library, case, out_dir, metrics, args.source, args.flush, args.variant,
                            kernels)
                    break
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    print(exc, file=sys.stderr)
            else:
                failed.append(library)
    profiles = read_profiles(out_dir, libraries)
    if not profiles:
        print(f"no profile in {out_dir}", file=sys.stderr)
        return 1
    what = case.label if args.from_dir is None else f"the profiles in {out_dir}"
    setting = "" if args.flush == "ncu" or args.from_dir else f", L2 flushed by a {args.flush} in the process"
    if args.variant and args.from_dir is None:
        setting += f", ours built as {args.variant!r}"
    table = (f"ncu --clock-control none{setting}, {what}, {args.kernel} kernel only (regex per library: "
             + ", ".join(f"{name} {kernels[name]}" for name in profiles) + ")\n\n" + compare_table(profiles))
    for library in profiles:  # the source pages found (--source now, or in a --from directory)
        path = os.path.join(out_dir, library + "-source.csv")
        if os.path.exists(path):
            with open(path) as f:
                hot = hot_instructions(f.read())
            table += "\n" + (hot_table(library, hot) if hot else f"{library}: no stall samples in {path}\n")
    if args.from_dir is None:  # a --from directory may be read-only (files fetched from the device)
        with open(os.path.join(out_dir, "compare.md"), "w") as f:
            f.write(table)
    print(table + f"\nfiles: {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
