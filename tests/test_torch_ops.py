"""torch integration on the CPU (torch_ops.py): the ops' schemas, their fake implementations on fake
CUDA tensors (static and dynamic shapes), the public functions traced by dynamo into exactly these
ops, opcheck and torch.compile over CPU stand-ins for the CUDA kernels. tests/gpu/test_integration_gpu.py
runs the same against the real kernels."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from flashmla_cupy import flash_mla_with_kvcache, get_mla_metadata, launch, plan  # noqa: E402
from flashmla_cupy import torch_ops  # noqa: E402
from flashmla_cupy.errors import InvalidInputError, UnsupportedDeviceError  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SM_COUNT = 132
B, S_Q, H_Q, PAGES = 3, 2, 32, 4


@pytest.fixture(autouse=True)
def hopper(monkeypatch):
    """A fake H100 for the fakes' device query (the SM count sizes the plan)."""
    monkeypatch.setattr(launch, "device_info",
                        lambda device_id: launch.DeviceInfo(device_id, "NVIDIA H100 80GB HBM3", (9, 0), SM_COUNT, 232448))


def cuda_inputs(b=B, s_q=S_Q, h_q=H_Q, pages=PAGES, dtype=torch.bfloat16, device="cuda"):
    return dict(q=torch.empty(b, s_q, h_q, 576, dtype=dtype, device=device),
                k_cache=torch.empty(b * pages, 64, 1, 576, dtype=dtype, device=device),
                block_table=torch.empty(b, pages, dtype=torch.int32, device=device),
                cache_seqlens=torch.empty(b, dtype=torch.int32, device=device))


def test_schemas():
    ops = torch.ops.flashmla_cupy
    assert str(ops.get_mla_metadata.default._schema) == (
        "flashmla_cupy::get_mla_metadata(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, "
        "bool is_fp8_kvcache=False) -> (Tensor, Tensor)")
    decode_args = ("Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
                   "Tensor tile_scheduler_metadata, Tensor num_splits, float? softmax_scale, bool causal, bool? check")
    fp8_args = "Tensor? descale_q=None, Tensor? descale_k=None, str? kv_dtype=None"
    assert str(ops.decode.default._schema) == f"flashmla_cupy::decode({decode_args}, {fp8_args}) -> (Tensor, Tensor)"
    assert str(ops.decode_out.default._schema) == (
        f"flashmla_cupy::decode_out({decode_args}, Tensor(a!) out, Tensor(b!) lse, {fp8_args}) -> ()")


def test_fakes_give_the_output_shapes():
    with FakeTensorMode():
        x = cuda_inputs()
        metadata, num_splits = torch.ops.flashmla_cupy.get_mla_metadata(x["cache_seqlens"], S_Q * H_Q, 1)
        out, lse = torch.ops.flashmla_cupy.decode(*x.values(), 512, metadata, num_splits, None, True, None)
    assert metadata.shape == (plan.num_sm_parts(SM_COUNT, 1, S_Q * H_Q), 8) and num_splits.shape == (B + 1,)
    assert metadata.dtype == num_splits.dtype == torch.int32 and metadata.device.type == "cuda"
    assert out.shape == (B, S_Q, H_Q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (B, H_Q, S_Q) and lse.dtype == torch.float32
    assert out.is_contiguous() and lse.is_contiguous()


def test_fakes_check_every_rule_while_tracing():
    with FakeTensorMode():
        x = cuda_inputs()
        metadata, num_splits = torch.ops.flashmla_cupy.get_mla_metadata(x["cache_seqlens"], S_Q * H_Q, 1)
        x["q"] = torch.empty(B, S_Q, H_Q, 576, dtype=torch.float32, device="cuda")
        x["block_table"] = torch.empty(B + 1, PAGES, dtype=torch.int32, device="cuda")
        with pytest.raises(InvalidInputError) as info:
            torch.ops.flashmla_cupy.decode(*x.values(), 512, metadata, num_splits, None, True, None)
        assert [v.argument for v in info.value.violations] == ["q.dtype", "block_table.shape[0]"]
        out = torch.empty(B, H_Q, S_Q, dtype=torch.float32, device="cuda")
        lse = torch.empty(B, H_Q, S_Q, dtype=torch.float32, device="cuda")
        x["q"] = torch.empty(B, S_Q, H_Q, 576, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(InvalidInputError) as info:
            torch.ops.flashmla_cupy.decode_out(*x.values(), 512, metadata, num_splits, None, True, None, out, lse)
        assert [v.argument for v in info.value.violations] == ["block_table.shape[0]", "out.shape", "out.dtype"]
        with pytest.raises(InvalidInputError, match="cache_seqlens.device: got cpu"):
            torch.ops.flashmla_cupy.get_mla_metadata(torch.empty(B, dtype=torch.int32), 16, 1)


def test_fakes_refuse_a_gpu_that_is_not_hopper(monkeypatch):
    monkeypatch.setattr(launch, "device_info",
                        lambda device_id: launch.DeviceInfo(device_id, "NVIDIA A100", (8, 0), 108, 166912))
    with FakeTensorMode(), pytest.raises(UnsupportedDeviceError, match="need a Hopper GPU"):
        torch.ops.flashmla_cupy.get_mla_metadata(torch.empty(4, dtype=torch.int32, device="cuda"), 16, 1)


def test_fakes_with_a_dynamic_batch():
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def dynamic_batch(t):   # a fake CUDA tensor shaped like t, its first dimension symbolic
        sizes = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1)
        shape = mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(sizes)).shape
        return torch.empty(shape, dtype=t.dtype, device="cuda")

    real = cuda_inputs(device="cpu")
    with mode:
        x = {name: dynamic_batch(t) for name, t in real.items()}
        metadata, num_splits = torch.ops.flashmla_cupy.get_mla_metadata(x["cache_seqlens"], S_Q * H_Q, 1)
        out, lse = torch.ops.flashmla_cupy.decode(*x.values(), 512, metadata, num_splits, None, True, None)
    batch = x["q"].shape[0]
    assert isinstance(batch, torch.SymInt)
    assert out.shape[0] is batch or str(out.shape[0]) == str(batch)
    assert tuple(out.shape[1:]) == (S_Q, H_Q, 512) and str(num_splits.shape[0]) == f"{batch} + 1"


class TwoLayerStep(torch.nn.Module):
    """One decode step of a two-layer model: one plan, two attention calls, the second one writing
    into buffers of the caller's."""

    def forward(self, q, k_cache, k_cache2, block_table, cache_seqlens, out, lse):
        metadata, num_splits = get_mla_metadata(cache_seqlens, q.shape[1] * q.shape[2], 1)
        first, _ = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, metadata, num_splits,
                                          causal=True)
        flash_mla_with_kvcache(q, k_cache2, block_table, cache_seqlens, 512, metadata, num_splits,
                               causal=True, out=out, lse=lse)
        return first, out, lse


def step_inputs(device="cuda"):
    x = cuda_inputs(device=device)
    return (x["q"], x["k_cache"], torch.empty_like(x["k_cache"]), x["block_table"], x["cache_seqlens"],
            torch.empty(B, S_Q, H_Q, 512, dtype=torch.bfloat16, device=device),
            torch.empty(B, H_Q, S_Q, dtype=torch.float32, device=device))


def op_targets(graph) -> list[str]:
    return [str(node.target) for node in graph.nodes if "flashmla_cupy" in str(node.target)]


def test_dynamo_traces_the_public_functions_into_the_ops():
    """torch.export(strict=True) runs dynamo with fullgraph semantics, here on fake CUDA tensors."""
    with FakeTensorMode():
        exported = torch.export.export(TwoLayerStep(), step_inputs(), strict=True)
    assert op_targets(exported.graph) == ["flashmla_cupy.get_mla_metadata.default", "flashmla_cupy.decode.default",
                                          "flashmla_cupy.decode_out.default"]


def test_a_stream_argument_is_refused_while_tracing():
    class WithStream(torch.nn.Module):
        def forward(self, seqlens):
            return get_mla_metadata(seqlens, 16, 1, stream=7)

    with FakeTensorMode(), pytest.raises(Exception, match="stream= cannot be traced"):
        torch.export.export(WithStream(), (torch.empty(4, dtype=torch.int32, device="cuda"),), strict=True)


def test_ops_registered_when_torch_is_imported_after_the_package(tmp_path):
    """`import flashmla_cupy` before `import torch`, then a trace as the first call: the ops get
    registered from inside dynamo's trace."""
    script = f"""
import sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import flashmla_cupy
from flashmla_cupy import launch
assert "torch" not in sys.modules and "flashmla_cupy.torch_ops" not in sys.modules
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
launch.device_info = lambda d: launch.DeviceInfo(d, "NVIDIA H100", (9, 0), 132, 232448)
import test_torch_ops as t
with FakeTensorMode():
    exported = torch.export.export(t.TwoLayerStep(), t.step_inputs(), strict=True)
print(t.op_targets(exported.graph))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "flashmla_cupy.decode.default" in done.stdout


def test_the_package_imports_and_runs_without_torch():
    script = ("import sys; sys.modules['torch'] = None\n"
              "import flashmla_cupy, flashmla_cupy.api as api\n"
              "import numpy as np\n"
              "try:\n"
              "    flashmla_cupy.get_mla_metadata(np.zeros(4, np.int32), 16, 1)\n"
              "except flashmla_cupy.errors.InvalidInputError as e:\n"
              "    print('rejected', e.violations[0].argument)\n"
              "print(api._torch_ops)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["rejected", "cache_seqlens.device", "None"]


# --- opcheck and torch.compile over CPU stand-ins for the kernels -----------------------------------

@pytest.fixture
def cpu_kernels(monkeypatch):
    """The ops on CPU tensors: the fakes treat CPU tensors as if on the GPU, and CPU kernels return
    the plan of plan.py and zeros in place of attention (opcheck compares metadata, not values)."""
    real_view = torch_ops._view

    def as_on_gpu(t):
        view = real_view(t)
        return view.__class__(**{**view.__dict__, "device_type": 2, "device_id": 0})

    monkeypatch.setattr(torch_ops, "_view", as_on_gpu)

    def metadata(cache_seqlens, rows, heads_kv):
        m, n = plan.plan_numpy(cache_seqlens.numpy(), plan.num_sm_parts(SM_COUNT, heads_kv, rows))
        return torch.from_numpy(m), torch.from_numpy(n)

    def decode(q, k_cache, block_table, cache_seqlens, head_dim_v, metadata, num_splits, scale, causal, check):
        b, s_q, h_q, _ = q.shape
        return q.new_zeros(b, s_q, h_q, 512), q.new_zeros(b, h_q, s_q, dtype=torch.float32)

    def decode_out(*args):
        *rest, out, lse = args
        out.zero_()
        lse.zero_()

    library = torch.library.Library("flashmla_cupy", "IMPL")
    for name, fn in (("get_mla_metadata", metadata), ("decode", decode), ("decode_out", decode_out)):
        library.impl(name, fn, "CPU")
    # Eager calls would go the package's own (GPU-only) way; these tests trace everything.
    monkeypatch.setattr(torch_ops, "is_compiling", lambda: True)
    yield
    library._destroy()


def cpu_step_inputs():
    q, k_cache, k_cache2, block_table, seqlens, out, lse = step_inputs(device="cpu")
    q.copy_(torch.randn(q.shape) / 10)
    block_table.copy_(torch.arange(B * PAGES, dtype=torch.int32).view(B, PAGES))
    seqlens.copy_(torch.tensor([1, 200, 0], dtype=torch.int32))
    return q, k_cache, k_cache2, block_table, seqlens, out, lse


def test_opcheck(cpu_kernels):
    q, k_cache, _, block_table, seqlens, out, lse = cpu_step_inputs()
    metadata, num_splits = torch.ops.flashmla_cupy.get_mla_metadata(seqlens, S_Q * H_Q, 1)
    decode_args = (q, k_cache, block_table, seqlens, 512, metadata, num_splits, 0.05, True, None)
    for op, args in ((torch.ops.flashmla_cupy.get_mla_metadata.default, (seqlens, S_Q * H_Q, 1)),
                     (torch.ops.flashmla_cupy.decode.default, decode_args),
                     (torch.ops.flashmla_cupy.decode_out.default, (*decode_args, out, lse))):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (op, results)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_over_a_two_layer_step(cpu_kernels, dynamic):
    torch._dynamo.reset()
    step = torch.compile(TwoLayerStep(), fullgraph=True, backend="aot_eager", dynamic=dynamic)
    args = cpu_step_inputs()
    first, out, lse = step(*args)
    assert out is args[5] and lse is args[6]
    assert first.shape == out.shape and bool((out == 0).all()) and bool((lse == 0).all())
