"""The FP8 (e4m3) KV cache on the GPU against the float64 reference, which dequantises exactly.

Both query forms: a 16-bit q (bf16, fp16) with descale_k, out in q's dtype; an e4m3 q with descale_q
and descale_k, out in bf16. Same test data rules as test_decode_gpu.py: fresh random data, FP8 NaN
(0x7F) in every cache slot no request sees, huge page numbers in unused block-table entries. The
accuracy bar is SPEC's output bar, unloosened: the kernel converts FP8 to 16 bits exactly.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from flashmla_cupy import reference
from flashmla_cupy.reference import HEAD_DIM_V
from gpu_cases import (check, descale_on_device, fresh_seed, lengths, matrix_case, matrix_id, pace_counts,
                       run, to_device, to_numpy)

pytestmark = pytest.mark.gpu

HEADS = [(16, 1), (128, 1), (64, 2), (32, 8), (9, 3), (128, 2), (3, 1), (63, 1), (126, 3), (1, 1)]
BATCH_LENGTHS = [(3, "var:1:300"), (64, "fixed:4096"), (128, "var:1:2048"), (64, "halfzero:1:3000"),
                 (6, "var:1:16384"), (2, "fixed:65"), (300, "halfzero:1:700"), (6, "fixed:4097")]
QUERY_DTYPES = ["e4m3", "bf16", "fp16"]
MATRIX = [
    dict(heads=heads, batch_lengths=BATCH_LENGTHS[i % len(BATCH_LENGTHS)], seqlen_q=1 + i % 3,
         causal=i % 4 != 0, q_dtype=QUERY_DTYPES[i % 3], custom_scale=i % 5 == 2, descales=i % 7 != 3)
    for i, heads in enumerate(itertools.islice(itertools.cycle(HEADS), 24))
]


def _id(c):
    return matrix_id(c, f"q{c['q_dtype']}") + ("" if c["descales"] else "-nodescale")


def _case(rng, b, s_q, h_q, h_kv, seqlens, q_dtype, causal=False, scale=None, descales=True):
    return reference.random_case(rng, b, s_q, h_q, h_kv, seqlens, q_dtype, causal=causal, softmax_scale=scale,
                                 kv_dtype="e4m3", descales=descales)


@pytest.mark.parametrize("config", MATRIX, ids=[_id(c) for c in MATRIX])
def test_fp8_matrix(config):
    seed = fresh_seed()
    case = matrix_case(np.random.default_rng(seed), config, config["q_dtype"], kv_dtype="e4m3",
                       descales=config["descales"])
    out, lse = run(case)
    check(case, out, lse, seed, "fp8-" + _id(config))


@pytest.mark.parametrize("framework", ["torch", "jax", "cupy"])
@pytest.mark.parametrize("q_dtype", ["e4m3", "bf16"])
def test_fp8_frameworks(framework, q_dtype):
    """float8_e4m3fn through torch's and JAX's DLPack, a uint8 view with kv_dtype from CuPy."""
    pytest.importorskip(framework)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 5, 2, 32, 1, lengths(rng, "var:1:3000", 5), q_dtype, causal=True)
    out, lse = run(case, framework, strided_q=True, wide_block_table=True)
    check(case, out, lse, seed, f"fp8-{framework}-q{q_dtype}")


@pytest.mark.parametrize("b, s_q, h_q, h_kv, causal", [(7, 2, 16, 1, True), (5, 1, 32, 1, False), (4, 2, 48, 3, True),
                                                      (3, 1, 17, 1, False)])
def test_fp8_e4m3_query_rows_17_to_32(b, s_q, h_q, h_kv, causal):
    """17-32 query rows per KV head with an e4m3 q: the narrow kernel with wgmma N = 32 (partly padding
    at 17 rows), its two warpgroups taking pages in turn, causal rows of two positions."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, b, s_q, h_q, h_kv, lengths(rng, "var:1:5000", b), "e4m3", causal=causal)
    out, lse = run(case)
    check(case, out, lse, seed, f"fp8-rows{s_q * h_q // h_kv}-b{b}-sq{s_q}-h{h_q}x{h_kv}")


def test_fp8_narrow_launches_back_to_back():
    """2000 calls of one 16-row FP8 call (the narrow kernel, two warpgroups taking pages in turn) back to
    back: every one gives the first one's bits, and that one matches the reference. With linear pages
    (decode_narrow.cu's kLinear), a barrier per page slot, whose parity wait could not tell the slot's
    page from the other warpgroup's page five before, made launches of this size fail now and then
    ("unspecified launch failure" on the H200; this test failed in 2 runs of 4 against that build, and
    with 300 calls in 1 of 2), where the sanitizers, which serialise the copies, never saw it
    (docs/PERF_NOTES.md, ab127-ab128)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 128, 1, 16, 1, lengths(rng, "var:2048:4096", 128), "e4m3")
    out, lse = run(case, repeats=2000)
    check(case, out, lse, seed, "fp8-narrow-back-to-back")


@pytest.mark.parametrize("kind", ["fixed:4096", "var:1:4096"])
@pytest.mark.parametrize("h_q", [16, 32])
def test_fp8_narrow_paced(h_q, kind):
    """The narrow FP8 kernels' loads (16 rows: linear pages, one loader lane; 32 rows: boxes, two lanes
    counted as one CTA) are paced to the average of the CTAs still issuing through a count in global
    memory: 200 calls back to back, with equal parts (one request a CTA) and unequal ones (varlen: split
    requests, parts that end apart), every one the first one's bits and that one exact; and the count
    back at zero after them, so the next launch, or a graph's replay, starts from zero."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 128, 1, h_q, 1, lengths(rng, kind, 128), "e4m3")
    out, lse = run(case, repeats=200)
    check(case, out, lse, seed, f"fp8-narrow-paced-h{h_q}-{kind}")
    counts = pace_counts()
    assert counts and set(counts) == {0}, counts


def test_fp8_narrow_paced_on_two_streams():
    """Launches on two streams at once share the module's pace count: they may slow each other (a bounded
    wait a page) but never change a result: 200 calls alternating between two non-blocking streams, every
    one the first one's bits and that one exact, and the count back at zero after them."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 128, 1, 16, 1, lengths(rng, "var:2048:4096", 128), "e4m3")
    out, lse = run(case, repeats=200, streams=2)
    check(case, out, lse, seed, "fp8-narrow-paced-two-streams")
    counts = pace_counts()
    assert counts and set(counts) == {0}, counts


def test_fp8_e4m3_long_pieces():
    """64 requests of 8192 tokens, 128 query rows: pieces of thousands of tokens, over which O stays in
    the wgmma accumulator. (P V on FP8 wgmmas, whose accumulation keeps fewer mantissa bits than fp32,
    failed here at cosine 1.6e-5 on the H200: benchmarks/results/2026-11-30-h200-5cc5ffd-ring-check.log.)"""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 64, 1, 128, 1, lengths(rng, "fixed:8192", 64), "e4m3")
    out, lse = run(case)
    check(case, out, lse, seed, "fp8-long-pieces-qe4m3")


@pytest.mark.parametrize("q_dtype", ["e4m3", "fp16"])
def test_fp8_long_requests_beside_short_and_empty_ones(q_dtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    seqlens = np.array([65536, 17, 0, 131072, 4000, 64, 1, 0])
    case = _case(rng, len(seqlens), 2, 64, 1, seqlens, q_dtype, causal=True)
    out, lse = run(case)
    check(case, out, lse, seed, f"fp8-long-q{q_dtype}")


def test_fp8_all_requests_empty():
    seed = fresh_seed()
    case = _case(np.random.default_rng(seed), 4, 1, 16, 1, np.zeros(4), "e4m3")
    out, lse = run(case)
    assert np.all(out.astype(np.float32) == 0) and np.all(np.isposinf(lse))


def test_fp8_descales_are_read_on_the_device():
    """The same prepared call with new descale values in the same arrays gives the new result (what a
    replayed CUDA graph relies on)."""
    cupy = pytest.importorskip("cupy")
    import flashmla_cupy

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 8, 1, 64, 1, lengths(rng, "var:1:2000", 8), "e4m3")
    q, k, bt, sl = (to_device("cupy", a) for a in (case.q, case.k_cache, case.block_table, case.cache_seqlens))
    dq, dk = descale_on_device("cupy", case.descale_q), descale_on_device("cupy", case.descale_k)
    meta, splits = flashmla_cupy.get_mla_metadata(sl, 64, 1, is_fp8_kvcache=True)
    for factor in (1.0, 0.5):
        dq[...] = np.float32(case.descale_q * factor)
        dk[...] = np.float32(case.descale_k * factor)
        out, lse = flashmla_cupy.flash_mla_with_kvcache(q, k, bt, sl, HEAD_DIM_V, meta, splits, None, False, dq, dk,
                                                        kv_dtype="fp8_e4m3")
        moved = reference.Case(case.q, case.k_cache, case.block_table, case.cache_seqlens, False, None,
                               descale_q=np.float32(case.descale_q * factor),
                               descale_k=np.float32(case.descale_k * factor))
        check(moved, to_numpy("cupy", out, moved.dtype), cupy.asnumpy(lse), seed, f"fp8-descale-x{factor}")


@pytest.mark.parametrize("q_dtype,s_q,h_q", [("bf16", 1, 16),    # decode.cu, every page converted
                                             ("e4m3", 1, 16),    # the narrow kernel, 16 rows
                                             ("e4m3", 2, 16),    # the narrow kernel, 32 rows
                                             ("e4m3", 1, 128)])  # decode.cu with an e4m3 q
def test_fp8_poisoned_page_gives_nan_rows(q_dtype, s_q, h_q):
    """A used page whose block index is outside the cache poisons its request's rows, as with bf16: the
    FP8 tensor map fills it with zeros, so each kernel flags the index itself."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 3, s_q, h_q, 1, np.array([200, 300, 100]), q_dtype)
    case.block_table[1, 2] = case.k_cache.shape[0] + 5
    out, lse = run(case)
    assert np.isnan(out[1].astype(np.float32)).all() and np.isnan(lse[1]).all()
    for i in (0, 2):
        assert np.isfinite(out[i].astype(np.float32)).all() and np.isfinite(lse[i]).all()


@pytest.mark.parametrize("s_q", [1, 2])  # 16 and 32 rows
@pytest.mark.parametrize("page, index", [(101, "past"), (100, "negative"), (171, "past")])
def test_fp8_two_loader_lanes_poisoned_page(eight_parts, s_q, page, index):
    """With two loader lanes (long parts), a bad block index on an odd page, an even page or the partial
    last page poisons its request's rows, each warpgroup reading its pages' entries itself; the other
    request, planned into the same parts, is exact."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 2, s_q, 16, 1, np.array([12000, 11001]), "e4m3", causal=s_q > 1)
    good = reference.Case(case.q[:1], case.k_cache, case.block_table[:1].copy(), case.cache_seqlens[:1],
                          case.causal, case.softmax_scale, descale_q=case.descale_q, descale_k=case.descale_k)
    case.block_table[1, page] = case.k_cache.shape[0] + 5 if index == "past" else -3
    out, lse = run(case)
    assert np.isnan(out[1].astype(np.float32)).all() and np.isnan(lse[1]).all()
    check(good, out[:1], lse[:1], seed, f"fp8-two-lanes-poisoned-sq{s_q}-page{page}")


@pytest.fixture(params=[True, False], ids=["ring", "decode"])
def wide_fp8_kernel(request, monkeypatch):
    """Calls of an e4m3 q and cache with more than 32 rows, through decode_ring.cu (kernels.RING_FP8, what
    ships) and through decode.cu's FP8 path (the fallback), prepared afresh."""
    from flashmla_cupy import kernels, lookup

    lookup.remembered().clear()
    monkeypatch.setattr(kernels, "RING_FP8", request.param)
    yield
    lookup.remembered().clear()


@pytest.mark.parametrize("b, s_q, h_q, h_kv, causal, kind", [(5, 1, 128, 1, False, "var:1:3000"),
                                                             (4, 2, 64, 2, True, "halfzero:1:3000"),
                                                             (3, 1, 126, 3, False, "fixed:4097"),
                                                             (6, 2, 64, 1, True, "var:1:700"),
                                                             (2, 1, 128, 1, False, "fixed:8192")])
def test_fp8_wide_kernels(wide_fp8_kernel, b, s_q, h_q, h_kv, causal, kind):
    """The kernels of more than 32 rows: odd and even page counts per piece (the warpgroups' pairs, with
    and without page b), partial last pages with FP8 NaN behind them, causal rows, h_kv > 1, a row tile
    that is partly padding (126 rows), zero-length requests, pieces of 8192 tokens."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, b, s_q, h_q, h_kv, lengths(rng, kind, b), "e4m3", causal=causal)
    out, lse = run(case)
    check(case, out, lse, seed, f"fp8-wide-rows{s_q * h_q // h_kv}-b{b}-sq{s_q}-h{h_q}x{h_kv}")


def test_fp8_wide_kernels_poisoned_page_gives_nan_rows(wide_fp8_kernel):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, 3, 1, 128, 1, np.array([200, 300, 100]), "e4m3")
    case.block_table[1, 2] = case.k_cache.shape[0] + 5
    out, lse = run(case)
    assert np.isnan(out[1].astype(np.float32)).all() and np.isnan(lse[1]).all()
    for i in (0, 2):
        assert np.isfinite(out[i].astype(np.float32)).all() and np.isfinite(lse[i]).all()


@pytest.mark.parametrize("b, s_q, h_q, causal, kind", [(5, 1, 128, False, "var:1:3000"),  # ~13 parts a request
                                                       (24, 1, 128, False, "halfzero:1:2048"),  # 2-3
                                                       (30, 2, 64, True, "var:1:1500"),
                                                       (100, 1, 128, False, "var:1:1200"),  # fewer parts than requests
                                                       (90, 2, 64, True, "halfzero:1:900"),  # 128 rows: 66 parts
                                                       (40, 1, 64, False, "halfzero:1:2048"),  # one 64-row tile: 132 parts
                                                       (150, 2, 32, True, "var:1:800")])  # 64 rows, more requests than parts
def test_fp8_ring_fp16_partial_rows(monkeypatch, b, s_q, h_q, causal, kind):
    """decode_ring.cu's fp16-partial build (the plan's parts take at most 1 / kernels.RING_PARTIAL_F16_PARTS_PER_REQUEST
    requests each, a warp merging a row; plans of one row tile and of two; down to fewer parts than requests,
    where most requests stay whole and a part's edges cut some): its one power of two a launch and the combine's
    _p16 read, with zero-length requests and FP8 NaN behind every request."""
    from flashmla_cupy import kernels, lookup

    picked = []
    shipped = kernels.decode_kernel

    def spy(problem):
        chosen = shipped(problem)
        picked.append(chosen[0].name)
        return chosen

    monkeypatch.setattr(kernels, "decode_kernel", spy)
    lookup.remembered().clear()
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = _case(rng, b, s_q, h_q, 1, lengths(rng, kind, b), "e4m3", causal=causal)
    out, lse = run(case)
    lookup.remembered().clear()
    assert picked == ["decode_ring_e4m3_kv_e4m3_p16"], picked
    check(case, out, lse, seed, f"fp8-ring-p16-b{b}-sq{s_q}")
