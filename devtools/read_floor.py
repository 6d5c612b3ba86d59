"""How fast can a memory-bound decode case be at all, under the benchmark's L2 flush? (GPU; torch, CuPy,
and the peers where importable.)

For each case: a plain all-SM read kernel (devtools/l2_resident_probe.py's) over a contiguous buffer of
the case's bytes (SPEC's accounting: cache, q and output); for a case of equal lengths, the same kernel's
loads over the case's cache pages only, in a random order as scripts/bench.py's block tables are, read one CTA per
request (a decode plan of one part per request on one SM each: "per-request reads") and one small block
per page (the hardware's block scheduler balancing the SMs: "per-page reads") and claimed a page at a time
by each warp of one CTA per SM from a counter ("claimed reads": balanced, persistent); then the libraries on scripts/bench.py's inputs
(CUDA-graph replay), each timed after the memset flush scripts/bench.py uses and after a read flush
(which leaves L2 clean): the memset leaves L2 full of dirty lines that any kernel running next writes back
to DRAM while it reads, so the read kernel after the memset is the floor that flush method puts under
every library's time.

    python devtools/read_floor.py [CASE-DTYPE ...]   (default: b128-q1-h16-4096-fp8 b128-q1-h32-8192-fp8
                                                      b128-q1-h16-4096-bf16 b128-q1-h32-8192-bf16)
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "devtools")]

import torch  # noqa: E402

import bench  # noqa: E402
from l2_resident_probe import read_kernel  # noqa: E402

FLUSHES = ("memset", "read")

# Pages read by a CTA in turn, 8 independent 16-byte loads a thread in flight.
PAGES_SOURCE = r'''
extern "C" __global__ void read_pages(const uint4* __restrict__ a, const int* __restrict__ pages, int pages_per_cta,
                                      int page_vec, unsigned* sink) {
  const long long total = (long long)pages_per_cta * page_vec;
  const int* mine = pages + (size_t)blockIdx.x * pages_per_cta;
  unsigned acc = 0;
  for (long long base = threadIdx.x; base < total; base += 8LL * blockDim.x) {
    uint4 v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const long long idx = base + (long long)k * blockDim.x;
      v[k] = idx < total ? a[(size_t)mine[idx / page_vec] * page_vec + idx % page_vec] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads
}'''

# The same pages claimed a page at a time by each warp of one 1024-thread CTA per SM from a counter in
# global memory (the next claim in flight while a page is read): no static partition, so no SM waits on
# the others' share. (On the H200 slower than the per-request reads: docs/PERF_NOTES.md, thirtieth
# session.) The last warp out resets the counters for the next launch.
CLAIMED_SOURCE = r'''
extern "C" __global__ void read_claimed(const uint4* __restrict__ a, const int* __restrict__ pages, unsigned num_pages,
                                        int page_vec, unsigned* counters, unsigned* sink) {
  const int lane = threadIdx.x % 32;
  unsigned acc = 0;
  unsigned page = __shfl_sync(0xffffffffu, lane == 0 ? atomicAdd(&counters[0], 1u) : 0u, 0);
  while (page < num_pages) {
    const unsigned next = lane == 0 ? atomicAdd(&counters[0], 1u) : 0u;
    const uint4* src = a + (size_t)pages[page] * page_vec;
    for (int base = lane; base < page_vec; base += 8 * 32) {
      uint4 v[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = base + k * 32 < page_vec ? src[base + k * 32] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    page = __shfl_sync(0xffffffffu, next, 0);
  }
  if (lane == 0 && atomicAdd(&counters[1], 1u) == gridDim.x * blockDim.x / 32 - 1) {
    counters[0] = 0;  // every warp of this launch has made its last claim
    counters[1] = 0;
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads
}'''


def page_reads(case, per_request: bool):
    """A launch reading the case's cache pages (a seeded random permutation) one CTA per request of 1024
    threads, or one block of 256 threads per page."""
    import cupy as cp

    pages_per_request = -(-case.seqlen // 64)
    pages = case.batch * pages_per_request
    page_vec = 64 * 576 * case.heads_kv * (1 if case.dtype == "fp8" else 2) // 16
    data = cp.ones(pages * page_vec * 4, cp.uint32)
    order = cp.asarray(torch.randperm(pages, generator=torch.Generator().manual_seed(1)).numpy().astype("int32"))
    kernel = cp.RawKernel(PAGES_SOURCE, "read_pages")
    sink = cp.zeros(1, cp.uint32)
    if per_request:
        grid, threads, per_cta = case.batch, 1024, pages_per_request
    else:
        grid, threads, per_cta = pages, 256, 1
    args = (data, order, cp.int32(per_cta), cp.int32(page_vec), sink)
    return lambda: kernel((grid,), (threads,), args)


def claimed_page_reads(case):
    """The case's cache pages (the same permutation as page_reads) claimed a page at a time by the warps
    of one 1024-thread CTA per SM."""
    import cupy as cp

    pages = case.batch * -(-case.seqlen // 64)
    page_vec = 64 * 576 * case.heads_kv * (1 if case.dtype == "fp8" else 2) // 16
    data = cp.ones(pages * page_vec * 4, cp.uint32)
    order = cp.asarray(torch.randperm(pages, generator=torch.Generator().manual_seed(1)).numpy().astype("int32"))
    kernel = cp.RawKernel(CLAIMED_SOURCE, "read_claimed")
    counters = cp.zeros(2, cp.uint32)
    sink = cp.zeros(1, cp.uint32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    args = (data, order, cp.uint32(pages), cp.int32(page_vec), counters, sink)
    return lambda: kernel((sms,), (1024,), args)


def main(labels: list[str]) -> None:
    timers = {flush: bench.Timer(torch, flush=flush) for flush in FLUSHES}
    print(f"{torch.cuda.get_device_name()}; times in us, CUDA-event median; " +
          ", ".join(bench.flush_description(f) for f in FLUSHES), flush=True)
    for label in labels:
        case_id, _, dtype = label.rpartition("-")
        case = bench.bench_cases.parse(case_id, dtype)
        _, nbytes = case.accounting()
        rows = {"read kernel": (None, read_kernel(nbytes))}
        if not case.varlen:
            rows["per-request reads"] = (None, page_reads(case, per_request=True))
            rows["per-page reads"] = (None, page_reads(case, per_request=False))
            rows["claimed reads"] = (None, claimed_page_reads(case))
        inputs = bench.make_inputs(torch, case, seed=1)   # not checked against each other: timing only
        for lib in bench.LIBRARIES:
            if dtype not in lib.dtypes:
                continue
            try:   # the call stays referenced: its plan lives in its closure, which the graph replays
                fn = lib.make(torch, case, inputs)
                rows[lib.name] = (fn, bench.captured(torch, fn))
            except Exception as exc:  # a peer that does not import or run here
                print(f"  {lib.name}: {bench.error_text(exc)}")
        for name, (_, replay) in rows.items():
            times = {flush: timers[flush].us(replay) for flush in FLUSHES}
            print(f"{label:24s} {nbytes / 1e6:7.1f} MB  {name:20s} " +
                  "  ".join(f"{flush} {us:7.1f} us ({nbytes / us / 1e6:.2f} TB/s)" for flush, us in times.items()),
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["b128-q1-h16-4096-fp8", "b128-q1-h32-8192-fp8", "b128-q1-h16-4096-bf16",
                          "b128-q1-h32-8192-bf16"])
