"""How far two kernels_src trees' builds of one variant differ in SASS, the page loop apart. No GPU.

ptxas schedules and allocates registers for the whole kernel at once, so a change meant for the epilogue
can move every instruction of the page loop, and the loop's speed with it: the fp16 partial rows
(a33c3db) left the loop's opcodes in count but not in order, and that build was 1.7-6 % slower on cells
where the new code never ran (docs/PERF_NOTES.md, thirty-eighth session). Run this before spending device
time on an epilogue change: a loop that matches the shipped one instruction for instruction should time
like it. Each loop that issues wgmmas is listed with how its descriptors are advanced (decode.cu's edge pair
loops once took ~9 instructions a wgmma for it, against 3 in the steady ones, and ran ~12 % slower a page).

    python devtools/sass_diff.py decode_bf16 kernels_src /tmp/candidate/kernels_src
    python devtools/sass_diff.py decode_ring_e4m3_kv_e4m3 A B --set-b RING_SHARED_BYTES=223232
    python devtools/sass_diff.py decode_bf16 A B --root-a /tmp/old-checkout --nvrtc LIB
    python devtools/sass_diff.py --dump decode_ring_e4m3_kv_e4m3 kernels_src . out.json -lineinfo

The SASS depends on the NVRTC version: the device image's is 13.0.88, this machine's venv may hold
another. `--nvrtc` preloads a libnvrtc.so.13 for both builds (the nvidia-cuda-nvrtc==13.0.88 wheel,
unzipped, has it under nvidia/cu13/lib). Each side compiles in its own process with the package imported
from --root-a / --root-b (default: this checkout; a tree whose params.cuh differs from params.py needs its
own checkout, NVRTC 13.5 checks their layouts against each other), after --set-a / --set-b have set
constants of flashmla_cupy.variants (the shared memory sizes the kernels pin), with --option-a / --option-b's
extra NVRTC options (a define, ptxas's own through -Xptxas=..., or -lineinfo, after which `nvdisasm
--print-line-info` on the cubin names each instruction's source line). `--dump VARIANT TREE ROOT OUT
[SETTING ...]` writes one build's instructions as JSON (the child each side runs).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
INSTRUCTION = re.compile(r"(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)\s*([^;]*);")


def cuobjdump() -> str | None:
    """cuobjdump from an nvidia-*-cuobjdump wheel (the test extra), else from PATH; None if neither.
    tests/test_compile.py's SASS checks use it too."""
    import shutil
    import site

    for root in (pathlib.Path(p) for p in sys.path + site.getsitepackages() if p):
        found = sorted(root.glob("nvidia/*/bin/cuobjdump"))
        if found:
            return str(found[0])
    return shutil.which("cuobjdump")


def preload_nvrtc(env: dict, library: str) -> dict:
    """`env` for a process that compiles with `library` (a libnvrtc.so) instead of its own: preloaded,
    CuPy's dlopen of libnvrtc finds it; its builtins library lies beside it. kernel_ab.py's nvrtc= too."""
    library = str(pathlib.Path(library).resolve())
    env["LD_PRELOAD"] = library
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [os.path.dirname(library), env.get("LD_LIBRARY_PATH")]))
    return env


def apply_settings(variants, settings: list[str]) -> None:
    """A build's --set (NAME=VALUE: a constant of flashmla_cupy.variants) and --option (an extra NVRTC option,
    after each element type's defines, as kernel_ab's -D / -Xptxas= items) settings."""
    options = [setting for setting in settings if setting.startswith("-")]
    for setting in settings:
        if not setting.startswith("-"):
            name, value = setting.split("=", 1)
            setattr(variants, name, int(value))
    if options:
        variants._DEFINES = variants.defines_plus(*options)


def dump(variant_name: str, tree: str, root: str, settings: list[str], out: str) -> None:
    """Child: compile one variant from `tree` with the package at `root`; write its instructions as JSON."""
    sys.path.insert(0, root)
    from flashmla_cupy import compiler, install, variants

    compiler.kernels_dir = lambda: pathlib.Path(tree).resolve()
    apply_settings(variants, settings)
    chosen = [v for v in variants.all_variants() if v.name == variant_name]
    if not chosen:
        raise SystemExit(f"no variant {variant_name!r}: {[v.name for v in variants.all_variants()]}")
    kernel = compiler.compile_variant(chosen[0])
    pathlib.Path(out).write_text(json.dumps({
        "nvrtc": list(install.nvrtc().getVersion()), "registers": kernel.registers,
        "spills": [kernel.spill_stores, kernel.spill_loads], "warnings": ptxas_warnings(kernel.log),
        "instructions": instructions_of(kernel.cubin)}))


def instructions_of(cubin: bytes) -> list[list[str]]:
    """A cubin's SASS as [opcode, operands] pairs (a predicate goes with the operands), in address order."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        tool = cuobjdump()
        if tool is None:
            raise SystemExit("cuobjdump not found: install the test extra (nvidia-cuda-cuobjdump)")
        sass = subprocess.run([tool, "-sass", file.name], capture_output=True, text=True, check=True).stdout
    instructions = []
    for line in sass.splitlines():
        match = INSTRUCTION.match(re.sub(r"/\*[0-9a-f]{4,}\*/", "", line).strip())
        if match:
            instructions.append([match.group(2), ((match.group(1) or "") + match.group(3)).strip()])
    return instructions


def ptxas_warnings(log: str) -> list[str]:
    """ptxas's notes that it serialised the wgmmas or added waits (C7510-C7520): a build with one runs
    its page loop far slower whatever else it changes (the forty-third session's split PV, ab198: 20-50 %),
    so it is not worth device time. tests/test_compile.py keeps the shipped variants free of them."""
    return [line.split(":", 1)[-1].strip() for line in log.splitlines()
            if "Potential Performance Loss" in line or "wait_group is injected" in line]


def page_loop(instructions: list) -> tuple[int, int] | None:
    """The span from the first to the last HGMMA: the page loop and what lies between its wgmmas (None
    where there is no wgmma: the combine, the scheduler)."""
    at = [i for i, (opcode, _) in enumerate(instructions) if opcode.startswith("HGMMA")]
    return (at[0], at[-1] + 1) if at else None


def wgmma_loops(instructions: list) -> list[tuple[int, int]]:
    """The loops that issue wgmmas, as (first, last + 1) instruction indices: each backward branch whose span
    holds an HGMMA (a kernel's instructions are 16 bytes each from address 0, so a target is index * 16).
    decode.cu has four: each warpgroup's steady pair loop, then its edge pair loop."""
    spans = []
    for i, (opcode, operands) in enumerate(instructions):
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) // 16 <= i:
            first = int(target.group(1), 16) // 16
            if any(op.startswith("HGMMA") for op, _ in instructions[first:i + 1]):
                spans.append((first, i + 1))
    # the outermost loops (the piece and part loops) hold the others: keep the innermost
    return [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]


def descriptor_counts(loop: list) -> dict[str, int]:
    """How a loop's wgmma descriptors are advanced: its HGMMAs, and the UIADD3.64 (one a descriptor at best),
    carries (UIADD3.X) and moves (UMOV, of the constant high word) among its instructions; a carry chain and
    moves cost up to 9 instructions a wgmma (forty-eighth session)."""
    count = {"HGMMA": sum(1 for op, _ in loop if op.startswith("HGMMA"))}
    count.update({name: sum(1 for op, _ in loop if op == name) for name in ("UIADD3.64", "UIADD3.X", "UMOV")})
    return count


def descriptor_ops(loop: list) -> str:
    return ", ".join(f"{n} {name}" for name, n in descriptor_counts(loop).items())


def matching(a: list, b: list) -> int:
    return sum(block.size for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())


def main() -> None:
    if sys.argv[1:2] == ["--dump"]:   # a child: VARIANT TREE ROOT OUT [NAME=VALUE ...]
        variant, tree, root, out, *settings = sys.argv[2:]
        dump(variant, tree, root, settings, out)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", help="a variant name, e.g. decode_bf16")
    parser.add_argument("tree_a")
    parser.add_argument("tree_b")
    parser.add_argument("--root-a", default=str(REPO), help="the checkout whose flashmla_cupy builds tree_a")
    parser.add_argument("--root-b", default=str(REPO))
    parser.add_argument("--set-a", action="append", default=[], metavar="NAME=VALUE",
                        help="a flashmla_cupy.variants constant for tree_a's build")
    parser.add_argument("--set-b", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--option-a", action="append", default=[], metavar="OPTION",
                        help="an extra NVRTC option for tree_a's build (-DNAME=VALUE, -Xptxas=...)")
    parser.add_argument("--option-b", action="append", default=[], metavar="OPTION")
    parser.add_argument("--nvrtc", help="a libnvrtc.so.13 to compile both with (preloaded)")
    args = parser.parse_args()

    env = preload_nvrtc(dict(os.environ), args.nvrtc) if args.nvrtc else dict(os.environ)
    builds = []
    with tempfile.TemporaryDirectory() as scratch:
        for side, tree, root, settings in (("a", args.tree_a, args.root_a, args.set_a + args.option_a),
                                           ("b", args.tree_b, args.root_b, args.set_b + args.option_b)):
            out = pathlib.Path(scratch) / f"{side}.json"
            command = [sys.executable, __file__, "--dump", args.variant, tree, root, str(out), *settings]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"building {tree} failed:\n{done.stderr.strip()[-3000:]}")
            builds.append(json.loads(out.read_text()))
    a, b = builds
    print(f"{args.variant}, NVRTC {'.'.join(map(str, a['nvrtc']))}")
    for label, build, tree in (("a", a, args.tree_a), ("b", b, args.tree_b)):
        span = page_loop(build["instructions"])
        loop = f", page loop {span[1] - span[0]} ({span[0]}-{span[1]})" if span else ""
        print(f"  {label}: {tree}: {build['registers']} registers, spills {build['spills']}, "
              f"{len(build['instructions'])} instructions{loop}")
        for warning in build.get("warnings", []):
            print(f"  {label}: ptxas: {warning}")
    span_a, span_b = page_loop(a["instructions"]), page_loop(b["instructions"])
    if span_a and span_b:
        loop_a, loop_b = a["instructions"][slice(*span_a)], b["instructions"][slice(*span_b)]
        same_opcodes = matching([op for op, _ in loop_a], [op for op, _ in loop_b])
        same_whole = matching([" ".join(i) for i in loop_a], [" ".join(i) for i in loop_b])
        print(f"  page loop: {same_opcodes} of {len(loop_a)} / {len(loop_b)} in order by opcode, {same_whole} "
              f"instruction for instruction{' (identical)' if loop_a == loop_b else ''}")
    loops_a, loops_b = wgmma_loops(a["instructions"]), wgmma_loops(b["instructions"])
    for k in range(max(len(loops_a), len(loops_b))):
        line = []
        for build, loops in ((a, loops_a), (b, loops_b)):
            if k < len(loops):
                first, end = loops[k]
                line.append(f"{end - first} ({descriptor_ops(build['instructions'][first:end])})")
            else:
                line.append("-")
        same = ""
        if k < min(len(loops_a), len(loops_b)):
            body = [[" ".join(i) for i in build["instructions"][slice(*loops[k])]]
                    for build, loops in ((a, loops_a), (b, loops_b))]
            # branch targets differ wherever code before the loop moved: compare the rest
            same = " identical" if [re.sub(r"0x[0-9a-f]+", "", i) for i in body[0]] == \
                [re.sub(r"0x[0-9a-f]+", "", i) for i in body[1]] else ""
        print(f"  wgmma loop {k}: {line[0]} / {line[1]}{same}")
    whole = matching([" ".join(i) for i in a["instructions"]], [" ".join(i) for i in b["instructions"]])
    print(f"  whole kernel: {whole} of {len(a['instructions'])} / {len(b['instructions'])} instruction for instruction")


if __name__ == "__main__":
    main()
