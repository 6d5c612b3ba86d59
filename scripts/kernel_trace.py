"""Where the decode kernel's time goes inside a pair of pages, per warpgroup, measured in the kernel.

Builds the kernels with -DFLASHMLA_TRACE=1 (kernels_src/trace.cuh; in its own kernel cache), runs one
benchmark case once to load them, points the module's `flashmla_trace` at a buffer, runs the case
again and reads the marks that thread 0 of each consumer warpgroup of the first 16 CTAs wrote
(clock64 at each phase boundary). The report gives, per warpgroup, every step between two marks
("scores in -> probs published": the softmax and the hand-off) with its count, median and share of the
warpgroup's traced time, and the median pair time. Marks perturb the kernel a little (a store each);
read the shares, not the absolute times.

    python scripts/kernel_trace.py --case b128-q1-h128-4096 [--dtype bf16] [--json trace.json]
    python scripts/kernel_trace.py --case b64-q1-h128-1024 --tree .scratch/candidate/kernels_src
    python scripts/kernel_trace.py --case b64-q1-h128-1024 --flush memset    # L2 as the benchmark leaves it

`--flush` (memset, read or none, the default) flushes L2 before the traced run as scripts/bench.py
does; the report then also says how long each warpgroup took from the kernel's start to its first
pair and to its first scores, and to its last mark (the traced CTAs' whole run), medians over CTAs.

`--clock global` marks with %globaltimer (nanoseconds, one clock for every SM) instead of each SM's
cycle counter, so that CTAs can be compared: the report then adds, for each part whose row tiles were
traced together (grid x: the same pages, read by each tile's CTA), how far apart the tiles' CTAs start
the same pair of pages ("tile lag"). Tiles that drift further apart than L2 keeps a page read each
page from DRAM again.

    python scripts/kernel_trace.py --case b128-q2-h128-8192-causal --clock global

`--ctas N` traces the first N CTAs (default 16; the grid's CTAs, empty parts untraced): with `--clock global`
the report then adds a timeline of the whole kernel, the traced CTAs' starts and ends and, per bin of
`--bin-us`, how many pages the loaders issued and the computing warpgroups took in (their "scores in"), so
the ramp at the start and the tail at the end can be read beside the steady rate, and each CTA's page
period by the SM it ran on (the SMs' unequal shares of DRAM). The page counts follow
the narrow FP8 kernel's marks (its loader lane is warpgroup 2); `--define -DX=1` builds the traced kernels
with a measurement switch too.

    python scripts/kernel_trace.py --case b128-q1-h16-4096 --dtype fp8 --clock global --ctas 132 --flush memset

Where the plan cuts requests, `--clock global` also groups warpgroup 0's pairs by how many other CTAs'
partial-row stores overlapped them (does the page stream slow while partial rows are written?).

With `--clock global` the combine kernel's blocks are traced too (combine.cu's CombineTrace): when they
start, when their waits for the decode return and when they end, beside the decode's last mark, so that
what the combine adds after the decode can be split into waiting and merging.

With `--ctas` covering the grid, the report also says when a balanced hand-out of the same pages would have
ended (`balance`: each CTA taking pages at its own SM's period), against the last CTA's end. `--from JSON`
prints that again from a saved report, no GPU:

    python scripts/kernel_trace.py --from benchmarks/results/<date>-h200-<commit>-trace-<case>.json.xz

`--ring 1` traces decode_ring.cu on an e4m3 case with more than 32 rows (kernels.RING_FP8), `--ring 0`
decode.cu's FP8 path there. A case of at most 32 rows with an e4m3 q and cache traces decode_narrow.cu's
FP8 kernel: each computing warpgroup per page of its own ("pair start" is a page's start, "own pv done"
its value slots released, "scores issued" the next page's S^T issued once its boxes are in), and the first
loader lane per page it loads.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# trace.cuh's TraceMark names in order, its buffer shape and word layout.
MARKS = ("piece start", "pair start", "scores issued", "scores in", "probs published", "handoff in",
         "remote pv done", "own pv done (+load)", "loaded", "piece end", "kernel start",
         "convert start", "v half converted", "v converted", "block indexed", "boxes issued",
         "sums exchanged", "lse stored", "output stored", "q tile free", "pace held")
HEADER = 255
TRACE_CTAS, TRACE_WARPGROUPS, TRACE_RECORDS = 16, 3, 4096  # trace.cuh's (TRACE_CTAS: kTraceCtas's default)
CYCLE_BITS = 56
COMBINE_TRACE_BLOCKS = 1 << 16   # combine.cu's kCombineTraceBlocks: 4 words a block


def decode_record(words) -> tuple[int | None, list[tuple[int, int]]]:
    """One (CTA, warpgroup) record -> (SM id or None when untraced, [(mark, time), ...])."""
    words = [int(w) for w in words]
    if not words or words[0] >> CYCLE_BITS != HEADER:
        return None, []
    marks = []
    for word in words[1:]:
        if word == 0:
            break
        marks.append((word >> CYCLE_BITS, word & ((1 << CYCLE_BITS) - 1)))
    return words[0] & 0xFFFFFFFF, marks


def decode_place(header: int) -> tuple[int, int]:
    """A record's header word -> (row tile, part): the CTA's blockIdx.x and blockIdx.z."""
    return (int(header) >> 32) & 0xFF, (int(header) >> 40) & 0xFFFF


def tile_lag(records: dict[tuple[int, int], list[tuple[int, int]]], places: dict[int, tuple[int, int]],
             warpgroup: int = 0) -> dict:
    """With globaltimer marks: per part traced with two or more row tiles, the spread (latest minus
    earliest, microseconds) of the tiles' "pair start" of each pair index, as median, largest and last,
    and which tile finished its pairs first. Parts with one traced tile are left out."""
    pair = MARKS.index("pair start")
    by_part: dict[int, dict[int, list[int]]] = {}
    for (cta, wg), marks in records.items():
        if wg == warpgroup and cta in places:
            tile, part = places[cta]
            by_part.setdefault(part, {})[tile] = [t for m, t in marks if m == pair]
    report = {}
    for part, tiles in sorted(by_part.items()):
        if len(tiles) < 2:
            continue
        pairs = min(len(starts) for starts in tiles.values())
        spreads = [(max(s[k] for s in tiles.values()) - min(s[k] for s in tiles.values())) / 1e3
                   for k in range(pairs)]
        if not spreads:
            continue
        report[f"part {part}"] = {"tiles": sorted(tiles), "pairs": pairs,
                                  "median_us": statistics.median(spreads), "max_us": max(spreads),
                                  "last_us": spreads[-1],
                                  "first_done": min(tiles, key=lambda tile: tiles[tile][pairs - 1])}
    return report


def summarize(records: dict[tuple[int, int], list[tuple[int, int]]], clock_khz: float | None) -> dict:
    """Steps between consecutive marks, per warpgroup: count, median and total cycles, share of time."""
    per_wg: dict[int, dict] = {}
    for (_, wg), marks in records.items():
        entry = per_wg.setdefault(wg, {"steps": {}, "pairs": [], "cycles": 0})
        for (m0, t0), (m1, t1) in zip(marks, marks[1:]):
            label = f"{MARKS[m0] if m0 < len(MARKS) else m0} -> {MARKS[m1] if m1 < len(MARKS) else m1}"
            entry["steps"].setdefault(label, []).append(t1 - t0)
            entry["cycles"] += t1 - t0
        starts = [t for m, t in marks if m == MARKS.index("pair start")]
        entry["pairs"] += [b - a for a, b in zip(starts, starts[1:])]
    report = {}
    for wg, entry in sorted(per_wg.items()):
        steps = {label: {"count": len(v), "median_cycles": statistics.median(v), "total_cycles": sum(v),
                         "share": sum(v) / entry["cycles"] if entry["cycles"] else 0.0}
                 for label, v in entry["steps"].items()}
        pair = statistics.median(entry["pairs"]) if entry["pairs"] else None
        report[f"warpgroup {wg}"] = {
            "median_pair_cycles": pair,
            "median_pair_us": pair / clock_khz * 1e3 if pair and clock_khz else None,
            "steps": dict(sorted(steps.items(), key=lambda kv: -kv[1]["total_cycles"])),
        }
    return report


def startup(records: dict[tuple[int, int], list[tuple[int, int]]]) -> dict:
    """Per warpgroup, medians over the traced CTAs of the cycles from "kernel start" to its first "pair
    start", to its first "scores in" and to its last mark."""
    marks_of = {name: MARKS.index(name) for name in ("kernel start", "pair start", "scores in")}
    spans: dict[int, dict[str, list[int]]] = {}
    for (_, wg), marks in records.items():
        starts = [t for m, t in marks if m == marks_of["kernel start"]]
        if not starts:
            continue
        entry = spans.setdefault(wg, {"to first pair": [], "to first scores": [], "to last mark": []})
        for label, name in (("to first pair", "pair start"), ("to first scores", "scores in")):
            firsts = [t for m, t in marks if m == marks_of[name]]
            if firsts:
                entry[label].append(firsts[0] - starts[0])
        entry["to last mark"].append(marks[-1][1] - starts[0])
    return {f"warpgroup {wg}": {label: statistics.median(v) if v else None for label, v in entry.items()}
            for wg, entry in sorted(spans.items())}


def timeline(records: dict[tuple[int, int], list[tuple[int, int]]], loader_wg: int, bin_ns: int) -> dict:
    """With globaltimer marks of many CTAs: when the traced CTAs start and end (microseconds after the
    earliest mark), and per bin of `bin_ns` the pages the loaders issued ("boxes issued") and the other
    warpgroups took in ("scores in"), and how many CTAs were running."""
    if not records:
        return {}
    t0 = min(marks[0][1] for marks in records.values() if marks)
    spans: dict[int, list[int]] = {}
    for (cta, _), marks in records.items():
        if marks:
            span = spans.setdefault(cta, [marks[0][1], marks[-1][1]])
            span[0], span[1] = min(span[0], marks[0][1]), max(span[1], marks[-1][1])
    end = max(e for _, e in spans.values())
    bins = (end - t0) // bin_ns + 1
    issued, taken, running = [0] * bins, [0] * bins, [0] * bins
    for (_, wg), marks in records.items():
        for m, t in marks:
            if wg == loader_wg and m == MARKS.index("boxes issued"):
                issued[(t - t0) // bin_ns] += 1
            elif wg != loader_wg and m == MARKS.index("scores in"):
                taken[(t - t0) // bin_ns] += 1
    for start, stop in spans.values():
        for b in range((start - t0) // bin_ns, (stop - t0) // bin_ns + 1):
            running[b] += 1

    def quantiles(values):
        values = sorted((v - t0) / 1e3 for v in values)
        return {"min": values[0], "median": statistics.median(values), "max": values[-1]}

    return {"ctas": len(spans), "bin_us": bin_ns / 1e3,
            "start_us": quantiles([s for s, _ in spans.values()]), "end_us": quantiles([e for _, e in spans.values()]),
            "bins": [{"from_us": b * bin_ns / 1e3, "issued": issued[b], "taken": taken[b], "running": running[b]}
                     for b in range(bins)]}


def sm_periods(records: dict[tuple[int, int], list[tuple[int, int]]], sms: dict[int, int], loader_wg: int) -> dict:
    """With globaltimer marks of many CTAs: each CTA's page period in us (the time between its pages taken
    in, "scores in" of all its computing warpgroups, over the middle half of them), keyed by the SM it ran
    on. The H200 streams to some SMs faster than to others (runs of neighbouring ids, likely whole GPCs:
    the thirtieth session's traces),
    which a plan of equal parts turns into CTAs ending apart."""
    taken: dict[int, list[int]] = {}
    for (cta, wg), marks in records.items():
        if wg != loader_wg:
            taken.setdefault(cta, []).extend(t for m, t in marks if m == MARKS.index("scores in"))
    periods = {}
    for cta, times in taken.items():
        times.sort()
        middle = times[len(times) // 4:len(times) - len(times) // 4]
        if len(middle) >= 2:
            periods[sms[cta]] = (middle[-1] - middle[0]) / (len(middle) - 1) / 1e3
    return {str(sm): periods[sm] for sm in sorted(periods)}


def balance(records: dict[tuple[int, int], list[tuple[int, int]]], sms: dict[int, int], periods: dict,
            loader_wg: int) -> dict:
    """With globaltimer marks of every CTA: how far the plan's static parts are from a balanced end. Each
    CTA's pages (its computing warpgroups' "scores in"), its first and last mark, and its SM's page period
    (sm_periods) give it a fixed cost (its span less pages x period). The balanced end is the time T at
    which the CTAs, each still paying its fixed cost and taking pages at its own SM's period, would have
    taken all of the pages between them: sum over CTAs of (T - start - fixed) / period = pages. That is
    what a plan handing out pages as CTAs free up (rather than fixed ranges) would reach, if the SMs kept
    their periods; the gap to the last CTA's end is what it could win. Times in us from the first mark."""
    scores_in = MARKS.index("scores in")
    pages: dict[int, int] = {}
    times: dict[int, list[int]] = {}
    for (cta, wg), marks in records.items():
        pages[cta] = pages.get(cta, 0) + sum(1 for m, _ in marks if m == scores_in and wg != loader_wg)
        times.setdefault(cta, []).extend(t for _, t in marks)
    rows = [(pages[cta], min(times[cta]), max(times[cta]), periods[str(sms[cta])])
            for cta in pages if pages[cta] and str(sms.get(cta)) in periods]
    if not rows:
        return {}
    origin = min(first for _, first, _, _ in rows)
    rows = [(pages, (first - origin) / 1e3, (last - origin) / 1e3, period) for pages, first, last, period in rows]
    fixed = [end - start - pages * period for pages, start, end, period in rows]
    total = sum(pages for pages, _, _, _ in rows)
    lo, hi = 0.0, max(end for _, _, end, _ in rows) * 2
    for _ in range(60):  # bisection on T: the pages the CTAs would have taken by T grow with T
        mid = (lo + hi) / 2
        taken = sum(max(0.0, mid - start - cost) / period for (_, start, _, period), cost in zip(rows, fixed))
        lo, hi = (mid, hi) if taken < total else (lo, mid)
    ends = sorted(end for _, _, end, _ in rows)
    return {"ctas": len(rows), "pages": total, "pages_min": min(r[0] for r in rows), "pages_max": max(r[0] for r in rows),
            "end_min_us": ends[0], "end_median_us": statistics.median(ends), "end_max_us": ends[-1],
            "fixed_median_us": statistics.median(fixed), "balanced_end_us": round(hi, 2)}


def print_balance(summary: dict) -> None:
    if not summary:
        return
    print(f"\nbalance: {summary['ctas']} CTAs took {summary['pages']} pages ({summary['pages_min']}-"
          f"{summary['pages_max']} a CTA) and ended at {summary['end_min_us']:.1f} / {summary['end_median_us']:.1f} / "
          f"{summary['end_max_us']:.1f} us (min / median / max); pages handed out at each SM's own period would "
          f"end at {summary['balanced_end_us']:.1f} us (fixed costs median {summary['fixed_median_us']:.1f} us a CTA)")


def store_overlap(records: dict[tuple[int, int], list[tuple[int, int]]]) -> dict:
    """With globaltimer marks of many CTAs and pieces that end before the kernel does (a plan that cuts):
    warpgroup 0's pairs of pages (from one "pair start" to the next within a piece) in the middle 80 % of
    the traced span, grouped by how many of the other CTAs' output stores ("sums exchanged" to "output
    stored": partial rows where a piece was cut) overlapped them, counted in pair lengths. The median pair
    time of each group says whether the page stream slows while partial rows are written (the thirty-sixth
    session's cut trace at h64/16k). Without cuts every store comes after the pairs ("none" only)."""
    names = ("pair start", "piece end", "sums exchanged", "output stored")
    pair, end, sums, stored = (MARKS.index(name) for name in names)
    windows, pairs = [], []
    for (cta, wg), marks in records.items():
        if wg != 0:
            continue
        windows += [(cta, a, b) for a, b in zip((t for m, t in marks if m == sums),
                                                (t for m, t in marks if m == stored))]
        piece_ends = [t for m, t in marks if m == end]
        starts = [t for m, t in marks if m == pair]
        pairs += [(cta, a, b) for a, b in zip(starts, starts[1:]) if not any(a < e < b for e in piece_ends)]
    times = [t for marks in records.values() for _, t in marks]
    if not windows or not pairs or not times:
        return {}
    lo, hi = min(times), max(times)
    lo, hi = lo + (hi - lo) // 10, hi - (hi - lo) // 10
    groups = {"none": [], "up to 1": [], "1 to 2": [], "more": []}
    for cta, a, b in pairs:
        if a < lo or b > hi:
            continue
        overlap = sum(max(0, min(b, w1) - max(a, w0)) for other, w0, w1 in windows if other != cta) / (b - a)
        key = "none" if overlap == 0 else "up to 1" if overlap <= 1 else "1 to 2" if overlap <= 2 else "more"
        groups[key].append(b - a)
    return {"store_windows": len(windows), "store_window_median_ns": statistics.median(w1 - w0 for _, w0, w1 in windows),
            "pairs": {k: {"count": len(v), "median_ns": statistics.median(v)} for k, v in groups.items() if v}}


def print_store_overlap(summary: dict) -> None:
    if not summary:
        return
    print(f"\npairs of pages by the other CTAs' output stores over them ({summary['store_windows']} stores, "
          f"median {summary['store_window_median_ns'] / 1e3:.2f} us; in pair lengths): " +
          "; ".join(f"{k}: {v['count']} pairs, median {v['median_ns']:.0f} ns" for k, v in summary["pairs"].items()))


def print_sm_periods(periods: dict) -> None:
    if not periods:
        return
    values = sorted(periods.values())
    print(f"\npage period by SM (us, the middle half of each CTA's pages): min {values[0]:.2f}, "
          f"median {statistics.median(values):.2f}, max {values[-1]:.2f}")
    items = [f"{sm:>3s} {us:.2f}" for sm, us in periods.items()]
    for i in range(0, len(items), 12):
        print("  " + "  ".join(items[i:i + 12]))


def print_timeline(line: dict, page_bytes: int) -> None:
    if not line:
        return
    print(f"\ntimeline of {line['ctas']} CTAs (us after the earliest mark): starts " +
          ", ".join(f"{k} {v:.2f}" for k, v in line["start_us"].items()) + "; ends " +
          ", ".join(f"{k} {v:.2f}" for k, v in line["end_us"].items()))
    print(f"  {'from us':>8s} {'running':>8s} {'issued':>7s} {'taken':>6s} {'taken TB/s':>11s}")
    for b in line["bins"]:
        rate = b["taken"] * page_bytes / (line["bin_us"] * 1e6)
        print(f"  {b['from_us']:8.1f} {b['running']:8d} {b['issued']:7d} {b['taken']:6d} {rate:11.2f}")


def print_report(report: dict) -> None:
    for wg, entry in report.items():
        pair_us = f", ~{entry['median_pair_us']:.2f} us at the max clock" if entry["median_pair_us"] else ""
        print(f"\n{wg}: median pair {entry['median_pair_cycles']} cycles{pair_us}")
        print(f"  {'step':48s} {'count':>6s} {'median cyc':>11s} {'share':>7s}")
        for label, step in entry["steps"].items():
            print(f"  {label:48s} {step['count']:6d} {step['median_cycles']:11.0f} {step['share']:7.1%}")


def combine_summary(table, records: dict[tuple[int, int], list[tuple[int, int]]]) -> dict:
    """The combine kernel's blocks against the decode kernel (both marked with %globaltimer): `table` is
    combine.cu's trace, [blocks, 4] words (start, wait returned or 0, end, merges << 32 | SM), `records` the
    decode's marks. Microseconds from the decode's first mark: when the combine's blocks started, when their
    waits for the decode returned (the blocks that merge rows, and the one unsplit block that waits), when
    they ended, beside the decode's last mark (its traced CTAs' ends)."""
    mask = (1 << CYCLE_BITS) - 1
    decode_times = [t for marks in records.values() for _, t in marks]
    rows = [[int(w) for w in row] for row in table if int(row[0]) != 0]
    if not decode_times or not rows:
        return {}
    origin = min(decode_times)

    def us(t: int) -> float:
        return ((t & mask) - origin) / 1e3

    def spread(values: list[float]) -> dict:
        return {"first": min(values), "median": statistics.median(values), "last": max(values)} if values else {}

    return {"blocks": len(rows), "merging": sum(1 for r in rows if r[3] >> 32),
            "decode_last_mark_us": us(max(decode_times)),
            "start_us": spread([us(r[0]) for r in rows]),
            "waited_us": spread([us(r[1]) for r in rows if r[1]]),
            "end_us": spread([us(r[2]) for r in rows if r[2]]),
            "merging_end_us": spread([us(r[2]) for r in rows if r[2] and r[3] >> 32])}


def print_combine(summary: dict) -> None:
    if not summary:
        return

    def line(name: str) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in summary[name].items()) or "none"

    print(f"combine: {summary['blocks']} blocks traced, {summary['merging']} merging rows; us from the decode's "
          f"first mark (its last mark at {summary['decode_last_mark_us']:.2f}): starts {line('start_us')}; "
          f"waits returned {line('waited_us')}; ends {line('end_us')}; merging blocks' ends {line('merging_end_us')}")


def _scripts_on_path() -> None:
    for entry in (str(ROOT / "scripts"), str(ROOT)):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def traced_build(tree: str | None, clock: str, ctas: int, extra: tuple = (), smem: int | None = None,
                 ring: bool | None = None, items: str = "") -> dict:
    """The kernel_ab build spec of a trace: the trace defines, then `items` (kernel_ab variant items,
    e.g. 'whole=-1' or 'maxparts=128' for another plan, or '-D...'), with --tree, --smem and --ring."""
    _scripts_on_path()
    import kernel_ab

    spec = kernel_ab.parse_variant(f"traced: {items}")
    defines = ["-DFLASHMLA_TRACE=1"] + (["-DFLASHMLA_TRACE_GLOBALTIMER=1"] if clock == "global" else [])
    if ctas != TRACE_CTAS:
        defines.append(f"-DFLASHMLA_TRACE_CTAS={ctas}")
    spec["defines"] = defines + list(extra) + spec["defines"]
    for key, value in (("tree", tree), ("smem", smem), ("ring", ring)):
        if value is not None:
            spec[key] = str(pathlib.Path(value).resolve()) if key == "tree" else value
    return spec


def trace(case_id: str, dtype: str, tree: str | None, flush: str = "none", clock: str = "sm",
          ring: bool | None = None, ctas: int = TRACE_CTAS, bin_us: float = 2.0, extra: tuple = (),
          smem: int | None = None, items: str = "") -> dict:
    _scripts_on_path()
    import kernel_ab

    kernel_ab.apply(traced_build(tree, clock, ctas, extra, smem, ring, items))
    import cupy
    import torch

    import bench
    import bench_cases
    from flashmla_cupy import launch

    case = bench_cases.parse(case_id, dtype)
    fn = bench.ours(torch, case, bench.make_inputs(torch, case, seed=1))
    fn()
    torch.cuda.synchronize()
    programs = ("decode", "decode_ring", "decode_narrow")
    [loaded] = [v for (variant, _), v in launch._loaded.items() if variant.program in programs]
    words = cupy.zeros(ctas * TRACE_WARPGROUPS * TRACE_RECORDS, dtype=cupy.uint64)
    loaded.global_words("flashmla_trace", 1)[0] = words.data.ptr
    # With one clock for all SMs, the combine's blocks too (combine.cu's CombineTrace).
    combine_words = None
    if clock == "global":
        combine_words = cupy.zeros(4 * COMBINE_TRACE_BLOCKS, dtype=cupy.uint64)
        for (variant, _), module in launch._loaded.items():
            if variant.program == "combine":
                module.global_words("flashmla_combine_trace", 1)[0] = combine_words.data.ptr
    bench.L2Flush(torch, flush)()
    fn()
    torch.cuda.synchronize()
    table = cupy.asnumpy(words).reshape(ctas, TRACE_WARPGROUPS, TRACE_RECORDS)
    records, sms, places = {}, {}, {}
    for cta in range(ctas):
        for wg in range(TRACE_WARPGROUPS):
            sm, marks = decode_record(table[cta, wg])
            if sm is not None:
                records[cta, wg], sms[cta], places[cta] = marks, sm, decode_place(table[cta, wg, 0])
    clock_khz = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrClockRate, 0)
    # With globaltimer marks the steps' "cycles" are nanoseconds, and there is no clock to convert them by.
    report = {"case": case_id, "dtype": dtype, "card": torch.cuda.get_device_name(), "commit": bench.commit(),
              "flush": flush, "clock": clock, "traced_ctas": len(sms), "max_clock_khz": clock_khz,
              "startup_cycles": startup(records),
              **summarize(records, clock_khz if clock == "sm" else None)}
    report["sms"] = {str(cta): sm for cta, sm in sms.items()}
    if clock == "global":
        report["tile_lag"] = tile_lag(records, places)
        # The narrow FP8 kernel's loader marks as warpgroup 2 (its two computing warpgroups are 0 and 1).
        report["timeline"] = timeline(records, 2, int(bin_us * 1e3))
        report["sm_page_us"] = sm_periods(records, sms, 2)
        report["balance"] = balance(records, sms, report["sm_page_us"], 2)
        report["store_overlap"] = store_overlap(records)
        report["page_bytes"] = 64 * 576 * case.heads_kv * (1 if dtype == "fp8" else 2)
        report["combine"] = combine_summary(cupy.asnumpy(combine_words).reshape(-1, 4), records)
    report["raw"] = {f"{cta}/{wg}": [[int(m), int(t)] for m, t in marks] for (cta, wg), marks in records.items()}
    return report


def main(argv=None) -> int:
    _scripts_on_path()
    import bench  # imports no framework and compiles nothing: kernel_ab.apply still comes first in trace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="b128-q1-h128-4096", help="a scripts/bench.py case id")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--tree", help="another kernels_src directory to trace")
    parser.add_argument("--smem", type=int, help="the decode kernel's dynamic shared memory where --tree's storage differs")
    parser.add_argument("--json", help="write the report (with the raw marks) here")
    parser.add_argument("--flush", choices=bench.FLUSH_MODES, default="none",
                        help="flush L2 before the traced run as scripts/bench.py does (default: none)")
    parser.add_argument("--clock", choices=("sm", "global"), default="sm",
                        help="mark with each SM's cycle counter (default) or with %%globaltimer (ns, comparable "
                             "across CTAs; adds the row tiles' lag)")
    parser.add_argument("--ring", type=int, choices=(0, 1),
                        help="send an e4m3 q and cache with more than 32 rows to decode_ring.cu (1) or decode.cu "
                             "(0); default: kernels.RING_FP8")
    parser.add_argument("--ctas", type=int, default=TRACE_CTAS, help="CTAs traced (default: 16)")
    parser.add_argument("--define", action="append", default=[], help="another -D... for the traced build")
    parser.add_argument("--items", default="", help="kernel_ab.py variant items for the traced build, e.g. "
                        "'whole=-1' (the plan that cuts equal requests) or 'maxparts=128'")
    parser.add_argument("--bin-us", type=float, default=2.0, help="the timeline's bin (with --clock global)")
    parser.add_argument("--from", dest="from_json", metavar="JSON",
                        help="a --json report of a --clock global trace (.xz too): its balance again, no GPU")
    args = parser.parse_args(argv)
    if args.from_json:
        import bench_report  # reads the .json.xz that benchmarks/results keeps the large reports as
        report = bench_report.read_json(args.from_json)
        if report.get("clock") != "global":
            parser.error(f"{args.from_json}: not a --clock global trace (each SM's cycle counter cannot be compared across CTAs)")
        records = {tuple(map(int, key.split("/"))): [tuple(mark) for mark in marks] for key, marks in report["raw"].items()}
        sms = {int(cta): sm for cta, sm in report["sms"].items()}
        print(f"{report['card']}  {report['case']} {report['dtype']}  commit {report['commit']}")
        print_balance(balance(records, sms, sm_periods(records, sms, 2), 2))
        return 0
    os.environ.setdefault("FLASHMLA_CUPY_CACHE_DIR", "/tmp/kernel_trace_cache")
    report = trace(args.case, args.dtype, args.tree, args.flush, args.clock,
                   None if args.ring is None else bool(args.ring), args.ctas, args.bin_us,
                   tuple(args.define), args.smem, args.items)
    print(f"{report['card']}  {report['case']} {report['dtype']}  commit {report['commit']}  "
          f"{report['traced_ctas']} CTAs traced, L2 flush before the traced run: {report['flush']}")
    if args.clock == "global":
        print("(marks from %globaltimer: the 'cycles' below are nanoseconds)")
    for wg, spans in report["startup_cycles"].items():
        print(f"{wg}: from kernel start, cycles (median over CTAs): " +
              ", ".join(f"{label} {value:.0f}" for label, value in spans.items() if value is not None))
    print_report({k: v for k, v in report.items() if k.startswith("warpgroup")})
    for part, lag in report.get("tile_lag", {}).items():
        print(f"{part}: tiles {lag['tiles']} over {lag['pairs']} pairs, start of a pair apart by median "
              f"{lag['median_us']:.2f} us, at most {lag['max_us']:.2f}, at the last {lag['last_us']:.2f}; "
              f"tile {lag['first_done']} first")
    print_timeline(report.get("timeline", {}), report.get("page_bytes", 0))
    print_sm_periods(report.get("sm_page_us", {}))
    print_balance(report.get("balance", {}))
    print_store_overlap(report.get("store_overlap", {}))
    print_combine(report.get("combine", {}))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
