"""Bad inputs are rejected with one error listing every problem, before anything is launched.

The public functions are called with fake CUDA DLPack producers; the driver-facing modules
(launch, kernels) and the allocator are replaced by stand-ins that fail the test if reached.
"""
from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

import flashmla_cupy
from fake_dlpack import BASE_PTR, KDL_CPU, FakeJax, FakeTorch, decode_args
from flashmla_cupy import flash_mla_with_kvcache, get_mla_metadata, inputs, plan, tensors
from flashmla_cupy.errors import InvalidInputError, UnsupportedDeviceError

STREAM = 0x5000


@dataclass(frozen=True)
class FakeDeviceInfo:
    name: str
    cc: tuple[int, int]
    sm_count: int = 132
    max_smem_optin: int = 232448


def _install(monkeypatch, name, module):
    """Replace flashmla_cupy.<name> for `from . import <name>` inside the package."""
    monkeypatch.setitem(sys.modules, f"flashmla_cupy.{name}", module)
    monkeypatch.setattr(flashmla_cupy, name, module, raising=False)


@pytest.fixture
def gpu(monkeypatch):
    """A fake Hopper device. `gpu.calls` records what reached the kernels, in order; a test that
    expects a rejection asserts it stays empty."""
    state = types.SimpleNamespace(calls=[], info=FakeDeviceInfo("NVIDIA H100 80GB HBM3", (9, 0)))

    launch = types.ModuleType("flashmla_cupy.launch")
    launch.device_info = lambda device_id: state.info

    kernels = types.ModuleType("flashmla_cupy.kernels")
    for fn in ("run_scheduler", "run_decode", "run_combine"):
        setattr(kernels, fn, lambda *args, _fn=fn: state.calls.append((_fn, args)))

    def empty(framework, shape, dtype, device_id, stream=None):
        state.calls.append(("empty", (framework, tuple(shape), np.dtype(dtype), device_id, stream)))
        native = object()
        view = tensors.View(ptr=BASE_PTR, shape=tuple(shape), strides=tensors.contiguous_strides(shape),
                            dtype=np.dtype(dtype), device_type=2, device_id=device_id,
                            framework=framework, obj=native)
        return native, view

    _install(monkeypatch, "launch", launch)
    _install(monkeypatch, "kernels", kernels)
    monkeypatch.setattr(tensors, "empty", empty)
    return state


def reject(gpu, **changes):
    """Call flash_mla_with_kvcache with `changes` applied to a valid call; return the violations."""
    args = decode_args()
    args.update(changes)
    with pytest.raises(InvalidInputError) as info:
        flash_mla_with_kvcache(**args, stream=STREAM)
    assert gpu.calls == []   # rejected before any allocation or launch
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
    assert arguments(v) == ["k_cache.dtype"] and v[0].expected == "bfloat16"


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
    args = decode_args()
    args["block_table"] = FakeTorch((2, 4), "int32", strides=(100, 1))
    flash_mla_with_kvcache(**args, stream=STREAM)


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
    assert gpu.calls == []
    assert arguments(info.value.violations) == [
        "k_cache.device", "q.dtype", "k_cache.shape[1]", "q.shape[2]",
        "block_table.dtype", "num_splits.shape[0]", "head_dim_v", "softmax_scale"]
    message = str(info.value)
    assert message.startswith("flash_mla_with_kvcache: 8 invalid inputs:")
    assert "q.dtype: got float32, expected bfloat16 or float16. Fix: cast q" in message


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
    assert arguments(info.value.violations) == bad and gpu.calls == []


def test_metadata_bad_seqlens(gpu):
    with pytest.raises(InvalidInputError) as info:
        get_mla_metadata(FakeTorch((4, 1), "int64"), 16, 1, stream=STREAM)
    assert arguments(info.value.violations) == ["cache_seqlens.shape", "cache_seqlens.dtype"]
    assert gpu.calls == []


# the device check and the orchestration

def test_unsupported_gpu(gpu):
    gpu.info = FakeDeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), 108)
    with pytest.raises(UnsupportedDeviceError, match=r"A100.*compute capability 8\.0.*Hopper"):
        flash_mla_with_kvcache(**decode_args(), stream=STREAM)
    with pytest.raises(UnsupportedDeviceError):
        get_mla_metadata(FakeTorch((4,), "int32"), 16, 1, stream=STREAM)
    assert gpu.calls == []


def test_metadata_call(gpu):
    seqlens = FakeTorch((5,), "int32", device_id=0)
    metadata, num_splits = get_mla_metadata(seqlens, 128, 1, stream=STREAM)
    parts = plan.num_sm_parts(132, 1, 128)
    assert [c[0] for c in gpu.calls] == ["empty", "empty", "run_scheduler"]
    assert gpu.calls[0][1] == ("other", (parts, 8), np.dtype(np.int32), 0, STREAM)
    assert gpu.calls[1][1] == ("other", (6,), np.dtype(np.int32), 0, STREAM)
    view, _, _, num_parts, stream = gpu.calls[2][1]
    assert view.obj is seqlens and num_parts == parts and stream == STREAM
    assert seqlens.streams == [STREAM]


def test_decode_call(gpu):
    args = decode_args(batch=3, seqlen_q=2, heads_q=32, heads_kv=2, num_parts=6, producer=FakeJax)
    flash_mla_with_kvcache(**args, causal=True, stream=STREAM)
    names = [c[0] for c in gpu.calls]
    assert names == ["empty"] * 3 + ["run_decode", "run_combine"]
    slots = plan.partial_slots(3, 6)
    shapes = [c[1][1] for c in gpu.calls[:3]]
    # out, lse, then one workspace holding both partial buffers
    assert shapes == [(3, 2, 32, 512), (3, 32, 2), (slots * 2 * 32 * 512 + slots * 2 * 32,)]
    problem, out, lse, out_partial, lse_partial, stream = gpu.calls[3][1]
    assert gpu.calls[4][1] == gpu.calls[3][1]
    assert out_partial.shape == (slots, 2, 32, 512) and lse_partial.shape == (slots, 2, 32)
    assert lse_partial.ptr == out_partial.ptr + slots * 2 * 32 * 512 * 4
    assert (problem.batch, problem.seqlen_q, problem.heads_q, problem.heads_kv) == (3, 2, 32, 2)
    assert (problem.heads_per_group, problem.rows, problem.num_parts) == (16, 32, 6)
    assert problem.dtype_name == "bf16" and problem.causal and stream == STREAM
    assert problem.softmax_scale == pytest.approx(576 ** -0.5)
    assert out.shape == (3, 2, 32, 512) and lse.dtype == np.float32
    assert all(a.streams == [STREAM] for a in args.values() if hasattr(a, "streams"))


def test_causal_is_moot_for_one_query_token(gpu):
    flash_mla_with_kvcache(**decode_args(seqlen_q=1), causal=True, softmax_scale=0.1, stream=STREAM)
    problem = gpu.calls[4][1][0]
    assert problem.causal is False and problem.softmax_scale == 0.1


def test_passed_checks_are_remembered_but_only_for_the_same_layout(gpu):
    """A repeated call skips the rules but still describes the new arrays; a call that differs in
    anything the rules read (here only the alignment of k_cache's address) is checked afresh."""
    def problem_of(**changes):
        args = decode_args()
        args.update(changes)
        views = {k: tensors.take(a, k) for k, a in args.items() if hasattr(a, "__dlpack__")}
        return inputs.check_decode_args(views["q"], views["k_cache"], views["block_table"],
                                        views["cache_seqlens"], args["head_dim_v"],
                                        views["tile_scheduler_metadata"], views["num_splits"], None, False)

    first = problem_of()
    moved = problem_of(k_cache=FakeTorch((8, 64, 1, 576), "bf16", ptr=BASE_PTR + (7 << 30)))
    assert moved.k_cache.ptr == BASE_PTR + (7 << 30) and moved.batch == first.batch
    with pytest.raises(InvalidInputError):
        problem_of(k_cache=FakeTorch((8, 64, 1, 576), "bf16", ptr=BASE_PTR + (7 << 30) + 2))
