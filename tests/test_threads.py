"""Threads making their first calls at the same moment, on a fake H100 (devtools/fake_cuda.py).

The module table (launch.get_function) runs as it is, over a stand-in for CuPy's Module that notes
every load and unload and takes a while to load, so that racing threads really overlap.
"""
from __future__ import annotations

import gc
import threading

import pytest

import fake_cuda
from flashmla_cupy import flash_mla_with_kvcache, launch, lookup, params, variants
from test_hot_path import torch_args

THREADS = 8


@pytest.fixture
def gpu(monkeypatch):
    state = fake_cuda.fake_gpu(monkeypatch)
    import cupy
    cupy.cuda.function.Module.load_seconds = 0.05   # the class install() made for this test
    return state


def at_once(work, count=THREADS) -> list:
    """Run `work(index)` in `count` threads released together; returns their results in order and
    re-raises the first failure (pytest does not see a thread's exception)."""
    start = threading.Barrier(count)
    results, failures = [None] * count, []

    def body(index):
        try:
            start.wait()
            results[index] = work(index)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            failures.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return results


def loads_and_unloads(events) -> tuple[int, int]:
    gc.collect()
    return sum(kind == "load" for kind, _ in events), sum(kind == "unload" for kind, _ in events)


def test_racing_first_loads_share_one_module(gpu):
    variant = variants.scheduler_variant()
    loaded = at_once(lambda _: launch.get_function(variant, 0))
    assert all(x is loaded[0] for x in loaded)
    assert loads_and_unloads(gpu.module_events) == (1, 0)
    assert launch.get_function(variant, 1) is not loaded[0]   # another device loads its own
    assert loads_and_unloads(gpu.module_events) == (2, 0)


def test_threads_making_first_calls_at_once(gpu):
    """Every thread prepares its own call (running one rewrites its launch buffers) and launches with its
    own arrays; the kernels are loaded once for all of them, and no module goes while they are used."""
    t = gpu.torch
    args = [torch_args(t) for _ in range(THREADS)]

    def first_call(index):
        flash_mla_with_kvcache(**args[index])
        return threading.get_ident(), {id(c) for c in lookup.remembered().values()}

    results = at_once(first_call)
    idents = [ident for ident, _ in results]
    assert all(len(mine) == 1 for _, mine in results)   # one call, under its views and native keys
    assert len(set().union(*(mine for _, mine in results))) == THREADS
    for index, ident in enumerate(idents):
        decode = [x for x in gpu.driver.launches if x["thread"] == ident and x["function"] == fake_cuda.DECODE_FN]
        assert len(decode) == 1
        p = params.DecodeParams.from_buffer_copy(decode[0]["args"][0])
        assert (p.q, p.seqlens) == (args[index]["q"].data_ptr(), args[index]["cache_seqlens"].data_ptr())
    assert loads_and_unloads(gpu.module_events) == (2, 0)   # decode_bf16 and combine_bf16, once each
