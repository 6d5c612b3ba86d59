"""`python -m flashmla_cupy`: warmup compiles everything with no GPU; info, clear-cache and demo behave."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from flashmla_cupy import __main__ as cli
from flashmla_cupy import cache, env, variants
from flashmla_cupy.api import HOPPER

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
    return any(g.cc == HOPPER for g in cli._gpus())


@pytest.mark.skipif(_has_hopper(), reason="an sm_90 GPU is present: the demo would run")
def test_demo_without_gpu_exits_2_with_the_message(capsys):
    assert cli.main(["demo"]) == cli.EXIT_NO_GPU
    assert capsys.readouterr().out.strip() == cli.NO_GPU_MESSAGE


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
