"""The float64 reference, the test-data generator and the accuracy check (flashmla_cupy/reference.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from flashmla_cupy.reference import (
    HEAD_DIM,
    HEAD_DIM_V,
    PAGE_SIZE,
    as_dtype,
    check_close,
    merge_partials_reference,
    mla_decode_reference,
    perf_accounting,
    random_case,
    to_float64,
)


def dense_loop_reference(case):
    """docs/API.md section 3 read literally: one query row and one key at a time."""
    q = to_float64(case.q)
    batch, seqlen_q, heads_q, dim = q.shape
    heads_kv = case.heads_kv
    scale = dim ** -0.5 if case.softmax_scale is None else case.softmax_scale
    out = np.zeros((batch, seqlen_q, heads_q, HEAD_DIM_V))
    lse = np.full((batch, heads_q, seqlen_q), np.inf)
    for i in range(batch):
        n = int(case.cache_seqlens[i])
        for s in range(seqlen_q):
            visible = n - (seqlen_q - 1 - s) if case.causal else n
            for h in range(heads_q):
                g = h // (heads_q // heads_kv)
                keys = [to_float64(case.k_cache[case.block_table[i, t // PAGE_SIZE], t % PAGE_SIZE, g])
                        for t in range(max(visible, 0))]
                if not keys:
                    continue
                scores = [scale * float(np.dot(q[i, s, h], k)) for k in keys]
                top = max(scores)
                weights = [math.exp(x - top) for x in scores]
                total = math.fsum(weights)
                lse[i, h, s] = top + math.log(total)
                out[i, s, h] = sum(w * k[:HEAD_DIM_V] for w, k in zip(weights, keys)) / total
    return out, lse


CASES = {
    # name: (batch, seqlen_q, heads_q, heads_kv, seqlens, dtype, causal, softmax_scale)
    "decode": (3, 1, 4, 1, [1, 64, 130], "bf16", False, None),
    "zero_length": (3, 1, 2, 1, [0, 65, 0], "fp16", False, None),
    "causal_masks_rows": (4, 3, 2, 1, [1, 2, 3, 70], "bf16", True, None),
    "non_causal_multi_token": (2, 3, 2, 1, [2, 100], "fp16", False, None),
    "custom_scale": (2, 2, 2, 1, [40, 129], "bf16", True, 0.3),
    "grouped_kv_heads": (2, 2, 6, 2, [77, 1], "bf16", True, None),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_dense_loop(name):
    batch, seqlen_q, heads_q, heads_kv, seqlens, dtype, causal, scale = CASES[name]
    case = random_case(np.random.default_rng(len(name)), batch, seqlen_q, heads_q, heads_kv, seqlens, dtype,
                       causal=causal, softmax_scale=scale)
    out, lse = case.reference()
    want_out, want_lse = dense_loop_reference(case)
    assert out.shape == (batch, seqlen_q, heads_q, HEAD_DIM_V) and lse.shape == (batch, heads_q, seqlen_q)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-15)
    assert np.array_equal(np.isinf(lse), np.isinf(want_lse))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_rows_without_keys_are_zero_and_plus_inf():
    # seqlen 0, and causal rows of a 2-token request that precede its first key.
    case = random_case(np.random.default_rng(1), 2, 4, 2, 1, [0, 2], "bf16", causal=True)
    out, lse = case.reference()
    assert (out[0] == 0).all() and np.isposinf(lse[0]).all()
    assert (out[1, :2] == 0).all() and np.isposinf(lse[1, :, :2]).all()
    assert np.isfinite(lse[1, :, 2:]).all() and (out[1, 2:] != 0).any()


def test_causal_changes_nothing_for_one_query_token():
    case = random_case(np.random.default_rng(2), 2, 1, 4, 1, [100, 3], "fp16")
    plain = case.reference()
    case.causal = True
    for a, b in zip(plain, case.reference()):
        assert np.array_equal(a, b)


def test_poison_outside_visible_slots_does_not_leak():
    rng = np.random.default_rng(3)
    case = random_case(rng, 3, 2, 4, 2, [65, 0, 130], "bf16", causal=True, spare_pages=3, bt_pad=3)
    out, lse = case.reference()
    assert np.isfinite(out).all() and not np.isnan(lse).any()
    # Replacing the poison by other garbage (Inf, large finite values) changes nothing.
    poisoned = np.isnan(to_float64(case.k_cache))
    case.k_cache = case.k_cache.copy()
    case.k_cache[poisoned] = np.inf
    assert all(np.array_equal(a, b) for a, b in zip((out, lse), case.reference()))
    case.k_cache[poisoned] = 1000.0
    assert all(np.array_equal(a, b) for a, b in zip((out, lse), case.reference()))


def test_random_case_follows_the_test_data_rules():
    rng = np.random.default_rng(4)
    seqlens = [0, 1, 64, 65, 200]
    case = random_case(rng, 5, 2, 8, 2, seqlens, "fp16", spare_pages=5, bt_pad=2)
    assert case.q.shape == (5, 2, 8, HEAD_DIM) and case.q.dtype == np.float16
    assert case.cache_seqlens.dtype == np.int32 and case.cache_seqlens.tolist() == seqlens
    pages = [-(-n // PAGE_SIZE) for n in seqlens]
    assert case.k_cache.shape == (sum(pages) + 5, PAGE_SIZE, 2, HEAD_DIM)
    assert case.block_table.dtype == np.int32 and case.block_table.shape == (5, max(pages) + 2)
    visible = np.zeros(case.k_cache.shape[:2], dtype=bool)
    owned = []
    for i, n in enumerate(seqlens):
        mine = case.block_table[i, : pages[i]]
        assert (case.block_table[i, pages[i]:] >= 2**30).all(), "unused block-table entries must be huge"
        owned.extend(mine.tolist())
        for t in range(n):
            visible[mine[t // PAGE_SIZE], t % PAGE_SIZE] = True
    assert len(owned) == len(set(owned)), "a page is shared"
    assert sorted(owned) != list(range(len(owned))), "pages are not permuted"
    nan = np.isnan(case.k_cache.astype(np.float32)).all(axis=(2, 3))
    assert np.array_equal(nan, ~visible), "NaN must be exactly in the slots no request sees"
    values = case.k_cache[visible].astype(np.float32)
    assert np.abs(values).max() <= 1 and 0.05 < values.std() < 0.15  # randn / 10, clamped
    assert random_case(rng, 5, 2, 8, 2, seqlens, "fp16").q.tobytes() != case.q.tobytes(), "fresh data"


def test_random_case_single_length_and_bf16():
    case = random_case(np.random.default_rng(5), 3, 1, 2, 1, 64, "bf16")
    assert case.q.dtype == as_dtype("bf16") and case.cache_seqlens.tolist() == [64, 64, 64]


def reference_case():
    case = random_case(np.random.default_rng(6), 2, 2, 4, 1, [0, 300], "bf16", causal=True)
    return case.reference()


def test_check_close_accepts_the_reference_in_kernel_dtypes():
    out, lse = reference_case()
    for dtype in ("bf16", "fp16"):
        report = check_close(out.astype(as_dtype(dtype)), lse.astype(np.float32), out, lse, dtype)
        assert report["out_bad"] == 0 and report["lse_bad"] == 0
        assert report["out_cos_diff"] <= 5e-6


def test_check_close_rejects_an_element_out_of_tolerance():
    out, lse = reference_case()
    bad = out.copy()
    bad[1, 1, 2, 7] += 0.1
    with pytest.raises(AssertionError, match=r"out: 1 of .* worst at \(1, 1, 2, 7\)"):
        check_close(bad, lse, out, lse, "bf16")


def test_check_close_rejects_nan_output():
    out, lse = reference_case()
    bad = out.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(AssertionError, match="out: 1 of"):
        check_close(bad, lse, out, lse, "bf16")


def test_check_close_rejects_small_systematic_error_by_cosine():
    # Within the elementwise abs tolerance everywhere, but a 7e-4 shift of outputs of size ~0.01.
    out, lse = reference_case()
    shifted = out + np.where(out != 0, 7e-4, 0.0)
    with pytest.raises(AssertionError, match="cosine difference"):
        check_close(shifted, lse, out, lse, "bf16")


def test_check_close_rejects_wrong_inf_positions():
    out, lse = reference_case()
    assert np.isposinf(lse[0]).all()
    finite = lse.copy()
    finite[0, 0, 0] = 1.0
    with pytest.raises(AssertionError, match=r"lse: 1 elements where \+inf/-inf/NaN differ"):
        check_close(out, finite, out, lse, "bf16")
    extra_inf = lse.copy()
    extra_inf[1, 0, 1] = np.inf
    with pytest.raises(AssertionError, match="lse: 1 elements where"):
        check_close(out, extra_inf, out, lse, "bf16")


def test_check_close_lse_tolerance():
    out, lse = reference_case()
    ok = lse + np.where(np.isfinite(lse), 0.9e-6, 0.0)
    check_close(out, ok, out, lse, "bf16")
    bad = lse.copy()
    bad[1, 3, 1] *= 1 + 2 * 8 / 65536
    with pytest.raises(AssertionError, match=r"lse: 1 of .* worst at \(1, 3, 1\)"):
        check_close(out, bad, out, lse, "bf16")


def test_check_close_lse_bar_of_an_e4m3_q():
    """docs/API.md section 6: with an e4m3 q lse may be off by LSE_ATOL_E4M3_Q (FP8 tensor cores for
    QK^T), and only then; check_close takes the bar from the case."""
    from flashmla_cupy import reference

    out, _ = reference_case()
    lse = np.full(out.shape[:1] + out.shape[2:3] + out.shape[1:2], 0.01)  # near 0: the absolute bar decides
    off = lse + 0.5 * reference.LSE_ATOL_E4M3_Q
    check_close(out, off, out, lse, "bf16", reference.LSE_ATOL_E4M3_Q)
    with pytest.raises(AssertionError, match="lse"):
        check_close(out, off, out, lse, "bf16")
    rng = np.random.default_rng(3)
    e4m3 = reference.random_case(rng, 1, 1, 16, 1, np.array([5]), "e4m3", kv_dtype="e4m3")
    bf16_q = reference.random_case(rng, 1, 1, 16, 1, np.array([5]), "bf16", kv_dtype="e4m3")
    assert e4m3.lse_atol == reference.LSE_ATOL_E4M3_Q
    assert bf16_q.lse_atol == reference.LSE_ATOL
    # Case.check applies the case's own bar: one key per request, so lse is a score near 0.
    for case, passes in ((reference.random_case(rng, 2, 1, 16, 1, np.array([1, 1]), "e4m3", kv_dtype="e4m3"), True),
                         (reference.random_case(rng, 2, 1, 16, 1, np.array([1, 1]), "bf16", kv_dtype="e4m3"), False)):
        ref_out, ref_lse = case.reference()
        assert np.abs(ref_lse).max() < 1
        shifted = ref_lse + 0.5 * reference.LSE_ATOL_E4M3_Q
        if passes:
            case.check(ref_out.astype(case.dtype), shifted)
        else:
            with pytest.raises(AssertionError, match="lse"):
                case.check(ref_out.astype(case.dtype), shifted)


def test_check_close_rejects_shape_mismatch():
    out, lse = reference_case()
    with pytest.raises(AssertionError, match="shape"):
        check_close(out[:1], lse, out, lse, "bf16")


def split_into_partials(case, cuts):
    """Partial results (ARCHITECTURE.md format) of `case` with request i cut at the pages in cuts[i],
    computed by the reference on sub-ranges of keys (non-causal), plus the num_splits prefix sum."""
    batch, seqlen_q, heads_q, _ = case.q.shape
    heads_kv = case.heads_kv
    per_group = heads_q // heads_kv
    rows = seqlen_q * per_group
    pieces = []
    for i in range(batch):
        n = int(case.cache_seqlens[i])
        bounds = [0, *cuts[i], -(-n // PAGE_SIZE)]
        for a, b in zip(bounds, bounds[1:]):
            length = min(b * PAGE_SIZE, n) - a * PAGE_SIZE
            out, lse = mla_decode_reference(case.q[i:i + 1], case.k_cache, case.block_table[i:i + 1, a:b],
                                            np.array([length]), softmax_scale=case.softmax_scale)
            # [s_q, h_q, dv] -> [h_kv, rows, dv] with row = s * per_group + head_in_group.
            out_rows = out[0].reshape(seqlen_q, heads_kv, per_group, -1).transpose(1, 0, 2, 3).reshape(heads_kv, rows, -1)
            lse_rows = lse[0].reshape(heads_kv, per_group, seqlen_q).transpose(0, 2, 1).reshape(heads_kv, rows)
            pieces.append((out_rows, np.where(np.isinf(lse_rows), -np.inf, lse_rows / math.log(2))))
    num_splits = np.concatenate([[0], np.cumsum([len(c) + 1 for c in cuts])])
    return np.stack([p[0] for p in pieces]), np.stack([p[1] for p in pieces]), num_splits


def test_merge_partials_reference_recovers_the_full_attention():
    case = random_case(np.random.default_rng(7), 3, 2, 4, 2, [300, 64, 129], "bf16")
    out_partial, lse_partial, num_splits = split_into_partials(case, [[1, 3], [], [2]])
    out, lse = merge_partials_reference(out_partial, lse_partial, num_splits, 3, 2, 4, 2)
    want_out, want_lse = case.reference()
    for i in (0, 2):  # split requests
        np.testing.assert_allclose(out[i], want_out[i], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(lse[i], want_lse[i], rtol=1e-12)
    assert np.isnan(out[1]).all() and np.isnan(lse[1]).all(), "single-piece requests are left untouched"


def test_merge_partials_reference_ignores_pieces_without_keys():
    rng = np.random.default_rng(8)
    out_partial = rng.standard_normal((4, 1, 2, HEAD_DIM_V))
    lse_partial = np.array([[[1.0, -np.inf]], [[-np.inf, -np.inf]], [[3.0, -np.inf]], [[0.5, 2.0]]])
    out_partial[1] = np.nan  # a piece that saw no key may hold anything
    out_partial[0, 0, 1] = np.nan
    num_splits = np.array([0, 3, 4])
    out, lse = merge_partials_reference(out_partial, lse_partial, num_splits, 2, 1, 2, 1)
    w = np.array([2.0 ** -2, 1.0])
    np.testing.assert_allclose(out[0, 0, 0], (w[0] * out_partial[0, 0, 0] + w[1] * out_partial[2, 0, 0]) / w.sum())
    np.testing.assert_allclose(lse[0, 0, 0], (3.0 + math.log2(w.sum())) * math.log(2))
    assert (out[0, 0, 1] == 0).all() and np.isposinf(lse[0, 1, 0]), "a row no piece saw"
    assert np.isnan(out[1]).all() and np.isnan(lse[1]).all()


def test_perf_accounting_is_flashmla_s():
    """docs/API.md section 7: FLOPs 2 * s_q * total * h_q * (576 + 512); bytes: the whole KV cache once,
    q and out once, 2 bytes each. b=128, h_q=128, 4096 tokens: the peer table's first case."""
    flops, nbytes = perf_accounting(128 * 4096, 128, 1, 128, 1)
    assert flops == 2 * 128 * 4096 * 128 * 1088 == 146_028_888_064
    assert nbytes == (128 * 4096 * 576 + 128 * 128 * 576 + 128 * 128 * 512) * 2 == 639_631_360
    assert perf_accounting(10, 1, 2, 16, 2, itemsize=4) == (2 * 2 * 10 * 16 * 1088, (10 * 2 * 576 + 2 * 16 * 1088) * 4)
