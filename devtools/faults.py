"""Calls with bad device contents, and what the API promises for each (flash_mla_with_kvcache's
docstring): the scenarios of tests/gpu/test_guards_gpu.py and, under compute-sanitizer memcheck, of
scripts/guard_cases.py.

Unchecked, a request that uses a page past the block table's width or a block index outside
[0, num_blocks) gets NaN rows, as does a split request whose partial slots fall outside the workspace;
a plan made for other lengths or another batch gives unspecified values; the other requests of a
call keep their exact results where the promise covers them (`exact`), and nothing is touched
outside the arrays (memcheck's part). Checked (check=True), each fault raises InvalidInputError
naming the argument and the offending requests (`violations`, `named`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flashmla_cupy import reference
from flashmla_cupy.plan import PAGE_SIZE
from flashmla_cupy.reference import HEAD_DIM_V
from gpu_cases import to_device, to_numpy

# Requests of several sizes: with h_q = 64 on a 132-SM Hopper most are split into pieces, request 2
# (one page) and 4 (empty) are not.
SEQLENS = (300, 1000, 64, 5000, 0, 130)
HEADS_Q = 64
PLAN = "plan"   # Fault.metadata / num_splits: "as get_mla_metadata returns for the call's lengths"


@dataclass
class Fault:
    """One call with bad device contents. Arrays are numpy; `None` fields mean "as the case has it"."""

    name: str
    seqlens: np.ndarray | None = None        # cache_seqlens passed to the decode
    block_table: np.ndarray | None = None
    plan_seqlens: np.ndarray | None = None   # the lengths the plan is made for (default: seqlens)
    edit_plan: object = None                 # (metadata, num_splits, batch, num_parts) -> (metadata, num_splits), numpy
    nan: list[int] = field(default_factory=list)     # requests whose rows must all be NaN (out and lse)
    exact: list[int] = field(default_factory=list)   # requests that must match the float64 reference
    violations: list[str] = field(default_factory=list)   # arguments checked mode must name
    named: list[str] = field(default_factory=list)        # text checked mode's message must contain


def case(seed: int) -> reference.Case:
    rng = np.random.default_rng(seed)
    return reference.random_case(rng, len(SEQLENS), 1, HEADS_Q, 1, np.array(SEQLENS), "bf16")


def pages(length: int) -> int:
    return -(-max(int(length), 0) // PAGE_SIZE)


def everyone_but(*requests: int) -> list[int]:
    return [i for i in range(len(SEQLENS)) if i not in requests]


def bad_block(c: reference.Case, victim: int, value: int) -> Fault:
    page = pages(SEQLENS[victim]) // 2
    table = c.block_table.copy()
    table[victim, page] = value
    return Fault(f"block {value} in request {victim}", block_table=table, nan=[victim], exact=everyone_but(victim),
                 violations=["block_table"], named=[f"block_table[{victim}, {page}] = {value}"])


def length_past_table(c: reference.Case, victim: int) -> Fault:
    """The plan is made for these lengths. Within its width the victim's row also holds the huge
    entries past its own pages, so checked mode names both."""
    seqlens = c.cache_seqlens.copy()
    seqlens[victim] = (c.block_table.shape[1] + 2) * PAGE_SIZE + 5
    return Fault(f"length past the table in request {victim}", seqlens=seqlens, nan=[victim],
                 exact=everyone_but(victim), violations=["cache_seqlens", "block_table"],
                 named=[f"cache_seqlens[{victim}] = {seqlens[victim]}"])


def negative_length(c: reference.Case, victim: int) -> Fault:
    """Checked mode only: the API promises nothing for a negative length but memory safety."""
    seqlens = c.cache_seqlens.copy()
    seqlens[victim] = -5
    return Fault(f"negative length in request {victim}", seqlens=seqlens, violations=["cache_seqlens"],
                 named=[f"cache_seqlens[{victim}] = -5"])


def plan_for(c: reference.Case, lengths, name: str) -> Fault:
    return Fault(name, plan_seqlens=np.asarray(lengths, dtype=np.int32),
                 violations=["tile_scheduler_metadata, num_splits"])


def plan_of_another_batch(c: reference.Case) -> Fault:
    """tile_scheduler_metadata of a plan for five more requests (num_splits must have b + 1 entries
    to pass the shape rules: its first b + 1)."""
    longer = np.concatenate([c.cache_seqlens, [4000, 0, 64, 9000, 7]]).astype(np.int32)
    return Fault("plan of another batch", plan_seqlens=longer, edit_plan=lambda m, s, b, p: (m, s[:b + 1]),
                 violations=["tile_scheduler_metadata, num_splits"])


def slots_outside_workspace(c: reference.Case, victim: int = 1) -> Fault:
    """num_splits moved by the workspace's whole capacity (batch + parts slots) after `victim`: the
    victim gets that many more pieces, most of them outside the workspace, and every later split
    request all of its pieces. Single-piece requests after it bypass the workspace: unspecified."""
    fault = Fault("partial slots outside the workspace", exact=list(range(victim)),
                  violations=["tile_scheduler_metadata, num_splits"], named=[f"request {victim}"])

    def edit(metadata, num_splits, batch, num_parts):
        pieces = np.diff(num_splits)
        fault.nan = [victim] + [i for i in range(victim + 1, batch) if pieces[i] > 1]
        edited = num_splits.copy()
        edited[victim + 1:] += batch + num_parts
        return metadata, edited

    fault.edit_plan = edit
    return fault


def _num_blocks(c: reference.Case) -> int:
    return c.k_cache.shape[0]


# (id, builder of the Fault for a case): every fault whose unchecked result is documented, or at
# least memory-safe; checked mode must reject each.
UNCHECKED = [
    *[(f"block-{label}-request{victim}", lambda c, v=victim, f=value: bad_block(c, v, f(c)))
      for victim in (1, 3)
      for label, value in (("num_blocks", _num_blocks), ("minus1", lambda c: -1),
                           ("int_max", lambda c: 2**31 - 1), ("int_min", lambda c: -2**31))],
    ("length-past-table-request1", lambda c: length_past_table(c, 1)),
    ("length-past-table-last", lambda c: length_past_table(c, len(SEQLENS) - 1)),
    ("lengths-shrank-after-planning", lambda c: Fault(
        "lengths shrank after planning", seqlens=np.array([300, 10, 64, 100, 0, 0], dtype=np.int32),
        plan_seqlens=c.cache_seqlens, violations=["tile_scheduler_metadata, num_splits"])),
    ("lengths-grew-after-planning", lambda c: plan_for(c, np.array(SEQLENS) // 4, "lengths grew after planning")),
    ("plan-of-another-batch", plan_of_another_batch),
    ("slots-outside-workspace", slots_outside_workspace),
]
CHECKED = UNCHECKED + [("negative-length", lambda c: negative_length(c, 2))]


def run(c: reference.Case, fault: Fault, check: bool | None = None, framework: str = "cupy"):
    """The fault's call through the public API; numpy (out, lse). Raises what the call raises."""
    import flashmla_cupy

    seqlens = c.cache_seqlens if fault.seqlens is None else fault.seqlens
    table = c.block_table if fault.block_table is None else fault.block_table
    q, k_cache, block_table, lengths = (to_device(framework, x) for x in (c.q, c.k_cache, table, seqlens))
    plan_lengths = lengths if fault.plan_seqlens is None else to_device(framework, fault.plan_seqlens)
    rows = c.q.shape[1] * c.q.shape[2] // c.heads_kv
    metadata, num_splits = flashmla_cupy.get_mla_metadata(plan_lengths, rows, c.heads_kv)
    if fault.edit_plan is not None:
        host = fault.edit_plan(to_numpy(framework, metadata), to_numpy(framework, num_splits), len(seqlens),
                               metadata.shape[0])
        metadata, num_splits = (to_device(framework, np.ascontiguousarray(x, dtype=np.int32)) for x in host)
    out, lse = flashmla_cupy.flash_mla_with_kvcache(q, k_cache, block_table, lengths, HEAD_DIM_V, metadata,
                                                    num_splits, softmax_scale=c.softmax_scale, causal=c.causal,
                                                    check=check)
    return to_numpy(framework, out, c.dtype), to_numpy(framework, lse)


def verify(fault: Fault, out: np.ndarray, lse: np.ndarray, c: reference.Case, ref: tuple) -> dict:
    """Assert the documented result, `ref` being c.reference(); returns what was checked."""
    for i in fault.nan:
        assert np.isnan(out[i].astype(np.float32)).all() and np.isnan(lse[i]).all(), \
            f"{fault.name}: request {i} is not NaN in every row (out NaN {np.isnan(out[i].astype(np.float32)).mean():.2f}, " \
            f"lse NaN {np.isnan(lse[i]).mean():.2f})"
    report = {}
    if fault.exact:
        ref_out, ref_lse = ref
        keep = fault.exact
        try:
            report = reference.check_close(out[keep], lse[keep], ref_out[keep], ref_lse[keep], c.dtype, c.lse_atol)
        except AssertionError as exc:
            raise AssertionError(f"{fault.name}: requests {keep}: {exc}") from None
    return {"nan_requests": fault.nan, "exact_requests": fault.exact, **report}
