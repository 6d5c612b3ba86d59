"""Bad inputs are rejected with one error listing every problem, before anything is launched.

The public functions are called with fake CUDA DLPack producers on a fake H100 (devtools/fake_cuda.py):
its driver records launches, and allocations are recorded too, so a rejection can be shown to have
reached neither.
"""
from __future__ import annotations

import ctypes
import math

import ml_dtypes
import numpy as np
import pytest

import fake_cuda
from fake_dlpack import BASE_PTR, KDL_CPU, FakeJax, FakeTorch, decode_args
from flashmla_cupy import (flash_mla_with_kvcache, get_mla_metadata, inputs, kernels, launch, params, plan, tensors,
                           variants)
from flashmla_cupy.errors import InvalidInputError, UnsupportedDeviceError

STREAM = 0x5000


@pytest.fixture
def gpu(monkeypatch):
    return fake_cuda.fake_gpu(monkeypatch)


def untouched(gpu) -> bool:
    """Nothing was allocated or launched."""
    return gpu.allocations == [] and gpu.driver.launches == []


def reject(gpu, **changes):
    """Call flash_mla_with_kvcache with `changes` applied to a valid call; return the violations."""
    args = decode_args()
    args.update(changes)
    with pytest.raises(InvalidInputError) as info:
        flash_mla_with_kvcache(**args, stream=STREAM)
    assert untouched(gpu)   # rejected before any allocation or launch
    return info.value.violations


def arguments(violations):
    return [v.argument for v in violations]


# one test per kind of bad input

def test_wrong_dtype(gpu):
    v = reject(gpu, q=FakeTorch((2, 1, 16, 576), "fp32"))
    assert arguments(v) == ["q.dtype"]
    assert v[0].seen == "float32" and "bfloat16 or float16" in v[0].expected


def test_k_cache_dtype_must_match_q(gpu):
    v = reject(gpu, k_cache=FakeTorch((8, 64, 1, 576), "fp16"))
    assert arguments(v) == ["k_cache.dtype"] and v[0].expected == "bfloat16 (the dtype of q) or float8_e4m3fn"


def test_wrong_rank(gpu):
    v = reject(gpu, q=FakeTorch((2, 16, 576), "bf16"))
    assert arguments(v) == ["q.shape"] and "4-D" in v[0].expected


def test_batch_mismatch(gpu):
    v = reject(gpu, block_table=FakeTorch((3, 4), "int32"), cache_seqlens=FakeTorch((1,), "int32"))
    assert arguments(v) == ["block_table.shape[0]", "cache_seqlens.shape[0]"]
    assert v[0].seen == "3" and v[0].expected.startswith("2")


def test_non_contiguous_last_dim(gpu):
    v = reject(gpu, q=FakeTorch((2, 1, 16, 576), "bf16", strides=(2 * 16 * 1152, 16 * 1152, 1152, 2)))
    assert arguments(v) == ["q.strides"] and "stride 1" in v[0].expected


def test_q_other_strides_are_free():
    q = FakeTorch((2, 1, 16, 576), "bf16", strides=(50000, 8, 640, 1))
    args = {k: tensors.take(a, k) if hasattr(a, "__dlpack__") else a
            for k, a in decode_args().items()} | {"q": tensors.take(q, "q")}
    problem = inputs.check_decode_args(**args, softmax_scale=None, causal=False)
    assert problem.q.strides == (50000, 8, 640, 1)


def test_q_rows_must_allow_16_byte_loads(gpu):
    v = reject(gpu, q=FakeTorch((2, 1, 16, 576), "bf16", strides=(5000, 7, 600, 1)))
    assert arguments(v) == ["q.strides"] and "16" in v[0].expected


def test_negative_strides(gpu):
    v = reject(gpu, q=FakeTorch((2, 1, 16, 576), "bf16", strides=(-9216, 9216, 576, 1)))
    assert arguments(v) == ["q.strides"] and "non-negative" in v[0].expected


def test_misaligned_tma_stride(gpu):
    # A row pitch of 577 elements = 1154 bytes: not a multiple of 16.
    k = FakeTorch((8, 64, 1, 576), "bf16", strides=(64 * 577, 577, 577, 1), ptr=BASE_PTR)
    v = reject(gpu, k_cache=k)
    assert arguments(v) == ["k_cache.strides"] and "TMA" in v[0].expected


def test_misaligned_tma_base(gpu):
    v = reject(gpu, k_cache=FakeTorch((8, 64, 1, 576), "bf16", ptr=BASE_PTR + 2))
    assert arguments(v) == ["k_cache.data_ptr"] and "16-byte aligned" in v[0].expected


def test_different_devices(gpu):
    v = reject(gpu, k_cache=FakeTorch((8, 64, 1, 576), "bf16", device_id=1))
    assert arguments(v) == ["k_cache.device"]
    assert v[0].seen == "cuda:1" and "cuda:0" in v[0].expected


def test_cpu_tensor(gpu):
    v = reject(gpu, block_table=FakeTorch((2, 4), "int32", device_type=KDL_CPU),
               cache_seqlens=np.zeros(2, np.int32))
    assert arguments(v) == ["block_table.device", "cache_seqlens.device"]
    assert v[1].seen == "cpu:0" and "CUDA" in v[1].expected


def test_int64_index_tensors(gpu):
    v = reject(gpu, block_table=FakeTorch((2, 4), "int64"), cache_seqlens=FakeTorch((2,), "int64"),
               num_splits=FakeTorch((3,), "int64"))
    assert arguments(v) == ["block_table.dtype", "cache_seqlens.dtype", "num_splits.dtype"]
    assert all(x.seen == "int64" and x.expected == "int32" for x in v)


def test_block_table_layout(gpu):
    v = reject(gpu, block_table=FakeTorch((2, 4), "int32", strides=(1, 2)))
    assert arguments(v) == ["block_table.strides", "block_table.strides[0]"]


def test_block_table_row_stride_is_free(gpu):
    args = decode_args(num_blocks=8, max_blocks=4)
    args["block_table"] = FakeTorch((2, 4), "int32", strides=(100, 1))
    flash_mla_with_kvcache(**args, stream=STREAM)
    p = params.DecodeParams.from_buffer_copy(gpu.driver.launches[0]["args"][0])
    # The kernel walks rows by the stride and bounds pages by the width and blocks by num_blocks.
    assert (p.block_table_stride, p.block_table_width, p.num_blocks) == (100, 4, 8)


def test_an_array_that_cannot_be_exported_hides_no_other_violation(gpu):
    class Refusing(FakeTorch):
        def __dlpack__(self, **kwargs):
            raise BufferError("Can't export this")

    v = reject(gpu, q=np.zeros((2, 1, 16, 576), ml_dtypes.bfloat16), block_table=Refusing((2, 4), "int32"),
               k_cache=FakeTorch((8, 64, 1, 576), "fp32"), cache_seqlens=FakeTorch((2,), "int64"), causal=1)
    assert arguments(v) == ["q", "block_table", "k_cache.dtype", "cache_seqlens.dtype", "causal"]
    assert "BufferError" in v[0].seen and v[0].fix.startswith("move q to the GPU")
    assert "Can't export this" in v[1].seen
    with pytest.raises(InvalidInputError) as info:
        get_mla_metadata(Refusing((2,), "int32"), 0, 1, stream=STREAM)
    assert arguments(info.value.violations) == ["cache_seqlens", "num_q_tokens_per_head_k"]


@pytest.mark.parametrize("value", [256, 576, "512", 512.0, None])
def test_head_dim_v(gpu, value):
    v = reject(gpu, head_dim_v=value)
    assert arguments(v) == ["head_dim_v"] and v[0].expected.startswith("512")


def test_head_dim_not_576(gpu):
    v = reject(gpu, q=FakeTorch((2, 1, 16, 512), "bf16"), k_cache=FakeTorch((8, 64, 1, 512), "bf16"))
    assert arguments(v) == ["q.shape[3]", "k_cache.shape[3]"]
    assert v[0].seen == "512" and v[0].expected.startswith("576")


def test_page_size_not_64(gpu):
    v = reject(gpu, k_cache=FakeTorch((8, 32, 1, 576), "bf16"))
    assert arguments(v) == ["k_cache.shape[1]"] and v[0].expected.startswith("64")


def test_heads_not_a_multiple(gpu):
    v = reject(gpu, k_cache=FakeTorch((8, 64, 3, 576), "bf16"))
    assert arguments(v) == ["q.shape[2]"] and "multiple of heads_kv" in v[0].expected


def test_plan_shapes_must_match_the_call(gpu):
    v = reject(gpu, tile_scheduler_metadata=FakeTorch((4, 4), "int32"),
               num_splits=FakeTorch((2,), "int32"))
    assert arguments(v) == ["tile_scheduler_metadata.shape[1]", "num_splits.shape[0]"]
    assert all("get_mla_metadata" in x.fix for x in v)


def test_plan_must_be_contiguous(gpu):
    v = reject(gpu, tile_scheduler_metadata=FakeTorch((4, 8), "int32", strides=(16, 1)))
    assert arguments(v) == ["tile_scheduler_metadata.strides"]


@pytest.mark.parametrize("scale", [0.0, -0.1, math.nan, math.inf, "0.1", True, 1j])
def test_bad_softmax_scale(gpu, scale):
    assert arguments(reject(gpu, softmax_scale=scale)) == ["softmax_scale"]


def test_causal_must_be_bool(gpu):
    assert arguments(reject(gpu, causal="yes")) == ["causal"]


def test_not_an_array(gpu):
    v = reject(gpu, q=[[0.0]], block_table=None)
    assert arguments(v) == ["q", "block_table"]


def test_many_errors_at_once(gpu):
    args = decode_args()
    with pytest.raises(InvalidInputError) as info:
        flash_mla_with_kvcache(
            FakeTorch((2, 1, 16, 576), "fp32"), FakeTorch((8, 32, 3, 576), "bf16", device_id=1),
            FakeTorch((2, 4), "int64"), args["cache_seqlens"], 256,
            args["tile_scheduler_metadata"], FakeTorch((4,), "int32"), softmax_scale=-1.0,
            stream=STREAM)
    assert untouched(gpu)
    assert arguments(info.value.violations) == [
        "k_cache.device", "q.dtype", "k_cache.shape[1]", "q.shape[2]",
        "block_table.dtype", "num_splits.shape[0]", "head_dim_v", "softmax_scale"]
    message = str(info.value)
    assert message.startswith("flash_mla_with_kvcache: 8 invalid inputs:")
    assert "q.dtype: got float32, expected bfloat16 or float16 (or float8_e4m3fn with an FP8 k_cache). Fix: cast q" in message


def test_error_is_value_error_and_type_error(gpu):
    for kind in (ValueError, TypeError):
        with pytest.raises(kind):
            flash_mla_with_kvcache(**(decode_args() | {"head_dim_v": 1}), stream=STREAM)


# get_mla_metadata

@pytest.mark.parametrize("rows, heads, bad", [
    (0, 1, ["num_q_tokens_per_head_k"]), (1.5, 1, ["num_q_tokens_per_head_k"]),
    (16, 0, ["num_heads_k"]), (True, None, ["num_q_tokens_per_head_k", "num_heads_k"])])
def test_metadata_bad_scalars(gpu, rows, heads, bad):
    with pytest.raises(InvalidInputError) as info:
        get_mla_metadata(FakeTorch((4,), "int32"), rows, heads, stream=STREAM)
    assert arguments(info.value.violations) == bad and untouched(gpu)


def test_metadata_bad_seqlens(gpu):
    with pytest.raises(InvalidInputError) as info:
        get_mla_metadata(FakeTorch((4, 1), "int64"), 16, 1, stream=STREAM)
    assert arguments(info.value.violations) == ["cache_seqlens.shape", "cache_seqlens.dtype"]
    assert untouched(gpu)


# the device check and the orchestration

def test_unsupported_gpu(gpu, monkeypatch):
    a100 = launch.DeviceInfo(0, "NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912)
    monkeypatch.setattr(launch, "device_info", lambda device_id: a100)
    with pytest.raises(UnsupportedDeviceError, match=r"A100.*compute capability 8\.0.*Hopper"):
        flash_mla_with_kvcache(**decode_args(), stream=STREAM)
    with pytest.raises(UnsupportedDeviceError):
        get_mla_metadata(FakeTorch((4,), "int32"), 16, 1, stream=STREAM)
    assert untouched(gpu)


def test_metadata_call(gpu):
    seqlens = FakeTorch((5,), "int32", device_id=0)
    get_mla_metadata(seqlens, 128, 1, stream=STREAM)
    parts = plan.num_sm_parts(132, 1, 128)
    assert gpu.allocations == [("other", (parts, 8), "int32", 0, STREAM), ("other", (6,), "int32", 0, STREAM)]
    (run,) = gpu.driver.launches
    p = params.SchedulerParams.from_buffer_copy(run["args"][0])
    assert run["function"] == fake_cuda.SCHEDULER_FN and run["stream"] == STREAM
    assert (p.seqlens, p.batch, p.num_parts, p.page_size) == (BASE_PTR, 5, parts, plan.PAGE_SIZE)
    assert seqlens.streams == [STREAM]


def test_few_rows_launch_the_narrow_kernel(gpu):
    """16 query rows per KV head of a 16-bit cache: decode_narrow's geometry (16 rows a CTA, 160
    threads, its own shared memory), the same parameters and the same combine."""
    args = decode_args(batch=3, seqlen_q=1, heads_q=32, heads_kv=2, num_parts=6, producer=FakeJax)
    flash_mla_with_kvcache(**args, stream=STREAM)
    decode, combine = gpu.driver.launches
    p = params.DecodeParams.from_buffer_copy(decode["args"][0])
    assert decode["grid"] == (1, 2, 6) and decode["block"] == (variants.NARROW_THREADS[None], 1, 1)
    assert decode["shared_bytes"] == variants.NARROW_SHARED_BYTES[(16, None)]
    assert (p.rows, p.heads_per_group, p.num_parts) == (16, 16, 6)
    assert combine["function"] == fake_cuda.COMBINE_FN and combine["pdl"]


def test_decode_call(gpu):
    args = decode_args(batch=3, seqlen_q=2, heads_q=32, heads_kv=2, num_parts=6, producer=FakeJax)
    flash_mla_with_kvcache(**args, causal=True, stream=STREAM)
    slots = plan.partial_slots(3, 6)
    # out, lse, then one workspace holding both partial buffers
    assert [a[1:] for a in gpu.allocations] == [
        ((3, 2, 32, 512), "bfloat16", 0, STREAM), ((3, 32, 2), "float32", 0, STREAM),
        ((slots * 2 * 32 * 512 + slots * 2 * 32,), "float32", 0, STREAM)]
    decode, combine = gpu.driver.launches
    p = params.DecodeParams.from_buffer_copy(decode["args"][0])
    assert (decode["function"], decode["stream"], decode["pdl"]) == (fake_cuda.DECODE_FN, STREAM, False)
    assert decode["grid"] == (1, 2, 6) and decode["block"] == (384, 1, 1)
    assert (p.batch, p.seqlen_q, p.heads_q, p.heads_kv) == (3, 2, 32, 2)
    assert (p.heads_per_group, p.rows, p.num_parts, p.causal) == (16, 32, 6, 1)
    assert (p.per_group.multiplier, p.per_group.shift) == (1, 4)  # 16: n / 16 = (umulhi(n, 1) + n) >> 4
    assert p.scale_log2 == pytest.approx(576 ** -0.5 * math.log2(math.e))
    assert (p.q, p.block_table) == (BASE_PTR, BASE_PTR + (2 << 30))
    assert p.lse_partial == p.out_partial + slots * 2 * 32 * 512 * 4
    assert ctypes.c_uint64.from_buffer_copy(decode["args"][1]).value == BASE_PTR + (1 << 30)  # k_cache map
    c = params.CombineParams.from_buffer_copy(combine["args"][0])
    assert (combine["function"], combine["stream"], combine["pdl"]) == (fake_cuda.COMBINE_FN, STREAM, True)
    assert (c.out, c.lse, c.out_partial, c.lse_partial) == (p.out, p.lse, p.out_partial, p.lse_partial)
    assert c.num_splits == p.num_splits == BASE_PTR + (5 << 30)
    assert (c.per_group.multiplier, c.per_group.shift) == (p.per_group.multiplier, p.per_group.shift)
    assert combine["grid"] == (3, 2 * 32 // kernels.COMBINE_WARPS_PER_BLOCK, 1)
    assert all(a.streams == [STREAM] for a in args.values() if hasattr(a, "streams"))


@pytest.mark.parametrize("batch, num_parts, warps_per_row", [(1, 66, 16), (4, 66, 16), (5, 66, 1), (16, 66, 1),
                                                            (64, 66, 1)])
def test_combine_gives_a_row_a_whole_block_when_requests_are_cut_many_ways(gpu, monkeypatch, batch, num_parts,
                                                                           warps_per_row):
    """Few requests over many parts (each cut into ~num_parts / batch pieces): a block merges each row;
    otherwise a warp does, each in its own build of the combine. The grid covers every row with its
    warps either way. Where each request has ~PARTIAL_F16_WIDE_PARTS_PER_REQUEST pieces or more, the decode
    writes fp16 partial rows and the combine built for them reads them."""
    loaded = []
    get_function = launch.get_function
    monkeypatch.setattr(launch, "get_function", lambda variant, device: loaded.append(variant) or get_function(variant, device))
    flash_mla_with_kvcache(**decode_args(batch=batch, heads_q=128, num_parts=num_parts), stream=STREAM)
    combine = gpu.driver.launches[-1]
    fp16_rows = batch * kernels.PARTIAL_F16_WIDE_PARTS_PER_REQUEST <= num_parts and warps_per_row == 1  # 128 rows
    assert [v.name for v in loaded if v.program != "scheduler"] == [
        variants.decode_variant("bf16", partial16=fp16_rows).name,
        variants.combine_variant("bf16", warps_per_row, partial16=fp16_rows, quad_order=fp16_rows).name]
    assert variants.combine_variant("bf16", warps_per_row).pinned_constants == {"kWarpsPerRow": warps_per_row}
    block_warps = kernels.COMBINE_WARPS_PER_BLOCK if warps_per_row == 1 else warps_per_row
    assert combine["grid"] == (batch, 128 * warps_per_row // block_warps, 1)
    assert combine["block"] == (32 * block_warps, 1, 1)


def test_causal_is_moot_for_one_query_token(gpu):
    flash_mla_with_kvcache(**decode_args(seqlen_q=1), causal=True, softmax_scale=0.1, stream=STREAM)
    p = params.DecodeParams.from_buffer_copy(gpu.driver.launches[0]["args"][0])
    assert p.causal == 0 and p.scale_log2 == pytest.approx(0.1 * math.log2(math.e))
