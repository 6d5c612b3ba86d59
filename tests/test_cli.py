"""`python -m flashmla_cupy`: warmup compiles everything with no GPU; info, clear-cache and demo behave."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from flashmla_cupy import __main__ as cli
from flashmla_cupy import cache, env, install, variants

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(*args: str, cache_dir: pathlib.Path, **extra_env: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a fresh interpreter (warm-up's worker processes need a real one)."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), env.CACHE_DIR: str(cache_dir), **extra_env}
    return subprocess.run([sys.executable, "-m", "flashmla_cupy", *args], capture_output=True, text=True,
                          env=environment, cwd=REPO, timeout=600)


def test_warmup_compiles_every_variant_then_finds_them_cached(tmp_path):
    first = run_cli("warmup", cache_dir=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    table = first.stdout.split("registers", 1)[1]
    for variant in variants.all_variants():
        assert f"\n{variant.name} " in table
    # NO_COMPILE is the serving switch; warm-up compiles regardless, and a second run only reads.
    second = run_cli("warmup", cache_dir=tmp_path, **{env.NO_COMPILE: "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count("cached") >= 2 * len(variants.all_variants())


def _has_hopper() -> bool:
    try:
        return any(g.cc == install.HOPPER for g in cli._gpus())
    except Exception:   # no CuPy, driver or GPU
        return False


@pytest.mark.skipif(_has_hopper(), reason="an sm_90 GPU is present: the demo would run")
def test_demo_without_gpu_exits_2_with_the_reason(capsys):
    assert cli.main(["demo"]) == cli.EXIT_NO_GPU
    out = capsys.readouterr().out
    assert out.startswith("demo: ") and out.count("\n") == 1


def test_info_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("flashmla_cupy", "nvrtc", "cutlass", "cccl", str(tmp_path), env.NO_COMPILE, "gpu"):
        assert expected in out


def test_clear_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cache, "_memory", {})
    cache.get_or_compile(variants.scheduler_variant())
    assert cache.cache_size_bytes() > 0
    assert cli.main(["clear-cache"]) == 0
    assert "removed 2 cache files" in capsys.readouterr().out
    assert cache.cache_size_bytes() == 0


def test_warmup_into_a_path_blocked_by_a_file_exits_nonzero_and_says_why(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    done = run_cli("warmup", cache_dir=blocker)
    assert done.returncode == cli.EXIT_FAILED
    assert "cannot write the kernel cache" in done.stderr and env.CACHE_DIR in done.stderr
    assert "compiling" not in done.stdout   # it stopped before compiling anything


def _read_only(*args, **kwargs):
    raise OSError(30, "Read-only file system")


def test_warmup_into_a_read_only_cache_exits_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cache, "_memory", {})
    monkeypatch.setattr(cache.tempfile, "mkstemp", _read_only)
    assert cli.main(["warmup"]) == cli.EXIT_FAILED
    assert "Read-only file system" in capsys.readouterr().err


def test_warmup_reports_kernels_it_could_not_save(tmp_path, monkeypatch, capsys):
    """The cache turned unwritable after the first check (disk full, say): still a failure."""
    import concurrent.futures

    class Inline(concurrent.futures.ThreadPoolExecutor):   # the workers' results, without processes
        def __init__(self, jobs, mp_context=None):
            super().__init__(jobs)

    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cache, "_memory", {})
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Inline)
    monkeypatch.setattr(cache, "warm", lambda v: {"name": v.name, "seconds": 1.0, "unsaved": "No space left on device",
                                                  "registers": 32, "spill_stores": 0, "spill_loads": 0,
                                                  "stack_bytes": 0, "smem_static": 0})
    assert cli.main(["warmup"]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    assert "NOT SAVED" in captured.out and "could not be saved" in captured.err
    assert "No space left on device" in captured.err


def test_clear_cache_on_a_read_only_cache_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cache, "_memory", {})
    cache.get_or_compile(variants.scheduler_variant())
    monkeypatch.setattr(pathlib.Path, "unlink", _read_only)
    assert cli.main(["clear-cache"]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "could not remove 2 of 2 cache files" in lines[0]
    assert "Read-only file system" in lines[0] and captured.out == ""


def test_warmup_without_headers_reports_each_variant(tmp_path, monkeypatch, capsys):
    """A missing header set fails every variant in the table, with the reason, not with a traceback."""
    import concurrent.futures

    from flashmla_cupy import compiler

    class Inline(concurrent.futures.ThreadPoolExecutor):   # workers in this process, where the patch holds
        def __init__(self, jobs, mp_context=None):
            super().__init__(jobs)

    def missing():
        raise ImportError("the CUTLASS/CuTe headers were not found")

    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path))
    monkeypatch.setattr(cache, "_memory", {})
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Inline)
    monkeypatch.setattr(compiler, "header_dirs", missing)
    assert cli.main(["warmup"]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    assert captured.out.count("FAILED") >= len(variants.all_variants())
    assert "headers were not found" in captured.err
