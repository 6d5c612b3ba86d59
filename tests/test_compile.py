"""Every kernel variant compiles for sm_90a with NVRTC, without spills, on a machine with no GPU.

These use the real kernel sources and the real NVRTC; the cache tests use a stand-in compiler instead.
"""
from __future__ import annotations

import ctypes
import math
import pathlib
import re
import shutil

import pytest

from flashmla_cupy import compiler, errors, inputs, params, variants
from sass_diff import cuobjdump as _cuobjdump  # devtools/: one finder of cuobjdump

REAL_KERNELS = pathlib.Path(__file__).resolve().parents[1] / "kernels_src"


@pytest.fixture(scope="module")
def compiled():
    """Every variant compiled once for this module: {name: CompiledKernel}."""
    return {v.name: compiler.compile_variant(v) for v in variants.all_variants()}


@pytest.mark.parametrize("variant", variants.all_variants(), ids=lambda v: v.name)
def test_variant_compiles_without_spills(variant, compiled):
    kernel = compiled[variant.name]
    assert kernel.cubin.startswith(b"\x7fELF")
    assert variant.kernel_name.encode() in kernel.cubin
    assert kernel.registers > 0, kernel.log
    assert (kernel.spill_stores, kernel.spill_loads) == (0, 0), kernel.log
    assert kernel.stack_bytes == 0, kernel.log
    assert not kernel.spills


@pytest.mark.parametrize("variant", variants.all_variants(), ids=lambda v: v.name)
def test_cubin_resources_agree_with_ptxas(variant, compiled):
    """Registers, stack and static smem read from the cubin equal ptxas's own report (when present)."""
    kernel = compiled[variant.name]
    report = compiler.parse_ptxas_report(kernel.log, variant.kernel_name)
    assert report is not None, kernel.log
    assert (kernel.registers, kernel.stack_bytes, kernel.smem_static) == (
        report["registers"], report["stack_bytes"], report["smem_static"])


@pytest.mark.parametrize("variant", variants.all_variants(), ids=lambda v: v.name)
def test_compiles_when_nvrtc_returns_an_empty_log(variant, monkeypatch):
    """NVRTC 13.0 sometimes returns an empty program log for a good compile (seen on the H200 in
    fresh processes): the resources come from the cubin, so the compile still succeeds."""
    from cupy.cuda import nvrtc

    monkeypatch.setattr(nvrtc, "getProgramLog", lambda prog: "")
    kernel = compiler.compile_variant(variant)
    assert kernel.log == ""
    assert kernel.registers > 0 and kernel.stack_bytes == 0
    assert kernel.spill_stores is None and kernel.spill_loads is None
    assert not kernel.spills


def test_stack_frame_counts_as_spilling(tmp_path, monkeypatch):
    """A kernel that needs local memory is reported from the cubin's frame size, log or no log."""
    from cupy.cuda import nvrtc

    # Indexed by run-time values, so that the array needs a stack frame (ptxas 12.9 keeps a small
    # array indexed by loop constants in registers).
    source = (
        'extern "C" __global__ void flashmla_scheduler(flashmla::SchedulerParams p) {\n'
        '  volatile int local[1024];\n'
        '  for (int i = 0; i < p.batch; ++i) local[(i * p.num_parts) & 1023] = p.seqlens[i];\n'
        '  p.num_splits[0] = local[p.batch & 1023];\n'
        '}\n')
    kernels = _kernels_with(tmp_path, source)
    monkeypatch.setattr(compiler, "kernels_dir", lambda: kernels)
    monkeypatch.setattr(nvrtc, "getProgramLog", lambda prog: "")
    kernel = compiler.compile_variant(variants.scheduler_variant())
    assert kernel.stack_bytes >= 1024 * 4 and kernel.spills


def test_cubin_is_byte_exact():
    """cupy's getCUBIN may drop the final NUL byte; the stored cubin must equal NVRTC's full image."""
    from cuda.bindings import nvrtc

    variant = variants.scheduler_variant()
    ours = compiler.compile_variant(variant).cubin
    options = [o.encode() for o in compiler.compile_options(variant)]
    _, prog = nvrtc.nvrtcCreateProgram(compiler.program_source(variant).encode(), b"scheduler.cu", 0, [], [])
    (status,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
    assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    full = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, full)
    nvrtc.nvrtcDestroyProgram(prog)
    assert ours == full


def test_only_decode_gets_the_cutlass_headers():
    cutlass = f"-I{compiler.header_dirs().cutlass}"
    assert cutlass in compiler.compile_options(variants.decode_variant("bf16"))
    assert cutlass not in compiler.compile_options(variants.scheduler_variant())
    assert "-DFLASHMLA_FP16=1" in compiler.compile_options(variants.combine_variant("fp16"))


def test_drifted_params_struct_fails_compilation(monkeypatch):
    """A field added on the Python side only must stop compilation, naming the struct."""

    # The real one plus a field params.cuh does not have; 8 bytes, so that the size changes whatever the
    # struct's tail padding (where NVRTC cannot check offsets, sizes are all that is checked).
    class SchedulerParams(ctypes.Structure):
        _fields_ = [*params.SchedulerParams._fields_, ("added_in_python_only", ctypes.c_int64)]

    real_asserts = params.layout_asserts
    drifted = (SchedulerParams, params.DecodeParams, params.CombineParams)
    monkeypatch.setattr(params, "layout_asserts", lambda: real_asserts(drifted))
    with pytest.raises(errors.CompileError) as caught:
        compiler.compile_variant(variants.scheduler_variant())
    message = str(caught.value)
    assert "'scheduler'" in message
    assert "params_layout_asserts" in message and "SchedulerParams" in message


def test_fast_divisor_divides_exactly():
    """params.FastDivisor (the kernels' row / heads_per_group without an integer division) in the kernels'
    32-bit arithmetic: exact for every divisor a call can have and every dividend below 2^31 (query rows are
    at most inputs.MAX_QUERY_ROWS, rounded up to a tile)."""
    import numpy as np

    n = np.arange(0, inputs.MAX_QUERY_ROWS + 256, dtype=np.uint64)
    rng = np.random.default_rng(0)
    far = np.concatenate([rng.integers(0, 1 << 31, 4096, dtype=np.uint64), np.array([(1 << 31) - 1], np.uint64)])
    for d in [*range(1, 513), 576, 1000, 4096, 65535, 65536, 65537, inputs.MAX_QUERY_ROWS, (1 << 30) + 1, (1 << 31) - 1]:
        f = params.FastDivisor.of(d)
        assert 0 < f.multiplier < 1 << 32 and 0 <= f.shift <= 31
        for x in (n, far):
            q = ((((x * np.uint64(f.multiplier)) >> np.uint64(32)) + x) & np.uint64(0xFFFFFFFF)) >> np.uint64(f.shift)
            assert np.array_equal(q, x // np.uint64(d)), d
    with pytest.raises(ValueError):
        params.FastDivisor.of(0)


def test_pinned_constant_drift_fails_compilation(monkeypatch):
    """The launch's dynamic smem size (variants.py) must equal kSharedBytes in the decode program."""
    monkeypatch.setattr(variants, "DECODE_SHARED_BYTES", variants.DECODE_SHARED_BYTES - 1024)
    with pytest.raises(errors.CompileError, match="variant_asserts.*kSharedBytes"):
        compiler.compile_variant(variants.decode_variant("bf16"))


def _kernels_with(tmp_path: pathlib.Path, scheduler_body: str) -> pathlib.Path:
    """A kernels dir holding the real params.cuh and a stand-in scheduler.cu."""
    kernels = tmp_path / "kernels_src"
    kernels.mkdir()
    shutil.copy(REAL_KERNELS / "params.cuh", kernels)
    (kernels / "scheduler.cu").write_text('#include "params.cuh"\n' + scheduler_body)
    return kernels


def test_compile_error_names_variant_and_first_error(tmp_path, monkeypatch):
    source = (
        'extern "C" __global__ void flashmla_scheduler(flashmla::SchedulerParams p) {\n'
        "  int x = ;\n"
        "}\n"
    )
    kernels = _kernels_with(tmp_path, source)
    monkeypatch.setattr(compiler, "kernels_dir", lambda: kernels)
    with pytest.raises(errors.CompileError) as caught:
        compiler.compile_variant(variants.scheduler_variant())
    error = caught.value
    assert error.variant_name == "scheduler"
    assert "-arch=sm_90a" in error.flags
    first = str(error).splitlines()[1]
    assert "scheduler.cu(3): error: expected an expression" in first
    assert "1 error detected" in error.log


def test_missing_extern_c_kernel_is_a_compile_error(tmp_path, monkeypatch):
    source = '__global__ void flashmla_scheduler(flashmla::SchedulerParams p) {}\n'
    kernels = _kernels_with(tmp_path, source)
    monkeypatch.setattr(compiler, "kernels_dir", lambda: kernels)
    with pytest.raises(errors.CompileError, match='extern "C"'):
        compiler.compile_variant(variants.scheduler_variant())


def test_ptxas_report_is_read_for_the_named_kernel_only():
    log = "\n".join([
        "ptxas info    : Function properties for helper",
        "ptxas         .     48 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads",
        "ptxas info    : Compiling entry function 'flashmla_other' for 'sm_90a'",
        "ptxas info    : Function properties for flashmla_other",
        "ptxas         .     16 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads",
        "ptxas info    : Used 40 registers, used 0 barriers, 64 bytes smem",
        "ptxas info    : Compiling entry function 'flashmla_decode' for 'sm_90a'",
        "ptxas info    : Function properties for flashmla_decode",
        "ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads",
        "ptxas info    : Used 168 registers, used 1 barriers, 384 bytes smem, 400 bytes cmem[0]",
    ])
    assert compiler.parse_ptxas_report(log, "flashmla_decode") == dict(
        registers=168, spill_stores=0, spill_loads=0, stack_bytes=0, smem_static=384)
    assert compiler.parse_ptxas_report(log, "flashmla_other")["spill_stores"] == 4
    assert compiler.parse_ptxas_report(log, "flashmla_combine") is None


def test_header_versions_are_known():
    versions = compiler.header_versions()
    assert set(versions) == {"cutlass", "cccl", "cudart"}
    assert all(v[0].isdigit() for v in versions.values())
    assert compiler.nvrtc_version()[0].isdigit()


@pytest.fixture
def fresh_header_search():
    compiler.header_dirs.cache_clear()
    yield
    compiler.header_dirs.cache_clear()


def _fake_wheel_dirs(root: pathlib.Path, cccl_rel: str, cudart_rel: str) -> dict[str, pathlib.Path]:
    """Marker files where header_dirs() looks for each header set."""
    dirs = {"cccl": root / cccl_rel, "cudart": root / cudart_rel}
    (dirs["cccl"] / "cuda" / "std" / "__cccl").mkdir(parents=True)
    (dirs["cccl"] / "cuda" / "std" / "__cccl" / "version.h").write_text("#define CCCL_VERSION 2008000\n")
    dirs["cudart"].mkdir(parents=True, exist_ok=True)
    (dirs["cudart"] / "cuda_bf16.h").write_text("")
    return dirs


@pytest.mark.parametrize("layout", ["cu12", "cu13"])
def test_header_discovery_handles_cuda12_and_cuda13_wheels(layout, tmp_path, monkeypatch, fresh_header_search):
    from cuda import pathfinder

    if layout == "cu12":
        dirs = _fake_wheel_dirs(tmp_path, "nvidia/cuda_cccl/include", "nvidia/cuda_runtime/include")
        expected_cccl = (dirs["cccl"],)
    else:  # CUTLASS includes <cccl/cuda/std/...> under CUDA 13: the parent must be searched too
        dirs = _fake_wheel_dirs(tmp_path, "nvidia/cu13/include/cccl", "nvidia/cu13/include")
        expected_cccl = (dirs["cccl"], dirs["cudart"])
    monkeypatch.setattr(pathfinder, "find_nvidia_header_directory", lambda name: str(dirs[name]))
    found = compiler.header_dirs()
    assert found.cccl == expected_cccl and found.cudart == dirs["cudart"]


def test_missing_headers_name_the_wheel_to_install(monkeypatch, fresh_header_search):
    from cuda import pathfinder

    monkeypatch.setattr(pathfinder, "find_nvidia_header_directory", lambda name: None)
    with pytest.raises(ImportError, match="pip install 'nvidia-cuda-cccl"):
        compiler.header_dirs()




DECODE_VARIANTS = [v for v in variants.all_variants() if v.program == "decode"]


def _sass(variant, tmp_path, compiled) -> str:
    """The variant's SASS, by cuobjdump."""
    import subprocess

    tool = _cuobjdump()
    assert tool, "cuobjdump not found: install the test extra (nvidia-cuda-cuobjdump)"
    cubin = tmp_path / f"{variant.name}.cubin"
    cubin.write_bytes(compiled[variant.name].cubin)
    done = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True)
    assert done.returncode == 0, f"{tool} -sass failed (it needs nvdisasm beside it): {done.stderr.strip()}"
    return done.stdout


@pytest.mark.parametrize("variant", DECODE_VARIANTS, ids=lambda v: v.name)
def test_decode_sass_uses_wgmma_and_tma_without_local_memory(variant, tmp_path, compiled):
    """The decode kernel is on Hopper's fast paths: HGMMA (not HMMA; with an e4m3 q and cache QK^T on FP8
    ones, QGMMA 64 x 64 x 32), bulk tensor loads, no LDL/STL, and the helper warpgroup (loader or FP8
    converter) hands its registers to the consumers (setmaxnreg)."""
    sass = _sass(variant, tmp_path, compiled)
    if variant.fp8_boxes:
        assert "QGMMA.64x64x32.F32.E4M3.E4M3" in sass and "HGMMA.64x64x16" not in sass
    else:
        assert "HGMMA.64x64x16.F32" in sass
    assert "HGMMA.64x256x16.F32" in sass
    assert " HMMA" not in sass
    assert "UTMALDG" in sass
    assert "LDL" not in sass and "STL" not in sass
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass
    assert sass.count("UTMACCTL.PF") == 2  # the kv and q maps' descriptors asked for at entry


NARROW_VARIANTS = [v for v in variants.all_variants() if v.program == "decode_narrow"]


@pytest.mark.parametrize("variant", NARROW_VARIANTS, ids=lambda v: v.name)
def test_narrow_decode_sass_uses_transposed_wgmma_and_tma_without_local_memory(variant, tmp_path, compiled):
    """The narrow kernel's products put the query rows on wgmma's N (64 x rows x 16 HGMMAs; with an FP8
    cache S^T on FP8 ones, 64 x rows x 32, whose K the 16-row kernel takes from registers: its pages are
    whole rows), its pages come through bulk tensor loads, and nothing lives in local memory."""
    sass = _sass(variant, tmp_path, compiled)
    n = variant.rows
    assert f"HGMMA.64x{n}x16.F32" in sass
    if variant.kv == "e4m3":
        assert f"QGMMA.64x{n}x32.F32.E4M3.E4M3" in sass  # SASS names FP8 wgmmas QGMMA
        assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass  # the loader's registers
        k_operands = re.findall(rf"QGMMA\.64x{n}x32\.F32\.E4M3\.E4M3 R\d+, (\S+),", sass)
        assert k_operands and {a.startswith("R") for a in k_operands} == {variant.narrow_linear}, k_operands[:4]
    # Every narrow kernel's loads are paced (GridPace): the count's adds, and the count under its C name,
    # which the GPU tests read back.
    assert "REDG.E.ADD.64" in sass
    assert b"\x00narrow_pace\x00" in compiled[variant.name].cubin
    assert "HGMMA.64x64x16" not in sass and "HGMMA.64x256x16" not in sass and " HMMA" not in sass
    assert "UTMALDG" in sass and sass.count("UTMACCTL.PF") == 1  # the map's descriptor asked for at entry
    assert "LDL" not in sass and "STL" not in sass


RING_VARIANTS = [v for v in variants.all_variants() if v.program == "decode_ring"]


@pytest.mark.parametrize("variant", RING_VARIANTS, ids=lambda v: v.name)
def test_ring_decode_sass_uses_fp8_scores_transposed_pv_and_tma_without_local_memory(variant, tmp_path, compiled):
    """The ring kernel (an e4m3 q and cache, more than 32 rows): S^T on FP8 wgmmas (64 tokens x 64 rows x
    32), O^T on 64 x 64 x 16 fp16 ones with V^T from registers, pages through bulk tensor loads, the
    loader's registers handed over, nothing in local memory."""
    sass = _sass(variant, tmp_path, compiled)
    assert "QGMMA.64x64x32.F32.E4M3.E4M3" in sass
    assert "HGMMA.64x64x16.F32" in sass
    assert "HGMMA.64x256x16" not in sass and " HMMA" not in sass
    assert "UTMALDG" in sass and sass.count("UTMACCTL.PF") == 2  # both maps' descriptors asked for at entry
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass
    assert "LDL" not in sass and "STL" not in sass


def test_fp16_partial_rows_where_requests_have_many_pieces(monkeypatch):
    """Dispatch: decode.cu with a 16-bit cache and the ring kernel (an e4m3 q and cache) write fp16 partial
    rows (their _p16 builds, and the combine to match: decode.cu's in quad order) where batch *
    PARTIAL_F16_PARTS_PER_REQUEST for parts of one row tile, PARTIAL_F16_WIDE_PARTS_PER_REQUEST for wider ones
    (the ring: RING_PARTIAL_F16_PARTS_PER_REQUEST, one share for every plan) <= the plan's parts
    and a warp merges a row; the narrow kernels and decode.cu's FP8-cache builds never."""
    from types import SimpleNamespace

    from flashmla_cupy import kernels

    def pick(batch, num_parts=66, rows=128, kv=None, q="bf16"):
        problem = SimpleNamespace(rows=rows, kv_name=kv, dtype_name="bf16", q_dtype_name=q, batch=batch,
                                  num_parts=num_parts)
        return kernels.decode_kernel(problem)[0].name

    # decode.cu: parts of one 64-row tile by PARTIAL_F16_PARTS_PER_REQUEST, wider ones by _WIDE_
    for rows, parts, share in ((64, 132, kernels.PARTIAL_F16_PARTS_PER_REQUEST),
                               (128, 66, kernels.PARTIAL_F16_WIDE_PARTS_PER_REQUEST),
                               (256, 33, kernels.PARTIAL_F16_WIDE_PARTS_PER_REQUEST)):
        most = math.floor(parts / share)  # the largest batch whose fp16 rows the rule allows
        assert pick(most, parts, rows) == "decode_bf16_p16", (rows, most)
        assert pick(most + 1, parts, rows) == "decode_bf16", (rows, most)
    assert pick(16, q="fp16") == "decode_fp16_p16"
    assert pick(66 // kernels.COMBINE_BLOCK_PER_ROW_PARTS) == "decode_bf16"     # a block a row: fp32
    assert pick(16, num_parts=132, rows=16) == "decode_narrow_bf16_r16"         # the narrow kernel: fp32
    assert pick(16, kv="e4m3", q="bf16") == "decode_bf16_kv_e4m3"               # FP8 caches: fp32
    # the ring: every plan by RING_PARTIAL_F16_PARTS_PER_REQUEST (a fraction: more requests than parts)
    ring_share = kernels.RING_PARTIAL_F16_PARTS_PER_REQUEST
    for rows, parts in ((64, 132), (128, 66), (256, 33)):
        most = math.floor(parts / ring_share)  # the largest batch whose fp16 rows the rule allows
        assert pick(most, parts, rows, kv="e4m3", q="e4m3") == "decode_ring_e4m3_kv_e4m3_p16", (rows, most)
        assert pick(most + 1, parts, rows, kv="e4m3", q="e4m3") == "decode_ring_e4m3_kv_e4m3", (rows, most)
        assert pick(parts // kernels.COMBINE_BLOCK_PER_ROW_PARTS, parts, rows, kv="e4m3", q="e4m3") \
            == "decode_ring_e4m3_kv_e4m3"  # a block a row: fp32
    assert 0 < ring_share < 1
    # the combine that reads them: decode.cu's rows in quad order, the ring's in column order
    assert kernels.decode_kernel(SimpleNamespace(rows=128, kv_name=None, dtype_name="bf16", q_dtype_name="bf16",
                                                 batch=16, num_parts=66))[0].writes_quad_order
    assert not variants.ring_variant(partial16=True).writes_quad_order
    assert not variants.decode_variant("bf16").writes_quad_order
    assert variants.combine_variant("bf16", partial16=True, quad_order=True).name == "combine_bf16_p16q"
    assert "-DFLASHMLA_PARTIAL_F16_QUAD_ORDER=1" in variants.combine_variant("fp16", partial16=True, quad_order=True).defines
    assert "-DFLASHMLA_PARTIAL_F16_QUAD_ORDER=1" not in variants.combine_variant("bf16", partial16=True).defines
    assert pick(16, 132, 64, kv="e4m3", q="e4m3") == "decode_ring_e4m3_kv_e4m3_p16"
    monkeypatch.setattr(kernels, "RING_PARTIAL_F16_PARTS_PER_REQUEST", 0)
    assert pick(16, 132, 64, kv="e4m3", q="e4m3") == "decode_ring_e4m3_kv_e4m3"
    assert pick(16, kv="e4m3", q="e4m3") == "decode_ring_e4m3_kv_e4m3"
    assert pick(16) == "decode_bf16_p16"
    monkeypatch.setattr(kernels, "PARTIAL_F16_PARTS_PER_REQUEST", 0)
    assert pick(16, 132, 64) == "decode_bf16" and pick(16) == "decode_bf16_p16"
    monkeypatch.setattr(kernels, "PARTIAL_F16_WIDE_PARTS_PER_REQUEST", 0)
    assert pick(16) == "decode_bf16"


def test_narrow_kernel_takes_few_rows(monkeypatch):
    """Dispatch: rows <= NARROW_MAX_ROWS (16-bit cache) or NARROW_FP8_MAX_ROWS (FP8 cache, e4m3 q) go to
    decode_narrow, the rest to decode; more rows of an e4m3 q and cache to decode_ring (kernels.RING_FP8)."""
    from types import SimpleNamespace

    from flashmla_cupy import kernels

    def pick(rows, kv=None, q="bf16"):
        problem = SimpleNamespace(rows=rows, kv_name=kv, dtype_name="bf16", q_dtype_name=q, batch=128, num_parts=66)
        variant, tile_rows = kernels.decode_kernel(problem)
        return variant.program, tile_rows

    assert pick(1) == ("decode_narrow", 16)
    assert pick(kernels.NARROW_MAX_ROWS) == ("decode_narrow", 16)
    assert pick(kernels.NARROW_MAX_ROWS + 1) == ("decode", 64)
    assert pick(16, kv="e4m3", q="e4m3") == ("decode_narrow", 16)
    assert pick(17, kv="e4m3", q="e4m3") == ("decode_narrow", 32)   # wgmma N = 32
    assert pick(kernels.NARROW_FP8_MAX_ROWS, kv="e4m3", q="e4m3") == ("decode_narrow", 32)
    assert pick(kernels.NARROW_FP8_MAX_ROWS + 1, kv="e4m3", q="e4m3") == ("decode_ring", 64)
    assert pick(128, kv="e4m3", q="e4m3") == ("decode_ring", 64)
    monkeypatch.setattr(kernels, "RING_FP8", False)   # decode.cu's FP8 path instead, the fallback
    assert pick(kernels.NARROW_FP8_MAX_ROWS + 1, kv="e4m3", q="e4m3") == ("decode", 64)
    assert pick(128, kv="e4m3", q="e4m3") == ("decode", 64)
    assert pick(128, kv="e4m3", q="bf16")[0] == "decode"   # a 16-bit q keeps decode.cu's converter
    assert pick(32, kv="e4m3", q="e4m3") == ("decode_narrow", 32)
    assert pick(1, kv="e4m3", q="bf16")[0] == "decode"   # a 16-bit q with an FP8 cache: decode.cu
    assert pick(1, kv="e4m3", q="fp16")[0] == "decode"


@pytest.mark.parametrize("variant", DECODE_VARIANTS + NARROW_VARIANTS + RING_VARIANTS, ids=lambda v: v.name)
def test_decode_wgmmas_are_neither_serialized_nor_awaited_by_ptxas(variant, compiled):
    """ptxas reports (in the -v log) when it serialises wgmmas or inserts a wgmma.wait_group of its own;
    either would undo the overlap of one warpgroup's softmax with the other's tensor-core work."""
    log = compiled[variant.name].log
    assert "Compiling entry function" in log, "no ptxas report in the log to check"
    assert "serialized" not in log.lower(), log
    assert "wait_group is injected" not in log, log


@pytest.mark.parametrize("define", ["-DFLASHMLA_UNGUARDED=1", "-DFLASHMLA_TRACE=1"])
def test_measurement_builds_compile(define, monkeypatch):
    """The builds the measurement scripts make: without the kernels' guards (scripts/kernel_ab.py, what
    the guards cost) and with phase marks (scripts/kernel_trace.py). Never shipped, but they must build
    as the shipped kernels do: no spills, no serialised or awaited wgmmas."""
    monkeypatch.setattr(variants, "_DEFINES", variants.defines_plus(define))
    for variant in (variants.decode_variant("bf16"), variants.combine_variant("bf16")):
        kernel = compiler.compile_variant(variant)
        assert (kernel.spill_stores, kernel.spill_loads, kernel.stack_bytes) == (0, 0, 0), kernel.log
        assert "serialized" not in kernel.log.lower() and "wait_group is injected" not in kernel.log, kernel.log
    if define == "-DFLASHMLA_TRACE=1":
        assert b"flashmla_trace" in compiler.compile_variant(variants.decode_variant("bf16")).cubin


@pytest.mark.parametrize("define, variant", [
    ("-DFLASHMLA_NARROW_LINEAR=0", variants.narrow_variant("e4m3", 16, "e4m3")),
    ("-DFLASHMLA_NARROW_PAGE_BARRIER=0", variants.narrow_variant("e4m3", 32, "e4m3")),
    ("-DFLASHMLA_TRACE=1", variants.narrow_variant("e4m3", 16, "e4m3")),
    ("-DFLASHMLA_NARROW_VOTE_MAX=0", variants.narrow_variant("e4m3", 32, "e4m3")),
    ("-DFLASHMLA_NARROW_VOTE_MAX=1", variants.narrow_variant("bf16", 16, None)),
    ("-DFLASHMLA_NARROW_PACE=0", variants.narrow_variant("e4m3", 16, "e4m3")),
    ("-DFLASHMLA_NARROW_PACE=0", variants.narrow_variant("bf16", 16, None)),
], ids=["narrow-fp8-column-boxes", "narrow-box-barriers", "narrow-fp8-trace", "narrow-two-softmax-barriers", "narrow-16bit-vote",
        "narrow-fp8-unpaced", "narrow-16bit-unpaced"])
def test_narrow_measurement_builds_compile(define, variant, monkeypatch, tmp_path):
    """The 16-row narrow FP8 kernel on nine boxes of 64-byte rows a page (the linear pages switched off, the
    A/B baseline of ab131; S^T then reads K from shared memory), its per-box TMA barriers
    (the page barrier switched off, as the load-only measurement hook needs them: scripts/kernel_ab.py),
    its phase marks and its softmax with two barriers
    on every page (the vote switched off, the A/B baseline of ab123), the 16-bit narrow kernel with the
    vote (off: level on the H200, ab124), and the 16-row FP8 and 16-bit kernels with their loads not paced
    (the A/B baselines of ab152 and ab155-ab158) build as the shipped kernels do: no spills, no serialised
    or awaited wgmmas."""
    monkeypatch.setattr(variants, "_DEFINES", variants.defines_plus(define))
    kernel = compiler.compile_variant(variant)
    assert (kernel.spill_stores, kernel.spill_loads, kernel.stack_bytes) == (0, 0, 0), kernel.log
    assert "serialized" not in kernel.log.lower() and "wait_group is injected" not in kernel.log, kernel.log
    if define.startswith("-DFLASHMLA_NARROW_LINEAR="):
        sass = _sass(variant, tmp_path, {variant.name: kernel})
        scores = re.findall(r"QGMMA\.64x16x32\.F32\.E4M3\.E4M3 R\d+, (\S+),", sass)
        assert scores and not any(a.startswith("R") for a in scores), scores[:4]  # K from shared memory


def test_racecheck_bulk_repro_compiles():
    """devtools/racecheck_bulk_repro.py's kernel (the linear pages' release protocol alone, for
    compute-sanitizer) builds for sm_90a, so that it is ready for a device run."""
    import racecheck_bulk_repro  # devtools/ is on the tests' path (pyproject.toml)

    from flashmla_cupy import install

    nvrtc = install.nvrtc()
    program = nvrtc.createProgram(racecheck_bulk_repro.SOURCE, "ring.cu", [], [])
    try:
        nvrtc.compileProgram(program, ["-arch=sm_90a"])
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(program))
    finally:
        nvrtc.destroyProgram(program)


def test_sass_diff_compares_two_builds_of_a_variant():
    """devtools/sass_diff.py builds a variant from two trees in child processes and compares their SASS:
    the shipped tree against itself matches instruction for instruction."""
    import subprocess
    import sys

    assert _cuobjdump(), "cuobjdump not found: install the test extra (nvidia-cuda-cuobjdump)"
    script = pathlib.Path(__file__).resolve().parents[1] / "devtools" / "sass_diff.py"
    tree = str(compiler.kernels_dir())
    done = subprocess.run([sys.executable, str(script), "scheduler", tree, tree], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    whole = [line for line in done.stdout.splitlines() if "whole kernel:" in line]
    matched, rest = whole[0].split(":")[1].split(" of ")
    assert int(matched) > 0 and rest.split()[0] == rest.split()[2] == matched.strip(), done.stdout


def test_sass_diff_finds_the_wgmma_loops():
    """sass_diff.wgmma_loops: the innermost backward branches over an HGMMA (targets are byte addresses, 16
    a instruction); a loop without wgmmas, and the outer loop around the others, are not listed."""
    import sass_diff

    code = [["HGMMA.64x64x16.F32.BF16", "R0, gdesc[UR8], RZ"], ["UIADD3.64", "UR8, UR8, 0x2, URZ"],
            ["BRA", "0x0"],                                   # 0-2: a wgmma loop
            ["IADD3", "R1, R1, 0x1, RZ"], ["BRA", "0x30"],    # 3-4: a loop with no wgmma
            ["BRA", "0x0"], ["EXIT", ""]]                     # 0-5: the outer loop
    assert sass_diff.wgmma_loops(code) == [(0, 3)]
    assert sass_diff.descriptor_ops(code[0:3]) == "1 HGMMA, 1 UIADD3.64, 0 UIADD3.X, 0 UMOV"


@pytest.mark.parametrize("name", ["decode_bf16", "decode_fp16", "decode_bf16_p16", "decode_fp16_p16"])
def test_pair_loops_advance_descriptors_by_one_add(name, compiled):
    """decode.cu's 16-bit builds: four wgmma loops (each warpgroup's steady pairs, then its edge pairs), each
    descriptor advanced by one add: no carry chains (UIADD3.X) and no high words moved back (UMOV), as ptxas
    built the 64-bit add in all but one loop a warpgroup (75 carries and 153 moves for 44 wgmmas in the edge
    loops, which ran ~12 % slower a page on the H200: docs/PERF_NOTES.md, forty-eighth session)."""
    import sass_diff

    assert _cuobjdump(), "cuobjdump not found: install the test extra (nvidia-cuda-cuobjdump)"
    code = sass_diff.instructions_of(compiled[name].cubin)
    loops = sass_diff.wgmma_loops(code)
    assert len(loops) == 4, loops
    for first, end in loops:
        count = sass_diff.descriptor_counts(code[first:end])
        assert count["HGMMA"] == 44 and count["UIADD3.X"] == 0 and count["UMOV"] <= 12, count


def test_sass_diff_reports_ptxas_serialising_the_wgmmas():
    """sass_diff prints ptxas's performance notes on a build (wgmmas serialised, waits added), which make a
    candidate not worth timing; other lines of the report are not notes."""
    import sass_diff

    log = ("ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
           "to insufficient register resources for the wgmma pipeline in the function 'flashmla_decode'\n"
           "ptxas info    : Used 168 registers, used 6 barriers\n"
           "ptxas info    : (C7520) Potential Performance Loss: wait_group is injected here\n")
    got = sass_diff.ptxas_warnings(log)
    assert len(got) == 2 and got[0].startswith("(C7511) Potential Performance Loss: wgmma.mma_async")
    assert sass_diff.ptxas_warnings("ptxas info    : Used 168 registers, used 6 barriers") == []


def test_sass_diff_settings_set_constants_and_add_options(monkeypatch):
    """sass_diff's --set-a/b NAME=VALUE sets a constant of flashmla_cupy.variants, --option-a/b adds an NVRTC
    option after every element type's defines (-lineinfo for a line-attributed build, -Xptxas=...)."""
    import sass_diff
    from flashmla_cupy import variants

    monkeypatch.setattr(variants, "_DEFINES", variants._DEFINES)
    monkeypatch.setattr(variants, "RING_SHARED_BYTES", variants.RING_SHARED_BYTES)
    sass_diff.apply_settings(variants, ["RING_SHARED_BYTES=1234", "-lineinfo", "-Xptxas=-O2"])
    assert variants.RING_SHARED_BYTES == 1234
    assert all(defines[-2:] == ("-lineinfo", "-Xptxas=-O2") for defines in variants._DEFINES.values())
    assert any(option == "-lineinfo" for option in variants.decode_variant("bf16").defines)
