"""Checked mode (checked.py) on a fake H100 (devtools/fake_cuda.py) whose device memory is a dict of
words and whose planner and check kernel are numpy twins run at their launches: the host side's
scratch layout, parameter structs, single synchronisation and messages are tested here, the CUDA
check kernel itself by tests/gpu/test_guards_gpu.py.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import fake_cuda
from flashmla_cupy import env, flash_mla_with_kvcache, lookup, params, plan, prepared
from flashmla_cupy.errors import InvalidInputError
from test_hot_path import torch_args

BATCH, WIDTH, NUM_BLOCKS, PARTS = 3, 4, 12, 4


def scheduler_twin(driver, args):
    p = params.SchedulerParams.from_buffer_copy(args[0])
    metadata, num_splits = plan.plan_numpy(driver.read_int32(p.seqlens, p.batch), p.num_parts)
    driver.write_int32(p.metadata, metadata)
    driver.write_int32(p.num_splits, num_splits)


def check_twin(driver, args):
    """kernels_src/check.cu in numpy; it reads only the words the kernel may read (others fail)."""
    p = params.CheckParams.from_buffer_copy(args[0])
    seqlens = driver.read_int32(p.seqlens, p.batch).astype(np.int64)
    splits, plan_splits = driver.read_int32(p.num_splits, p.batch + 1), driver.read_int32(p.plan_num_splits, p.batch + 1)
    capacity = p.block_table_width * p.page_size
    faults = []
    for i, seqlen in enumerate(seqlens):
        f = params.FAULT_LENGTH if seqlen < 0 or seqlen > capacity else 0
        if splits[i + 1] - splits[i] != plan_splits[i + 1] - plan_splits[i] or (i == 0 and splits[0] != 0):
            f |= params.FAULT_PLAN
        pages = -(-min(max(seqlen, 0), capacity) // p.page_size)
        row = driver.read_int32(p.block_table + 4 * i * p.block_table_stride, pages)
        if ((row < 0) | (row >= p.num_blocks)).any():
            f |= params.FAULT_BLOCK
        faults.append(f)
    fields = p.num_parts * params.METADATA_FIELDS
    rows = driver.read_int32(p.metadata, fields) != driver.read_int32(p.plan_metadata, fields)
    faults += [params.FAULT_PLAN if row.any() else 0 for row in rows.reshape(p.num_parts, -1)]
    header = driver.read_int32(p.report, params.REPORT_HEADER)   # must have been zeroed
    flagged = np.array(faults) != 0
    header[params.REPORT_FLAGGED_REQUESTS] += flagged[:p.batch].sum()
    header[params.REPORT_FLAGGED_PARTS] += flagged[p.batch:].sum()
    header[params.REPORT_FAULTS] |= np.bitwise_or.reduce(faults)
    driver.write_int32(p.report, header)
    driver.write_int32(p.report + 4 * params.REPORT_HEADER, faults)


@pytest.fixture
def gpu(monkeypatch):
    state = fake_cuda.fake_gpu(monkeypatch)
    state.driver.kernels.update({fake_cuda.SCHEDULER_FN: scheduler_twin, fake_cuda.CHECK_FN: check_twin})
    monkeypatch.delenv(env.CHECK, raising=False)
    return state


def call_with(gpu, seqlens, table, plan_seqlens=None, row_stride=WIDTH, **kwargs):
    """A checked call over these device contents (the plan made for `plan_seqlens`, by default the
    lengths themselves). Unused block-table words are left unwritten: reading one fails."""
    t = gpu.torch
    args = torch_args(t, batch=BATCH, num_blocks=NUM_BLOCKS, max_blocks=WIDTH, num_parts=PARTS)
    args["block_table"] = t.tensor((BATCH, WIDTH), t.int32, strides=(row_stride, 1))
    d = gpu.driver
    d.write_int32(args["cache_seqlens"].data_ptr(), seqlens)
    for i, row in enumerate(table):
        d.write_int32(args["block_table"].data_ptr() + 4 * i * row_stride, row)
    metadata, num_splits = plan.plan_numpy(np.array(seqlens if plan_seqlens is None else plan_seqlens), PARTS)
    d.write_int32(args["tile_scheduler_metadata"].data_ptr(), metadata)
    d.write_int32(args["num_splits"].data_ptr(), num_splits)
    return flash_mla_with_kvcache(**args, **({"check": True} | kwargs))


GOOD_LENGTHS = [100, 256, 0]                 # 2, 4 and 0 pages of a width-4 table
GOOD_TABLE = [[3, 7], [0, 11, 5, 2], []]     # only the used pages are written


def kinds(gpu) -> list[int]:
    return [launch["function"] for launch in gpu.driver.launches]


def rejected(gpu, *args, **kwargs) -> list:
    with pytest.raises(InvalidInputError) as info:
        call_with(gpu, *args, **kwargs)
    assert kinds(gpu) == [fake_cuda.SCHEDULER_FN, fake_cuda.CHECK_FN]   # and no decode
    return info.value.violations


def test_valid_contents_pass_with_one_synchronisation(gpu):
    call_with(gpu, GOOD_LENGTHS, GOOD_TABLE, row_stride=6)
    assert kinds(gpu) == [fake_cuda.SCHEDULER_FN, fake_cuda.CHECK_FN, fake_cuda.DECODE_FN, fake_cuda.COMBINE_FN]
    assert gpu.driver.syncs == [fake_cuda.STREAM]
    schedule, check = (gpu.driver.launches[i] for i in (0, 1))
    s, c = params.SchedulerParams.from_buffer_copy(schedule["args"][0]), params.CheckParams.from_buffer_copy(check["args"][0])
    assert (s.batch, s.num_parts) == (BATCH, PARTS) and (s.metadata, s.num_splits) == (c.plan_metadata, c.plan_num_splits)
    assert (c.batch, c.num_parts, c.num_blocks, c.block_table_width, c.block_table_stride) == (BATCH, PARTS, NUM_BLOCKS, WIDTH, 6)
    assert check["grid"] == (BATCH + PARTS, 1, 1) and schedule["stream"] == check["stream"] == fake_cuda.STREAM
    # one scratch buffer: the report, then the plan, each used where the other does not reach
    assert c.plan_metadata == c.report + 4 * (params.REPORT_HEADER + BATCH + PARTS)
    assert c.plan_num_splits == c.plan_metadata + 4 * PARTS * params.METADATA_FIELDS
    scratch = gpu.allocations[-4]
    assert scratch[1] == (params.REPORT_HEADER + BATCH + PARTS + PARTS * params.METADATA_FIELDS + BATCH + 1,)


@pytest.mark.parametrize("lengths, named", [([300, 256, 0], "cache_seqlens[0] = 300"),
                                            ([100, 256, -1], "cache_seqlens[2] = -1")])
def test_lengths_past_the_table_or_negative(gpu, lengths, named):
    table = [[3, 7, 1, 4, 9][:WIDTH], *GOOD_TABLE[1:]]
    (v,) = rejected(gpu, lengths, table)
    assert v.argument == "cache_seqlens" and v.seen == named and "= 256" in v.expected


@pytest.mark.parametrize("bad", [NUM_BLOCKS, -1, 2**31 - 1])
def test_block_indices_out_of_range(gpu, bad):
    (v,) = rejected(gpu, GOOD_LENGTHS, [[3, 7], [0, 11, bad, 2], []])
    assert v.argument == "block_table" and v.seen == f"block_table[1, 2] = {bad}"
    assert f"num_blocks = {NUM_BLOCKS}" in v.expected


def test_entries_past_the_used_pages_are_not_read(gpu):
    """The twin reads only words that were written: the used pages of each row."""
    call_with(gpu, [1, 64, 0], [[3], [11], []])
    assert kinds(gpu)[-1] == fake_cuda.COMBINE_FN


def test_a_plan_for_other_lengths(gpu):
    (v,) = rejected(gpu, GOOD_LENGTHS, GOOD_TABLE, plan_seqlens=[100, 5000, 0])
    assert v.argument == "tile_scheduler_metadata, num_splits" and "request 1" in v.seen and "part 0" in v.seen
    assert "get_mla_metadata again" in v.fix


def test_every_fault_at_once(gpu):
    violations = rejected(gpu, [100, 300, 0], [[3, 99], [0, 11, 5, 2], []], plan_seqlens=[100, 64, 0])
    assert [v.argument for v in violations] == ["cache_seqlens", "block_table", "tile_scheduler_metadata, num_splits"]
    assert violations[1].seen == "block_table[0, 1] = 99"


def test_a_failed_check_leaves_the_layout_usable(gpu):
    with pytest.raises(InvalidInputError):
        call_with(gpu, GOOD_LENGTHS, [[3, 12], [0, 11, 5, 2], []])
    call_with(gpu, GOOD_LENGTHS, GOOD_TABLE)
    assert kinds(gpu)[-2:] == [fake_cuda.DECODE_FN, fake_cuda.COMBINE_FN]


def test_no_check_during_graph_capture(gpu):
    gpu.driver.capturing = True
    with pytest.raises(InvalidInputError) as info:
        call_with(gpu, GOOD_LENGTHS, GOOD_TABLE)
    assert [v.argument for v in info.value.violations] == ["check"] and gpu.driver.launches == []


def test_unchecked_calls_are_plain_decode_calls(gpu, monkeypatch):
    call_with(gpu, GOOD_LENGTHS, GOOD_TABLE, check=None)
    call_with(gpu, GOOD_LENGTHS, GOOD_TABLE, check=False)
    monkeypatch.setenv(env.CHECK, "1")
    call_with(gpu, GOOD_LENGTHS, GOOD_TABLE, check=False)   # the argument wins over the variable
    assert fake_cuda.CHECK_FN not in kinds(gpu)
    assert {type(c) for c in lookup.remembered().values()} == {prepared.DecodeCall}


def test_the_variable_turns_it_on(gpu, monkeypatch):
    monkeypatch.setenv(env.CHECK, "1")
    call_with(gpu, GOOD_LENGTHS, GOOD_TABLE, check=None)
    assert kinds(gpu)[:2] == [fake_cuda.SCHEDULER_FN, fake_cuda.CHECK_FN]


def test_check_must_be_a_bool(gpu):
    with pytest.raises(InvalidInputError) as info:
        call_with(gpu, GOOD_LENGTHS, GOOD_TABLE, check="yes")
    assert [v.argument for v in info.value.violations] == ["check"]


def test_report_layout_is_pinned_in_the_kernel():
    from flashmla_cupy import variants

    pinned = variants.check_variant().pinned_constants
    assert pinned["flashmla::kReportHeader"] == params.REPORT_HEADER
    assert {pinned[f"flashmla::kFault{n}"] for n in ("Length", "Block", "Plan")} == {1, 2, 4}
    assert ctypes.sizeof(params.CheckParams) % 8 == 0


def test_a_drifted_check_params_fails_compilation(monkeypatch):
    """CheckParams lives in check.cu, not params.cuh: its layout is pinned all the same."""
    from flashmla_cupy import compiler, errors, variants

    class CheckParams(ctypes.Structure):   # the real one plus a field check.cu does not have
        _fields_ = [*params.CheckParams._fields_, ("added_in_python_only", ctypes.c_int64)]

    monkeypatch.setitem(params.OWN_STRUCTS, "check", (CheckParams,))
    with pytest.raises(errors.CompileError, match="CheckParams"):
        compiler.compile_variant(variants.check_variant())
