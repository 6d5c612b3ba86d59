"""Caller-provided outputs (`out=`, `lse=`): written in place, checked like every input, and kept
apart from calls that allocate their outputs. On a fake H100 (tests/fake_cuda.py)."""
from __future__ import annotations

import pytest

import fake_cuda
from fake_dlpack import BASE_PTR, FakeTorch, decode_args
from flashmla_cupy import flash_mla_with_kvcache, lookup, params, plan
from flashmla_cupy.errors import InvalidInputError
from test_hot_path import decode_params, forbid_the_general_road, torch_args

STREAM = 0x5000


@pytest.fixture
def gpu(monkeypatch):
    return fake_cuda.fake_gpu(monkeypatch)


def torch_outputs(torch, batch=2, seqlen_q=1, heads_q=16):
    return (torch.tensor((batch, seqlen_q, heads_q, 512), torch.bfloat16),
            torch.tensor((batch, heads_q, seqlen_q), torch.float32))


def written(gpu) -> tuple[int, int, int, int]:
    """(decode out, decode lse, combine out, combine lse) of the last call."""
    decode, combine = gpu.driver.launches[-2:]
    p, c = decode_params(decode), params.CombineParams.from_buffer_copy(combine["args"][0])
    return p.out, p.lse, c.out, c.lse


def workspace_floats(batch=2, heads_q=16, num_parts=4):
    return plan.partial_slots(batch, num_parts) * heads_q * 513


def test_outputs_are_written_in_place_and_returned(gpu, monkeypatch):
    t = gpu.torch
    for repeat in range(3):   # the first call prepares, the next ones replay
        out, lse = torch_outputs(t)
        got = flash_mla_with_kvcache(**torch_args(t), out=out, lse=lse)
        assert got[0] is out and got[1] is lse
        assert written(gpu) == (out.data_ptr(), lse.data_ptr(), out.data_ptr(), lse.data_ptr())
        assert [a[1] for a in gpu.allocations] == [(workspace_floats(),)] * (repeat + 1)   # only workspaces
        if repeat == 1:
            forbid_the_general_road(monkeypatch)


@pytest.mark.parametrize("given", ["out", "lse"])
def test_one_output_given_the_other_allocated(gpu, given):
    t = gpu.torch
    out, lse = torch_outputs(t)
    buffers = {"out": out, "lse": lse}
    got_out, got_lse = flash_mla_with_kvcache(**torch_args(t), **{given: buffers[given]})
    assert (got_out if given == "out" else got_lse) is buffers[given]
    allocated = got_lse if given == "out" else got_out
    assert allocated is not buffers["lse" if given == "out" else "out"]
    shapes = [a[1] for a in gpu.allocations]
    assert shapes == [(2, 16, 1) if given == "out" else (2, 1, 16, 512), (workspace_floats(),)]
    assert written(gpu)[:2] == (got_out.data_ptr(), got_lse.data_ptr())


def test_allocating_and_writing_calls_are_prepared_apart(gpu):
    t = gpu.torch
    flash_mla_with_kvcache(**torch_args(t))
    out, lse = torch_outputs(t)
    flash_mla_with_kvcache(**torch_args(t), out=out, lse=lse)
    assert written(gpu)[:2] == (out.data_ptr(), lse.data_ptr())
    fresh, _ = flash_mla_with_kvcache(**torch_args(t))
    assert written(gpu)[0] == fresh.data_ptr() != out.data_ptr()
    assert len(lookup.remembered()) == 2 * 2   # per call: a key from views and one from attributes


def violations(gpu, **outputs):
    args = decode_args()
    with pytest.raises(InvalidInputError) as info:
        flash_mla_with_kvcache(**args, **outputs, stream=STREAM)
    assert gpu.allocations == [] and gpu.driver.launches == []
    return [(v.argument, v.expected) for v in info.value.violations]


def test_every_output_rule_in_one_error(gpu):
    found = violations(
        gpu,
        out=FakeTorch((2, 1, 16, 576), "fp16", ptr=BASE_PTR + (6 << 30) + 4),         # shape, dtype, address
        lse=FakeTorch((2, 16, 1), "bf16", strides=(16, 1, 16), ptr=BASE_PTR + (7 << 30) + 2))   # dtype, address
    assert found == [
        ("out.shape", "[2, 1, 16, 512], i.e. [batch, seqlen_q, heads_q, 512]"),
        ("out.dtype", "bfloat16"),
        ("out.data_ptr", "a 16-byte aligned address (the kernels' stores)"),
        ("lse.dtype", "float32"),
        ("lse.data_ptr", "a 4-byte aligned address (the kernels' stores)"),
    ]


def test_outputs_must_be_contiguous(gpu):
    found = violations(gpu, out=FakeTorch((2, 1, 16, 512), "bf16", strides=(16384, 8192, 512, 1), ptr=BASE_PTR),
                       lse=FakeTorch((2, 16, 1), "fp32", strides=(32, 1, 1), ptr=BASE_PTR + (7 << 30)))
    assert found == [("out.strides", "contiguous strides [8192, 8192, 512, 1]"),
                     ("lse.strides", "contiguous strides [16, 1, 1]")]


def test_outputs_on_another_device_or_the_host(gpu):
    from fake_dlpack import KDL_CPU
    found = violations(gpu, out=FakeTorch((2, 1, 16, 512), "bf16", device_id=1, ptr=BASE_PTR + (6 << 30)),
                       lse=FakeTorch((2, 16, 1), "fp32", device_type=KDL_CPU, ptr=BASE_PTR + (7 << 30)))
    assert [name for name, _ in found] == ["out.device", "lse.device"]


class FakeJaxArray(FakeTorch):
    """An array that a JAX module made (framework detection reads the type's module)."""


FakeJaxArray.__module__ = "jaxlib._jax"


def test_jax_arrays_are_immutable(gpu):
    found = violations(gpu, out=FakeJaxArray((2, 1, 16, 512), "bf16", ptr=BASE_PTR + (6 << 30)))
    assert found == [("out", "a writable CUDA array (torch, CuPy)")]


def test_an_lse_shaped_out_after_good_calls_is_rejected(gpu):
    t = gpu.torch
    _, lse = torch_outputs(t)
    for _ in range(2):
        flash_mla_with_kvcache(**torch_args(t), lse=torch_outputs(t)[1])
    launches = len(gpu.driver.launches)
    with pytest.raises(InvalidInputError) as info:
        flash_mla_with_kvcache(**torch_args(t), out=lse)
    assert [v.argument for v in info.value.violations] == ["out.shape", "out.dtype"]
    assert len(gpu.driver.launches) == launches


def test_cupy_outputs(gpu, monkeypatch):
    import ml_dtypes
    import numpy as np

    from test_hot_path import cupy_args
    new = fake_cuda.fake_cupy(monkeypatch, gpu.torch)
    for _ in range(2):
        out, lse = new((2, 1, 16, 512), ml_dtypes.bfloat16), new((2, 16, 1), np.float32)
        got = flash_mla_with_kvcache(**cupy_args(new), out=out, lse=lse)
        assert got == (out, lse)
        assert written(gpu) == (out.data.ptr, lse.data.ptr, out.data.ptr, lse.data.ptr)
