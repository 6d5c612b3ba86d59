"""jax.jit on the CPU (jax_ops.py): a traced call is checked while tracing, becomes one XLA buffer
callback per call (the plan shared by the layers), lowered for CUDA as command-buffer compatible; its
callbacks launch on XLA's stream over XLA's buffers, on a fake H100 (devtools/fake_cuda.py).
tests/gpu/test_integration_gpu.py runs it for real, also recorded into XLA command buffers."""
from __future__ import annotations

import ctypes
import types

import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import fake_cuda  # noqa: E402
from flashmla_cupy import flash_mla_with_kvcache, get_mla_metadata, jax_ops, params, plan  # noqa: E402
from flashmla_cupy.errors import InvalidInputError, MissingDependencyError  # noqa: E402

B, S_Q, H_Q, PAGES = 3, 2, 32, 4
ROWS = S_Q * H_Q
TARGET = "xla_buffer_python_gpu_callback_cmd_buffer"


@pytest.fixture
def gpu(monkeypatch):
    """A fake H100 as JAX's default device; every buffer callback made is recorded."""
    state = fake_cuda.fake_gpu(monkeypatch)
    monkeypatch.setattr(jax_ops, "default_device", lambda: (True, 0))
    jax.clear_caches()   # every test traces afresh (jax caches traces of the same function and shapes)
    state.callbacks = []
    real = jax_ops.buffer_callback

    def recording(callback, shapes, **options):
        state.callbacks.append(types.SimpleNamespace(callback=callback, shapes=shapes, options=options))
        return real(callback, shapes, **options)

    monkeypatch.setattr(jax_ops, "buffer_callback", recording)
    return state


def arguments(dtype=jnp.bfloat16, batch=B):
    return (jax.ShapeDtypeStruct((batch, S_Q, H_Q, 576), dtype), jax.ShapeDtypeStruct((B * PAGES, 64, 1, 576), dtype),
            jax.ShapeDtypeStruct((batch, PAGES), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))


def two_layer_step(q, k_cache, block_table, cache_seqlens):
    metadata, num_splits = get_mla_metadata(cache_seqlens, ROWS, 1)
    out1, _ = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, metadata, num_splits, causal=True)
    out2, lse2 = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, metadata, num_splits,
                                        causal=True)
    return out1, out2, lse2, metadata, num_splits


def test_shapes_of_a_traced_step(gpu):
    out1, out2, lse2, metadata, num_splits = jax.eval_shape(two_layer_step, *arguments())
    assert out1.shape == out2.shape == (B, S_Q, H_Q, 512) and out2.dtype == jnp.bfloat16
    assert lse2.shape == (B, H_Q, S_Q) and lse2.dtype == jnp.float32
    assert metadata.shape == (plan.num_sm_parts(132, 1, ROWS), 8) and num_splits.shape == (B + 1,)
    assert gpu.driver.launches == []   # tracing launches nothing


def test_lowered_for_cuda_as_command_buffer_compatible_callbacks(gpu):
    lowered = jax.jit(two_layer_step).trace(*arguments()).lower(lowering_platforms=("cuda",)).as_text()
    assert lowered.count(TARGET) == 3   # one plan for both layers, one call per layer
    assert [c.options for c in gpu.callbacks] == [{"command_buffer_compatible": True}] * 3
    workspace = gpu.callbacks[1].shapes[2]   # the decode's third output, which the caller never sees
    assert workspace.shape == (plan.partial_slots(B, plan.num_sm_parts(132, 1, ROWS)) * ROWS * 513,)


def test_a_bad_call_fails_while_tracing(gpu):
    def bad(q, k_cache, block_table, cache_seqlens):
        metadata, num_splits = get_mla_metadata(cache_seqlens, ROWS, 1)
        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, metadata, num_splits, causal=1)

    with pytest.raises(InvalidInputError) as info:
        jax.eval_shape(bad, *arguments(dtype=jnp.float32, batch=B + 1)[:3], arguments()[3])
    assert [v.argument for v in info.value.violations] == [
        "q.dtype", "k_cache.dtype", "cache_seqlens.shape[0]", "num_splits.shape[0]", "causal"]


def test_no_gpu_for_jax_is_an_input_error(gpu, monkeypatch):
    monkeypatch.setattr(jax_ops, "default_device", lambda: (False, 0))
    with pytest.raises(InvalidInputError, match="cache_seqlens.device: got cpu:0, expected a CUDA device array"):
        jax.eval_shape(two_layer_step, *arguments())


def test_out_buffers_and_streams_do_not_exist_under_jit(gpu):
    def with_out(q, k_cache, block_table, cache_seqlens, out):
        metadata, num_splits = get_mla_metadata(cache_seqlens, ROWS, 1)
        return flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, metadata, num_splits, out=out)

    with pytest.raises(InvalidInputError) as info:
        jax.eval_shape(with_out, *arguments(), jax.ShapeDtypeStruct((B, S_Q, H_Q, 512), jnp.bfloat16))
    assert [(v.argument, v.expected) for v in info.value.violations] == [("out", "a writable CUDA array (torch, CuPy)")]
    with pytest.raises(InvalidInputError, match="under jax.jit the kernels run on XLA's stream"):
        jax.eval_shape(lambda s: get_mla_metadata(s, ROWS, 1, stream=5), arguments()[3])


def test_a_jax_without_buffer_callback_is_named(gpu, monkeypatch):
    monkeypatch.setattr(jax_ops, "buffer_callback", None)
    with pytest.raises(MissingDependencyError) as info:
        jax.eval_shape(two_layer_step, *arguments())
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("flashmla_cupy under jax.jit needs jax.experimental.buffer_callback "
                                      f"(jax >= 0.6.1) and this is jax {jax.__version__}")


def test_eager_jax_arrays_keep_the_dlpack_road(gpu, monkeypatch):
    monkeypatch.setattr(jax_ops, "run", lambda *args: pytest.fail("an eager call was taken for a traced one"))
    with pytest.raises(InvalidInputError, match=r"cache_seqlens\.device: got cpu:0"):
        get_mla_metadata(jnp.zeros(4, jnp.int32), ROWS, 1)   # a concrete array, on JAX's CPU


class Buffer:
    """What XLA hands a buffer callback: an address and a device."""

    def __init__(self, address: int, device_id: int = 0):
        self.__cuda_array_interface__ = {"data": (address, False)}
        self._device_id = device_id

    def __dlpack_device__(self):
        return 2, self._device_id


def test_callbacks_launch_on_xlas_stream_over_xlas_buffers(gpu):
    jax.eval_shape(two_layer_step, *arguments())
    plan_callback, decode_callback = gpu.callbacks[0].callback, gpu.callbacks[1].callback
    ctx = types.SimpleNamespace(stream=0x5EED)
    seqlens, metadata, num_splits = Buffer(0x1000), Buffer(0x2000), Buffer(0x3000)
    plan_callback(ctx, (metadata, num_splits), seqlens)
    scheduler = gpu.driver.launches[-1]
    p = params.SchedulerParams.from_buffer_copy(scheduler["args"][0])
    assert (p.seqlens, p.metadata, p.num_splits, scheduler["stream"]) == (0x1000, 0x2000, 0x3000, 0x5EED)

    for k_cache in (0x40000, 0x50000, 0x40000):   # each address gets its descriptor, encoded once
        q, block_table, out, lse, workspace = Buffer(0x10000), Buffer(0x20000), Buffer(0x60000), Buffer(0x70000), \
            Buffer(0x80000)
        decode_callback(ctx, (out, lse, workspace), q, Buffer(k_cache), block_table, seqlens, metadata, num_splits)
        decode, combine = gpu.driver.launches[-2:]
        d = params.DecodeParams.from_buffer_copy(decode["args"][0])
        assert (d.q, d.block_table, d.seqlens, d.metadata, d.num_splits) == (0x10000, 0x20000, 0x1000, 0x2000, 0x3000)
        assert (d.out, d.lse, d.out_partial) == (0x60000, 0x70000, 0x80000)
        assert ctypes.c_uint64.from_buffer_copy(decode["args"][1]).value == k_cache
        assert ctypes.c_uint64.from_buffer_copy(decode["args"][2]).value == 0x10000   # q's descriptor
        assert decode["stream"] == combine["stream"] == 0x5EED and combine["pdl"]
        # XLA's thread had no current context: the stream's is made current for the launches, then undone.
        assert decode["context"] == combine["context"] == fake_cuda.STREAM_CONTEXT
        assert gpu.driver.contexts == []
    assert gpu.driver.tensor_maps == [0x40000, 0x10000, 0x50000]   # q's at its one address
    assert gpu.allocations == []   # XLA owns every buffer


def test_a_callback_on_another_device_prepares_its_own_call(gpu):
    jax.eval_shape(two_layer_step, *arguments())
    plan_callback = gpu.callbacks[0].callback
    plan_callback(types.SimpleNamespace(stream=9), (Buffer(0x2000, 1), Buffer(0x3000, 1)), Buffer(0x1000, 1))
    from flashmla_cupy import launch, variants
    assert (variants.scheduler_variant(), 1) in launch._loaded   # loaded on device 1 at its first run
    assert gpu.driver.launches[-1]["stream"] == 9
