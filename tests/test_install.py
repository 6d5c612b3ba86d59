"""Every install and environment problem is one line that says how to fix it (install.py), simulated
with missing modules, libraries and devices; `info` reports them all without crashing."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import types

import pytest

from flashmla_cupy import __main__ as cli
from flashmla_cupy import compiler, install, launch, variants
from flashmla_cupy.errors import CudaUnavailableError, MissingDependencyError, UnsupportedDeviceError

REPO = pathlib.Path(__file__).resolve().parents[1]
CU12, CU13 = install.EXTRAS


@pytest.fixture
def no_cupy(monkeypatch):
    """`import cupy` fails, as where no CUDA extra is installed."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    for memo in (install.nvrtc, compiler.nvrtc_version):
        memo.cache_clear()
    yield
    for memo in (install.nvrtc, compiler.nvrtc_version):
        memo.cache_clear()


def with_extras(monkeypatch, *extras):
    monkeypatch.setattr(install, "installed_extras", lambda: list(extras))


def with_driver(monkeypatch, version):
    monkeypatch.setattr(install, "driver_cuda_version", lambda: version)


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("driver, expected", [
    ((13, 0), "pip install 'flashmla-cupy[cu13]' (this driver supports CUDA 13.0)"),
    ((12, 8), "pip install 'flashmla-cupy[cu12]' (this driver supports CUDA 12.8)"),
    (None, "pip install 'flashmla-cupy[cu13]' for a CUDA 13 driver or pip install 'flashmla-cupy[cu12]' "
           "for a CUDA 12 driver (`nvidia-smi` shows the driver's CUDA version)"),
])
def test_no_extra_says_which_to_install(no_cupy, monkeypatch, driver, expected):
    with_extras(monkeypatch)
    with_driver(monkeypatch, driver)
    with pytest.raises(MissingDependencyError) as info:
        install.require_cupy()
    assert one_line(info.value) == f"flashmla_cupy needs one CUDA extra and none is installed: {expected}"
    assert isinstance(info.value, ImportError)


def test_a_broken_cupy_says_reinstall(no_cupy, monkeypatch):
    with_extras(monkeypatch, CU13)
    with pytest.raises(MissingDependencyError, match=r"cupy-cuda13x\) is installed but does not import .* "
                                                     r"reinstall it with pip install 'flashmla-cupy\[cu13\]'"):
        install.require_cupy()


@pytest.mark.parametrize("extra, wheel", [(CU12, "nvidia-cuda-nvrtc-cu12==12.9.*"),
                                         (CU13, "nvidia-cuda-nvrtc>=13.0,<14")])
def test_missing_nvrtc_names_the_wheel_of_the_installed_extra(monkeypatch, extra, wheel):
    from cupy.cuda import nvrtc

    def no_library():
        raise RuntimeError("CuPy failed to load libnvrtc.so.13: OSError: libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(nvrtc, "getVersion", no_library)
    with_extras(monkeypatch, extra)
    install.nvrtc.cache_clear()
    try:
        with pytest.raises(MissingDependencyError) as info:
            compiler.compile_variant(variants.scheduler_variant())
    finally:
        install.nvrtc.cache_clear()
    text = one_line(info.value)
    assert text.startswith("the NVRTC library was not found (RuntimeError: CuPy failed to load libnvrtc.so.13")
    assert text.endswith(f"pip install '{wheel}' (part of pip install 'flashmla-cupy[{extra.name}]')")


@pytest.mark.parametrize("part, wheel", [("cccl", "nvidia-cuda-cccl-cu12==12.9.*"),
                                         ("cudart", "nvidia-cuda-runtime-cu12==12.9.*")])
def test_missing_headers_name_the_wheel_of_the_installed_extra(monkeypatch, part, wheel):
    from cuda import pathfinder

    real = pathfinder.find_nvidia_header_directory
    monkeypatch.setattr(pathfinder, "find_nvidia_header_directory", lambda name: None if name == part else real(name))
    with_extras(monkeypatch, CU12)
    compiler.header_dirs.cache_clear()
    try:
        with pytest.raises(MissingDependencyError) as info:
            compiler.header_dirs()
    finally:
        compiler.header_dirs.cache_clear()
    assert one_line(info.value).endswith(f"headers were not found: pip install '{wheel}' "
                                         "(part of pip install 'flashmla-cupy[cu12]')")


class _NoDevice(Exception):
    def __init__(self, status):
        super().__init__(f"CUDA runtime error {status}")
        self.status = status


def fake_runtime(monkeypatch, runtime_version=13000, error_status=None, count=1):
    """CuPy's runtime module answering as a machine with that CUDA runtime and device situation."""
    import cupy

    def fail(*args):
        raise _NoDevice(error_status)

    runtime = types.SimpleNamespace(
        CUDARuntimeError=_NoDevice, runtimeGetVersion=lambda: runtime_version,
        getDeviceCount=fail if error_status else (lambda: count),
        getDeviceProperties=fail if error_status else None)
    monkeypatch.setattr(cupy.cuda, "runtime", runtime)
    monkeypatch.setattr(launch, "device_info", launch.device_info.__wrapped__)   # no memo across tests


@pytest.mark.parametrize("driver, runtime, fix", [
    ((12, 4), 13020, "the NVIDIA driver supports CUDA 12.4, older than the installed CUDA 13.2 wheels: install "
                     "pip install 'flashmla-cupy[cu12]' instead, or update the driver to one for CUDA 13 (R580 or newer)"),
    ((11, 8), 12090, "the NVIDIA driver supports CUDA 11.8, older than the installed CUDA 12.9 wheels: update the "
                     "driver to one for CUDA 12 (R525 or newer)"),
])
def test_a_driver_too_old_for_the_wheels_prints_both_versions(monkeypatch, driver, runtime, fix):
    fake_runtime(monkeypatch, runtime, error_status=35)   # cudaErrorInsufficientDriver
    with_driver(monkeypatch, driver)
    with pytest.raises(CudaUnavailableError) as info:
        launch.device_info(0)
    assert one_line(info.value) == fix


def test_no_driver(monkeypatch):
    fake_runtime(monkeypatch, error_status=35)
    with_driver(monkeypatch, None)
    with pytest.raises(CudaUnavailableError, match=r"^no NVIDIA driver here \(libcuda.so.1 cannot be loaded\)"):
        install.device_count()


def test_no_gpu(monkeypatch):
    fake_runtime(monkeypatch, error_status=100)   # cudaErrorNoDevice
    with_driver(monkeypatch, (13, 0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(CudaUnavailableError) as info:
        launch.device_info(0)
    assert one_line(info.value) == ("the NVIDIA driver (CUDA 13.0) sees no GPU with CUDA_VISIBLE_DEVICES='': "
                                    "check `nvidia-smi`")
    assert isinstance(info.value, UnsupportedDeviceError)


def test_a_non_hopper_gpu(monkeypatch):
    monkeypatch.setattr(launch, "device_info",
                        lambda device_id: launch.DeviceInfo(device_id, "NVIDIA A100-SXM4-80GB", (8, 0), 108, 166912))
    with pytest.raises(UnsupportedDeviceError) as info:
        install.require_hopper(0)
    assert one_line(info.value).startswith("cuda:0 is a NVIDIA A100-SXM4-80GB (compute capability 8.0); "
                                           "flashmla_cupy's kernels are built for sm_90a and need a Hopper GPU")


def test_a_call_without_cupy_says_which_extra(no_cupy, monkeypatch):
    """A JAX (or other non-torch) caller needs CuPy for the launch stream: the first thing to fail."""
    from fake_dlpack import FakeJax
    from flashmla_cupy import get_mla_metadata

    with_extras(monkeypatch)
    with_driver(monkeypatch, (13, 0))
    with pytest.raises(MissingDependencyError, match=r"none is installed: pip install 'flashmla-cupy\[cu13\]'"):
        get_mla_metadata(FakeJax((4,), "int32"), 16, 1)


def test_driver_version_from_libcuda(monkeypatch):
    install.driver_cuda_version.cache_clear()
    try:
        class FakeLibcuda:
            def cuDriverGetVersion(self, pointer):
                pointer._obj.value = 12080
                return 0

        monkeypatch.setattr(install.ctypes, "CDLL", lambda name: FakeLibcuda())
        assert install.driver_cuda_version() == (12, 8)
        install.driver_cuda_version.cache_clear()

        def missing(name):
            raise OSError(f"{name}: cannot open shared object file")
        monkeypatch.setattr(install.ctypes, "CDLL", missing)
        assert install.driver_cuda_version() is None
    finally:
        install.driver_cuda_version.cache_clear()


def test_extras_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in install.EXTRAS:
        declared = {line.split(";")[0].replace(" ", "") for line in extras[extra.name]}
        assert {extra.nvrtc, extra.runtime, extra.cccl} <= declared
        assert any(line.startswith(extra.cupy) for line in declared)


# --- the command line -------------------------------------------------------------------------------

def test_info_reports_every_missing_part_without_crashing(no_cupy, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FLASHMLA_CUPY_CACHE_DIR", str(tmp_path))
    with_extras(monkeypatch)
    with_driver(monkeypatch, None)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "MISSING: no CUDA extra installed: pip install 'flashmla-cupy[cu13]' for a CUDA 13 driver" in lines["cuda"]
    for label in ("cupy", "nvrtc"):
        assert "MISSING: flashmla_cupy needs one CUDA extra and none is installed" in lines[label]
    assert "MISSING: no NVIDIA driver" in lines["driver"]
    assert "MISSING:" in lines["gpus"]
    assert "cutlass 4.2" in lines["headers"]   # what is there is still shown


def test_info_names_two_extras_installed_at_once(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FLASHMLA_CUPY_CACHE_DIR", str(tmp_path))
    with_extras(monkeypatch, CU12, CU13)
    cli.main(["info"])
    assert ("cupy-cuda12x and cupy-cuda13x are both installed and overwrite each other's `cupy` module"
            in capsys.readouterr().out)


def test_warmup_without_cupy_says_so_once(no_cupy, monkeypatch, capsys):
    with_extras(monkeypatch)
    assert cli.main(["warmup"]) == cli.EXIT_FAILED
    captured = capsys.readouterr()
    assert captured.err.count("none is installed") == 1 and captured.err.count("\n") == 1
    assert "compiling" not in captured.out


def test_demo_without_cupy_names_the_extra(no_cupy, monkeypatch, capsys):
    with_extras(monkeypatch)
    assert cli.main(["demo"]) == cli.EXIT_NO_GPU
    assert capsys.readouterr().out.startswith("demo: flashmla_cupy needs one CUDA extra and none is installed")


def test_info_in_a_process_where_cupy_does_not_import(tmp_path):
    """The user's view: a fresh interpreter whose `cupy` fails to import."""
    shadow = tmp_path / "cupy"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}",
                   "FLASHMLA_CUPY_CACHE_DIR": str(tmp_path / "cache")}
    for command in ("info", "warmup"):
        done = subprocess.run([sys.executable, "-m", "flashmla_cupy", command], capture_output=True, text=True,
                              env=environment, timeout=120)
        assert "Traceback" not in done.stderr, done.stderr
        assert "does not import (libcudart.so.13" in done.stdout + done.stderr
    assert done.returncode == cli.EXIT_FAILED and done.stderr.count("does not import") == 1
