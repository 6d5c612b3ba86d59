"""Checked mode: the device contents a decode call's kernels would trust, validated before they run.

The shape rules (inputs.py) cannot see inside the arrays. With `check=True` (or FLASHMLA_CUPY_CHECK=1)
a call first queues, on its stream, the planner for its cache_seqlens (into scratch) and the check
kernel (kernels_src/check.cu), which flags every request whose length is negative or past the block
table's capacity (width * 64), whose used pages hold a block index outside [0, num_blocks), or whose
pieces differ from the plan for these lengths, and every part of tile_scheduler_metadata that differs
from that plan. The host waits once for the report's header (one device reduction, one
synchronisation); only when it is clean does the decode run. Otherwise the rest of the report, and the
lengths and table rows it points at, are read to raise one InvalidInputError naming the requests.

A checked call synchronises with the host, so it cannot be captured into a CUDA graph; it raises
InvalidInputError during capture. Unchecked calls (the default) run none of this.
"""
from __future__ import annotations

import numpy as np

from . import inputs, launch, params, plan, tensors
from .errors import InvalidInputError, Violation

FUNCTION = "flash_mla_with_kvcache"
NAMED = 8   # requests (and table entries) named in a message; the rest are counted


class DeviceCheck:
    """Checked mode for one checked layout: `__call__` validates the device contents of a call's arrays
    and raises InvalidInputError when any is wrong."""

    def __init__(self, problem: inputs.DecodeProblem, framework: str):
        from . import kernels   # driver-facing: imported once a call has passed its checks

        self._problem = problem
        self._pass = kernels.CheckLaunch(problem)
        self._new_scratch = tensors.allocator(framework, (self._pass.scratch_words,), np.int32, problem.device_id)

    def __call__(self, pointers: list[int], stream: int, alloc_stream: int | None) -> None:
        """`pointers`: as prepared.DecodeCall's. Returns once the contents are known to be valid."""
        _, _, block_table, seqlens, metadata, num_splits = pointers
        device_id = self._problem.device_id
        if launch.is_capturing(stream, device_id):
            raise InvalidInputError(FUNCTION, [Violation(
                "check", "True on a stream that is being captured into a CUDA graph",
                "check=False (and FLASHMLA_CUPY_CHECK unset) during capture: checked mode waits for the device",
                "run the step once with check=True before capturing it, and capture it unchecked")])
        scratch, scratch_ptr = self._new_scratch(alloc_stream)   # `scratch` lives until the report is read
        self._pass(block_table, seqlens, metadata, num_splits, scratch_ptr, stream)
        header = launch.read_int32(scratch_ptr, params.REPORT_HEADER, stream, device_id)
        if not header[params.REPORT_FLAGGED_REQUESTS] and not header[params.REPORT_FLAGGED_PARTS]:
            return
        p = self._problem
        faults = launch.read_int32(scratch_ptr + params.REPORT_HEADER * 4, p.batch + p.num_parts, stream, device_id)
        raise InvalidInputError(FUNCTION, self._violations(faults, block_table, seqlens, stream))

    def _violations(self, faults: np.ndarray, block_table: int, seqlens: int, stream: int) -> list[Violation]:
        p = self._problem
        requests, parts = faults[:p.batch], faults[p.batch:]
        lengths = launch.read_int32(seqlens, p.batch, stream, p.device_id)
        width, num_blocks = p.block_table.shape[1], p.k_cache.shape[0]
        capacity = width * plan.PAGE_SIZE
        found = []
        bad = np.flatnonzero(requests & params.FAULT_LENGTH)
        if bad.size:
            found.append(Violation(
                "cache_seqlens", _listing([f"cache_seqlens[{i}] = {lengths[i]}" for i in bad]),
                f"0 <= cache_seqlens[i] <= block_table.shape[1] * {plan.PAGE_SIZE} = {capacity}",
                "fix those lengths, or pass a block_table wide enough for the longest request"))
        bad = np.flatnonzero(requests & params.FAULT_BLOCK)
        if bad.size:
            entries = [entry for i in bad[:NAMED] for entry in self._bad_entries(i, lengths[i], block_table, stream)]
            more = f" (and {len(bad) - NAMED} more requests)" if len(bad) > NAMED else ""
            found.append(Violation(
                "block_table", ", ".join(entries) + more,
                f"a block index in [0, num_blocks = {num_blocks}) in every page a request uses "
                f"(block_table[i, :ceil(cache_seqlens[i] / {plan.PAGE_SIZE})])",
                "point every used page at a page of k_cache"))
        requests_off, parts_off = np.flatnonzero(requests & params.FAULT_PLAN), np.flatnonzero(parts)
        if requests_off.size or parts_off.size:
            what = []
            if requests_off.size:
                what.append("the pieces of " + _listing([f"request {i}" for i in requests_off]))
            if parts_off.size:
                what.append("the rows of " + _listing([f"part {j}" for j in parts_off]))
            found.append(Violation(
                "tile_scheduler_metadata, num_splits", "a plan that differs from the plan for these "
                f"cache_seqlens in {' and in '.join(what)}",
                "what get_mla_metadata returns for these cache_seqlens",
                "call get_mla_metadata again whenever cache_seqlens change (once per decode step)"))
        return found

    def _bad_entries(self, request: int, length: int, block_table: int, stream: int) -> list[str]:
        """"block_table[i, j] = v" for the out-of-range entries among the pages request i uses."""
        p = self._problem
        width, num_blocks = p.block_table.shape[1], p.k_cache.shape[0]
        pages = -(-min(max(int(length), 0), width * plan.PAGE_SIZE) // plan.PAGE_SIZE)
        row = launch.read_int32(block_table + request * p.block_table.strides[0] * 4, pages, stream, p.device_id)
        bad = np.flatnonzero((row < 0) | (row >= num_blocks))
        return [f"block_table[{request}, {j}] = {row[j]}" for j in bad[:3]] + (
            [f"{len(bad) - 3} more in row {request}"] if len(bad) > 3 else [])


def _listing(items: list[str]) -> str:
    """The first NAMED items, and how many were left out."""
    more = f" (and {len(items) - NAMED} more)" if len(items) > NAMED else ""
    return ", ".join(items[:NAMED]) + more
