"""The compile-time space: which kernel programs exist, for which element types.

`all_variants()` is the one place the compiled set is written down; dispatch (`decode_variant`,
`combine_variant`, `scheduler_variant`), `python -m flashmla_cupy warmup` and the CI compile test all
read it, so a variant cannot be launched that warm-up and CI never compiled.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from . import params

# Element types of q / k_cache / out; the C++ side selects its type with the matching define.
DTYPES = ("bf16", "fp16")
_DEFINES = {"bf16": ("-DFLASHMLA_BF16=1",), "fp16": ("-DFLASHMLA_FP16=1",)}
# Dynamic shared memory the decode kernel is launched with: flashmla::kSharedBytes of
# decode_config.cuh, needed before the module is loaded. A static_assert compiled into the program
# (see `pinned_constants`) fails the build when the two disagree.
DECODE_SHARED_BYTES = 224256
# numpy / ml_dtypes spellings accepted by the lookup functions.
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}


@dataclass(frozen=True)
class Variant:
    """One NVRTC program compiled with one set of defines: kernels_src/<program>.cu."""

    program: str        # "decode" | "combine" | "scheduler" | "check"
    dtype: str | None   # "bf16" | "fp16", or None for the dtype-free scheduler and check

    @property
    def name(self) -> str:
        """Stable human-readable id, e.g. "decode_bf16"; also names the cache entry."""
        return f"{self.program}_{self.dtype}" if self.dtype else self.program

    @property
    def kernel_name(self) -> str:
        """The extern "C" __global__ symbol the program defines."""
        return f"flashmla_{self.program}"

    @property
    def defines(self) -> tuple[str, ...]:
        return _DEFINES[self.dtype] if self.dtype else ()

    @property
    def uses_cute(self) -> bool:
        """Only decode includes CuTe, so only it pays for (and needs) the CUTLASS headers."""
        return self.program == "decode"

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory per block at launch (the small kernels use static smem only)."""
        return DECODE_SHARED_BYTES if self.program == "decode" else 0

    @property
    def pinned_constants(self) -> dict[str, int]:
        """C++ constants whose values the Python side relies on; compiled in as static_asserts."""
        if self.program == "decode":
            return {"flashmla::kSharedBytes": DECODE_SHARED_BYTES}
        if self.program == "check":
            return {f"flashmla::{name}": value for name, value in _CHECK_REPORT.items()}
        return {}


# The layout of checked mode's report (params.py), as check.cu names it.
_CHECK_REPORT = {
    "kReportFlaggedRequests": params.REPORT_FLAGGED_REQUESTS, "kReportFlaggedParts": params.REPORT_FLAGGED_PARTS,
    "kReportFaults": params.REPORT_FAULTS, "kReportHeader": params.REPORT_HEADER,
    "kFaultLength": params.FAULT_LENGTH, "kFaultBlock": params.FAULT_BLOCK, "kFaultPlan": params.FAULT_PLAN,
}


def all_variants() -> list[Variant]:
    """Every variant the package can launch, in warm-up order (the slow CuTe programs first)."""
    return (
        [Variant("decode", dt) for dt in DTYPES]
        + [Variant("combine", dt) for dt in DTYPES]
        + [Variant("scheduler", None), Variant("check", None)]
    )


@functools.lru_cache(maxsize=None)
def _find(program: str, dtype) -> Variant:
    key = None if dtype is None else _DTYPE_ALIASES.get(str(getattr(dtype, "name", dtype)).lower())
    for v in all_variants():
        if v.program == program and v.dtype == key:
            return v
    known = ", ".join(v.name for v in all_variants() if v.program == program)
    raise ValueError(f"no {program} kernel for dtype {dtype!r}; compiled variants: {known}")


def decode_variant(dtype) -> Variant:
    """The decode variant for an element type ("bf16"/"fp16", or a numpy/ml_dtypes dtype)."""
    return _find("decode", dtype)


def combine_variant(dtype) -> Variant:
    """The combine variant for an element type ("bf16"/"fp16", or a numpy/ml_dtypes dtype)."""
    return _find("combine", dtype)


def scheduler_variant() -> Variant:
    return _find("scheduler", None)


def check_variant() -> Variant:
    """Checked mode's validation of device contents (kernels_src/check.cu)."""
    return _find("check", None)
