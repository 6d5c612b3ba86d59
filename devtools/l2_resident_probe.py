"""Is a decode case bound by DRAM, by the L2 -> SM path, or by the kernel itself? (GPU; torch, CuPy, and
FlashMLA where importable.)

1. A plain read kernel on every SM (16-byte loads): the L2's read rate on buffers that stay in it, and
   DRAM's on one that does not.
2. Our call and FlashMLA's on scripts/bench.py's inputs (CUDA-graph replay, no L2 flush), first with the
   block table as bench.py makes it (distinct shuffled pages), then with every entry folded into a few
   blocks (entry % N), which stay in L2: the same shapes, work and requests, without DRAM behind them.
   A case whose time does not move is not waiting for DRAM.

    python devtools/l2_resident_probe.py [case ...]      (default: b128-q1-h128-4096 b128-q1-h64-4096 b64-q1-h128-1024)

The H200's answers (2026-11-30): benchmarks/results/2026-11-30-h200-l2-resident-probe.txt.
"""
import dataclasses
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import cupy as cp  # noqa: E402
import torch  # noqa: E402

import bench  # noqa: E402

READ_SOURCE = r'''
extern "C" __global__ void read_all(const uint4* __restrict__ a, size_t n, int rounds, unsigned* sink) {
  unsigned acc = 0;
  for (int r = 0; r < rounds; ++r)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
      const uint4 v = a[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads
}'''
FOLDS = (256, 64)   # blocks every entry is folded into: 18.9 and 4.7 MB of bf16 pages


def read_kernel(nbytes: int, rounds: int = 1, blocks_per_sm: int = 4, threads: int = 512):
    """A launch of the read kernel over a fresh buffer of `nbytes`, read `rounds` times."""
    kernel = cp.RawKernel(READ_SOURCE, "read_all")
    sink = cp.zeros(1, cp.uint32)
    data = cp.ones(nbytes // 4, cp.uint32)
    grid = (torch.cuda.get_device_properties(0).multi_processor_count * blocks_per_sm,)
    args = (data, cp.uint64(nbytes // 16), cp.int32(rounds), sink)
    # CuPy and torch both launch on the legacy default stream here, so torch's events time the kernel.
    return lambda: kernel(grid, (threads,), args)


def read_rate_tbps(timer: "bench.Timer", nbytes: int, rounds: int) -> float:
    return nbytes * rounds / (timer.us(read_kernel(nbytes, rounds)) * 1e-6) / 1e12


def main(case_ids: list[str]) -> None:
    timer = bench.Timer(torch, flush="none")
    for mb in (8, 16, 24, 32):
        print(f"L2 read {mb:3d} MB x 50 rounds: {read_rate_tbps(timer, mb << 20, 50):.2f} TB/s", flush=True)
    print(f"DRAM read 4096 MB x 1: {read_rate_tbps(timer, 4096 << 20, 1):.2f} TB/s", flush=True)

    libraries = [("ours", bench.ours)]
    try:
        import flash_mla  # noqa: F401
        libraries.append(("FlashMLA", bench.flashmla))
    except ImportError as exc:
        print(f"FlashMLA not importable ({exc}): ours only")
    for case_id in case_ids:
        case = bench.bench_cases.parse(case_id)
        inputs = bench.make_inputs(torch, case, 1)
        for fold in (0, *FOLDS):
            table = inputs.block_table if fold == 0 else inputs.block_table % fold
            folded = dataclasses.replace(inputs, block_table=table)
            times = [f"{name} {timer.us(bench.captured(torch, make(torch, case, folded))):7.1f} us"
                     for name, make in libraries]
            label = "distinct pages" if fold == 0 else f"pages folded into {fold} blocks"
            print(f"{case_id:22s} {label:28s} " + "  ".join(times), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["b128-q1-h128-4096", "b128-q1-h64-4096", "b64-q1-h128-1024"])
