"""Kernel builds side by side in one device run: the shipped kernels against variants of them.

A variant is the shipped sources compiled with extra defines, or another kernels_src tree (a
candidate change, copied to a git-ignored folder), or both. Each build runs in its own child process
with its own kernel cache, taking turns with the others for `--rounds` rounds, so that clock and
thermal drift fall on every build alike. A child first checks its build against the float64
reference on eight small random cases (odd lengths, s_q = 2 causal, four row tiles, h_kv = 2, both
dtypes, the narrow kernel's 16 rows, an FP8 cache with both query forms and with 32 and 128 rows;
`--checks N`: N times, with fresh data), then times the selected benchmark cases as scripts/bench.py
does (CUDA-graph replay, L2 flushed before every run, CUDA-event median; with `--eager` also launched
from the host). The report gives each build's median time per case over the rounds and its ratio to
the shipped build, each case's spread (the widest of any build's rounds: a ratio inside it is noise), and
the largest share of each accuracy bar its passing checks used.

    python scripts/kernel_ab.py --variant "unguarded: -DFLASHMLA_UNGUARDED=1"       # what the guards cost
    python scripts/kernel_ab.py --variant "lazy: tree=.scratch/lazy/kernels_src" --cases 'b128-q1-*'
    python scripts/kernel_ab.py --variant "big: tree=/tmp/k smem=230400 -DX=1" --json ab.json

Variant spec: `NAME: ITEM ...`, items are `-D...` defines, `-Xptxas=...` options (ptxas's own, after
every element type's defines) and NVRTC's floating-point options (`-ftz=true`, `-prec-div=false`, ...), `tree=DIR` (a kernels_src directory) and
`patch=FILE` (a candidate patch, devtools/candidates/*.patch: its kernels_src changes applied to a copy of the
shipped kernels_src, or of `tree=`'s, below --cache-root; the rest of the patch is left out) and
`smem=BYTES` and `threads=N` (the decode kernel's dynamic shared memory and block size when the tree
changes them), `narrow=ROWS` (the most query rows per KV head that go to the narrow kernel; 0: none),
`overhead=PAGES` (the planner's fixed cost of a piece, plan.OVERHEAD_PAGES: the plan changes, not the kernels),
`whole=PERCENT` (plan.WHOLE_SLACK_PERCENT, how much costlier an uncut plan may be; negative: cut as needed),
`maxparts=N` (the plan cuts a batch into at most N parts, fewer CTAs than SMs) and `ring=0|1` (whether an e4m3
q and cache with more than 32 rows go to decode_ring.cu, kernels.RING_FP8, or to decode.cu) and `partialf16=N`
(decode.cu writes fp16 partial rows where the batch times N is at most the plan's parts, every plan:
kernels.PARTIAL_F16_PARTS_PER_REQUEST and PARTIAL_F16_WIDE_PARTS_PER_REQUEST; 0: never; a fraction reaches plans
of fewer parts than requests, 0.25 a batch of up to 4 parts a request; the combine follows) and
`partialf16wide=N` (the latter alone: parts of two or more row tiles) and `ringp16=N` (the same rule for
the ring kernel's fp16-partial build, one share for every plan: kernels.RING_PARTIAL_F16_PARTS_PER_REQUEST) and
`ringsmem=BYTES` (decode_ring.cu's shared memory, variants.RING_SHARED_BYTES, where the tree's storage differs) and
`nvrtc=LIB` (a libnvrtc.so to compile this build with, preloaded in its process: the same sources under another
NVRTC version, whose ptxas schedules the kernels differently; devtools/sass_diff.py compares the SASS; each round's
line says which NVRTC a build used) and `cubins=DIR` (the build's kernels from DIR/<variant>.cubin where DIR has
one, compiled elsewhere: `--write-cubins DIR` writes every variant's with this process's NVRTC, so that a
version too large to carry to the device is timed there all the same) and
`narrowsmem=ROWS:KV:BYTES` (a narrow kernel's shared memory, variants.NARROW_SHARED_BYTES, where the tree's
storage differs; KV `e4m3` or `-`) and `fp8box=COLS:SWIZZLE` (an experiment's FP8 cache boxes: COLS one-byte
columns, SWIZZLE-byte swizzle, in every swizzled FP8 map; the shipped kernels expect 64:64, so time other boxes
with `--checks 0` on cases only the kernel under test runs) and `l2promo=N` (every cache map's L2 promotion,
CU_TENSOR_MAP_L2_PROMOTION_*: 0 none, 1 64 bytes, 2 128 as shipped, 3 256) and `table=seq|fold:N` (the timed
cases' block tables: each request's pages consecutive, or every entry modulo N, which keeps the pages in L2;
the checks keep theirs).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = "shipped"


NVRTC_FLOAT_OPTIONS = ("-ftz=", "-prec-div=", "-prec-sqrt=", "-fmad=")  # with a value; -use_fast_math alone


def parse_variant(text: str) -> dict:
    name, _, items = text.partition(":")
    spec = {"name": name.strip(), "defines": [], "tree": None, "smem": None, "threads": None, "overhead": None}
    if not spec["name"] or spec["name"] == BASE:
        raise SystemExit(f"variant {text!r}: give it a name other than {BASE!r}")
    for item in items.split():
        if item.startswith(("-D", "-Xptxas=") + NVRTC_FLOAT_OPTIONS) or item == "-use_fast_math":
            # a define, an option for ptxas (its schedule) or one of NVRTC's floating-point options
            spec["defines"].append(item)
        elif item.startswith("tree="):
            spec["tree"] = str(pathlib.Path(item[5:]).resolve())
        elif item.startswith("patch="):  # a candidate patch's kernels_src changes (apply_patch)
            spec["patch"] = str(pathlib.Path(item[6:]).resolve())
        elif item.startswith("smem="):
            spec["smem"] = int(item[5:])
        elif item.startswith("threads="):
            spec["threads"] = int(item[8:])
        elif item.startswith("narrow="):
            spec["narrow"] = int(item[7:])
        elif item.startswith("overhead="):
            spec["overhead"] = int(item[9:])
        elif item.startswith("whole="):
            spec["whole"] = int(item[6:])
        elif item.startswith("maxparts="):
            spec["maxparts"] = int(item[9:])
        elif item.startswith("ring="):
            spec["ring"] = bool(int(item[5:]))
        elif item.startswith("partialf16="):
            spec["partialf16"] = _share(item[11:])
        elif item.startswith("ringp16="):  # N: the ring kernel's fp16-partial rule, as partialf16's
            spec["ringp16"] = _share(item[8:])
        elif item.startswith("partialf16wide="):  # N: decode.cu's rule for parts of two or more row tiles only
            spec["partialf16wide"] = _share(item[15:])
        elif item.startswith("fp8box="):  # COLS:SWIZZLE, an experiment's FP8 cache boxes
            spec["fp8box"] = [int(n) for n in item[7:].split(":")]
        elif item.startswith("l2promo="):  # 0-3, the cache maps' L2 promotion
            spec["l2promo"] = int(item[8:])
        elif item.startswith("table="):  # "seq" or "fold:N", the timed cases' block tables
            spec["table"] = item[6:]
        elif item.startswith("cubins="):  # a directory of <variant>.cubin compiled elsewhere
            spec["cubins"] = str(pathlib.Path(item[7:]).resolve())
        elif item.startswith("nvrtc="):  # a libnvrtc.so for this build's process (LD_PRELOAD)
            spec["nvrtc"] = str(pathlib.Path(item[6:]).resolve())
        elif item.startswith("ringsmem="):  # the ring kernel's shared memory where the tree's storage differs
            spec["ringsmem"] = int(item[9:])
        elif item.startswith("narrowsmem="):  # ROWS:KV:BYTES, KV "e4m3" or "-" (a 16-bit cache)
            rows, kv, size = item[11:].split(":")
            spec.setdefault("narrowsmem", []).append([int(rows), None if kv == "-" else kv, int(size)])
        else:
            raise SystemExit(f"variant {text!r}: unknown item {item!r} (-D..., -Xptxas=..., -ftz=... and NVRTC's other floating-point options, tree=DIR, patch=FILE, smem=BYTES, "
                             "threads=N, narrow=ROWS, overhead=PAGES, whole=PERCENT, maxparts=N, ring=0|1, partialf16=N, partialf16wide=N, ringp16=N, ringsmem=BYTES, "
                             "nvrtc=LIB, cubins=DIR, narrowsmem=ROWS:KV:BYTES, "
                             "fp8box=COLS:SWIZZLE, l2promo=N, table=seq|fold:N)")
    return spec


def _share(text: str) -> int | float:
    """A `partialf16=` / `ringp16=` value: an integer, or a fraction (batch * share <= parts)."""
    value = float(text)
    return int(value) if value.is_integer() else value


def apply_patch(spec: dict, cache_root: str) -> None:
    """`patch=FILE`: copy the build's kernels_src (the shipped one, or tree='s) to CACHE_ROOT/<name>-tree and
    apply the patch's kernels_src changes there with `git apply` (which needs no repository); the build
    then uses that tree. A patch that does not apply stops the run before any device time is spent."""
    source = pathlib.Path(spec["tree"] or ROOT / "kernels_src")
    work = pathlib.Path(cache_root) / f"{spec['name']}-tree"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work / "kernels_src")
    # Outside any repository (a cache root inside one would make git apply skip paths it thinks lie outside).
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(work.parent))
    done = subprocess.run(["git", "apply", "--include=kernels_src/*", spec["patch"]], cwd=work, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {spec['name']!r}: {spec['patch']} does not apply to {source}:\n{done.stderr}")
    if not any((work / "kernels_src" / f.relative_to(source)).read_bytes() != f.read_bytes()
               for f in source.rglob("*") if f.is_file()):
        raise SystemExit(f"variant {spec['name']!r}: {spec['patch']} changes nothing in kernels_src")
    spec["tree"] = str(work / "kernels_src")
    spec["patch_applied"] = True  # the children (and apply) take the tree as it is


def prebuilt(directory: pathlib.Path, compile_here):
    """compiler.compile_variant for `cubins=DIR`: a variant's cubin from DIR/<name>.cubin where there is one
    (its resources read from the cubin, as compile_variant reads them), else compiled here."""
    from flashmla_cupy import compiler
    from flashmla_cupy import cubin as cubin_image

    def compile_variant(variant):
        path = directory / f"{variant.name}.cubin"
        if not path.is_file():
            return compile_here(variant)
        image = path.read_bytes()
        resources = cubin_image.kernel_resources(image, variant.kernel_name)
        return compiler.CompiledKernel(variant, image, f"prebuilt: {path}", registers=resources.registers,
                                       spill_stores=None, spill_loads=None, stack_bytes=resources.stack_bytes,
                                       smem_static=resources.smem_static)
    return compile_variant


def nvrtc_here() -> str:
    """The NVRTC this process compiles with, major.minor (a preloaded one's too, where the wheel's
    version, which compiler.nvrtc_version adds, would name another)."""
    from flashmla_cupy import install

    return ".".join(map(str, install.nvrtc().getVersion()))


def write_cubins(directory: pathlib.Path) -> int:
    """--write-cubins: every variant of this checkout compiled with this process's NVRTC into DIRECTORY."""
    sys.path.insert(0, str(ROOT))
    from flashmla_cupy import compiler, variants

    directory.mkdir(parents=True, exist_ok=True)
    version = nvrtc_here()
    for variant in variants.all_variants():
        (directory / f"{variant.name}.cubin").write_bytes(compiler.compile_variant(variant).cubin)
    (directory / "NVRTC").write_text(version + "\n")
    print(f"{len(variants.all_variants())} cubins, NVRTC {version}, in {directory}")
    return 0


# ---- child: one build, one round -------------------------------------------------------------------

def apply(spec: dict) -> None:
    """Point the package at the variant's build before anything is compiled or loaded."""
    from flashmla_cupy import compiler, kernels, launch, plan, variants

    if spec.get("patch") and not spec.get("patch_applied"):  # ncu_compare, kernel_trace, sanitize_cases
        apply_patch(spec, tempfile.mkdtemp(prefix="kernel_ab_patch_"))
    if spec["tree"]:
        tree = pathlib.Path(spec["tree"])
        compiler.kernels_dir = lambda: tree
    if spec["smem"]:
        variants.DECODE_SHARED_BYTES = spec["smem"]
    if spec.get("threads"):
        variants.DECODE_THREADS = {kv: spec["threads"] for kv in variants.DECODE_THREADS}
    if spec.get("narrow") is not None:   # at most the rows each narrow build takes
        kernels.NARROW_MAX_ROWS = min(spec["narrow"], kernels.NARROW_MAX_ROWS)
        kernels.NARROW_FP8_MAX_ROWS = min(spec["narrow"], kernels.NARROW_FP8_MAX_ROWS)
    if spec.get("overhead") is not None:   # read when each planner launch is prepared
        plan.OVERHEAD_PAGES = spec["overhead"]
    if spec.get("whole") is not None:      # likewise
        plan.WHOLE_SLACK_PERCENT = spec["whole"]
    if spec.get("ring") is not None:
        kernels.RING_FP8 = spec["ring"]
    if spec.get("partialf16") is not None:   # where decode.cu's partial rows go in fp16 (the combine follows)
        kernels.PARTIAL_F16_PARTS_PER_REQUEST = spec["partialf16"]
        kernels.PARTIAL_F16_WIDE_PARTS_PER_REQUEST = spec["partialf16"]
    if spec.get("partialf16wide") is not None:   # ... for parts of two or more row tiles (after partialf16=)
        kernels.PARTIAL_F16_WIDE_PARTS_PER_REQUEST = spec["partialf16wide"]
    if spec.get("ringp16") is not None:   # the same rule for the ring kernel's partial rows, every plan
        kernels.RING_PARTIAL_F16_PARTS_PER_REQUEST = spec["ringp16"]
    if spec.get("cubins"):
        compiler.compile_variant = prebuilt(pathlib.Path(spec["cubins"]), compiler.compile_variant)
    if spec.get("ringsmem"):   # decode_ring.cu's shared memory where the tree's storage differs
        variants.RING_SHARED_BYTES = spec["ringsmem"]
    if spec.get("narrowsmem"):   # the narrow kernels' shared memory where the tree's storage differs
        variants.NARROW_SHARED_BYTES = {**variants.NARROW_SHARED_BYTES,
                                        **{(rows, kv): size for rows, kv, size in spec["narrowsmem"]}}
    if spec.get("fp8box"):   # every swizzled FP8 cache map: boxes of COLS one-byte columns, SWIZZLE bytes
        cols, swizzle = spec["fp8box"]
        shipped_map = launch.kv_tensor_map

        def kv_tensor_map(ptr, shape, strides, dtype, box_tokens, swizzle_bytes, whole_rows=False):
            if dtype.itemsize != 1 or not swizzle_bytes:
                return shipped_map(ptr, shape, strides, dtype, box_tokens, swizzle_bytes, whole_rows)
            return launch._tensor_map_4d(ptr, shape, strides, dtype, (cols, 1, box_tokens, 1), swizzle,
                                         launch._OOB_FILL_ZERO, "k_cache", l2_promotion=launch._L2_PROMOTION_128B)
        launch.kv_tensor_map = kv_tensor_map
    if spec.get("l2promo") is not None:   # every cache map's L2 promotion (CU_TENSOR_MAP_L2_PROMOTION_*)
        shipped_encode = launch._tensor_map_4d

        def tensor_map_4d(*args, **kwargs):
            if args[-1] == "k_cache":
                kwargs["l2_promotion"] = spec["l2promo"]
            return shipped_encode(*args, **kwargs)
        launch._tensor_map_4d = tensor_map_4d
    if spec.get("maxparts"):
        _gpu_cases().cap_plan_parts(spec["maxparts"])
    variants._DEFINES = variants.defines_plus(*spec["defines"])
    compiler.compile_variant = noting_ptxas(compiler.compile_variant)


# "variant: note" for each of ptxas's notes that it serialised a kernel's wgmmas or added waits, in the
# kernels this child compiled. A kernel found in the build's cache is not compiled again: its notes came
# with the round that compiled it (the first, unless --cache-root already held the build).
PTXAS_NOTES: list[str] = []


def noting_ptxas(compile_variant):
    """compiler.compile_variant that keeps ptxas's performance notes (sass_diff.ptxas_warnings) in PTXAS_NOTES:
    a build whose wgmmas ptxas serialised times the serialisation, not the change (ab198: 20-50 % slower)."""
    _devtools()
    from sass_diff import ptxas_warnings

    def compile_and_note(variant):
        kernel = compile_variant(variant)
        PTXAS_NOTES.extend(f"{variant.name}: {note}" for note in ptxas_warnings(kernel.log or ""))
        return kernel
    return compile_and_note


def _devtools() -> None:
    if str(ROOT / "devtools") not in sys.path:
        sys.path.insert(0, str(ROOT / "devtools"))


def _gpu_cases():
    """devtools/gpu_cases.py by the name sanitize_cases.py, the other scripts and the tests import it by, so
    that one module holds its state (the reports `check` keeps) wherever apply() is called from."""
    _devtools()
    import gpu_cases

    return gpu_cases


def check_build(repeats: int = 1) -> tuple[list[str], dict]:
    """The build against the float64 reference on small random cases, `repeats` times with fresh data;
    the failures, as text, and the largest share of each bar the passing cases used (check_close's
    tolerance_used: a build that passes at 0.9 of a bar will fail on other data)."""
    import numpy as np

    from flashmla_cupy import reference

    cases = _gpu_cases()
    check, fresh_seed, run = cases.check, cases.fresh_seed, cases.run

    failures, used = [], {"out": 0.0, "lse": 0.0}
    for b, s_q, h_q, h_kv, seqlens, causal, dtype, kv in repeats * [
            (3, 1, 128, 1, [700, 0, 130], False, "bf16", None),
            (2, 2, 128, 1, [1300, 65], True, "bf16", None),               # 256 rows: four row tiles a part
            (5, 2, 16, 2, [64, 1, 3000, 0, 257], True, "fp16", None),    # 16 rows: the narrow kernel
            (6, 1, 64, 1, [64, 128, 191, 4000, 1, 65], False, "bf16", None),
            (4, 1, 16, 1, [1, 63, 2000, 0], False, "e4m3", "e4m3"),      # FP8, both query forms
            (3, 2, 16, 1, [70, 2500, 1], True, "e4m3", "e4m3"),          # FP8, 32 rows
            (3, 2, 64, 2, [65, 700, 129], True, "bf16", "e4m3"),
            (3, 2, 64, 1, [65, 700, 130], True, "e4m3", "e4m3"),        # FP8, 128 rows (ring=1: decode_ring.cu)
            (2, 1, 128, 1, [8192, 4097], False, "e4m3", "e4m3")]:       # FP8, long pieces
        seed = fresh_seed()
        case = reference.random_case(np.random.default_rng(seed), b, s_q, h_q, h_kv, np.array(seqlens), dtype,
                                     causal=causal, kv_dtype=kv)
        try:
            report = check(case, *run(case), seed, "kernel_ab")
        except AssertionError as exc:
            failures.append(f"b={b} s_q={s_q} h_q={h_q} h_kv={h_kv} q {dtype} cache {kv or dtype}: {str(exc)[:400]}")
            continue
        for bar in used:
            used[bar] = max(used[bar], report[f"{bar}_tolerance_used"])
    return failures, used


def child(spec: dict, cases: str, dtypes: str, checks: int, eager: bool = False) -> dict:
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    apply(spec)
    import torch

    import bench
    import bench_cases

    failures, used = check_build(checks)
    nvrtc = nvrtc_here()
    if spec.get("cubins"):   # the NVRTC that wrote them (--write-cubins), not this process's
        written = pathlib.Path(spec["cubins"]) / "NVRTC"
        nvrtc = f"{written.read_text().strip() if written.is_file() else 'unknown'} (cubins from {spec['cubins']})"
    result = {"card": torch.cuda.get_device_name(), "nvrtc": nvrtc, "failures": failures, "tolerance_used": used,
              "us": {}}
    timer = bench.Timer(torch)
    for case in bench_cases.select(cases, dtypes.split(",")):
        inputs = table_of(spec, bench.make_inputs(torch, case, seed=1))
        call = bench.ours(torch, case, inputs)
        replay = bench.captured(torch, call)
        result["us"][f"{case.id}-{case.dtype}"] = timer.us(replay)
        if eager:   # the same call launched from the host: a cost of graph replay alone shows as a gap
            result["us"][f"{case.id}-{case.dtype}-eager"] = timer.us(call)
        del inputs, call, replay
        torch.cuda.empty_cache()
    result["ptxas_notes"] = sorted(set(PTXAS_NOTES))
    return result


def spread_of(row: dict) -> float:
    """How far one case's rounds spread apart within a build, the widest over the builds: largest / smallest
    - 1 (the long cells at the power cap spread by up to ~15 % between rounds of identical builds)."""
    return max((max(c["rounds_us"]) / min(c["rounds_us"]) - 1 for c in row.values() if min(c["rounds_us"]) > 0),
               default=0.0)


def table_of(spec: dict, inputs):
    """The timed case's inputs with the variant's block table: as bench.py makes it (distinct pages in
    random order), `seq` (each request's pages consecutive in the cache, requests one after another) or
    `fold:N` (every entry taken modulo N: N blocks, which stay in L2 for small N)."""
    import dataclasses

    import torch

    table = spec.get("table")
    if not table:
        return inputs
    rows, width = inputs.block_table.shape
    if table == "seq":
        block_table = torch.arange(rows * width, dtype=torch.int32, device="cuda").view(rows, width)
    else:
        block_table = inputs.block_table % int(table.split(":")[1])
    return dataclasses.replace(inputs, block_table=block_table)


# ---- parent: take turns, then compare --------------------------------------------------------------

def run_child(spec: dict, args) -> dict:
    env = dict(os.environ, FLASHMLA_CUPY_CACHE_DIR=os.path.join(args.cache_root, spec["name"]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if spec.get("nvrtc"):
        _devtools()
        from sass_diff import preload_nvrtc

        preload_nvrtc(env, spec["nvrtc"])
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--cases", args.cases,
                           "--dtype", args.dtype, "--checks", str(args.checks)] + ["--eager"] * args.eager,
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:   # without CuPy's module-unload complaints and torch's event-destructor
        # warnings at a failed child's exit (after a sticky CUDA error they filled the 2000 characters kept)
        noise = ("moduleUnload", "check_status", "'NoneType' object is not callable", "Module.__dealloc__",
                 "Warning: CUDA warning")
        lines = [line for line in (done.stderr or done.stdout).splitlines() if not any(n in line for n in noise)]
        return {"error": "\n".join(line for line in lines if line != "Traceback (most recent call last):")[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=[], help="NAME: ITEM ... (see above)")
    parser.add_argument("--cases", default="issue", help="scripts/bench.py's case selection (default: issue)")
    parser.add_argument("--dtype", default="bf16", help="comma-separated dtypes (default: bf16)")
    parser.add_argument("--rounds", type=int, default=2, help="turns each build takes (default: 2)")
    parser.add_argument("--checks", type=int, default=1,
                        help="times each turn checks the build on the eight random cases (default: 1)")
    parser.add_argument("--eager", action="store_true",
                        help="also time each case's calls launched eagerly (rows named CASE-eager)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--cache-root", default="/tmp/kernel_ab_cache", help="one kernel cache per build below it")
    parser.add_argument("--write-cubins", metavar="DIR",
                        help="compile every variant with this process's NVRTC into DIR (for cubins=DIR) and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_cubins:
        return write_cubins(pathlib.Path(args.write_cubins))
    if args.child:
        print(json.dumps(child(json.loads(args.child), args.cases, args.dtype, args.checks, args.eager)))
        return 0

    builds = [{"name": BASE, "defines": [], "tree": None, "smem": None}] + [parse_variant(v) for v in args.variant]
    for build in builds:
        if build.get("patch"):
            apply_patch(build, args.cache_root)
    runs = {b["name"]: [] for b in builds}
    for round_ in range(args.rounds):
        for build in builds:
            result = run_child(build, args)
            runs[build["name"]].append(result)
            state = "error" if "error" in result else ("WRONG" if result["failures"] else
                                                       "exact" if args.checks else "not checked (--checks 0)")
            if "tolerance_used" in result and args.checks:
                state += " (bars used: out {out:.2f}, lse {lse:.2f})".format(**result["tolerance_used"])
            if "nvrtc" in result:
                state += f", NVRTC {result['nvrtc']}"
            if result.get("ptxas_notes"):
                state += f"; ptxas serialised its wgmmas or added waits ({len(result['ptxas_notes'])} notes): it times that"
            print(f"round {round_ + 1} {build['name']}: {state}", flush=True)
            if result.get("us"):  # each turn's times as they come, so that a run cut short still says them
                print("  " + ", ".join(f"{case} {us:.1f}" for case, us in result["us"].items()), flush=True)
            for note in result.get("ptxas_notes", []):
                print(f"  ptxas: {note}", flush=True)
            if "error" in result:
                print(result["error"], file=sys.stderr)

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench

    cards = {r["card"] for results in runs.values() for r in results if "card" in r}
    report = {"card": ", ".join(sorted(cards)) or "unknown", "driver": bench.driver_version(), "commit": bench.commit(),
              "how": "per build a child process per round, rounds interleaved; CUDA-graph replay, L2 flushed, "
                     "CUDA-event median; median over rounds",
              "builds": builds, "cases": {}, "spread": {}, "exact": {}, "tolerance_used": {}, "errors": {}, "nvrtc": {},
              "ptxas_notes": {}}
    for name, results in runs.items():
        report["nvrtc"][name] = sorted({r["nvrtc"] for r in results if "nvrtc" in r})
        report["ptxas_notes"][name] = sorted({n for r in results for n in r.get("ptxas_notes", [])})
        report["exact"][name] = all("error" not in r and not r["failures"] for r in results)
        report["tolerance_used"][name] = {bar: max((r["tolerance_used"][bar] for r in results if "tolerance_used" in r),
                                                   default=None) for bar in ("out", "lse")}
        report["errors"][name] = [r.get("error") or r["failures"] for r in results if r.get("error") or r["failures"]]
    case_ids = [c for r in runs[BASE] if "us" in r for c in r["us"]]
    for case_id in dict.fromkeys(case_ids):
        row = {}
        for name, results in runs.items():
            times = [r["us"][case_id] for r in results if case_id in r.get("us", {})]
            if times:
                row[name] = {"median_us": statistics.median(times), "rounds_us": times}
        base = row.get(BASE, {}).get("median_us")
        for name, cell in row.items():
            cell["over_shipped"] = cell["median_us"] / base if base else None
        report["cases"][case_id] = row
        report["spread"][case_id] = spread_of(row)

    names = list(runs)
    print(f"\n{'case':32s}" + "".join(f"{n:>22s}" for n in names) + f"{'spread':>9s}")
    for case_id, row in report["cases"].items():
        cells = [f"{row[n]['median_us']:9.1f} us ({row[n]['over_shipped']:.3f})" if n in row else "-" for n in names]
        print(f"{case_id:32s}" + "".join(f"{c:>22s}" for c in cells) + f"{100 * report['spread'][case_id]:8.1f}%")
    print("spread: the widest of any build's rounds on the case (largest / smallest - 1); a ratio inside it is noise")
    if args.checks:
        print("exact: " + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in report["exact"].items()))
    else:
        report["exact"] = {name: None for name in report["exact"]}  # nothing was checked: no verdict
        print("exact: not checked (--checks 0)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if all(ok is not False for ok in report["exact"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
