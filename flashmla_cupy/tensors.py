"""DLPack in; the caller's framework and stream; outputs allocated and returned in that framework.

`take` reads an array's pointer, shape, strides, dtype and device from its DLPack capsule with
ctypes, never touching the data. torch, JAX, CuPy and any other `__dlpack__` producer work alike.
On the hot path (`take_all`), torch tensors and CuPy arrays whose framework's current stream is the
launch stream are read from their own attributes instead: the same facts, without the capsule's
cost, and no stream handoff is needed because producer and consumer share the stream.
"""
from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from . import install
from .errors import InvalidInputError, Violation

# DLDeviceType values (dlpack.h).
DEVICE_CPU = 1
DEVICE_CUDA = 2
DEVICE_NAMES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal",
                10: "rocm", 11: "rocm_host", 13: "cuda_managed", 14: "oneapi"}

# (DLDataTypeCode, bits) -> numpy dtype. Codes: 0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool,
# 10 float8_e4m3fn (DLPack 1.1; torch and JAX export it).
_DTYPES = {
    (0, 8): np.dtype(np.int8), (0, 16): np.dtype(np.int16),
    (0, 32): np.dtype(np.int32), (0, 64): np.dtype(np.int64),
    (1, 8): np.dtype(np.uint8), (1, 16): np.dtype(np.uint16),
    (1, 32): np.dtype(np.uint32), (1, 64): np.dtype(np.uint64),
    (2, 16): np.dtype(np.float16), (2, 32): np.dtype(np.float32), (2, 64): np.dtype(np.float64),
    (4, 16): np.dtype(ml_dtypes.bfloat16),
    (5, 64): np.dtype(np.complex64), (5, 128): np.dtype(np.complex128),
    (6, 8): np.dtype(np.bool_),
    (10, 8): np.dtype(ml_dtypes.float8_e4m3fn),
}


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
        ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))),
]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DLManagedTensorVersioned._fields_ = [
    ("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))),
    ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor),
]

FLAG_IS_COPIED = 1 << 1  # DLPACK_FLAG_BITMASK_IS_COPIED: the producer made a copy we must keep alive

# Capsule names. PyCapsule_SetName keeps the pointer, so the renamed names must live forever:
# module-level bytes constants do.
_LEGACY = b"dltensor"
_VERSIONED = b"dltensor_versioned"
_USED_LEGACY = b"used_dltensor"
_USED_VERSIONED = b"used_dltensor_versioned"


def _capi(name: str, restype, *argtypes):
    """A private prototype of a Python C-API function (setting argtypes on ctypes.pythonapi's shared
    attributes would change them for every other user in the process)."""
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


_capsule_is_valid = _capi("PyCapsule_IsValid", ctypes.c_int, ctypes.py_object, ctypes.c_char_p)
_capsule_pointer = _capi("PyCapsule_GetPointer", ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)
_capsule_set_name = _capi("PyCapsule_SetName", ctypes.c_int, ctypes.py_object, ctypes.c_char_p)


@dataclass(frozen=True)
class View:
    """What the kernels need to know about one array; `obj` keeps the array (and its memory) alive."""

    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]   # in elements, as DLPack gives them
    dtype: np.dtype
    device_type: int           # DLDeviceType: 2 = CUDA
    device_id: int
    framework: str             # "torch" | "jax" | "cupy" | "other"
    # Left out of repr (a tensor's repr reads its data) and of eq/hash (arrays are unhashable).
    obj: Any = field(repr=False, compare=False)
    keepalive: Any = field(default=None, repr=False, compare=False)  # a producer-made copy

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> str:
        """Readable device, e.g. "cuda:0" or "cpu:0"."""
        name = DEVICE_NAMES.get(self.device_type, f"device_type_{self.device_type}")
        return f"{name}:{self.device_id}"


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-contiguous strides, in elements."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def framework_of(obj: Any) -> str:
    """Which framework made `obj`, from the module of its type (no framework is imported)."""
    root = type(obj).__module__.split(".", 1)[0]
    if root == "torch":
        return "torch"
    if root in ("jax", "jaxlib"):
        return "jax"
    if root in ("cupy", "cupy_backends"):
        return "cupy"
    return "other"


def _dlpack_device(obj: Any) -> tuple[int, int]:
    device_type, device_id = obj.__dlpack_device__()
    return int(device_type), int(device_id)


def _dlpack_stream(handle: int) -> int:
    """The `stream=` value for `__dlpack__`: DLPack reserves 0 and spells the legacy default 1."""
    return 1 if handle == 0 else handle


class _Owned:
    """A consumed managed tensor: its deleter runs exactly once, on `release()` or collection."""

    def __init__(self, managed):
        self._managed = managed

    def release(self) -> None:
        managed, self._managed = self._managed, None
        if managed is not None and managed.contents.deleter:
            managed.contents.deleter(managed)

    __del__ = release


def _export(obj: Any, stream: int | None):
    """Call `__dlpack__`, asking for a versioned capsule; older producers refuse the keyword."""
    kwargs = {} if stream is None else {"stream": stream}
    try:
        return obj.__dlpack__(max_version=(1, 0), **kwargs)
    except TypeError:
        return obj.__dlpack__(**kwargs)


def take(obj: Any, name: str, stream: int | None = None) -> View:
    """The View of `obj` (any DLPack producer). `stream` is the launch stream: a CUDA producer
    makes the data ready on it. Raises InvalidInputError if `obj` is not a readable DLPack array,
    also when its producer refuses to export it."""
    if not (hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__")):
        raise InvalidInputError("flashmla_cupy", [Violation(
            name, f"an object of type {type(obj).__qualname__}", "a DLPack array",
            "pass a torch tensor, JAX array or CuPy array (anything with __dlpack__)")])
    # torch refuses to export a tensor that requires grad. No gradient flows through these kernels
    # (as through FlashMLA's), and the attribute path reads such a tensor as it is: export its
    # detached alias (same memory), so that a call does not depend on which path it takes.
    exported = obj.detach() if framework_of(obj) == "torch" and getattr(obj, "requires_grad", False) else obj
    on_cuda = None
    try:
        on_cuda = _dlpack_device(exported)[0] == DEVICE_CUDA
        # Only CUDA producers take a stream (numpy refuses one); inputs.py rejects other devices later.
        capsule = _export(exported, _dlpack_stream(stream) if on_cuda and stream is not None else None)
    except Exception as exc:  # noqa: BLE001 - any producer failure is this argument's problem
        raise InvalidInputError("flashmla_cupy", [_export_failure(obj, name, exc, on_cuda)]) from None
    managed, tensor, copied = _consume(capsule, name)
    # The capsule is renamed, so its destructor no longer frees it: `owned` does, exactly once.
    owned = _Owned(managed)
    try:
        view = _view(tensor, obj, name, keepalive=owned if copied else None)
    finally:
        if not copied:
            owned.release()   # `obj` keeps the memory alive; a copy lives as long as the view
    return view


def _export_failure(obj: Any, name: str, exc: Exception, on_cuda: bool | None) -> Violation:
    """The violation of an array whose producer would not export it, with the producer's own words."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    seen = f"a {type(obj).__module__}.{type(obj).__qualname__} whose DLPack export raised {type(exc).__name__}: {message}"
    if on_cuda is False:
        fix = f"move {name} to the GPU as a torch tensor, JAX array or CuPy array of a supported dtype"
    else:
        fix = f"pass {name} as a plain CUDA array its framework can export (a contiguous copy, another dtype)"
    return Violation(name, seen, "an array exportable through DLPack", fix)


def _consume(capsule: Any, name: str):
    """Claim a capsule as its consumer: read the managed tensor and rename the capsule "used_..."."""
    if _capsule_is_valid(capsule, _VERSIONED):
        address = _capsule_pointer(capsule, _VERSIONED)
        managed = ctypes.cast(address, ctypes.POINTER(DLManagedTensorVersioned))
        version = managed.contents.version
        if version.major != 1:
            raise InvalidInputError("flashmla_cupy", [Violation(
                name, f"a DLPack {version.major}.{version.minor} capsule", "DLPack 1.x (we asked for "
                "max_version=(1, 0))", "upgrade or downgrade the producing framework")])
        _capsule_set_name(capsule, _USED_VERSIONED)
        copied = bool(managed.contents.flags & FLAG_IS_COPIED)
        return managed, managed.contents.dl_tensor, copied
    if _capsule_is_valid(capsule, _LEGACY):
        address = _capsule_pointer(capsule, _LEGACY)
        managed = ctypes.cast(address, ctypes.POINTER(DLManagedTensor))
        _capsule_set_name(capsule, _USED_LEGACY)
        return managed, managed.contents.dl_tensor, False
    raise InvalidInputError("flashmla_cupy", [Violation(
        name, f"__dlpack__() returned {capsule!r}", 'an unused "dltensor" or "dltensor_versioned" capsule',
        "export a fresh capsule for every call")])


def _view(tensor: DLTensor, obj: Any, name: str, keepalive: Any) -> View:
    # Each ctypes field read builds an object: read each once, and arrays by slicing.
    ndim, raw_strides = tensor.ndim, tensor.strides
    shape = tuple(tensor.shape[:ndim])
    if raw_strides:
        strides = tuple(raw_strides[:ndim])
    else:
        strides = contiguous_strides(shape)  # NULL strides mean C-contiguous (legacy DLPack)
    dl_dtype, device = tensor.dtype, tensor.device
    code, bits, lanes = dl_dtype.code, dl_dtype.bits, dl_dtype.lanes
    dtype = _DTYPES.get((code, bits))
    if dtype is None or lanes != 1:
        raise InvalidInputError("flashmla_cupy", [Violation(
            f"{name}.dtype", f"DLPack type code {code}, {bits} bits, {lanes} lanes",
            "a plain numeric type (bfloat16, float16, float32, int32, ...)",
            "convert the array to a supported dtype")])
    return View(
        ptr=(tensor.data or 0) + tensor.byte_offset, shape=shape, strides=strides, dtype=dtype,
        device_type=device.device_type, device_id=device.device_id,
        framework=framework_of(obj), obj=obj, keepalive=keepalive)


def take_all(arrays: Mapping[str, Any], stream: int | None = None,
             stream_owner: str | None = None) -> tuple[dict[str, View | None], list[Violation]]:
    """Views of several named arrays, and the violations of those that could not be taken (their view
    is None): every argument that is not a readable DLPack array is reported, none hides another.

    `stream_owner` is the framework whose current stream `stream` is (as `caller_stream` reports);
    arrays of that framework take the attribute fast path.
    """
    views, violations = {}, []
    for name, obj in arrays.items():
        view = _native_view(obj, stream_owner)
        if view is None:
            try:
                view = take(obj, name, stream)
            except InvalidInputError as error:
                violations += error.violations
        views[name] = view
    return views, violations


def caller_stream(objs: tuple, stream: Any = None) -> tuple[int, str | None]:
    """The raw cudaStream_t to launch on, and the framework whose current stream it is (None if it is
    nobody's). By default: torch's current stream if any input is a torch tensor, else CuPy's current
    stream on the inputs' device. An explicit `stream` (int handle, CuPy stream or torch stream) wins;
    it is the first array's framework's own when it equals that framework's current stream. With no
    CUDA input at all (the call will be rejected), (0, None) or the explicit stream."""
    if stream is None:
        return _default_stream(objs)
    handle = stream_handle(stream)
    return handle, _owner(objs[0], handle)


def _owner(obj: Any, handle: int) -> str | None:
    """"torch" or "cupy" when `obj` is a CUDA array of that framework whose current stream on its
    device is `handle`; None otherwise (only those frameworks' arrays are read from attributes)."""
    framework = framework_of(obj)
    if framework == "torch" and type(obj).__name__ == "Tensor" and obj.is_cuda:
        device_id = obj.get_device()
    elif framework == "cupy" and type(obj).__name__ == "ndarray":
        device_id = obj.device.id
    else:
        return None
    return framework if current_stream(framework, device_id) == handle else None


def _default_stream(objs: tuple) -> tuple[int, str | None]:
    cuda_objs, torch_device = [], None
    for obj in objs:
        if framework_of(obj) == "torch" and type(obj).__name__ == "Tensor":
            if obj.is_cuda:  # cheaper than torch's Python-level __dlpack_device__
                cuda_objs.append(obj)
                torch_device = obj.get_device() if torch_device is None else torch_device
        elif _on_cuda(obj):
            cuda_objs.append(obj)
    if not cuda_objs:
        return 0, None
    # A torch-made input means torch is imported, as current_stream needs.
    if torch_device is not None:
        return current_stream("torch", torch_device), "torch"
    device_id = _dlpack_device(cuda_objs[0])[1]
    if any(framework_of(obj) == "torch" for obj in cuda_objs):
        return current_stream("torch", device_id), "torch"
    install.require_cupy()   # current_stream reads sys.modules; JAX inputs may not have imported CuPy
    return current_stream("cupy", device_id), "cupy"


def _on_cuda(obj: Any) -> bool:
    """Whether `obj` says it is a CUDA array; an object that cannot say is reported by `take`."""
    try:
        return hasattr(obj, "__dlpack_device__") and _dlpack_device(obj)[0] == DEVICE_CUDA
    except Exception:  # noqa: BLE001
        return False


def _torch_current_stream(torch, device_id: int) -> int:
    """torch's current cudaStream_t on a device. The raw-handle accessor skips building a Stream
    object (a measurable share of a decode call's host time); the public API is the fallback."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device_id))
    return int(torch.cuda.current_stream(device_id).cuda_stream)


def current_stream(framework: str, device_id: int) -> int:
    """The current cudaStream_t of `framework` ("torch" or "cupy", already imported) on a device."""
    if framework == "torch":
        return _torch_current_stream(sys.modules["torch"], device_id)
    return int(sys.modules["cupy"].cuda.get_current_stream(device_id).ptr)


def _native_view(obj: Any, stream_owner: str | None) -> View | None:
    """The View of a plain torch CUDA tensor or CuPy array read from its attributes, when the launch
    stream is its framework's current stream; None sends the array down the DLPack path."""
    framework = framework_of(obj)
    if framework != stream_owner:
        return None
    if framework == "torch":
        if type(obj).__name__ != "Tensor" or not obj.is_cuda:
            return None
        dtype = torch_dtypes().get(obj.dtype)
        if dtype is None:
            return None
        return View(ptr=obj.data_ptr(), shape=tuple(obj.shape), strides=tuple(obj.stride()), dtype=dtype,
                    device_type=DEVICE_CUDA, device_id=obj.device.index, framework="torch", obj=obj)
    if framework == "cupy" and type(obj).__name__ == "ndarray":
        itemsize = obj.dtype.itemsize
        if any(s % itemsize for s in obj.strides):
            return None
        return View(ptr=obj.data.ptr, shape=obj.shape, strides=tuple(s // itemsize for s in obj.strides),
                    dtype=obj.dtype, device_type=DEVICE_CUDA, device_id=obj.device.id, framework="cupy", obj=obj)
    return None


_TORCH_DTYPES: dict | None = None


def torch_dtypes() -> dict:
    """torch dtype -> numpy dtype, for the types DLPack would report (built once, torch imported)."""
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch
        _TORCH_DTYPES = {
            torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.float16: np.dtype(np.float16),
            torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64),
            torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64), torch.int16: np.dtype(np.int16),
            torch.int8: np.dtype(np.int8), torch.uint8: np.dtype(np.uint8), torch.bool: np.dtype(np.bool_),
        }
        fp8 = getattr(torch, "float8_e4m3fn", None)   # torch >= 2.1
        if fp8 is not None:
            _TORCH_DTYPES[fp8] = np.dtype(ml_dtypes.float8_e4m3fn)
    return _TORCH_DTYPES


def traced_view(shape: tuple, strides: tuple, dtype: np.dtype, on_cuda: bool, device_id: int,
                framework: str) -> View:
    """The View of an array that torch.compile or jax.jit is tracing: metadata without memory. Its
    address is 0, so the address rules pass while tracing; they run on the real addresses when the
    traced call runs."""
    return View(ptr=0, shape=tuple(shape), strides=tuple(strides), dtype=dtype,
                device_type=DEVICE_CUDA if on_cuda else DEVICE_CPU, device_id=device_id, framework=framework,
                obj=None)


def stream_handle(stream: Any) -> int:
    """The raw cudaStream_t of an explicit `stream=` argument (int, torch or CuPy stream)."""
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return int(stream)
    if hasattr(stream, "cuda_stream"):   # torch.cuda.Stream
        return int(stream.cuda_stream)
    if hasattr(stream, "ptr"):           # cupy.cuda.Stream
        return int(stream.ptr)
    raise InvalidInputError("flashmla_cupy", [Violation(
        "stream", f"an object of type {type(stream).__qualname__}",
        "None, an int cudaStream_t handle, a torch.cuda.Stream or a cupy.cuda.Stream",
        "pass the stream object itself or its raw handle")])


def allocator(framework: str, shape: tuple[int, ...], dtype: Any, device_id: int,
              workspace: bool = False) -> Callable:
    """A maker of uninitialised C-contiguous CUDA arrays of one shape and dtype in `framework`: called
    with the stream the memory must be ordered on (None: the framework's current stream), it returns
    (native array, data pointer). JAX (which cannot hand out writable memory) and unknown frameworks
    get CuPy arrays: pass them through `to_framework` when returning them. `workspace`: memory that
    only the call's kernels use (see _cupy_allocator)."""
    shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    if framework == "torch":
        return _torch_allocator(shape, dtype, device_id)
    return _cupy_allocator(shape, dtype, device_id, workspace)


def _torch_allocator(shape, dtype, device_id):
    import torch
    device = torch.device("cuda", device_id)
    torch_dtype = getattr(torch, dtype.name)   # bfloat16, float16, float32, int32 share names

    def new(stream):
        if stream is None or stream == current_stream("torch", device_id):
            tensor = torch.empty(shape, dtype=torch_dtype, device=device)
        else:
            # The caching allocator ties a block to the stream current at allocation: make it ours.
            with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
                tensor = torch.empty(shape, dtype=torch_dtype, device=device)
        return tensor, tensor.data_ptr()
    return new


class _RawStream:
    """A raw cudaStream_t in the CUDA stream protocol, as cupy.cuda.Stream.from_external takes it."""

    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self.handle   # protocol version 0


def _cupy_stream(handle: int):
    import cupy
    return cupy.cuda.Stream.from_external(_RawStream(handle))


# Workspaces allocated while a stream was being captured into a CUDA graph: the graph replays into
# them for as long as it lives, and CuPy's pool (unlike torch's graph pools) would hand them out again.
_CAPTURED_WORKSPACES: list = []


def _cupy_allocator(shape, dtype, device_id, workspace):
    import cupy

    def new(stream):
        with cupy.cuda.Device(device_id):
            if stream is None or stream == current_stream("cupy", device_id):
                array = cupy.empty(shape, dtype=dtype)
            else:
                # CuPy's pool reuses a block only on the stream it was allocated under: make it ours.
                with _cupy_stream(stream):
                    array = cupy.empty(shape, dtype=dtype)
            if workspace and cupy.cuda.runtime.streamIsCapturing(
                    current_stream("cupy", device_id) if stream is None else stream):
                _CAPTURED_WORKSPACES.append(array)
        return array, array.data.ptr
    return new


def to_framework(framework: str, native: Any, stream: int | None = None) -> Any:
    """Hand an array made by `empty` back in the caller's framework, zero-copy."""
    if framework != "jax":
        return native
    import cupy
    import jax.dlpack
    if stream is None:
        return jax.dlpack.from_dlpack(native)
    # CuPy's __dlpack__ orders JAX's stream after CuPy's current one: make that the launch stream.
    with cupy.cuda.Device(native.device.id), _cupy_stream(stream):
        return jax.dlpack.from_dlpack(native)
