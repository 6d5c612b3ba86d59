"""Render a `scripts/bench.py` JSON: markdown tables, a PNG chart, a short console summary. No GPU needed.

    python scripts/bench_report.py RESULTS.json                   # the markdown, printed
    python scripts/bench_report.py RESULTS.json --md OUT.md --png OUT.png
    python scripts/bench_report.py RESULTS.json --save benchmarks/results   # <date>-<card>-<commit>.json/.md/.png
    python scripts/bench_report.py RESULTS.json --brief           # issue 7's table and the matrix in a few lines

Each case is judged by one figure: GB/s when it is memory-bound (at most one row tile per KV head),
TFLOPS otherwise; `ours_over_best_peer` divides ours by the best peer that agreed with our output.
Reports written before the current schema (bf16 only, times in ms) are read too.
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import re
import shutil
import statistics
import sys
from typing import NamedTuple

import bench_cases  # scripts/ is this script's first sys.path entry

SCHEMA = 2
OURS = "flashmla_cupy"
MODES = {"graph": "CUDA-graph replay", "eager": "eager calls"}
GROUP_TITLES = {"issue": "issue 7 table", "matrix": "standard matrix (docs/API.md section 7)", "": "other cases"}


class Headline(NamedTuple):
    key: str                    # "gbps" | "tflops"
    unit: str
    values: dict                # library -> figure, for the libraries timed in this mode
    best_peer: str | None
    ratio: float | None         # ours / best peer


def short_commit(commit) -> str:
    """A commit as the reports name it: 7 hex digits, keeping the "-modified" mark of bench.commit()."""
    text = str(commit)
    return text[:7] + ("-modified" if text.endswith("-modified") else "")


def headline(row: dict, mode: str = "graph") -> Headline:
    """The figure that judges one case in one mode (MODES), for every library timed in it."""
    memory = bench_cases.memory_bound(row["seqlen_q"], row["heads_q"], row["heads_kv"])
    key, unit = ("gbps", "GB/s") if memory else ("tflops", "TFLOPS")
    values = {name: e[mode][key] for name, e in row["libraries"].items() if mode in e}
    peers = {name: v for name, v in values.items() if name != OURS}
    best = max(peers, key=peers.get) if peers else None
    ratio = values[OURS] / peers[best] if best is not None and OURS in values else None
    return Headline(key, unit, values, best, ratio)


def ratio_by_round(row: dict, peer: str | None, mode: str = "graph") -> float | None:
    """The median over the rounds of `peer`'s time over ours in the same round (bench.py times a case's
    libraries back to back in each round): a figure that a machine drifting between states from round to
    round moves less than the ratio of the two medians, where one slow round of one library can move its
    median into the other state. None where either library lacks its rounds."""
    libraries = row["libraries"]
    if peer is None or mode not in libraries.get(OURS, {}) or mode not in libraries.get(peer, {}):
        return None
    ours, theirs = libraries[OURS][mode].get("rounds_us"), libraries[peer][mode].get("rounds_us")
    if not ours or not theirs or len(ours) != len(theirs) or min(ours) <= 0:
        return None
    return statistics.median(t / o for t, o in zip(theirs, ours))


def finish_row(row: dict) -> dict:
    """Add the verdict fields of a measured row: unit, best peer, ours / best peer (graph and eager), and
    the graph ratio round by round (ratio_by_round; a diagnostic beside the verdict)."""
    graph, eager = headline(row, "graph"), headline(row, "eager")
    row.update(unit=graph.unit, best_peer=graph.best_peer, ours_over_best_peer=graph.ratio,
               ours_over_best_peer_eager=eager.ratio,
               ours_over_best_peer_by_round=ratio_by_round(row, graph.best_peer))
    return row


def _upgrade(report: dict) -> dict:
    """A report from before SCHEMA (bf16 only, flat per-library keys, times in ms) in today's shape."""
    for row in report["results"]:
        case = bench_cases.Case(row["batch"], row["seqlen_q"], row["heads_q"], row["seqlen"], row["heads_kv"],
                                causal=row["causal"])
        row.update(id=case.id, dtype=case.dtype, varlen=False, groups=bench_cases.groups_of(case))
        for name, old in row["libraries"].items():
            # Those reports recorded each peer's difference from ours but no verdict.
            new = {"check": "ours" if name == OURS else "unchecked"}
            for mode, prefix in (("eager", ""), ("graph", "graph_")):
                if prefix + "ms" in old:
                    new[mode] = {"us": old[prefix + "ms"] * 1000, "tflops": old[prefix + "tflops"],
                                 "gbps": old[prefix + "gbps"]}
            new.update({k: old[k] for k in ("host_us", "error", "graph_error", "kernels_us") if k in old})
            row["libraries"][name] = new
        finish_row(row)
    report.update(schema=SCHEMA, complete=True)
    report.setdefault("ceilings", {})
    report.setdefault("libraries", {})
    return report


def read_json(path) -> object:
    """A results file's JSON as written, or as kept xz-compressed (`.json.xz`: the larger old reports)."""
    with (lzma.open(path, "rt") if str(path).endswith(".xz") else open(path)) as f:
        return json.load(f)


def load(path: str) -> dict:
    """A benchmark report, brought up to the current schema."""
    report = read_json(path)
    return report if report.get("schema") == SCHEMA else _upgrade(report)


def card_tag(card: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100': the file-name form of a card."""
    model = re.search(r"\b(G?[A-Z]\d{2,4}[A-Za-z]?)\b", card or "")
    return model.group(1).lower() if model else re.sub(r"[^a-z0-9]+", "-", (card or "gpu").lower()).strip("-")


def stem(report: dict) -> str:
    """<date>-<card>-<commit>: how benchmarks/results/ names one run's files."""
    return f"{report.get('date', 'undated')}-{card_tag(report.get('card'))}-{short_commit(report.get('commit'))}"


def library_names(report: dict) -> list[str]:
    names = {name: None for row in report["results"] for name in row["libraries"]}
    return sorted(names, key=lambda name: name != OURS)  # ours first, peers in the order they ran


def ceiling(report: dict, row: dict, key: str) -> float | None:
    ceilings = report.get("ceilings") or {}
    return ceilings.get("copy_gbps") if key == "gbps" else (ceilings.get("matmul_tflops") or {}).get(row["dtype"])


def _cell(entry: dict | None, mode: str, key: str) -> str:
    if entry is None:
        return "—"
    if mode in entry:
        timed = entry[mode]
        host = f"; host {entry['host_us']:.0f} us" if mode == "eager" and "host_us" in entry else ""
        return f"{timed[key]:.0f} ({timed['us']:.0f} us{host})"
    if entry.get("check") == "mismatch":
        return "disagrees"
    if "error" in entry or f"{mode}_error" in entry:
        return "error"
    return "—"


def _table(report: dict, rows: list[dict], mode: str, names: list[str]) -> list[str]:
    lines = ["| case | unit | " + " | ".join(names) + " | ours / best peer | ours / ceiling |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for row in rows:
        h = headline(row, mode)
        cells = [_cell(row["libraries"].get(name), mode, h.key) for name in names]
        top = ceiling(report, row, h.key)
        of_ceiling = f"{h.values[OURS] / top:.0%}" if top and OURS in h.values else "—"
        ratio = f"{h.ratio:.2f}" if h.ratio is not None else "—"
        lines.append(f"| {row['id']} | {h.unit} | " + " | ".join(cells) + f" | {ratio} | {of_ceiling} |")
    return lines


def _by_group(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows of each named set (a row in both sets is in both tables), ad-hoc cases last."""
    groups: dict[str, list[dict]] = {name: [] for name in GROUP_TITLES}
    for row in rows:
        for name in row.get("groups") or [""]:
            groups[name].append(row)
    return {name: rows for name, rows in groups.items() if rows}


def dtypes_of(report: dict) -> list[str]:
    return list(dict.fromkeys(row["dtype"] for row in report["results"]))


def _libraries_line(report: dict) -> str:
    parts = []
    for name, info in (report.get("libraries") or {}).items():
        if "version" in info:
            parts.append(f"{name} {info['version']}")
        else:
            parts.append(f"{name} not importable ({info.get('error', '?')[:80]})")
    return "; ".join(parts) or "not recorded"


def ceilings_line(report: dict) -> str:
    ceilings = report.get("ceilings") or {}
    if not ceilings:
        return "not measured in this run" + (f" ({report['ceilings_error']})" if "ceilings_error" in report else "")
    matmul = ", ".join(f"{d} {v:.0f} TFLOPS" for d, v in (ceilings.get("matmul_tflops") or {}).items())
    return f"copy {ceilings['copy_gbps']:.0f} GB/s (bytes read + written); matmul {matmul}"


def problems(report: dict) -> list[str]:
    """One line per library that failed or disagreed with ours on a case."""
    lines = []
    for row in report["results"]:
        for name, e in row["libraries"].items():
            where = f"{row['dtype']} {row['id']} {name}"
            if e.get("check") == "mismatch":
                lines.append(f"{where}: disagrees with ours (max abs diff {e['max_abs_diff']:.3g}, "
                             f"cosine difference {e['cos_diff']:.3g}); not timed")
            for key in ("error", "graph_error"):
                if key in e:
                    lines.append(f"{where}: {key.replace('_', ' ')}: {e[key]}")
    return lines


def markdown(report: dict) -> str:
    names = library_names(report)
    out = [f"# MLA decode benchmark: {report.get('card')}, commit {short_commit(report.get('commit'))}, "
           f"{report.get('date')}", "",
           f"- driver {report.get('driver', '?')}, CUDA {report.get('cuda', '?')}, torch {report.get('torch', '?')}, "
           f"Python {report.get('python', '?')}",
           f"- libraries: {_libraries_line(report)}",
           f"- ceilings measured in this run: {ceilings_line(report)}",
           f"- timing: {report.get('timing', '?')}"]
    if report.get("check"):
        out.append(f"- peers checked against ours before timing: {report['check']}")
    if not report.get("complete", True):
        out.append(f"- **incomplete run** ({report.get('stopped', 'stopped early')}): "
                   f"{len(report.get('not_run', []))} selected cases not measured")
    if not report["results"]:
        return "\n".join(out + ["", "No case was measured."]) + "\n"
    for dtype in dtypes_of(report):
        rows = [row for row in report["results"] if row["dtype"] == dtype]
        for mode, title in MODES.items():
            out += ["", f"## {dtype}, {title}"]
            for group, group_rows in _by_group(rows).items():
                out += ["", f"### {GROUP_TITLES[group]}", ""] + _table(report, group_rows, mode, names)
    issues = problems(report)
    if issues:
        out += ["", "## Problems", ""] + [f"- {line}" for line in issues]
    return "\n".join(out) + "\n"


def brief(report: dict) -> str:
    """A few lines for a console: issue 7's table (CUDA-graph replay) and the spread of the rest."""
    names = library_names(report)
    out = [f"{report.get('card')}  commit {short_commit(report.get('commit'))}  CUDA-graph replay, "
           f"ceilings: {ceilings_line(report)}"]
    for dtype in dtypes_of(report):
        rows = [row for row in report["results"] if row["dtype"] == dtype]
        groups = _by_group(rows)
        if "issue" in groups:
            out += ["", f"{dtype}, issue 7 table"] + _table(report, groups["issue"], "graph", names)
        ratios = [row["ours_over_best_peer"] for row in rows if row.get("ours_over_best_peer") is not None]
        if ratios:
            worst = min(rows, key=lambda row: row.get("ours_over_best_peer") or float("inf"))
            out.append(f"{dtype}: {len(rows)} cases, ours / best peer: median {statistics.median(ratios):.2f}, "
                       f"worst {worst['ours_over_best_peer']:.2f} ({worst['id']}), "
                       f"{sum(r >= 1 for r in ratios)} of {len(ratios)} at or above 1.00")
    issues = problems(report)
    if issues:
        out += ["", f"{len(issues)} problems:"] + issues[:10]
    if not report.get("complete", True):
        out.append(f"incomplete run ({report.get('stopped', 'stopped early')}): "
                   f"{len(report.get('not_run', []))} selected cases not measured")
    return "\n".join(out)


def png(report: dict, path: str) -> None:
    """Bars of every library per case (CUDA-graph replay) against the ceilings measured in the run: one
    panel per dtype and regime, GB/s for memory-bound cases and TFLOPS for the others."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = library_names(report)
    panels = []
    for dtype in dtypes_of(report):
        for key, unit in (("gbps", "GB/s"), ("tflops", "TFLOPS")):
            rows = [row for row in report["results"]
                    if row["dtype"] == dtype and headline(row).key == key and headline(row).values]
            if rows:
                panels.append((dtype, key, unit, rows))
    if not panels:
        raise ValueError("no case has a CUDA-graph figure to draw")
    widest = max(len(rows) for *_, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(10.0, 0.2 * widest * len(names) + 2), 4.5 * len(panels)),
                             squeeze=False)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}  # one color per library
    for ax, (dtype, key, unit, rows) in zip(axes[:, 0], panels):
        heads = [headline(row) for row in rows]
        drawn = [name for name in names if any(name in h.values for h in heads)]
        width = 0.8 / len(drawn)
        for i, name in enumerate(drawn):
            bars = [(x - 0.4 + width * (i + 0.5), h.values[name]) for x, h in enumerate(heads) if name in h.values]
            ax.bar([x for x, _ in bars], [v for _, v in bars], width, label=name, color=colors[name], zorder=2)
        for x, h in enumerate(heads):  # ours / best peer over each group of bars
            if h.ratio is not None:
                ax.annotate(f"{h.ratio:.2f}", (x, max(h.values.values())), xytext=(0, 2), textcoords="offset points",
                            ha="center", fontsize=7)
        top = ceiling(report, rows[0], key)
        highest = max([top or 0.0] + [v for h in heads for v in h.values.values()])
        if top:
            what = "copy" if key == "gbps" else f"{dtype} matmul"
            ax.axhline(top, color="black", linestyle="--", linewidth=1, zorder=3)
            ax.annotate(f"{what} ceiling {top:.0f} {unit} (measured in this run)", (-0.5, top), xytext=(0, 3),
                        textcoords="offset points", fontsize=8)
        ax.set_ylim(0, highest * 1.25)  # headroom for the legend and the ratios
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row["id"] for row in rows], rotation=90, fontsize=7)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylabel(unit)
        regime = "memory-bound" if key == "gbps" else "compute-bound"
        ax.set_title(f"{dtype}, {regime} cases (numbers: ours / best peer)", fontsize=10)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        ax.legend(fontsize=8, loc="upper right", ncol=len(drawn))
    fig.suptitle(f"MLA decode, CUDA-graph replay, L2 flushed\n{report.get('card')}, "
                 f"commit {short_commit(report.get('commit'))}, {report.get('date')}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))  # 0.7 inch for the two-line title
    rendered = io.BytesIO()
    fig.savefig(rendered, format="png", dpi=110)
    plt.close(fig)
    # Stored in 256 colours (a chart has ~300, the extra ones antialiased edges): half the bytes, and the charts
    # are committed, into a repository whose size the device limits. matplotlib requires Pillow.
    from PIL import Image
    with Image.open(rendered) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, format="PNG", optimize=True)


def write_outputs(report: dict, md: str | None = None, png_path: str | None = None) -> list[str]:
    """Write the markdown and the chart where asked; the chart is skipped (and said so) without matplotlib."""
    written = []
    if md:
        with open(md, "w") as f:
            f.write(markdown(report))
        written.append(md)
    if png_path:
        try:
            png(report, png_path)
            written.append(png_path)
        except ImportError:
            print(f"no chart: matplotlib is not installed (pip install matplotlib), {png_path} not written",
                  file=sys.stderr)
        except ValueError as exc:
            print(f"no chart: {exc}", file=sys.stderr)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="a scripts/bench.py results file")
    parser.add_argument("--md", help="write the markdown tables here")
    parser.add_argument("--png", help="write the chart here")
    parser.add_argument("--save", metavar="DIR", help="write <date>-<card>-<commit>.json, .md and .png into DIR")
    parser.add_argument("--brief", action="store_true", help="print the short summary")
    args = parser.parse_args(argv)

    report = load(args.json)
    md, png_path = args.md, args.png
    if args.save:
        base = os.path.join(args.save, stem(report))
        if os.path.abspath(args.json) != os.path.abspath(base + ".json"):
            shutil.copyfile(args.json, base + ".json")
        md, png_path = base + ".md", base + ".png"
    for path in write_outputs(report, md, png_path):
        print(f"wrote {path}")
    if args.brief:
        print(brief(report))
    elif not (md or png_path):
        print(markdown(report), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
