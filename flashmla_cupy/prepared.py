"""Calls prepared once per input layout.

A decode step repeats one layout for every layer. What a checked layout determines (output shapes
and their allocators, loaded kernels, grids, parameter structs with every size field set) is built
once into a prepared call; running it allocates the outputs, writes the data pointers and launches.
lookup.py finds the prepared call of a layout.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import inputs, plan, tensors
from .params import METADATA_FIELDS


class PlanCall:
    """get_mla_metadata for one checked layout: output allocators and the scheduler launch."""

    def __init__(self, problem: inputs.MetadataProblem, framework: str, sm_count: int):
        from . import kernels   # driver-facing: imported once a call has passed its checks

        num_parts = plan.num_sm_parts(sm_count, problem.heads_kv, problem.rows)
        self.device_id = device_id = problem.device_id
        self._new_metadata = tensors.allocator(framework, (num_parts, METADATA_FIELDS), np.int32, device_id)
        self._new_num_splits = tensors.allocator(framework, (problem.batch + 1,), np.int32, device_id)
        self._schedule = kernels.SchedulerLaunch(problem.batch, num_parts, device_id)

    def __call__(self, pointers: list[int], stream: int, alloc_stream: int | None) -> tuple[Any, Any]:
        """`pointers`: cache_seqlens. Returns (tile_scheduler_metadata, num_splits), native arrays."""
        (seqlens,) = pointers
        metadata, metadata_ptr = self._new_metadata(alloc_stream)
        num_splits, num_splits_ptr = self._new_num_splits(alloc_stream)
        self.launch(seqlens, metadata_ptr, num_splits_ptr, stream)
        return metadata, num_splits

    def launch(self, seqlens: int, metadata: int, num_splits: int, stream: int) -> None:
        """The planner on `stream` over arrays at these addresses."""
        self._schedule(seqlens, metadata, num_splits, stream)


class DecodeCall:
    """flash_mla_with_kvcache for one checked layout: output allocators, the decode and its combine."""

    def __init__(self, problem: inputs.DecodeProblem, framework: str):
        from . import kernels

        p = problem
        self.device_id = device_id = p.device_id
        self._decode = kernels.DecodeLaunch(p)
        # The pointers of a call: q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata,
        # num_splits, then the descales given (problem.descales), then out/lse where given.
        self._inputs = 6 + len(p.descales)
        self._combine = kernels.CombineLaunch(p.dtype_name, p.batch, p.seqlen_q, p.heads_q, p.heads_kv, p.num_parts,
                                              device_id, self._decode.partial16, self._decode.quad_order)
        # Outputs the caller provides (out=, lse=; DecodeIntoCall) get no allocator.
        self._new_out = None if p.out is not None else tensors.allocator(
            framework, (p.batch, p.seqlen_q, p.heads_q, inputs.HEAD_DIM_V), p.out_dtype, device_id)
        self._new_lse = None if p.lse is not None else tensors.allocator(
            framework, (p.batch, p.heads_q, p.seqlen_q), np.float32, device_id)
        # Both partial buffers in one workspace allocation, apart from the outputs so that it goes back
        # to the framework's stream-ordered allocator as soon as the call returns.
        self.workspace_floats = self._decode.workspace_floats
        self._new_workspace = tensors.allocator(framework, (self.workspace_floats,), np.float32, device_id,
                                                workspace=True)

    def __call__(self, pointers: list[int], stream: int, alloc_stream: int | None) -> tuple[Any, Any]:
        """`pointers`: q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits and
        the descales given. Returns (out, lse), native arrays."""
        q, k_cache, block_table, seqlens, metadata, num_splits, *descales = pointers
        out, out_ptr = self._new_out(alloc_stream)
        lse, lse_ptr = self._new_lse(alloc_stream)
        workspace, workspace_ptr = self._new_workspace(alloc_stream)
        # The launch() body, inlined: this is the hot path of every eager decode.
        out_partial, lse_partial = self._decode(q, k_cache, block_table, seqlens, metadata, num_splits,
                                                out_ptr, lse_ptr, workspace_ptr, stream, descales)
        self._combine(out_partial, lse_partial, num_splits, out_ptr, lse_ptr, stream)
        return out, lse

    def launch(self, arrays: list[int], out: int, lse: int, workspace: int, stream: int) -> None:
        """Both kernels on `stream`: `arrays` are the addresses of q, k_cache, block_table,
        cache_seqlens, tile_scheduler_metadata, num_splits and the descales given; `workspace` holds
        workspace_floats fp32."""
        q, k_cache, block_table, seqlens, metadata, num_splits, *descales = arrays
        out_partial, lse_partial = self._decode(q, k_cache, block_table, seqlens, metadata, num_splits,
                                                out, lse, workspace, stream, descales)
        self._combine(out_partial, lse_partial, num_splits, out, lse, stream)


class DecodeIntoCall(DecodeCall):
    """A DecodeCall that writes the outputs the caller provides (out=, lse=) and allocates the others."""

    def __call__(self, pointers: list[int], stream: int, alloc_stream: int | None) -> tuple[Any, Any]:
        """`pointers`: those of DecodeCall, then out and lse where the caller provides them. Returns
        (out, lse) with None for each output the caller provided."""
        given = iter(pointers[self._inputs:])
        out, out_ptr = self._new_out(alloc_stream) if self._new_out else (None, next(given))
        lse, lse_ptr = self._new_lse(alloc_stream) if self._new_lse else (None, next(given))
        workspace, workspace_ptr = self._new_workspace(alloc_stream)
        self.launch(pointers[:self._inputs], out_ptr, lse_ptr, workspace_ptr, stream)
        return out, lse


class CheckedDecodeCall(DecodeCall):
    """A DecodeCall in checked mode: the device contents of its arrays are validated first (checked.py),
    at the cost of a host synchronisation. Unchecked calls are plain DecodeCalls: no cost, not even a
    branch."""

    def __init__(self, problem: inputs.DecodeProblem, framework: str):
        from . import checked   # driver-facing, as kernels

        super().__init__(problem, framework)
        self._check = checked.DeviceCheck(problem, framework)

    def __call__(self, pointers: list[int], stream: int, alloc_stream: int | None) -> tuple[Any, Any]:
        self._check(pointers[:6], stream, alloc_stream)   # the inputs (out=/lse= follow them)
        return super().__call__(pointers, stream, alloc_stream)


class CheckedDecodeIntoCall(CheckedDecodeCall, DecodeIntoCall):
    """Checked mode with the caller's outputs: validated first, then written in place."""
