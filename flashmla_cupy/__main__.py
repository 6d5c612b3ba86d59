"""Command line: `python -m flashmla_cupy {warmup,info,clear-cache,demo}`.

warmup       compile every kernel variant into the cache (no GPU needed); run it at image build time
info         versions, header directories, cache location and size, environment, visible GPUs
clear-cache  delete every cached kernel
demo         a DeepSeek-V3-shaped decode step on an H100/H200: checks against the reference and times it
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import multiprocessing
import os
import platform
import sys
import time

from . import cache, compiler, env, errors, install, variants
from .errors import CudaUnavailableError, MissingDependencyError, UnsupportedDeviceError

EXIT_FAILED = 1
EXIT_NO_GPU = 2


# ---------------------------------------------------------------------------------------- warmup

def _spills(result: dict) -> bool:
    """Local memory in use: a stack frame (spills live there) or spill bytes in ptxas's report."""
    return result["stack_bytes"] > 0 or bool(result["spill_stores"]) or bool(result["spill_loads"])


def _spill_cell(result: dict) -> str:
    """Spill bytes from ptxas's report; "n/a" when NVRTC returned no report (the stack frame decides)."""
    if result["spill_stores"] is None or result["spill_loads"] is None:
        return "n/a"
    return f"{result['spill_stores']}/{result['spill_loads']}"


def _outcome(result: dict, compiled: str = "") -> str:
    """How a warm-up result came about: FAILED, cached, or the compile time (and NOT SAVED)."""
    if "error" in result:
        return "FAILED"
    if result["seconds"] is None:
        return "cached"
    return f"{compiled}{result['seconds']:.1f} s" + (", NOT SAVED" if result["unsaved"] else "")


def _print_table(results: list[dict]) -> None:
    header = ("variant", "registers", "spill st/ld", "stack", "static smem", "compile")
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["name"], "-", "-", "-", "-", "FAILED"))
            continue
        when = _outcome(r)
        spill = _spill_cell(r) + ("  SPILLS" if _spills(r) else "")
        rows.append((r["name"], str(r["registers"]), spill, str(r["stack_bytes"]), str(r["smem_static"]), when))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _anything_to_compile(todo: list) -> bool:
    try:
        return any(cache.load(v) is None for v in todo)
    except Exception:  # e.g. headers not found: each variant's worker reports it
        return True


def cmd_warmup(args) -> int:
    # CuPy and NVRTC (the CUDA extra) checked here once: each worker would report the same missing
    # extra; a missing header set is reported per variant, in the table.
    try:
        install.nvrtc()
    except MissingDependencyError as exc:
        print(f"flashmla_cupy warmup: {exc}", file=sys.stderr)
        return EXIT_FAILED
    todo = variants.all_variants()
    # Fail before minutes of compiling when nothing compiled could be kept.
    unwritable = cache.unwritable_reason() if _anything_to_compile(todo) else None
    if unwritable:
        print(f"flashmla_cupy warmup: cannot write the kernel cache at {cache.cache_dir()} ({unwritable}), so "
              f"nothing compiled would be kept. Point {env.CACHE_DIR} at a writable directory.", file=sys.stderr)
        return EXIT_FAILED
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, args.jobs or min(len(todo), cpus))
    print(f"flashmla_cupy: compiling {len(todo)} kernel variants for {compiler.ARCH} into {cache.cache_dir()} "
          f"with {jobs} process{'es' if jobs != 1 else ''}", flush=True)
    # Processes, not threads: measured on 2 cores, two decode compiles in two threads overlapped
    # little (3.3 s against 4.0 s in sequence), in two processes they took 2.9 s.
    # spawn, not fork: the caller may already hold a CUDA context, which a forked child cannot use.
    context = multiprocessing.get_context("spawn")
    start = time.perf_counter()
    results: dict[str, dict] = {}
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        pending = {pool.submit(cache.warm, v): v for v in todo}
        for done, future in enumerate(concurrent.futures.as_completed(pending), 1):
            try:
                r = future.result()
            except Exception as exc:  # the worker process died (e.g. killed for memory)
                r = {"name": pending[future].name, "error": f"{type(exc).__name__}: {exc}"}
            results[r["name"]] = r
            print(f"  [{done}/{len(todo)}] {r['name']}: {_outcome(r, 'compiled in ')}", flush=True)
    print(f"done in {time.perf_counter() - start:.1f} s\n")
    ordered = [results[v.name] for v in todo]
    _print_table(ordered)
    failed = [r for r in ordered if "error" in r]
    spilling = [r["name"] for r in ordered if "error" not in r and _spills(r)]
    unsaved = [r for r in ordered if "error" not in r and r["unsaved"]]
    for r in failed:
        print(f"\n{r['name']} failed:\n{r['error']}", file=sys.stderr)
    for r in unsaved:
        print(f"\n{r['name']} was compiled but could not be saved in {cache.cache_dir()}: {r['unsaved']}",
              file=sys.stderr)
    if spilling:
        print(f"\nregister spills in {', '.join(spilling)}: these kernels would run slowly", file=sys.stderr)
    return EXIT_FAILED if failed or spilling or unsaved else 0


# ------------------------------------------------------------------------------------------ info

def _gpus() -> list:
    """DeviceInfo of every visible GPU; raises install's one-line errors when none can be reached."""
    from . import launch

    return [launch.device_info(i) for i in range(install.device_count())]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _line(label: str, describe) -> None:
    """One line of `info`: what `describe()` returns, or why that part is not there. Never raises:
    info is what a user runs when something is broken."""
    try:
        text = describe()
    except (MissingDependencyError, UnsupportedDeviceError) as exc:   # one-line messages with the fix
        text = f"MISSING: {exc}"
    except Exception as exc:
        text = f"FAILED: {type(exc).__name__}: {exc}"
    print(f"{label:<16}{text}")


def _extra() -> str:
    extras = install.installed_extras()
    if len(extras) > 1:
        raise MissingDependencyError(
            f"{' and '.join(e.cupy for e in extras)} are both installed and overwrite each other's `cupy` "
            f"module: uninstall both, then {install.choose_extra_hint()}")
    if not extras:
        raise MissingDependencyError(f"no CUDA extra installed: {install.choose_extra_hint()}")
    extra = extras[0]
    return f"{extra.name} ({extra.cupy} {importlib.metadata.version(extra.cupy)})"


def _cupy() -> str:
    cupy = install.require_cupy()
    major, minor = install.runtime_cuda_version(cupy)
    return f"{cupy.__version__} (CUDA runtime {major}.{minor})"


def _headers() -> str:
    dirs, versions = compiler.header_dirs(), compiler.header_versions()
    return (f"cutlass {versions['cutlass']} {dirs.cutlass}\n{'':<16}cccl {versions['cccl']} "
            f"{'  '.join(map(str, dirs.cccl))}\n{'':<16}cuda {versions['cudart']} {dirs.cudart}")


def _driver() -> str:
    version = install.driver_cuda_version()
    if version is None:
        raise CudaUnavailableError("no NVIDIA driver (libcuda.so.1 cannot be loaded)")
    return f"supports CUDA {version[0]}.{version[1]}"


def _gpu_lines() -> str:
    lines = []
    for g in _gpus():
        usable = "" if g.cc == install.HOPPER else "  (not Hopper: cannot run these kernels)"
        lines.append(f"{g.device_id}: {g.name}, compute capability {g.cc[0]}.{g.cc[1]}, {g.sm_count} SMs{usable}")
    return f"\n{'':<16}".join(lines)


def cmd_info(args) -> int:
    _line("flashmla_cupy", cache.package_version)
    _line("python", lambda: f"{platform.python_version()} ({sys.executable})")
    _line("cuda extra", _extra)
    _line("cupy", _cupy)
    _line("nvrtc", compiler.nvrtc_version)
    _line("headers", _headers)
    _line("kernel sources", compiler.kernels_dir)
    _line("target arch", lambda: compiler.ARCH)
    _line("cache", lambda: f"{cache.cache_dir()}  ({_mib(cache.cache_size_bytes())} under {env.cache_root()})")
    print("environment")
    for name, (default, meaning) in env.VARIABLES.items():
        value = os.environ.get(name)
        print(f"  {name}={value}" if value is not None else f"  {name} (unset)")
        print(f"      {meaning}; default: {default}")
    _line("driver", _driver)
    _line("gpus", _gpu_lines)
    return 0


def cmd_clear_cache(args) -> int:
    try:
        removed = cache.clear()
    except errors.CacheError as exc:
        print(f"flashmla_cupy clear-cache: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"removed {removed} cache files from {env.cache_root()}")
    return 0


# ------------------------------------------------------------------------------------------ demo

# DeepSeek-V3 decode: 128 query heads share one latent KV head of 576 values (512 + 64 rope).
DEMO_SHAPE = dict(batch=64, seqlen_q=1, heads_q=128, heads_kv=1)
DEMO_SEQLENS = (512, 8192)  # each request's cache length is drawn uniformly from this range
DEMO_WARMUP_RUNS = 5
DEMO_TIMED_RUNS = 50


def cmd_demo(args) -> int:
    try:
        gpus = _gpus()
        device = next((g for g in gpus if g.cc == install.HOPPER), None) or install.require_hopper(0)
    except (MissingDependencyError, UnsupportedDeviceError) as exc:
        print(f"demo: {exc}")
        return EXIT_NO_GPU
    import cupy

    with cupy.cuda.Device(device.device_id):
        return _run_demo(device)


def _run_demo(device) -> int:
    import cupy
    import numpy as np

    import flashmla_cupy
    from . import reference

    b, s_q, h_q, h_kv = (DEMO_SHAPE[k] for k in ("batch", "seqlen_q", "heads_q", "heads_kv"))
    d, dv = reference.HEAD_DIM, reference.HEAD_DIM_V
    rng = np.random.default_rng(0)
    seqlens = rng.integers(DEMO_SEQLENS[0], DEMO_SEQLENS[1] + 1, size=b)
    # Random pages in a shuffled block table, NaN in every slot no request may read (docs/API.md).
    case = reference.random_case(rng, **DEMO_SHAPE, seqlens=seqlens, dtype="bf16")
    def to_gpu(x):  # 16-bit floats travel as their bit patterns, as the GPU tests move them
        return cupy.asarray(x.view(np.uint16)).view(x.dtype) if x.dtype.itemsize == 2 else cupy.asarray(x)

    q, k_cache, block_table, cache_seqlens = (
        to_gpu(x) for x in (case.q, case.k_cache, case.block_table, case.cache_seqlens))
    print(f"demo on GPU {device.device_id} ({device.name}, {device.sm_count} SMs): b={b} s_q={s_q} h_q={h_q} "
          f"h_kv={h_kv} d={d} dv={dv} bf16, page {reference.PAGE_SIZE}, "
          f"seqlens {seqlens.min()}..{seqlens.max()} (mean {seqlens.mean():.0f})")

    start = time.perf_counter()
    metadata, num_splits = flashmla_cupy.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)

    def step():
        return flashmla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv,
                                                    metadata, num_splits)

    out, lse = step()
    cupy.cuda.get_current_stream().synchronize()
    print(f"first call, kernel loading (and compiling on a cold cache) included: {time.perf_counter() - start:.2f} s")

    ref_out, ref_lse = case.reference()
    try:
        out_host = cupy.asnumpy(out.view(cupy.uint16)).view(case.dtype)
        errors_seen = case.check(out_host, cupy.asnumpy(lse), (ref_out, ref_lse))
    except AssertionError as exc:
        print(f"MISMATCH against the float64 reference: {exc}")
        return EXIT_FAILED
    print(f"matches the float64 reference: max abs error {errors_seen['out_max_abs']:.2e} (out), "
          f"{errors_seen['lse_max_abs']:.2e} (lse), cosine difference {errors_seen['out_cos_diff']:.1e}")

    for _ in range(DEMO_WARMUP_RUNS):
        step()
    # No L2 flush: the ~300 MB of KV cache read per step dwarfs the 50 MB L2, so few hits survive.
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(DEMO_TIMED_RUNS)]
    for begin, end in events:
        begin.record()
        step()
        end.record()
    events[-1][1].synchronize()
    ms = float(np.median([cupy.cuda.get_elapsed_time(begin, end) for begin, end in events]))

    flops, nbytes = reference.perf_accounting(int(seqlens.sum()), b, s_q, h_q, h_kv, case.dtype.itemsize)
    print(f"flash_mla_with_kvcache: {ms * 1000:.1f} us (median of {DEMO_TIMED_RUNS}), "
          f"{flops / 1e9 / ms:.0f} TFLOPS, {nbytes / 1e6 / ms:.0f} GB/s")
    return 0


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashmla_cupy", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    warmup = commands.add_parser("warmup", help="compile every kernel variant into the cache (no GPU needed)")
    warmup.add_argument("--jobs", "-j", type=int, default=0,
                        help="compiler processes (default: one per variant, at most the CPU count)")
    warmup.set_defaults(run=cmd_warmup)
    commands.add_parser("info", help="versions, headers, cache, environment and GPUs").set_defaults(run=cmd_info)
    commands.add_parser("clear-cache", help="delete every cached kernel").set_defaults(run=cmd_clear_cache)
    commands.add_parser("demo", help="run and time a DeepSeek-V3-shaped decode step (needs an sm_90 GPU)"
                        ).set_defaults(run=cmd_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
