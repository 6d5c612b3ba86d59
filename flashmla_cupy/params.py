"""ctypes mirrors of the kernel parameter structs: those of kernels_src/params.cuh, which every program
includes, and CheckParams of kernels_src/check.cu with the layout of checked mode's report.

`layout_asserts(structs)` renders a static_assert for the size and every field offset of each struct;
the compiler appends those of params.cuh's structs to every program, and those of a program's own
structs (`OWN_STRUCTS`) to it, so a drift between the two definitions fails compilation, also in
CPU-only CI.
"""
from __future__ import annotations

import ctypes

# Fields of one row of tile_scheduler_metadata; must match enum MetadataField in params.cuh.
META_BEGIN_REQUEST = 0
META_BEGIN_PAGE = 1
META_END_REQUEST = 2
META_END_PAGE = 3
META_BEGIN_PIECE = 4
META_PAYLOAD = 5
METADATA_FIELDS = 8

_p = ctypes.c_void_p
_i32 = ctypes.c_int32
_i64 = ctypes.c_int64
_f32 = ctypes.c_float


class FastDivisor(ctypes.Structure):
    """A divisor the kernels divide by without an integer division (params.cuh's FastDivisor)."""
    _fields_ = [("multiplier", ctypes.c_uint32), ("shift", _i32)]

    @classmethod
    def of(cls, divisor: int) -> "FastDivisor":
        """n / divisor = (umulhi(n, multiplier) + n) >> shift for 0 <= n < 2^31 (Granlund and Montgomery)."""
        if not 1 <= divisor < 1 << 31:
            raise ValueError(f"divisor {divisor} outside [1, 2^31)")
        shift = (divisor - 1).bit_length()  # ceil(log2 divisor)
        multiplier = ((((1 << shift) - divisor) << 32) // divisor) + 1
        return cls(multiplier=multiplier, shift=shift)


class SchedulerParams(ctypes.Structure):
    _fields_ = [
        ("seqlens", _p), ("metadata", _p), ("num_splits", _p),
        ("batch", _i32), ("num_parts", _i32), ("page_size", _i32), ("overhead_pages", _i32),
        ("whole_slack_percent", _i32),
    ]


class DecodeParams(ctypes.Structure):
    _fields_ = [
        ("q", _p), ("block_table", _p), ("seqlens", _p), ("metadata", _p), ("num_splits", _p),
        ("out", _p), ("lse", _p), ("out_partial", _p), ("lse_partial", _p),
        ("q_batch_stride", _i64), ("q_seq_stride", _i64), ("q_head_stride", _i64),
        ("block_table_stride", _i64),
        ("batch", _i32), ("seqlen_q", _i32), ("heads_q", _i32), ("heads_kv", _i32),
        ("heads_per_group", _i32), ("rows", _i32), ("num_parts", _i32), ("causal", _i32),
        ("scale_log2", _f32), ("num_blocks", _i32), ("block_table_width", _i32), ("partial_slots", _i32),
        ("q_tma", _i32), ("descale_q", _p), ("descale_k", _p), ("per_group", FastDivisor),
    ]


class CombineParams(ctypes.Structure):
    _fields_ = [
        ("out_partial", _p), ("lse_partial", _p), ("num_splits", _p), ("out", _p), ("lse", _p),
        ("batch", _i32), ("seqlen_q", _i32), ("heads_q", _i32), ("heads_kv", _i32),
        ("heads_per_group", _i32), ("rows", _i32), ("partial_slots", _i32), ("per_group", FastDivisor),
    ]


class CheckParams(ctypes.Structure):
    _fields_ = [
        ("seqlens", _p), ("block_table", _p), ("metadata", _p), ("num_splits", _p),
        ("plan_metadata", _p), ("plan_num_splits", _p), ("report", _p),
        ("block_table_stride", _i64),
        ("batch", _i32), ("num_parts", _i32), ("num_blocks", _i32), ("block_table_width", _i32),
        ("page_size", _i32), ("padding", _i32),
    ]


# Checked mode's report, int32: a header, then one word of fault bits per request, then one per part
# of the plan. Must match kernels_src/check.cu (pinned by static_asserts, see variants.py).
REPORT_FLAGGED_REQUESTS = 0   # header word: how many requests have a fault
REPORT_FLAGGED_PARTS = 1      # header word: how many parts of tile_scheduler_metadata differ
REPORT_FAULTS = 2             # header word: the OR of every fault bit
REPORT_HEADER = 4             # words before the per-request words
FAULT_LENGTH = 1   # cache_seqlens[i] < 0 or > block_table width * page size
FAULT_BLOCK = 2    # a page request i uses holds a block index outside [0, num_blocks)
FAULT_PLAN = 4     # request i's pieces (num_splits) or part p's row (metadata) differ from the plan

ALL_STRUCTS = (FastDivisor, SchedulerParams, DecodeParams, CombineParams)   # params.cuh, which every program includes
OWN_STRUCTS = {"check": (CheckParams,)}   # program -> the structs kernels_src/<program>.cu defines itself


def layout_asserts(structs=ALL_STRUCTS) -> str:
    """C++ static_asserts pinning the size and field offsets of each struct to the ctypes layout.

    Sizes are checked with every NVRTC. Offsets need `__builtin_offsetof` in constant expressions,
    which NVRTC 13.0 rejects and 13.5 accepts; so they are checked where it works (CI installs the
    newest NVRTC 13), and only sizes elsewhere.
    """
    sizes, offsets = [], []
    for cls in structs:
        c = f"flashmla::{cls.__name__}"
        sizes.append(f'static_assert(sizeof({c}) == {ctypes.sizeof(cls)}, "{cls.__name__} size differs from params.py");')
        for name, _ in cls._fields_:
            off = getattr(cls, name).offset
            offsets.append(
                f'static_assert(__builtin_offsetof({c}, {name}) == {off}, '
                f'"{cls.__name__}.{name} offset differs from params.py");'
            )
    return "\n".join(
        sizes
        + ["#if __CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1305"]
        + offsets
        + ["#endif"]
    ) + "\n"
