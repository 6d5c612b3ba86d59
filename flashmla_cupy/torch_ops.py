"""The two functions as torch.library custom ops, for torch.compile, CUDA-graph trees and torch.export.

    flashmla_cupy::get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache=False)
        -> (metadata, num_splits)
    flashmla_cupy::decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                          num_splits, softmax_scale, causal, check, descale_q=None, descale_k=None,
                          kv_dtype=None) -> (out, lse)
    flashmla_cupy::decode_out(..., check, out!, lse!, descale_q=None, ...) -> ()   writes the caller's buffers

Eager calls do not pass through the dispatcher: api.py keeps them on its own fast path (an op call
costs microseconds more) and routes a call here only while torch traces it. The fake
implementations give torch the output shapes after checking every input rule, so a bad call fails
while tracing with the package's own InvalidInputError; the CUDA implementations are the eager
path, so the kernels' workspaces come from torch's caching allocator on the current stream (and from
the graph's pool under CUDA-graph capture).

Importing this module imports torch and registers the ops; api.py does that when it first sees a
torch tensor.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from . import api, inputs, install, plan, tensors
from .params import METADATA_FIELDS

# torch.compiler.is_compiling: True while dynamo (torch.compile, torch.export) traces the caller.
is_compiling = torch.compiler.is_compiling

_LIB = torch.library.Library("flashmla_cupy", "FRAGMENT")   # the ops live as long as the process
_DECODE_ARGS = ("Tensor q, Tensor k_cache, Tensor block_table, Tensor cache_seqlens, int head_dim_v, "
                "Tensor tile_scheduler_metadata, Tensor num_splits, float? softmax_scale, bool causal, bool? check")
_FP8_ARGS = "Tensor? descale_q=None, Tensor? descale_k=None, str? kv_dtype=None"   # last: they have defaults
_LIB.define("get_mla_metadata(Tensor cache_seqlens, int num_q_tokens_per_head_k, int num_heads_k, "
            "bool is_fp8_kvcache=False) -> (Tensor, Tensor)")
_LIB.define(f"decode({_DECODE_ARGS}, {_FP8_ARGS}) -> (Tensor, Tensor)")
_LIB.define(f"decode_out({_DECODE_ARGS}, Tensor(a!) out, Tensor(b!) lse, {_FP8_ARGS}) -> ()")


# --- what api.py calls while torch traces -----------------------------------------------------------

def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache, stream):
    _no_stream(stream)
    return torch.ops.flashmla_cupy.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k,
                                                    is_fp8_kvcache)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits, softmax_scale, causal, descale_q, descale_k, kv_dtype, out, lse, stream,
                           check):
    _no_stream(stream)
    args = (q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
            softmax_scale, causal, check)
    fp8 = (descale_q, descale_k, kv_dtype)
    if out is None and lse is None:
        return torch.ops.flashmla_cupy.decode(*args, *fp8)
    # A missing one of the two becomes a buffer of the graph's own; a q too broken to give the shape
    # gets a stand-in, and the fake implementation reports q.
    if q.dim() == 4:
        b, s_q, h_q, _ = q.shape
        out = q.new_empty((b, s_q, h_q, inputs.HEAD_DIM_V), dtype=_out_dtype(q)) if out is None else out
        lse = q.new_empty((b, h_q, s_q), dtype=torch.float32) if lse is None else lse
    else:
        out = q.new_empty((0,)) if out is None else out
        lse = q.new_empty((0,), dtype=torch.float32) if lse is None else lse
    torch.ops.flashmla_cupy.decode_out(*args, out, lse, *fp8)
    return out, lse


def _no_stream(stream) -> None:
    # Dynamo reports an exception raised while it traces as "Observed exception" followed by the source
    # line (and, without fullgraph, runs the call eagerly instead, where stream= works): the line is the message.
    if stream is not None:
        raise ValueError("stream= cannot be traced: a call traced by torch runs on torch's current stream (use `with torch.cuda.stream(s):` around the compiled function)")  # noqa: E501


# --- fake implementations: shapes, after every input rule ---------------------------------------------

def _view(t: torch.Tensor) -> tensors.View:
    dtype = tensors.torch_dtypes().get(t.dtype)
    if dtype is None:   # a type no rule accepts (float8, complex, ...): rejected under its size
        dtype = np.dtype((np.void, t.element_size()))
    return tensors.traced_view(t.shape, t.stride(), dtype, t.is_cuda, t.get_device() if t.is_cuda else 0, "torch")


def _out_dtype(q: torch.Tensor) -> torch.dtype:
    """out's dtype: q's, bf16 for an FP8 q."""
    return q.dtype if q.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


@torch.library.register_fake("flashmla_cupy::get_mla_metadata", lib=_LIB)
def _metadata_fake(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache=False):
    problem = inputs.check_metadata_args(_view(cache_seqlens), num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache)
    sm_count = install.require_hopper(problem.device_id).sm_count
    num_parts = plan.num_sm_parts(sm_count, problem.heads_kv, problem.rows)
    return (cache_seqlens.new_empty((num_parts, METADATA_FIELDS), dtype=torch.int32),
            cache_seqlens.new_empty((problem.batch + 1,), dtype=torch.int32))


def _check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                  softmax_scale, causal, check, out=None, lse=None, descale_q=None, descale_k=None,
                  kv_dtype=None) -> inputs.DecodeProblem:
    views = [_view(t) for t in (q, k_cache, block_table, cache_seqlens)]
    problem = inputs.check_decode_args(
        *views, head_dim_v, _view(tile_scheduler_metadata), _view(num_splits), softmax_scale, causal, check,
        None if out is None else _view(out), None if lse is None else _view(lse),
        descale_q=None if descale_q is None else _view(descale_q),
        descale_k=None if descale_k is None else _view(descale_k), kv_dtype=kv_dtype)
    install.require_hopper(problem.device_id)
    return problem


@torch.library.register_fake("flashmla_cupy::decode", lib=_LIB)
def _decode_fake(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                 softmax_scale, causal, check, descale_q=None, descale_k=None, kv_dtype=None):
    p = _check_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                      softmax_scale, causal, check, descale_q=descale_q, descale_k=descale_k, kv_dtype=kv_dtype)
    return (q.new_empty((p.batch, p.seqlen_q, p.heads_q, inputs.HEAD_DIM_V), dtype=_out_dtype(q)),
            q.new_empty((p.batch, p.heads_q, p.seqlen_q), dtype=torch.float32))


@torch.library.register_fake("flashmla_cupy::decode_out", lib=_LIB)
def _decode_out_fake(*args, **fp8):
    _check_decode(*args, **fp8)


# --- CUDA implementations: the eager path -------------------------------------------------------------

# The public functions: an op's implementation runs after tracing, so they take the eager path.

def _metadata_cuda(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache=False):
    return api.get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, is_fp8_kvcache=is_fp8_kvcache)


def _decode_cuda(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                 softmax_scale, causal, check, descale_q=None, descale_k=None, kv_dtype=None):
    return api.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                      num_splits, softmax_scale, causal, descale_q, descale_k, kv_dtype=kv_dtype,
                                      check=check)


def _decode_out_cuda(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                     softmax_scale, causal, check, out, lse, descale_q=None, descale_k=None, kv_dtype=None):
    api.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               num_splits, softmax_scale, causal, descale_q, descale_k, kv_dtype=kv_dtype, out=out,
                               lse=lse, check=check)


_LIB.impl("get_mla_metadata", _metadata_cuda, "CUDA")
_LIB.impl("decode", _decode_cuda, "CUDA")
_LIB.impl("decode_out", _decode_out_cuda, "CUDA")
