"""Helpers of the GPU tests and the GPU scripts (scripts/): moving arrays between numpy and the
frameworks, running a reference.Case through the public API and checking it against the float64
reference, and launching the planner or the combine kernel alone.

bf16 and fp16 arrays travel as their 16-bit patterns, e4m3 ones as bytes, so no framework needs to
convert them; CuPy (which has no float8 dtype) keeps e4m3 as uint8 and the call says kv_dtype="fp8_e4m3".
"""
from __future__ import annotations

import os

import numpy as np

from flashmla_cupy import reference
from flashmla_cupy.reference import HEAD_DIM_V


def to_device(framework: str, x: np.ndarray):
    bits = x.view(np.uint16) if x.dtype.itemsize == 2 and x.dtype != np.int16 else None
    e4m3 = x.dtype == reference.as_dtype("e4m3")
    if framework == "cupy":
        import cupy
        if e4m3:
            return cupy.asarray(x.view(np.uint8))
        return cupy.asarray(bits).view(x.dtype) if bits is not None else cupy.asarray(x)
    if framework == "torch":
        import torch
        if e4m3:
            return torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
        if bits is not None:
            t = torch.from_numpy(bits.view(np.int16)).cuda()
            return t.view(torch.bfloat16 if x.dtype == reference.as_dtype("bf16") else torch.float16)
        return torch.from_numpy(x).cuda()
    if framework == "jax":
        import jax
        return jax.device_put(x, jax.devices("gpu")[0])
    raise ValueError(framework)


def to_numpy(framework: str, x, dtype=None) -> np.ndarray:
    if framework == "cupy":
        import cupy
        if dtype is not None and x.dtype.itemsize == 2:
            return cupy.asnumpy(x.view(cupy.uint16)).view(dtype)
        return cupy.asnumpy(x)
    if framework == "torch":
        import torch
        if x.dtype in (torch.bfloat16, torch.float16):
            return x.view(torch.int16).cpu().numpy().view(dtype)
        return x.cpu().numpy()
    return np.asarray(x)


def run(case: reference.Case, framework: str = "cupy", strided_q: bool = False, wide_block_table: bool = False,
        repeats: int = 1, streams: int = 1):
    """Run one case through the public API; returns numpy (out, lse). With `repeats`, the call is made that
    many times back to back (no host synchronisation between them) and every result must have the first
    one's bits. With `streams` (CuPy only), call i goes to non-blocking stream i % streams, so that calls
    on different streams may run at once."""
    import flashmla_cupy

    q = case.q
    if strided_q:  # q sliced out of a larger buffer: head stride 640 and a head offset of 2
        b, s_q, h_q, d = q.shape
        big = np.full((b, s_q, h_q + 3, d + 64), np.nan, dtype=q.dtype)
        big[:, :, 2:2 + h_q, :d] = q
        q_dev = to_device(framework, big)[:, :, 2:2 + h_q, :d]
    else:
        q_dev = to_device(framework, q)
    bt = case.block_table
    if wide_block_table:  # row stride larger than the width
        wide = np.full((bt.shape[0], bt.shape[1] + 7), 2**31 - 1, dtype=np.int32)
        wide[:, : bt.shape[1]] = bt
        bt_dev = to_device(framework, wide)[:, : bt.shape[1]]
    else:
        bt_dev = to_device(framework, bt)
    k_dev = to_device(framework, case.k_cache)
    seqlens_dev = to_device(framework, case.cache_seqlens)
    _, s_q, h_q, _ = q.shape
    h_kv = case.heads_kv
    meta, splits = flashmla_cupy.get_mla_metadata(seqlens_dev, s_q * h_q // h_kv, h_kv)
    fp8 = {}
    if case.fp8:
        fp8 = dict(descale_q=descale_on_device(framework, case.descale_q),
                   descale_k=descale_on_device(framework, case.descale_k))
        if framework == "cupy":
            fp8["kv_dtype"] = "fp8_e4m3"
    def call():
        return flashmla_cupy.flash_mla_with_kvcache(q_dev, k_dev, bt_dev, seqlens_dev, HEAD_DIM_V, meta, splits,
                                                    softmax_scale=case.softmax_scale, causal=case.causal, **fp8)

    if streams == 1:
        results = [call() for _ in range(repeats)]
    else:
        import cupy

        assert framework == "cupy", "streams: CuPy only"
        side = [cupy.cuda.Stream(non_blocking=True) for _ in range(streams)]
        cupy.cuda.Device().synchronize()  # the inputs and the plan, made on the default stream
        results = []
        for i in range(repeats):
            with side[i % streams]:
                results.append(call())
        cupy.cuda.Device().synchronize()
    out, lse = to_numpy(framework, results[0][0], case.dtype), to_numpy(framework, results[0][1])
    for i in range(1, repeats):  # bits, so that NaN compares equal to NaN
        o, l = results[i]
        results[i] = None
        assert (to_numpy(framework, o, case.dtype).tobytes() == out.tobytes()
                and to_numpy(framework, l).tobytes() == lse.tobytes()), f"call {i} of {repeats} differs"
    return out, lse


def descale_on_device(framework: str, descale):
    """A float32 [1] device array holding `descale`, or None."""
    return None if descale is None else to_device(framework, np.array([descale], dtype=np.float32))


def lengths(rng, kind: str, batch: int) -> np.ndarray:
    """Sequence lengths of a named kind."""
    if kind.startswith("fixed:"):
        return np.full(batch, int(kind.split(":")[1]))
    lo, hi = (int(v) for v in kind.split(":")[1:3])
    values = rng.integers(lo, hi + 1, size=batch)
    if kind.startswith("halfzero:"):
        values[rng.random(batch) < 0.5] = 0
    return values


def matrix_case(rng, config: dict, q_dtype: str, **extra) -> reference.Case:
    """The random case of one feature-matrix config (heads, batch_lengths, seqlen_q, causal,
    custom_scale): lengths of the config's kind, a random softmax scale where asked. `extra` goes to
    reference.random_case (an FP8 cache's kv_dtype and descales)."""
    (h_q, h_kv), (b, kind) = config["heads"], config["batch_lengths"]
    scale = float(rng.uniform(0.02, 0.2)) if config["custom_scale"] else None
    return reference.random_case(rng, b, config["seqlen_q"], h_q, h_kv, lengths(rng, kind, b), q_dtype,
                                 causal=config["causal"], softmax_scale=scale, **extra)


def matrix_id(config: dict, label: str) -> str:
    """A feature-matrix config as a test id, after `label` (the dtypes)."""
    (h_q, h_kv), (b, kind) = config["heads"], config["batch_lengths"]
    return (f"{label}-b{b}-{kind}-sq{config['seqlen_q']}-h{h_q}x{h_kv}"
            f"{'-causal' if config['causal'] else ''}{'-scale' if config['custom_scale'] else ''}")


def check(case, out, lse, seed, label):
    """check_close against the float64 reference; every report is kept for the run's JSON summary."""
    ref_out, ref_lse = case.reference()
    try:
        report = case.check(out, lse, (ref_out, ref_lse))
    except AssertionError as exc:
        REPORTS.append({"case": label, "seed": seed, "passed": False, "error": str(exc)[:500]})
        raise AssertionError(f"{label} (seed {seed}): {exc}") from None
    REPORTS.append({"case": label, "seed": seed, "passed": True, **report})
    return report


REPORTS: list[dict] = []  # written to $FLASHMLA_CUPY_TEST_REPORT by tests/conftest.py


def cap_plan_parts(most: int | None) -> None:
    """Plans of at most `most` parts (None: as shipped) for the calls prepared from now on: the planner's
    part count capped (fewer, longer parts: the narrow kernel's two loader lanes), and the calls prepared
    with the plan before forgotten."""
    from flashmla_cupy import lookup, plan

    shipped = getattr(plan.num_sm_parts, "shipped", plan.num_sm_parts)
    if most is None:
        plan.num_sm_parts = shipped
    else:
        def capped(*args):
            return min(most, shipped(*args))
        capped.shipped = shipped
        plan.num_sm_parts = capped
    lookup.remembered().clear()


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def pace_counts() -> list[int]:
    """The pace count (decode_narrow.cu's GridPace) of every loaded narrow module: back at zero after
    every launch that has ended."""
    from flashmla_cupy import launch

    return [int(loaded.global_words("narrow_pace", 1).get()[0])
            for (variant, _), loaded in list(launch._loaded.items()) if variant.program == "decode_narrow"]


# --- one kernel alone ---------------------------------------------------------------------------

def run_scheduler(seqlens, metadata, num_splits, num_parts: int, stream: int) -> None:
    """Write the split-KV plan for the View `seqlens` into the Views `metadata` and `num_splits`."""
    from flashmla_cupy.kernels import SchedulerLaunch

    SchedulerLaunch(seqlens.shape[0], num_parts, seqlens.device_id)(seqlens.ptr, metadata.ptr, num_splits.ptr, stream)


def run_combine_raw(dtype: str, batch: int, seqlen_q: int, heads_q: int, heads_kv: int, num_parts: int,
                    out_partial, lse_partial, num_splits, out, lse, stream: int, partial16: bool = False,
                    quad_order: bool = False) -> None:
    """Merge the pieces of split requests (Views) into `out`/`lse`, as a programmatic dependent;
    `partial16`: out_partial holds fp16 rows and their scales (the -DFLASHMLA_PARTIAL_F16 format), in quad
    order with `quad_order` (decode.cu's; kernels_src/element.cuh), else in column order (decode_ring.cu's)."""
    from flashmla_cupy.kernels import CombineLaunch

    CombineLaunch(dtype, batch, seqlen_q, heads_q, heads_kv, num_parts, out.device_id, partial16, quad_order)(
        out_partial.ptr, lse_partial.ptr, num_splits.ptr, out.ptr, lse.ptr, stream)
