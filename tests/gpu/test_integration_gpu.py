"""Inside the frameworks, on the GPU against the float64 reference: torch.compile (fullgraph, also with
CUDA-graph trees), opcheck of each op, jax.jit (also recorded into XLA command buffers), CuPy graph
capture, and out=/lse= buffers reused across calls and graph replays.

Every test runs the decode step of a two-layer model: one get_mla_metadata, then one
flash_mla_with_kvcache per layer, the layers sharing block table and lengths but not q or the cache.
Several steps of one shape (as a serving engine replays them) differ in lengths and data. Test data
follow docs/API.md: fresh random values, NaN in every cache slot no request may see, huge page numbers
in unused block-table entries.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flashmla_cupy import flash_mla_with_kvcache, get_mla_metadata, reference
from flashmla_cupy.reference import HEAD_DIM_V
from gpu_cases import check, fresh_seed, lengths, to_device, to_numpy

pytestmark = pytest.mark.gpu

B, S_Q, H_Q, H_KV = 8, 2, 64, 1
ROWS = S_Q * H_Q // H_KV          # num_q_tokens_per_head_k
HERE = pathlib.Path(__file__).resolve().parent


def _values(rng, shape, dtype) -> np.ndarray:
    return np.clip(rng.standard_normal(shape, dtype=np.float32) / 10, -1, 1).astype(dtype)


def two_layer_steps(seed: int, count: int = 2) -> list[tuple[reference.Case, reference.Case]]:
    """`count` decode steps of one shape; each is the Case of layer 1 and of layer 2. Within a step the
    layers share block_table, cache_seqlens and which cache slots are NaN."""
    rng = np.random.default_rng(seed)
    firsts = [reference.random_case(rng, B, S_Q, H_Q, H_KV, lengths(rng, "var:1:3000", B), "bf16", causal=True)
              for _ in range(count)]
    num_blocks = max(c.k_cache.shape[0] for c in firsts)
    width = max(c.block_table.shape[1] for c in firsts)
    steps = []
    for c in firsts:
        k_cache = np.full((num_blocks,) + c.k_cache.shape[1:], np.nan, dtype=c.dtype)
        k_cache[: c.k_cache.shape[0]] = c.k_cache
        block_table = np.full((B, width), 2**31 - 1, dtype=np.int32)
        block_table[:, : c.block_table.shape[1]] = c.block_table
        first = dataclasses.replace(c, k_cache=k_cache, block_table=block_table)
        k_cache2 = _values(rng, k_cache.shape, c.dtype)
        k_cache2[np.isnan(k_cache)] = np.nan
        second = dataclasses.replace(first, q=_values(rng, c.q.shape, c.dtype), k_cache=k_cache2)
        steps.append((first, second))
    return steps


def step_arrays(step) -> tuple[np.ndarray, ...]:
    """The step's inputs in decode_step's order: q1, q2, k_cache1, k_cache2, block_table, cache_seqlens."""
    first, second = step
    return first.q, second.q, first.k_cache, second.k_cache, first.block_table, first.cache_seqlens


def decode_step(q1, q2, k_cache1, k_cache2, block_table, cache_seqlens):
    """One decode step of a two-layer model, written once for torch, JAX and CuPy."""
    metadata, num_splits = get_mla_metadata(cache_seqlens, ROWS, H_KV)
    out1, lse1 = flash_mla_with_kvcache(q1, k_cache1, block_table, cache_seqlens, HEAD_DIM_V, metadata, num_splits,
                                        causal=True)
    out2, lse2 = flash_mla_with_kvcache(q2, k_cache2, block_table, cache_seqlens, HEAD_DIM_V, metadata, num_splits,
                                        causal=True)
    return out1, lse1, out2, lse2


def decode_step_into(q1, q2, k_cache1, k_cache2, block_table, cache_seqlens, out1, lse1, out2, lse2):
    """decode_step writing into the caller's buffers; returns the plan (which the caller must keep
    alive as long as a graph captured from this replays into it)."""
    metadata, num_splits = get_mla_metadata(cache_seqlens, ROWS, H_KV)
    flash_mla_with_kvcache(q1, k_cache1, block_table, cache_seqlens, HEAD_DIM_V, metadata, num_splits,
                           causal=True, out=out1, lse=lse1)
    flash_mla_with_kvcache(q2, k_cache2, block_table, cache_seqlens, HEAD_DIM_V, metadata, num_splits,
                           causal=True, out=out2, lse=lse2)
    return metadata, num_splits


def check_step(step, results, framework: str, seed: int, label: str) -> None:
    out1, lse1, out2, lse2 = results
    for layer, (case, out, lse) in enumerate(((step[0], out1, lse1), (step[1], out2, lse2)), 1):
        check(case, to_numpy(framework, out, case.dtype), to_numpy(framework, lse), seed, f"{label}, layer {layer}")


def torch_buffers(torch) -> list:
    """out1, lse1, out2, lse2 for decode_step_into."""
    return [buffer for _ in range(2) for buffer in (
        torch.empty(B, S_Q, H_Q, HEAD_DIM_V, dtype=torch.bfloat16, device="cuda"),
        torch.empty(B, H_Q, S_Q, dtype=torch.float32, device="cuda"))]


# --- torch ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph_two_layer_step(mode):
    torch = pytest.importorskip("torch")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    seed = fresh_seed()
    steps = two_layer_steps(seed)
    compiled = torch.compile(decode_step, fullgraph=True, mode=mode)
    # CUDA-graph trees warm up on the first call, record on the second and replay from the third.
    for call, step in enumerate([steps[0]] * 3 + [steps[1], steps[0], steps[1]]):
        results = compiled(*(to_device("torch", a) for a in step_arrays(step)))
        torch.cuda.synchronize()
        # Read and dropped before the next call: a replay overwrites the outputs of the one before.
        check_step(step, results, "torch", seed, f"torch.compile mode={mode}, call {call}")
        del results
    if mode == "reduce-overhead":
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_torch_compile_writes_out_buffers():
    torch = pytest.importorskip("torch")
    torch._dynamo.reset()
    seed = fresh_seed()
    steps = two_layer_steps(seed)
    buffers = torch_buffers(torch)
    compiled = torch.compile(decode_step_into, fullgraph=True)
    for call, step in enumerate([steps[0], steps[1], steps[0]]):
        compiled(*(to_device("torch", a) for a in step_arrays(step)), *buffers)
        torch.cuda.synchronize()
        check_step(step, buffers, "torch", seed, f"torch.compile into buffers, call {call}")


def test_opcheck_each_op():
    torch = pytest.importorskip("torch")
    seed = fresh_seed()
    first, _ = two_layer_steps(seed, count=1)[0]
    q, k_cache, block_table, seqlens = (to_device("torch", a) for a in
                                        (first.q, first.k_cache, first.block_table, first.cache_seqlens))
    ops = torch.ops.flashmla_cupy
    metadata, num_splits = ops.get_mla_metadata(seqlens, ROWS, H_KV)
    decode_args = (q, k_cache, block_table, seqlens, HEAD_DIM_V, metadata, num_splits, None, True, None)
    out, lse = torch_buffers(torch)[:2]
    for op, args in ((ops.get_mla_metadata.default, (seqlens, ROWS, H_KV)),
                     (ops.decode.default, decode_args),
                     (ops.decode_out.default, (*decode_args, out, lse))):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, (str(op), results)
    ops.decode_out(*decode_args, out, lse)
    torch.cuda.synchronize()
    check(first, to_numpy("torch", out, first.dtype), to_numpy("torch", lse), seed, "decode_out op")


def test_torch_out_buffers_reused_across_calls_and_graph_replays():
    torch = pytest.importorskip("torch")
    seed = fresh_seed()
    steps = two_layer_steps(seed)
    buffers = torch_buffers(torch)
    for call, step in enumerate(steps):   # eager, the same buffers each time
        decode_step_into(*(to_device("torch", a) for a in step_arrays(step)), *buffers)
        torch.cuda.synchronize()
        check_step(step, buffers, "torch", seed, f"eager into buffers, call {call}")

    static = [to_device("torch", a) for a in step_arrays(steps[0])]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_step_into(*static, *buffers)   # warm-up on the capture stream, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        plan = decode_step_into(*static, *buffers)
    for replay, step in enumerate([steps[1], steps[0], steps[1]]):
        for dst, src in zip(static, step_arrays(step)):
            dst.copy_(to_device("torch", src))
        graph.replay()
        torch.cuda.synchronize()
        check_step(step, buffers, "torch", seed, f"torch graph replay {replay} into buffers")
    del plan


# --- JAX -----------------------------------------------------------------------------------------------

JIT_TARGET = "xla_buffer_python_gpu_callback_cmd_buffer"


def run_jax_jit(seed: int) -> str:
    """decode_step under jax.jit over several steps of one shape, each checked; returns the lowered
    module's text."""
    import jax

    steps = two_layer_steps(seed)
    jitted = jax.jit(decode_step)
    lowered = jitted.lower(*(to_device("jax", a) for a in step_arrays(steps[0]))).as_text()
    for call, step in enumerate([steps[0], steps[1], steps[0], steps[1]]):
        results = jax.block_until_ready(jitted(*(to_device("jax", a) for a in step_arrays(step))))
        check_step(step, results, "jax", seed, f"jax.jit call {call}")
    return lowered


def test_jax_jit_two_layer_step_shares_one_plan():
    pytest.importorskip("jax")
    lowered = run_jax_jit(fresh_seed())
    assert lowered.count(JIT_TARGET) == 3, "one get_mla_metadata and two decodes, each one XLA custom call"


def test_jax_jit_step_recorded_into_xla_command_buffers(tmp_path):
    """The same jitted step with XLA's command buffers on for custom calls (a fresh process: XLA reads
    its flags once): the step must be recorded into a command buffer and stay right on replays."""
    pytest.importorskip("jax")
    dump = tmp_path / "xla_dump"
    flags = (f"--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1 "
             f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    repo = HERE.parents[1]
    script = ("import sys\n"
              f"sys.path[:0] = [{str(HERE)!r}, {str(repo / 'devtools')!r}, {str(repo)!r}]\n"
              "import test_integration_gpu as t\n"
              f"t.run_jax_jit({fresh_seed()})\n"
              "print('checked')\n")
    # This process's JAX already holds most of the GPU memory (JAX preallocates): the child must not.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XLA_FLAGS": flags, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    assert done.returncode == 0 and "checked" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    # XLA forms command buffers either in HLO (older releases: a command_buffer computation) or, in
    # current ones, among the thunks after its thunk passes (a command-buffer thunk).
    optimized = " ".join(p.read_text(errors="replace") for p in dump.glob("*after_optimizations.txt"))
    assert JIT_TARGET in optimized, "our calls are not in the optimized module"
    thunks = " ".join(p.read_text(errors="replace") for p in dump.glob("*thunk_sequence*.txt"))
    spelled = (optimized + thunks).lower().replace("_", "")
    assert "commandbuffer" in spelled, (
        f"XLA formed no command buffer; thunks after its passes: {thunks[-3000:]}")


def test_jax_jit_rejects_a_bad_call_while_tracing():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from flashmla_cupy.errors import InvalidInputError

    first, _ = two_layer_steps(fresh_seed(), count=1)[0]
    q, k_cache, block_table, seqlens = (to_device("jax", a) for a in
                                        (first.q, first.k_cache, first.block_table, first.cache_seqlens))

    def bad(q, k_cache, block_table, seqlens):
        metadata, num_splits = get_mla_metadata(seqlens, ROWS, H_KV)
        return flash_mla_with_kvcache(q.astype(jnp.float32), k_cache, block_table[:-1], seqlens, HEAD_DIM_V, metadata,
                                      num_splits)

    with pytest.raises(InvalidInputError) as info:
        jax.jit(bad)(q, k_cache, block_table, seqlens)
    assert [v.argument for v in info.value.violations] == ["q.dtype", "block_table.shape[0]"]


# --- CuPy ----------------------------------------------------------------------------------------------

def test_cupy_graph_capture_with_out_buffers():
    cupy = pytest.importorskip("cupy")
    seed = fresh_seed()
    steps = two_layer_steps(seed)
    static = [to_device("cupy", a) for a in step_arrays(steps[0])]
    bf16 = static[0].dtype
    buffers = [cupy.empty((B, S_Q, H_Q, HEAD_DIM_V), dtype=bf16), cupy.empty((B, H_Q, S_Q), dtype=cupy.float32),
               cupy.empty((B, S_Q, H_Q, HEAD_DIM_V), dtype=bf16), cupy.empty((B, H_Q, S_Q), dtype=cupy.float32)]
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        decode_step_into(*static, *buffers)   # warm-up: compiles, loads and prepares outside the capture
        stream.synchronize()
        check_step(steps[0], buffers, "cupy", seed, "cupy eager into buffers")
        stream.begin_capture()
        plan = decode_step_into(*static, *buffers)   # kept: the graph writes the plan on every replay
        graph = stream.end_capture()
        for replay, step in enumerate([steps[1], steps[0], steps[1]]):
            for dst, src in zip(static, step_arrays(step)):
                new = to_device("cupy", src)
                dst.data.copy_from_device_async(new.data, new.nbytes, stream)
            graph.launch(stream)
            stream.synchronize()
            check_step(step, buffers, "cupy", seed, f"cupy graph replay {replay}")
    del plan
