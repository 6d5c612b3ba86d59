"""The two public functions. Their docstrings are the contract; the bodies only orchestrate.

A call is checked and prepared once per input layout (prepared.py) and then replayed: a decode step
repeats one layout for every layer. lookup.py finds the prepared call: plain torch CUDA tensors or
CuPy arrays on their framework's current stream from their attributes alone, every other call
through tensor views first.

The driver-facing modules (launch, kernels) are imported only once the inputs are checked, so that
importing the package, and rejecting a bad call, needs no GPU and no CUDA library.
"""
from __future__ import annotations

from typing import Any

from . import env, inputs, lookup, prepared
from .errors import UnsupportedDeviceError

HOPPER = (9, 0)  # the kernels are compiled for sm_90a, which runs only on compute capability 9.0
_METADATA_ARRAYS = ("cache_seqlens",)
_DECODE_ARRAYS = ("q", "k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits")


def _require_hopper(device_id: int):
    """The device's info; raises UnsupportedDeviceError unless it is a Hopper GPU."""
    from . import launch
    info = launch.device_info(device_id)
    if info.cc != HOPPER:
        major, minor = info.cc
        raise UnsupportedDeviceError(
            f"cuda:{device_id} is a {info.name} (compute capability {major}.{minor}); flashmla_cupy's "
            "kernels are built for sm_90a and need a Hopper GPU (compute capability 9.0: H100, H200, "
            "H800, H20)")
    return info


def _prepare_plan(views: tuple, framework: str, scalars: tuple, failed: tuple) -> prepared.PlanCall:
    problem = inputs.check_metadata_args(views[0], *scalars, failed=failed)
    info = _require_hopper(problem.device_id)
    return prepared.PlanCall(problem, framework, info.sm_count)


def _prepare_decode(views: tuple, framework: str, scalars: tuple, failed: tuple) -> prepared.DecodeCall:
    q, k_cache, block_table, seqlens, metadata, num_splits = views
    head_dim_v, softmax_scale, causal, check = scalars
    problem = inputs.check_decode_args(q, k_cache, block_table, seqlens, head_dim_v, metadata, num_splits,
                                       softmax_scale, causal, check, failed=failed)
    _require_hopper(problem.device_id)
    # The mode is part of the prepared call (and `check` of its key): unchecked calls pay nothing.
    checked = env.check() if check is None else bool(check)
    return (prepared.CheckedDecodeCall if checked else prepared.DecodeCall)(problem, framework)


def get_mla_metadata(cache_seqlens: Any, num_q_tokens_per_head_k: int, num_heads_k: int, *,
                     stream: Any = None) -> tuple[Any, Any]:
    """Plan the split-KV work of one decode step; reuse the plan for every layer of that step.

    Args:
        cache_seqlens: int32 `[b]` CUDA array (torch, JAX, CuPy or any DLPack producer): the tokens
            in the cache of each request, including the `s_q` new ones. 0 is allowed.
        num_q_tokens_per_head_k: `s_q * h_q // h_kv`, the query rows per KV head.
        num_heads_k: `h_kv`, the number of KV heads.
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
    return lookup.call(_METADATA_ARRAYS, (cache_seqlens,), (num_q_tokens_per_head_k, num_heads_k), stream,
                       _prepare_plan)


def flash_mla_with_kvcache(q: Any, k_cache: Any, block_table: Any, cache_seqlens: Any,
                           head_dim_v: int, tile_scheduler_metadata: Any, num_splits: Any,
                           softmax_scale: float | None = None, causal: bool = False, *,
                           stream: Any = None, check: bool | None = None) -> tuple[Any, Any]:
    """MLA decode attention over a paged KV cache (FlashMLA's dense-decode API).

    Args (CUDA arrays from torch, JAX, CuPy or any DLPack producer, all on one Hopper GPU):
        q: `[b, s_q, h_q, 576]` bf16 or fp16; last dim contiguous, other strides free.
        k_cache: `[num_blocks, 64, h_kv, 576]`, q's dtype; last dim contiguous, 16-byte aligned
            base and outer byte strides (it is read through TMA). V is `k_cache[..., :512]`.
        block_table: int32 `[b, max_blocks_per_seq]`, row stride free: token `t` of request `i`
            is row `t % 64` of page `block_table[i, t // 64]`. Entries past a request's last page
            are never read.
        cache_seqlens: int32 `[b]`, cached tokens per request including the `s_q` new ones.
        head_dim_v: 512.
        tile_scheduler_metadata, num_splits: what `get_mla_metadata` returned for these seqlens.
        softmax_scale: scale of the scores; default `576 ** -0.5`.
        causal: mask bottom-right aligned: query token `s` sees keys `t < n - (s_q - 1 - s)`.
            Changes nothing when `s_q == 1`.
        stream: optional CUDA stream (int handle, torch or CuPy stream); by default the caller's
            current stream (torch's for torch inputs, CuPy's otherwise).
        check: validate the device contents first (checked mode, below); None (default): as the
            FLASHMLA_CUPY_CHECK environment variable says, off unless it is 1.

    Returns:
        `(out, lse)` in q's framework: `out` `[b, s_q, h_q, 512]` in q's dtype, the softmax-weighted
        sum of the visible values; `lse` float32 `[b, h_q, s_q]`, the natural-log log-sum-exp of the
        scaled scores. A row that sees no key gets `out = 0`, `lse = +inf`.

    Query head `h` uses KV head `h // (h_q // h_kv)`. Scores and accumulation are fp32. Cache
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
    return lookup.call(_DECODE_ARRAYS, (q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits),
                       (head_dim_v, softmax_scale, causal, check), stream, _prepare_decode)
