"""Shared pytest setup: GPU tests skip with a clear reason on machines without a Hopper GPU."""
from __future__ import annotations

import functools
import json
import os
import sys

import pytest


@functools.lru_cache(maxsize=None)
def gpu_skip_reason() -> str | None:
    """None when a CUDA device of compute capability 9.0 is usable, else why GPU tests skip."""
    try:
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no CuPy, no device
        return f"no CUDA GPU here ({type(exc).__name__}: {exc}); GPU tests run via scripts/gpu_check.sh"
    if count == 0:
        return "no CUDA GPU here; GPU tests run via scripts/gpu_check.sh"
    major = cupy.cuda.Device(0).compute_capability
    if major != "90":
        return f"GPU 0 has compute capability {major}; these kernels need sm_90 (Hopper)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def eight_parts():
    """GPU tests: plans of at most 8 parts, prepared afresh (devtools/gpu_cases.cap_plan_parts), so that a
    small batch makes the parts a whole grid would: long ones (a payload of at least kLongPartPages, where
    the narrow kernel's two loader lanes take the pages in turn), or about one request each (plans that
    keep equal requests whole)."""
    from gpu_cases import cap_plan_parts

    cap_plan_parts(8)
    yield
    cap_plan_parts(None)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an sm_90 CUDA GPU; skipped elsewhere with the reason")


def pytest_sessionfinish(session, exitstatus):
    """With FLASHMLA_CUPY_TEST_REPORT set, write every accuracy report of the GPU decode tests there
    (case, seed, worst errors), with the worst of each measure on top."""
    path = os.environ.get("FLASHMLA_CUPY_TEST_REPORT")
    module = sys.modules.get("gpu_cases")   # devtools/gpu_cases.py keeps the reports
    if not path or module is None:
        return
    reports = module.REPORTS
    passed = [r for r in reports if r["passed"]]
    measures = ("out_tolerance_used", "lse_tolerance_used", "out_max_abs", "out_max_rel", "out_cos_diff",
                "lse_max_abs", "lse_max_rel")
    worst = {key: max((r[key] for r in passed if key in r), default=None) for key in measures}
    with open(path, "w") as f:
        json.dump({"checked": len(reports), "passed": len(passed), "worst": worst, "cases": reports}, f, indent=1)
