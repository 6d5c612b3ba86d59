"""The whole decode (planner + decode kernel + combine) against the float64 reference, on the GPU.

Every case draws fresh random data (the seed is in the failure message), NaN in every cache slot no
request may see, huge page numbers in unused block-table entries, and a random page permutation.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from flashmla_cupy import reference
from flashmla_cupy.reference import HEAD_DIM_V
from flashmla_cupy.plan import plan_numpy
from gpu_cases import check, fresh_seed, lengths, matrix_case, matrix_id, pace_counts, run, to_device, to_numpy

pytestmark = pytest.mark.gpu

# ---------------------------------------------------------------------------------------------------
# The feature matrix: every listed value of every axis appears, with cost kept to a few seconds each.

HEADS = [(1, 1), (3, 1), (3, 3), (9, 1), (9, 3), (16, 1), (16, 2), (16, 8), (32, 1), (32, 8), (63, 1),
         (63, 3), (64, 1), (64, 2), (64, 8), (126, 1), (126, 2), (126, 3), (128, 1), (128, 2), (128, 8)]
BATCH_LENGTHS = [(1, "fixed:1"), (2, "fixed:65"), (3, "var:1:300"), (6, "var:1:16384"), (64, "fixed:4096"),
                 (128, "var:1:2048"), (300, "halfzero:1:700"), (64, "halfzero:1:3000"), (2, "fixed:16384"),
                 (6, "fixed:4097"), (3, "fixed:63")]
MATRIX = [
    dict(heads=heads, batch_lengths=BATCH_LENGTHS[i % len(BATCH_LENGTHS)], seqlen_q=1 + i % 4,
         causal=i % 3 != 0, dtype="bf16" if i % 2 == 0 else "fp16", custom_scale=i % 5 == 2)
    for i, heads in enumerate(itertools.islice(itertools.cycle(HEADS), 44))
]


def _matrix_id(c):
    return matrix_id(c, c["dtype"])


@pytest.mark.parametrize("config", MATRIX, ids=[_matrix_id(c) for c in MATRIX])
def test_matrix(config):
    seed = fresh_seed()
    case = matrix_case(np.random.default_rng(seed), config, config["dtype"])
    out, lse = run(case)
    check(case, out, lse, seed, _matrix_id(config))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("seqlen_q,h_q,causal", [(1, 128, False), (2, 16, True), (4, 64, True)])
def test_very_long_requests_beside_short_ones(dtype, seqlen_q, h_q, causal):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    seqlens = np.array([65536, 17, 0, 131072, 4000, 64, 1, 65536 + 33])
    case = reference.random_case(rng, len(seqlens), seqlen_q, h_q, 1, seqlens, dtype, causal=causal)
    out, lse = run(case)
    check(case, out, lse, seed, f"long-{dtype}-sq{seqlen_q}-h{h_q}")


@pytest.mark.parametrize("batch, seqlen_q, h_q", [(8, 1, 64), (7, 1, 32), (8, 1, 128), (8, 2, 128), (8, 1, 16)])
def test_equal_requests_kept_whole(eight_parts, batch, seqlen_q, h_q):
    """Equal requests where cutting buys little are planned whole (plan.py), one request a part (7 or 8
    of 8 parts; 16 rows: the narrow kernel; 128 and 256 rows: two and four row tiles); exact."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    seqlens = np.full(batch, 3001)
    assert plan_numpy(seqlens, 8)[1][-1] == batch  # no request is cut
    case = reference.random_case(rng, batch, seqlen_q, h_q, 1, seqlens, "bf16", causal=seqlen_q > 1)
    out, lse = run(case)
    check(case, out, lse, seed, f"whole-b{batch}-sq{seqlen_q}-h{h_q}")


@pytest.mark.parametrize("shift", [100, -100])
@pytest.mark.parametrize("q, cache, h_q", [("bf16", "bf16", 128), ("bf16", "bf16", 64), ("e4m3", "e4m3", 128),
                                           ("bf16", "e4m3", 64)])
def test_split_rows_far_from_one(shift, q, cache, h_q):
    """Cache values 2^shift times the test data's (a bf16 cache scaled, or an FP8 cache's descale) and q
    2^-shift times (the scores as they were): outputs far from 1 in requests cut into pieces, through
    decode.cu's and decode_ring.cu's partial rows and the combine."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    seqlens = np.array([3000, 4999, 700, 64, 2048])
    assert plan_numpy(seqlens, 8)[1][-1] > len(seqlens)  # cut even over 8 parts (unequal lengths: never whole)
    case = reference.random_case(rng, len(seqlens), 1, h_q, 1, seqlens, q,
                                 kv_dtype=None if cache == q else cache)

    def times(x, factor):
        return (x.astype(np.float64) * factor).astype(x.dtype)   # exact: a power of two, no overflow

    if cache == "e4m3":
        far = dataclasses.replace(case, descale_k=np.float32(case.descale_k * 2.0 ** shift))
    else:
        far = dataclasses.replace(case, k_cache=times(case.k_cache, 2.0 ** shift))
    if q == "e4m3":
        far = dataclasses.replace(far, descale_q=np.float32(case.descale_q * 2.0 ** -shift))
    else:
        far = dataclasses.replace(far, q=times(case.q, 2.0 ** -shift))
    out, lse = run(far)
    # out is 2^shift times the original case's, to the bit where exact (the rounding of a value and of
    # 2^shift times it agree): checked at the original scale, where SPEC's absolute bar means what it says.
    check(case, times(out, 2.0 ** -shift), lse, seed, f"far-{shift}-q{q}-kv{cache}-h{h_q}")


@pytest.mark.parametrize("dtype, kind", [("bf16", "fixed:4096"), ("fp16", "var:1:4096")])
def test_narrow_16bit_paced(dtype, kind):
    """The 16-bit narrow kernel's two loader lanes are paced as one CTA (decode_narrow.cu's GridPace):
    200 calls back to back, equal parts and unequal ones, every one the first one's bits and that one
    exact, and the pace count back at zero after them."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = reference.random_case(rng, 128, 1, 16, 1, lengths(rng, kind, 128), dtype)
    out, lse = run(case, repeats=200)
    check(case, out, lse, seed, f"narrow-paced-{dtype}-{kind}")
    counts = pace_counts()
    assert counts and set(counts) == {0}, counts


@pytest.mark.parametrize("framework", ["cupy", "torch", "jax"])
def test_frameworks_and_layouts(framework):
    pytest.importorskip(framework)
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = reference.random_case(rng, 5, 2, 32, 1, lengths(rng, "var:1:3000", 5), "bf16", causal=True)
    out, lse = run(case, framework, strided_q=True, wide_block_table=True)
    check(case, out, lse, seed, f"{framework}-strided")


def test_all_requests_empty():
    seed = fresh_seed()
    case = reference.random_case(np.random.default_rng(seed), 4, 1, 16, 1, np.zeros(4), "bf16")
    out, lse = run(case)
    assert np.all(out.astype(np.float32) == 0) and np.all(np.isposinf(lse))


def test_repeated_runs_are_bit_identical():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    case = reference.random_case(rng, 37, 2, 128, 1, lengths(rng, "halfzero:1:9000", 37), "bf16", causal=True)
    first = run(case)
    for _ in range(3):
        again = run(case)
        assert np.array_equal(first[0].view(np.uint16), again[0].view(np.uint16)), f"out moved (seed {seed})"
        assert np.array_equal(first[1].view(np.uint32), again[1].view(np.uint32)), f"lse moved (seed {seed})"
    check(case, *first, seed, "repeat")


def test_cuda_graph_capture_and_replay():
    """A decode step captured in a torch CUDA graph replays correctly with new lengths and new data."""
    torch = pytest.importorskip("torch")
    import flashmla_cupy

    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    b, s_q, h_q = 16, 1, 64
    cases = [reference.random_case(rng, b, s_q, h_q, 1, lengths(rng, "var:1:3000", b), "bf16") for _ in range(2)]
    # Static buffers sized for the larger of the two cases; the graph sees fixed shapes and pointers.
    num_blocks = max(c.k_cache.shape[0] for c in cases)
    width = max(c.block_table.shape[1] for c in cases)

    def padded(c):
        k = np.full((num_blocks,) + c.k_cache.shape[1:], np.nan, dtype=c.k_cache.dtype)
        k[: c.k_cache.shape[0]] = c.k_cache
        bt = np.full((b, width), 2**31 - 1, dtype=np.int32)
        bt[:, : c.block_table.shape[1]] = c.block_table
        return c.q, k, bt, c.cache_seqlens

    static = [to_device("torch", a) for a in padded(cases[0])]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: compile, load, allocate outside the capture
            meta, splits = flashmla_cupy.get_mla_metadata(static[3], s_q * h_q, 1)
            flashmla_cupy.flash_mla_with_kvcache(static[0], static[1], static[2], static[3], HEAD_DIM_V, meta, splits)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        meta, splits = flashmla_cupy.get_mla_metadata(static[3], s_q * h_q, 1)
        out, lse = flashmla_cupy.flash_mla_with_kvcache(static[0], static[1], static[2], static[3], HEAD_DIM_V,
                                                        meta, splits)
    for c in cases:
        for dst, src in zip(static, padded(c)):
            dst.copy_(to_device("torch", src))
        graph.replay()
        torch.cuda.synchronize()
        check(c, to_numpy("torch", out, c.dtype), to_numpy("torch", lse), seed, "graph replay")
