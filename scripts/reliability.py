"""Reliability evidence on a Hopper machine (issue 8): each part writes one JSON report and exits non-zero
when anything in it failed.

    python scripts/reliability.py fresh-processes [--processes 20] [--frameworks torch,jax,cupy]
                                                  [--parallel 8 | --in-a-row]
        fresh processes, each with an empty cache dir and the framework imported first: the first call
        compiles what it needs in-process and must match the float64 reference; --in-a-row runs each
        framework's processes one after another (the frameworks side by side)
    python scripts/reliability.py concurrent-warmups [--count 8] [--jobs 2]
        `count` cold `python -m flashmla_cupy warmup`s at once into one cache dir, then `count` at once
        into separate dirs: all succeed, and every dir then holds exactly one valid entry per variant
    python scripts/reliability.py threads [--repetitions 100]
        two threads making their first calls at the same moment (the loaded modules forgotten before
        each repetition, so they race to load them again; the first repetition also to compile them):
        every result bit for bit the first one, which matches the reference
    python scripts/reliability.py devices
        inputs on cuda:1 while cuda:0 is current (torch, CuPy, JAX; skipped with the reason on one GPU),
        and the explicit stream= argument: a side stream, and the current stream (which must take the
        attribute fast path)

Common option: --json PATH (default: reliability_<part>.json in $OUT or the current directory).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "devtools"))

# A small decode step: two row tiles of split and unsplit requests, quick to check in float64.
BATCH, HEADS_Q, MAX_LENGTH = 4, 64, 3000


def child_environment(cache_dir: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FLASHMLA_CUPY_")}
    python_path = [str(REPO), str(REPO / "devtools"), environment.get("PYTHONPATH", "")]
    environment.update({
        "FLASHMLA_CUPY_CACHE_DIR": cache_dir, "PYTHONPATH": os.pathsep.join(p for p in python_path if p),
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",   # eight JAX processes cannot each take 75% of the GPU
        "PYTHONUNBUFFERED": "1"})
    return environment


def random_case(seed: int):
    import numpy as np

    from flashmla_cupy import reference

    rng = np.random.default_rng(seed)
    return reference.random_case(rng, BATCH, 1, HEADS_Q, 1, rng.integers(1, MAX_LENGTH + 1, BATCH), "bf16")


# --- (a) fresh processes -------------------------------------------------------------------------------

def first_call(framework: str, seed: int) -> dict:
    """In a fresh process: import `framework` first, then make the first calls (which compile)."""
    start = time.perf_counter()
    __import__({"torch": "torch", "jax": "jax", "cupy": "cupy"}[framework])
    imported = time.perf_counter()
    from gpu_cases import run

    from flashmla_cupy import cache

    case = random_case(seed)
    out, lse = run(case, framework)
    called = time.perf_counter()
    errors = case.check(out, lse)
    return {"framework": framework, "seed": seed, "import_seconds": round(imported - start, 2),
            "first_call_seconds": round(called - imported, 2),
            "compiled": {k.variant.name: len(k.log) for k in cache._memory.values()},   # log length: 0 = empty log
            "out_max_abs": errors["out_max_abs"], "lse_max_abs": errors["lse_max_abs"]}


def fresh_processes(args) -> dict:
    frameworks = args.frameworks.split(",")
    jobs = [(f, i) for f in frameworks for i in range(args.processes)]

    def one(job):
        framework, index = job
        with tempfile.TemporaryDirectory(prefix="flashmla_fresh_") as cache_dir:
            seed = int.from_bytes(os.urandom(4), "little")
            command = [sys.executable, __file__, "first-call", framework, str(seed)]
            begin = time.perf_counter()
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                      env=child_environment(cache_dir), cwd=REPO)
            except subprocess.TimeoutExpired:
                return {"framework": framework, "index": index, "seed": seed, "passed": False,
                        "error": f"timed out after {args.timeout} s"}
            wall = round(time.perf_counter() - begin, 2)
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                return {"index": index, "passed": True, "wall_seconds": wall, **json.loads(lines[-1])}
            return {"framework": framework, "index": index, "seed": seed, "passed": False, "wall_seconds": wall,
                    "error": (done.stderr or done.stdout)[-3000:]}

    start = time.perf_counter()
    if args.in_a_row:   # each framework's processes one after another; the frameworks side by side
        def in_a_row(framework):
            return [one(job) for job in jobs if job[0] == framework]

        with concurrent.futures.ThreadPoolExecutor(len(frameworks)) as pool:
            results = [r for rows in pool.map(in_a_row, frameworks) for r in rows]
    else:
        with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(one, jobs))
    for r in results:
        print(f"{r['framework']:5s} #{r['index']:2d}: {'ok' if r['passed'] else 'FAILED ' + r['error'][-300:]}",
              flush=True)
    empty_logs = sum(1 for r in results if r["passed"] and 0 in r["compiled"].values())
    succeeded = sum(r["passed"] for r in results)
    return {"passed": succeeded == len(results), "processes": len(results), "succeeded": succeeded,
            "in_a_row": args.in_a_row, "parallel": len(frameworks) if args.in_a_row else args.parallel,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "processes_with_an_empty_nvrtc_log": empty_logs, "results": results}


# --- (b) concurrent warm-ups ---------------------------------------------------------------------------

def entries(cache_root: pathlib.Path) -> dict:
    """Each variant's cache entry under `cache_root`, as a fresh process would find it."""
    code = ("import json; from flashmla_cupy import cache, variants\n"
            "found = {v.name: cache.load(v) for v in variants.all_variants()}\n"
            "files = sorted(p.name for p in cache.cache_dir().iterdir())\n"
            "print(json.dumps({'files': files, 'sha256': {n: k and __import__('hashlib').sha256(k.cubin).hexdigest()"
            " for n, k in found.items()}}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_environment(str(cache_root)), cwd=REPO, timeout=120)
    if done.returncode:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout)


def warmups(dirs: list[pathlib.Path], jobs: int, timeout: float) -> dict:
    command = [sys.executable, "-m", "flashmla_cupy", "warmup", "--jobs", str(jobs)]
    start = time.perf_counter()
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=child_environment(str(d)), cwd=REPO) for d in dirs]
    runs = []
    for process in running:
        try:
            output, _ = process.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        runs.append({"returncode": process.returncode, "output_tail": output[-1500:]})
    wall = round(time.perf_counter() - start, 1)
    found = {str(d): entries(d) for d in sorted(set(dirs))}
    return {"warmups": len(dirs), "succeeded": sum(r["returncode"] == 0 for r in runs), "wall_seconds": wall,
            "runs": runs, "entries": found}


def concurrent_warmups(args) -> dict:
    from flashmla_cupy import variants

    names = {v.name for v in variants.all_variants()}
    with tempfile.TemporaryDirectory(prefix="flashmla_warmups_") as root:
        root = pathlib.Path(root)
        shared = warmups([root / "shared"] * args.count, args.jobs, args.timeout)
        separate = warmups([root / f"separate{i}" for i in range(args.count)], args.jobs, args.timeout)

    def complete(found: dict) -> bool:
        """One cubin and one manifest per variant, nothing else, every entry loadable."""
        files = found.get("files", [])
        return (set(found.get("sha256", {})) == names and all(found["sha256"].values())
                and len(files) == 2 * len(names) and not any(f.endswith(".tmp") for f in files))

    digests = [json.dumps(f.get("sha256"), sort_keys=True) for part in (shared, separate)
               for f in part["entries"].values()]
    passed = all(p["succeeded"] == args.count and all(map(complete, p["entries"].values()))
                 for p in (shared, separate))
    return {"passed": passed, "identical_cubins_everywhere": len(set(digests)) == 1,
            "one_shared_dir": shared, "separate_dirs": separate}


# --- (d) two threads, first calls at once --------------------------------------------------------------

def threads(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="flashmla_threads_") as cache_dir:
        os.environ["FLASHMLA_CUPY_CACHE_DIR"] = cache_dir   # the first repetition compiles, racing
        return _threads(args.repetitions)


def _threads(repetitions: int) -> dict:
    import cupy
    import numpy as np
    from gpu_cases import to_device, to_numpy

    import flashmla_cupy
    from flashmla_cupy import launch, lookup

    cases = [random_case(int.from_bytes(os.urandom(4), "little")) for _ in range(2)]
    inputs = [tuple(to_device("cupy", x) for x in (c.q, c.k_cache, c.block_table, c.cache_seqlens)) for c in cases]
    first: list = [None, None]
    mismatches, shared_modules, failures = [], 0, []
    start = time.perf_counter()
    for rep in range(repetitions):
        launch._loaded.clear()   # forget the loaded modules: this repetition's first calls load them anew
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def work(index):
            try:
                q, k_cache, block_table, seqlens = inputs[index]
                stream = cupy.cuda.Stream(non_blocking=True)
                with stream:
                    barrier.wait()
                    metadata, num_splits = flashmla_cupy.get_mla_metadata(seqlens, HEADS_Q, 1)
                    out, lse = flashmla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512,
                                                                    metadata, num_splits)
                    stream.synchronize()
                loaded = {id(c._decode._launch._loaded) for c in lookup.remembered().values() if hasattr(c, "_decode")}
                results[index] = (to_numpy("cupy", out, cases[index].dtype), to_numpy("cupy", lse), loaded)
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(f"repetition {rep}, thread {index}: {type(exc).__name__}: {exc}")

        workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if any(r is None for r in results):
            continue
        decode_module = {id(v) for (variant, _), v in launch._loaded.items() if variant.program == "decode"}
        shared_modules += results[0][2] == results[1][2] == decode_module
        for i, (out, lse, _) in enumerate(results):
            if first[i] is None:
                first[i] = (out, lse)
                try:
                    cases[i].check(out, lse)
                except AssertionError as exc:
                    failures.append(f"repetition {rep}, thread {i} against the reference: {str(exc)[:500]}")
            elif not (np.array_equal(out.view(np.uint16), first[i][0].view(np.uint16))
                      and np.array_equal(lse.view(np.uint32), first[i][1].view(np.uint32))):
                mismatches.append({"repetition": rep, "thread": i})
    passed = not failures and not mismatches and shared_modules == repetitions
    return {"passed": passed, "repetitions": repetitions, "bit_identical": repetitions - len(mismatches) - len(failures),
            "repetitions_sharing_one_decode_module": shared_modules, "mismatches": mismatches,
            "failures": failures[:20], "wall_seconds": round(time.perf_counter() - start, 1)}


# --- (e) another device, explicit streams --------------------------------------------------------------

def devices(args) -> dict:
    import cupy
    import numpy as np
    from gpu_cases import to_numpy

    import flashmla_cupy
    from flashmla_cupy import tensors

    report, failures = {}, []

    def check(label, case, out, lse, framework):
        try:
            errors = case.check(to_numpy(framework, out, case.dtype), to_numpy(framework, lse))
            report[label] = {"passed": True, "out_max_abs": errors["out_max_abs"]}
        except AssertionError as exc:
            report[label] = {"passed": False, "error": str(exc)[:1000]}
            failures.append(label)

    def call(arrays, **kwargs):
        q, k_cache, block_table, seqlens = arrays
        metadata, num_splits = flashmla_cupy.get_mla_metadata(seqlens, HEADS_Q, 1, **kwargs)
        return flashmla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, seqlens, 512, metadata, num_splits,
                                                    **kwargs)

    def bits(x):   # 16-bit floats as their bit patterns
        return np.asarray(x).view(np.uint16) if np.asarray(x).dtype.itemsize == 2 else np.asarray(x)

    import torch

    case = random_case(int.from_bytes(os.urandom(4), "little"))
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 2:
        report["cuda:1"] = {"skipped": f"only {count} GPU visible: run on a two-GPU machine (nvidia-h200-x2)"}
    else:
        host = (case.q.view(np.int16), case.k_cache.view(np.int16), case.block_table, case.cache_seqlens)
        torch.cuda.set_device(0)
        on1 = [torch.from_numpy(x).to("cuda:1") for x in host]
        on1[:2] = [t.view(torch.bfloat16) for t in on1[:2]]
        out, lse = call(on1)
        torch.cuda.synchronize(1)
        check("torch on cuda:1, cuda:0 current", case, out, lse, "torch")
        with cupy.cuda.Device(1):
            arrays = [cupy.asarray(x) for x in host]
            arrays[:2] = [a.view(case.dtype) for a in arrays[:2]]
        with cupy.cuda.Device(0):
            out, lse = call(arrays)
        with cupy.cuda.Device(1):
            cupy.cuda.get_current_stream().synchronize()
            check("cupy on cuda:1, cuda:0 current", case, out, lse, "cupy")
        try:
            import jax
            gpus = jax.devices("gpu")
            arrays = [jax.device_put(x, gpus[1]) for x in (case.q, case.k_cache, case.block_table, case.cache_seqlens)]
            out, lse = call(arrays)
            check("jax on its second GPU", case, out, lse, "jax")
        except ImportError as exc:
            report["jax on its second GPU"] = {"skipped": str(exc)}

    # Explicit streams, torch inputs on cuda:0.
    on0 = [torch.from_numpy(x).cuda() for x in (case.q.view(np.int16), case.k_cache.view(np.int16),
                                                   case.block_table, case.cache_seqlens)]
    on0[:2] = [t.view(torch.bfloat16) for t in on0[:2]]
    default = call(on0)
    torch.cuda.synchronize()
    check("torch, current stream", case, *default, "torch")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    out, lse = call(on0, stream=side)
    side.synchronize()
    check("torch, stream= a side stream", case, out, lse, "torch")
    same = np.array_equal(bits(to_numpy("torch", out, case.dtype)), bits(to_numpy("torch", default[0], case.dtype)))
    report["torch, side stream bit-identical to current stream"] = {"passed": same}
    failures += [] if same else ["side stream bits"]

    taken = []
    real_take_all = tensors.take_all
    tensors.take_all = lambda *a, **k: taken.append(1) or real_take_all(*a, **k)
    try:
        out, lse = call(on0, stream=torch.cuda.current_stream())
    finally:
        tensors.take_all = real_take_all
    torch.cuda.synchronize()
    check("torch, stream= the current stream", case, out, lse, "torch")
    report["torch, stream= the current stream takes the fast path"] = {"passed": not taken, "views_taken": len(taken)}
    failures += ["fast path"] if taken else []

    side = cupy.cuda.Stream(non_blocking=True)
    arrays = [cupy.asarray(x) for x in (case.q.view(np.int16), case.k_cache.view(np.int16),
                                        case.block_table, case.cache_seqlens)]
    arrays[:2] = [a.view(case.dtype) for a in arrays[:2]]
    cupy.cuda.get_current_stream().synchronize()
    out, lse = call(arrays, stream=side)
    side.synchronize()
    check("cupy, stream= a side stream", case, out, lse, "cupy")
    return {"passed": not failures, "failures": failures, "cases": report}


# --- main ------------------------------------------------------------------------------------------------

PARTS = {"fresh-processes": fresh_processes, "concurrent-warmups": concurrent_warmups, "threads": threads,
         "devices": devices}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["first-call"]:   # the child of fresh-processes
        print(json.dumps(first_call(argv[1], int(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--json")
    parser.add_argument("--processes", type=int, default=20, help="fresh-processes: per framework")
    parser.add_argument("--frameworks", default="torch,jax,cupy", help="fresh-processes: imported first, in turn")
    parser.add_argument("--parallel", type=int, default=8, help="fresh-processes: at once")
    parser.add_argument("--in-a-row", action="store_true",
                        help="fresh-processes: each framework's processes one after another (frameworks side by side)")
    parser.add_argument("--count", type=int, default=8, help="concurrent-warmups: warm-ups at once")
    parser.add_argument("--jobs", type=int, default=2, help="concurrent-warmups: compiler processes of each")
    parser.add_argument("--repetitions", type=int, default=100, help="threads")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for one process / warm-up round")
    args = parser.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # JAX beside torch and CuPy
    start = time.perf_counter()
    result = PARTS[args.part](args)
    result = {"part": args.part, "total_wall_seconds": round(time.perf_counter() - start, 1), **result}
    path = args.json or os.path.join(os.environ.get("OUT", "."), f"reliability_{args.part.replace('-', '_')}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    passed = result["passed"]
    print(f"{args.part}: {'passed' if passed else 'FAILED'} in {result['total_wall_seconds']} s -> {path}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
