"""The decode benchmark: flashmla_cupy beside FlashMLA (sgl-flash-mla's dense legacy kernel) and FlashInfer
(its fa3 MLA backend), on issue 7's table and docs/API.md section 7's standard matrix, bf16 and fp16; and
fp8 (e4m3 q and cache, per-tensor descales) beside sgl-flash-mla's dense FP8 kernel and FlashInfer's fa3
MLA with an FP8 cache (a bf16 query there, holding q's e4m3 values).

Runs on a Hopper GPU with torch. Every library gets the same torch inputs (page 64, shuffled pages,
random data). Per case, our output comes first; each peer's output is checked against it before the
peer is timed, and a peer that disagrees is reported and not timed. Each library is then timed
replayed from a CUDA graph (the headline: serving engines run decode that way) and as eager calls,
every run after an L2 flush, CUDA-event median; metadata is computed before timing. The copy and
matmul ceilings are measured at the start of the same run. FLOPs and bytes follow docs/API.md section 7.

The JSON is rewritten after every case, so a run cut short (Ctrl-C; SIGTERM, after the case in
progress; --budget-s) keeps what it measured. The markdown tables and the PNG chart are rendered
beside it at the end, and `scripts/bench_report.py` re-renders them from the JSON anywhere. Peers
are optional: one that does not import is reported once, one that fails on a case for that case.

    python scripts/bench.py                          # all 138 cases (bf16, fp16): ~3-5 min on an H200
    python scripts/bench.py --quick                  # issue 7's table, bf16
    python scripts/bench.py --cases matrix --dtype fp16 --only flashmla_cupy,FlashMLA --json out.json
    python scripts/bench.py --cases 'b128-q1-*,b64-q1-h128-2048' --list      # what would run; no GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import bench_cases  # scripts/ is this script's first sys.path entry
import bench_report
from bench_cases import Case
from flashmla_cupy.reference import HEAD_DIM, HEAD_DIM_V
from flashmla_cupy.reference import PAGE_SIZE as PAGE

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3fn"}
# The FP8 cases' per-tensor descales: the stored e4m3 values of randn/10 data reach about 300.
FP8_DESCALE = 1.5 / 448
SCALE = HEAD_DIM ** -0.5

# Timing. Zeroing a buffer about five times the L2 (50 MB on H100/H200) before each run evicts what
# the previous run left there. Repetitions fill about TARGET_S of wall time per measurement within
# [MIN_REPS, MAX_REPS]: that keeps every matrix cell, bf16 and fp16, within ~6 minutes.
FLUSH_BYTES = 256 << 20
WARMUP_CALLS = 3
TARGET_S = 0.05
MIN_REPS, MAX_REPS = 10, 100
# A case's libraries are timed in rounds, each a share of the runs, in every rotation of their order and
# every rotation reversed (2n rounds for n libraries), so that each library takes each place and follows
# each other library alike; a library's time is the median of its rounds. The GPU carries a heavy run's
# load into the next ones: right after b=128, h_q=128, 4096 the first library timed at b=32, 8192 read
# 2-5 % slower than the same calls two seconds later, whichever library it was; and in three rotated
# rounds (seventeenth session) FlashInfer, the slowest, always came just before ours (docs/PERF_NOTES.md,
# eighteenth session). Timing the libraries run by run instead (one run of each in turn) made every run of
# a short case several microseconds slower, FlashMLA's most (b=1, 32768: 44 -> 57 us): each kernel then
# starts with another's code in the SM's instruction caches, which the L2 flush does not reach.
HOST_CALLS = 20
HOST_ROUNDS = 5

# Ceilings: a device-to-device copy (bytes read + written) and a square matmul per dtype.
COPY_BYTES = 1 << 30
MATMUL_N = 8192

# A peer agrees with ours when every element is within twice docs/API.md's out bar against the float64
# reference (each of the two may use the bar once), with cosine difference at most CHECK_COS.
CHECK_ABS, CHECK_REL, CHECK_COS = 2 * 8e-4, 2 * 2 / 128, 1e-5
# FlashMLA's FP8 kernel is less exact than ours, which meets SPEC's bar against the float64 reference of
# the dequantised data (tests/gpu/test_fp8_gpu.py): against ours its cosine difference was 4e-4 .. 4e-3
# in issue 7's table (H200, 2026-11-30), its largest difference 5e-4. fp8 rows check the cosine at this.
CHECK_COS_FP8 = 1e-2
# It also rounds P to e4m3 for its P V (unit roundoff 2^-4), so an element may be off by up to about 2^-4 of
# the V values it averages: where few tokens are visible (s_q = 2, causal, varlen: H200, 66dad03) its
# elements were up to 0.0078 off ours (cosine difference 2e-5 .. 5e-5). fp8 rows allow an element
# CHECK_ABS_FP8 of the output's largest magnitude, or CHECK_ABS where that is larger.
CHECK_ABS_FP8 = 2.0 ** -4


@dataclasses.dataclass(frozen=True)
class Inputs:
    q: object
    k_cache: object
    block_table: object
    seqlens: object
    descale_q: object = None   # fp8: float32 [1] device tensors
    descale_k: object = None


def make_inputs(torch, case: Case, seed: int) -> Inputs:
    """Random q and cache (randn / 10 clamped to [-1, 1], as the tests draw them), a shuffled block
    table as wide as the longest request, and the case's lengths. fp8: the same data divided by
    FP8_DESCALE and rounded to e4m3, with that descale for q and the cache."""
    if case.dtype == "fp8":
        x = make_inputs(torch, dataclasses.replace(case, dtype="bf16"), seed)
        descale = torch.full((1,), FP8_DESCALE, dtype=torch.float32, device="cuda")
        fp8 = getattr(torch, TORCH_DTYPES["fp8"])
        return Inputs((x.q.float() / FP8_DESCALE).to(fp8), (x.k_cache.float() / FP8_DESCALE).to(fp8),
                      x.block_table, x.seqlens, descale, descale.clone())
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = getattr(torch, TORCH_DTYPES[case.dtype])
    width = max(1, *case.pages())
    q = torch.randn(case.batch, case.seqlen_q, case.heads_q, HEAD_DIM, generator=g, device="cuda", dtype=dtype)
    k_cache = torch.randn(case.batch * width, PAGE, case.heads_kv, HEAD_DIM, generator=g, device="cuda", dtype=dtype)
    block_table = torch.randperm(case.batch * width, generator=g, device="cuda").int().view(case.batch, width)
    seqlens = torch.tensor(case.seqlens(), dtype=torch.int32, device="cuda")
    return Inputs(q.div_(10).clamp_(-1, 1), k_cache.div_(10).clamp_(-1, 1), block_table, seqlens)


# Each library: make(torch, case, inputs) -> a function of no argument that runs one decode call and
# returns its `out` (any shape holding [b, s_q, h_q, 512] in order).

def ours(torch, case: Case, x: Inputs):
    import flashmla_cupy

    meta, splits = flashmla_cupy.get_mla_metadata(x.seqlens, case.seqlen_q * case.heads_q // case.heads_kv,
                                                  case.heads_kv, is_fp8_kvcache=case.dtype == "fp8")
    return lambda: flashmla_cupy.flash_mla_with_kvcache(
        x.q, x.k_cache, x.block_table, x.seqlens, HEAD_DIM_V, meta, splits, softmax_scale=SCALE,
        causal=case.causal, descale_q=x.descale_q, descale_k=x.descale_k)[0]


def flashmla(torch, case: Case, x: Inputs):
    import flash_mla

    meta, _ = flash_mla.get_mla_metadata()

    def fn():
        return flash_mla.flash_mla_with_kvcache(x.q, x.k_cache, x.block_table, x.seqlens, HEAD_DIM_V, meta,
                                                softmax_scale=SCALE, causal=case.causal, use_legacy=True)[0]
    fn()  # the first call fills the scheduler metadata; later calls reuse it
    return fn


def flashmla_fp8(torch, case: Case, x: Inputs):
    """sgl-flash-mla's dense FP8 kernel (legacy side): q and cache e4m3, per-tensor descales, out bf16."""
    import flash_mla
    from flash_mla.flash_mla_interface import FlashMLASchedMeta   # not exported at the top

    meta = FlashMLASchedMeta()
    meta.tile_scheduler_metadata, meta.num_splits = flash_mla.get_mla_decoding_metadata(
        x.seqlens, case.seqlen_q * case.heads_q // case.heads_kv, case.heads_kv, is_fp8_kvcache=True,
        use_legacy=True)
    return lambda: flash_mla.flash_mla_with_kvcache(
        x.q, x.k_cache, x.block_table, x.seqlens, HEAD_DIM_V, meta, softmax_scale=SCALE, causal=case.causal,
        is_fp8_kvcache=True, use_legacy=True, descale_q=x.descale_q, descale_k=x.descale_k)[0]


def _flashinfer_mla(torch, case: Case, x: Inputs, q, sm_scale: float, kv_scale: float | None):
    """FlashInfer's FA3 MLA wrapper over our inputs (page table as CSR); with `kv_scale` the cache is FP8
    with that per-tensor scale for its latent part (K and V) and its rope part."""
    import flashinfer

    if case.heads_kv != 1:
        raise RuntimeError("FlashInfer MLA supports one KV head")
    b, s_q, h_q = case.batch, case.seqlen_q, case.heads_q
    pages = torch.tensor(case.pages(), dtype=torch.int32, device="cuda")
    kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    kv_indptr[1:] = torch.cumsum(pages, 0)
    used = torch.arange(x.block_table.shape[1], device="cuda")[None, :] < pages[:, None]
    kv_indices = x.block_table[used]  # row-major: request 0's pages, then request 1's, ...
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="fa3")
    qo_indptr = torch.arange(0, b + 1, dtype=torch.int32, device="cuda") * s_q
    ckv = x.k_cache[:, :, 0, :HEAD_DIM_V]
    kpe = x.k_cache[:, :, 0, HEAD_DIM_V:]
    q_nope = q[..., :HEAD_DIM_V].reshape(b * s_q, h_q, HEAD_DIM_V)
    q_pe = q[..., HEAD_DIM_V:].reshape(b * s_q, h_q, HEAD_DIM - HEAD_DIM_V)
    scales = {} if kv_scale is None else {"ckv_scale": kv_scale, "kpe_scale": kv_scale}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper.plan(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_len_arr=x.seqlens,
                     num_heads=h_q, head_dim_ckv=HEAD_DIM_V, head_dim_kpe=HEAD_DIM - HEAD_DIM_V, page_size=PAGE,
                     causal=case.causal, sm_scale=sm_scale, q_data_type=q.dtype, kv_data_type=x.k_cache.dtype)

        def fn():
            return wrapper.run(q_nope=q_nope, q_pe=q_pe, ckv_cache=ckv, kpe_cache=kpe, **scales)
        fn()  # the first run builds (JIT) and loads the kernel
    return fn


def flashinfer_fa3(torch, case: Case, x: Inputs):
    return _flashinfer_mla(torch, case, x, x.q, SCALE, None)


def flashinfer_fa3_fp8(torch, case: Case, x: Inputs):
    """FlashInfer's FA3 MLA with an FP8 cache (Hopper). Its query must be bf16: q's e4m3 values go in as
    bf16 (exact), descale_q folded into the softmax scale and descale_k as the cache's per-tensor
    scales, which is the arithmetic of our e4m3-q form; the conversion is not timed."""
    q = x.q.to(torch.bfloat16)
    descale_q, descale_k = float(x.descale_q.item()), float(x.descale_k.item())
    return _flashinfer_mla(torch, case, x, q, SCALE * descale_q, descale_k)


@dataclasses.dataclass(frozen=True)
class Library:
    name: str
    make: Callable
    module: str                 # what must import for the library to take part
    distribution: str           # whose version the report records
    dtypes: frozenset = frozenset({"bf16", "fp16"})


LIBRARIES = (
    Library(bench_report.OURS, ours, "flashmla_cupy", "flashmla-cupy", frozenset({"bf16", "fp16", "fp8"})),
    Library("FlashMLA", flashmla, "flash_mla", "sgl-flash-mla"),
    Library("FlashMLA-fp8", flashmla_fp8, "flash_mla", "sgl-flash-mla", frozenset({"fp8"})),
    Library("FlashInfer-fa3", flashinfer_fa3, "flashinfer", "flashinfer-python"),
    Library("FlashInfer-fa3-fp8", flashinfer_fa3_fp8, "flashinfer", "flashinfer-python", frozenset({"fp8"})),
)


def library_info(lib: Library) -> dict:
    """{"version": ...} when the library imports here, else {"error": why}."""
    try:
        module = importlib.import_module(lib.module)
    except Exception as exc:  # any import failure only removes this library from the run
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    try:
        return {"version": importlib.metadata.version(lib.distribution)}
    except importlib.metadata.PackageNotFoundError:
        return {"version": str(getattr(module, "__version__", "unknown"))}


# How the L2 is flushed before each timed run (--flush): "memset" (the standard, as triton.testing.do_bench
# flushes) writes FLUSH_BYTES, which leaves L2 full of dirty lines that the timed kernels then write back;
# "read" reads them instead (L2 left clean); "none" flushes nothing. The last two are diagnostics: what
# part of a time is the flush's write-backs (docs/PERF_NOTES.md, twelfth session).
FLUSH_MODES = ("memset", "read", "none")


class L2Flush:
    """One FLUSH_MODES flush of the L2 per call, on torch's current stream (its buffer made once)."""

    def __init__(self, torch, mode: str = "memset"):
        if mode not in FLUSH_MODES:
            raise ValueError(f"flush must be one of {FLUSH_MODES}, got {mode!r}")
        self.torch = torch
        self.mode = mode
        self.buffer = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda") if mode != "none" else None

    def __call__(self) -> None:
        if self.mode == "memset":
            self.buffer.zero_()
        elif self.mode == "read":
            self.buffer.view(self.torch.int64).sum()


class Timer:
    """CUDA-event median of one call, each run after an L2 flush."""

    def __init__(self, torch, reps: int | None = None, flush: str = "memset"):
        self.torch = torch
        self.reps = reps
        self.flush = L2Flush(torch, flush)

    def _reps_for(self, fn, share: float) -> int:
        torch = self.torch
        torch.cuda.synchronize()
        start = time.perf_counter()
        self.flush()
        fn()
        torch.cuda.synchronize()
        return max(MIN_REPS, min(round(MAX_REPS * share), int(TARGET_S * share / (time.perf_counter() - start))))

    def us(self, fn, share: float = 1.0) -> float:
        """The median time of fn; `share`: the part of a measurement's runs to take (a round's)."""
        torch = self.torch
        for _ in range(WARMUP_CALLS):
            fn()
        reps = max(1, round(self.reps * share)) if self.reps else self._reps_for(fn, share)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            self.flush()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events) * 1000


def flush_description(mode: str) -> str:
    return {"memset": f"L2 flushed ({FLUSH_BYTES >> 20} MiB memset)",
            "read": f"L2 flushed by reading {FLUSH_BYTES >> 20} MiB (left clean)",
            "none": "L2 not flushed"}[mode]


def per_call_us(fn, calls: int, repeats: int = 1) -> list[float]:
    """Microseconds per call of `repeats` bursts of `calls` calls of fn (wall time, no syncs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return times


def host_times_us(torch, fns: dict, calls: int = HOST_CALLS, rounds: int = HOST_ROUNDS) -> dict:
    """Host (CPU) time of one call per library: launches are asynchronous, so a short burst from an
    idle GPU queue measures Python and driver overhead alone. The libraries take turns, a burst each in
    every round (the order rotated), and each gets the median of its bursts: one burst per library, one
    library after the other, once put ours 28 us behind FlashMLA on a case where the next dtype's same
    case put it 13 us ahead (fb04ac9's full check). A library whose call raises gets the exception."""
    def burst(fn):
        torch.cuda.synchronize()   # each burst starts from an idle queue
        (us,) = per_call_us(fn, calls)
        return us

    names = list(fns)
    orders = [names[k % len(names):] + names[:k % len(names)] for k in range(rounds if names else 0)]
    bursts = in_turns(fns, orders, burst)
    torch.cuda.synchronize()
    return {name: got if isinstance(got, Exception) else statistics.median(got) for name, got in bursts.items()}


def captured(torch, fn):
    """fn captured in a CUDA graph (after a warm-up call on the capture stream); returns the replay, which
    holds fn: the graph reads memory that only fn's closure owns (each library's metadata from before the
    capture). Replays of a graph whose fn was dropped read freed memory, which torch hands to the next
    allocation: a read flush's temporaries once made our decode see no work (15 us at b128/h128/4k)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()

    def replay(graph=graph, owner=fn):
        graph.replay()
    return replay


def kernel_breakdown(torch, fn, calls: int = 20) -> tuple[dict[str, float], dict | None]:
    """GPU time per call of each kernel `fn` launches (torch profiler), in microseconds, and the split of
    each call's span over its kernels (`critical_path`; None when the trace cannot be cut into calls)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "cuda_time_total", 0.0)
        if device_us > 0:
            totals[event.key[:60]] = device_us / calls
    spans = [(e.name[:60], e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start]
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:6]), critical_path(spans, calls)


def critical_path(spans: list[tuple[str, float, float]], calls: int) -> dict | None:
    """Cut (kernel, start, end) device intervals, in launch order, into `calls` equal calls and split each
    call's span (first start to last end) over its kernels: each kernel is charged the time by which it
    moves the call's end past the kernels that ended before it. A kernel launched early and waiting
    (PDL) is charged only for what it adds after its primary, unlike its profiled duration. Medians over
    the calls, in the trace's unit (us); None when the kernels do not divide evenly into calls."""
    if calls <= 0 or not spans or len(spans) % calls:
        return None
    ordered = sorted(spans, key=lambda s: s[1])
    per_call = len(ordered) // calls
    charged: dict[str, list[float]] = {}
    span_of_call = []
    for c in range(calls):
        chunk = ordered[c * per_call:(c + 1) * per_call]
        reached = min(start for _, start, _ in chunk)
        for name, _, end in sorted(chunk, key=lambda s: s[2]):
            charged.setdefault(name, []).append(max(0.0, end - reached))
            reached = max(reached, end)
        span_of_call.append(reached - min(start for _, start, _ in chunk))
    return {"span_us": statistics.median(span_of_call),
            "charged_us": {name: statistics.median(v) for name, v in charged.items()}}


def rates(us: float, flops: int, nbytes: int) -> dict:
    return {"us": us, "tflops": flops / us / 1e6, "gbps": nbytes / us / 1e3}


def agreement(torch, reference, out, fp8: bool = False) -> dict:
    """How a peer's out compares with ours (CHECK_* above; `fp8`: the fp8 bars); non-finite values never
    agree."""
    x = reference.double().flatten()
    y = out.reshape(reference.shape).double().flatten()
    diff = (x - y).abs()
    cos_diff = float(1 - 2 * (x * y).sum() / (x * x + y * y).sum())
    abs_bar = max(CHECK_ABS, CHECK_ABS_FP8 * float(x.abs().max())) if fp8 else CHECK_ABS
    cos_bar = CHECK_COS_FP8 if fp8 else CHECK_COS
    excess = float((diff / (abs_bar + CHECK_REL * x.abs())).max())
    agrees = bool(torch.isfinite(y).all()) and excess <= 1 and cos_diff <= cos_bar
    return {"check": "agrees" if agrees else "mismatch", "max_abs_diff": float(diff.max()), "cos_diff": cos_diff}


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


def prepare_library(torch, lib: Library, case: Case, inputs: Inputs, reference):
    """One library on one case, up to its timing: (entry for the report, its call or None, the call
    captured in a CUDA graph or None, its output or None). A peer that disagrees with ours is not timed."""
    entry: dict = {}
    fn = replay = out = None
    try:
        fn = lib.make(torch, case, inputs)
        out = fn().reshape(case.batch, case.seqlen_q, case.heads_q, HEAD_DIM_V)
        torch.cuda.synchronize()
        if lib.name == bench_report.OURS:
            entry["check"] = "ours"
        elif reference is None:
            entry["check"] = "unchecked"  # ours did not run on this case: nothing to compare with
        else:
            entry.update(agreement(torch, reference, out, fp8=case.dtype == "fp8"))
            if entry["check"] == "mismatch":
                return entry, None, None, out
        try:
            replay = captured(torch, fn)
        except Exception as exc:  # a library that cannot be captured is still timed eagerly
            entry["graph_error"] = error_text(exc)
    except Exception as exc:  # a library that fails on a case is reported for it, the run goes on
        entry["error"] = error_text(exc)
        fn = replay = None
    return entry, fn, replay, out


def round_orders(names: list) -> list[list]:
    """Every rotation of `names`, then every rotation of it reversed: over these rounds each name takes
    each place and comes right after each other name (a round's first after the previous round's last).
    The reversed ones go in the order that keeps a name from following itself across rounds (from 3 names)."""
    n = len(names)
    rotations = [names[k:] + names[:k] for k in range(n)]
    return rotations + [rotations[-k][::-1] for k in range(n)] if n > 1 else rotations


def interleaved_us(timer: Timer, fns: dict) -> dict:
    """Each of `fns` (name -> function) timed in rounds (round_orders), each a 1/rounds share of its runs,
    so that what the GPU carries over from before falls on every library alike: name -> its rounds'
    times (their median is the library's time), or the exception that stopped it."""
    orders = round_orders(list(fns))
    return in_turns(fns, orders, lambda fn: timer.us(fn, share=1 / len(orders)))


def in_turns(fns: dict, orders: list[list], measure) -> dict:
    """`measure` of each of `fns` (name -> function) in every round of `orders`: name -> the list of its
    measurements, or the exception that stopped it (that library is measured no more; the others go on)."""
    got: dict = {name: [] for name in fns}
    failed: dict = {}
    for order in orders:
        for name in order:
            if name in failed:
                continue
            try:
                got[name].append(measure(fns[name]))
            except Exception as exc:
                failed[name] = exc
    return {name: failed.get(name, got[name]) for name in fns}


def case_row(case: Case) -> dict:
    """The report row of a case before any library ran: its shape and accounting."""
    flops, nbytes = case.accounting()
    return {"id": case.id, "dtype": case.dtype, "groups": bench_cases.groups_of(case), "batch": case.batch,
            "seqlen_q": case.seqlen_q, "heads_q": case.heads_q, "heads_kv": case.heads_kv, "seqlen": case.seqlen,
            "varlen": case.varlen, "causal": case.causal, "total_seqlen": sum(case.seqlens()), "flops": flops,
            "bytes": nbytes, "libraries": {}}


def measure_case(torch, timer: Timer, libs: list[Library], case: Case, seed: int, kernels: bool) -> dict:
    row = case_row(case)
    flops, nbytes = case.accounting()
    inputs = make_inputs(torch, case, seed)
    reference = None
    calls, replays = {}, {}
    for lib in libs:  # ours first: its output is what the peers are checked against
        if case.dtype not in lib.dtypes:
            continue
        entry, fn, replay, out = prepare_library(torch, lib, case, inputs, reference)
        if lib.name == bench_report.OURS and out is not None:
            reference = out.clone()
        row["libraries"][lib.name] = entry
        if fn is not None:
            calls[lib.name] = fn
        if replay is not None:
            replays[lib.name] = replay
        del out
    for mode, fns in (("graph", replays), ("eager", calls)):
        for name, rounds in interleaved_us(timer, fns).items():
            entry = row["libraries"][name]
            if isinstance(rounds, Exception):  # that library is done with this case (calls is eager's fns)
                entry["error"] = error_text(rounds)
                calls.pop(name, None)
            else:
                entry[mode] = dict(rates(statistics.median(rounds), flops, nbytes), rounds_us=rounds)
    for name, host_us in host_times_us(torch, calls).items():
        entry = row["libraries"][name]
        if isinstance(host_us, Exception):
            entry["error"] = error_text(host_us)
            continue
        entry["host_us"] = host_us
        fn = calls[name]
        if kernels:
            try:
                entry["kernels_us"], entry["kernels_critical_path"] = kernel_breakdown(torch, fn)
            except Exception as exc:  # the breakdown is extra: its failure keeps the timings
                entry["kernels_error"] = error_text(exc)
    del inputs, reference, calls, replays
    torch.cuda.empty_cache()
    return bench_report.finish_row(row)


def measure_ceilings(torch, timer: Timer, dtypes: list[str]) -> dict:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ceilings = {"copy_gbps": 2 * COPY_BYTES / timer.us(lambda: dst.copy_(src)) / 1e3, "matmul_tflops": {},
                "how": f"device-to-device copy of {COPY_BYTES >> 20} MiB (bytes read + written); "
                       f"{MATMUL_N}^3 torch matmul per dtype (fp8: bf16, the type our FP8 path computes "
                       "in); same timer as the cases"}
    del src, dst
    for dtype in dtypes:
        computed = "bf16" if dtype == "fp8" else dtype
        a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=getattr(torch, TORCH_DTYPES[computed]))
        b = torch.randn_like(a)
        ceilings["matmul_tflops"][dtype] = 2 * MATMUL_N ** 3 / timer.us(lambda: a @ b) / 1e6
    torch.cuda.empty_cache()
    return ceilings


def write_json(path: str, report: dict) -> None:
    """Atomically: a reader (or a kill) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def progress_line(i: int, total: int, elapsed: float, row: dict) -> str:
    parts = []
    for name, e in row["libraries"].items():
        if "graph" in e:
            parts.append(f"{name} {e['graph']['us']:.0f} us")
        elif "eager" in e:
            parts.append(f"{name} {e['eager']['us']:.0f} us eager (no graph)")
        else:
            parts.append(f"{name} {'disagrees' if e.get('check') == 'mismatch' else 'error'}")
    ratio = row.get("ours_over_best_peer")
    verdict = f" -> ours / best peer {ratio:.2f}" if ratio is not None else ""
    return f"[{i}/{total} {elapsed:4.0f} s] {row['dtype']} {row['id']}: " + ", ".join(parts) + verdict


class StopRequest:
    """A signal handler that asks the run to stop after the case in progress. SIGTERM (what `timeout`
    sends) is handled so rather than by raising: an exception in the middle of a CUDA-graph capture or
    a peer's JIT build could leave the process unable to finish its report."""

    def __init__(self):
        self.reason: str | None = None

    def __call__(self, signum, frame) -> None:
        self.reason = f"{signal.Signals(signum).name} received"
        print(f"{self.reason}: stopping after this case", file=sys.stderr, flush=True)


def run_cases(report: dict, cases: list[Case], measure: Callable[[int, Case], dict], path: str,
              budget_s: float | None = None, stop: StopRequest | None = None, clock=time.monotonic) -> dict:
    """Measure the cases in order, rewriting the JSON after each. Stops early, with what it has, on
    KeyboardInterrupt, on a StopRequest, or when the next case would likely end after budget_s."""
    start = clock()
    longest = 0.0
    report.update(complete=False, not_run=[c.label for c in cases])
    write_json(path, report)
    for i, case in enumerate(cases):
        if stop is not None and stop.reason:
            report["stopped"] = stop.reason
            break
        if budget_s is not None and clock() - start + longest > budget_s:
            report["stopped"] = f"time budget of {budget_s:.0f} s"
            break
        began = clock()
        try:
            row = measure(i, case)
        except KeyboardInterrupt:
            report["stopped"] = f"interrupted during {case.label}"
            break
        longest = max(longest, clock() - began)
        report["results"].append(row)
        report["not_run"] = [c.label for c in cases[i + 1:]]
        write_json(path, report)
        print(progress_line(i + 1, len(cases), clock() - start, row), flush=True)
    else:
        report["complete"] = True
    write_json(path, report)
    return report


def commit() -> str:
    """FLASHMLA_COMMIT (set by whoever copied the tree to the device), else git, else 'unknown'. A tree
    whose tracked files differ from git's HEAD says so ("<sha>-modified"): a copy of a working tree
    can carry a stale .git (it named an older commit in three of this project's device runs)."""
    if os.environ.get("FLASHMLA_COMMIT"):
        return os.environ["FLASHMLA_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=here, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=30, cwd=here, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-modified" if changed else head


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout
        return out.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="issue, matrix, all (default), shell patterns over their ids, or any "
                                        "case id such as b64-q1-h128-2048; comma-separated")
    parser.add_argument("--dtype", help=f"comma-separated, of {', '.join(bench_cases.DTYPES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="issue 7's table in bf16 (unless --cases/--dtype say)")
    parser.add_argument("--only", help="comma-separated library names: " + ", ".join(lib.name for lib in LIBRARIES))
    parser.add_argument("--json", help="results file (default benchmarks/results/<date>-<card>-<commit>.json); "
                                       "the .md and .png go beside it")
    parser.add_argument("--reps", type=int, help=f"timed runs per measurement (default: about {TARGET_S * 1000:.0f} "
                                                 f"ms worth, {MIN_REPS}-{MAX_REPS})")
    parser.add_argument("--budget-s", type=float, help="start no case that would likely end after this many seconds")
    parser.add_argument("--kernels", action="store_true", help="also record GPU time per kernel and the split of a call's span over its kernels (torch profiler)")
    parser.add_argument("--flush", choices=FLUSH_MODES, default="memset",
                        help="how L2 is flushed before each timed run: memset (the standard), read (L2 left clean), "
                             "none; the last two are diagnostics")
    parser.add_argument("--list", action="store_true", help="print the selected cases and exit (no GPU needed)")
    args = parser.parse_args(argv)
    args.cases = args.cases or ("issue" if args.quick else "all")
    args.dtype = args.dtype or ("bf16" if args.quick else ",".join(bench_cases.DTYPES))
    try:
        args.selected = bench_cases.select(args.cases, args.dtype.split(","))
    except ValueError as exc:
        parser.error(str(exc))
    names = [lib.name for lib in LIBRARIES]
    args.libraries = [lib for lib in LIBRARIES if args.only is None or lib.name in args.only.split(",")]
    unknown = set((args.only or "").split(",")) - set(names) - {""}
    if unknown:
        parser.error(f"--only {', '.join(sorted(unknown))}: choose from {', '.join(names)}")
    return args


def list_cases(cases: list[Case]) -> None:
    for case in cases:
        flops, nbytes = case.accounting()
        regime = "memory-bound" if case.memory_bound else "compute-bound"
        print(f"{case.label:36} {','.join(bench_cases.groups_of(case)) or '-':13} {regime:13} "
              f"{sum(case.seqlens()):>9} tokens {flops / 1e9:8.1f} GFLOP {nbytes / 1e6:8.1f} MB")
    print(f"{len(cases)} cases")


def main(argv=None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    if args.list:
        list_cases(args.selected)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU: the benchmark needs a Hopper GPU.")
        return 2
    info = {lib.name: library_info(lib) for lib in args.libraries}
    libs = [lib for lib in args.libraries if "version" in info[lib.name]]
    for name, lib_info in info.items():
        print(f"{name}: {lib_info.get('version') or 'not importable, left out: ' + lib_info['error']}", flush=True)
    report = {
        "schema": bench_report.SCHEMA,
        "card": torch.cuda.get_device_name(),
        "driver": driver_version(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
        "libraries": info,
        "timing": f"CUDA-event median, {flush_description(args.flush)} before every run, "
                  f"{MIN_REPS}-{MAX_REPS} runs after {WARMUP_CALLS} warm-up calls in each of 2n rounds for n "
                  "libraries (a case's libraries in turn, in every rotation of their order and its reverse; the "
                  "median of the rounds); page 64, shuffled pages; host time per eager call: the median of "
                  f"{HOST_ROUNDS} bursts of {HOST_CALLS} calls a library, the libraries taking turns",
        "check": f"every element within {CHECK_ABS:g} or {CHECK_REL:g} relative of ours, cosine difference "
                 f"<= {CHECK_COS:g} (fp8 rows: {CHECK_ABS_FP8:g} of ours' largest magnitude, cosine difference "
                 f"{CHECK_COS_FP8:g}), all finite",
        "results": [],
    }
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "results",
                                     bench_report.stem(report) + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop)
    timer = Timer(torch, args.reps, args.flush)
    try:
        report["ceilings"] = measure_ceilings(torch, timer, list(dict.fromkeys(c.dtype for c in args.selected)))
    except Exception as exc:  # the cases still mean something without the ceilings
        report.update(ceilings={}, ceilings_error=error_text(exc))
    print(f"ceilings: {bench_report.ceilings_line(report)}; {len(args.selected)} cases", flush=True)
    budget = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
    run_cases(report, args.selected, lambda i, case: measure_case(torch, timer, libs, case, i + 1, args.kernels),
              path, budget, stop)

    base = os.path.splitext(path)[0]
    for written in [path] + bench_report.write_outputs(report, base + ".md", base + ".png"):
        print(f"wrote {written}")
    print()
    print(bench_report.brief(report))
    return 0 if report["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
