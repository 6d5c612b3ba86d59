"""The benchmark tooling without a GPU: case matrix, accounting, argument parsing, partial results,
rendering from recorded and synthetic JSON, the GPU-check summary, ncu's CSV and host_profile's mock."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # the scripts import each other as top-level modules

import bench  # noqa: E402
import bench_cases  # noqa: E402
import bench_report  # noqa: E402
import kernel_ab  # noqa: E402
import kernel_trace  # noqa: E402
import ncu_compare  # noqa: E402
import power_probe  # noqa: E402
import summarize_gpu_check  # noqa: E402
from bench_cases import Case  # noqa: E402
from flashmla_cupy.reference import perf_accounting  # noqa: E402

def _is_bench_report(path: str) -> bool:
    """Benchmark reports hold per-case rows with per-library figures; other results files (guard and
    reliability reports) hold rows of their own."""
    report = bench_report.read_json(path)
    rows = report.get("results") if isinstance(report, dict) else None
    return isinstance(rows, list) and bool(rows) and all("libraries" in row for row in rows)


# (The larger old reports are kept xz-compressed; so are the kernel traces, which are not reports and are
# large to read: left out by name.)
RECORDED = sorted(p for pattern in ("*.json", "*.json.xz")
                  for p in glob.glob(str(REPO / "benchmarks/results" / pattern))
                  if "-trace" not in os.path.basename(p) and _is_bench_report(p))


def test_issue_table_matrix_and_their_order():
    assert [c.id for c in bench_cases.issue_shapes()] == [
        "b128-q1-h128-4096", "b32-q1-h128-8192", "b64-q1-h128-1024", "b16-q1-h128-2048", "b1-q1-h128-32768",
        "b128-q2-h128-8192-causal", "b128-q2-h64-4096-causal", "b128-q1-h64-16384", "b128-q1-h16-4096",
        "b128-q1-h32-8192", "b8-q1-h16-16384"]
    matrix = bench_cases.matrix_shapes()
    assert len(matrix) == len(set(matrix)) == 2 * 4 * 4 * 2
    assert all(c.batch == 128 and c.heads_kv == 1 and c.causal == (c.seqlen_q == 2) for c in matrix)
    assert {(c.seqlen_q, c.heads_q, c.seqlen, c.varlen) for c in matrix} == {
        (s, h, n, v) for s in (1, 2) for h in (16, 32, 64, 128) for n in (1024, 4096, 8192, 16384) for v in (0, 1)}
    cases = bench_cases.select("all", ["bf16", "fp16"])
    assert len(cases) == 2 * (64 + 5)  # five issue-table shapes are outside the matrix
    assert [c.dtype for c in cases[:22]] == ["bf16"] * 11 + ["fp16"] * 11  # the issue table first, both dtypes
    assert [c.id for c in cases[:11]] == [c.id for c in bench_cases.issue_shapes()]
    assert bench_cases.groups_of(cases[0]) == ["issue", "matrix"]
    assert bench_cases.groups_of(bench_cases.parse("b8-q1-h16-16384", "fp16")) == ["issue"]


def test_every_id_parses_back_and_ad_hoc_ids_work():
    for case in bench_cases.select("all", ["fp16"]):
        assert bench_cases.parse(case.id, "fp16") == case
    odd = bench_cases.parse("b3-q4-h32-777-kv2-var-causal")
    assert odd == Case(3, 4, 32, 777, heads_kv=2, varlen=True, causal=True)
    assert bench_cases.groups_of(odd) == []
    for bad in ("b128-q1-h128", "b128-q1-h128-4096-causal-var", "issue7"):
        with pytest.raises(ValueError):
            bench_cases.parse(bad)


def test_select_patterns_ids_and_errors():
    picked = bench_cases.select("b128-q2-h128-*,b5-q1-h16-100", ["bf16"])
    assert [c.id for c in picked][-1] == "b5-q1-h16-100"
    assert len(picked) == 8 + 1 and all(c.id.startswith("b128-q2-h128-") for c in picked[:-1])
    assert bench_cases.select("issue,issue", ["bf16"]) == bench_cases.select("issue", ["bf16"])
    for spec, dtypes in (("b999-*", ["bf16"]), ("issue", ["int4"]), ("issue", [])):
        with pytest.raises(ValueError):
            bench_cases.select(spec, dtypes)


def test_lengths_are_fixed_or_reproducibly_varied_and_the_accounting_uses_them():
    fixed = Case(128, 2, 64, 4096, causal=True)
    assert fixed.seqlens() == [4096] * 128 and fixed.pages() == [64] * 128
    var = Case(128, 2, 64, 4096, varlen=True, causal=True)
    lengths = var.seqlens()
    assert lengths == Case(128, 2, 64, 4096, varlen=True, causal=True, dtype="fp16").seqlens()
    assert min(lengths) >= 2 and len(set(lengths)) > 100
    assert abs(sum(lengths) / 128 - 4096) < 0.15 * 4096
    assert var.pages() == [-(-n // 64) for n in lengths]
    assert var.accounting() == perf_accounting(sum(lengths), 128, 2, 64, 1, 2)
    assert fixed.memory_bound is False and Case(128, 2, 32, 4096).memory_bound is True


def test_bench_arguments_and_list_need_no_gpu(capsys):
    assert bench.main(["--list", "--quick"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("11 cases") and "fp16" not in out
    args = bench.parse_args(["--quick", "--dtype", "fp16"])
    assert [c.label for c in args.selected][:1] == ["fp16 b128-q1-h128-4096"] and len(args.selected) == 11
    args = bench.parse_args(["--only", "FlashMLA,flashmla_cupy"])
    assert [lib.name for lib in args.libraries] == ["flashmla_cupy", "FlashMLA"]  # ours first, whatever the order
    assert len(args.selected) == 207   # 69 shapes in bf16, fp16 and fp8
    for bad in (["--only", "vllm"], ["--cases", "b0-*"], ["--dtype", "int8"], ["--flush", "evict"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_flush_modes_are_named_in_the_report():
    assert bench.parse_args([]).flush == "memset"  # the standard, unless a diagnostic asks otherwise
    assert bench.parse_args(["--flush", "read"]).flush == "read"
    assert "256 MiB memset" in bench.flush_description("memset")
    assert "left clean" in bench.flush_description("read") and "not flushed" in bench.flush_description("none")
    with pytest.raises(ValueError):
        bench.Timer(None, flush="evict")


def _entry(us: float, case: Case, check: str = "agrees") -> dict:
    flops, nbytes = case.accounting()
    timed = bench.rates(us, flops, nbytes)
    return {"check": check, "graph": timed, "eager": dict(timed, us=us * 1.1), "host_us": 30.0}


def _row(case: Case, ours_us: float, flashmla_us: float, flashinfer: dict | None = None) -> dict:
    row = bench.case_row(case)
    row["libraries"] = {"flashmla_cupy": _entry(ours_us, case, "ours"), "FlashMLA": _entry(flashmla_us, case)}
    if flashinfer is not None:
        row["libraries"]["FlashInfer-fa3"] = flashinfer
    return bench_report.finish_row(row)


def _report(rows: list[dict]) -> dict:
    return {"schema": bench_report.SCHEMA, "card": "NVIDIA H200", "driver": "580.1", "commit": "0123456789abcdef",
            "date": "2026-12-01", "python": "3.12", "torch": "2.11", "cuda": "13.0", "timing": "median",
            "libraries": {"flashmla_cupy": {"version": "0.1"}, "FlashMLA": {"version": "1.0.0"},
                          "FlashInfer-fa3": {"error": "ModuleNotFoundError: flashinfer"}},
            "ceilings": {"copy_gbps": 4269.0, "matmul_tflops": {"bf16": 800.0, "fp16": 790.0}},
            "complete": True, "results": rows}


def test_run_cases_keeps_what_it_measured_when_interrupted(tmp_path, capsys):
    cases = bench_cases.select("issue", ["bf16"])[:5]
    path = str(tmp_path / "r.json")

    def measure(i, case):
        if i == 2:
            raise KeyboardInterrupt  # what SIGTERM becomes in bench.main
        return _row(case, 100.0, 90.0)

    report = bench.run_cases(_report([]), cases, measure, path)
    saved = json.loads(pathlib.Path(path).read_text())
    assert saved == report and not saved["complete"]
    assert [r["id"] for r in saved["results"]] == [c.id for c in cases[:2]]
    assert saved["not_run"] == [c.label for c in cases[2:]] and "interrupted" in saved["stopped"]
    assert capsys.readouterr().out.count("ours / best peer 0.90") == 2


def test_run_cases_stops_after_the_case_in_progress_on_sigterm(tmp_path):
    stop = bench.StopRequest()
    cases = bench_cases.select("issue", ["bf16"])

    def measure(i, case):
        if i == 1:
            stop(bench.signal.SIGTERM, None)
        return _row(case, 100.0, 100.0)

    report = bench.run_cases(_report([]), cases, measure, str(tmp_path / "r.json"), stop=stop)
    assert len(report["results"]) == 2 and report["stopped"] == "SIGTERM received" and len(report["not_run"]) == 9


def test_run_cases_stops_before_the_budget(tmp_path):
    now = [0.0]

    def measure(i, case):
        now[0] += 10.0
        return _row(case, 100.0, 100.0)

    cases = bench_cases.select("issue", ["bf16"])
    report = bench.run_cases(_report([]), cases, measure, str(tmp_path / "r.json"), budget_s=25, clock=lambda: now[0])
    assert len(report["results"]) == 2 and report["stopped"] == "time budget of 25 s"
    report = bench.run_cases(_report([]), cases[:3], measure, str(tmp_path / "r.json"))
    assert report["complete"] and report["not_run"] == []


def test_headline_ignores_peers_that_disagree_and_rendering_shows_them(tmp_path):
    compute = Case(128, 1, 128, 4096)
    memory = Case(128, 1, 16, 4096, dtype="fp16")
    mismatch = {"check": "mismatch", "max_abs_diff": 0.02, "cos_diff": 0.5}
    rows = [_row(compute, 250.0, 200.0, mismatch),
            _row(memory, 150.0, 160.0, {"check": "agrees", "error": "RuntimeError: boom"})]
    assert rows[0]["best_peer"] == "FlashMLA" and rows[0]["ours_over_best_peer"] == pytest.approx(0.8)
    assert rows[0]["unit"] == "TFLOPS" and rows[1]["unit"] == "GB/s"
    assert rows[1]["ours_over_best_peer"] == pytest.approx(160 / 150)
    assert rows[1]["ours_over_best_peer_eager"] == pytest.approx(160 / 150)
    report = _report(rows)
    md = bench_report.markdown(report)
    assert "## bf16, CUDA-graph replay" in md and "## fp16, eager calls" in md
    assert "| b128-q1-h128-4096 | TFLOPS | 584 (250 us) | 730 (200 us) | disagrees | 0.80 | 73% |" in md
    assert "| b128-q1-h16-4096 | GB/s |" in md and "| error | 1.07 |" in md
    assert "FlashInfer-fa3 not importable" in md and "copy 4269 GB/s" in md
    problems = bench_report.problems(report)
    assert len(problems) == 2 and "disagrees with ours" in problems[0] and "boom" in problems[1]
    short = bench_report.brief(report)
    assert "bf16, issue 7 table" in short and "fp16: 1 cases" in short and "1 of 1 at or above 1.00" in short
    pytest.importorskip("matplotlib")
    json_path = tmp_path / "run.json"
    json_path.write_text(json.dumps(report))
    assert bench_report.main([str(json_path), "--save", str(tmp_path)]) == 0
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"2026-12-01-h200-0123456{suffix}").exists()
    assert (tmp_path / "2026-12-01-h200-0123456.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("path", RECORDED, ids=os.path.basename)
def test_recorded_reports_render(path, tmp_path):
    report = bench_report.load(path)
    md = bench_report.markdown(report)
    assert md.count("| b") >= 2 * len(report["results"])  # every row in the graph and the eager tables
    summary = pathlib.Path(path.replace(".json", "-summary.json"))
    recorded = json.loads(summary.read_text())["benchmark"] if summary.exists() else None
    if isinstance(recorded, list):  # the ratios agree with the ones the summary of that run recorded
        assert [r["ours_over_best_peer"] for r in report["results"]] == pytest.approx(
            [c["ours_over_best_peer"] for c in recorded], abs=1e-3)
    pytest.importorskip("matplotlib")
    if not any("graph" in e for row in report["results"] for e in row["libraries"].values()):
        with pytest.raises(ValueError):  # the earliest runs timed eager calls only
            bench_report.png(report, str(tmp_path / "chart.png"))
        return
    bench_report.png(report, str(tmp_path / "chart.png"))
    assert (tmp_path / "chart.png").stat().st_size > 10_000


def test_card_tags():
    assert bench_report.card_tag("NVIDIA H200") == "h200"
    assert bench_report.card_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert bench_report.card_tag("NVIDIA GH200 480GB") == "gh200"
    assert bench_report.card_tag(None) == "gpu"


def test_gpu_check_summary_names_ours_over_best_peer_per_case(tmp_path, capsys, monkeypatch):
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    case = Case(128, 1, 128, 4096)
    (out / "bench.json").write_text(json.dumps(_report([_row(case, 250.0, 200.0)]) | {"complete": False,
                                                                                          "not_run": ["x"]}))
    (out / "accuracy.json").write_text(json.dumps({"checked": 3, "passed": 3, "worst": {}, "cases": []}))
    (out / "sanitizer_memcheck.txt").write_text("========= ERROR SUMMARY: 0 errors\n")
    (logs / "gpu_tests.txt").write_text("..\n80 passed, 195 deselected in 158.17s\n")
    monkeypatch.setattr(summarize_gpu_check, "card_name", lambda: None)
    monkeypatch.delenv("FLASHMLA_COMMIT", raising=False)
    assert summarize_gpu_check.main(str(out), str(logs)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["card"] == "NVIDIA H200" and summary["gpu_tests"]["passed"] == 80
    assert summary["commit"] == "0123456789abcdef"  # the benchmark's record, with no FLASHMLA_COMMIT set
    assert summary["sanitizers"]["memcheck"] == "ERROR SUMMARY: 0 errors" and summary["sanitizers"]["racecheck"] is None
    bench_part = summary["benchmark"]
    assert bench_part["complete"] is False and bench_part["not_run"] == 1
    (row,) = bench_part["cases"]
    assert row["case"] == "b128-q1-h128-4096" and row["dtype"] == "bf16" and row["best_peer"] == "FlashMLA"
    assert row["ours_over_best_peer"] == 0.8 and row["ours_over_best_peer_eager"] == 0.8
    assert row["ours_over_best_peer_by_round"] is None  # no rounds recorded
    assert bench_part["worst"]["ours_over_best_peer"] == 0.8 and bench_part["cases_at_or_above_1"] == 0
    assert '"cases_with_ratio": 1' in capsys.readouterr().out


def test_ratio_by_round_pairs_each_round():
    """A machine in two states over the rounds, and one slow round of ours: the medians' ratio falls into the
    slow state's gap (0.95), while each round's pair, timed back to back, says 0.99."""
    case = Case(128, 2, 64, 4096, causal=True)
    row = _row(case, 270.4, 256.8)
    row["libraries"]["flashmla_cupy"]["graph"]["rounds_us"] = [282.7, 249.6, 250.0, 270.8, 270.0, 272.6]
    row["libraries"]["FlashMLA"]["graph"]["rounds_us"] = [247.0, 246.4, 246.5, 267.1, 266.6, 269.4]
    bench_report.finish_row(row)
    assert row["ours_over_best_peer"] == pytest.approx(256.8 / 270.4)
    assert row["ours_over_best_peer_by_round"] == pytest.approx(0.9868, abs=1e-4)
    row["libraries"]["FlashMLA"]["graph"]["rounds_us"] = [247.0] * 5  # rounds that do not pair up
    assert bench_report.ratio_by_round(row, "FlashMLA") is None
    assert bench_report.ratio_by_round(row, None) is None


WIDE_CSV = """==PROF== Connected to process 1
"ID","Process ID","Kernel Name","gpu__time_duration.sum","dram__bytes.sum.per_second","launch__grid_size",\
"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio","lts__t_sector_hit_rate.pct"
"","","","usecond","Tbyte/second","","inst","inst","%"
"0","11","flashmla_decode","361.5","3.3","132","0.5","2.25","61.5"
"""
LONG_CSV = """"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"
"0","k","s","gpu__time_duration.sum","msecond","0.282"
"0","k","s","dram__bytes.sum.per_second","Gbyte/second","3,512.5"
"0","k","s","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio","inst","1.75"
"""
# The short unit spellings of the ncu on the H200 image.
SHORT_UNITS_CSV = """"ID","Kernel Name","gpu__time_duration.sum","dram__bytes.sum.per_second",\
"launch__shared_mem_per_block_dynamic","dram__bytes_read.sum"
"","","us","Tbyte/s","Kbyte/block","Mbyte"
"0","k","238.912","2.62309","230.816","622.99776"
"""


def test_ncu_short_unit_spellings():
    (kernel,) = ncu_compare.parse_raw_csv(SHORT_UNITS_CSV)
    assert kernel["gpu__time_duration.sum"] == pytest.approx(238.912e-6)
    assert kernel["dram__bytes.sum.per_second"] == pytest.approx(2.62309e12)
    assert kernel["launch__shared_mem_per_block_dynamic"] == pytest.approx(230816)
    assert kernel["dram__bytes_read.sum"] == pytest.approx(622.99776e6)


def test_ncu_csv_in_both_forms_and_the_side_by_side_table():
    (ours,) = ncu_compare.parse_raw_csv(WIDE_CSV)
    (theirs,) = ncu_compare.parse_raw_csv(LONG_CSV)
    assert ours["gpu__time_duration.sum"] == pytest.approx(361.5e-6)
    assert theirs["gpu__time_duration.sum"] == pytest.approx(0.282e-3)
    assert theirs["dram__bytes.sum.per_second"] == pytest.approx(3512.5e9)
    table = ncu_compare.compare_table({"flashmla_cupy": ours, "FlashMLA": theirs})
    lines = table.splitlines()
    assert lines[0] == "| metric | flashmla_cupy | FlashMLA |"
    assert "| duration (us) | 362 | 282 |" in lines and "| DRAM bandwidth (GB/s) | 3300 | 3512 |" in lines
    assert "| L2 hit rate (%) | 61.5 | n/a |" in lines
    stalls = [line for line in lines if line.startswith("| stall:")]
    assert stalls[0].startswith("| stall: wait ") and stalls[1].startswith("| stall: barrier ")


def test_ncu_command_profiles_one_warm_decode_launch_with_clocks_untouched(tmp_path):
    case = bench_cases.parse("b64-q1-h128-1024", "fp16")
    command = ncu_compare.ncu_command("ncu", "FlashMLA", case, str(tmp_path / "FlashMLA"), ["dram__bytes_read.sum"])
    joined = " ".join(command)
    assert "--clock-control none" in joined and "--kernel-name regex:flash_fwd_splitkv_mla" in joined
    assert f"--launch-skip {ncu_compare.WARMUP_LAUNCHES} --launch-count 1" in joined
    assert "--metrics dram__bytes_read.sum" in joined and "--section WarpStateStats" in joined
    assert command[-6:] == ["--launch", "FlashMLA", "--case", "b64-q1-h128-1024", "--dtype", "fp16"]
    assert ncu_compare.extra_metrics({"dram__bytes_read", "lts__t_sector_hit_rate"}) == [
        "dram__bytes_read.sum", "lts__t_sector_hit_rate.pct"]
    assert "--cache-control" not in joined  # ncu's own flush: clean caches


def test_ncu_command_profiles_the_combine_kernel_when_asked(tmp_path):
    case = bench_cases.parse("b128-q1-h64-16384", "bf16")
    for library, name in ncu_compare.COMBINE_KERNELS.items():
        command = " ".join(ncu_compare.ncu_command("ncu", library, case, str(tmp_path / library), [],
                                                   kernels=ncu_compare.COMBINE_KERNELS))
        assert f"--kernel-name regex:{name} --launch-skip" in command
    assert "FlashInfer-fa3" not in ncu_compare.COMBINE_KERNELS   # it has no combine kernel


def test_ncu_command_with_the_benchmarks_flush_leaves_caches_to_the_process(tmp_path):
    case = bench_cases.parse("b64-q1-h128-1024", "bf16")
    command = ncu_compare.ncu_command("ncu", "flashmla_cupy", case, str(tmp_path / "ours"), [], flush="memset")
    joined = " ".join(command)
    assert "--cache-control none --replay-mode application" in joined  # each pass re-runs the flush
    assert command[-2:] == ["--flush", "memset"]
    assert ncu_compare.FLUSH_MODES == ("ncu", "memset", "read")
    assert ncu_compare.extra_metrics(None) == []
    (tmp_path / "flashmla_cupy.csv").write_text(WIDE_CSV)
    assert list(ncu_compare.read_profiles(str(tmp_path), ["flashmla_cupy", "FlashMLA"])) == ["flashmla_cupy"]


def test_ncu_command_passes_a_variant_build_to_our_process_only(tmp_path):
    case = bench_cases.parse("b128-q2-h128-8192-causal", "bf16")
    spec = "n01: tree=/tmp/k/kernels_src -DFLASHMLA_HINT4=2"
    ours = ncu_compare.ncu_command("ncu", "flashmla_cupy", case, str(tmp_path / "ours"), [], variant=spec)
    assert ours[-2:] == ["--variant", spec]
    peer = ncu_compare.ncu_command("ncu", "FlashMLA", case, str(tmp_path / "peer"), [], variant=spec)
    assert "--variant" not in peer
    with pytest.raises(SystemExit, match="unknown item"):
        ncu_compare.main(["--variant", "bad: nothing=1", "--ncu", "/nonexistent/ncu"])


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_host_profile_cpu_mock_still_runs(dtype):
    run = subprocess.run([sys.executable, str(REPO / "scripts/host_profile.py"), "--cpu-mock", "--calls", "20",
                          "--no-profile", "--dtype", dtype], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "host time per flash_mla_with_kvcache call" in run.stdout


FAKE_NCU = """#!{python}
import sys
args = sys.argv[1:]
if args == ["--query-metrics"]:
    print("Device NVIDIA H200 (GH100)\\nMetric Name   Metric Description\\ndram__bytes_read   # of bytes read")
elif args[0] == "--import" and "source" in args:
    print(open({csv!r}.replace("wide.csv", "source.csv")).read())
elif args[0] == "--import":
    print(open({csv!r}).read().replace("flashmla_decode", args[1]))
else:
    assert args[:2] == ["--clock-control", "none"], args
    if "--metrics" in args and {refuse_extras}:
        sys.exit("==ERROR== Failed to find metric dram__bytes_read.sum")
    open(args[args.index("--export") + 1] + ".ncu-rep", "w").close()
"""


@pytest.mark.parametrize("refuse_extras", [False, True])
def test_ncu_compare_runs_ncu_twice_and_prints_the_table(tmp_path, capsys, refuse_extras):
    csv_path = tmp_path / "wide.csv"
    csv_path.write_text(WIDE_CSV)
    fake = tmp_path / "ncu"
    fake.write_text(FAKE_NCU.format(python=sys.executable, csv=str(csv_path), refuse_extras=refuse_extras))
    fake.chmod(0o755)
    out = tmp_path / "out"
    assert ncu_compare.main(["--ncu", str(fake), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| metric | flashmla_cupy | FlashMLA |" in printed and "| duration (us) | 362 | 362 |" in printed
    assert {p.name for p in out.iterdir()} >= {"flashmla_cupy.csv", "FlashMLA.csv", "compare.md", "FlashMLA.log"}
    assert ncu_compare.main(["--from", str(out)]) == 0
    assert "the profiles in" in capsys.readouterr().out


SOURCE_CSV = """==PROF== Connected to process
"# Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)","Instructions Executed"
"0x100","LDGSTS.E [R3], desc[UR4][R4.64]","12","10","64"
"0x110","SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R3","300","290","9000"
"0x120","HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8], R24","","","128"
"0x130","F2FP.F16.E4M3.UNPACK_B R21, R4.H1","88","20","4096"
"""


def test_ncu_compare_lists_the_most_stalled_instructions():
    hot = ncu_compare.hot_instructions(SOURCE_CSV, top=2)
    assert hot == [("0x110", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R3", 300.0, 290.0),
                   ("0x130", "F2FP.F16.E4M3.UNPACK_B R21, R4.H1", 88.0, 20.0)]
    assert len(ncu_compare.hot_instructions(SOURCE_CSV)) == 3  # unsampled instructions are left out
    assert ncu_compare.hot_instructions("no,samples\n1,2\n") == []
    table = ncu_compare.hot_table("flashmla_cupy", hot)
    assert "| 0x110 | `SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R3` | 300 | 290 | 77.3% |" in table


def test_ncu_compare_source_asks_for_the_sampling_section_and_lists_each_library(tmp_path, capsys):
    case = bench_cases.parse("b128-q1-h128-4096", "bf16")
    assert "SourceCounters" in ncu_compare.ncu_command("ncu", "FlashMLA", case, "x", [], source=True)
    assert "SourceCounters" not in ncu_compare.ncu_command("ncu", "FlashMLA", case, "x", [])
    (tmp_path / "wide.csv").write_text(WIDE_CSV)
    (tmp_path / "source.csv").write_text(SOURCE_CSV)
    fake = tmp_path / "ncu"
    fake.write_text(FAKE_NCU.format(python=sys.executable, csv=str(tmp_path / "wide.csv"), refuse_extras=False))
    fake.chmod(0o755)
    out = tmp_path / "out"
    assert ncu_compare.main(["--ncu", str(fake), "--out", str(out), "--source"]) == 0
    printed = capsys.readouterr().out
    assert "flashmla_cupy: the 3 SASS instructions with the most warp stall samples" in printed
    assert "FlashMLA: the 3 SASS" in printed and (out / "FlashMLA-source.csv").exists()
    assert ncu_compare.main(["--from", str(out)]) == 0 and "TRYWAIT" in capsys.readouterr().out


def test_critical_path_charges_each_kernel_what_it_adds_to_the_call():
    # Two calls of (decode 0-100, combine launched at 10 under PDL, ending at 104), then a call whose
    # combine ends before a straggling memset: each kernel is charged what it moves the call's end.
    spans = [("decode", 0.0, 100.0), ("combine", 10.0, 104.0),
             ("decode", 200.0, 298.0), ("combine", 205.0, 304.0),
             ("decode", 400.0, 500.0), ("combine", 401.0, 503.0)]
    split = bench.critical_path(spans, 3)
    assert split["span_us"] == pytest.approx(104.0)
    assert split["charged_us"] == {"decode": pytest.approx(100.0), "combine": pytest.approx(4.0)}
    assert bench.critical_path(spans, 4) is None and bench.critical_path([], 2) is None
    memset_last = bench.critical_path([("k", 0.0, 10.0), ("memset", 2.0, 12.0)], 1)
    assert memset_last["charged_us"] == {"k": 10.0, "memset": 2.0}


class _RoundTimer:
    """A Timer stand-in: records the order of its calls; each function's times come from a list."""

    def __init__(self, times):
        self.times, self.order, self.shares = {k: list(v) for k, v in times.items()}, [], set()

    def us(self, fn, share=1.0):
        self.order.append(fn)
        self.shares.add(share)
        if fn == "broken":
            raise RuntimeError("lost the device")
        return self.times[fn].pop(0)


def test_libraries_are_timed_in_rounds_each_taking_each_place_and_following_each_other():
    # A place right after a heavy library is the costly one: over the rounds every library takes it
    # equally, and the median of the rounds drops the outliers.
    times = {"a": [110.0, 100.0, 101.0, 99.0, 102.0, 100.0], "b": [50.0] * 6, "c": [10.0, 12.0, 11.0] * 2}
    timer = _RoundTimer(times)
    got = bench.interleaved_us(timer, {"ours": "a", "peer": "b", "other": "c"})
    assert got == {"ours": times["a"], "peer": times["b"], "other": times["c"]}
    assert timer.order == list("abc" "bca" "cab" "cba" "bac" "acb")
    assert timer.shares == {1 / 6}
    followers = {(x, y) for x, y in zip(timer.order, timer.order[1:])}
    assert followers == {(x, y) for x in "abc" for y in "abc" if x != y}
    for name in "abc":   # each place once forward, once reversed
        assert sorted(order.index(name) for order in bench.round_orders(list("abc"))) == [0, 0, 1, 1, 2, 2]
    assert bench.round_orders(["only"]) == [["only"]]
    failing = _RoundTimer({"a": [1.0, 2.0, 3.0, 4.0]})
    got = bench.interleaved_us(failing, {"ours": "a", "peer": "broken"})
    assert got["ours"] == [1.0, 2.0, 3.0, 4.0] and isinstance(got["peer"], RuntimeError)
    assert failing.order.count("broken") == 1   # not tried again after it failed
    assert bench.interleaved_us(_RoundTimer({}), {}) == {}


def test_a_captured_replay_keeps_the_call_and_its_memory_alive():
    """bench.captured: the replay holds the captured call (whose closure owns the metadata the graph reads)
    and replays the graph; dropping every other reference to the call frees nothing the graph reads."""
    import gc
    import weakref

    replays = []

    class FakeTorch:
        class cuda:
            class Stream:
                def wait_stream(self, other):
                    pass

            class CUDAGraph:
                def replay(self):
                    replays.append(self)

            @staticmethod
            def current_stream():
                return FakeTorch.cuda.Stream()

            @staticmethod
            def stream(stream):
                return contextlib.nullcontext()

            @staticmethod
            def graph(graph, stream=None):
                return contextlib.nullcontext()

    class Metadata:
        pass

    def make():
        metadata = Metadata()
        return (lambda: metadata), weakref.ref(metadata)

    fn, metadata = make()
    replay = bench.captured(FakeTorch, fn)
    del fn
    gc.collect()
    assert metadata() is not None
    replay()
    assert len(replays) == 1
    del replay
    gc.collect()
    assert metadata() is None


def test_a_case_times_every_checked_library_in_both_modes(monkeypatch):
    """measure_case without a GPU: ours and the peers prepared in turn (a peer that disagrees, or that
    cannot be captured, keeps what it has), then graph and eager timings, host time per library."""
    case = bench_cases.select("b64-q1-h128-1024", ["bf16"])[0]
    libs = [bench.Library(bench_report.OURS, None, "x", "x"), bench.Library("Agrees", None, "x", "x"),
            bench.Library("NoGraph", None, "x", "x"), bench.Library("Mismatch", None, "x", "x"),
            bench.Library("Breaks", None, "x", "x")]
    prepared = {
        bench_report.OURS: ({"check": "ours"}, "ours_fn", "ours_graph"),
        "Agrees": ({"check": "agrees"}, "agrees_fn", "agrees_graph"),
        "NoGraph": ({"check": "agrees", "graph_error": "no"}, "nograph_fn", None),
        "Mismatch": ({"check": "mismatch"}, None, None),
        "Breaks": ({"check": "agrees"}, "breaks_fn", "broken")}

    class FakeOut:
        def clone(self):
            return "reference"

    references = []

    def prepare(torch, lib, case, inputs, reference):
        references.append(reference)
        entry, fn, replay = prepared[lib.name]
        return dict(entry), fn, replay, FakeOut()

    class FakeTorch:
        class cuda:
            @staticmethod
            def empty_cache():
                pass

    times = {"ours_graph": [44.0, 40.0, 39.0, 39.5, 40.5, 41.0], "agrees_graph": [42.0] * 6,
             "ours_fn": [41.0] * 6, "agrees_fn": [43.0] * 6, "nograph_fn": [50.0] * 6}
    timer = _RoundTimer(times)
    monkeypatch.setattr(bench, "make_inputs", lambda torch, case, seed: "inputs")
    monkeypatch.setattr(bench, "prepare_library", prepare)
    monkeypatch.setattr(bench, "host_times_us",
                        lambda torch, fns: {name: {"ours_fn": 20.0}.get(fn, 30.0) for name, fn in fns.items()})
    row = bench.measure_case(FakeTorch, timer, libs, case, 1, kernels=False)
    assert references == [None] + 4 * ["reference"]   # the peers are checked against ours
    got = row["libraries"]
    assert got[bench_report.OURS]["graph"]["us"] == 40.25 and got[bench_report.OURS]["eager"]["us"] == 41.0
    assert got[bench_report.OURS]["graph"]["rounds_us"] == [44.0, 40.0, 39.0, 39.5, 40.5, 41.0]   # the median's rounds
    assert got["Agrees"]["graph"]["us"] == 42.0 and got["Agrees"]["host_us"] == 30.0
    assert "graph" not in got["NoGraph"] and got["NoGraph"]["eager"]["us"] == 50.0
    assert got["Mismatch"] == {"check": "mismatch"}
    assert got[bench_report.OURS]["host_us"] == 20.0
    assert "lost the device" in got["Breaks"]["error"] and "eager" not in got["Breaks"]   # not timed again
    assert "breaks_fn" not in timer.order


def test_power_probe_samples_until_stopped_and_summarises(tmp_path, monkeypatch):
    """power_probe's sampler against a stand-in nvidia-smi that prints a line every few milliseconds
    (one of them unreadable) until it is terminated; the GPU loop itself needs a device."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/usr/bin/env python3\nimport sys, time\n"
                    "assert '--query-gpu=power.draw,clocks.sm,temperature.gpu' in sys.argv, sys.argv\n"
                    "assert '--id=3' in sys.argv and '--loop-ms=20' in sys.argv, sys.argv\n"
                    "print('[N/A], 1980, 40', flush=True)\n"
                    "i = 0\nwhile True:\n    print(f'{600 + i % 3}.5, {1980 - 10 * (i % 2)}, {40 + i % 5}', flush=True)\n"
                    "    i += 1\n    time.sleep(0.005)\n")
    fake.chmod(0o755)
    sampler = power_probe.Sampler(3, 20, exe=str(fake))
    sampler.start()
    time.sleep(0.5)
    samples = sampler.stop()
    assert len(samples) >= 5 and all(600 <= w <= 603 and mhz in (1970, 1980) for w, mhz, _ in samples)
    got = power_probe.summarize([(600.0, 1980.0, 40.0), (610.0, 1970.0, 44.0), (620.0, 1960.0, 42.0)], 1000, 0.25)
    assert got == {"us_per_call": 250.0, "samples": 3, "power_w": 610.0, "sm_mhz": 1970.0, "max_temp_c": 44.0,
                   "mj_per_call": pytest.approx(152.5)}
    assert power_probe.summarize([], 10, 1.0) == {"us_per_call": 100000.0, "samples": 0}
    assert power_probe.parse_samples("1, 2\n700.0, 1755, 51\n[N/A], [N/A], 50\n") == [(700.0, 1755.0, 51.0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert power_probe.smi_index(1) == "5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert power_probe.smi_index(1) == "1"


def test_kernel_ab_report_gives_times_ratios_and_the_bars_used(monkeypatch, tmp_path, capsys):
    """The parent's side of kernel_ab (the children need a GPU): each build's median over the rounds,
    its ratio to the shipped build, whether every check passed and the largest share of each accuracy
    bar that its passing checks used."""
    turns = iter([
        {"card": "H200", "failures": [], "tolerance_used": {"out": 0.5, "lse": 0.25}, "us": {"c-fp8": 100.0}},
        {"card": "H200", "failures": ["b=4 ...: lse"], "tolerance_used": {"out": 0.5, "lse": 0.5}, "us": {"c-fp8": 80.0}},
        {"card": "H200", "failures": [], "tolerance_used": {"out": 0.25, "lse": 0.75}, "us": {"c-fp8": 110.0}},
        {"card": "H200", "failures": [], "tolerance_used": {"out": 0.5, "lse": 0.5}, "us": {"c-fp8": 90.0}},
    ])
    monkeypatch.setattr(kernel_ab, "run_child", lambda spec, args: next(turns))
    out = tmp_path / "ab.json"
    assert kernel_ab.main(["--variant", "fast: -DX=1", "--checks", "3", "--json", str(out)]) == 1  # one check failed
    report = json.loads(out.read_text())
    assert report["cases"]["c-fp8"]["shipped"]["median_us"] == 105.0
    assert report["cases"]["c-fp8"]["fast"]["over_shipped"] == 85.0 / 105.0
    assert report["spread"]["c-fp8"] == pytest.approx(90.0 / 80.0 - 1)  # the wider of 100-110 and 80-90
    assert report["exact"] == {"shipped": True, "fast": False}
    assert report["tolerance_used"] == {"shipped": {"out": 0.5, "lse": 0.75}, "fast": {"out": 0.5, "lse": 0.5}}
    printed = capsys.readouterr().out
    assert "round 2 shipped: exact (bars used: out 0.25, lse 0.75)" in printed
    assert "   12.5%" in printed   # the case's spread beside its ratios


def test_kernel_ab_notes_a_build_whose_wgmmas_ptxas_serialised(monkeypatch, tmp_path, capsys):
    """A child keeps ptxas's performance notes on the kernels it compiles; the parent prints them under the
    build's round and keeps them in the report, since such a build times the serialisation."""
    note = ("(C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient "
            "register resources for the wgmma pipeline in the function 'flashmla_decode'")

    class Kernel:
        log = f"ptxas info    : {note}\nptxas info    : Used 168 registers, used 6 barriers\n"

    class Variant:
        name = "decode_bf16"

    monkeypatch.setattr(kernel_ab, "PTXAS_NOTES", [])
    kernel = Kernel()
    assert kernel_ab.noting_ptxas(lambda variant: kernel)(Variant()) is kernel
    assert kernel_ab.PTXAS_NOTES == [f"decode_bf16: {note}"]

    plain = {"card": "H200", "failures": [], "tolerance_used": {"out": 0.5, "lse": 0.25}, "us": {"c-bf16": 100.0}}
    turns = iter([plain, {**plain, "us": {"c-bf16": 150.0}, "ptxas_notes": [f"decode_bf16: {note}"]}])
    monkeypatch.setattr(kernel_ab, "run_child", lambda spec, args: next(turns))
    out = tmp_path / "ab.json"
    assert kernel_ab.main(["--variant", "split: -DX=1", "--rounds", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ptxas_notes"] == {"shipped": [], "split": [f"decode_bf16: {note}"]}
    printed = capsys.readouterr().out
    assert "round 1 split: exact" in printed and "ptxas serialised its wgmmas or added waits (1 notes)" in printed
    assert f"  ptxas: decode_bf16: {note}" in printed
    assert "round 1 shipped: exact (bars used: out 0.50, lse 0.25)\n" in printed


def test_kernel_ab_variant_specs():
    spec = kernel_ab.parse_variant("lazy: tree=kernels_src smem=230400 -DA=1 -DB")
    assert spec["name"] == "lazy" and spec["defines"] == ["-DA=1", "-DB"] and spec["smem"] == 230400
    assert pathlib.Path(spec["tree"]).is_absolute() and spec["overhead"] is None
    assert kernel_ab.parse_variant("ov3: overhead=3")["overhead"] == 3
    assert kernel_ab.parse_variant("cut: whole=-1")["whole"] == -1
    assert kernel_ab.parse_variant("old: ringsmem=223232")["ringsmem"] == 223232
    assert kernel_ab.parse_variant("f32: ringp16=0")["ringp16"] == 0
    shares = kernel_ab.parse_variant("q: partialf16=0.25 ringp16=3")
    assert shares["partialf16"] == 0.25 and shares["ringp16"] == 3 and isinstance(shares["ringp16"], int)
    assert pathlib.Path(kernel_ab.parse_variant("v13: nvrtc=lib/libnvrtc.so.13")["nvrtc"]).is_absolute()
    assert kernel_ab.parse_variant("o2: -Xptxas=-O2 -DA=1")["defines"] == ["-Xptxas=-O2", "-DA=1"]
    assert kernel_ab.parse_variant("fast: -ftz=true -prec-div=false -use_fast_math")["defines"] == [
        "-ftz=true", "-prec-div=false", "-use_fast_math"]
    for bad in ("shipped: -DA=1", ": -DA=1", "x: tree", "x: -DA=1 nonsense", "x: -Xptxas", "x: -use_fast_maths"):
        with pytest.raises(SystemExit):
            kernel_ab.parse_variant(bad)


def test_kernel_ab_patch_builds_a_patched_copy_of_the_tree(tmp_path):
    """patch=FILE: the patch's kernels_src changes land in a copy below --cache-root (its other files are
    left out) and the build uses that copy; the shipped tree is untouched; a patch that does not apply
    stops the run."""
    tree = tmp_path / "src" / "kernels_src"
    tree.mkdir(parents=True)
    (tree / "combine.cu").write_text("int a = 1;\nint b = 2;\n")
    patch = tmp_path / "c.patch"
    patch.write_text("Candidate: b becomes 3.\n\n"
                     "diff --git a/docs/X.md b/docs/X.md\n--- a/docs/X.md\n+++ b/docs/X.md\n@@ -1 +1 @@\n-x\n+y\n"
                     "diff --git a/kernels_src/combine.cu b/kernels_src/combine.cu\n--- a/kernels_src/combine.cu\n"
                     "+++ b/kernels_src/combine.cu\n@@ -1,2 +1,2 @@\n int a = 1;\n-int b = 2;\n+int b = 3;\n")
    spec = kernel_ab.parse_variant(f"c: tree={tree} patch={patch}")
    kernel_ab.apply_patch(spec, str(tmp_path / "cache"))
    assert pathlib.Path(spec["tree"]) == tmp_path / "cache" / "c-tree" / "kernels_src"
    assert (pathlib.Path(spec["tree"]) / "combine.cu").read_text() == "int a = 1;\nint b = 3;\n"
    assert (tree / "combine.cu").read_text() == "int a = 1;\nint b = 2;\n"
    assert spec["patch_applied"]  # so a child (or apply) takes the tree as it is
    spec = kernel_ab.parse_variant(f"again: tree={spec['tree']} patch={patch}")   # b is 3 there: no match
    with pytest.raises(SystemExit, match="does not apply"):
        kernel_ab.apply_patch(spec, str(tmp_path / "cache"))
    docs_only = tmp_path / "d.patch"
    docs_only.write_text(patch.read_text().split("diff --git a/kernels_src")[0])
    with pytest.raises(SystemExit, match="changes nothing"):
        kernel_ab.apply_patch(kernel_ab.parse_variant(f"d: tree={tree} patch={docs_only}"), str(tmp_path / "cache"))


def test_kernel_ab_build_with_another_nvrtc_preloads_it(monkeypatch, tmp_path):
    """nvrtc=LIB: that build's child process preloads LIB (CuPy's dlopen then finds it) with its directory
    on the library path (NVRTC's builtins library lies beside it); other builds' children do not."""
    seen = []

    class Done:
        returncode, stderr = 0, ""
        stdout = json.dumps({"card": "H200", "nvrtc": "13.0", "failures": [], "tolerance_used": {}, "us": {}})

    def run(command, **kwargs):
        seen.append(kwargs["env"])
        return Done

    monkeypatch.setattr(kernel_ab.subprocess, "run", run)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    args = kernel_ab.argparse.Namespace(cache_root=str(tmp_path), cases="issue", dtype="bf16", checks=1, eager=False)
    library = tmp_path / "cu13" / "libnvrtc.so.13"
    assert kernel_ab.run_child(kernel_ab.parse_variant(f"v13: nvrtc={library}"), args)["nvrtc"] == "13.0"
    kernel_ab.run_child(kernel_ab.parse_variant("plain: -DA=1"), args)
    assert seen[0]["LD_PRELOAD"] == str(library)
    assert seen[0]["LD_LIBRARY_PATH"].split(os.pathsep)[0] == str(library.parent)
    assert "LD_PRELOAD" not in seen[1]


def test_kernel_ab_prebuilt_cubins_stand_in_for_compiling(tmp_path):
    """cubins=DIR: a variant whose cubin DIR holds is taken from there, with its resources read from the
    cubin; the others still compile."""
    from flashmla_cupy import compiler, variants

    scheduler = next(v for v in variants.all_variants() if v.program == "scheduler")
    built = compiler.compile_variant(scheduler)
    (tmp_path / f"{scheduler.name}.cubin").write_bytes(built.cubin)
    compiled_here = []
    compile_variant = kernel_ab.prebuilt(tmp_path, lambda v: compiled_here.append(v.name) or built)
    taken = compile_variant(scheduler)
    assert taken.cubin == built.cubin and taken.registers == built.registers and not compiled_here
    other = next(v for v in variants.all_variants() if v.program == "check")
    assert compile_variant(other) is built and compiled_here == [other.name]
    assert kernel_ab.parse_variant(f"v135: cubins={tmp_path}")["cubins"] == str(tmp_path.resolve())


def test_kernel_ab_apply_sets_the_ring_storage(monkeypatch):
    from flashmla_cupy import compiler, variants

    for name in ("RING_SHARED_BYTES", "_DEFINES"):
        monkeypatch.setattr(variants, name, getattr(variants, name))   # restored after the test
    monkeypatch.setattr(compiler, "compile_variant", compiler.compile_variant)
    kernel_ab.apply(kernel_ab.parse_variant("old: ringsmem=223232"))
    assert variants.RING_SHARED_BYTES == 223232


def test_kernel_trace_build_takes_kernel_ab_items():
    """kernel_trace --items: another plan (or define) for the traced build, after the trace's defines."""
    spec = kernel_trace.traced_build(None, "global", 132, ("-DX=1",), None, None, "whole=-1 maxparts=128 -DY=2")
    assert spec["defines"] == ["-DFLASHMLA_TRACE=1", "-DFLASHMLA_TRACE_GLOBALTIMER=1", "-DFLASHMLA_TRACE_CTAS=132",
                               "-DX=1", "-DY=2"]
    assert spec["whole"] == -1 and spec["maxparts"] == 128 and spec["tree"] is None
    spec = kernel_trace.traced_build(".", "sm", kernel_trace.TRACE_CTAS, smem=1024, ring=False)
    assert spec["defines"] == ["-DFLASHMLA_TRACE=1"]
    assert spec["tree"] == str(pathlib.Path(".").resolve()) and spec["smem"] == 1024 and spec["ring"] is False


def test_kernel_trace_marks_match_the_kernel_and_summarize():
    import re
    enum = (REPO / "kernels_src/trace.cuh").read_text()
    values = {int(v) for v in re.findall(r"kMark\w+ = (\d+),", enum)}
    assert values == set(range(len(kernel_trace.MARKS))) | {kernel_trace.HEADER}
    for name, value in (("kTraceWarpgroups", kernel_trace.TRACE_WARPGROUPS), ("kTraceRecords", kernel_trace.TRACE_RECORDS)):
        assert f"constexpr int {name} = {value};" in enum
    assert f"#define FLASHMLA_TRACE_CTAS {kernel_trace.TRACE_CTAS} " in enum  # kTraceCtas unless --ctas

    def word(mark, cycles):
        return (mark << kernel_trace.CYCLE_BITS) | cycles

    pair, scores_in, published = (kernel_trace.MARKS.index(m) for m in ("pair start", "scores in", "probs published"))
    words = [word(kernel_trace.HEADER, 7)] + [word(pair, 0), word(scores_in, 100), word(published, 130),
                                              word(pair, 200), word(scores_in, 310), word(published, 340), 0, 0]
    sm, marks = kernel_trace.decode_record(words)
    assert sm == 7 and len(marks) == 6
    assert kernel_trace.decode_record([0] * 4) == (None, [])
    report = kernel_trace.summarize({(0, 0): marks}, clock_khz=2_000_000)
    steps = report["warpgroup 0"]["steps"]
    assert steps["pair start -> scores in"] == {"count": 2, "median_cycles": 105.0, "total_cycles": 210,
                                                 "share": 210 / 340}
    assert report["warpgroup 0"]["median_pair_cycles"] == 200 and report["warpgroup 0"]["median_pair_us"] == 0.1


def test_kernel_trace_tile_lag_compares_the_row_tiles_of_a_part():
    header = (kernel_trace.HEADER << kernel_trace.CYCLE_BITS) | (5 << 40) | (3 << 32) | 77
    assert kernel_trace.decode_record([header, 0])[0] == 77
    assert kernel_trace.decode_place(header) == (3, 5)
    pair, scores_in = (kernel_trace.MARKS.index(m) for m in ("pair start", "scores in"))

    def starts(*ns):
        return [m for t in ns for m in ((pair, t), (scores_in, t + 10))]

    records = {(0, 0): starts(0, 2000, 4000), (1, 0): starts(500, 2500, 9000),   # part 0: tiles 0 and 1
               (2, 0): starts(0, 1000),                                           # part 1: one tile only
               (0, 1): starts(0, 99999, 99999)}                                   # warpgroup 1: not compared
    places = {0: (0, 0), 1: (1, 0), 2: (0, 1)}
    assert kernel_trace.tile_lag(records, places) == {
        "part 0": {"tiles": [0, 1], "pairs": 3, "median_us": 0.5, "max_us": 5.0, "last_us": 5.0, "first_done": 0}}


def test_kernel_trace_startup_spans_are_medians_over_ctas():
    start, pair, scores_in, end = (kernel_trace.MARKS.index(m)
                                   for m in ("kernel start", "pair start", "scores in", "piece end"))
    records = {
        (0, 0): [(start, 1000), (pair, 1500), (scores_in, 1700), (pair, 2500), (scores_in, 2600), (end, 4000)],
        (1, 0): [(start, 50), (pair, 750), (scores_in, 1050), (end, 2050)],
        (2, 0): [(start, 0), (pair, 900), (scores_in, 1000), (end, 5000)],
        (0, 1): [(pair, 10), (scores_in, 20)],  # no kernel start: left out
    }
    assert kernel_trace.startup(records) == {
        "warpgroup 0": {"to first pair": 700, "to first scores": 1000, "to last mark": 3000}}


def test_kernel_trace_groups_pairs_by_the_other_ctas_stores_over_them():
    """store_overlap: warpgroup 0's pairs inside the middle 80 % of the span, by how many other CTAs' store
    windows (sums exchanged -> output stored) cover them in pair lengths; a CTA's own stores and pairs that
    cross its piece end are left out."""
    pair, end, sums, stored = (kernel_trace.MARKS.index(m)
                               for m in ("pair start", "piece end", "sums exchanged", "output stored"))
    records = {
        # CTA 0: pairs of 100 ns from 0 to 1000, a piece end at 450 (the pair 400-500 crosses it) and a store
        # of its own over 320-380 (not counted against its own pair 300-400)
        (0, 0): [(pair, t) for t in range(0, 450, 100)] + [(sums, 320), (stored, 380), (end, 450)]
                + [(pair, t) for t in range(500, 1001, 100)],
        (1, 0): [(sums, 200), (stored, 300), (sums, 600), (stored, 850)],  # CTA 1: over 200-300 and 600-850
        (2, 0): [(sums, 600), (stored, 700)],                              # CTA 2: over 600-700 too
        (1, 1): [(pair, 0), (pair, 2000)],  # warpgroup 1: not counted; stretches the span to 0-2000
    }
    summary = kernel_trace.store_overlap(records)
    # the middle 80 % of 0-2000 is 200-1800: CTA 0's pairs from 200-300 to 900-1000, but 400-500
    assert summary["store_windows"] == 4 and summary["store_window_median_ns"] == 100
    assert summary["pairs"] == {"none": {"count": 3, "median_ns": 100},      # 300-400, 500-600, 900-1000
                                "up to 1": {"count": 3, "median_ns": 100},   # 200-300, 700-800, 800-900 (half)
                                "1 to 2": {"count": 1, "median_ns": 100}}    # 600-700: two stores over it
    assert kernel_trace.store_overlap({(0, 0): [(pair, 0), (pair, 100)]}) == {}  # no stores: nothing to group


def test_kernel_trace_combine_blocks_against_the_decodes_marks():
    """combine.cu's words per block (start, wait returned, end, merges << 32 | SM) in microseconds from the
    decode's first mark, beside its last; untraced blocks (zeros) left out. The block trace layout is
    the kernel's."""
    import numpy as np
    source = (REPO / "kernels_src/combine.cu").read_text()
    assert f"kCombineTraceBlocks = 1u << {kernel_trace.COMBINE_TRACE_BLOCKS.bit_length() - 1};" in source
    records = {(0, 0): [(0, 1_000), (9, 50_000)], (1, 0): [(0, 1_500), (9, 52_000)]}
    table = np.array([[40_000, 52_500, 55_000, (1 << 32) | 3],   # merges rows: waited for the decode
                      [51_000, 0, 51_200, 4],                     # an unsplit request's block: left at once
                      [0, 0, 0, 0]], dtype=np.uint64)
    summary = kernel_trace.combine_summary(table, records)
    assert summary["blocks"] == 2 and summary["merging"] == 1 and summary["decode_last_mark_us"] == 51.0
    assert summary["start_us"] == {"first": 39.0, "median": 44.5, "last": 50.0}
    assert summary["waited_us"] == {"first": 51.5, "median": 51.5, "last": 51.5}
    assert summary["merging_end_us"] == {"first": 54.0, "median": 54.0, "last": 54.0}
    assert kernel_trace.combine_summary(np.zeros((2, 4), dtype=np.uint64), records) == {}


def test_kernel_trace_timeline_bins_the_pages_and_the_ctas_ends():
    start, boxes, pair, scores_in, end = (kernel_trace.MARKS.index(m) for m in
                                          ("kernel start", "boxes issued", "pair start", "scores in", "piece end"))
    records = {
        (0, 2): [(start, 900), (boxes, 1500), (boxes, 2100)],          # CTA 0's loader lane
        (0, 0): [(start, 1000), (pair, 2000), (scores_in, 3000), (end, 9000)],
        (0, 1): [(start, 1000), (scores_in, 5000), (end, 7000)],
        (1, 0): [(start, 1200), (scores_in, 4100), (end, 5100)],
    }
    line = kernel_trace.timeline(records, loader_wg=2, bin_ns=2000)
    assert line["ctas"] == 2 and line["bin_us"] == 2.0
    assert line["start_us"] == {"min": 0.0, "median": 0.15, "max": 0.3}
    assert line["end_us"] == {"min": 4.2, "median": 6.15, "max": 8.1}
    assert [(b["issued"], b["taken"], b["running"]) for b in line["bins"]] == [
        (2, 0, 2), (0, 2, 2), (0, 1, 2), (0, 0, 1), (0, 0, 1)]
    assert kernel_trace.timeline({}, 2, 2000) == {}


def test_kernel_trace_page_period_by_sm_takes_the_middle_half_of_each_ctas_pages():
    scores_in, boxes = kernel_trace.MARKS.index("scores in"), kernel_trace.MARKS.index("boxes issued")
    records = {
        # CTA 0 on SM 7: eight pages over both computing warpgroups; the middle four (3000..6000) 1 us apart
        (0, 0): [(scores_in, t) for t in (0, 3000, 5000, 20000)],
        (0, 1): [(scores_in, t) for t in (1000, 4000, 6000, 30000)],
        (0, 2): [(boxes, t) for t in range(0, 8000, 1000)],     # the loader's marks do not count
        (1, 0): [(scores_in, t) for t in (0, 2000, 6000, 8000)],  # CTA 1 on SM 3: middle 2000..6000
        (2, 0): [(scores_in, 500)],                              # one page: no period
    }
    assert kernel_trace.sm_periods(records, {0: 7, 1: 3, 2: 5}, loader_wg=2) == {"3": 4.0, "7": 1.0}


def test_reports_keep_the_mark_of_a_modified_tree():
    assert bench_report.short_commit("0123456789abcdef") == "0123456"
    assert bench_report.short_commit("0123456789abcdef-modified") == "0123456-modified"
    assert bench_report.short_commit(None) == "None"


def test_bench_trees_summarises_each_trees_rounds(tmp_path):
    """bench_trees.sh with no rounds to run: the medians of each tree's recorded rounds, per case, and
    each tree's time over the first's."""
    out = tmp_path / "out"
    out.mkdir()
    trees = [tmp_path / "a", tmp_path / "b"]
    for tree in trees:
        tree.mkdir()

    def report(us):
        return {"results": [{"dtype": "fp8", "id": "b128-q1-h16-4096",
                             "libraries": {"flashmla_cupy": {"graph": {"us": us}}}}]}
    for name, rounds in (("t1-a", (100.0, 102.0, 104.0)), ("t2-b", (90.0, 91.0, 80.0))):
        for i, us in enumerate(rounds, 1):
            (out / f"{name}-{i}.json").write_text(json.dumps(report(us)))
    run = subprocess.run(["bash", str(REPO / "scripts/bench_trees.sh"), str(out), "0", "", *map(str, trees)],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stderr
    assert "fp8 b128-q1-h16-4096: 102.0 | 90.0 | 0.882" in run.stdout
    assert (out / "trees.tgz").exists()


def test_kernel_ab_with_no_checks_claims_no_verdict(monkeypatch, tmp_path, capsys):
    """`--checks 0` (experiments whose output is meaningless) times the builds but says nothing about
    exactness: a report that read "exact: yes" there once stood beside a load-only build's times."""
    turns = iter([{"card": "H200", "failures": [], "tolerance_used": {"out": 0.0, "lse": 0.0}, "us": {"c-fp8": t}}
                  for t in (100.0, 90.0)])
    monkeypatch.setattr(kernel_ab, "run_child", lambda spec, args: next(turns))
    out = tmp_path / "ab.json"
    assert kernel_ab.main(["--variant", "lo: -DX=1", "--checks", "0", "--rounds", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round 1 lo: not checked (--checks 0)" in printed and "exact: not checked" in printed
    assert "yes" not in printed and "bars used" not in printed
    assert json.loads(out.read_text())["exact"] == {"shipped": None, "lo": None}


def test_host_times_take_turns_and_the_median_of_bursts(monkeypatch):
    """Each library's host time is the median of its bursts, the libraries taking turns in rotated
    orders; a library whose call raises gets its exception and no further bursts."""
    order = []
    bursts = {"a": iter([50.0, 10.0, 12.0, 11.0, 90.0]), "b": iter([20.0] * 5)}

    def fake_bursts(fn, calls):
        order.append(fn)
        if fn == "c":
            raise RuntimeError("lost the device")
        return [next(bursts[fn])]

    class FakeTorch:
        class cuda:
            @staticmethod
            def synchronize():
                pass

    monkeypatch.setattr(bench, "per_call_us", fake_bursts)
    got = bench.host_times_us(FakeTorch, {"a": "a", "b": "b", "c": "c"}, rounds=5)
    assert got["a"] == 12.0 and got["b"] == 20.0 and isinstance(got["c"], RuntimeError)
    assert order[:4] == ["a", "b", "c", "b"] and order.count("c") == 1 and order.count("a") == 5
    assert bench.host_times_us(FakeTorch, {}) == {}   # every library already failed this case


def test_kernel_ab_child_error_keeps_the_exception_not_the_exit_noise(monkeypatch, tmp_path):
    """A child that dies on a CUDA error prints its traceback, then torch's event-destructor warnings
    and CuPy's unload complaints by the hundred: the report keeps the exception."""
    stderr = "\n".join(["Traceback (most recent call last):", '  File "bench.py", line 286, in us',
                        "torch.AcceleratorError: CUDA error: unspecified launch failure"] +
                       ["[W1201 15:04:22 CUDAEvent.h:57] Warning: CUDA warning: unspecified launch failure "
                        "(function ~CUDAEvent)"] * 200 +
                       ["TypeError: 'NoneType' object is not callable"] * 50)

    class Done:
        returncode, stdout = 1, ""

    Done.stderr = stderr
    monkeypatch.setattr(kernel_ab.subprocess, "run", lambda *a, **k: Done)
    args = kernel_ab.argparse.Namespace(cache_root=str(tmp_path), cases="issue", dtype="fp8", checks=1, eager=False)
    error = kernel_ab.run_child({"name": "linear"}, args)["error"]
    assert "torch.AcceleratorError: CUDA error: unspecified launch failure" in error
    assert "CUDAEvent" not in error and "NoneType" not in error


@pytest.mark.parametrize("patch", sorted((REPO / "devtools" / "candidates").glob("*.patch")) or [None],
                         ids=lambda p: p.name if p else "none")
def test_candidate_patches_still_apply(patch, tmp_path):
    """A candidate waiting as a patch (devtools/candidates/README.md) applies to the tree as it is, so the
    session that measures it starts from a build, not a merge."""
    if patch is None:
        pytest.skip("no candidate patches wait in devtools/candidates/")
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_graph_gaps_cuts_the_profiled_runs_at_each_flush():
    """devtools/graph_gaps.py: the kernels after each flush, up to the next, are that run's call, timed from
    the flush's end; the medians line up kernel by kernel."""
    sys.path.insert(0, str(REPO / "devtools"))
    import graph_gaps

    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<unsigned char> >"
    kernels = [(200.0, 260.0, fill), (262.0, 300.0, "flashmla_decode"), (263.0, 301.5, "flashmla_combine"),
               (0.0, 60.0, fill), (61.0, 100.0, "flashmla_decode"), (62.0, 103.0, "flashmla_combine"),
               (150.0, 151.0, "a short fill " + fill)]   # not a flush: too short, so part of run 0
    runs = graph_gaps.cut_runs(kernels, [45.0, 43.0])
    assert [r["event_us"] for r in runs] == [45.0, 43.0]
    assert [k[0] for k in runs[0]["kernels"]] == ["flashmla_decode", "flashmla_combine", ("a short fill " + fill)[:50]]
    assert runs[1]["kernels"] == [("flashmla_decode", 2.0, 40.0), ("flashmla_combine", 3.0, 41.5)]
    got = graph_gaps.summary(runs[1:] + [{"kernels": [("flashmla_decode", 1.0, 39.0), ("flashmla_combine", 2.0, 44.0)],
                                          "event_us": 47.0}])
    assert got["runs"] == 2 and got["event_us"] == 45.0 and got["last_end_us"] == 42.75
    assert got["kernels"] == [{"name": "flashmla_decode", "start_us": 1.5, "end_us": 39.5},
                              {"name": "flashmla_combine", "start_us": 2.5, "end_us": 42.75}]
    # With a read flush the runs are cut at the int64 sum over the buffer, not at a fill.
    total = ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<long, at::native::func_wrapper_t<long, "
             "at::native::sum_functor<long, long, long>::operator()")
    read = [(0.0, 40.0, total), (41.0, 80.0, "flashmla_decode"), (90.0, 130.0, total), (131.0, 170.0, "flashmla_decode")]
    runs = graph_gaps.cut_runs(read, [40.0, 41.0], "read")
    assert [r["kernels"] for r in runs] == [[("flashmla_decode", 1.0, 40.0)], [("flashmla_decode", 1.0, 40.0)]]
    assert graph_gaps.cut_runs(read, [40.0, 41.0]) == []  # no fill: no memset flush found


def test_kernel_trace_balance_is_where_pages_handed_out_at_each_sms_period_would_end(tmp_path, capsys):
    """balance: two CTAs with equal fixed costs (2 us), one SM taking a page every 1 us and one every 3 us,
    4 pages each: they end at 6 and 14 us; handing the 8 pages out at those periods ends when
    (T - 2) / 1 + (T - 2) / 3 = 8, T = 8 us. --from prints it again from a saved global trace, and refuses
    one marked with each SM's cycle counter."""
    scores_in, end = (kernel_trace.MARKS.index(m) for m in ("scores in", "piece end"))

    def cta(period_ns):
        return [(scores_in, 1000 + period_ns * (i + 1)) for i in range(4)] + [(end, 1000 + 4 * period_ns + 1000)]

    records = {(0, 0): [(end, 0)] + cta(1000), (1, 0): [(end, 0)] + cta(3000)}
    sms = {0: 10, 1: 11}
    periods = kernel_trace.sm_periods(records, sms, 2)
    assert periods == {"10": 1.0, "11": 3.0}
    summary = kernel_trace.balance(records, sms, periods, 2)
    assert summary["pages"] == 8 and (summary["end_min_us"], summary["end_max_us"]) == (6.0, 14.0)
    assert summary["fixed_median_us"] == 2.0 and abs(summary["balanced_end_us"] - 8.0) < 0.01
    report = {"card": "c", "case": "x", "dtype": "bf16", "commit": "abc", "clock": "global",
              "sms": {str(c): s for c, s in sms.items()},
              "raw": {f"{c}/{w}": [list(m) for m in marks] for (c, w), marks in records.items()}}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(report))
    assert kernel_trace.main(["--from", str(path)]) == 0
    assert "would end at 8.0 us" in capsys.readouterr().out
    path.write_text(json.dumps({**report, "clock": "sm"}))
    with pytest.raises(SystemExit):
        kernel_trace.main(["--from", str(path)])
