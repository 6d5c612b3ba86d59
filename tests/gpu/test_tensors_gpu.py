"""On the GPU: the attribute fast path of tensors.take_all describes torch and CuPy arrays exactly as
their DLPack capsules do."""
from __future__ import annotations

import pytest

from flashmla_cupy import tensors

pytestmark = pytest.mark.gpu


def _same(a: tensors.View, b: tensors.View) -> None:
    assert (a.ptr, a.shape, a.strides, a.dtype, a.device_type, a.device_id, a.framework) == \
           (b.ptr, b.shape, b.strides, b.dtype, b.device_type, b.device_id, b.framework)


def test_torch_native_view_matches_dlpack():
    torch = pytest.importorskip("torch")
    base = torch.zeros(3, 2, 7, 640, dtype=torch.bfloat16, device="cuda")
    for t in (base, base[:, :, 2:5, :576], torch.zeros(5, 9, dtype=torch.int32, device="cuda")[:, :4]):
        stream = torch.cuda.current_stream().cuda_stream
        fast = tensors.take_all({"x": t}, stream, stream_owner="torch")[0]["x"]
        slow = tensors.take(t, "x", stream)
        _same(fast, slow)


def test_cupy_native_view_matches_dlpack():
    cupy = pytest.importorskip("cupy")
    import ml_dtypes
    base = cupy.zeros((3, 2, 7, 640), dtype=ml_dtypes.bfloat16)
    for a in (base, base[:, :, 2:5, :576], cupy.zeros((5, 9), dtype=cupy.int32)[:, :4]):
        stream = cupy.cuda.get_current_stream().ptr
        fast = tensors.take_all({"x": a}, stream, stream_owner="cupy")[0]["x"]
        slow = tensors.take(a, "x", stream)
        _same(fast, slow)
