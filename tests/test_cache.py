"""The on-disk cubin cache: hits, atomic writes, damaged entries, unwritable dirs, races, keys.

A stand-in compiler (deterministic bytes, no NVRTC) keeps these fast; real compiles are in test_compile.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

from flashmla_cupy import cache, compiler, env, errors, variants
from flashmla_cupy.compiler import CompiledKernel

REPO = pathlib.Path(__file__).resolve().parents[1]
SCHEDULER = variants.scheduler_variant()
DECODE = variants.decode_variant("bf16")


def fake_compile(variant):
    """Deterministic stand-in for NVRTC: the 'cubin' is derived from the program source."""
    digest = hashlib.sha256(compiler.program_source(variant).encode()).digest()
    return CompiledKernel(variant, b"\x7fELF" + digest * 64, "fake log", 32, 0, 0, 0, 0)


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """A private kernels dir (so sources can be edited) and a fresh, empty cache."""
    directory = tmp_path / "kernels_src"
    directory.mkdir()
    shutil.copy(REPO / "kernels_src" / "params.cuh", directory)
    for program in ("decode", "combine", "scheduler"):
        (directory / f"{program}.cu").write_text(f'#include "params.cuh"\n// {program} stand-in\n')
    monkeypatch.setattr(compiler, "kernels_dir", lambda: directory)
    monkeypatch.setenv(env.CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(env.NO_COMPILE, raising=False)
    monkeypatch.setattr(cache, "_memory", {})
    monkeypatch.setattr(cache, "_warned_unwritable", False)
    return directory


@pytest.fixture
def compiles(kernels, monkeypatch):
    """Counts calls of the stand-in compiler, by variant name."""
    calls = []

    def counting(variant):
        calls.append(variant.name)
        return fake_compile(variant)

    monkeypatch.setattr(compiler, "compile_variant", counting)
    return calls


def forget_memory():
    """Make the next lookup go to disk, as a new process would."""
    cache._memory.clear()


def entry_files():
    return sorted(p.name for p in cache.cache_dir().iterdir())


def test_hit_after_miss(compiles):
    first = cache.get_or_compile(SCHEDULER)
    assert cache.get_or_compile(SCHEDULER) is first          # memoised in-process
    forget_memory()
    again = cache.get_or_compile(SCHEDULER)                   # from disk
    assert compiles == ["scheduler"]
    assert again == first
    assert cache.warm(SCHEDULER)["seconds"] is None           # warm-up reports it as cached


def test_entry_is_cubin_and_manifest_with_no_temp_files(compiles):
    kernel = cache.get_or_compile(SCHEDULER)
    names = entry_files()
    assert [pathlib.Path(n).suffix for n in names] == [".cubin", ".json"]
    manifest = json.loads((cache.cache_dir() / names[1]).read_text())
    assert manifest["cubin_size"] == len(kernel.cubin)
    assert manifest["cubin_sha256"] == hashlib.sha256(kernel.cubin).hexdigest()
    assert manifest["report"]["registers"] == 32
    assert str(cache.cache_dir()).endswith(f"v{cache.package_version()}/sm_90a")


def test_failed_write_leaves_no_temp_file(compiles, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.warns(UserWarning, match="disk full"):
        cache.get_or_compile(SCHEDULER)
    assert entry_files() == []


def test_truncated_cubin_is_rebuilt(compiles):
    kernel = cache.get_or_compile(SCHEDULER)
    cubin = next(cache.cache_dir().glob("*.cubin"))
    cubin.write_bytes(kernel.cubin[:-1])
    forget_memory()
    assert cache.get_or_compile(SCHEDULER).cubin == kernel.cubin
    assert compiles == ["scheduler", "scheduler"]
    assert cubin.read_bytes() == kernel.cubin


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"format": 1}', ""])
def test_corrupt_manifest_is_rebuilt(compiles, damage):
    kernel = cache.get_or_compile(SCHEDULER)
    next(cache.cache_dir().glob("*.json")).write_text(damage)
    forget_memory()
    assert cache.get_or_compile(SCHEDULER) == kernel
    assert compiles == ["scheduler", "scheduler"]
    forget_memory()
    cache.get_or_compile(SCHEDULER)
    assert len(compiles) == 2, "the rebuilt entry must be valid"


def test_unwritable_cache_falls_back_to_memory_with_one_warning(compiles, tmp_path, monkeypatch):
    # A path below a regular file cannot be created, even by root (which ignores chmod).
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv(env.CACHE_DIR, str(blocker / "cache"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for variant in (SCHEDULER, DECODE, SCHEDULER):
            assert cache.get_or_compile(variant).variant == variant
    assert len(caught) == 1
    assert "in memory" in str(caught[0].message) and env.CACHE_DIR in str(caught[0].message)
    assert compiles == ["scheduler", "decode_bf16"]


def test_read_only_cache_still_serves_hits(compiles, monkeypatch):
    """A pre-warmed cache that cannot be written (e.g. baked into an image) is read normally."""
    kernel = cache.get_or_compile(SCHEDULER)
    forget_memory()
    monkeypatch.setattr(cache, "_atomic_write", lambda path, data: pytest.fail("a hit must not write"))
    assert cache.get_or_compile(SCHEDULER) == kernel


_RACER = textwrap.dedent("""
    import pathlib, sys, time
    sys.path.insert(0, {tests!r})
    import test_cache
    from flashmla_cupy import cache, compiler, variants

    compiler.kernels_dir = lambda: pathlib.Path({kernels!r})
    def slow_compile(variant):
        time.sleep(0.5)  # long enough for every racer to miss before any writes
        return test_cache.fake_compile(variant)
    compiler.compile_variant = slow_compile
    print(cache.get_or_compile(variants.scheduler_variant()).cubin.hex())
""")


def test_concurrent_warmup_gives_one_valid_entry(compiles, kernels):
    script = _RACER.format(tests=str(REPO / "tests"), kernels=str(kernels))
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=environment, cwd=REPO)
        for _ in range(4)
    ]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err for _, err in outputs]
    expected = fake_compile(SCHEDULER).cubin
    assert {out.strip() for out, _ in outputs} == {expected.hex()}
    assert len(entry_files()) == 2, entry_files()  # one .cubin + one .json, no temp files
    assert cache.load(SCHEDULER).cubin == expected
    assert compiles == []


def test_key_covers_sources_options_and_struct_layout(kernels, monkeypatch):
    base = cache.cache_key(SCHEDULER)
    assert cache.cache_key(SCHEDULER) == base
    assert cache.cache_key(variants.combine_variant("bf16")) != base

    program = kernels / "scheduler.cu"
    original = program.read_text()
    program.write_text(original + "// edited\n")
    assert cache.cache_key(SCHEDULER) != base
    program.write_text(original)

    (kernels / "unrelated.cuh").write_text("// a header the program does not include\n")
    assert cache.cache_key(SCHEDULER) != base
    (kernels / "unrelated.cuh").unlink()
    assert cache.cache_key(SCHEDULER) == base

    options = compiler.BASE_OPTIONS
    monkeypatch.setattr(compiler, "BASE_OPTIONS", (*options, "-lineinfo"))
    assert cache.cache_key(SCHEDULER) != base
    monkeypatch.setattr(compiler, "BASE_OPTIONS", options)
    assert cache.cache_key(SCHEDULER) == base

    monkeypatch.setattr(compiler.params, "layout_asserts", lambda: "// another struct layout\n")
    assert cache.cache_key(SCHEDULER) != base


def test_no_compile_miss_raises_and_hit_works(compiles, monkeypatch):
    monkeypatch.setenv(env.NO_COMPILE, "1")
    with pytest.raises(errors.KernelCacheMissError) as caught:
        cache.get_or_compile(SCHEDULER)
    assert "'scheduler'" in str(caught.value) and "python -m flashmla_cupy warmup" in str(caught.value)
    assert compiles == []
    monkeypatch.delenv(env.NO_COMPILE)
    kernel = cache.get_or_compile(SCHEDULER)
    forget_memory()
    monkeypatch.setenv(env.NO_COMPILE, "1")
    assert cache.get_or_compile(SCHEDULER) == kernel


def test_warm_compiles_even_where_serving_forbids_it(compiles, monkeypatch):
    """FLASHMLA_CUPY_NO_COMPILE guards serving processes; warm-up exists to fill the cache."""
    monkeypatch.setenv(env.NO_COMPILE, "1")
    result = cache.warm(SCHEDULER)
    assert "error" not in result and result["seconds"] is not None
    assert compiles == ["scheduler"]
    forget_memory()
    assert cache.get_or_compile(SCHEDULER).variant == SCHEDULER   # served from disk


def test_clear_removes_only_cache_files(compiles):
    cache.get_or_compile(SCHEDULER)
    assert cache.cache_size_bytes() > 0
    foreign = env.cache_root() / "notes.txt"
    foreign.write_text("not ours")
    assert cache.clear() == 2
    assert cache.cache_size_bytes() == 0
    assert foreign.exists() and not cache.cache_dir().exists()
    cache.get_or_compile(SCHEDULER)
    assert compiles == ["scheduler", "scheduler"], "clear() also forgets the in-process memo"


def test_key_is_the_same_for_every_install_with_the_same_versions(kernels, tmp_path, monkeypatch):
    """A source checkout, an installed wheel and another venv find their headers and kernel sources at
    other paths; with the same contents and versions they share one cache entry."""
    base = cache.cache_key(DECODE)
    elsewhere = tmp_path / "site-packages" / "flashmla_cupy" / "kernels_src"
    shutil.copytree(kernels, elsewhere)
    monkeypatch.setattr(compiler, "kernels_dir", lambda: elsewhere)
    real = compiler.header_dirs()
    def move(path):   # the same layout under another root
        return tmp_path / "venv2" / path.relative_to(path.anchor)
    moved = compiler.HeaderDirs(cutlass=move(real.cutlass), cccl=tuple(map(move, real.cccl)), cudart=move(real.cudart))
    monkeypatch.setattr(compiler, "header_dirs", lambda: moved)
    assert cache.cache_key(DECODE) == base
    assert str(tmp_path) in " ".join(compiler.compile_options(DECODE))      # the compile sees the paths
    assert str(tmp_path) not in " ".join(compiler.key_options(DECODE))      # the key sees roles only

    versions = compiler.header_versions()
    for name in versions:
        monkeypatch.setattr(compiler, "header_versions", lambda: {**versions, name: "0.0.1"})
        assert cache.cache_key(DECODE) != base, name
    monkeypatch.setattr(compiler, "header_versions", lambda: versions)
    other_nvrtc = "12.8 (wheel 12.8.93)" if compiler.nvrtc_version().startswith("12.9") else "12.9 (wheel 12.9.86)"
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: other_nvrtc)
    assert cache.cache_key(DECODE) != base


def test_cache_filled_elsewhere_serves_a_no_compile_process(compiles, kernels, tmp_path, monkeypatch):
    kernel = cache.get_or_compile(SCHEDULER)
    forget_memory()
    elsewhere = tmp_path / "checkout" / "kernels_src"
    shutil.copytree(kernels, elsewhere)
    monkeypatch.setattr(compiler, "kernels_dir", lambda: elsewhere)
    monkeypatch.setenv(env.NO_COMPILE, "1")
    assert cache.get_or_compile(SCHEDULER) == kernel


def test_cache_miss_says_what_the_cached_builds_differ_in(compiles, kernels, monkeypatch):
    cache.get_or_compile(SCHEDULER)
    forget_memory()
    monkeypatch.setenv(env.NO_COMPILE, "1")
    with monkeypatch.context() as m:
        m.setattr(compiler, "nvrtc_version", lambda: "13.5 (wheel 13.5.1)")
        with pytest.raises(errors.KernelCacheMissError) as caught:
            cache.get_or_compile(SCHEDULER)
    assert "1 other build of it" in str(caught.value) and "(here 13.5 (wheel 13.5.1))" in str(caught.value)
    (kernels / "scheduler.cu").write_text("// edited\n")
    with pytest.raises(errors.KernelCacheMissError, match="the same versions, so other kernel sources"):
        cache.get_or_compile(SCHEDULER)


def test_warm_reports_an_unsaved_kernel(compiles, monkeypatch):
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    result = cache.warm(SCHEDULER)
    assert "No space left on device" in result["unsaved"] and result["seconds"] is not None
    assert entry_files() == []
