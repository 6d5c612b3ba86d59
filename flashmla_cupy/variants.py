"""The compile-time space: which kernel programs exist, for which element types.

`all_variants()` is the one place the compiled set is written down; dispatch (`decode_variant`,
`combine_variant`, `scheduler_variant`), `python -m flashmla_cupy warmup` and the CI compile test all
read it, so a variant cannot be launched that warm-up and CI never compiled.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from . import params
from .plan import PAGE_SIZE

# Element types of q / k_cache / out; the C++ side selects its type with the matching define.
DTYPES = ("bf16", "fp16")
# Query types of the FP8 (e4m3) cache: 16-bit queries (out in q's dtype) or e4m3 ones (out bf16).
FP8_QUERY_DTYPES = ("bf16", "fp16", "e4m3")
_DEFINES = {"bf16": ("-DFLASHMLA_BF16=1",), "fp16": ("-DFLASHMLA_FP16=1",),
            # an e4m3 q and cache compute in fp16 (both convert to it exactly, in one instruction per
            # two values) and write bf16 (element.cuh)
            "e4m3": ("-DFLASHMLA_FP16=1", "-DFLASHMLA_Q_E4M3=1")}
_KV_DEFINES = {"e4m3": ("-DFLASHMLA_KV_E4M3=1",)}


def defines_plus(*extra: str) -> dict[str, tuple[str, ...]]:
    """Every element type's defines with `extra` after them: what `_DEFINES` becomes for a measurement or
    candidate build (scripts/kernel_ab.py, the tests of those builds)."""
    return {dtype: defines + tuple(extra) for dtype, defines in _DEFINES.items()}


# Dynamic shared memory the decode kernel is launched with: flashmla::kSharedBytes of
# decode_config.cuh, needed before the module is loaded. A static_assert compiled into the program
# (see `pinned_constants`) fails the build when the two disagree.
DECODE_SHARED_BYTES = 224256
# Threads of a decode block: two consumer warpgroups and a helper warpgroup, the loader of a 16-bit
# cache or the converter of an FP8 one (kLaunchThreads of decode_config.cuh, pinned likewise).
DECODE_THREADS = {None: 384, "e4m3": 384}
# The narrow decode kernel (decode_narrow.cu: few query rows, 16-bit cache), built for 16 query rows
# per CTA (kNarrowRows; the source also takes 32, which measured 3-4 % slower than decode.cu on the
# H200, docs/PERF_NOTES.md): its dynamic shared memory (kNarrowSharedBytes) per row count and its
# threads (kNarrowThreads), pinned likewise.
NARROW_ROWS = (16,)
# With an FP8 cache (and an e4m3 q) also 32 rows (wgmma N = 32, the two computing warpgroups taking
# pages in turn).
NARROW_FP8_ROWS = (16, 32)
NARROW_SHARED_BYTES = {(16, None): 228352, (32, None): 224256, (16, "e4m3"): 230400, (32, "e4m3"): 229376}
# The combine kernel, built per warps merging one output row (kWarpsPerRow of combine.cu, pinned): 1 (a
# warp a row, many rows of a few pieces: few pieces in flight, few registers, more blocks an SM) or 16 (a
# block a row, few rows of many pieces: more in flight). kernels.combine_warps_per_row picks one.
COMBINE_WARPS_PER_ROW = (1, 16)
# one computing warpgroup and a loader warp; with an FP8 cache two and a loader warpgroup
NARROW_THREADS = {None: 160, "e4m3": 384}
# The ring decode kernel (decode_ring.cu): an e4m3 q and cache with more rows than the narrow kernel
# takes, pages kept FP8 in a ring of four. Its dynamic shared memory (kRingSharedBytes) and threads
# (kRingThreads), pinned likewise.
RING_SHARED_BYTES = 221184
RING_THREADS = 384
# Tokens of one TMA sub-box of an FP8 page in decode.cu with a 16-bit q (kLandingTokens of dequant.cuh,
# pinned likewise): launch.py encodes k_cache's tensor map with it. The narrow kernel, and decode.cu with
# an e4m3 q, land an FP8 box whole, 64-byte swizzled (kFp8SwizzleBytes of decode_config.cuh, pinned
# likewise): the wgmma layout of FP8 rows (Variant.fp8_boxes).
FP8_LANDING_TOKENS = 16
NARROW_FP8_SWIZZLE_BYTES = 64
# numpy / ml_dtypes spellings accepted by the lookup functions.
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                  "e4m3": "e4m3", "float8_e4m3fn": "e4m3", "fp8_e4m3": "e4m3"}


@dataclass(frozen=True)
class Variant:
    """One NVRTC program compiled with one set of defines: kernels_src/<program>.cu."""

    program: str        # "decode" | "decode_narrow" | "decode_ring" | "combine" | "scheduler" | "check"
    dtype: str | None   # "bf16" | "fp16" (| "e4m3": decode's q), or None for the dtype-free scheduler and check
    kv: str | None = None   # decode's k_cache type when it is not q's: "e4m3" (an FP8 cache)
    rows: int | None = None  # decode_narrow's query rows per CTA (NARROW_ROWS)
    warps: int | None = None  # combine's warps per output row when more than one (COMBINE_WARPS_PER_ROW)
    partial16: bool = False  # decode.cu: writes fp16 partial rows; combine: reads them
    quad_order: bool = False  # combine: its fp16 partial rows in quad order (decode.cu's; the ring's are not)

    @property
    def name(self) -> str:
        """Stable human-readable id, e.g. "decode_bf16", "decode_e4m3_kv_e4m3"; also names the cache entry."""
        name = f"{self.program}_{self.dtype}" if self.dtype else self.program
        name = f"{name}_kv_{self.kv}" if self.kv else name
        name = f"{name}_w{self.warps}" if self.warps else name
        name = f"{name}_p16" if self.partial16 else name
        name = f"{name}q" if self.quad_order else name
        return f"{name}_r{self.rows}" if self.rows else name

    @property
    def kernel_name(self) -> str:
        """The extern "C" __global__ symbol the program defines."""
        return f"flashmla_{self.program}"

    @property
    def defines(self) -> tuple[str, ...]:
        return ((_DEFINES[self.dtype] if self.dtype else ()) + (_KV_DEFINES[self.kv] if self.kv else ())
                + ((f"-DFLASHMLA_NARROW_ROWS={self.rows}",) if self.rows else ())
                + ((f"-DFLASHMLA_COMBINE_WARPS_PER_ROW={self.warps}",) if self.warps else ())
                + (("-DFLASHMLA_PARTIAL_F16=1",) if self.partial16 else ())
                + (("-DFLASHMLA_PARTIAL_F16_QUAD_ORDER=1",) if self.quad_order else ()))

    @property
    def threads(self) -> int:
        """Threads per decode block."""
        if self.program == "decode_ring":
            return RING_THREADS
        return NARROW_THREADS[self.kv] if self.program == "decode_narrow" else DECODE_THREADS[self.kv]

    @property
    def uses_cute(self) -> bool:
        """Only the decode kernels include CuTe, so only they pay for (and need) the CUTLASS headers."""
        return self.program in ("decode", "decode_narrow", "decode_ring")

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory per block at launch (the small kernels use static smem only)."""
        if self.program == "decode_narrow":
            return NARROW_SHARED_BYTES[(self.rows, self.kv)]
        if self.program == "decode_ring":
            return RING_SHARED_BYTES
        return DECODE_SHARED_BYTES if self.program == "decode" else 0

    @property
    def writes_quad_order(self) -> bool:
        """Whether the partial rows this decode variant writes are fp16 in quad order (decode.cu's _p16
        builds: kernels_src/element.cuh), for the combine to match (Variant.quad_order)."""
        return self.program == "decode" and self.partial16

    @property
    def fp8_boxes(self) -> bool:
        """An FP8 cache landed as whole 64-byte-swizzled boxes for FP8 QK^T: the narrow and ring kernels',
        and decode.cu's with an e4m3 q (dequant.cuh)."""
        return self.kv == "e4m3" and (self.program in ("decode_narrow", "decode_ring") or self.dtype == "e4m3")

    @property
    def narrow_linear(self) -> bool:
        """Whether the kernel lands a page as one TMA box of whole 576-byte rows (decode_narrow.cu's kLinear:
        the 16-row FP8 narrow kernel, unless its build says -DFLASHMLA_NARROW_LINEAR=0, the nine 64-byte-wide
        boxes every other FP8 variant lands). Pinned: the kernel's default and this one agree."""
        if (self.program, self.kv, self.rows) != ("decode_narrow", "e4m3", 16):
            return False
        values = [d.split("=", 1)[1] for d in self.defines if d.startswith("-DFLASHMLA_NARROW_LINEAR=")]
        return int(values[-1]) != 0 if values else True

    @property
    def kv_box(self) -> tuple[int, int, bool]:
        """How a decode variant's TMA lands k_cache: (tokens per box, swizzle bytes; 0: none, whether a box
        holds whole rows instead of 64 columns)."""
        if self.kv is None:
            return PAGE_SIZE, 128, False
        if self.narrow_linear:
            return PAGE_SIZE, 0, True
        if self.fp8_boxes:
            return PAGE_SIZE, NARROW_FP8_SWIZZLE_BYTES, False
        return FP8_LANDING_TOKENS, 0, False

    @property
    def pinned_constants(self) -> dict[str, int]:
        """C++ constants whose values the Python side relies on; compiled in as static_asserts."""
        if self.program == "decode":
            pinned = {"flashmla::kSharedBytes": DECODE_SHARED_BYTES, "flashmla::kLaunchThreads": self.threads}
            if self.kv:
                pinned["flashmla::kLandingTokens"] = self.kv_box[0]
            if self.fp8_boxes:
                pinned["flashmla::kFp8SwizzleBytes"] = NARROW_FP8_SWIZZLE_BYTES
            return pinned
        if self.program == "decode_narrow":
            pinned = {"flashmla::kNarrowSharedBytes": NARROW_SHARED_BYTES[(self.rows, self.kv)],
                      "flashmla::kNarrowThreads": NARROW_THREADS[self.kv], "flashmla::kNarrowRows": self.rows,
                      "flashmla::kLinear": int(self.narrow_linear)}
            if self.kv:
                pinned["flashmla::kFp8SwizzleBytes"] = NARROW_FP8_SWIZZLE_BYTES
            return pinned
        if self.program == "decode_ring":
            return {"flashmla::kRingSharedBytes": RING_SHARED_BYTES, "flashmla::kRingThreads": RING_THREADS,
                    "flashmla::kFp8SwizzleBytes": NARROW_FP8_SWIZZLE_BYTES}
        if self.program == "check":
            return {f"flashmla::{name}": value for name, value in _CHECK_REPORT.items()}
        if self.program == "combine":
            return {"kWarpsPerRow": self.warps or 1}
        return {}


# The layout of checked mode's report (params.py), as check.cu names it.
_CHECK_REPORT = {
    "kReportFlaggedRequests": params.REPORT_FLAGGED_REQUESTS, "kReportFlaggedParts": params.REPORT_FLAGGED_PARTS,
    "kReportFaults": params.REPORT_FAULTS, "kReportHeader": params.REPORT_HEADER,
    "kFaultLength": params.FAULT_LENGTH, "kFaultBlock": params.FAULT_BLOCK, "kFaultPlan": params.FAULT_PLAN,
}


# decode.cu with a 16-bit cache is also built to write its split pieces' partial rows in fp16, a power-of-two
# scale per row and half of its columns (-DFLASHMLA_PARTIAL_F16; kernels_src/epilogue.cuh): half the bytes
# to write and for the combine to read, for plans whose rows have several pieces each, merged a warp a row
# (kernels.decode_kernel chooses). The ring kernel has such a build too, with one power of two for the
# launch (its rows' bound: 448 times the output's descale). decode.cu's rows lie in quad order, as its
# accumulators hold them (no swaps a piece); the ring's in column order. The narrow kernels and decode.cu's
# FP8-cache builds write fp32; the combine is built for each format (Variant.partial16 and quad_order, W = 1
# only) and kernels.py pairs it with the decode kernel's.
def all_variants() -> list[Variant]:
    """Every variant the package can launch, in warm-up order (the slow CuTe programs first)."""
    return (
        [Variant("decode", dt) for dt in DTYPES]
        + [Variant("decode", dt, partial16=True) for dt in DTYPES]
        + [Variant("decode", dt, "e4m3") for dt in FP8_QUERY_DTYPES]
        + [Variant("decode_narrow", dt, rows=n) for dt in DTYPES for n in NARROW_ROWS]
        + [Variant("decode_narrow", "e4m3", "e4m3", rows=n) for n in NARROW_FP8_ROWS]
        + [Variant("decode_ring", "e4m3", "e4m3")]
        + [Variant("decode_ring", "e4m3", "e4m3", partial16=True)]
        + [Variant("combine", dt, warps=_combine_warps(w)) for dt in DTYPES for w in COMBINE_WARPS_PER_ROW]
        # fp16 partial rows, a warp a row only: the ring's in column order, decode.cu's in quad order
        + [Variant("combine", dt, partial16=True, quad_order=q) for q in (False, True) for dt in DTYPES]
        + [Variant("scheduler", None), Variant("check", None)]
    )


def _combine_warps(warps_per_row: int) -> int | None:
    """Variant.warps for a combine merging a row with `warps_per_row` warps (None for one: the plain build)."""
    return None if warps_per_row == 1 else warps_per_row


def _alias(dtype) -> str | None:
    return None if dtype is None else _DTYPE_ALIASES.get(str(getattr(dtype, "name", dtype)).lower())


@functools.lru_cache(maxsize=None)
def _find(program: str, dtype, kv=None, rows=None, warps=None, partial16=False, quad_order=False) -> Variant:
    key, kv_key = _alias(dtype), _alias(kv)
    if kv_key == key and program == "decode" and key in DTYPES:
        kv_key = None   # a 16-bit cache of q's own type
    for v in all_variants():
        if (v.program == program and v.dtype == key and v.kv == kv_key and v.rows == rows and v.warps == warps
                and v.partial16 == partial16 and v.quad_order == quad_order):
            return v
    known = ", ".join(v.name for v in all_variants() if v.program == program)
    raise ValueError(f"no {program} kernel for dtype {dtype!r} (cache {kv!r}); compiled variants: {known}")


def decode_variant(dtype, kv=None, partial16: bool = False) -> Variant:
    """The decode variant for q's element type ("bf16"/"fp16"/"e4m3", or a numpy/ml_dtypes dtype) and,
    for an FP8 cache, the cache's ("e4m3"; None: q's own); with `partial16` (16-bit caches), the build
    that writes fp16 partial rows."""
    return _find("decode", dtype, kv, partial16=partial16)


def narrow_variant(dtype, rows: int, kv=None) -> Variant:
    """The narrow decode variant for q's element type, the cache's (None: q's own 16-bit type; "e4m3":
    FP8, with an e4m3 q only) and up to `rows` query rows per KV head: the smallest of NARROW_ROWS
    (NARROW_FP8_ROWS for an FP8 cache) that holds them."""
    sizes = NARROW_FP8_ROWS if _alias(kv) == "e4m3" else NARROW_ROWS
    fit = next((n for n in sizes if rows <= n), None)
    if fit is None:
        raise ValueError(f"the narrow decode kernel takes at most {sizes[-1]} query rows, not {rows}")
    return _find("decode_narrow", dtype, kv, fit)


def ring_variant(partial16: bool = False) -> Variant:
    """The ring decode variant: an e4m3 q and cache, any number of rows (64 a CTA); with `partial16`, the
    build that writes fp16 partial rows."""
    return _find("decode_ring", "e4m3", "e4m3", partial16=partial16)


def combine_variant(dtype, warps_per_row: int = 1, partial16: bool = False, quad_order: bool = False) -> Variant:
    """The combine variant for an element type ("bf16"/"fp16", or a numpy/ml_dtypes dtype), the warps
    that merge one output row (COMBINE_WARPS_PER_ROW) and the partial rows' format (fp16 where the
    decode variant writes them so: its `partial16`; in quad order where decode.cu wrote them:
    Variant.writes_quad_order)."""
    return _find("combine", dtype, warps=_combine_warps(warps_per_row), partial16=partial16, quad_order=quad_order)


def scheduler_variant() -> Variant:
    return _find("scheduler", None)


def check_variant() -> Variant:
    """Checked mode's validation of device contents (kernels_src/check.cu)."""
    return _find("check", None)
