"""The only module that talks to the CUDA driver: device facts, module loading, TMA descriptors, launches.

Device facts and loaded functions are memoised, and a `Launch` is prepared once and replayed, so that
after the first call the hot path costs microseconds of host time: no file-system access, no device
queries. Launches go through `cuLaunchKernelEx` (via ctypes on the driver library that CuPy has
already loaded) because CuPy has no launch attributes, and the combine kernel is launched as a
programmatic dependent of the decode kernel.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import cache, install, variants


@dataclass(frozen=True)
class DeviceInfo:
    device_id: int
    name: str
    cc: tuple[int, int]
    sm_count: int
    max_smem_optin: int


@functools.lru_cache(maxsize=None)
def device_info(device_id: int) -> DeviceInfo:
    cupy = install.require_cupy()
    try:
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
    except cupy.cuda.runtime.CUDARuntimeError as exc:   # no driver, an old one, no such device
        raise install.cuda_unavailable(cupy, exc) from None
    name = props["name"]
    return DeviceInfo(
        device_id=device_id,
        name=name.decode() if isinstance(name, bytes) else str(name),
        cc=(int(props["major"]), int(props["minor"])),
        sm_count=int(props["multiProcessorCount"]),
        max_smem_optin=int(props["sharedMemPerBlockOptin"]),
    )


@functools.lru_cache(maxsize=None)
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuLaunchKernelEx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    # Checked mode only (zero_int32, read_int32, is_capturing).
    lib.cuMemsetD32Async.argtypes = [ctypes.c_uint64, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuMemcpyDtoHAsync_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
    lib.cuStreamIsCapturing.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(status, ctypes.byref(text))
        message = text.value.decode() if text.value else "unknown error"
        raise RuntimeError(f"{what} failed: CUDA driver error {status} ({message})")


_MAX_DYNAMIC_SHARED_BYTES = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class _Loaded:
    """A loaded module and its kernel. Whoever launches the kernel holds this object, and with it the
    module: a module is unloaded when its last holder goes, and a launch through the function of an
    unloaded module would fail (or run another module's code)."""

    def __init__(self, module, function, name: str, shared_bytes: int, device_id: int):
        self.module = module
        self.function = function
        self.handle = function.ptr
        self.name = name
        self.shared_bytes = shared_bytes
        self.device_id = device_id

    def global_words(self, name: str, count: int):
        """The module's `__device__` variable `name` as a CuPy array of `count` uint64 words (for the
        measurement and test builds' globals: trace.cuh's record pointer, decode_narrow.cu's pace counters);
        the array holds this object, and with it the module."""
        cupy = install.require_cupy()
        address = self.module.get_global_var(name)  # the driver's address, an int
        pointer = cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(address, 8 * count, self), 0)
        return cupy.ndarray((count,), dtype=cupy.uint64, memptr=pointer)


# (variant, device id) -> its one loaded module. Readers look up without the lock (a dict read is
# atomic); a miss takes it, so that two threads making their first calls at once load the module
# once and share it.
_loaded: dict[tuple[variants.Variant, int], _Loaded] = {}
_load_lock = threading.Lock()


def get_function(variant: variants.Variant, device_id: int) -> _Loaded:
    """Compile (or take from the cache) and load `variant` on `device_id`, once per process."""
    loaded = _loaded.get((variant, device_id))
    if loaded is None:
        with _load_lock:
            loaded = _loaded.get((variant, device_id))
            if loaded is None:
                loaded = _loaded[variant, device_id] = _load(variant, device_id)
    return loaded


def _load(variant: variants.Variant, device_id: int) -> _Loaded:
    import cupy

    compiled = cache.get_or_compile(variant)
    with cupy.cuda.Device(device_id):
        module = cupy.cuda.function.Module()
        module.load(compiled.cubin)
        function = module.get_function(variant.kernel_name)
        if variant.shared_bytes > 48 * 1024:  # above the default limit a kernel must opt in
            _check(_driver().cuFuncSetAttribute(ctypes.c_void_p(function.ptr), _MAX_DYNAMIC_SHARED_BYTES,
                                                variant.shared_bytes), f"cuFuncSetAttribute({variant.name})")
    return _Loaded(module, function, variant.name, variant.shared_bytes, device_id)


# --- device memory, for checked mode (not on the hot path) ------------------------------------------

def zero_int32(ptr: int, count: int, stream: int, device_id: int) -> None:
    """Zero `count` int32 words at `ptr`, ordered on `stream`."""
    import cupy

    with cupy.cuda.Device(device_id):
        _check(_driver().cuMemsetD32Async(ptr, 0, count, stream), "cuMemsetD32Async")


def read_int32(ptr: int, count: int, stream: int, device_id: int) -> np.ndarray:
    """`count` int32 words at `ptr`, once the work queued on `stream` before has finished (the host
    waits for the stream)."""
    import cupy

    words = np.empty(count, dtype=np.int32)
    with cupy.cuda.Device(device_id):
        driver = _driver()
        _check(driver.cuMemcpyDtoHAsync_v2(words.ctypes.data, ptr, words.nbytes, stream), "cuMemcpyDtoHAsync")
        _check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
    return words


_CAPTURE_STATUS_NONE = 0  # CU_STREAM_CAPTURE_STATUS_NONE


def is_capturing(stream: int, device_id: int) -> bool:
    """Whether `stream` is being captured into a CUDA graph (where the host cannot wait for it)."""
    import cupy

    status = ctypes.c_int(_CAPTURE_STATUS_NONE)
    with cupy.cuda.Device(device_id):
        _check(_driver().cuStreamIsCapturing(stream, ctypes.byref(status)), "cuStreamIsCapturing")
    return status.value != _CAPTURE_STATUS_NONE


@contextlib.contextmanager
def stream_context(stream: int):
    """The context that owns `stream` made current while launching on it, then the previous one back.
    A thread that XLA runs a callback on may have no current context, and a launch goes to the current
    context; eager calls do not need this (their framework made the device's context current)."""
    driver = _driver()
    owner, current = ctypes.c_void_p(), ctypes.c_void_p()
    _check(driver.cuStreamGetCtx(ctypes.c_void_p(stream), ctypes.byref(owner)), "cuStreamGetCtx")
    _check(driver.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
    if owner.value == current.value:
        yield
        return
    _check(driver.cuCtxPushCurrent(owner), "cuCtxPushCurrent")
    try:
        yield
    finally:
        _check(driver.cuCtxPopCurrent(ctypes.byref(current)), "cuCtxPopCurrent")


# --- TMA descriptors -------------------------------------------------------------------------------

# CU_TENSOR_MAP_DATA_TYPE_FLOAT16, _BFLOAT16, _UINT8 (an e4m3 cache, or its uint8 view: bytes) and _UINT32
# (an FP8 cache's rows read as words: kv_tensor_map's whole_rows)
_TMA_DTYPE = {np.dtype("float16"): 6, np.dtype(ml_dtypes.bfloat16): 9, np.dtype(ml_dtypes.float8_e4m3fn): 0,
              np.dtype("uint8"): 0, np.dtype("uint32"): 2}

_SWIZZLE = {0: 0, 64: 2, 128: 3}  # CU_TENSOR_MAP_SWIZZLE_NONE, _64B, _128B
_L2_PROMOTION_256B = 3
# The cache maps bring 128 bytes into L2 a miss: on the H200 4-6 % faster than 256 on the memory-bound
# 16-bit cells and 2 % at FP8 h16/4k, level elsewhere (docs/PERF_NOTES.md, ab114).
_L2_PROMOTION_128B = 2
_OOB_FILL_ZERO = 0
_OOB_FILL_NAN = 1  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA: floating-point maps only
_BOX_COLS = 64  # 64 columns: one 128-byte swizzle span of 16-bit values, or a 64-byte FP8 row


def kv_tensor_map(ptr: int, shape: tuple, strides: tuple, dtype: np.dtype, box_tokens: int, swizzle: int,
                  whole_rows: bool = False):
    """128-byte TMA descriptor (a ctypes array) over k_cache [num_blocks, page, h_kv, 576] at `ptr`, with
    `strides` in elements, boxes of 64 columns x `box_tokens` tokens landing with `swizzle` bytes of
    swizzle (the kernel variant's `kv_box`). A host-only driver call; kernels.DecodeLaunch keeps one per
    k_cache address. 16-bit boxes land 128-byte swizzled (the wgmma layout); decode.cu's FP8 boxes with a
    16-bit q land plain, to be converted into that layout (kernels_src/dequant.cuh), the 32-row narrow kernel's
    and decode.cu's with an e4m3 q 64-byte swizzled (the wgmma layout of FP8 rows). A 16-bit box outside
    the map (a bad block index) is never read and lands as NaN: that is how the decode kernel keeps bad
    pages out of the result (plan.cuh, kFlagBadPages); an FP8 map is of bytes, filled with zeros, and its
    kernel checks indices itself. A miss brings 128 bytes into L2 (the L2 promotion). With `whole_rows`
    (an FP8 cache, the 16-row narrow kernel's linear pages) a box is `box_tokens` whole rows,
    unswizzled, as they lie in the cache: the map reads a row as 4-byte words, since a box spans at most
    256 elements."""
    if whole_rows:
        words = shape[3] * dtype.itemsize // 4
        word_strides = tuple(s * dtype.itemsize // 4 for s in strides[:3]) + (1,)
        return _tensor_map_4d(ptr, (*shape[:3], words), word_strides, np.dtype("uint32"), (words, 1, box_tokens, 1),
                              0, _OOB_FILL_ZERO, "k_cache", l2_promotion=_L2_PROMOTION_128B)
    # (column, kv head, token in page, block); box = 64 columns x 1 x box_tokens x 1.
    return _tensor_map_4d(ptr, shape, strides, dtype, (_BOX_COLS, 1, box_tokens, 1), swizzle,
                          _OOB_FILL_NAN if dtype.itemsize == 2 else _OOB_FILL_ZERO, "k_cache",
                          l2_promotion=_L2_PROMOTION_128B)


def q_tensor_map(ptr: int, shape: tuple, strides: tuple, dtype: np.dtype, box_heads: int, box_positions: int):
    """128-byte TMA descriptor over q [batch, seqlen_q, heads_q, 576] at `ptr` (`strides` in elements) for
    decode.cu's Q tile: boxes of 64 columns x `box_heads` heads x `box_positions` query positions, one
    64-column box of the tile's 64 packed rows (row = s * heads_per_group + h), swizzled as the kernel's
    K boxes (128 bytes; an e4m3 q 64 bytes). Positions past seqlen_q land as zeros. Host-only, like
    kv_tensor_map; kernels.DecodeLaunch keeps one per q address."""
    # (column, head, query position, request); box = 64 columns x box_heads x box_positions x 1.
    return _tensor_map_4d(ptr, shape, strides, dtype, (_BOX_COLS, box_heads, box_positions, 1),
                          _BOX_COLS * dtype.itemsize, _OOB_FILL_ZERO, "q")


def _tensor_map_4d(ptr: int, shape: tuple, strides: tuple, dtype: np.dtype, box: tuple, swizzle: int,
                   oob_fill: int, what: str, l2_promotion: int = _L2_PROMOTION_256B):
    """cuTensorMapEncodeTiled over a 4-D array whose last axis is contiguous: `shape` and `strides` (in
    elements) outermost first, as the array has them; `box` innermost first, as the driver takes it."""
    itemsize = dtype.itemsize
    dims = (ctypes.c_uint64 * 4)(*reversed(shape))
    byte_strides = (ctypes.c_uint64 * 3)(strides[2] * itemsize, strides[1] * itemsize, strides[0] * itemsize)
    box_dims = (ctypes.c_uint32 * 4)(*box)
    element_strides = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    tensor_map = (ctypes.c_uint64 * 16)()
    _check(
        _driver().cuTensorMapEncodeTiled(
            ctypes.byref(tensor_map), ctypes.c_int(_TMA_DTYPE[dtype]), ctypes.c_uint32(4), ctypes.c_void_p(ptr),
            dims, byte_strides, box_dims, element_strides, ctypes.c_int(0), ctypes.c_int(_SWIZZLE[swizzle]),
            ctypes.c_int(l2_promotion), ctypes.c_int(oob_fill),
        ),
        f"cuTensorMapEncodeTiled({what})",
    )
    return tensor_map


# --- launches ---------------------------------------------------------------------------------------

class _LaunchAttributeValue(ctypes.Union):
    # CUlaunchAttributeValue: 64 bytes. Its fields are written as numbers: a bytes value assigned to a
    # c_char array stops at its first zero byte, which once made every cluster shape (x, 0, 0).
    _fields_ = [("raw", ctypes.c_ubyte * 64), ("int_value", ctypes.c_int), ("dims", ctypes.c_uint * 3)]


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _LaunchAttributeValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
        ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
        ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint),
    ]


_CLUSTER_DIMENSION = 4                    # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
_PROGRAMMATIC_STREAM_SERIALIZATION = 6    # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def launch_attributes(pdl: bool = False, cluster=None):
    """The launch attributes of a config, as a ctypes array (None for none): programmatic dependent
    launch, and a cluster shape (x, y, z) in CTAs."""
    attrs = []
    if pdl:
        attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value.int_value = 1
        attrs.append(attr)
    if cluster is not None:
        attr = _LaunchAttribute(id=_CLUSTER_DIMENSION)
        attr.value.dims[:] = [int(v) for v in cluster]
        attrs.append(attr)
    return (_LaunchAttribute * len(attrs))(*attrs) if attrs else None


@functools.lru_cache(maxsize=None)
def _runtime():
    import cupy
    return cupy.cuda.runtime


class Launch:
    """One kernel's launch, prepared once: its config, its argument buffers and the array of their
    addresses. A call may rewrite the arguments in place first: the driver copies them at launch
    (also into a graph being captured), so one buffer serves every call. Not for sharing between
    threads: each prepares its own."""

    def __init__(self, loaded: _Loaded, grid, block, args, pdl: bool = False):
        self._loaded = loaded     # keeps the module loaded as long as this launch may run
        self._args = list(args)   # kept alive: the driver reads them through _pointers
        self._pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self._attrs = launch_attributes(pdl)   # kept alive: the config points at it
        self._config = _LaunchConfig(*grid, *block, loaded.shared_bytes, None,
                                     ctypes.cast(self._attrs, ctypes.POINTER(_LaunchAttribute)),
                                     len(self._attrs) if self._attrs else 0)
        self._config_ref = ctypes.byref(self._config)
        self._function = ctypes.c_void_p(loaded.handle)
        self._launch_kernel = _driver().cuLaunchKernelEx
        self._name, self._device_id = loaded.name, loaded.device_id

    def set_arg(self, index: int, arg) -> None:
        """Pass the buffer `arg` as argument `index` from now on."""
        self._args[index] = arg
        self._pointers[index] = ctypes.addressof(arg)

    def __call__(self, stream: int) -> None:
        """Launch on `stream`. With `pdl`, the kernel may begin while the previous kernel in the stream is
        finishing; it must wait with `griddepcontrol.wait` before reading that kernel's results."""
        self._config.stream = stream
        if _runtime().getDevice() == self._device_id:
            status = self._launch_kernel(self._config_ref, self._function, self._pointers, None)
        else:  # the driver launches into the current context
            import cupy
            with cupy.cuda.Device(self._device_id):
                status = self._launch_kernel(self._config_ref, self._function, self._pointers, None)
        if status:
            _check(status, f"launch of {self._name}")
