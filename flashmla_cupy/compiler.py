"""NVRTC: header discovery, compile flags, and `compile_variant(v) -> CompiledKernel`.

Nothing here needs a GPU or a driver: NVRTC turns CUDA C++ into an sm_90a cubin on any machine, so
every variant can be compiled and its registers and spills checked in CPU-only CI. We call NVRTC
ourselves (cupy.cuda.nvrtc) rather than through cupy.RawModule(code=...), which needs a device even to
compile, forces -ftz and puts CuPy's own bundled CCCL ahead of the wheel the CUTLASS headers expect.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import pathlib
import re
from dataclasses import dataclass

from . import cubin as cubin_image
from . import errors, install, params
from .errors import MissingDependencyError
from .variants import Variant

# Hopper with the arch-specific features (wgmma, setmaxnreg); sm_90a cubins run only on sm_90.
ARCH = "sm_90a"
BASE_OPTIONS = (
    f"-arch={ARCH}",
    "-std=c++17",
    "-default-device",   # CUTLASS under NVRTC needs its constexpr helpers treated as device code
    "-DNDEBUG",
    "-Xptxas=-v",        # ptxas's resource report in the log: diagnostic only (see compile_variant)
)
# CUTLASS 4.2's headers stop compiling against CCCL 3.2 (the nvidia-cuda-cccl 13.2 wheel).
_CCCL_FIRST_INCOMPATIBLE = (3, 2)


@dataclass(frozen=True)
class CompiledKernel:
    """A compiled variant: the loadable cubin and its kernel's resources.

    Registers, stack and static shared memory are read from the cubin; spill bytes only exist in
    ptxas's report in the log, which NVRTC 13.0 sometimes leaves empty: then they are None. A spill
    needs a stack frame, so `stack_bytes == 0` alone proves there is none."""

    variant: Variant
    cubin: bytes
    log: str
    registers: int
    spill_stores: int | None
    spill_loads: int | None
    stack_bytes: int
    smem_static: int

    @property
    def spills(self) -> bool:
        """True when the kernel uses local memory for spills (or any stack frame at all)."""
        return self.stack_bytes > 0 or bool(self.spill_stores) or bool(self.spill_loads)


@dataclass(frozen=True)
class HeaderDirs:
    """Include directories found in the installed wheels (or a CUDA toolkit)."""

    cutlass: pathlib.Path        # holds cute/ and cutlass/
    cccl: tuple[pathlib.Path, ...]
    cudart: pathlib.Path         # cuda_runtime_api.h, cuda_bf16.h, cuda_fp16.h


def kernels_dir() -> pathlib.Path:
    """kernels_src/: inside the installed package, else next to the package in a source checkout."""
    package = pathlib.Path(__file__).resolve().parent
    for candidate in (package / "kernels_src", package.parent / "kernels_src"):
        if (candidate / "params.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"flashmla_cupy: kernel sources not found in {package / 'kernels_src'} or "
        f"{package.parent / 'kernels_src'}; the installation is incomplete (reinstall the package)"
    )


def _missing_headers(what: str, fix: str) -> MissingDependencyError:
    return MissingDependencyError(f"the {what} headers were not found: {fix}")


@functools.lru_cache(maxsize=None)
def header_dirs() -> HeaderDirs:
    """Locate the CUTLASS, CCCL and CUDA runtime headers for CUDA 12 and CUDA 13 wheel layouts."""
    spec = importlib.util.find_spec("cutlass_library")
    cutlass = pathlib.Path(spec.origin).parent / "source" / "include" if spec and spec.origin else None
    if cutlass is None or not (cutlass / "cute" / "tensor.hpp").is_file():
        raise _missing_headers("CUTLASS/CuTe", "pip install nvidia-cutlass==4.2.0.0 (a dependency of flashmla-cupy)")

    from cuda import pathfinder  # comes with cuda-bindings; knows wheels, conda and toolkits

    cccl_dir = pathfinder.find_nvidia_header_directory("cccl")
    if not cccl_dir or not (pathlib.Path(cccl_dir) / "cuda" / "std" / "__cccl" / "version.h").is_file():
        raise _missing_headers("CCCL (cuda/std)", install.requirement("cccl"))
    cccl_dir = pathlib.Path(cccl_dir)
    # CUDA 13 puts CCCL in .../include/cccl and CUTLASS then includes <cccl/cuda/std/...>, so the
    # parent must be searched too; the CUDA 12 wheel's .../cuda_cccl/include needs only itself.
    cccl = (cccl_dir, cccl_dir.parent) if cccl_dir.name == "cccl" else (cccl_dir,)

    cudart = pathfinder.find_nvidia_header_directory("cudart")
    if not cudart or not (pathlib.Path(cudart) / "cuda_bf16.h").is_file():
        raise _missing_headers("CUDA runtime", install.requirement("runtime"))
    return HeaderDirs(cutlass=cutlass, cccl=cccl, cudart=pathlib.Path(cudart))


def _define_value(header: pathlib.Path, macro: str) -> int:
    match = re.search(rf"#\s*define\s+{macro}\s+(\d+)", header.read_text(errors="replace"))
    if match is None:
        raise ValueError(f"{macro} not defined in {header}")
    return int(match.group(1))


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=None)
def header_versions() -> dict[str, str]:
    """Versions of every header set a program can include; part of the cache key."""
    dirs = header_dirs()
    cutlass_h = dirs.cutlass / "cutlass" / "version.h"
    cutlass = _dist_version("nvidia-cutlass") or ".".join(
        str(_define_value(cutlass_h, f"CUTLASS_{part}")) for part in ("MAJOR", "MINOR", "PATCH")
    )
    cccl = _define_value(dirs.cccl[0] / "cuda" / "std" / "__cccl" / "version.h", "CCCL_VERSION")
    cudart = _define_value(dirs.cudart / "cuda_runtime_api.h", "CUDART_VERSION")
    return {
        "cutlass": cutlass,
        "cccl": f"{cccl // 1000000}.{cccl // 1000 % 1000}.{cccl % 1000}",
        "cudart": f"{cudart // 1000}.{cudart % 1000 // 10}",
    }


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    """NVRTC's major.minor, plus the wheel's full version when NVRTC came from a wheel."""
    major, minor = install.nvrtc().getVersion()
    wheel = _dist_version("nvidia-cuda-nvrtc", "nvidia-cuda-nvrtc-cu12")
    return f"{major}.{minor}" + (f" (wheel {wheel})" if wheel else "")


def include_dirs(variant: Variant) -> dict[pathlib.Path, str]:
    """The include directories of a variant's compile in search order, each with the role it plays
    ("cutlass", "cccl", "cccl/..", "cudart", "kernels_src"). The cache key names a directory by its
    role, never by its path, so that every install with the same versions shares cache entries."""
    dirs = header_dirs()
    found = [("cutlass", dirs.cutlass)] if variant.uses_cute else []
    found += zip(("cccl", "cccl/.."), dirs.cccl)
    found += [("cudart", dirs.cudart), ("kernels_src", kernels_dir())]
    ordered: dict[pathlib.Path, str] = {}
    for role, path in found:   # under CUDA 13 the CCCL parent is the runtime dir: searched once
        ordered.setdefault(path, role)
    return ordered


def compile_options(variant: Variant) -> list[str]:
    """The full NVRTC option list for a variant."""
    return [*BASE_OPTIONS, *variant.defines, *(f"-I{path}" for path in include_dirs(variant))]


def key_options(variant: Variant) -> list[str]:
    """The options as the cache key sees them: include directories by role, not by path (their
    contents are keyed by the header versions and the kernel sources)."""
    return [*BASE_OPTIONS, *variant.defines, *(f"-I<{role}>" for role in include_dirs(variant).values())]


def program_source(variant: Variant) -> str:
    """kernels_src/<program>.cu followed by static_asserts pinning the C++ side to the Python side:
    the parameter-struct layouts (params.py) and the variant's pinned constants (variants.py)."""
    path = kernels_dir() / f"{variant.program}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"flashmla_cupy: kernel source {path} is missing")
    # Each #line makes a failed assert read "params_layout_asserts(N): error: ...", not a line of
    # <program>.cu that does not exist.
    parts = [path.read_text(), '#line 1 "params_layout_asserts"', params.layout_asserts()]
    if variant.program in params.OWN_STRUCTS:   # structs a program defines beside params.cuh's
        parts.append(params.layout_asserts(params.OWN_STRUCTS[variant.program]))
    if variant.pinned_constants:
        parts.append('#line 1 "variant_asserts"')
        parts += [f'static_assert({name} == {value}, "{name} differs from flashmla_cupy/variants.py");'
                  for name, value in variant.pinned_constants.items()]
    return "\n".join(parts) + "\n"


def compile_variant(variant: Variant) -> CompiledKernel:
    """Compile one variant to a cubin; raise errors.CompileError with the log if NVRTC fails."""
    nvrtc = install.nvrtc()
    options = compile_options(variant)
    source = program_source(variant)
    prog = nvrtc.createProgram(source, f"{variant.program}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            log = _with_hints(variant, nvrtc.getProgramLog(prog))
            raise errors.CompileError(variant.name, options, log) from None
        log = nvrtc.getProgramLog(prog)
        image = cubin_image.complete(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
    # The cubin is the authority; the log may be empty even for a good compile (NVRTC 13.0).
    try:
        resources = cubin_image.kernel_resources(image, variant.kernel_name)
    except cubin_image.CubinError as exc:
        raise errors.CompileError(
            variant.name, options,
            f'kernel {variant.kernel_name} not found in the compiled program ({exc}): it must be declared '
            f'extern "C" __global__ in {variant.program}.cu\n{log}',
        ) from None
    report = parse_ptxas_report(log, variant.kernel_name) or {}
    return CompiledKernel(variant, image, log, registers=resources.registers,
                          spill_stores=report.get("spill_stores"), spill_loads=report.get("spill_loads"),
                          stack_bytes=resources.stack_bytes, smem_static=resources.smem_static)


def _with_hints(variant: Variant, log: str) -> str:
    """Prefix the log with the known cause when the installed headers are a bad combination."""
    cccl = tuple(int(x) for x in header_versions()["cccl"].split(".")[:2])
    if variant.uses_cute and cccl >= _CCCL_FIRST_INCOMPATIBLE:
        return (
            f"hint: CCCL {header_versions()['cccl']} is installed; CUTLASS 4.2 needs CCCL < 3.2 "
            f"(pip install 'nvidia-cuda-cccl<13.2')\n{log}"
        )
    return log


# The resource fields of a CompiledKernel: warm-up's report and the cache manifest hold these.
REPORT_FIELDS = ("registers", "spill_stores", "spill_loads", "stack_bytes", "smem_static")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_report(log: str, kernel_name: str) -> dict[str, int] | None:
    """Registers, spills, stack and static smem of one entry function from a `-Xptxas=-v` log
    (only the spill counts are used: the rest comes from the cubin).

    ptxas prints one block per entry function, starting at "Compiling entry function 'name'"; the
    stack/spill line counted is the one under "Function properties for name", so lines of device
    callees and other kernels are ignored. None when the kernel is absent.
    """
    report = None
    in_block = props_of_kernel = False
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            in_block = entry.group(1) == kernel_name
            if in_block:
                report = dict.fromkeys(REPORT_FIELDS, 0)
            continue
        if not in_block:
            continue
        props = _PROPS.search(line)
        if props:
            props_of_kernel = props.group(1) == kernel_name
            continue
        frame = _FRAME.search(line)
        if frame and props_of_kernel:
            report["stack_bytes"], report["spill_stores"], report["spill_loads"] = map(int, frame.groups())
        used = _USED.search(line)
        if used:
            report["registers"] = int(used.group(1))
            report["smem_static"] = int(used.group(2) or 0)
    return report
