"""Float64 numpy reference of MLA decode, the test-data generator, and the accuracy check.

This module is the semantics of docs/API.md sections 3 and 6 in executable form: the GPU kernels are
tested against `mla_decode_reference` with `check_close`, on data made by `random_case`. It needs no
GPU; inputs are numpy arrays (bf16 as `ml_dtypes.bfloat16`).
"""
from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

HEAD_DIM = 576     # key row: 512 latent + 64 rope values
HEAD_DIM_V = 512   # value row: the first 512 values of the key row
PAGE_SIZE = 64

# docs/API.md section 6.
OUT_ATOL = 8e-4
OUT_RTOL = 2 / 128
OUT_MAX_COS_DIFF = 5e-6
LSE_ATOL = 1e-6
LSE_RTOL = 8 / 65536
# An e4m3 q with an FP8 cache: QK^T runs on FP8 tensor cores (as in FlashMLA's FP8 kernel), which add
# the products at less than fp32 precision. Measured on the H200 (2026-11-30, 24 random cases of the
# test data): lse off by up to 2.0e-5 absolute where lse is near 0 (one or two keys); out within its bar.
LSE_ATOL_E4M3_Q = 1e-4

_DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp16": np.dtype(np.float16),
           "e4m3": np.dtype(ml_dtypes.float8_e4m3fn)}
E4M3_MAX = 448.0   # the largest finite e4m3 value


def as_dtype(dtype) -> np.dtype:
    """numpy dtype of "bf16" / "fp16" / "e4m3" or of a numpy dtype-like."""
    return _DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)


def to_float64(x) -> np.ndarray:
    """Exact float64 copy of an array (e4m3 too: every e4m3 value is a float64); bf16 goes through its
    bit pattern (ml_dtypes' cast is slow)."""
    x = np.asarray(x)
    if x.dtype == _DTYPES["bf16"]:
        x = (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float64)


def mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v: int = HEAD_DIM_V,
                         softmax_scale: float | None = None, causal: bool = False, descale_q: float | None = None,
                         descale_k: float | None = None):
    """`(out float64 [b, s_q, h_q, dv], lse float64 [b, h_q, s_q])` of MLA decode, in float64.

    FP8 (e4m3) q or k_cache are read exactly and their descales applied in float64: the scores are
    `softmax_scale * descale_q * descale_k * q.k`, the output `descale_k * softmax @ V` (None: 1).

    Reads only the cache slots visible to each request and only the block-table entries of its pages,
    so garbage (NaN, huge page numbers) anywhere else cannot reach the result. Rows that see no key
    get out = 0 and lse = +inf.
    """
    q = np.asarray(q)
    k_cache = np.asarray(k_cache)
    block_table = np.asarray(block_table)
    seqlens = np.asarray(cache_seqlens).reshape(-1)
    batch, seqlen_q, heads_q, dim = q.shape
    page_size, heads_kv = k_cache.shape[1], k_cache.shape[2]
    per_group = heads_q // heads_kv
    scale = dim ** -0.5 if softmax_scale is None else softmax_scale
    descale_q = 1.0 if descale_q is None else float(descale_q)
    descale_k = 1.0 if descale_k is None else float(descale_k)
    scale = scale * descale_q * descale_k

    out = np.zeros((batch, seqlen_q, heads_q, head_dim_v))
    lse = np.full((batch, heads_q, seqlen_q), np.inf)
    for i in range(batch):
        n = int(seqlens[i])
        if n <= 0:
            continue
        pages = block_table[i, : -(-n // page_size)]
        keys = to_float64(k_cache[pages].reshape(-1, heads_kv, dim)[:n])  # [n, h_kv, d]
        # Keys visible to query token s: t < limit[s] (bottom-right aligned causal mask).
        limit = n - (seqlen_q - 1 - np.arange(seqlen_q)) if causal else np.full(seqlen_q, n)
        hidden = np.arange(n)[None, :] >= limit[:, None]  # [s_q, n]
        for g in range(heads_kv):
            heads = slice(g * per_group, (g + 1) * per_group)
            qg = to_float64(q[i, :, heads, :])                               # [s_q, hpg, d]
            scores = (qg.reshape(-1, dim) @ keys[:, g, :].T).reshape(seqlen_q, per_group, n) * scale
            if causal:
                scores[np.broadcast_to(hidden[:, None, :], scores.shape)] = -np.inf
            row_max = scores.max(axis=-1, keepdims=True)
            # A fully masked row has max -inf: shift by 0 instead, so its probabilities are exp(-inf) = 0.
            probs = np.exp(scores - np.where(np.isfinite(row_max), row_max, 0.0))
            row_sum = probs.sum(axis=-1)                                    # [s_q, hpg]
            seen = row_sum > 0
            values = probs @ keys[:, g, :head_dim_v]                         # [s_q, hpg, dv]
            out[i, :, heads, :] = descale_k * values / np.where(seen, row_sum, 1.0)[..., None]
            lse[i, heads, :] = np.where(seen, row_max[..., 0] + np.log(np.where(seen, row_sum, 1.0)), np.inf).T
    return out, lse


@dataclasses.dataclass
class Case:
    """One decode problem as numpy arrays, in FlashMLA's layout."""
    q: np.ndarray               # [b, s_q, h_q, 576], dtype
    k_cache: np.ndarray         # [num_blocks, 64, h_kv, 576], dtype; NaN in every slot no request sees
    block_table: np.ndarray     # [b, max_blocks], int32; huge values past each request's last page
    cache_seqlens: np.ndarray   # [b], int32
    causal: bool
    softmax_scale: float | None
    head_dim_v: int = HEAD_DIM_V
    descale_q: np.float32 | None = None   # FP8 data: the real values are the stored ones times these
    descale_k: np.float32 | None = None

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the output: q's, bf16 for an e4m3 q."""
        return _DTYPES["bf16"] if self.q.dtype == _DTYPES["e4m3"] else self.q.dtype

    @property
    def lse_atol(self) -> float:
        """The absolute lse bar of check_close for this case: LSE_ATOL_E4M3_Q for an e4m3 q, else LSE_ATOL."""
        return LSE_ATOL_E4M3_Q if self.q.dtype == _DTYPES["e4m3"] else LSE_ATOL

    def check(self, out, lse, reference=None) -> dict:
        """check_close of a kernel's `(out, lse)` for this case, with the case's own bars (its output
        dtype, its lse_atol), against `reference` (this case's `(out, lse)` computed already) or a fresh one."""
        ref_out, ref_lse = reference if reference is not None else self.reference()
        return check_close(out, lse, ref_out, ref_lse, self.dtype, self.lse_atol)

    @property
    def fp8(self) -> bool:
        """The cache is e4m3."""
        return self.k_cache.dtype == _DTYPES["e4m3"]

    @property
    def heads_kv(self) -> int:
        return self.k_cache.shape[2]

    def reference(self):
        """`mla_decode_reference` of this case."""
        return mla_decode_reference(self.q, self.k_cache, self.block_table, self.cache_seqlens,
                                    self.head_dim_v, self.softmax_scale, self.causal, self.descale_q, self.descale_k)


def perf_accounting(total_seqlen: int, batch: int, seqlen_q: int, heads_q: int, heads_kv: int,
                    itemsize: int = 2) -> tuple[int, int]:
    """(FLOPs, bytes) of one decode step as docs/API.md section 7 counts them (FlashMLA's accounting), so
    that TFLOPS and GB/s compare with the peers'. `total_seqlen`: cached tokens over the batch."""
    flops = seqlen_q * total_seqlen * heads_q * (HEAD_DIM + HEAD_DIM_V) * 2
    nbytes = (total_seqlen * heads_kv * HEAD_DIM + batch * seqlen_q * heads_q * (HEAD_DIM + HEAD_DIM_V)) * itemsize
    return flops, nbytes


def _random_values(rng: np.random.Generator, shape, dtype: np.dtype, descale: float = 1.0) -> np.ndarray:
    """randn / 10 clamped to [-1, 1], divided by `descale` and rounded to dtype (an FP8 tensor's real values
    are the stored ones times its descale); drawn in slabs to bound float32 temporaries."""
    out = np.empty(shape, dtype)
    flat = out.reshape(shape[0], -1)
    slab = max(1, (1 << 24) // max(1, flat.shape[1]))
    for begin in range(0, shape[0], slab):
        x = rng.standard_normal(flat[begin:begin + slab].shape, dtype=np.float32) / 10
        flat[begin:begin + slab] = (np.clip(x, -1, 1) / np.float32(descale)).astype(dtype)
    return out


def fp8_descale(rng: np.random.Generator) -> np.float32:
    """A per-tensor descale for data in [-1, 1]: the stored e4m3 values then reach 224 .. 448."""
    return np.float32(rng.uniform(1.0, 2.0) / E4M3_MAX)


def random_case(rng: np.random.Generator, batch: int, seqlen_q: int, heads_q: int, heads_kv: int,
                seqlens, dtype, causal: bool = False, softmax_scale: float | None = None,
                spare_pages: int = 4, bt_pad: int = 2, kv_dtype=None, descales: bool = True) -> Case:
    """A fresh random case following docs/API.md's test-data rules (section 6).

    `dtype` is q's ("bf16", "fp16", or "e4m3" with an e4m3 cache); `kv_dtype` the cache's when it is not
    q's ("e4m3"). FP8 tensors get random descales (`descales=False`: none, i.e. 1) and hold randn/10
    divided by their descale, rounded to e4m3.

    `seqlens` is one length for all requests or one per request. Pages are handed out from a random
    permutation of `num_blocks = pages used + spare_pages`; every slot not visible to its request (the
    tail of each last page, every unused page) is NaN; block-table entries past each request's last
    page (including `bt_pad` extra columns) hold huge page numbers that would fault if read.
    """
    dtype = as_dtype(dtype)
    kv_dtype = dtype if kv_dtype is None else as_dtype(kv_dtype)
    e4m3 = _DTYPES["e4m3"]
    descale_q = fp8_descale(rng) if dtype == e4m3 and descales else None
    descale_k = fp8_descale(rng) if kv_dtype == e4m3 and descales else None
    seqlens = np.broadcast_to(np.asarray(seqlens, dtype=np.int64), (batch,)).astype(np.int32)
    pages = -(-np.maximum(seqlens, 0) // PAGE_SIZE)
    num_blocks = max(1, int(pages.sum()) + spare_pages)

    q = _random_values(rng, (batch, seqlen_q, heads_q, HEAD_DIM), dtype, descale_q or 1.0)
    k_cache = _random_values(rng, (num_blocks, PAGE_SIZE, heads_kv, HEAD_DIM), kv_dtype, descale_k or 1.0)

    max_blocks = max(1, int(pages.max(initial=0))) + bt_pad
    block_table = rng.integers(2**30, 2**31 - 1, size=(batch, max_blocks), dtype=np.int64).astype(np.int32)
    order = rng.permutation(num_blocks)
    used = np.zeros(num_blocks, dtype=bool)
    start = 0
    for i in range(batch):
        mine = order[start:start + pages[i]]
        start += pages[i]
        block_table[i, : pages[i]] = mine
        used[mine] = True
        tail = int(seqlens[i]) % PAGE_SIZE
        if tail:
            k_cache[mine[-1], tail:] = np.nan
    k_cache[~used] = np.nan   # e4m3: 0x7F
    return Case(q, k_cache, block_table, seqlens, causal, softmax_scale, descale_q=descale_q, descale_k=descale_k)


def _worst(bad: np.ndarray, err: np.ndarray) -> tuple[int, ...] | None:
    """Index of the largest error among the flagged elements (None when nothing is flagged)."""
    if not bad.any():
        return None
    flat = np.where(bad.reshape(-1), np.nan_to_num(err.reshape(-1), nan=np.inf), -1.0)
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(flat)), bad.shape))


def check_close(out, lse, ref_out, ref_lse, dtype, lse_atol: float = LSE_ATOL) -> dict:
    """docs/API.md section 6: compare a kernel's `(out, lse)` with the float64 reference.

    out: every element within OUT_ATOL or OUT_RTOL (relative) of the reference rounded to `dtype`,
    and the cosine difference `1 - 2 sum(xy) / sum(x^2 + y^2)` against the float64 reference at most
    OUT_MAX_COS_DIFF (`dtype`: the output's). lse: every finite element within `lse_atol` (LSE_ATOL;
    Case.lse_atol gives an e4m3 q's) or LSE_RTOL, and +inf / -inf / NaN exactly where the reference
    has them. Returns the worst errors; raises AssertionError naming every violated rule, the number of
    bad elements and the worst one.
    """
    out = to_float64(out)
    lse = to_float64(lse)
    ref_out = np.asarray(ref_out, dtype=np.float64)
    ref_lse = np.asarray(ref_lse, dtype=np.float64)
    if out.shape != ref_out.shape or lse.shape != ref_lse.shape:
        raise AssertionError(f"shape mismatch: out {out.shape} vs {ref_out.shape}, lse {lse.shape} vs {ref_lse.shape}")
    failures = []

    target = ref_out.astype(as_dtype(dtype)).astype(np.float64)
    out_err = np.abs(out - target)
    out_rel = np.where(target != 0, out_err / np.where(target != 0, np.abs(target), 1.0), 0.0)
    out_bad = ~((out_err <= OUT_ATOL) | (out_err <= OUT_RTOL * np.abs(target)))  # NaN counts as bad
    if out_bad.any():
        at = _worst(out_bad, out_err)
        failures.append(
            f"out: {int(out_bad.sum())} of {out.size} elements outside abs {OUT_ATOL:g} / rel {OUT_RTOL:g}; "
            f"worst at {at}: got {out[at]!r}, reference {ref_out[at]!r} (as {as_dtype(dtype)}: {target[at]!r})")
    denom = float(np.sum(out * out + ref_out * ref_out))
    cos_diff = 1.0 - 2.0 * float(np.sum(out * ref_out)) / denom if denom > 0 else 0.0
    if not cos_diff <= OUT_MAX_COS_DIFF:  # written so that NaN fails
        failures.append(f"out: cosine difference {cos_diff:.3e} > {OUT_MAX_COS_DIFF:g}")

    same_class = ((np.isnan(lse) == np.isnan(ref_lse)) & (np.isposinf(lse) == np.isposinf(ref_lse))
                  & (np.isneginf(lse) == np.isneginf(ref_lse)))
    if not same_class.all():
        at = _worst(~same_class, np.ones_like(lse))
        failures.append(f"lse: {int((~same_class).sum())} elements where +inf/-inf/NaN differ from the "
                        f"reference; first at {at}: got {lse[at]!r}, reference {ref_lse[at]!r}")
    finite = np.isfinite(ref_lse) & same_class
    lse_ref_finite = np.where(finite, ref_lse, 0.0)
    lse_err = np.abs(np.where(finite, lse, 0.0) - lse_ref_finite)  # inf - inf would warn
    lse_rel = lse_err / np.maximum(np.abs(lse_ref_finite), np.finfo(np.float64).tiny)
    lse_bad = finite & ~((lse_err <= lse_atol) | (lse_err <= LSE_RTOL * np.abs(lse_ref_finite)))
    if lse_bad.any():
        at = _worst(lse_bad, lse_err)
        failures.append(f"lse: {int(lse_bad.sum())} of {lse.size} elements outside abs {lse_atol:g} / rel "
                        f"{LSE_RTOL:g}; worst at {at}: got {lse[at]!r}, reference {ref_lse[at]!r}")

    # How much of the allowed error the worst element uses (<= 1 passes): the one figure that reads
    # the same for large and tiny values (max_rel is dominated by references next to zero).
    out_used = out_err / np.maximum(OUT_ATOL, OUT_RTOL * np.abs(target))
    lse_used = lse_err / np.maximum(lse_atol, LSE_RTOL * np.abs(lse_ref_finite))
    report = {
        "out_tolerance_used": float(np.max(np.nan_to_num(out_used, nan=np.inf), initial=0.0)),
        "lse_tolerance_used": float(np.max(lse_used, initial=0.0)),
        "out_max_abs": float(np.max(out_err, initial=0.0)),
        "out_max_rel": float(np.max(out_rel, initial=0.0)),
        "out_bad": int(out_bad.sum()),
        "out_cos_diff": cos_diff,
        "lse_max_abs": float(np.max(lse_err, initial=0.0)),
        "lse_max_rel": float(np.max(lse_rel, initial=0.0)),
        "lse_bad": int(lse_bad.sum()) + int((~same_class).sum()),
    }
    if failures:
        raise AssertionError("; ".join(failures) + f" (summary: {report})")
    return report


def merge_partials_reference(out_partial, lse_partial, num_splits, batch: int, seqlen_q: int,
                             heads_q: int, heads_kv: int):
    """Float64 twin of the combine kernel (kernels_src/combine.cu).

    `out_partial` [slots, h_kv, rows, 512] and `lse_partial` [slots, h_kv, rows] (log2 domain, -inf
    where a piece saw no key) in the format of docs/ARCHITECTURE.md. Returns `(out float64 [b, s_q,
    h_q, 512], lse float64 [b, h_q, s_q])` for the requests with several pieces; the rows of requests
    with one piece are NaN, as the kernel leaves them untouched. A piece of weight 0 is ignored even
    if its partial row is NaN; a row no piece saw gets out = 0, lse = +inf.
    """
    out_partial = np.asarray(out_partial, dtype=np.float64)
    lse_partial = np.asarray(lse_partial, dtype=np.float64)
    num_splits = np.asarray(num_splits).reshape(-1)
    per_group = heads_q // heads_kv
    dv = out_partial.shape[-1]
    out = np.full((batch, seqlen_q, heads_q, dv), np.nan)
    lse = np.full((batch, heads_q, seqlen_q), np.nan)
    for i in range(batch):
        lo, hi = int(num_splits[i]), int(num_splits[i + 1])
        if hi - lo <= 1:
            continue
        pieces_lse = lse_partial[lo:hi]                                     # [n, h_kv, rows]
        top = pieces_lse.max(axis=0)
        weight = np.exp2(pieces_lse - np.where(np.isfinite(top), top, 0.0))  # 0 for -inf pieces
        total = weight.sum(axis=0)
        values = np.where(weight[..., None] > 0, out_partial[lo:hi], 0.0)
        merged = (weight[..., None] * values).sum(axis=0) / np.where(total > 0, total, 1.0)[..., None]
        merged_lse = np.where(total > 0, (top + np.log2(np.where(total > 0, total, 1.0))) * math.log(2), np.inf)
        # Row r = s * per_group + head_in_group of KV head g is query head g * per_group + head_in_group.
        out[i] = merged.reshape(heads_kv, seqlen_q, per_group, dv).transpose(1, 0, 2, 3).reshape(seqlen_q, heads_q, dv)
        lse[i] = merged_lse.reshape(heads_kv, seqlen_q, per_group).transpose(0, 2, 1).reshape(heads_q, seqlen_q)
    return out, lse
