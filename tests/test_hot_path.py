"""Prepared calls (prepared.py) through the public API, on a fake H100 with fake torch and CuPy arrays
(devtools/fake_cuda.py).

A repeated call skips the checks and the views, so these tests pin down what that must not change:
every call launches with its own arrays' addresses, and a call that differs in anything a rule reads
(layout, dtype, device, address alignment, scalars) is checked afresh and rejected when wrong.
"""
from __future__ import annotations

import ctypes
import gc
import weakref

import pytest

import fake_cuda
from fake_dlpack import BASE_PTR, FakeCupy
from flashmla_cupy import flash_mla_with_kvcache, get_mla_metadata, inputs, lookup, params, plan, tensors
from flashmla_cupy.errors import InvalidInputError


@pytest.fixture
def gpu(monkeypatch):
    return fake_cuda.fake_gpu(monkeypatch)


def torch_args(torch, batch=2, seqlen_q=1, heads_q=16, heads_kv=1, num_blocks=8, max_blocks=4, num_parts=4):
    """A valid flash_mla_with_kvcache call on fresh fake torch tensors."""
    return dict(
        q=torch.tensor((batch, seqlen_q, heads_q, 576), torch.bfloat16),
        k_cache=torch.tensor((num_blocks, 64, heads_kv, 576), torch.bfloat16),
        block_table=torch.tensor((batch, max_blocks), torch.int32),
        cache_seqlens=torch.tensor((batch,), torch.int32),
        head_dim_v=512,
        tile_scheduler_metadata=torch.tensor((num_parts, 8), torch.int32),
        num_splits=torch.tensor((batch + 1,), torch.int32))


def decode_params(launch) -> params.DecodeParams:
    return params.DecodeParams.from_buffer_copy(launch["args"][0])


def tensor_map_base(launch) -> int:
    """Where the decode launch's TMA descriptor points (the fake driver writes it into word 0)."""
    return ctypes.c_uint64.from_buffer_copy(launch["args"][1]).value


def forbid_the_general_road(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a remembered call took the general road")
    monkeypatch.setattr(tensors, "take_all", fail)
    monkeypatch.setattr(inputs, "check_decode_args", fail)
    monkeypatch.setattr(inputs, "check_metadata_args", fail)


def test_a_repeated_call_launches_with_its_own_arrays(gpu, monkeypatch):
    flash_mla_with_kvcache(**torch_args(gpu.torch))
    forbid_the_general_road(monkeypatch)
    args = torch_args(gpu.torch)   # the same layout at new addresses
    out, lse = flash_mla_with_kvcache(**args)
    decode, combine = gpu.driver.launches[2:]
    p, c = decode_params(decode), params.CombineParams.from_buffer_copy(combine["args"][0])
    ptr = {name: a.data_ptr() for name, a in args.items() if name != "head_dim_v"}
    assert (p.q, p.block_table, p.seqlens) == (ptr["q"], ptr["block_table"], ptr["cache_seqlens"])
    assert (p.metadata, p.num_splits, c.num_splits) == (ptr["tile_scheduler_metadata"], ptr["num_splits"],
                                                        ptr["num_splits"])
    assert tensor_map_base(decode) == ptr["k_cache"]
    assert (p.out, p.lse, c.out, c.lse) == (out.data_ptr(), lse.data_ptr(), out.data_ptr(), lse.data_ptr())
    workspace = gpu.allocations[-1]
    assert workspace[1] == ((plan.partial_slots(2, 4) * 16 * 513),)
    assert (c.out_partial, c.lse_partial) == (p.out_partial, p.lse_partial) != (0, 0)
    assert out.shape == (2, 1, 16, 512) and out.dtype is gpu.torch.bfloat16
    assert lse.shape == (2, 16, 1) and lse.dtype is gpu.torch.float32
    assert decode["stream"] == combine["stream"] == fake_cuda.STREAM


def test_each_call_gets_fresh_outputs(gpu):
    args = torch_args(gpu.torch)
    first, second = flash_mla_with_kvcache(**args), flash_mla_with_kvcache(**args)
    assert first[0].data_ptr() != second[0].data_ptr()
    assert decode_params(gpu.driver.launches[0]).out != decode_params(gpu.driver.launches[2]).out


def _misaligned(torch, name, shape, dtype, offset):
    return {name: torch.tensor(shape, dtype, offset_bytes=offset)}


@pytest.mark.parametrize("change, bad", [
    (lambda t: _misaligned(t, "k_cache", (8, 64, 1, 576), t.bfloat16, 2), ["k_cache.data_ptr"]),
    (lambda t: _misaligned(t, "k_cache", (8, 64, 1, 576), t.bfloat16, 8), ["k_cache.data_ptr"]),
    (lambda t: _misaligned(t, "q", (2, 1, 16, 576), t.bfloat16, 4), ["q.data_ptr"]),
    (lambda t: {"q": t.tensor((2, 1, 16, 576), t.bfloat16, strides=(9216, 9216, 576, 2))}, ["q.strides"]),
    (lambda t: {"q": t.tensor((2, 1, 16, 576), t.bfloat16, strides=(9216, 9216, 580, 1))}, ["q.strides"]),
    (lambda t: {"q": t.tensor((2, 1, 16, 576), t.float16)}, ["k_cache.dtype"]),
    (lambda t: {"q": t.tensor((2, 1, 16, 576), t.float32)}, ["q.dtype"]),
    (lambda t: {"cache_seqlens": t.tensor((2,), t.int32, device_index=1)}, ["cache_seqlens.device"]),
    # A CPU tensor (the fake one has no __dlpack__, so it is refused as a non-array).
    (lambda t: {"cache_seqlens": t.tensor((2,), t.int32, is_cuda=False)}, ["cache_seqlens"]),
    (lambda t: {"block_table": t.tensor((3, 4), t.int32)}, ["block_table.shape[0]"]),
    (lambda t: {"num_splits": t.tensor((3,), t.int64)}, ["num_splits.dtype"]),
    (lambda t: {"head_dim_v": 512.0}, ["head_dim_v"]),
    (lambda t: {"causal": 1}, ["causal"]),
    (lambda t: {"softmax_scale": [0.1]}, ["softmax_scale"]),
    (lambda t: {"softmax_scale": float("nan")}, ["softmax_scale"]),
])
def test_a_bad_call_after_good_ones_is_still_rejected(gpu, change, bad):
    for _ in range(2):   # the second call is a remembered one
        flash_mla_with_kvcache(**torch_args(gpu.torch))
    launches, allocations = len(gpu.driver.launches), len(gpu.allocations)
    args = torch_args(gpu.torch)
    args.update(change(gpu.torch))
    with pytest.raises(InvalidInputError) as info:
        flash_mla_with_kvcache(**args)
    assert [v.argument for v in info.value.violations] == bad
    assert (len(gpu.driver.launches), len(gpu.allocations)) == (launches, allocations)


def test_other_strides_or_aligned_offsets_are_calls_of_their_own(gpu):
    t = gpu.torch
    padded_q = t.tensor((2, 1, 16, 576), t.bfloat16, strides=(16 * 640, 16 * 640, 640, 1))
    for q, head_stride in ((None, 576), (padded_q, 640), (None, 576)):
        args = torch_args(t)
        if q is not None:
            args["q"] = q
        flash_mla_with_kvcache(**args)
        assert decode_params(gpu.driver.launches[-2]).q_head_stride == head_stride
    shifted = t.tensor((8, 64, 1, 576), t.bfloat16, offset_bytes=32)   # still 16-byte aligned
    flash_mla_with_kvcache(**torch_args(t) | {"k_cache": shifted})
    assert tensor_map_base(gpu.driver.launches[-2]) == shifted.data_ptr()


def q_map_base(launch) -> int:
    """Where the decode launch's q descriptor points (0: none; the narrow kernel never takes one)."""
    return ctypes.c_uint64.from_buffer_copy(launch["args"][2]).value


def test_the_q_tile_comes_through_tma_where_a_box_holds_its_rows(gpu):
    t = gpu.torch
    # 128 heads (two 64-row tiles), 32 heads at s_q = 2 (a tile of 2 positions x 32 heads): one box each.
    for heads_q, seqlen_q in ((128, 1), (32, 2)):
        qs = [t.tensor((2, seqlen_q, heads_q, 576), t.bfloat16) for _ in range(2)]
        before = len(gpu.driver.tensor_maps)
        for q in [qs[0], qs[1], qs[0]]:
            flash_mla_with_kvcache(**torch_args(t, heads_q=heads_q, seqlen_q=seqlen_q) | {"q": q})
            assert decode_params(gpu.driver.launches[-2]).q_tma == 1
            assert q_map_base(gpu.driver.launches[-2]) == q.data_ptr()
        encoded = gpu.driver.tensor_maps[before:]
        assert [base for base in encoded if base in (qs[0].data_ptr(), qs[1].data_ptr())] == \
            [qs[0].data_ptr(), qs[1].data_ptr()]   # once per address
    # 48 heads per KV head: 64 packed rows are no box of q, the kernel copies them itself.
    flash_mla_with_kvcache(**torch_args(t, heads_q=96, heads_kv=2) | {
        "k_cache": t.tensor((8, 64, 2, 576), t.bfloat16)})
    assert decode_params(gpu.driver.launches[-2]).q_tma == 0
    flash_mla_with_kvcache(**torch_args(t))   # 16 rows: the narrow kernel
    assert (decode_params(gpu.driver.launches[-2]).q_tma, q_map_base(gpu.driver.launches[-2])) == (0, 0)


def test_every_layer_cache_is_encoded_once(gpu):
    t = gpu.torch
    caches = [t.tensor((8, 64, 1, 576), t.bfloat16) for _ in range(3)]
    for layer in [0, 1, 2, 0, 1, 2, 1]:
        flash_mla_with_kvcache(**torch_args(t) | {"k_cache": caches[layer]})
        assert tensor_map_base(gpu.driver.launches[-2]) == caches[layer].data_ptr()
    assert gpu.driver.tensor_maps == [c.data_ptr() for c in caches]


def test_cache_maps_bring_128_bytes_into_l2_a_miss(gpu):
    """The cache's descriptors ask L2 for 128 bytes a miss (docs/PERF_NOTES.md, ab114: 4-6 % faster than
    256 on the memory-bound 16-bit cells); q's keep 256."""
    t = gpu.torch
    cache = t.tensor((8, 64, 1, 576), t.bfloat16)
    q = t.tensor((2, 1, 128, 576), t.bfloat16)
    flash_mla_with_kvcache(**torch_args(t, heads_q=128) | {"k_cache": cache, "q": q})
    assert gpu.driver.map_settings[cache.data_ptr()] == dict(swizzle=3, l2_promotion=2, oob_fill=1)
    assert gpu.driver.map_settings[q.data_ptr()]["l2_promotion"] == 3


def test_whole_row_cache_map_follows_the_narrow_build(gpu, monkeypatch):
    """The 16-row FP8 narrow kernel lands a page as one TMA box of 64 whole rows: its cache map reads a row
    as 144 4-byte words, unswizzled, one KV head at a time. Built with -DFLASHMLA_NARROW_LINEAR=0 (a
    measurement build) it lands 64-byte boxes, as the 32-row one does whatever its defines."""
    import numpy as np

    from flashmla_cupy import launch, variants

    narrow16, narrow32 = variants.narrow_variant("e4m3", 16, "e4m3"), variants.narrow_variant("e4m3", 32, "e4m3")
    assert (narrow16.narrow_linear, narrow16.kv_box) == (True, (64, 0, True))
    assert (narrow32.narrow_linear, narrow32.kv_box) == (False, (64, 64, False))
    shape, strides = (8, 64, 2, 576), (64 * 2 * 576, 2 * 576, 576, 1)   # h_kv = 2: rows 1152 bytes apart
    launch.kv_tensor_map(BASE_PTR, shape, strides, np.dtype("uint8"), *narrow16.kv_box)
    assert gpu.driver.map_shapes[BASE_PTR] == dict(dtype=2, dims=[144, 2, 64, 8], strides=[576, 1152, 73728],
                                                   box=[144, 1, 64, 1])
    assert gpu.driver.map_settings[BASE_PTR]["swizzle"] == 0
    monkeypatch.setattr(variants, "_DEFINES", variants.defines_plus("-DFLASHMLA_NARROW_LINEAR=0"))
    assert (narrow16.narrow_linear, narrow16.kv_box) == (False, (64, 64, False))
    assert (narrow32.narrow_linear, narrow32.kv_box) == (False, (64, 64, False))


def test_scalars_are_part_of_the_call(gpu):
    t = gpu.torch
    for scale, causal, seqlen_q in ((None, False, 2), (0.25, False, 2), (0.25, True, 2), (None, True, 1)):
        flash_mla_with_kvcache(**torch_args(t, seqlen_q=seqlen_q), softmax_scale=scale, causal=causal)
        p = decode_params(gpu.driver.launches[-2])
        expected_scale = 576 ** -0.5 if scale is None else scale
        assert p.scale_log2 == pytest.approx(expected_scale * 1.4426950408889634)
        assert p.causal == int(causal and seqlen_q > 1)


def test_prepared_calls_keep_no_array_alive(gpu):
    args = torch_args(gpu.torch)
    out, lse = flash_mla_with_kvcache(**args)
    watched = [weakref.ref(a) for a in (args["q"], args["k_cache"], out, lse)]
    del args, out, lse
    gc.collect()
    assert all(ref() is None for ref in watched)


def test_the_memo_forgets_the_least_recently_used(gpu, monkeypatch):
    """A layout in use survives any number of other layouts passing through a full memo."""
    monkeypatch.setattr(lookup, "LIMIT", 4)
    flash_mla_with_kvcache(**torch_args(gpu.torch, batch=1))
    (hot,) = {id(c): c for c in lookup.remembered().values()}.values()
    for batch in range(2, 12):
        flash_mla_with_kvcache(**torch_args(gpu.torch, batch=batch))   # a new layout fills the memo
        flash_mla_with_kvcache(**torch_args(gpu.torch, batch=1))       # the hot one: found, not re-prepared
        assert len(lookup.remembered()) <= 4
        assert any(c is hot for c in lookup.remembered().values())


def test_metadata_repeats_and_rejects(gpu, monkeypatch):
    t = gpu.torch
    get_mla_metadata(t.tensor((5,), t.int32), 128, 1)
    seqlens = t.tensor((5,), t.int32)
    metadata, num_splits = get_mla_metadata(seqlens, 128, 1)
    run = params.SchedulerParams.from_buffer_copy(gpu.driver.launches[-1]["args"][0])
    assert (run.seqlens, run.metadata, run.num_splits) == (seqlens.data_ptr(), metadata.data_ptr(),
                                                           num_splits.data_ptr())
    assert metadata.shape == (plan.num_sm_parts(132, 1, 128), 8) and num_splits.shape == (6,)
    metadata, _ = get_mla_metadata(seqlens, 128, 2)   # more KV heads: another plan
    assert metadata.shape == (plan.num_sm_parts(132, 2, 128), 8)
    for bad in ((seqlens, 0, 1), (seqlens, 128, 1.0), (t.tensor((5,), t.int64), 128, 1)):
        with pytest.raises(InvalidInputError):
            get_mla_metadata(*bad)
    forbid_the_general_road(monkeypatch)
    get_mla_metadata(seqlens, 128, 2)


def cupy_args(new, batch=2, heads_q=16, num_parts=4):
    import ml_dtypes
    bf16 = ml_dtypes.bfloat16
    return dict(q=new((batch, 1, heads_q, 576), bf16), k_cache=new((8, 64, 1, 576), bf16),
                block_table=new((batch, 4), "int32"), cache_seqlens=new((batch,), "int32"), head_dim_v=512,
                tile_scheduler_metadata=new((num_parts, 8), "int32"), num_splits=new((batch + 1,), "int32"))


def test_cupy_arrays_are_replayed_too(gpu, monkeypatch):
    new = fake_cuda.fake_cupy(monkeypatch, gpu.torch)
    flash_mla_with_kvcache(**cupy_args(new))
    with pytest.raises(InvalidInputError) as info:   # after a good call, a misaligned cache
        flash_mla_with_kvcache(**cupy_args(new) | {"k_cache": new((8, 64, 1, 576), "float16", offset_bytes=4)})
    assert [v.argument for v in info.value.violations] == ["k_cache.dtype", "k_cache.data_ptr"]
    forbid_the_general_road(monkeypatch)
    args = cupy_args(new)
    flash_mla_with_kvcache(**args)
    decode, combine = gpu.driver.launches[2:]
    p = decode_params(decode)
    assert (p.q, p.num_splits) == (args["q"].data.ptr, args["num_splits"].data.ptr)
    assert tensor_map_base(decode) == args["k_cache"].data.ptr
    assert decode["stream"] == combine["stream"] == fake_cuda.CUPY_STREAM
    assert gpu.allocations[-3:] == [("cupy", (2, 1, 16, 512), "bfloat16", 0, None),
                                    ("cupy", (2, 16, 1), "float32", 0, None),
                                    ("cupy", (plan.partial_slots(2, 4) * 16 * 513,), "float32", 0, None)]


def test_mixed_frameworks_take_the_general_road(gpu):
    for _ in range(2):
        splits = FakeCupy((3,), "int32", ptr=BASE_PTR)
        flash_mla_with_kvcache(**torch_args(gpu.torch) | {"num_splits": splits})
        assert splits.streams == [fake_cuda.STREAM]   # exported to the launch stream each time
    assert all(key[0][0] == "views" for key in lookup.remembered())
