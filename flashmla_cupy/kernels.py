"""One launcher per CUDA kernel: its parameter struct filled from checked inputs, and its launch.

A launcher is built once per input layout (function loaded, grid and every size field of the struct
set); a call writes only the data pointers and the stream, so a repeated call costs a few field writes.
Launch geometry lives here and in the header comment of each kernel source; the decode kernel's
shared-memory size is also pinned by a static_assert compiled into it (see variants.py).
"""
from __future__ import annotations

import ctypes

from . import launch, params, plan, variants
from .inputs import HEAD_DIM_V

SCHEDULER_THREADS = 256     # kSchedulerThreads in scheduler.cu
CHECK_THREADS = 128         # kCheckThreads in check.cu
INT32_BYTES = 4
COMBINE_WARPS_PER_BLOCK = 4  # kCombineWarpsPerBlock in combine.cu where a warp merges a row
# Parts per request from which every row is merged by a whole block (combine.cu, W > 1): such requests
# are cut into about this many pieces or more, and one warp per row would leave most SMs idle.
COMBINE_BLOCK_PER_ROW_PARTS = 16
COMBINE_ROW_BLOCK_WARPS = variants.COMBINE_WARPS_PER_ROW[-1]  # the warps of such a block (its build's kWarpsPerRow)
FLOAT32_BYTES = 4           # the partial buffers are sized for fp32 rows (fp16 ones take half: Variant.partial16)
_TMA_MAPS_PER_LAYOUT = 256  # k_cache (and q) descriptors kept per decode launcher (k: typically one per layer)


class SchedulerLaunch:
    """Writes the split-KV plan of `batch` seqlens into metadata [num_parts, 8] and num_splits [b + 1]."""

    def __init__(self, batch: int, num_parts: int, device_id: int):
        self._params = params.SchedulerParams(
            batch=batch, num_parts=num_parts, page_size=plan.PAGE_SIZE, overhead_pages=plan.OVERHEAD_PAGES,
            whole_slack_percent=plan.WHOLE_SLACK_PERCENT)
        fn = launch.get_function(variants.scheduler_variant(), device_id)
        self._launch = launch.Launch(fn, (1, 1, 1), (SCHEDULER_THREADS, 1, 1), [self._params])

    def __call__(self, seqlens: int, metadata: int, num_splits: int, stream: int) -> None:
        p = self._params
        p.seqlens, p.metadata, p.num_splits = seqlens, metadata, num_splits
        self._launch(stream)


def combine_warps_per_row(batch: int, num_parts: int) -> int:
    """Warps that merge one output row: a whole block when the plan has at least
    COMBINE_BLOCK_PER_ROW_PARTS parts per request (few requests, each cut into many pieces), else one."""
    return COMBINE_ROW_BLOCK_WARPS if batch * COMBINE_BLOCK_PER_ROW_PARTS <= num_parts else 1


def combine_block_warps(warps_per_row: int) -> int:
    """Warps of a combine block: COMBINE_WARPS_PER_BLOCK rows' warps, or the one row's."""
    return COMBINE_WARPS_PER_BLOCK if warps_per_row == 1 else warps_per_row


class CombineLaunch:
    """Merges the pieces of split requests into out/lse; a programmatic dependent of the decode."""

    def __init__(self, dtype: str, batch: int, seqlen_q: int, heads_q: int, heads_kv: int, num_parts: int,
                 device_id: int, partial16: bool = False, quad_order: bool = False):
        heads_per_group = heads_q // heads_kv
        rows = seqlen_q * heads_per_group
        warps_per_row = combine_warps_per_row(batch, num_parts)
        self._params = params.CombineParams(
            batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
            heads_per_group=heads_per_group, rows=rows, partial_slots=plan.partial_slots(batch, num_parts),
            per_group=params.FastDivisor.of(heads_per_group))
        fn = launch.get_function(variants.combine_variant(dtype, warps_per_row, partial16, quad_order), device_id)
        block_warps = combine_block_warps(warps_per_row)
        grid = (batch, -(-(heads_kv * rows * warps_per_row) // block_warps), 1)
        self._launch = launch.Launch(fn, grid, (32 * block_warps, 1, 1), [self._params], pdl=True)

    def __call__(self, out_partial: int, lse_partial: int, num_splits: int, out: int, lse: int,
                 stream: int) -> None:
        p = self._params
        p.out_partial, p.lse_partial, p.num_splits, p.out, p.lse = out_partial, lse_partial, num_splits, out, lse
        self._launch(stream)


# Query rows per KV head up to which a call goes to the narrow decode kernel (decode_narrow.cu: tokens on
# wgmma's M, so few rows do not pay for a 64-row tile; an FP8 cache stays FP8 in shared memory there), for
# a 16-bit cache and for an FP8 one; 0 sends every such call to decode.cu. An FP8 cache goes there with an
# e4m3 q only: with a 16-bit q the narrow kernel would convert K in registers, which measured slower than
# decode.cu on the H200.
NARROW_MAX_ROWS = variants.NARROW_ROWS[-1]
NARROW_FP8_MAX_ROWS = variants.NARROW_FP8_ROWS[-1]


# Whether an e4m3 q and cache with more rows than the narrow kernel takes go to the ring kernel
# (decode_ring.cu: FP8 pages in a ring of four, nothing converted in shared memory) instead of decode.cu's
# FP8 path. On: on the H200 it measured 0.94-1.02 of decode.cu's time on those cells (docs/PERF_NOTES.md,
# twenty-first session). Off sends them to decode.cu, which stays built for it (scripts/kernel_ab.py ring=0).
RING_FP8 = True


# Plans whose requests are cut into several pieces each, merged a warp a row, go to decode.cu's build with
# fp16 partial rows: where the batch times this is at most the plan's parts (each request ~this many pieces
# or more; 0: never) and a warp merges a row (combine_warps_per_row). Their merge reads half the bytes: on
# the H200 b16/h128/2k took 34.4 against 36.5 us (rows of ~5 pieces), while the same build cost 1-4 % on
# the variable-length 1k cells, whose rows have 2-3 pieces (its page loop is scheduled differently), was
# level at b32/8k, and at b1/32k (rows of 66 pieces, a block a row) level in bf16 and 4 % slower in fp16
# (docs/PERF_NOTES.md: ab207, forty-seventh session). Widened from 4 to 3 once its rows lay in quad order
# (no swaps a piece) with a shorter reduction: b36/h64/4k 62.8 against 64.8 us, b22/h128/1k 29.2 against
# 30.8, the variable-length 1-2k cells level or faster, where at 3 they had lost 2-6 % before (ab233, ab234,
# fifty-second session).
PARTIAL_F16_PARTS_PER_REQUEST = 3
# The same for parts of two or more row tiles (q1-h128, q2-h64: 66 parts; q2-h128: 33), which reach further:
# from 1.2 pieces a request (b <= 55 at 66 parts, b <= 27 at 33). On the H200 against the share at 3 (ab243,
# fifty-fourth session): b48/h128/2k 64.5 against 66.6 us, b24-q2-h128/4k causal 96.9 against 99.6, b40/h128/4k
# 90.1 against 91.6, b32/h128/8k 126.3 against 127.4, the variable-length cells level or faster in both dtypes.
# Not every b = 128 plan: at a quarter piece a request b64/1k bf16 lost 1.9 %, q2-h64/4k causal bf16 1.2 % (ab242).
PARTIAL_F16_WIDE_PARTS_PER_REQUEST = 1.2
# The ring kernel (an e4m3 q and cache) follows the same rule with its fp16-partial build, one share for every
# plan: fp16 rows from a quarter piece a request (0: never), so every b = 128 plan. On the H200 (docs/PERF_NOTES.md):
# from ~2 pieces a request, b16/h128/2k 30.3 against 32.3 us with fp32 rows, b24/h128/2k 38.1 against 40.1,
# b40/h64/4k 53.0 against 54.8 (ab227, ab229, fiftieth session); parts of two or more row tiles (66 and 33 parts)
# from a quarter piece: the variable-length 1k cells 2-4 % faster, b48/h128/2k 60.4 against 62.6 us,
# b128-q2-h64/1k var causal 82.1 against 85.5, none slower (ab240, ab241, fifty-third session). Parts of one
# 64-row tile (s_q 1, h_q 64: 132 parts) joined once V's fragments came through ldmatrix (89fb8df), which made
# the p16 build's page loop the fp32 build's instruction for instruction: b128/h64/1k var 57.2 against 58.7 us,
# b96/h64/4k 104.5 against 105.5, b128/h64/4k and q2-h32/4k causal level, the whole-planned b128/h64/16k 440.8
# against 438.1 inside a 1.0 % spread (ab246, fifty-fourth session; ab247, fifty-fifth).
RING_PARTIAL_F16_PARTS_PER_REQUEST = 0.25


def decode_kernel(problem) -> tuple[variants.Variant, int]:
    """The decode variant for a checked problem, and its query rows per CTA (the grid's x tiles)."""
    q_name = problem.q_dtype_name or problem.dtype_name
    narrow_rows = NARROW_MAX_ROWS if problem.kv_name is None else NARROW_FP8_MAX_ROWS
    if problem.rows <= narrow_rows and (problem.kv_name is None or q_name == "e4m3"):
        variant = variants.narrow_variant(q_name, problem.rows, problem.kv_name)
        return variant, variant.rows
    batch, parts = problem.batch, problem.num_parts

    def fp16_rows(share: float) -> bool:  # each request ~`share` pieces or more (0: never), a warp a row
        return 0 < share and batch * share <= parts and combine_warps_per_row(batch, parts) == 1

    if RING_FP8 and problem.kv_name == "e4m3" and q_name == "e4m3":
        partial16 = fp16_rows(RING_PARTIAL_F16_PARTS_PER_REQUEST)
        return variants.ring_variant(partial16=partial16), plan.TILE_ROWS
    # decode.cu's FP8-cache builds write fp32
    wide = problem.rows > plan.TILE_ROWS  # parts of two or more row tiles
    partial16 = problem.kv_name is None and fp16_rows(PARTIAL_F16_WIDE_PARTS_PER_REQUEST if wide
                                                      else PARTIAL_F16_PARTS_PER_REQUEST)
    return variants.decode_variant(q_name, problem.kv_name, partial16=partial16), plan.TILE_ROWS


def q_tile_box(heads_per_group: int) -> tuple[int, int] | None:
    """(heads, query positions) of a q tensor-map box that holds 64 packed rows (row = s * heads_per_group
    + h) in order, or None where no box does (heads_per_group neither a multiple nor a divisor of 64)."""
    if heads_per_group % plan.TILE_ROWS == 0:
        return plan.TILE_ROWS, 1
    if plan.TILE_ROWS % heads_per_group == 0:
        return heads_per_group, plan.TILE_ROWS // heads_per_group
    return None


class DecodeLaunch:
    """The split-KV decode kernel of one checked layout (a DecodeProblem): grid (row tiles, heads_kv,
    parts). Its partial buffers live in one fp32 workspace of `workspace_floats` values. An FP8 call's
    descales (device addresses) are passed to each call, in the order of `problem.descales`."""

    def __init__(self, problem):
        q, bt = problem.q, problem.block_table
        self._params = params.DecodeParams(
            q_batch_stride=q.strides[0], q_seq_stride=q.strides[1], q_head_stride=q.strides[2],
            block_table_stride=bt.strides[0],
            batch=problem.batch, seqlen_q=problem.seqlen_q, heads_q=problem.heads_q, heads_kv=problem.heads_kv,
            heads_per_group=problem.heads_per_group, rows=problem.rows, num_parts=problem.num_parts,
            causal=int(problem.causal), scale_log2=problem.scale_log2,
            num_blocks=problem.k_cache.shape[0], block_table_width=bt.shape[1],
            partial_slots=plan.partial_slots(problem.batch, problem.num_parts),
            per_group=params.FastDivisor.of(problem.heads_per_group))
        # out_partial [slots, heads_kv, rows, 512] then lse_partial [slots, heads_kv, rows]
        partial_rows = self._params.partial_slots * problem.heads_kv * problem.rows
        self.workspace_floats = partial_rows * HEAD_DIM_V + partial_rows
        self._lse_partial_offset = partial_rows * HEAD_DIM_V * FLOAT32_BYTES
        k = problem.k_cache
        self._k_layout = (k.shape, k.strides, k.dtype)
        self._k_ptr, self._maps = None, {}
        self._descales = problem.descales
        variant, tile_rows = decode_kernel(problem)
        # the format its partial rows take, for the combine to match
        self.partial16, self.quad_order = variant.partial16, variant.writes_quad_order
        self._k_layout = (*self._k_layout, *variant.kv_box)
        fn = launch.get_function(variant, problem.device_id)
        grid = (-(-problem.rows // tile_rows), problem.heads_kv, problem.num_parts)
        no_map_yet = (ctypes.c_uint64 * 16)()   # the first call sets k_cache's descriptor
        # decode.cu's and decode_ring.cu's Q tile comes in through a q tensor map where its 64 packed rows
        # form one box (the first call sets it). The narrow kernel takes no such argument and never reads
        # the third slot.
        box = q_tile_box(problem.heads_per_group) if variant.program in ("decode", "decode_ring") else None
        self._q_layout = None if box is None else (q.shape, q.strides, q.dtype, *box)
        self._q_ptr, self._q_maps = None, {}
        no_q_map = (ctypes.c_uint64 * 16)()
        self._launch = launch.Launch(fn, grid, (variant.threads, 1, 1), [self._params, no_map_yet, no_q_map])

    def __call__(self, q: int, k_cache: int, block_table: int, seqlens: int, metadata: int, num_splits: int,
                 out: int, lse: int, workspace: int, stream: int, descales=()) -> tuple[int, int]:
        """Launch on `stream` over the arrays at these addresses (`workspace`: workspace_floats fp32).
        Returns the addresses of out_partial and lse_partial in the workspace, for the combine."""
        if k_cache != self._k_ptr:
            self._launch.set_arg(1, self._tensor_map(k_cache))
            self._k_ptr = k_cache
        p = self._params
        if self._q_layout is not None and q != self._q_ptr:
            q_map = self._q_tensor_map(q)
            p.q_tma = int(q_map is not None)
            if q_map is not None:
                self._launch.set_arg(2, q_map)
            self._q_ptr = q
        p.q, p.block_table, p.seqlens, p.metadata, p.num_splits = q, block_table, seqlens, metadata, num_splits
        p.out, p.lse = out, lse
        for name, address in zip(self._descales, descales):
            setattr(p, name, address)
        lse_partial = workspace + self._lse_partial_offset
        p.out_partial, p.lse_partial = workspace, lse_partial
        self._launch(stream)
        return workspace, lse_partial

    def _tensor_map(self, k_cache: int):
        """The TMA descriptor of k_cache at this address; a model's layers each bring their own cache."""
        return _map_at(self._maps, k_cache, launch.kv_tensor_map, self._k_layout)

    def _q_tensor_map(self, q: int):
        """The TMA descriptor of q at this address, or None where the driver refuses one (the kernel then
        copies the Q tile with 16-byte loads, which need no more than the input rules ask)."""
        return _map_at(self._q_maps, q, _q_map_or_none, self._q_layout)


def _map_at(maps: dict, address: int, encode, layout: tuple):
    """maps[address], `encode(address, *layout)` on the first call at that address; at most
    _TMA_MAPS_PER_LAYOUT kept. (No closure per call: a model's layers change the address every call.)"""
    if address not in maps:
        if len(maps) >= _TMA_MAPS_PER_LAYOUT:
            maps.clear()
        maps[address] = encode(address, *layout)
    return maps[address]


def _q_map_or_none(q: int, *layout):
    try:
        return launch.q_tensor_map(q, *layout)
    except RuntimeError:  # the driver refused it (launch._check)
        return None


class CheckLaunch:
    """Checked mode's device pass over one call: the plan for its lengths (the scheduler, into scratch)
    and the check kernel, which writes a report of faulty requests and parts (params.REPORT_*) at the
    start of an int32 scratch buffer of `scratch_words` words."""

    def __init__(self, problem):
        batch, num_parts, bt = problem.batch, problem.num_parts, problem.block_table
        self._device_id = problem.device_id
        self._plan = SchedulerLaunch(batch, num_parts, problem.device_id)
        # scratch: the report [REPORT_HEADER + batch + num_parts], the plan's metadata [num_parts, 8]
        # and its num_splits [batch + 1]
        report_words = params.REPORT_HEADER + batch + num_parts
        self._plan_metadata_offset = report_words * INT32_BYTES
        self._plan_num_splits_offset = self._plan_metadata_offset + num_parts * params.METADATA_FIELDS * INT32_BYTES
        self.scratch_words = report_words + num_parts * params.METADATA_FIELDS + batch + 1
        self._params = params.CheckParams(
            block_table_stride=bt.strides[0], batch=batch, num_parts=num_parts,
            num_blocks=problem.k_cache.shape[0], block_table_width=bt.shape[1], page_size=plan.PAGE_SIZE)
        fn = launch.get_function(variants.check_variant(), problem.device_id)
        self._launch = launch.Launch(fn, (batch + num_parts, 1, 1), (CHECK_THREADS, 1, 1), [self._params])

    def __call__(self, block_table: int, seqlens: int, metadata: int, num_splits: int, scratch: int,
                 stream: int) -> None:
        """Queue the pass on `stream`; the report is in `scratch` once the stream gets there."""
        plan_metadata, plan_num_splits = scratch + self._plan_metadata_offset, scratch + self._plan_num_splits_offset
        launch.zero_int32(scratch, params.REPORT_HEADER, stream, self._device_id)
        self._plan(seqlens, plan_metadata, plan_num_splits, stream)
        p = self._params
        p.seqlens, p.block_table, p.metadata, p.num_splits = seqlens, block_table, metadata, num_splits
        p.plan_metadata, p.plan_num_splits, p.report = plan_metadata, plan_num_splits, scratch
        self._launch(stream)
