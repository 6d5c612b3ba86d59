"""The host lookup (lookup.py): one key encoding, holding everything the input rules read.

Each source of keys (plain torch tensors, plain CuPy arrays, tensor views) is built from fakes
(devtools/fake_cuda.py, fake_dlpack.py); every input a rule reads is changed in turn and must change
the key, while what no rule reads (an address moved by a multiple of the alignment) must not.
"""
from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest

import fake_cuda
from fake_dlpack import BASE_PTR, KDL_CPU, KDL_CUDA, FakeTorch
from flashmla_cupy import flash_mla_with_kvcache, inputs, lookup, prepared, tensors
from flashmla_cupy.inputs import ADDRESS_ALIGN
from test_hot_path import forbid_the_general_road, torch_args

NAMES = ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits")
SHAPES = {"q": (2, 1, 16, 576), "k_cache": (8, 64, 1, 576), "block_table": (2, 4), "cache_seqlens": (2,),
          "tile_scheduler_metadata": (4, 8), "num_splits": (3,)}
DTYPES = {"q": "bf16", "k_cache": "bf16"}
SCALARS = (512, None, False)
# Scalars the rules tell apart although some compare equal; each must make a key of its own.
OTHER_SCALARS = [(512.0, None, False), (576, None, False), (512, 0.1, False), (512, 1, False),
                 (512, None, True), (512, None, 0), (np.int64(512), None, False)]


@pytest.fixture
def gpu(monkeypatch):
    return fake_cuda.fake_gpu(monkeypatch)


def each_change():
    """(array name, field, change) for every field of every array that some rule reads."""
    for name in NAMES:
        shape = SHAPES[name]
        yield name, "shape", dict(shape=shape[:-1] + (shape[-1] + 1,))
        yield name, "rank", dict(shape=shape + (1,))
        yield name, "strides", dict(strides=tuple(2 * s for s in tensors.contiguous_strides(shape)))
        yield name, "dtype", dict(dtype="fp16" if name in DTYPES else "int64")
        yield name, "device", dict(device=1)
        yield name, "alignment", dict(offset=2)


def array_specs(name=None, shape=None, strides=None, dtype=None, device=0, offset=0):
    """(shape, dtype name, strides, device, offset bytes) of each array, `name`'s with the change."""
    for n in NAMES:
        changed = n == name
        yield (shape if changed and shape else SHAPES[n], dtype if changed and dtype else DTYPES.get(n, "int32"),
               strides if changed else None, device if changed else 0, offset if changed else 0)


def torch_arrays(torch, name=None, **change):
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "int32": torch.int32, "int64": torch.int64}
    return tuple(torch.tensor(shape, names[kind], strides=strides, device_index=device, offset_bytes=offset)
                 for shape, kind, strides, device, offset in array_specs(name, **change))


def cupy_arrays(new, name=None, **change):
    names = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "int32": np.int32, "int64": np.int64}
    arrays = []
    for shape, kind, strides, device, offset in array_specs(name, **change):
        array = new(shape, names[kind], strides=strides, offset_bytes=offset)
        array.device.id = device
        arrays.append(array)
    return tuple(arrays)


def view_arrays(name=None, device_type=KDL_CUDA, **change):
    views = []
    for i, (n, (shape, kind, strides, device, offset)) in enumerate(zip(NAMES, array_specs(name, **change))):
        array = FakeTorch(shape, kind, strides, device_id=device, ptr=BASE_PTR + (i << 30) + offset,
                          device_type=device_type if n == name else KDL_CUDA)
        views.append(tensors.take(array, n))
    return tuple(views)


def native_key(arrays, scalars=SCALARS):
    source, layout, _ = lookup.native(arrays)
    return lookup.key(source, layout, scalars)


def views_key(views, scalars=SCALARS):
    return lookup.key(("views", views[0].framework), lookup.views_layout(views), scalars)


@pytest.mark.parametrize("name, field, change", list(each_change()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_rule_input_is_in_every_key(gpu, monkeypatch, name, field, change):
    t = gpu.torch
    new = fake_cuda.fake_cupy(monkeypatch, t)
    assert native_key(torch_arrays(t, name, **change)) != native_key(torch_arrays(t))
    assert native_key(cupy_arrays(new, name, **change)) != native_key(cupy_arrays(new))
    assert views_key(view_arrays(name, **change)) != views_key(view_arrays())


@pytest.mark.parametrize("name", NAMES)
def test_the_device_type_is_in_the_views_key(name):
    """Only views can be of another device type: the native sources are CUDA arrays by construction."""
    assert views_key(view_arrays(name, device_type=KDL_CPU)) != views_key(view_arrays())


def test_scalars_and_their_types_are_in_every_key(gpu, monkeypatch):
    t = gpu.torch
    new = fake_cuda.fake_cupy(monkeypatch, t)
    for make in (lambda s: native_key(torch_arrays(t), s), lambda s: native_key(cupy_arrays(new), s),
                 lambda s: views_key(view_arrays(), s)):
        keys = [make(s) for s in [SCALARS, *OTHER_SCALARS]]
        assert len(set(keys)) == len(keys)


def test_what_no_rule_reads_is_not_in_the_key(gpu, monkeypatch):
    """Addresses moved by the alignment, and new arrays of the same layout, share the key."""
    t = gpu.torch
    new = fake_cuda.fake_cupy(monkeypatch, t)
    for name in NAMES:
        assert native_key(torch_arrays(t, name, offset=ADDRESS_ALIGN)) == native_key(torch_arrays(t))
        assert native_key(cupy_arrays(new, name, offset=ADDRESS_ALIGN)) == native_key(cupy_arrays(new))
        assert views_key(view_arrays(name, offset=ADDRESS_ALIGN)) == views_key(view_arrays())


class Watched:
    """A View that notes every attribute read of it."""

    def __init__(self, view, seen: set):
        self._view, self._seen = view, seen

    def __getattr__(self, name):
        self._seen.add(name)
        return getattr(self._view, name)


# What a layout record holds of a view: shape (and ndim), strides, dtype, device (type, id, and
# their readable form), and the address (only modulo ADDRESS_ALIGN: test_what_no_rule_reads...).
KEYED = {"shape", "ndim", "strides", "dtype", "device_type", "device_id", "device", "ptr"}


def test_rules_and_prepared_calls_read_nothing_that_is_not_keyed(gpu):
    """Whatever a rule or a prepared call reads of an array is in its record of the key."""
    seen: set = set()
    q, k_cache, block_table, seqlens, metadata, num_splits = (Watched(v, seen) for v in view_arrays())
    problem = inputs.check_decode_args(q, k_cache, block_table, seqlens, 512, metadata, num_splits, None, False)
    prepared.DecodeCall(problem, "torch")
    inputs.check_metadata_args(seqlens, 16, 1)
    assert seen and seen <= KEYED, seen - KEYED


def test_an_explicit_current_stream_takes_the_fast_path(gpu, monkeypatch):
    t = gpu.torch
    # A first call with stream= the current stream reads the arrays from their attributes (the fake
    # torch tensors cannot even export DLPack) and is remembered for the fast path.
    flash_mla_with_kvcache(**torch_args(t), stream=fake_cuda.STREAM)
    forbid_the_general_road(monkeypatch)
    for stream in (fake_cuda.STREAM, t.cuda.current_stream(), None):
        flash_mla_with_kvcache(**torch_args(t), stream=stream)
        assert gpu.driver.launches[-1]["stream"] == fake_cuda.STREAM


def test_another_stream_takes_the_general_path(gpu, monkeypatch):
    t = gpu.torch
    flash_mla_with_kvcache(**torch_args(t))
    taken = []

    def take_all(arrays, stream, stream_owner):
        taken.append((stream, stream_owner))
        raise RuntimeError("general path")

    monkeypatch.setattr(tensors, "take_all", take_all)
    with pytest.raises(RuntimeError, match="general path"):
        flash_mla_with_kvcache(**torch_args(t), stream=0x1234)
    assert taken == [(0x1234, None)]


class Call:
    def __init__(self, name):
        self.name = name


def test_memo_forgets_the_least_recently_used(monkeypatch):
    monkeypatch.setattr(lookup, "_thread", threading.local())
    monkeypatch.setattr(lookup, "LIMIT", 3)
    calls = {key: Call(key) for key in "abcdef"}
    for key in "abc":
        lookup.remember(key, calls[key])
    assert lookup.find("a") is calls["a"]     # now the most recent
    lookup.remember("d", calls["d"])           # forgets b, the least recent
    assert sorted(lookup.remembered()) == ["a", "c", "d"]
    lookup.find("c")
    lookup.remember("e", calls["e"])           # forgets a
    assert sorted(lookup.remembered()) == ["c", "d", "e"]
    assert lookup.find("b") is None and lookup.find(("x", [1])) is None   # unhashable: never found
    lookup.remember(("x", [1]), calls["f"])
    assert sorted(lookup.remembered()) == ["c", "d", "e"]
