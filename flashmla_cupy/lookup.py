"""The host lookup: from a call's arguments to the call prepared for them (prepared.py).

The key. A call's key is `(source, layout, scalar types, scalars)`:
- `source` says how the arrays were read: "torch" or "cupy" for arrays that are all plain torch CUDA
  tensors or all plain CuPy arrays, read from their attributes (the fast path), else
  ("views", framework) for arrays read through tensor views (the framework the outputs are made in).
  Keys of different sources never meet.
- `layout` holds one record per array, `(shape, strides, dtype, device, address % ADDRESS_ALIGN)`,
  each field in its source's own terms: torch (element strides, torch dtype, device index), CuPy
  (byte strides, numpy dtype, device id), views (element strides, numpy dtype, (device type, id)).
- scalars go in with their types, since the rules tell apart values that compare equal (512 and
  512.0, True and 1). An unhashable scalar makes the key unhashable: such a call is never found nor
  remembered (the rules reject it).
A record holds exactly what the input rules (inputs.py) read of an array, so a call that differs in
anything a rule reads is checked afresh; tests/test_lookup.py changes each such input and sees the
key change, and watches the rules read nothing else.

The memo. Prepared calls are kept per thread, since running one rewrites its launch buffers in place,
at most LIMIT of them, the least recently used forgotten first.
"""
from __future__ import annotations

import itertools
import sys
import threading
from typing import Any, Callable

from . import tensors
from .inputs import ADDRESS_ALIGN

LIMIT = 256  # prepared calls kept per thread; a model has a handful of layouts
_thread = threading.local()
_clock = itertools.count()   # use stamps; next() on it is atomic under the GIL


def call(names: tuple[str, ...], arrays: tuple, scalars: tuple, stream: Any,
         prepare: Callable[[tuple, str, tuple, tuple], Any]) -> tuple:
    """Run a public function's call. Plain torch or CuPy arrays on their framework's current stream
    (no `stream`, or `stream` equal to it), in a layout prepared before, are replayed from their
    attributes alone. Every other call takes views of the arrays and the call prepared for their
    layout, made the first time the layout is seen by `prepare(views, framework, scalars, failed)`,
    which checks every rule and raises when any is broken or an array could not be viewed (`failed`)."""
    found = native(arrays)
    if found is not None:
        source, layout, pointers = found
        prepared = find(key(source, layout, scalars))
        if prepared is not None:
            current = tensors.current_stream(source, prepared.device_id)
            if stream is None or tensors.stream_handle(stream) == current:
                return prepared(pointers, current, None)

    framework = tensors.framework_of(arrays[0])
    if framework == "jax":
        from . import jax_ops   # imports jax, which made the arrays
        if jax_ops.tracing(arrays):   # under jax.jit: no memory to view, a graph node to make instead
            return jax_ops.run(names, arrays, scalars, stream)
    handle, owner = tensors.caller_stream(arrays, stream)
    taken, failed = tensors.take_all(dict(zip(names, arrays)), handle, owner)
    views = tuple(taken.values())
    views_key = None if failed else key(("views", framework), views_layout(views), scalars)
    prepared = None if failed else find(views_key)
    if prepared is None:
        prepared = prepare(views, framework, scalars, tuple(failed))
        remember(views_key, prepared)
    # The native source and `framework` both come from type(arrays[0]): when the launch stream is
    # that framework's current one, the next such call may skip the views.
    if found is not None and owner == framework:
        remember(key(found[0], found[1], scalars), prepared)
    # On the framework's own current stream its allocator needs no stream switch.
    results = prepared([v.ptr for v in views], handle, None if owner == framework else handle)
    # None stands for an output the caller provided (out=, lse=).
    return tuple(r if r is None else tensors.to_framework(framework, r, handle) for r in results)


def key(source, layout: tuple, scalars: tuple) -> tuple:
    """The key of a call (see the module docstring)."""
    return source, layout, tuple(map(type, scalars)), scalars


def native(arrays: tuple) -> tuple[str, tuple, list[int]] | None:
    """(source, layout, data pointers) of arrays that are all plain torch CUDA tensors or all plain CuPy
    arrays, read from their attributes; None for anything else, subclasses included (they may
    override what is read)."""
    kind = type(arrays[0])
    torch = sys.modules.get("torch")
    if torch is not None and kind is torch.Tensor:
        layout, pointers = [], []
        for t in arrays:
            if type(t) is not kind or not t.is_cuda:
                return None
            ptr = t.data_ptr()
            layout.append((t.shape, t.stride(), t.dtype, t.get_device(), ptr % ADDRESS_ALIGN))
            pointers.append(ptr)
        return "torch", tuple(layout), pointers
    cupy = sys.modules.get("cupy")
    if cupy is not None and kind is cupy.ndarray:
        layout, pointers = [], []
        for a in arrays:
            if type(a) is not kind:
                return None
            ptr = a.data.ptr
            layout.append((a.shape, a.strides, a.dtype, a.device.id, ptr % ADDRESS_ALIGN))
            pointers.append(ptr)
        return "cupy", tuple(layout), pointers
    return None


def views_layout(views: tuple[tensors.View, ...]) -> tuple:
    """The layout of arrays read through their views."""
    return tuple((v.shape, v.strides, v.dtype, (v.device_type, v.device_id), v.ptr % ADDRESS_ALIGN)
                 for v in views)


def remembered() -> dict:
    """This thread's prepared calls, by key."""
    try:
        return _thread.calls
    except AttributeError:
        _thread.calls = {}
        return _thread.calls


def find(key: tuple):
    """The call prepared under `key`, or None (also for an unhashable key). A found call is stamped
    as the most recently used: a stamp on the call costs a fraction of re-hashing a key (as an
    ordered dict's move_to_end would) on every call."""
    try:
        found = remembered().get(key)
    except TypeError:
        return None
    if found is not None:
        found.last_used = next(_clock)
    return found


def remember(key: tuple, prepared) -> None:
    """Remember `prepared` under `key`; past LIMIT keys, the least recently used one is forgotten (a
    scan, only when a new layout arrives at a full memo)."""
    calls = remembered()
    try:
        calls[key] = prepared
    except TypeError:   # an unhashable scalar that the rules accept (an odd int-like): not remembered
        return
    prepared.last_used = next(_clock)
    if len(calls) > LIMIT:
        del calls[min(calls, key=lambda k: calls[k].last_used)]
