"""The combine kernel (kernels_src/combine.cu) against its float64 twin, merge_partials_reference."""
from __future__ import annotations

import numpy as np
import pytest

from flashmla_cupy.reference import HEAD_DIM_V, as_dtype, merge_partials_reference
from gpu_cases import run_combine_raw

pytestmark = pytest.mark.gpu

SENTINEL = 7.0  # exact in every dtype: rows the kernel must not touch keep it


def random_partials(rng: np.random.Generator, pieces: list[int], heads_kv: int, rows: int):
    """Partial results for requests cut into `pieces[i]` pieces: log2-domain lse in [-30, 30] with
    about 20% -inf (pieces that saw no key, whose partial rows are NaN), and for every split request
    one row that no piece saw. Two spare slots at the end, as the real buffers have."""
    num_splits = np.concatenate([[0], np.cumsum(pieces)]).astype(np.int32)
    slots = int(num_splits[-1]) + 2
    lse_partial = rng.uniform(-30, 30, (slots, heads_kv, rows)).astype(np.float32)
    lse_partial[rng.random(lse_partial.shape) < 0.2] = -np.inf
    for i, n in enumerate(pieces):
        if n > 1:
            lse_partial[num_splits[i]:num_splits[i + 1], rng.integers(heads_kv), rng.integers(rows)] = -np.inf
    out_partial = rng.standard_normal((slots, heads_kv, rows, HEAD_DIM_V)).astype(np.float32)
    out_partial[np.isneginf(lse_partial)] = np.nan
    return out_partial, lse_partial, num_splits


def fp16_rows(rng: np.random.Generator, out_partial: np.ndarray, partial_slots: int, quad_order: bool):
    """`out_partial`'s first `partial_slots` slots (the capacity the launch is given) with each (row, half
    of the columns) times a random 2^e, e in [-20, 20], in the fp16 format of the -DFLASHMLA_PARTIAL_F16
    builds (kernels_src/epilogue.cuh): each half row scaled by the 2^k that brings its largest magnitude into
    [2^14, 2^15) and rounded to fp16, in quad order where `quad_order` (decode.cu's; kernels_src/element.cuh:
    in each 16 columns, the t-th 4 values are columns 2t, 2t + 1, 8 + 2t, 9 + 2t), else in column order
    (decode_ring.cu's), the 2^-k after all the values. Returns (the fp32 workspace holding both, as the kernel
    reads it; the values they stand for, float64, NaN in the slots past the capacity)."""
    slots, heads_kv, rows, dv = out_partial.shape
    halves = out_partial[:partial_slots].reshape(partial_slots, heads_kv, rows, 2, dv // 2).astype(np.float64)
    halves = halves * np.exp2(rng.integers(-20, 21, (partial_slots, heads_kv, rows, 2, 1)))
    largest = np.max(np.where(np.isnan(halves), 0.0, np.abs(halves)), axis=-1, keepdims=True)
    k = 14 - np.floor(np.log2(np.where(largest > 0, largest, 1.0)))
    values = (halves * np.exp2(k)).astype(np.float16)
    assert np.all(np.abs(values[np.isfinite(values)]) < 2.0 ** 15)
    workspace = np.full(out_partial.size, np.nan, dtype=np.float32)
    stored = values
    if quad_order:  # columns 16m + 8h + 2t + c at 16m + 4t + 2h + c: (m, h, t, c) -> (m, t, h, c)
        stored = np.ascontiguousarray(values.reshape(values.shape[:-1] + (dv // 32, 2, 4, 2)).swapaxes(-3, -2))
    value_words = stored.reshape(-1).view(np.float32)  # two fp16 values to a float
    inv_scales = np.exp2(-k).astype(np.float32).reshape(-1)  # [slots, heads_kv, rows, 2]
    workspace[:value_words.size] = value_words
    workspace[value_words.size:value_words.size + inv_scales.size] = inv_scales
    decoded = np.full(out_partial.shape, np.nan)
    decoded[:partial_slots] = (values.astype(np.float64) * np.exp2(-k)).reshape(partial_slots, heads_kv, rows, dv)
    return workspace, decoded


def partial_parts(batch: int, num_splits) -> int:
    """The launch's num_parts: the workspace holds exactly the plan's pieces, batch + num_parts slots
    (plan.partial_slots), num_parts >= 1."""
    return max(1, int(num_splits[-1]) - batch)


def device_combine(dtype: str, batch, seqlen_q, heads_q, heads_kv, out_partial, lse_partial, num_splits,
                   partial16: bool = False, quad_order: bool = False):
    import cupy as cp

    from flashmla_cupy import tensors

    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        arrays = {
            "out_partial": cp.asarray(out_partial), "lse_partial": cp.asarray(lse_partial),
            "num_splits": cp.asarray(num_splits),
            "out": cp.asarray(np.full((batch, seqlen_q, heads_q, HEAD_DIM_V), SENTINEL, dtype=as_dtype(dtype))),
            "lse": cp.asarray(np.full((batch, heads_q, seqlen_q), SENTINEL, dtype=np.float32)),
        }
        views = {name: tensors.take(array, name, stream.ptr) for name, array in arrays.items()}
        num_parts = partial_parts(batch, num_splits)
        run_combine_raw(dtype, batch, seqlen_q, heads_q, heads_kv, num_parts, views["out_partial"],
                        views["lse_partial"], views["num_splits"], views["out"], views["lse"], stream.ptr, partial16,
                        quad_order)
        stream.synchronize()
        return cp.asnumpy(arrays["out"]).astype(np.float64), cp.asnumpy(arrays["lse"]).astype(np.float64)


# name: (seqlen_q, heads_q, heads_kv, pieces per request)
CASES = {
    "decode_128_heads": (1, 128, 1, [1, 2, 5, 1, 3, 17, 1, 2]),
    "two_tokens_grouped": (2, 16, 2, [2, 1, 4, 33, 1]),
    "many_pieces": (1, 8, 1, [70, 1, 132, 32, 31]),
    "odd_row_count": (3, 6, 2, [3, 2, 1]),   # heads_kv * rows = 18 is not a multiple of the block's 4 warps
}


def merged_by_warps(name: str) -> bool:
    """Whether a warp merges each row of the case (W = 1), the only combine built for fp16 partial rows."""
    from flashmla_cupy import kernels

    pieces = CASES[name][3]
    return kernels.combine_warps_per_row(len(pieces), partial_parts(len(pieces), [sum(pieces)])) == 1


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
# partial: fp32 rows, fp16 rows in column order (the ring's) or in quad order (decode.cu's)
@pytest.mark.parametrize("name, partial", [(name, partial) for name in CASES for partial in ("f32", "f16", "f16q")
                                           if partial == "f32" or merged_by_warps(name)])
def test_combine_matches_reference(name, dtype, partial):
    seqlen_q, heads_q, heads_kv, pieces = CASES[name]
    rows = seqlen_q * heads_q // heads_kv
    batch = len(pieces)
    rng = np.random.default_rng(sum(map(ord, name + dtype + partial)))
    out_partial, lse_partial, num_splits = random_partials(rng, pieces, heads_kv, rows)
    workspace = out_partial
    if partial != "f32":  # the kernel reads the fp16 rows; the reference merges the values they stand for
        workspace, out_partial = fp16_rows(rng, out_partial, batch + partial_parts(batch, num_splits),
                                           partial == "f16q")
    out, lse = device_combine(dtype, batch, seqlen_q, heads_q, heads_kv, workspace, lse_partial, num_splits,
                              partial != "f32", partial == "f16q")
    ref_out, ref_lse = merge_partials_reference(out_partial, lse_partial, num_splits, batch, seqlen_q, heads_q, heads_kv)

    single = np.array(pieces) == 1
    assert (out[single] == SENTINEL).all() and (lse[single] == SENTINEL).all(), "one-piece requests were touched"

    split = ~single
    got_out, want_out = out[split], ref_out[split].astype(as_dtype(dtype)).astype(np.float64)
    # fp32 accumulation then one rounding: at most one ulp of the output dtype from the rounded reference.
    ulp = 2.0 ** -7 if dtype == "bf16" else 2.0 ** -10
    np.testing.assert_allclose(got_out, want_out, rtol=ulp, atol=1e-5)
    got_lse, want_lse = lse[split], ref_lse[split]
    assert np.array_equal(np.isposinf(got_lse), np.isposinf(want_lse)), "+inf (rows no piece saw) differ"
    assert np.isposinf(want_lse).any(), "the case must contain a row that no piece saw"
    assert (got_out[np.broadcast_to(np.isposinf(want_lse).transpose(0, 2, 1)[..., None], got_out.shape)] == 0).all()
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=2e-6, atol=2e-5)
