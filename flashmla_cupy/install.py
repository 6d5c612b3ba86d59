"""What the installation and the machine provide, and one line that says how to fix each missing part.

The package needs one CUDA extra, `cu12` or `cu13`: CuPy, NVRTC and the CUDA headers of that CUDA
major version. Compiling needs nothing more (no GPU, no driver). Running needs an NVIDIA driver that
supports that major version and a Hopper GPU. Every check here runs once (memoised) or only after
something failed, never on the hot path; `python -m flashmla_cupy info` shows them all.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
from dataclasses import dataclass

from .errors import CudaUnavailableError, MissingDependencyError, UnsupportedDeviceError

HOPPER = (9, 0)  # the kernels are compiled for sm_90a, which runs only on compute capability 9.0


@dataclass(frozen=True)
class Extra:
    """One CUDA extra of the package (pyproject.toml's optional dependencies; a test keeps them equal)."""

    name: str       # "cu12" | "cu13"
    major: int      # the CUDA major version of its wheels
    cupy: str       # its CuPy distribution
    nvrtc: str      # pip requirements of its NVRTC library, CUDA runtime headers and CCCL headers
    runtime: str
    cccl: str
    driver: str     # the oldest driver branch that supports this CUDA major version

    @property
    def install(self) -> str:
        return f"pip install 'flashmla-cupy[{self.name}]'"


EXTRAS = (
    Extra("cu12", 12, "cupy-cuda12x", "nvidia-cuda-nvrtc-cu12==12.9.*", "nvidia-cuda-runtime-cu12==12.9.*",
          "nvidia-cuda-cccl-cu12==12.9.*", "R525"),
    Extra("cu13", 13, "cupy-cuda13x", "nvidia-cuda-nvrtc>=13.0,<14", "nvidia-cuda-runtime>=13.0,<14",
          "nvidia-cuda-cccl>=13.0,<13.2", "R580"),
)
_CUDA_ERROR_NO_DEVICE = 100   # cudaErrorNoDevice


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def installed_extras() -> list[Extra]:
    """The extras whose CuPy is installed (two means a broken install: they share the `cupy` module)."""
    return [extra for extra in EXTRAS if _installed(extra.cupy)]


@functools.lru_cache(maxsize=None)
def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the NVIDIA driver supports (what `nvidia-smi` shows), or None without a driver.
    Asks libcuda directly: it needs no GPU and no CuPy."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def _version(version: tuple[int, int] | None) -> str:
    return "unknown" if version is None else f"{version[0]}.{version[1]}"


def extra_for_driver(driver: tuple[int, int] | None) -> Extra | None:
    """The newest extra the driver can run, or None when it is older than CUDA 12 (or absent)."""
    usable = [extra for extra in EXTRAS if driver is not None and driver[0] >= extra.major]
    return usable[-1] if usable else None


def choose_extra_hint() -> str:
    """Which extra to install on this machine, in words."""
    driver = driver_cuda_version()
    extra = extra_for_driver(driver)
    if extra is not None:
        return f"{extra.install} (this driver supports CUDA {_version(driver)})"
    choices = " or ".join(f"{e.install} for a CUDA {e.major} driver" for e in reversed(EXTRAS))
    return f"{choices} (`nvidia-smi` shows the driver's CUDA version)"


def require_cupy():
    """The cupy module; MissingDependencyError when no CUDA extra is installed or CuPy cannot load."""
    try:
        import cupy
    except ImportError as exc:
        extras = installed_extras()
        if not extras:
            raise MissingDependencyError(
                f"flashmla_cupy needs one CUDA extra and none is installed: {choose_extra_hint()}") from None
        raise MissingDependencyError(
            f"CuPy ({', '.join(e.cupy for e in extras)}) is installed but does not import ({exc}): "
            f"reinstall it with {extras[0].install}") from exc
    return cupy


def _current_extra() -> Extra | None:
    """The installed extra (the first when two are); None without one."""
    extras = installed_extras()
    return extras[0] if extras else None


def requirement(part: str) -> str:
    """`pip install ...` for one wheel ("nvrtc", "runtime" or "cccl") of the installed extra, or the
    whole extra when none is installed."""
    extra = _current_extra()
    if extra is None:
        return choose_extra_hint()
    return f"pip install '{getattr(extra, part)}' (part of {extra.install})"


@functools.lru_cache(maxsize=None)
def nvrtc():
    """CuPy's NVRTC binding, checked to find the NVRTC library (memoised)."""
    require_cupy()
    from cupy.cuda import nvrtc as binding
    try:
        binding.getVersion()
    except Exception as exc:   # CuPy reports a missing library with several exception types
        raise MissingDependencyError(
            f"the NVRTC library was not found ({type(exc).__name__}: {exc}): {requirement('nvrtc')}") from None
    return binding


def runtime_cuda_version(cupy) -> tuple[int, int]:
    """The CUDA runtime version CuPy runs on (the installed extra's)."""
    version = cupy.cuda.runtime.runtimeGetVersion()
    return version // 1000, version % 1000 // 10


def cuda_unavailable(cupy, exc: Exception) -> CudaUnavailableError:
    """The one-line reason why CuPy could not reach a GPU (its CUDARuntimeError is `exc`)."""
    driver, runtime = driver_cuda_version(), runtime_cuda_version(cupy)
    if driver is None:
        return CudaUnavailableError(
            "no NVIDIA driver here (libcuda.so.1 cannot be loaded): the kernels run on an NVIDIA Hopper GPU "
            "(`python -m flashmla_cupy warmup` compiles them without one)")
    if driver[0] < runtime[0]:
        fit = extra_for_driver(driver)
        other = f"install {fit.install} instead, or " if fit is not None else ""
        needed = next((e for e in EXTRAS if e.major == runtime[0]), None)
        branch = f" ({needed.driver} or newer)" if needed is not None else ""
        return CudaUnavailableError(
            f"the NVIDIA driver supports CUDA {_version(driver)}, older than the installed CUDA {_version(runtime)} "
            f"wheels: {other}update the driver to one for CUDA {runtime[0]}{branch}")
    if getattr(exc, "status", None) == _CUDA_ERROR_NO_DEVICE:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" with CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        return CudaUnavailableError(
            f"the NVIDIA driver (CUDA {_version(driver)}) sees no GPU{where}: check `nvidia-smi`")
    return CudaUnavailableError(f"CUDA could not reach the GPU: {exc}")


def device_count() -> int:
    """Visible GPUs; raises MissingDependencyError or CudaUnavailableError (one line) when none can be used."""
    cupy = require_cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise cuda_unavailable(cupy, exc) from None
    if count == 0:
        raise CudaUnavailableError(f"the NVIDIA driver (CUDA {_version(driver_cuda_version())}) sees no GPU")
    return count


def require_hopper(device_id: int):
    """The device's info (launch.DeviceInfo); raises UnsupportedDeviceError unless it is a Hopper GPU,
    or one of this module's errors when there is no usable GPU at all."""
    from . import launch

    info = launch.device_info(device_id)
    if info.cc != HOPPER:
        major, minor = info.cc
        raise UnsupportedDeviceError(
            f"cuda:{device_id} is a {info.name} (compute capability {major}.{minor}); flashmla_cupy's "
            "kernels are built for sm_90a and need a Hopper GPU (compute capability 9.0: H100, H200, "
            "H800, H20)")
    return info
