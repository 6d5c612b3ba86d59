"""tensors.py on the CPU: numpy's own DLPack export, and hand-made CUDA capsules."""
from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest

from fake_dlpack import BASE_PTR, KDL_CUDA, FakeCupy, FakeJax, FakeTorch
from flashmla_cupy import tensors
from flashmla_cupy.errors import InvalidInputError


# numpy: real memory, so pointers and strides can be checked against numpy's own view.

def test_numpy_contiguous():
    a = np.zeros((3, 4, 5), np.float32)
    v = tensors.take(a, "a")
    assert v.shape == (3, 4, 5) and v.strides == (20, 5, 1)
    assert v.ptr == a.ctypes.data and v.dtype == np.float32
    assert (v.device_type, v.device_id, v.framework) == (tensors.DEVICE_CPU, 0, "other")
    assert v.obj is a and v.device == "cpu:0"


@pytest.mark.parametrize("index", [
    (slice(None), slice(1, None, 2)),
    (slice(1, 3), slice(None)),
    (slice(None, None, -1), slice(None)),
])
def test_numpy_strided_views(index):
    base = np.arange(48, dtype=np.int32).reshape(6, 8)
    a = base[index]
    v = tensors.take(a, "a")
    assert v.shape == a.shape
    assert v.strides == tuple(s // a.itemsize for s in a.strides)
    assert v.ptr == a.ctypes.data    # byte_offset folded in


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64,
                                   np.uint8, np.bool_])
def test_numpy_dtypes(dtype):
    assert tensors.take(np.zeros(4, dtype), "a").dtype == np.dtype(dtype)


def test_numpy_array_is_rejected_by_the_gpu_api():
    from flashmla_cupy import get_mla_metadata
    with pytest.raises(InvalidInputError, match=r"cache_seqlens\.device: got cpu:0"):
        get_mla_metadata(np.zeros(4, np.int32), 16, 1)


def test_not_a_dlpack_object():
    with pytest.raises(InvalidInputError, match="a DLPack array"):
        tensors.take([1, 2, 3], "q")


def test_take_all_reports_every_bad_argument():
    views, failed = tensors.take_all({"q": [1], "k_cache": np.zeros(2), "block_table": "x",
                                      "cache_seqlens": np.zeros(2, ml_dtypes.bfloat16)})
    assert [v.argument for v in failed] == ["q", "block_table", "cache_seqlens"]
    assert views["k_cache"].shape == (2,) and views["q"] is views["block_table"] is views["cache_seqlens"] is None


class Refusing(FakeTorch):
    """A producer whose __dlpack__ raises, as torch, JAX or numpy do for what they cannot export."""

    def __init__(self, *args, error=BufferError("cannot export this"), **kwargs):
        super().__init__(*args, **kwargs)
        self.error = error

    def __dlpack__(self, **kwargs):
        raise self.error


@pytest.mark.parametrize("error", [BufferError("DLPack only supports signed/unsigned integers"),
                                   RuntimeError("unsupported layout"), TypeError("odd"), ValueError("")])
def test_a_refused_export_is_an_input_error(error):
    with pytest.raises(InvalidInputError) as info:
        tensors.take(Refusing((4,), "int32", error=error), "cache_seqlens")
    (v,) = info.value.violations
    assert v.argument == "cache_seqlens" and type(error).__name__ in v.seen and "Refusing" in v.seen
    assert v.fix.startswith("pass cache_seqlens as a plain CUDA array")


def test_a_numpy_bfloat16_array_is_an_input_error_with_its_fix():
    with pytest.raises(InvalidInputError) as info:
        tensors.take(np.zeros((2, 4), ml_dtypes.bfloat16), "q")
    (v,) = info.value.violations
    assert "numpy.ndarray" in v.seen and "BufferError" in v.seen
    assert v.fix.startswith("move q to the GPU")


def test_a_device_query_that_raises_is_an_input_error():
    class NoDevice(FakeTorch):
        def __dlpack_device__(self):
            raise RuntimeError("device lost")

    assert tensors.caller_stream([NoDevice((4,), "int32")]) == (0, None)
    with pytest.raises(InvalidInputError, match="RuntimeError: device lost"):
        tensors.take(NoDevice((4,), "int32"), "q")


def test_a_tensor_that_requires_grad_is_exported_detached():
    """torch refuses to export a tensor that requires grad; its detached alias is the same memory."""
    class Tensor(FakeTorch):
        requires_grad = True

        def __dlpack__(self, **kwargs):
            if self.requires_grad:
                raise BufferError("Can't export tensors that require gradient, use tensor.detach()")
            return super().__dlpack__(**kwargs)

        def detach(self):
            alias = Tensor(self.shape, self.dtype, ptr=self.ptr)
            alias.requires_grad = False
            return alias

    Tensor.__module__ = "torch"
    view = tensors.take(Tensor((2, 3), "bf16", ptr=BASE_PTR + 512), "q", stream=5)
    assert (view.ptr, view.shape, view.framework) == (BASE_PTR + 512, (2, 3), "torch")


# hand-made CUDA capsules

@pytest.mark.parametrize("producer", [FakeTorch, FakeJax, FakeCupy])
def test_cuda_capsule_fields(producer):
    a = producer((2, 3, 16, 576), "bf16", device_id=1)
    v = tensors.take(a, "q", stream=77)
    assert v.shape == (2, 3, 16, 576) and v.strides == (3 * 16 * 576, 16 * 576, 576, 1)
    assert v.dtype == np.dtype(ml_dtypes.bfloat16)
    assert (v.ptr, v.device_type, v.device_id) == (BASE_PTR, KDL_CUDA, 1)
    assert v.obj is a and v.device == "cuda:1"
    assert a.streams == [77]


def test_versioned_capsule_requested():
    a, b = FakeTorch((4,), "int32"), FakeJax((4,), "int32")
    tensors.take(a, "a", stream=5)
    tensors.take(b, "b", stream=5)
    assert a.streams == [5]          # versioned on the first try
    assert b.streams == [5]          # refused max_version (a TypeError), asked again without it


@pytest.mark.parametrize("dtype, expected", [
    ("bf16", ml_dtypes.bfloat16), ("fp16", np.float16), ("fp32", np.float32),
    ("int32", np.int32), ("int64", np.int64)])
@pytest.mark.parametrize("producer", [FakeTorch, FakeJax])
def test_cuda_dtypes(producer, dtype, expected):
    assert tensors.take(producer((8,), dtype), "a").dtype == np.dtype(expected)


@pytest.mark.parametrize("producer", [FakeTorch, FakeJax])
def test_non_contiguous_strides(producer):
    a = producer((4, 64, 1, 576), "fp16", strides=(64 * 640, 640, 640, 1))
    assert tensors.take(a, "k").strides == (64 * 640, 640, 640, 1)


@pytest.mark.parametrize("producer", [FakeTorch, FakeJax])
def test_null_strides_mean_contiguous(producer):
    a = producer((2, 5, 7), "fp32", null_strides=True)
    assert tensors.take(a, "a").strides == (35, 7, 1)


def test_byte_offset_is_added():
    a = FakeTorch((4,), "int32", byte_offset=64)
    assert tensors.take(a, "a").ptr == BASE_PTR + 64


@pytest.mark.parametrize("handle, passed", [(0, 1), (1, 1), (2, 2), (0x5555, 0x5555), (None, None)])
def test_stream_passed_to_producer(handle, passed):
    a = FakeTorch((4,), "int32")
    tensors.take(a, "a", stream=handle)
    assert a.streams == [passed]     # DLPack spells the legacy default stream 1, never 0


@pytest.mark.parametrize("producer", [FakeTorch, FakeJax, FakeCupy])
def test_deleter_called_exactly_once(producer):
    a = producer((3, 4), "fp16")
    view = tensors.take(a, "a")
    gc.collect()
    assert a.deleter_calls() == [1]
    del view
    gc.collect()
    assert a.deleter_calls() == [1]


def test_unconsumed_capsule_freed_by_its_producer():
    a = FakeTorch((3,), "int32")
    capsule = a.__dlpack__(max_version=(1, 0))
    del capsule
    gc.collect()
    assert a.deleter_calls() == [1]


def test_copied_capsule_lives_as_long_as_the_view():
    a = FakeTorch((3,), "int32", copied=True)
    view = tensors.take(a, "a")
    assert a.deleter_calls() == [0]
    del view
    gc.collect()
    assert a.deleter_calls() == [1]


def test_unsupported_dtype_releases_the_capsule():
    a = FakeTorch((3,), (5, 32))   # complex32: no numpy equivalent
    with pytest.raises(InvalidInputError, match="DLPack type code 5, 32 bits"):
        tensors.take(a, "a")
    gc.collect()
    assert a.deleter_calls() == [1]


# streams and frameworks

def test_explicit_stream_wins():
    class TorchStream:
        cuda_stream = 0x1111

    class CupyStream:
        ptr = 0x2222

    objs = [FakeTorch((1,), "int32")]
    assert tensors.caller_stream(objs, 0x3333)[0] == 0x3333
    assert tensors.caller_stream(objs, TorchStream())[0] == 0x1111
    assert tensors.caller_stream(objs, CupyStream())[0] == 0x2222
    with pytest.raises(InvalidInputError, match="stream"):
        tensors.caller_stream(objs, "default")


def test_no_cuda_input_needs_no_stream():
    assert tensors.caller_stream([np.zeros(2)])[0] == 0


def test_framework_of():
    def made_in(module):
        return type("Array", (), {"__module__": module})()

    assert tensors.framework_of(made_in("torch")) == "torch"
    assert tensors.framework_of(made_in("jaxlib.xla_extension")) == "jax"
    assert tensors.framework_of(made_in("jaxlib._jax")) == "jax"
    assert tensors.framework_of(made_in("cupy._core.core")) == "cupy"
    assert tensors.framework_of(np.zeros(1)) == "other"


def test_to_framework_passes_native_arrays_through():
    marker = object()
    for framework in ("torch", "cupy", "other"):
        assert tensors.to_framework(framework, marker, 0) is marker


def test_contiguous_strides():
    assert tensors.contiguous_strides((2, 3, 4)) == (12, 4, 1)
    assert tensors.contiguous_strides((2, 0, 4)) == (4, 4, 1)
    assert tensors.contiguous_strides(()) == ()


def test_view_is_hashable_and_repr_skips_the_array():
    a = np.zeros((2, 3), np.float32)
    v = tensors.take(a, "a")
    assert hash(v) == hash(tensors.take(a, "a")) and "obj" not in repr(v)


# CuPy allocations, with CuPy's device-facing calls stood in for.

class _FakeCupyArray:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype
        self.data = type("Memory", (), {"ptr": 0x7000})()


@pytest.fixture
def cupy_calls(monkeypatch):
    """cupy.empty, Device, the current stream and streamIsCapturing on a fake device; returns the log
    of (what, stream) events and a dict where a test sets which stream is capturing."""
    import contextlib

    import cupy

    log, state = [], {"capturing": None, "entered": None}

    def from_external(obj):
        version, handle = obj.__cuda_stream__()
        assert version == 0

        @contextlib.contextmanager
        def entered():
            state["entered"] = handle
            yield
            state["entered"] = None
        return entered()

    monkeypatch.setattr(cupy, "empty", lambda shape, dtype: log.append(("empty", state["entered"]))
                        or _FakeCupyArray(shape, dtype))
    monkeypatch.setattr(cupy.cuda, "Device", lambda device_id: contextlib.nullcontext())
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda device_id=None: type("S", (), {"ptr": 0xC0})())
    monkeypatch.setattr(cupy.cuda.Stream, "from_external", staticmethod(from_external))
    monkeypatch.setattr(cupy.cuda.runtime, "streamIsCapturing", lambda stream: stream == state["capturing"])
    monkeypatch.setattr(tensors, "_CAPTURED_WORKSPACES", [])
    return log, state


def test_cupy_memory_is_ordered_on_the_launch_stream(cupy_calls):
    log, _ = cupy_calls
    new = tensors.allocator("cupy", (4, 2), np.float32, 0)
    new(None)
    new(0xC0)      # CuPy's current stream: no switch
    new(0xABC)     # another stream: allocated under it, through the CUDA stream protocol
    assert log == [("empty", None), ("empty", None), ("empty", 0xABC)]


def test_workspaces_made_during_graph_capture_are_kept(cupy_calls):
    """A captured graph replays into its workspace; CuPy's pool must never hand that memory out again."""
    _, state = cupy_calls
    workspace = tensors.allocator("cupy", (1024,), np.float32, 0, workspace=True)
    output = tensors.allocator("cupy", (8,), np.float32, 0)
    workspace(None)
    assert tensors._CAPTURED_WORKSPACES == []
    state["capturing"] = 0xABC
    kept, _ = workspace(0xABC)
    output(0xABC)    # outputs belong to the caller, who keeps them as long as the graph
    workspace(None)  # CuPy's current stream is not the one being captured
    assert tensors._CAPTURED_WORKSPACES == [kept]
