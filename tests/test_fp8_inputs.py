"""The FP8 (e4m3) cache's host side: which calls are accepted, what is launched, and one clear error for
every bad combination of dtypes, descales and kv_dtype, raised before anything is allocated or launched.
(The GPU results are tests/gpu/test_fp8_gpu.py's.)"""
from __future__ import annotations

import math

import pytest

import fake_cuda
from fake_dlpack import BASE_PTR, FakeJax, FakeTorch, decode_args
from flashmla_cupy import flash_mla_with_kvcache, get_mla_metadata, params, variants
from flashmla_cupy.errors import InvalidInputError

STREAM = 0x5000
DESCALE_Q, DESCALE_K = BASE_PTR + (6 << 30), BASE_PTR + (7 << 30)


@pytest.fixture
def gpu(monkeypatch):
    return fake_cuda.fake_gpu(monkeypatch)


def fp8_args(q="e4m3", cache="e4m3", producer=FakeTorch, **kw):
    args = decode_args(producer=producer, **kw)
    b, s_q, h_q, _ = args["q"].shape
    args["q"] = producer(args["q"].shape, q, ptr=BASE_PTR)
    args["k_cache"] = producer(args["k_cache"].shape, cache, ptr=BASE_PTR + (1 << 30))
    return args


def descale(ptr=DESCALE_Q, shape=(1,), dtype="fp32", producer=FakeTorch):
    return producer(shape, dtype, ptr=ptr)


def reject(gpu, args, **kw):
    with pytest.raises(InvalidInputError) as info:
        flash_mla_with_kvcache(**args, **kw, stream=STREAM)
    assert gpu.allocations == [] and gpu.driver.launches == []
    return [v.argument for v in info.value.violations], info.value.violations


@pytest.mark.parametrize("q,out_dtype", [("e4m3", "bfloat16"), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_both_query_forms_launch_the_fp8_kernel_with_the_descales(gpu, q, out_dtype):
    args = fp8_args(q=q, batch=3, heads_q=32)
    dq = descale(DESCALE_Q) if q == "e4m3" else None
    flash_mla_with_kvcache(**args, descale_q=dq, descale_k=descale(DESCALE_K), softmax_scale=0.1, stream=STREAM)
    assert gpu.allocations[0][1:] == ((3, 1, 32, 512), out_dtype, 0, STREAM)
    decode, combine = gpu.driver.launches
    assert decode["block"] == (384, 1, 1)   # two consumer warpgroups and the converter
    p = params.DecodeParams.from_buffer_copy(decode["args"][0])
    assert (p.descale_q or 0, p.descale_k) == ((DESCALE_Q if q == "e4m3" else 0), DESCALE_K)
    assert p.scale_log2 == pytest.approx(0.1 * math.log2(math.e))   # the descales are applied on the device


def test_missing_descales_mean_one(gpu):
    flash_mla_with_kvcache(**fp8_args(), stream=STREAM)
    p = params.DecodeParams.from_buffer_copy(gpu.driver.launches[0]["args"][0])
    assert (p.descale_q, p.descale_k) == (None, None)   # null pointers


def test_uint8_views_with_kv_dtype(gpu):
    args = fp8_args(q="uint8", cache="uint8")
    flash_mla_with_kvcache(**args, descale_k=descale(DESCALE_K), kv_dtype="fp8_e4m3", stream=STREAM)
    assert gpu.allocations[0][2] == "bfloat16"


def test_uint8_without_kv_dtype(gpu):
    names, violations = reject(gpu, fp8_args(q="bf16", cache="uint8"))
    assert names == ["k_cache.dtype"] and 'kv_dtype="fp8_e4m3"' in violations[0].fix


def test_the_variants_exist_for_every_fp8_query_type():
    names = {v.name for v in variants.all_variants()}
    assert {"decode_bf16_kv_e4m3", "decode_fp16_kv_e4m3", "decode_e4m3_kv_e4m3"} <= names
    assert variants.decode_variant("float8_e4m3fn", "e4m3").threads == 384
    assert variants.decode_variant("bf16", "bf16") == variants.decode_variant("bf16")


@pytest.mark.parametrize("case,expected", [
    (dict(q="e4m3", cache="bf16"), ["k_cache.dtype"]),                       # an e4m3 q needs an e4m3 cache
    (dict(q="fp32", cache="e4m3"), ["q.dtype"]),
    (dict(q="bf16", cache="fp16"), ["k_cache.dtype"]),
])
def test_bad_dtype_combinations(gpu, case, expected):
    names, _ = reject(gpu, fp8_args(**case))
    assert names == expected


def test_bad_descales_and_kv_dtype_all_at_once(gpu):
    args = fp8_args(q="bf16", cache="e4m3")
    names, violations = reject(gpu, args, descale_q=descale(DESCALE_Q), descale_k=descale(DESCALE_K, (2,), "fp16"),
                               kv_dtype="fp8_e5m2")
    assert names == ["kv_dtype", "descale_q", "descale_k.shape", "descale_k.dtype"]
    assert "descale_k alone" in violations[1].fix


def test_descales_of_a_16_bit_cache_are_refused(gpu):
    names, _ = reject(gpu, decode_args(), descale_k=descale(DESCALE_K))
    assert names == ["descale_k"]
    names, _ = reject(gpu, decode_args(), kv_dtype="fp8_e4m3")
    assert names == ["kv_dtype"]


def test_descale_on_another_device(gpu):
    names, _ = reject(gpu, fp8_args(), descale_k=FakeJax((1,), "fp32", ptr=DESCALE_K, device_id=1))
    assert names == ["descale_k.device"]


def test_metadata_takes_is_fp8_kvcache(gpu):
    seqlens = FakeTorch((4,), "int32", ptr=BASE_PTR)
    get_mla_metadata(seqlens, 16, 1, is_fp8_kvcache=True, stream=STREAM)
    with pytest.raises(InvalidInputError, match="is_fp8_kvcache"):
        get_mla_metadata(seqlens, 16, 1, is_fp8_kvcache="yes", stream=STREAM)
