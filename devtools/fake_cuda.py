"""A CUDA machine made of stand-ins, for CPU-only tests of the host path and for timing it.

- `FakeTorchModule`: the slice of torch's API the package reads (tensor attributes, dtypes,
  `empty`, the current raw stream), in pure Python; its tensors are made-up device addresses.
- a fake driver: `recording_driver()` keeps every launch (config and parameter bytes) for tests;
  `stub_driver()` is a C library whose entry points return 0 at once, so ctypes' argument
  conversion is paid as with libcuda (for `scripts/host_profile.py --cpu-mock`).
- `install(...)`: points the package at them (fake Hopper device info, loaded functions, driver).

Times measured this way are the package's Python cost only: a real torch attribute read or
`torch.empty` and a real driver launch cost more, the same amount before and after a change.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import types

import numpy as np

from fake_dlpack import contiguous

STREAM = 0x5A5A00           # the fake torch's current stream on every device
FIRST_PTR = 0x7E00_0000_0000
DECODE_FN, COMBINE_FN, SCHEDULER_FN, CHECK_FN = 0xD0, 0xC0, 0x50, 0xCC   # fake CUfunction handles
STREAM_CONTEXT = 0xC7C7      # the fake CUcontext that owns every stream


# --- torch ------------------------------------------------------------------------------------------

class _Dtype:
    __slots__ = ("name", "itemsize")

    def __init__(self, name: str, itemsize: int):
        self.name, self.itemsize = name, itemsize

    def __repr__(self):
        return f"torch.{self.name}"


class _Device:
    __slots__ = ("type", "index")

    def __init__(self, type_: str, index: int = 0):
        self.type, self.index = type_, index


class Tensor:
    """A torch-like CUDA (or CPU) tensor: metadata only, nothing behind the address."""

    __slots__ = ("shape", "dtype", "_strides", "_ptr", "_device", "is_cuda", "__weakref__")

    def __init__(self, shape, dtype, ptr, strides=None, device_index=0, is_cuda=True):
        self.shape = tuple(shape)
        self.dtype = dtype
        self._strides = None if strides is None else tuple(strides)   # None: contiguous, made on demand
        self._ptr = ptr
        self._device = device_index if is_cuda else -1
        self.is_cuda = is_cuda

    def data_ptr(self) -> int:
        return self._ptr

    def stride(self):
        if self._strides is None:
            self._strides = contiguous(self.shape)
        return self._strides

    def get_device(self) -> int:
        return self._device

    @property
    def device(self) -> _Device:
        return _Device("cuda", self._device) if self.is_cuda else _Device("cpu")


Tensor.__module__ = "torch"   # how tensors.framework_of recognises torch


class FakeTorchModule(types.ModuleType):
    """Installed as sys.modules["torch"]. `empty` hands out fresh 256-byte aligned addresses on the
    current stream and notes ("torch", shape, dtype name, device, None) in `allocations`."""

    Tensor = Tensor

    def __init__(self, allocations: list | None = None):
        super().__init__("torch")
        for name, size in (("bfloat16", 2), ("float16", 2), ("float32", 4), ("float64", 8), ("int8", 1),
                           ("int16", 2), ("int32", 4), ("int64", 8), ("uint8", 1), ("bool", 1),
                           ("float8_e4m3fn", 1)):
            setattr(self, name, _Dtype(name, size))
        self.next_ptr = FIRST_PTR
        self.allocations = [] if allocations is None else allocations
        self._C = types.SimpleNamespace(_cuda_getCurrentRawStream=lambda device: STREAM)
        self.cuda = types.SimpleNamespace(
            current_stream=lambda device=None: types.SimpleNamespace(cuda_stream=STREAM),
            synchronize=lambda: None)

    @staticmethod
    def device(type_, index=0):
        return _Device(type_, index)

    def tensor(self, shape, dtype, strides=None, device_index=0, offset_bytes=0, is_cuda=True):
        """A tensor at a fresh address (plus `offset_bytes`), as a test builds its inputs."""
        ptr = self._reserve(shape, dtype)
        return Tensor(shape, dtype, ptr + offset_bytes, strides, device_index, is_cuda)

    def empty(self, shape, *, dtype, device):
        self.allocations.append(("torch", tuple(shape), dtype.name, device.index, None))
        return Tensor(shape, dtype, self._reserve(shape, dtype), device_index=device.index)

    def _reserve(self, shape, dtype) -> int:
        ptr, count = self.next_ptr, 1
        for size in shape:
            count *= size
        self.next_ptr += (count * dtype.itemsize + 511) // 256 * 256
        return ptr


# --- CuPy -------------------------------------------------------------------------------------------

CUPY_STREAM = 0xC0FFEE00   # the fake CuPy current stream on every device


class FakeNdarray:
    """A CuPy-like CUDA array: metadata only. `strides` are given in elements, kept in bytes."""

    __slots__ = ("shape", "strides", "dtype", "data", "device", "__weakref__")

    def __init__(self, shape, dtype, ptr, strides=None, device_id=0):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.strides = tuple(s * self.dtype.itemsize for s in (strides or contiguous(self.shape)))
        self.data = types.SimpleNamespace(ptr=ptr)
        self.device = types.SimpleNamespace(id=device_id)

    def __dlpack_device__(self):
        return 2, self.device.id


FakeNdarray.__name__ = FakeNdarray.__qualname__ = "ndarray"
FakeNdarray.__module__ = "cupy"


def fake_cupy(monkeypatch, torch_module: FakeTorchModule):
    """Make FakeNdarray CuPy's array type and CUPY_STREAM its current stream, for one test. Returns
    a maker of arrays at fresh addresses: new(shape, dtype, strides=None, offset_bytes=0)."""
    import cupy

    monkeypatch.setattr(cupy, "ndarray", FakeNdarray)
    monkeypatch.setattr(cupy.cuda, "get_current_stream",
                        lambda device_id=None: types.SimpleNamespace(ptr=CUPY_STREAM))

    def new(shape, dtype, strides=None, offset_bytes=0):
        ptr = torch_module._reserve(shape, torch_module.float64)
        return FakeNdarray(shape, dtype, ptr + offset_bytes, strides)
    return new


# --- the driver -------------------------------------------------------------------------------------

class RecordingDriver:
    """libcuda's entry points as C callbacks into Python: `launches` holds, per launch, the grid,
    block, shared bytes, stream, attribute count, function handle, the bytes of each argument and the
    launching thread.

    Device memory is a dict of int32 words by address (`memory`; `write_int32` puts arrays there):
    memset and device-to-host copies work on it, and a copy of a word never written fails as an
    invalid read would. `kernels` maps a function handle to a stand-in run at its launch as
    kernel(driver, argument bytes), e.g. a numpy twin writing its outputs into `memory`."""

    def __init__(self):
        from flashmla_cupy import params

        # function handle -> byte size of each kernel argument
        self.arg_sizes = {DECODE_FN: (ctypes.sizeof(params.DecodeParams), 128, 128),
                          COMBINE_FN: (ctypes.sizeof(params.CombineParams),),
                          SCHEDULER_FN: (ctypes.sizeof(params.SchedulerParams),),
                          CHECK_FN: (ctypes.sizeof(params.CheckParams),)}
        self.launches: list[dict] = []
        self.tensor_maps: list[int] = []    # the base address of every encoded TMA descriptor
        self.map_settings: dict[int, dict] = {}   # base address -> its last descriptor's swizzle, L2 promotion, fill
        self.map_shapes: dict[int, dict] = {}     # base address -> its last descriptor's type, dims, strides, box
        self.memory: dict[int, int] = {}
        self.kernels: dict = {}
        self.syncs: list[int] = []          # the stream of every cuStreamSynchronize
        self.capturing = False              # what cuStreamIsCapturing answers
        self.cuMemsetD32Async = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_uint, ctypes.c_size_t,
                                                 ctypes.c_void_p)(self._memset)
        self.cuMemcpyDtoHAsync_v2 = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t,
                                                     ctypes.c_void_p)(self._copy_to_host)
        self.cuStreamSynchronize = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(
            lambda stream: self.syncs.append(stream or 0) or 0)
        self.cuStreamIsCapturing = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(self._capturing)
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_void_p)
        self.cuLaunchKernelEx = proto(self._launch)
        self.cuFuncSetAttribute = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                                   ctypes.c_int)(lambda *args: 0)
        self.cuGetErrorString = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)(lambda *a: 0)
        self.cuTensorMapEncodeTiled = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_int)(self._encode)
        # Contexts: every stream belongs to STREAM_CONTEXT; the thread starts with none current.
        self.contexts: list[int] = []   # the current-context stack
        out_pointer = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)   # also for cuCtxPushCurrent's handle
        self.cuStreamGetCtx = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(
            lambda stream, context: self._write(context, STREAM_CONTEXT))
        self.cuCtxGetCurrent = out_pointer(lambda context: self._write(context, self._current()))
        self.cuCtxPushCurrent = out_pointer(lambda context: self.contexts.append(context) or 0)
        self.cuCtxPopCurrent = out_pointer(lambda context: self._write(context, self.contexts.pop()))

    def _current(self) -> int:
        return self.contexts[-1] if self.contexts else 0

    @staticmethod
    def _write(pointer: int, value: int) -> int:
        ctypes.c_void_p.from_address(pointer).value = value
        return 0

    def _launch(self, config, function, params, extra):
        grid = (ctypes.c_uint * 7).from_address(config)
        stream = ctypes.c_void_p.from_address(config + 32).value or 0
        num_attrs = ctypes.c_uint.from_address(config + 48).value
        addresses = (ctypes.c_void_p * len(self.arg_sizes[function])).from_address(params)
        args = [ctypes.string_at(a, size) for a, size in zip(addresses, self.arg_sizes[function])]
        self.launches.append(dict(grid=tuple(grid[:3]), block=tuple(grid[3:6]), shared_bytes=grid[6],
                                  stream=stream, pdl=num_attrs == 1, function=function, args=args,
                                  thread=threading.get_ident(), context=self._current()))
        kernel = self.kernels.get(function)
        if kernel is not None:
            kernel(self, args)
        return 0

    def write_int32(self, ptr: int, values) -> None:
        for i, value in enumerate(np.asarray(values, dtype=np.int32).reshape(-1)):
            self.memory[ptr + 4 * i] = int(value)

    def read_int32(self, ptr: int, count: int) -> np.ndarray:
        """The words at ptr (KeyError for one never written)."""
        return np.array([self.memory[ptr + 4 * i] for i in range(count)], dtype=np.int32)

    def _memset(self, ptr, value, count, stream):
        self.write_int32(ptr, np.full(count, value, dtype=np.uint32).view(np.int32))
        return 0

    def _copy_to_host(self, dst, src, nbytes, stream):
        try:
            words = self.read_int32(src, nbytes // 4)
        except KeyError:
            return 1   # CUDA_ERROR_INVALID_VALUE: the fake's "uninitialised read"
        ctypes.memmove(dst, words.ctypes.data, nbytes)
        return 0

    def _capturing(self, stream, status):
        ctypes.c_int.from_address(status).value = int(self.capturing)
        return 0

    def _encode(self, tensor_map, dtype, rank, base, dims, strides, box, element_strides, interleave, swizzle,
                l2_promotion, oob_fill):
        ctypes.c_uint64.from_address(tensor_map).value = base   # descriptor word 0: where it points
        self.tensor_maps.append(base)
        self.map_settings[base] = dict(swizzle=swizzle, l2_promotion=l2_promotion, oob_fill=oob_fill)
        self.map_shapes[base] = dict(dtype=dtype, dims=list((ctypes.c_uint64 * rank).from_address(dims)),
                                     strides=list((ctypes.c_uint64 * (rank - 1)).from_address(strides)),
                                     box=list((ctypes.c_uint32 * rank).from_address(box)))
        return 0


_STUB_SOURCE = """
int cuLaunchKernelEx(void *c, void *f, void **p, void **e) { return 0; }
int cuFuncSetAttribute(void *f, int a, int v) { return 0; }
int cuGetErrorString(int s, const char **t) { *t = "stub"; return 0; }
int cuTensorMapEncodeTiled(void *m, int t, unsigned r, void *g, void *d, void *s, void *b, void *e,
                           int i, int w, int l, int o) { return 0; }
int cuMemsetD32Async(unsigned long long p, unsigned v, unsigned long n, void *s) { return 0; }
int cuMemcpyDtoHAsync_v2(void *d, unsigned long long p, unsigned long n, void *s) { return 0; }
int cuStreamSynchronize(void *s) { return 0; }
int cuStreamIsCapturing(void *s, int *status) { *status = 0; return 0; }
"""


def stub_driver() -> ctypes.CDLL:
    """A libcuda look-alike whose functions return 0 at once (built with the system C compiler)."""
    version = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:12]   # a changed source builds anew
    path = os.path.join(tempfile.gettempdir(), f"flashmla_cupy_stub_cuda_{os.getuid()}_{version}.so")
    if not os.path.exists(path):
        source = path[:-3] + ".c"
        with open(source, "w") as f:
            f.write(_STUB_SOURCE)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", path, source], check=True)
    return ctypes.CDLL(path)


# --- wiring -----------------------------------------------------------------------------------------

class FakeModule:
    """cupy.cuda.function.Module's stand-in: its kernels are the fake handles, and it notes its loads
    and unloads (when it is collected, as CuPy's Module unloads itself) in `events`, as
    ("load" | "unload", id of the module). `load_seconds` widens the window of a loading race."""

    events: list = []
    load_seconds = 0.0

    def load(self, cubin: bytes) -> None:
        time.sleep(self.load_seconds)
        self.events.append(("load", id(self)))

    def get_function(self, name: str):
        return types.SimpleNamespace(ptr=KERNEL_HANDLES[name])

    def __del__(self):
        self.events.append(("unload", id(self)))


# The narrow and ring decode kernels take the decode kernel's arguments and play its part in a call: one handle.
KERNEL_HANDLES = {"flashmla_decode": DECODE_FN, "flashmla_decode_narrow": DECODE_FN, "flashmla_decode_ring": DECODE_FN,
                  "flashmla_combine": COMBINE_FN, "flashmla_scheduler": SCHEDULER_FN, "flashmla_check": CHECK_FN}


class _NoDevice:
    """cupy.cuda.Device's stand-in: entering it selects nothing."""

    def __init__(self, device_id: int = 0):
        self.id = device_id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def fake_compiled(variant):
    """cache.get_or_compile's stand-in: a cubin that only the fake module can load."""
    from flashmla_cupy.compiler import CompiledKernel

    return CompiledKernel(variant, b"\x7fELF fake " + variant.name.encode(), "", 32, 0, 0, 0, 0)


def install(setattr_, setitem, driver, torch_module=None) -> list:
    """Point flashmla_cupy at a fake Hopper GPU. `setattr_`/`setitem` are pytest monkeypatch's
    setattr/setitem (restored after the test) or plain setattr / dict.__setitem__ (a script).
    `driver` is a RecordingDriver or stub_driver(); torch_module, if given, becomes `torch`.

    The package's own module table (launch.get_function) runs as it is, on stand-ins for the kernel
    cache and for CuPy's Module; returns the list of their load/unload events (see FakeModule)."""
    import cupy

    from flashmla_cupy import api, cache, launch

    events: list = []
    module = type("Module", (FakeModule,), {"events": events})

    @functools.lru_cache(maxsize=None)
    def device_info(device_id):
        return launch.DeviceInfo(device_id, "NVIDIA H100 80GB HBM3", (9, 0), 132, 232448)

    prototyped = _prototyped(launch._driver.__wrapped__, driver)

    setattr_(cache, "get_or_compile", fake_compiled)
    setattr_(cupy.cuda.function, "Module", module)
    setattr_(cupy.cuda, "Device", _NoDevice)
    setattr_(launch, "_loaded", {})   # nothing loaded before (or on other fakes) is reused
    setattr_(launch, "device_info", device_info)
    setattr_(launch, "_driver", functools.lru_cache(maxsize=None)(prototyped))
    setattr_(cupy.cuda.runtime, "getDevice", lambda: 0)
    if torch_module is not None:
        setitem(sys.modules, "torch", torch_module)
        # The fake torch has no torch.library to register ops with: api's tracing check gets the
        # one function it reads from torch_ops, answering as eager torch does.
        setattr_(api, "_torch_ops", types.SimpleNamespace(is_compiling=lambda: False))
    return events


def _prototyped(load_driver, driver):
    """`load_driver` (launch._driver unwrapped) run on the fake instead of libcuda: the fake gets the
    same argument types, so ctypes converts arguments as it does for the real library."""
    def load():
        real_cdll = ctypes.CDLL
        ctypes.CDLL = lambda name, *args, **kwargs: driver
        try:
            return load_driver()
        finally:
            ctypes.CDLL = real_cdll
    return load


def fake_gpu(monkeypatch):
    """A pytest fixture's body: the package on a fake H100 with a recording driver and the fake torch,
    undone after the test. Non-torch frameworks allocate stand-in arrays (CuPy needs a GPU), noted as
    (framework, shape, dtype name, device, stream) in the same `allocations` list as torch's."""
    import threading

    from flashmla_cupy import lookup, tensors

    state = types.SimpleNamespace(driver=RecordingDriver(), allocations=[])
    state.torch = FakeTorchModule(state.allocations)
    state.module_events = install(monkeypatch.setattr, monkeypatch.setitem, state.driver, state.torch)
    monkeypatch.setattr(tensors, "_TORCH_DTYPES", None)      # built from the fake torch meanwhile
    monkeypatch.setattr(lookup, "_thread", threading.local())   # no call prepared on fakes survives
    torch_allocator = tensors.allocator

    def allocator(framework, shape, dtype, device_id, workspace=False):
        if framework == "torch":
            return torch_allocator(framework, shape, dtype, device_id)

        def new(stream):
            state.allocations.append((framework, tuple(shape), np.dtype(dtype).name, device_id, stream))
            return object(), state.torch._reserve(shape, state.torch.float32)
        return new

    monkeypatch.setattr(tensors, "allocator", allocator)
    return state
