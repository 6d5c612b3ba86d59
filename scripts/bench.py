"""Side-by-side decode benchmark: flashmla_cupy vs FlashMLA (dense legacy kernel) vs FlashInfer fa3.

Runs on a Hopper GPU with torch and triton. Every library gets the same torch inputs: bf16, page 64,
randomly shuffled pages, random data; times are CUDA-event medians from triton's do_bench, which
flushes L2 before every run; metadata is computed before timing. FLOPs and bytes follow SPEC.md
section 5 (FlashMLA's accounting). Peers are optional: a missing or failing peer is reported, not
fatal.

    python scripts/bench.py [--json results.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings

from flashmla_cupy.reference import HEAD_DIM, HEAD_DIM_V, perf_accounting
from flashmla_cupy.reference import PAGE_SIZE as PAGE

# (batch, seqlen_q, heads_q, heads_kv, seqlen, causal); the first four are the peer table of DEVELOPERS.md.
CASES = [
    (128, 1, 128, 1, 4096, False),
    (32, 1, 128, 1, 8192, False),
    (64, 1, 128, 1, 1024, False),
    (128, 1, 16, 1, 4096, False),
    (128, 2, 64, 1, 4096, True),
    (128, 1, 32, 1, 8192, False),
    (128, 1, 64, 1, 16384, False),
    (128, 2, 128, 1, 8192, True),
]


def make_inputs(torch, b, s_q, h_q, h_kv, seqlen, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    pages = math.ceil(seqlen / PAGE)
    q = (torch.randn(b, s_q, h_q, HEAD_DIM, generator=g, device=dev) / 10).clamp_(-1, 1).bfloat16()
    k_cache = (torch.randn(b * pages, PAGE, h_kv, HEAD_DIM, generator=g, device=dev) / 10).clamp_(-1, 1).bfloat16()
    block_table = torch.randperm(b * pages, generator=g, device=dev).int().view(b, pages)
    seqlens = torch.full((b,), seqlen, dtype=torch.int32, device=dev)
    return q, k_cache, block_table, seqlens


def ours(torch, q, k_cache, block_table, seqlens, causal, scale):
    import flashmla_cupy

    h_kv = k_cache.shape[2]
    meta, splits = flashmla_cupy.get_mla_metadata(seqlens, q.shape[1] * q.shape[2] // h_kv, h_kv)
    return lambda: flashmla_cupy.flash_mla_with_kvcache(
        q, k_cache, block_table, seqlens, HEAD_DIM_V, meta, splits, softmax_scale=scale, causal=causal)


def flashmla(torch, q, k_cache, block_table, seqlens, causal, scale):
    import flash_mla

    meta, _ = flash_mla.get_mla_metadata()
    fn = lambda: flash_mla.flash_mla_with_kvcache(  # noqa: E731
        q, k_cache, block_table, seqlens, HEAD_DIM_V, meta, softmax_scale=scale, causal=causal, use_legacy=True)
    fn()  # the first call fills the scheduler metadata; later calls reuse it
    return fn


def flashinfer_fa3(torch, q, k_cache, block_table, seqlens, causal, scale):
    import flashinfer

    b, s_q, h_q, _ = q.shape
    if k_cache.shape[2] != 1:
        raise RuntimeError("FlashInfer MLA supports one KV head")
    pages = block_table.shape[1]
    dev = q.device
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(workspace, backend="fa3")
    qo_indptr = torch.arange(0, b + 1, dtype=torch.int32, device=dev) * s_q
    kv_indptr = torch.arange(0, b + 1, dtype=torch.int32, device=dev) * pages
    kv_indices = block_table.reshape(-1).contiguous()
    ckv = k_cache[:, :, 0, :HEAD_DIM_V]
    kpe = k_cache[:, :, 0, HEAD_DIM_V:]
    q_nope = q[..., :HEAD_DIM_V].reshape(b * s_q, h_q, HEAD_DIM_V)
    q_pe = q[..., HEAD_DIM_V:].reshape(b * s_q, h_q, HEAD_DIM - HEAD_DIM_V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper.plan(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_len_arr=seqlens,
                     num_heads=h_q, head_dim_ckv=HEAD_DIM_V, head_dim_kpe=HEAD_DIM - HEAD_DIM_V, page_size=PAGE,
                     causal=causal, sm_scale=scale, q_data_type=q.dtype, kv_data_type=k_cache.dtype)

        def fn():
            return wrapper.run(q_nope=q_nope, q_pe=q_pe, ckv_cache=ckv, kpe_cache=kpe)
        fn()
    return fn


LIBRARIES = {"flashmla_cupy": ours, "FlashMLA": flashmla, "FlashInfer-fa3": flashinfer_fa3}


def per_call_us(fn, calls: int, repeats: int = 1) -> list[float]:
    """Microseconds per call of `repeats` bursts of `calls` calls of fn (wall time, no syncs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return times


def host_time_us(torch, fn, calls: int = 50) -> float:
    """Host (CPU) time of one call: launches are asynchronous, so a burst of calls measures Python and
    driver overhead alone while the GPU queue is far from full."""
    torch.cuda.synchronize()
    (us,) = per_call_us(fn, calls)
    torch.cuda.synchronize()
    return us


def captured(torch, fn):
    """fn captured in a CUDA graph (after a warm-up call on the capture stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


def kernel_breakdown(torch, fn, calls: int = 20) -> dict[str, float]:
    """GPU time per call of each kernel `fn` launches (torch profiler), in microseconds."""
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
    return dict(sorted(totals.items(), key=lambda kv: -kv[1])[:6])


def first_output(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="only the four peer-table cases")
    parser.add_argument("--only", default=None, help="comma-separated library names")
    parser.add_argument("--kernels", action="store_true", help="also record GPU time per kernel (torch profiler)")
    args = parser.parse_args(argv)

    import torch
    import triton.testing

    if not torch.cuda.is_available():
        print("No CUDA GPU: the benchmark needs a Hopper GPU.")
        return 2
    libs = {k: v for k, v in LIBRARIES.items() if args.only is None or k in args.only.split(",")}
    cases = CASES[:4] if args.quick else CASES
    results = []
    for (b, s_q, h_q, h_kv, seqlen, causal) in cases:
        q, k_cache, block_table, seqlens = make_inputs(torch, b, s_q, h_q, h_kv, seqlen, seed=len(results) + 1)
        scale = HEAD_DIM ** -0.5
        flops, nbytes = perf_accounting(b * seqlen, b, s_q, h_q, h_kv)
        row = {"batch": b, "seqlen_q": s_q, "heads_q": h_q, "heads_kv": h_kv, "seqlen": seqlen, "causal": causal,
               "libraries": {}}
        reference = None
        for name, make in libs.items():
            entry = {}
            try:
                fn = make(torch, q, k_cache, block_table, seqlens, causal, scale)
                out = first_output(fn()).reshape(b, s_q, h_q, HEAD_DIM_V).float()
                if reference is None:
                    reference = out
                else:
                    entry["max_abs_diff_vs_first"] = float((out - reference).abs().max())
                ms = triton.testing.do_bench(fn, warmup=30, rep=200, return_mode="median")
                entry.update(ms=ms, tflops=flops / 1e9 / ms, gbps=nbytes / 1e6 / ms, host_us=host_time_us(torch, fn))
                try:  # replayed from a CUDA graph, as serving engines run decode: no host overhead
                    graph_ms = triton.testing.do_bench(captured(torch, fn), warmup=30, rep=200, return_mode="median")
                    entry.update(graph_ms=graph_ms, graph_tflops=flops / 1e9 / graph_ms,
                                 graph_gbps=nbytes / 1e6 / graph_ms)
                except Exception as exc:
                    entry["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                if args.kernels:
                    try:
                        entry["kernels_us"] = kernel_breakdown(torch, fn)
                    except Exception as exc:
                        entry["kernels_error"] = f"{type(exc).__name__}: {exc}"[:300]
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
            row["libraries"][name] = entry
        results.append(row)
        print(json.dumps(row), flush=True)  # partial results survive a time limit
        del q, k_cache, block_table, seqlens
        torch.cuda.empty_cache()

    device = torch.cuda.get_device_name()
    report = {
        "card": device,
        "commit": os.environ.get("FLASHMLA_COMMIT", "unknown"),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "timing": "triton.testing.do_bench median, L2 flushed before each run, bf16, page 64, shuffled pages",
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)

    names = list(libs)
    print_table(results, names, device, report["commit"], graph=False)
    print_table(results, names, device, report["commit"], graph=True)
    if args.kernels:
        print("\nGPU time per call by kernel (us)")
        for row in results:
            for name, e in row["libraries"].items():
                if "kernels_us" in e:
                    parts = ", ".join(f"{k}: {v:.1f}" for k, v in e["kernels_us"].items())
                    print(f"b={row['batch']} h_q={row['heads_q']} seqlen={row['seqlen']} {name}: {parts}")
    for row in results:
        for name, e in row["libraries"].items():
            if "error" in e:
                print(f"{name} failed on b={row['batch']} h_q={row['heads_q']}: {e['error']}", file=sys.stderr)
    return 0


def headline(row: dict, prefix: str = "") -> tuple:
    """The figure that matters for one benchmark case: GB/s when at most one row tile per KV head
    (memory-bound), else TFLOPS. Returns (key, unit, {library: value}, best peer, ours / best peer);
    `prefix` "graph_" reads the CUDA-graph replay figures."""
    memory_bound = row["seqlen_q"] * row["heads_q"] // row["heads_kv"] <= 64
    key, unit = ("gbps", "GB/s") if memory_bound else ("tflops", "TFLOPS")
    values = {name: e[prefix + key] for name, e in row["libraries"].items() if prefix + key in e}
    peers = {name: v for name, v in values.items() if name != "flashmla_cupy"}
    best = max(peers, key=peers.get) if peers else None
    ratio = values["flashmla_cupy"] / peers[best] if best and "flashmla_cupy" in values else None
    return key, unit, values, best, ratio


def print_table(results, names, device, commit, graph: bool) -> None:
    prefix = "graph_" if graph else ""
    mode = "CUDA-graph replay" if graph else "eager calls (host overhead included when it exceeds GPU time)"
    print(f"\n{device}  commit {commit}  {mode}")
    header = "| case | " + " | ".join(names) + " | ours / best peer |"
    print(header)
    print("|" + "---|" * (len(names) + 2))
    for row in results:
        key, unit, values, _, ratio = headline(row, prefix)
        cells = []
        for name in names:
            e = row["libraries"][name]
            if name not in values:
                cells.append("n/a")
            else:
                host = "" if graph else f"; host {e['host_us']:.0f} us"
                cells.append(f"{values[name]:.0f} {unit} ({e[prefix + 'ms'] * 1000:.0f} us{host})")
        ratio = f"{ratio:.2f}" if ratio is not None else "-"
        label = (f"b={row['batch']} s_q={row['seqlen_q']} h_q={row['heads_q']} h_kv={row['heads_kv']} "
                 f"seqlen={row['seqlen']}{' causal' if row['causal'] else ''}")
        print(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
