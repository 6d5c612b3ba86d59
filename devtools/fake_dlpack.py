"""Fake CUDA DLPack producers for CPU-only tests.

Capsules are built by hand with ctypes (legacy `DLManagedTensor` and versioned
`DLManagedTensorVersioned`) around made-up device addresses that nobody dereferences. The structs
are declared here independently of flashmla_cupy.tensors, so a layout mistake there fails a test.
Every deleter call is counted, to check that a capsule is released exactly once.
"""
from __future__ import annotations

import collections
import ctypes

from flashmla_cupy.tensors import contiguous_strides as contiguous   # also fake_cuda's

KDL_CPU = 1
KDL_CUDA = 2
BASE_PTR = 0x7F00_0000_0000   # a 256-byte aligned fake device address
DTYPES = {"bf16": (4, 16), "fp16": (2, 16), "fp32": (2, 32), "int32": (0, 32), "int64": (0, 64),
          "e4m3": (10, 8), "uint8": (1, 8)}
FLAG_IS_COPIED = 1 << 1


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32),
                ("dtype", _DType), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _ManagedVersioned(ctypes.Structure):
    _fields_ = [("version", _Version), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p), ("flags", ctypes.c_uint64), ("dl_tensor", _Tensor)]


DELETER_CALLS: collections.Counter[int] = collections.Counter()  # managed address -> calls
# Fake structs are never freed, so an address is never reused and a late second deleter call is
# still counted (and reads valid memory).
_KEEP: list[tuple] = []


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _deleter(address):
    DELETER_CALLS[address] += 1


def _capi(name, restype, *argtypes):
    return ctypes.PYFUNCTYPE(restype, *argtypes)((name, ctypes.pythonapi))


_NAME_LEGACY = b"dltensor"
_NAME_VERSIONED = b"dltensor_versioned"
_is_valid = _capi("PyCapsule_IsValid", ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)
_pointer = _capi("PyCapsule_GetPointer", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule):
    """What a producer does when its capsule dies: free it unless a consumer renamed (claimed) it."""
    for name in (_NAME_LEGACY, _NAME_VERSIONED):
        if _is_valid(capsule, name):
            _deleter(_pointer(capsule, name))


_DESTRUCTOR_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_capsule_new = _capi("PyCapsule_New", ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p,
                     _DESTRUCTOR_TYPE)


class FakeArray:
    """A CUDA array that exists only as DLPack metadata. `versioned`: answers `max_version` with a
    DLManagedTensorVersioned (torch, CuPy); otherwise the keyword is refused (older JAX)."""

    versioned = True

    def __init__(self, shape, dtype="bf16", strides=None, *, device_id=0, device_type=KDL_CUDA,
                 ptr=BASE_PTR, null_strides=False, byte_offset=0, copied=False):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.strides = tuple(strides) if strides is not None else contiguous(self.shape)
        self.device = (device_type, device_id)
        self.ptr, self.byte_offset = ptr, byte_offset
        self.null_strides, self.copied = null_strides, copied
        self.exported: list[int] = []       # managed-tensor addresses handed out
        self.streams: list[object] = []     # the stream= of every __dlpack__ call

    def __dlpack_device__(self):
        return self.device

    def deleter_calls(self) -> list[int]:
        return [DELETER_CALLS[address] for address in self.exported]

    def _capsule(self, versioned: bool):
        ndim = len(self.shape)
        shape = (ctypes.c_int64 * ndim)(*self.shape)
        strides = (ctypes.c_int64 * ndim)(*self.strides)
        code, bits = DTYPES.get(self.dtype, self.dtype)   # a name, or a raw (code, bits) pair
        tensor = _Tensor(
            data=self.ptr, device=_Device(*self.device), ndim=ndim, dtype=_DType(code, bits, 1),
            shape=ctypes.addressof(shape),
            strides=None if self.null_strides else ctypes.addressof(strides),
            byte_offset=self.byte_offset)
        deleter = ctypes.cast(_deleter, ctypes.c_void_p).value
        if versioned:
            managed = _ManagedVersioned(version=_Version(1, 0), deleter=deleter,
                                        flags=FLAG_IS_COPIED if self.copied else 0, dl_tensor=tensor)
        else:
            managed = _Managed(dl_tensor=tensor, deleter=deleter)
        address = ctypes.addressof(managed)
        _KEEP.append((managed, shape, strides))
        self.exported.append(address)
        name = _NAME_VERSIONED if versioned else _NAME_LEGACY
        return _capsule_new(address, name, _capsule_destructor)


class FakeTorch(FakeArray):
    """Like torch: a versioned capsule when asked with max_version, legacy otherwise."""

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.streams.append(stream)
        return self._capsule(versioned=max_version is not None and tuple(max_version) >= (1, 0))


class FakeJax(FakeArray):
    """Like older JAX: legacy capsules only; the max_version keyword is a TypeError."""

    def __dlpack__(self, *, stream=None):
        self.streams.append(stream)
        return self._capsule(versioned=False)


class FakeCupy(FakeTorch):
    """Like CuPy: same protocol behaviour as torch."""


def decode_args(batch=2, seqlen_q=1, heads_q=16, heads_kv=1, num_blocks=8, max_blocks=4,
                dtype="bf16", num_parts=4, producer=FakeTorch):
    """A valid set of flash_mla_with_kvcache arguments (all fake CUDA arrays on device 0)."""
    return dict(
        q=producer((batch, seqlen_q, heads_q, 576), dtype, ptr=BASE_PTR),
        k_cache=producer((num_blocks, 64, heads_kv, 576), dtype, ptr=BASE_PTR + (1 << 30)),
        block_table=producer((batch, max_blocks), "int32", ptr=BASE_PTR + (2 << 30)),
        cache_seqlens=producer((batch,), "int32", ptr=BASE_PTR + (3 << 30)),
        head_dim_v=512,
        tile_scheduler_metadata=producer((num_parts, 8), "int32", ptr=BASE_PTR + (4 << 30)),
        num_splits=producer((batch + 1,), "int32", ptr=BASE_PTR + (5 << 30)),
    )
