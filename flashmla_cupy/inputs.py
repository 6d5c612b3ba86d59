"""Frozen descriptions of a checked call, built from tensor views; every shape/dtype/stride/device rule.

Each check collects every violated rule and raises one InvalidInputError listing them all, so a
caller fixes a bad call in one round. Nothing here touches the GPU: the compute-capability check
needs the device and lives in api.py.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

from .errors import InvalidInputError, Violation
from .params import METADATA_FIELDS
from .plan import PAGE_SIZE
from .tensors import DEVICE_CUDA, View, contiguous_strides

HEAD_DIM = 576     # d: 512 latent + 64 rope values per key row
HEAD_DIM_V = 512   # dv: the value is the first dv values of the key row
TMA_ALIGN = 16     # bytes: TMA needs a 16-byte aligned base and 16-byte multiple strides
VECTOR_ALIGN = 16  # bytes: q rows are read with 16-byte loads
ADDRESS_ALIGN = math.lcm(TMA_ALIGN, VECTOR_ALIGN)  # every address rule reads ptr % this only (lookup.py)
# The combine grid puts (kv head, row) warps on grid.y (at most 65535 blocks of 4 warps).
MAX_QUERY_ROWS = 4 * 65535

DTYPE_NAMES = {np.dtype(ml_dtypes.bfloat16): "bf16", np.dtype(np.float16): "fp16"}
INT32 = np.dtype(np.int32)
FLOAT32 = np.dtype(np.float32)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
UINT8 = np.dtype(np.uint8)
# kv_dtype= values: how to read a uint8 k_cache (and q) that a producer could not export as FP8.
KV_DTYPES = {"fp8_e4m3": E4M3}


def out_dtype_of(q_dtype: np.dtype | None) -> np.dtype | None:
    """The dtype of `out` for a q read as `q_dtype`: q's own, bf16 for an e4m3 q (the FP8 forks'
    output); None for a dtype q may not have."""
    return q_dtype if q_dtype in DTYPE_NAMES else np.dtype(ml_dtypes.bfloat16) if q_dtype == E4M3 else None


@dataclass(frozen=True)
class MetadataProblem:
    """A checked `get_mla_metadata` call."""

    batch: int
    rows: int            # num_q_tokens_per_head_k = s_q * h_q // h_kv
    heads_kv: int        # num_heads_k
    device_id: int


@dataclass(frozen=True)
class DecodeProblem:
    """A checked `flash_mla_with_kvcache` call."""

    batch: int
    seqlen_q: int
    heads_q: int
    heads_kv: int
    heads_per_group: int       # h_q // h_kv query heads share one KV head
    rows: int                  # query rows per KV head: seqlen_q * heads_per_group
    dtype_name: str            # "bf16" | "fp16": the dtype of out (an e4m3 q computes in fp16, writes bf16)
    causal: bool               # False when seqlen_q == 1: the mask changes nothing then
    softmax_scale: float
    num_parts: int             # rows of tile_scheduler_metadata
    device_id: int
    q: View
    k_cache: View
    block_table: View
    out: View | None = None    # caller-provided outputs (out=, lse=), else allocated per call
    lse: View | None = None
    q_dtype_name: str = ""     # "bf16" | "fp16" | "e4m3" (q as stored; "" means dtype_name)
    kv_name: str | None = None   # "e4m3" for an FP8 cache, None for a cache of q's 16-bit type
    descale_q: View | None = None   # float32 [1] device descales of an FP8 call (None: 1)
    descale_k: View | None = None

    @property
    def out_dtype(self) -> np.dtype:
        """The dtype of `out`: q's, or bf16 for an e4m3 q."""
        return np.dtype(ml_dtypes.bfloat16) if self.dtype_name == "bf16" else np.dtype(np.float16)

    @property
    def descales(self) -> tuple[str, ...]:
        """The names of the descales given, in argument order (their pointers follow the six inputs)."""
        return tuple(n for n, v in (("descale_q", self.descale_q), ("descale_k", self.descale_k)) if v is not None)

    @property
    def scale_log2(self) -> float:
        """softmax_scale * log2(e): the kernels exponentiate with exp2."""
        return self.softmax_scale * math.log2(math.e)


class _Rules:
    """Collects violations; `raise_if_any` turns them into one error.

    It starts with the violations of arguments that could not even be viewed (`failed`); their views
    are None and every rule about them is skipped, so the error still lists all the others."""

    def __init__(self, function: str, failed: tuple[Violation, ...] = ()):
        self.function = function
        self.violations: list[Violation] = list(failed)

    def add(self, argument: str, seen: Any, expected: str, fix: str) -> None:
        self.violations.append(Violation(argument, str(seen), expected, fix))

    def raise_if_any(self) -> None:
        if self.violations:
            raise InvalidInputError(self.function, self.violations)

    def on_cuda(self, views: dict[str, View]) -> int | None:
        """Every view on one CUDA device; returns that device id (None if there is none)."""
        device_id = None
        first = None
        for name, view in views.items():
            if view is None:
                continue
            if view.device_type != DEVICE_CUDA:
                self.add(f"{name}.device", view.device, "a CUDA device array",
                         f"move {name} to the GPU (torch: .cuda(), JAX: jax.device_put, cupy.asarray)")
            elif device_id is None:
                device_id, first = view.device_id, name
            elif view.device_id != device_id:
                self.add(f"{name}.device", view.device, f"cuda:{device_id}, the device of {first}",
                         "put every input on the same GPU")
        return device_id

    def rank(self, name: str, view: View, ndim: int, layout: str) -> bool:
        if view.ndim != ndim:
            self.add(f"{name}.shape", list(view.shape), f"a {ndim}-D array {layout}",
                     f"reshape {name} to {layout}")
            return False
        return True

    def dtype(self, name: str, view: View, allowed: tuple[np.dtype, ...], fix: str) -> bool:
        if view.dtype not in allowed:
            names = " or ".join(d.name for d in allowed)
            self.add(f"{name}.dtype", view.dtype.name, names, fix)
            return False
        return True

    def dim(self, name: str, view: View, axis: int, expected: int, meaning: str, fix: str) -> bool:
        if view.shape[axis] != expected:
            self.add(f"{name}.shape[{axis}]", view.shape[axis], f"{expected} ({meaning})", fix)
            return False
        return True

    def contiguous(self, name: str, view: View, axes: range, fix: str | None = None) -> None:
        """Unit stride on the innermost axes (size-1 axes may have any stride, as DLPack allows)."""
        expected = contiguous_strides(view.shape)
        bad = [a for a in axes if view.shape[a] > 1 and view.strides[a] != expected[a]]
        if bad:
            what = "last dim contiguous (stride 1)" if list(axes) == [view.ndim - 1] else \
                f"contiguous strides {list(expected)}"
            self.add(f"{name}.strides", list(view.strides), what,
                     fix or f"pass {name}.contiguous() (torch) / jnp.asarray / cupy.ascontiguousarray")

    def non_negative_strides(self, name: str, view: View) -> None:
        if any(s < 0 for s in view.strides):
            self.add(f"{name}.strides", list(view.strides), "non-negative strides",
                     f"make a non-reversed copy of {name}")

    def aligned(self, name: str, view: View, align: int, strides_why: str, address_why: str,
                strides_fix: str) -> None:
        """Outer byte strides that are multiples of `align` and an `align`-byte aligned address."""
        byte_strides = [s * view.dtype.itemsize for s in view.strides[:-1]]
        if any(b % align for b in byte_strides):
            self.add(f"{name}.strides", f"{list(view.strides)} elements ({byte_strides} bytes for the outer dims)",
                     f"outer byte strides that are multiples of {align} ({strides_why})", strides_fix)
        if view.ptr % align:
            self.add(f"{name}.data_ptr", hex(view.ptr), f"a {align}-byte aligned address ({address_why})",
                     f"do not slice {name} at an offset that breaks {align}-byte alignment")


def _as_int(value: Any) -> int | None:
    """`value` as an int if it is an integer (not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_seqlens(rules: _Rules, view: View | None, batch: int | None) -> None:
    """cache_seqlens: int32 [b] contiguous; b must match `batch` when known."""
    if view is None:
        return
    rank_ok = rules.rank("cache_seqlens", view, 1, "[batch]")
    rules.dtype("cache_seqlens", view, (INT32,), "convert cache_seqlens to int32 (torch: .int())")
    if not rank_ok:
        return
    if batch is None and view.shape[0] < 1:
        rules.add("cache_seqlens.shape[0]", view.shape[0], "a batch of at least 1 request",
                  "skip the call when there is nothing to decode")
    if batch is not None:
        rules.dim("cache_seqlens", view, 0, batch, "batch, q.shape[0]",
                  "pass one cached length per request")
    rules.contiguous("cache_seqlens", view, range(1))


def check_metadata_args(cache_seqlens: View | None, num_q_tokens_per_head_k: Any, num_heads_k: Any,
                        is_fp8_kvcache: Any = False, failed: tuple[Violation, ...] = ()) -> MetadataProblem:
    """Check a `get_mla_metadata` call; raises InvalidInputError listing every violated rule and the
    `failed` ones (arguments that could not be viewed, whose views are None)."""
    rules = _Rules("get_mla_metadata", failed)
    device_id = rules.on_cuda({"cache_seqlens": cache_seqlens})
    _check_seqlens(rules, cache_seqlens, None)
    rows = _as_int(num_q_tokens_per_head_k)
    if rows is None or rows < 1:
        rules.add("num_q_tokens_per_head_k", repr(num_q_tokens_per_head_k), "an int >= 1",
                  "pass s_q * h_q // h_kv")
    heads_kv = _as_int(num_heads_k)
    if heads_kv is None or heads_kv < 1:
        rules.add("num_heads_k", repr(num_heads_k), "an int >= 1", "pass h_kv, k_cache.shape[2]")
    if not isinstance(is_fp8_kvcache, (bool, np.bool_)):
        rules.add("is_fp8_kvcache", repr(is_fp8_kvcache), "a bool", "pass True for an FP8 (e4m3) k_cache")
    rules.raise_if_any()
    return MetadataProblem(batch=cache_seqlens.shape[0], rows=rows, heads_kv=heads_kv, device_id=device_id)


def _check_q(rules: _Rules, q: View | None, q_dtype: np.dtype | None) -> bool:
    """q: [b, s_q, h_q, 576] bf16/fp16 (or e4m3, `q_dtype`: its dtype as read), last dim contiguous.
    True when its shape can be used."""
    if q is None:
        return False
    layout = f"[batch, seqlen_q, heads_q, {HEAD_DIM}]"
    if q_dtype not in (*DTYPE_NAMES, E4M3) and q.dtype != UINT8:   # (uint8 was reported by _as_read)
        rules.add("q.dtype", q.dtype.name, "bfloat16 or float16 (or float8_e4m3fn with an FP8 k_cache)",
                  "cast q to bfloat16 or float16")
    if not rules.rank("q", q, 4, layout):
        return False
    usable = rules.dim("q", q, 3, HEAD_DIM, "d = 512 latent + 64 rope",
                       "pass the full 576-wide query, latent part first")
    for axis, meaning in ((0, "batch"), (1, "seqlen_q"), (2, "heads_q")):
        if q.shape[axis] < 1:
            rules.add(f"q.shape[{axis}]", q.shape[axis], f"{meaning} >= 1",
                      "skip the call when there is nothing to decode")
            usable = False
    rules.contiguous("q", q, range(3, 4))
    rules.non_negative_strides("q", q)
    # The kernel reads query rows with 16-byte vector loads.
    rules.aligned("q", q, VECTOR_ALIGN, "16-byte row loads", "16-byte row loads",
                  "pass a contiguous q, or slice it so that rows start on 8-element boundaries")
    if usable and q.shape[1] * q.shape[2] > MAX_QUERY_ROWS:
        rules.add("q.shape", list(q.shape), f"seqlen_q * heads_q <= {MAX_QUERY_ROWS}",
                  "split the call along seqlen_q")
        usable = False
    return usable


def _check_k_cache(rules: _Rules, k: View | None, k_dtype: np.dtype | None, q: View | None,
                   q_dtype: np.dtype | None, q_ok: bool) -> None:
    """k_cache: [num_blocks, 64, h_kv, 576], q's dtype or e4m3 (`k_dtype`: its dtype as read), TMA-compatible
    layout. An e4m3 q needs an e4m3 cache."""
    if k is None:
        return
    layout = f"[num_blocks, {PAGE_SIZE}, heads_kv, {HEAD_DIM}]"
    if k_dtype is None and k.dtype == UINT8:
        pass   # reported by _as_read
    elif q_dtype == E4M3:
        if k_dtype != E4M3:
            rules.add("k_cache.dtype", k.dtype.name, "float8_e4m3fn, as q is",
                      "store the cache in float8_e4m3fn, or pass a 16-bit q")
    elif q_dtype in DTYPE_NAMES:
        if k_dtype not in (q_dtype, E4M3):
            rules.add("k_cache.dtype", k.dtype.name, f"{q_dtype.name} (the dtype of q) or float8_e4m3fn",
                      f"cast k_cache to {q_dtype.name}, or store it in float8_e4m3fn")
    elif k_dtype not in (*DTYPE_NAMES, E4M3):
        rules.add("k_cache.dtype", k.dtype.name, "bfloat16, float16 or float8_e4m3fn",
                  "cast k_cache to bfloat16 or float16")
    if not rules.rank("k_cache", k, 4, layout):
        return
    rules.dim("k_cache", k, 1, PAGE_SIZE, "page_size", f"store the cache in pages of {PAGE_SIZE} tokens")
    rules.dim("k_cache", k, 3, HEAD_DIM, "d = 512 latent + 64 rope",
              "store the full 576-wide key rows (V is their first 512 values)")
    if k.shape[0] < 1:
        rules.add("k_cache.shape[0]", k.shape[0], "num_blocks >= 1", "allocate at least one page")
    heads_kv = k.shape[2]
    if heads_kv < 1:
        rules.add("k_cache.shape[2]", heads_kv, "heads_kv >= 1", "store at least one KV head")
    elif q_ok and q.shape[2] % heads_kv:
        rules.add("q.shape[2]", q.shape[2], f"a multiple of heads_kv = k_cache.shape[2] = {heads_kv}",
                  "use a query head count divisible by the KV head count")
    rules.contiguous("k_cache", k, range(3, 4))
    rules.non_negative_strides("k_cache", k)
    rules.aligned("k_cache", k, TMA_ALIGN, "the kernel reads k_cache through a TMA descriptor", "TMA",
                  "pass a contiguous k_cache, or pad rows to a multiple of 8 elements")


def _as_read(rules: _Rules, name: str, view: View | None, kv_dtype: Any) -> np.dtype | None:
    """The dtype `view` is read as: its own, or e4m3 for a uint8 view when kv_dtype="fp8_e4m3"."""
    if view is None:
        return None
    if view.dtype != UINT8:
        return view.dtype
    if isinstance(kv_dtype, str) and kv_dtype in KV_DTYPES:
        return KV_DTYPES[kv_dtype]
    if kv_dtype is None:   # (a bad kv_dtype is reported by _check_fp8)
        rules.add(f"{name}.dtype", "uint8", "a floating type, or uint8 with kv_dtype=\"fp8_e4m3\"",
                  f"pass kv_dtype=\"fp8_e4m3\" if {name} holds e4m3 bytes")
    return None   # reported: the dtype rules skip it


def _check_fp8(rules: _Rules, q: View | None, q_dtype: np.dtype | None, k: View | None,
               k_dtype: np.dtype | None, kv_dtype: Any, descale_q: View | None, descale_k: View | None) -> None:
    """kv_dtype only names e4m3 for uint8 views; descale_q only with an e4m3 q, descale_k only with an e4m3
    cache, each float32 [1]."""
    if kv_dtype is not None:
        if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
            rules.add("kv_dtype", repr(kv_dtype), f"None or one of {sorted(KV_DTYPES)}",
                      "pass kv_dtype=\"fp8_e4m3\" with a uint8 view of an e4m3 cache, or leave it out")
        elif k is not None and k.dtype not in (UINT8, E4M3):
            rules.add("kv_dtype", repr(kv_dtype), f"only with a uint8 (or float8_e4m3fn) k_cache, not {k.dtype.name}",
                      "leave kv_dtype out for a 16-bit cache")
    for name, view, fp8, owner in (("descale_q", descale_q, q_dtype == E4M3, "q"),
                                   ("descale_k", descale_k, k_dtype == E4M3, "k_cache")):
        if view is None:
            continue
        if not fp8:
            rules.add(name, f"a descale for a {owner} that is not float8_e4m3fn",
                      f"None unless {owner} is float8_e4m3fn",
                      f"drop {name}: only FP8 data has a descale" + (
                          " (a 16-bit q with an FP8 cache takes descale_k alone)" if owner == "q" else ""))
        if view.shape not in ((1,), ()):
            rules.add(f"{name}.shape", list(view.shape), "[1] (one per-tensor descale)", f"pass {name} of shape [1]")
        rules.dtype(name, view, (FLOAT32,), f"pass {name} as float32")
        if view.ptr % FLOAT32.itemsize:
            rules.add(f"{name}.data_ptr", hex(view.ptr), "a 4-byte aligned address", f"pass {name} on its own")


def _check_block_table(rules: _Rules, table: View | None, batch: int | None) -> None:
    """block_table: int32 [b, max_blocks], unit last-dim stride, row stride >= width."""
    if table is None:
        return
    rank_ok = rules.rank("block_table", table, 2, "[batch, max_blocks_per_seq]")
    rules.dtype("block_table", table, (INT32,), "convert block_table to int32 (torch: .int())")
    if not rank_ok:
        return
    if batch is not None:
        rules.dim("block_table", table, 0, batch, "batch, q.shape[0]", "pass one row per request")
    if table.shape[1] < 1:
        rules.add("block_table.shape[1]", table.shape[1], "max_blocks_per_seq >= 1",
                  "give every request room for at least one page")
    rules.contiguous("block_table", table, range(1, 2))
    if table.shape[0] > 1 and table.strides[0] < table.shape[1]:
        rules.add("block_table.strides[0]", table.strides[0],
                  f"a row stride >= the row width {table.shape[1]}",
                  "pass block_table.contiguous()")


def _check_plan(rules: _Rules, metadata: View | None, num_splits: View | None, batch: int | None) -> None:
    """The work plan from get_mla_metadata: metadata int32 [P >= 1, 8], num_splits int32 [b + 1]."""
    fix = "pass the tile_scheduler_metadata, num_splits that get_mla_metadata returned for this batch"
    if metadata is not None:
        _check_metadata(rules, metadata, fix)
    if num_splits is not None:
        _check_num_splits(rules, num_splits, batch, fix)


def _check_metadata(rules: _Rules, metadata: View, fix: str) -> None:
    if rules.rank("tile_scheduler_metadata", metadata, 2, f"[num_parts, {METADATA_FIELDS}]"):
        rules.dim("tile_scheduler_metadata", metadata, 1, METADATA_FIELDS, "fields per part", fix)
        if metadata.shape[0] < 1:
            rules.add("tile_scheduler_metadata.shape[0]", metadata.shape[0], "num_parts >= 1", fix)
        rules.contiguous("tile_scheduler_metadata", metadata, range(2))
    rules.dtype("tile_scheduler_metadata", metadata, (INT32,), fix)


def _check_num_splits(rules: _Rules, num_splits: View, batch: int | None, fix: str) -> None:
    if rules.rank("num_splits", num_splits, 1, "[batch + 1]"):
        if batch is not None:
            rules.dim("num_splits", num_splits, 0, batch + 1, "batch + 1", fix)
        rules.contiguous("num_splits", num_splits, range(1))
    rules.dtype("num_splits", num_splits, (INT32,), fix)


def _check_output(rules: _Rules, name: str, view: View, shape: tuple | None, dtype: np.dtype | None,
                  layout: str, align: int) -> None:
    """A caller-provided output: writable, the exact shape and dtype, C-contiguous (the kernels write
    it with fixed strides), `align`-byte aligned. `shape`/`dtype` are None when q is too broken to tell."""
    if view.framework == "jax":
        rules.add(name, "a JAX array", "a writable CUDA array (torch, CuPy)",
                  f"JAX arrays are immutable: leave {name}= out and use the returned array (under jax.jit XLA "
                  "reuses buffers itself)")
        return
    if shape is not None and view.shape != shape:
        rules.add(f"{name}.shape", list(view.shape), f"{list(shape)}, i.e. {layout}", f"allocate {name} as {layout}")
    elif shape is not None:
        # A contiguous copy would take the results instead of the caller's buffer.
        rules.contiguous(name, view, range(view.ndim), f"allocate {name} contiguous (torch.empty, cupy.empty)")
    if dtype is not None:
        rules.dtype(name, view, (dtype,), f"allocate {name} as {dtype.name}")
    if view.ptr % align:
        rules.add(f"{name}.data_ptr", hex(view.ptr), f"a {align}-byte aligned address (the kernels' stores)",
                  f"allocate {name} on its own, or slice it at {align}-byte boundaries")


def _check_outputs(rules: _Rules, out: View | None, lse: View | None, q: View | None, q_dtype: np.dtype | None,
                   q_ok: bool) -> None:
    """out: [b, s_q, h_q, 512] in q's dtype (bf16 for an e4m3 q); lse: float32 [b, h_q, s_q]; both
    C-contiguous. An output that could not be viewed (None) was reported already."""
    b, s_q, h_q = q.shape[:3] if q_ok else (None, None, None)
    out_dtype = out_dtype_of(q_dtype)
    if out is not None:
        _check_output(rules, "out", out, (b, s_q, h_q, HEAD_DIM_V) if q_ok else None, out_dtype,
                      f"[batch, seqlen_q, heads_q, {HEAD_DIM_V}]", VECTOR_ALIGN)
    if lse is not None:
        _check_output(rules, "lse", lse, (b, h_q, s_q) if q_ok else None, np.dtype(np.float32),
                      "[batch, heads_q, seqlen_q]", np.dtype(np.float32).itemsize)


def _check_scalars(rules: _Rules, head_dim_v: Any, softmax_scale: Any, causal: Any, check: Any) -> None:
    if _as_int(head_dim_v) != HEAD_DIM_V:
        rules.add("head_dim_v", repr(head_dim_v), f"{HEAD_DIM_V} (MLA's dv)", f"pass {HEAD_DIM_V}")
    if softmax_scale is not None:
        real = isinstance(softmax_scale, (int, float, np.integer, np.floating)) and \
            not isinstance(softmax_scale, (bool, np.bool_))
        if not real or not math.isfinite(softmax_scale) or softmax_scale <= 0:
            rules.add("softmax_scale", repr(softmax_scale), "None or a finite float > 0",
                      f"omit it for the default {HEAD_DIM} ** -0.5")
    if not isinstance(causal, (bool, np.bool_)):
        rules.add("causal", repr(causal), "a bool", "pass True or False")
    if check is not None and not isinstance(check, (bool, np.bool_)):
        rules.add("check", repr(check), "None, True or False", "pass True to validate device contents first")


def check_decode_args(q: View | None, k_cache: View | None, block_table: View | None,
                      cache_seqlens: View | None, head_dim_v: Any, tile_scheduler_metadata: View | None,
                      num_splits: View | None, softmax_scale: Any, causal: Any, check: Any = None,
                      out: View | None = None, lse: View | None = None,
                      failed: tuple[Violation, ...] = (), descale_q: View | None = None,
                      descale_k: View | None = None, kv_dtype: Any = None) -> DecodeProblem:
    """Check a `flash_mla_with_kvcache` call (with the caller's `out`/`lse` buffers and an FP8 call's
    descales when given); raises InvalidInputError listing every violated rule and the `failed` ones
    (arguments that could not be viewed, whose views are None)."""
    rules = _Rules("flash_mla_with_kvcache", failed)
    views = {"q": q, "k_cache": k_cache, "block_table": block_table, "cache_seqlens": cache_seqlens,
             "tile_scheduler_metadata": tile_scheduler_metadata, "num_splits": num_splits}
    views.update((name, view) for name, view in (("descale_q", descale_q), ("descale_k", descale_k),
                                                 ("out", out), ("lse", lse)) if view is not None)
    device_id = rules.on_cuda(views)
    q_dtype, k_dtype = _as_read(rules, "q", q, kv_dtype), _as_read(rules, "k_cache", k_cache, kv_dtype)
    q_ok = _check_q(rules, q, q_dtype)
    batch = q.shape[0] if q is not None and q.ndim == 4 else None
    _check_k_cache(rules, k_cache, k_dtype, q, q_dtype, q_ok)
    _check_fp8(rules, q, q_dtype, k_cache, k_dtype, kv_dtype, descale_q, descale_k)
    _check_block_table(rules, block_table, batch)
    _check_seqlens(rules, cache_seqlens, batch)
    _check_plan(rules, tile_scheduler_metadata, num_splits, batch)
    _check_scalars(rules, head_dim_v, softmax_scale, causal, check)
    _check_outputs(rules, out, lse, q, q_dtype, q_ok)
    rules.raise_if_any()  # q and k_cache are usable from here: each way of failing added a violation

    batch, seqlen_q, heads_q, _ = q.shape
    heads_kv = k_cache.shape[2]
    heads_per_group = heads_q // heads_kv
    scale = HEAD_DIM ** -0.5 if softmax_scale is None else float(softmax_scale)
    return DecodeProblem(
        batch=batch, seqlen_q=seqlen_q, heads_q=heads_q, heads_kv=heads_kv,
        heads_per_group=heads_per_group, rows=seqlen_q * heads_per_group,
        dtype_name=DTYPE_NAMES[out_dtype_of(q_dtype)], causal=bool(causal) and seqlen_q > 1,
        softmax_scale=scale, num_parts=tile_scheduler_metadata.shape[0], device_id=device_id,
        q=q, k_cache=k_cache, block_table=block_table, out=out, lse=lse,
        q_dtype_name=DTYPE_NAMES.get(q_dtype, "e4m3"), kv_name="e4m3" if k_dtype == E4M3 else None,
        descale_q=descale_q, descale_k=descale_k)
