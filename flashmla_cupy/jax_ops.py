"""get_mla_metadata and flash_mla_with_kvcache inside jax.jit, through jax.experimental.buffer_callback.

Under jax.jit the arguments are tracers: shapes and dtypes, no memory yet. api.py hands such a call
here. It is checked from the tracers at once (the package's own InvalidInputError, raised while
tracing) and prepared: kernels compiled and loaded now, because nothing may be loaded while XLA
records a command buffer. It becomes one XLA custom call whose Python callback launches the kernels
on XLA's stream (`ctx.stream`) over buffers that XLA owns: the inputs, the outputs and, for the
decode, the split-KV workspace, declared as a third output that the caller never sees. The callback
allocates nothing, reads nothing back to the host and encodes k_cache's TMA descriptor for the
address it is given, so XLA may record it into a command buffer (a CUDA graph) and replay it while
the addresses stay the same (`command_buffer_compatible=True`).

XLA gives every operand its own dense row-major buffer aligned to at least 64 bytes, so the rules
about strides and addresses hold by construction; the callback reads only the addresses.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import jax
import numpy as np

from . import inputs, install, launch, plan, prepared, tensors
from .errors import InvalidInputError, MissingDependencyError, Violation
from .params import METADATA_FIELDS

try:
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:   # jax < 0.6.1
    buffer_callback = None


def tracing(arrays: tuple) -> bool:
    """True when jax.jit (or another JAX transformation) is tracing some of the arrays."""
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def run(names: tuple[str, ...], arrays: tuple, scalars: tuple, stream: Any) -> tuple:
    """A traced call of api.py (lookup.call's arguments) as an XLA custom call; returns JAX tracers."""
    function = "get_mla_metadata" if names == ("cache_seqlens",) else "flash_mla_with_kvcache"
    if buffer_callback is None:
        raise MissingDependencyError(
            f"flashmla_cupy under jax.jit needs jax.experimental.buffer_callback (jax >= 0.6.1) and this is jax "
            f"{jax.__version__}: pip install -U 'jax>=0.6.1', or call it outside jax.jit")
    violations = [Violation(name, f"a {type(a).__qualname__}", "a JAX array (under jax.jit every array is)",
                            "pass JAX arrays only") for name, a in zip(names, arrays)
                  if tensors.framework_of(a) != "jax"]
    if stream is not None:
        violations.append(Violation("stream", repr(stream), "None: under jax.jit the kernels run on XLA's stream",
                                    "drop stream="))
    if function == "flash_mla_with_kvcache" and isinstance(scalars[3], (bool, np.bool_)) and scalars[3]:
        # FLASHMLA_CUPY_CHECK does not apply here: only an explicit check=True is refused.
        violations.append(Violation("check", repr(scalars[3]), "None or False under jax.jit",
                                    "checked mode waits for the device, which a jitted step cannot: run the step "
                                    "once eagerly with check=True"))
    if violations:
        raise InvalidInputError(function, violations)
    on_cuda, device_id = default_device()
    views = tuple(tensors.traced_view(a.shape, tensors.contiguous_strides(tuple(a.shape)), np.dtype(a.dtype), on_cuda,
                                      device_id, "jax") for a in arrays)
    if function == "get_mla_metadata":
        return _metadata(views, arrays, scalars)
    return _decode(views, arrays, scalars)


def default_device() -> tuple[bool, int]:
    """(whether it is a CUDA GPU, its CUDA ordinal) of the device jax.jit runs on by default."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False, 0
    return True, device.local_hardware_id


def _address(buffer) -> int:
    return buffer.__cuda_array_interface__["data"][0]


class _PerDevice:
    """The prepared call of each device that runs a callback: the traced device's, made while
    tracing, and another device's on its first run (which must not be recorded into a command buffer,
    as it loads kernels: run such a step once without command buffers first). XLA may run a callback
    from several threads at once, and a prepared call rewrites its launch arguments in place: one lock
    per callback."""

    def __init__(self, make: Callable[[int], Any], device_id: int):
        self._make = make
        self._calls = {device_id: make(device_id)}
        self._lock = threading.Lock()

    def get(self, device_id: int):
        call = self._calls.get(device_id)
        if call is None:
            call = self._calls[device_id] = self._make(device_id)
        return call

    def launch(self, device_id: int, stream: int, *addresses) -> None:
        with self._lock, launch.stream_context(stream):
            self.get(device_id).launch(*addresses, stream)


def _metadata(views: tuple, arrays: tuple, scalars: tuple) -> tuple:
    problem = inputs.check_metadata_args(views[0], *scalars)
    sm_count = install.require_hopper(problem.device_id).sm_count
    num_parts = plan.num_sm_parts(sm_count, problem.heads_kv, problem.rows)

    def make(device_id: int) -> prepared.PlanCall:
        # The traced device's SM count on any device: the plan's size is fixed by the trace (and any
        # part count makes a valid plan).
        return prepared.PlanCall(dataclasses.replace(problem, device_id=device_id), "jax", sm_count)

    calls = _PerDevice(make, problem.device_id)

    def callback(ctx, outputs, seqlens) -> None:
        metadata, num_splits = outputs
        calls.launch(seqlens.__dlpack_device__()[1], ctx.stream, _address(seqlens), _address(metadata),
                     _address(num_splits))

    shapes = (jax.ShapeDtypeStruct((num_parts, METADATA_FIELDS), np.int32),
              jax.ShapeDtypeStruct((problem.batch + 1,), np.int32))
    return tuple(buffer_callback(callback, shapes, command_buffer_compatible=True)(arrays[0]))


def _decode(views: tuple, arrays: tuple, scalars: tuple) -> tuple:
    q, k_cache, block_table, seqlens, metadata, num_splits, *given = views
    head_dim_v, softmax_scale, causal, check, kv_dtype, *given_names = scalars
    optional = dict(zip(given_names[0], given)) if given_names else {}
    problem = inputs.check_decode_args(q, k_cache, block_table, seqlens, head_dim_v, metadata, num_splits,
                                       softmax_scale, causal, check, optional.get("out"), optional.get("lse"),
                                       descale_q=optional.get("descale_q"), descale_k=optional.get("descale_k"),
                                       kv_dtype=kv_dtype)
    install.require_hopper(problem.device_id)
    calls = _PerDevice(lambda device_id: prepared.DecodeCall(dataclasses.replace(problem, device_id=device_id), "jax"),
                       problem.device_id)

    def callback(ctx, results, *buffers) -> None:
        out, lse, workspace = results
        calls.launch(buffers[0].__dlpack_device__()[1], ctx.stream, [_address(b) for b in buffers], _address(out),
                     _address(lse), _address(workspace))

    p = problem
    shapes = (jax.ShapeDtypeStruct((p.batch, p.seqlen_q, p.heads_q, inputs.HEAD_DIM_V), p.out_dtype),
              jax.ShapeDtypeStruct((p.batch, p.heads_q, p.seqlen_q), np.float32),
              jax.ShapeDtypeStruct((calls.get(p.device_id).workspace_floats,), np.float32))
    # The inputs and the descales given (out=/lse= were refused: JAX arrays are immutable).
    out, lse, _ = buffer_callback(callback, shapes, command_buffer_compatible=True)(*arrays[:6 + len(p.descales)])
    return out, lse
