"""One function per CUDA kernel: fill its parameter struct from checked inputs and launch it.

Launch geometry lives here and in the header comment of each kernel source; the decode kernel's
shared-memory size is also pinned by a static_assert compiled into it (see variants.py).
"""
from __future__ import annotations

from . import launch, params, plan, variants

SCHEDULER_THREADS = 256     # kSchedulerThreads in scheduler.cu
COMBINE_WARPS_PER_BLOCK = 4  # kCombineWarpsPerBlock in combine.cu
DECODE_THREADS = 256        # kThreads in decode_config.cuh: two warpgroups


def run_scheduler(seqlens, metadata, num_splits, num_parts: int, stream: int) -> None:
    """Write the split-KV plan for `seqlens` into `metadata` [num_parts, 8] and `num_splits` [b + 1]."""
    fn = launch.get_function(variants.scheduler_variant(), seqlens.device_id)
    args = params.SchedulerParams(
        seqlens=seqlens.ptr, metadata=metadata.ptr, num_splits=num_splits.ptr, batch=seqlens.shape[0],
        num_parts=num_parts, page_size=plan.PAGE_SIZE, overhead_pages=plan.OVERHEAD_PAGES,
    )
    launch.launch(fn, (1, 1, 1), (SCHEDULER_THREADS, 1, 1), stream, [args])


def run_decode(problem, out, lse, out_partial, lse_partial, stream: int) -> None:
    """The split-KV decode kernel: grid (row tiles, heads_kv, parts)."""
    fn = launch.get_function(variants.decode_variant(problem.dtype_name), problem.device_id)
    q, bt = problem.q, problem.block_table
    args = params.DecodeParams(
        q=q.ptr, block_table=bt.ptr, seqlens=problem.cache_seqlens.ptr,
        metadata=problem.tile_scheduler_metadata.ptr, num_splits=problem.num_splits.ptr,
        out=out.ptr, lse=lse.ptr, out_partial=out_partial.ptr, lse_partial=lse_partial.ptr,
        q_batch_stride=q.strides[0], q_seq_stride=q.strides[1], q_head_stride=q.strides[2],
        block_table_stride=bt.strides[0],
        batch=problem.batch, seqlen_q=problem.seqlen_q, heads_q=problem.heads_q, heads_kv=problem.heads_kv,
        heads_per_group=problem.heads_per_group, rows=problem.rows, num_parts=problem.num_parts,
        causal=int(problem.causal), scale_log2=problem.scale_log2, reserved=0,
    )
    grid = (-(-problem.rows // plan.TILE_ROWS), problem.heads_kv, problem.num_parts)
    launch.launch(fn, grid, (DECODE_THREADS, 1, 1), stream, [args, launch.kv_tensor_map(problem.k_cache)])


def run_combine_raw(dtype: str, batch: int, seqlen_q: int, heads_q: int, heads_kv: int,
                    out_partial, lse_partial, num_splits, out, lse, stream: int) -> None:
    """Merge the pieces of split requests into `out`/`lse`; a programmatic dependent of the decode."""
    fn = launch.get_function(variants.combine_variant(dtype), out.device_id)
    heads_per_group = heads_q // heads_kv
    rows = seqlen_q * heads_per_group
    args = params.CombineParams(
        out_partial=out_partial.ptr, lse_partial=lse_partial.ptr, num_splits=num_splits.ptr,
        out=out.ptr, lse=lse.ptr, batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
        heads_per_group=heads_per_group, rows=rows,
    )
    grid = (batch, -(-(heads_kv * rows) // COMBINE_WARPS_PER_BLOCK), 1)
    launch.launch(fn, grid, (32 * COMBINE_WARPS_PER_BLOCK, 1, 1), stream, [args], pdl=True)


def run_combine(problem, out, lse, out_partial, lse_partial, stream: int) -> None:
    run_combine_raw(problem.dtype_name, problem.batch, problem.seqlen_q, problem.heads_q, problem.heads_kv,
                    out_partial, lse_partial, problem.num_splits, out, lse, stream)
