"""The two public functions. Their docstrings are the contract; the bodies only orchestrate.

A call is checked and prepared once per input layout (prepared.py) and then replayed: a decode step
repeats one layout for every layer. lookup.py finds the prepared call: plain torch CUDA tensors or
CuPy arrays on their framework's current stream from their attributes alone, every other call
through tensor views first. Traced calls become graph nodes instead: torch.compile/torch.export ones
torch custom ops (torch_ops.py), jax.jit ones XLA buffer callbacks (jax_ops.py, via lookup.py).

The driver-facing modules (launch, kernels) are imported only once the inputs are checked, so that
importing the package, and rejecting a bad call, needs no GPU and no CUDA library.
"""
from __future__ import annotations

from typing import Any

from . import env, inputs, install, lookup, prepared

_METADATA_ARRAYS = ("cache_seqlens",)
_DECODE_ARRAYS = ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits")
_DESCALES = ("descale_q", "descale_k")
_DECODE_ARRAYS_DESCALED = _DECODE_ARRAYS + _DESCALES


# torch_ops, once an eager call has imported it (importing it imports torch and registers the ops).
_torch_ops = None


def _torch_ops_for(first: Any):
    """torch_ops, imported now, when `first` is a torch tensor; else None. Until then no call is a
    torch tensor's, so none can be traced by torch. Only an eager call remembers it in `_torch_ops`:
    a global that changed type while dynamo traced a first call would break dynamo's guard on it
    (torch 2.11: "Unexpected type <class 'module'>")."""
    global _torch_ops
    if type(first).__module__.partition(".")[0] != "torch":
        return None
    from . import torch_ops
    if not torch_ops.is_compiling():
        _torch_ops = torch_ops
    return torch_ops


def _prepare_plan(views: tuple, framework: str, scalars: tuple, failed: tuple) -> prepared.PlanCall:
    problem = inputs.check_metadata_args(views[0], *scalars, failed=failed)
    info = install.require_hopper(problem.device_id)
    return prepared.PlanCall(problem, framework, info.sm_count)


def _prepare_decode(views: tuple, framework: str, scalars: tuple, failed: tuple) -> prepared.DecodeCall:
    q, k_cache, block_table, seqlens, metadata, num_splits, *given = views
    # The names of the optional arrays given (descale_q, descale_k, out, lse), in that order.
    head_dim_v, softmax_scale, causal, check, kv_dtype, *given_names = scalars
    optional = dict(zip(given_names[0], given)) if given_names else {}
    outputs = {name: optional[name] for name in ("out", "lse") if name in optional}
    problem = inputs.check_decode_args(q, k_cache, block_table, seqlens, head_dim_v, metadata, num_splits,
                                       softmax_scale, causal, check, outputs.get("out"), outputs.get("lse"),
                                       failed=failed, descale_q=optional.get("descale_q"),
                                       descale_k=optional.get("descale_k"), kv_dtype=kv_dtype)
    install.require_hopper(problem.device_id)
    # The mode is part of the prepared call (and `check` of its key): unchecked calls pay nothing.
    checked = env.check() if check is None else bool(check)
    kind = {(False, False): prepared.DecodeCall, (True, False): prepared.CheckedDecodeCall,
            (False, True): prepared.DecodeIntoCall, (True, True): prepared.CheckedDecodeIntoCall}
    return kind[checked, bool(outputs)](problem, framework)


def get_mla_metadata(cache_seqlens: Any, num_q_tokens_per_head_k: int, num_heads_k: int, *,
                     is_fp8_kvcache: bool = False, stream: Any = None) -> tuple[Any, Any]:
    """Plan the split-KV work of one decode step; reuse the plan for every layer of that step.

    Args:
        cache_seqlens: int32 `[b]` CUDA array (torch, JAX, CuPy or any DLPack producer): the tokens
            in the cache of each request, including the `s_q` new ones. 0 is allowed.
        num_q_tokens_per_head_k: `s_q * h_q // h_kv`, the query rows per KV head.
        num_heads_k: `h_kv`, the number of KV heads.
        is_fp8_kvcache: the plan is for an FP8 (e4m3) k_cache (the FlashMLA forks' keyword). It makes
            the same plan as for a 16-bit cache: the plan's fixed cost per piece, swept for FP8 on the
            H200, measured best at the same value.
        stream: optional CUDA stream (int handle, torch or CuPy stream); by default the caller's
            current stream (torch's for torch inputs, CuPy's otherwise).

    Returns:
        `(tile_scheduler_metadata, num_splits)` in the framework of `cache_seqlens`:
        `tile_scheduler_metadata` int32 `[num_sm_parts, 8]`, an opaque plan, and `num_splits` int32
        `[b + 1]`, the prefix sum of the pieces each request is cut into (`num_splits[0] = 0`).
        They depend only on the seqlens and the shapes.

    The plan is computed by a kernel on the stream, with no host synchronisation, so a whole decode
    step can be captured in a CUDA graph. Invalid arguments raise `errors.InvalidInputError` (a
    ValueError and TypeError) listing every problem; a non-Hopper GPU raises
    `errors.UnsupportedDeviceError`. Both are raised before anything is launched.
    """
    # While torch traces the call (torch.compile, torch.export) it becomes an op of torch's graph. Written
    # for dynamo to trace too; an eager call pays a global read and torch's is_compiling().
    ops = _torch_ops or _torch_ops_for(cache_seqlens)
    if ops is not None and ops.is_compiling():
        return ops.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache, stream)
    return lookup.call(_METADATA_ARRAYS, (cache_seqlens,), (num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache),
                       stream, _prepare_plan)


def flash_mla_with_kvcache(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any,
                           head_dim_v: int, tile_scheduler_metadata: Any, num_splits: Any,
                           softmax_scale: float | None = None, causal: bool = False,
                           descale_q: Any = None, descale_k: Any = None, *, kv_dtype: str | None = None,
                           out: Any = None, lse: Any = None, stream: Any = None,
                           check: bool | None = None) -> tuple[Any, Any]:
    """MLA decode attention over a paged KV cache (FlashMLA's dense-decode API).

    Args (CUDA arrays from torch, JAX, CuPy or any DLPack producer, all on one Hopper GPU):
        q: `[b, s_q, h_q, 576]` bf16 or fp16, or float8_e4m3fn with an FP8 k_cache; last dim
            contiguous, other strides free.
        k_cache: `[num_blocks, 64, h_kv, 576]`, q's dtype, or float8_e4m3fn (an FP8 cache, with a q of
            any of the three types); last dim contiguous, 16-byte aligned base and outer byte strides
            (it is read through TMA). V is `k_cache[..., :512]`.
        block_table: int32 `[b, max_blocks_per_seq]`, row stride free: token `t` of request `i`
            is row `t % 64` of page `block_table[i, t // 64]`. Entries past a request's last page
            are never read.
        cache_seqlens: int32 `[b]`, cached tokens per request including the `s_q` new ones.
        head_dim_v: 512.
        tile_scheduler_metadata, num_splits: what `get_mla_metadata` returned for these seqlens.
        softmax_scale: scale of the scores; default `576 ** -0.5`.
        causal: mask bottom-right aligned: query token `s` sees keys `t < n - (s_q - 1 - s)`.
            Changes nothing when `s_q == 1`.
        descale_q, descale_k: float32 `[1]` CUDA arrays, the per-tensor scales that turn FP8 data back
            into real values (None: 1): the scores are `softmax_scale * descale_q * descale_k * q.k`
            and the output is `descale_k * softmax(scores) @ V`. `descale_k` only with an FP8 k_cache,
            `descale_q` only with an FP8 q. Read by the kernel on the device, so a CUDA graph replays
            with whatever they hold.
        kv_dtype: "fp8_e4m3" to read a uint8 k_cache (and a uint8 q) as e4m3 bytes, for producers
            that cannot export float8 through DLPack (CuPy); None otherwise.
        out, lse: optional buffers to write the results into instead of new arrays (for static
            buffers under CUDA graphs): writable CUDA arrays (torch, CuPy; not JAX) on q's device,
            C-contiguous, `out` `[b, s_q, h_q, 512]` in q's dtype and 16-byte aligned, `lse` float32
            `[b, h_q, s_q]`; checked like every input. They must not overlap the inputs.
        stream: optional CUDA stream (int handle, torch or CuPy stream); by default the caller's
            current stream (torch's for torch inputs, CuPy's otherwise).
        check: validate the device contents first (checked mode, below); None (default): as the
            FLASHMLA_CUPY_CHECK environment variable says, off unless it is 1.

    Returns:
        `(out, lse)` in q's framework (the caller's own arrays where given): `out` `[b, s_q, h_q, 512]`
        in q's dtype (bf16 for an FP8 q), the softmax-weighted sum of the visible values; `lse` float32 `[b, h_q, s_q]`,
        the natural-log log-sum-exp of the scaled scores. A row that sees no key gets `out = 0`,
        `lse = +inf`.

    Query head `h` uses KV head `h // (h_q // h_kv)`. Scores and accumulation are fp32. FP8 data is
    converted exactly to 16 bits (bf16 for an FP8 q, else q's type) for the tensor cores; the descales
    scale the fp32 scores and output, never the data. Cache
    contents past a request's length may be NaN/Inf and do not affect the result. Both kernels run
    on the stream with no host synchronisation (CUDA-graph capturable). Invalid arguments raise
    `errors.InvalidInputError` (a ValueError and TypeError) listing every problem; a non-Hopper GPU
    raises `errors.UnsupportedDeviceError`. Both are raised before anything is launched.

    Device contents that no shape rule can see never make the kernels touch memory outside the
    arrays; the result of such a call is defined as far as it can be:
    - a request that uses a page past block_table's width (`cache_seqlens[i] > block_table.shape[1]
      * 64`), or a used page whose block index is outside `[0, num_blocks)`, gets NaN in every row of
      its `out` and `lse`;
    - a split request whose partial-result slots (from `num_splits`) fall outside the workspace gets
      NaN rows;
    - a plan (`tile_scheduler_metadata`, `num_splits`) made for other lengths or another batch gives
      unspecified values (call get_mla_metadata again whenever cache_seqlens change).
    Checked mode (`check=True`) validates those contents on the device before the decode runs (block
    indices of every used page, `0 <= cache_seqlens[i] <= block_table.shape[1] * 64`, the plan equal to
    the plan for these lengths) and raises `errors.InvalidInputError` naming the offending requests.
    It costs one host synchronisation per call, so it cannot run while a CUDA graph is captured (it
    raises then); unchecked calls pay nothing for it.
    """
    ops = _torch_ops or _torch_ops_for(q)   # as in get_mla_metadata
    if ops is not None and ops.is_compiling():
        return ops.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                          num_splits, softmax_scale, causal, descale_q, descale_k, kv_dtype, out,
                                          lse, stream, check)
    arrays = (q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits)
    scalars = (head_dim_v, softmax_scale, causal, check, kv_dtype)
    if out is None and lse is None:
        if descale_q is None and descale_k is None:
            return lookup.call(_DECODE_ARRAYS, arrays, scalars, stream, _prepare_decode)
        if descale_q is not None and descale_k is not None:  # an e4m3 q and cache: _decode_with's key, made once
            return lookup.call(_DECODE_ARRAYS_DESCALED, (*arrays, descale_q, descale_k), (*scalars, _DESCALES),
                               stream, _prepare_decode)
    return _decode_with(arrays, scalars, (("descale_q", descale_q), ("descale_k", descale_k), ("out", out),
                                          ("lse", lse)), stream)


def _decode_with(arrays: tuple, scalars: tuple, optional: tuple, stream: Any) -> tuple:
    """flash_mla_with_kvcache with descales or out=/lse= (`optional`: (name, array or None) pairs)."""
    given = tuple((name, a) for name, a in optional if a is not None)
    names = tuple(name for name, _ in given)
    # The names of the given arrays are part of the call's key: an lse-shaped array passed as out
    # must be checked (and rejected), not replayed as an lse.
    new_out, new_lse = lookup.call(_DECODE_ARRAYS + names, arrays + tuple(a for _, a in given), (*scalars, names),
                                   stream, _prepare_decode)
    given = dict(given)
    return (new_out if "out" not in given else given["out"]), (new_lse if "lse" not in given else given["lse"])
