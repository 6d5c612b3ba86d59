"""The device planner (kernels_src/scheduler.cu) agrees with plan_numpy bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from flashmla_cupy.params import METADATA_FIELDS
from flashmla_cupy.plan import PAGE_SIZE, plan_numpy
from gpu_cases import run_scheduler
from test_plan import random_seqlens  # tests/ is on pytest's pythonpath

pytestmark = pytest.mark.gpu


def device_plan(seqlens: np.ndarray, num_parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Run the scheduler kernel on a private stream; outputs start as -1 so every unwritten field shows."""
    import cupy as cp

    from flashmla_cupy import tensors

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        dev_seqlens = cp.asarray(seqlens, dtype=cp.int32)
        metadata = cp.full((num_parts, METADATA_FIELDS), -1, dtype=cp.int32)
        num_splits = cp.full(len(seqlens) + 1, -1, dtype=cp.int32)
        run_scheduler(tensors.take(dev_seqlens, "cache_seqlens", stream.ptr),
                              tensors.take(metadata, "tile_scheduler_metadata", stream.ptr),
                              tensors.take(num_splits, "num_splits", stream.ptr), num_parts, stream.ptr)
        stream.synchronize()
        return cp.asnumpy(metadata), cp.asnumpy(num_splits)


def assert_same_plan(seqlens: np.ndarray, num_parts: int) -> None:
    want_metadata, want_splits = plan_numpy(seqlens, num_parts)
    got_metadata, got_splits = device_plan(seqlens, num_parts)
    for name, got, want in (("metadata", got_metadata, want_metadata), ("num_splits", got_splits, want_splits)):
        if not np.array_equal(got, want):
            at = tuple(int(i) for i in np.argwhere(got != want)[0])
            pytest.fail(f"{name} differs for batch {len(seqlens)}, {num_parts} parts: first at {at}, "
                        f"device {got[at[0]]}, numpy {want[at[0]]}")


def test_random_batches_match_numpy():
    rng = np.random.default_rng(11)
    for _ in range(300):
        batch = int(rng.integers(1, 301))
        assert_same_plan(random_seqlens(rng, batch), int(rng.integers(1, 133)))


@pytest.mark.parametrize("batch", [8191, 8192, 8193, 20000, 65536])
def test_large_batches_cross_shared_memory_chunks(batch):
    rng = np.random.default_rng(batch)
    for num_parts in (1, 3, 132):
        assert_same_plan(random_seqlens(rng, batch), num_parts)


@pytest.mark.parametrize("seqlens, num_parts", [
    ([0], 1), ([0], 132), ([1], 132), ([0, 0, 0], 2), ([64, 64, 640], 3), ([100, 0, 5000, 64, 65], 4),
    ([1024 * PAGE_SIZE], 4), ([2**31 - 1] * 40, 132),
    ([16384] * 128, 132), ([16384] * 120, 132), ([16384] * 116, 132), ([8192] * 128, 66),
    ([16384] * 127 + [3 * 16384], 132), ([16384] * 128 + [16000], 132),
])
def test_edge_cases_match_numpy(seqlens, num_parts):
    assert_same_plan(np.array(seqlens, dtype=np.int32), num_parts)
