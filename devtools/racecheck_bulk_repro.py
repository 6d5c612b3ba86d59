"""Does compute-sanitizer racecheck accept a ring of shared-memory slots refilled by cp.async.bulk?

The 16-row FP8 narrow kernel on pages read by one linear bulk copy each (ab128) was exact, memcheck and
synccheck clean, but racecheck reported every read of a page slot as racing with the bulk copy that
later refilled the slot, however the release was ordered (per-warp arrivals, one arrival after a
warpgroup barrier, fence.proxy.async on either side: docs/PERF_NOTES.md, ab128-ab130). The TMA-box
loader with the same release protocol was always clean. This kernel is that protocol and nothing else:

- a loader thread fills two 4 KB slots in turn, 16 pages; page n waits for the release of page n - 2;
- four warps wait until a page has landed, read it (32 bytes a thread), and each warp's lane 0 arrives
  on the slot's "empty" barrier (four arrivals) after __syncwarp (`--every-thread`: each thread
  arrives, 128 arrivals);
- `--copy bulk` fills a slot with one cp.async.bulk (the linear loader), `--copy tensor` with one
  cp.async.bulk.tensor box of a 64-byte swizzled map (the box loader; its descriptor in global memory),
  `--copy store` with plain st.shared by the loader thread (then a plain arrival).
  `--fence` puts fence.proxy.async.shared::cta between the loader's wait and its copy;
  `--unsafe` has each thread arrive before it reads the slot (128 arrivals): a real race between the
  reads and the next fill, the control that racecheck sees that kind of copy at all.

The sums are checked (except with --unsafe). On the H200 (compute-sanitizer of the CUDA 13.0 image;
benchmarks/results/2026-12-01-h200-4a00146-racecheck-repro-and-ncu-fp8-h16.txt): `bulk`, `bulk --fence`
and `store` are flagged, and clean with `--every-thread`: racecheck does not take one lane's arrival
after __syncwarp as releasing its warp's reads, which the PTX memory model does (the report is the
tool's). `tensor` is clean, but so is `tensor --unsafe`, whose race showed in its sum: racecheck does not
see TMA box writes at all.

    compute-sanitizer --tool racecheck python devtools/racecheck_bulk_repro.py --copy bulk
"""
from __future__ import annotations

import argparse

import numpy as np

PAGES, PAGE_BYTES, BLOCK_TOKENS, ROW_BYTES = 16, 4096, 64, 576
MODES = {"bulk": 0, "tensor": 1, "store": 2}

SOURCE = r'''
__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void wait(unsigned long long* bar, int parity) {
  unsigned done = 0;
  while (!done) {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 " selp.u32 %0, 1, 0, p;\n}" : "=r"(done) : "r"(smem(bar)), "r"(parity) : "memory");
  }
}
__device__ __forceinline__ void arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem(bar)) : "memory");
}

extern "C" __global__ void __launch_bounds__(160, 1) ring(const unsigned char* cache, const void* map, float* out,
                                                          int mode, int fence, int every_thread, int unsafe) {
  constexpr int kPages = 16, kPageBytes = 4096, kBlockBytes = 64 * 576;
  __shared__ __align__(1024) unsigned char slots[2][kPageBytes];
  __shared__ __align__(8) unsigned long long full[2], empty[2];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int s = 0; s < 2; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem(&full[s])));
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem(&empty[s])), "r"(every_thread || unsafe ? 128 : 4));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 4) {  // the loader
    if (lane != 0) return;
    for (int n = 0; n < kPages; ++n) {
      const int s = n % 2;
      if (n >= 2) wait(&empty[s], ((n / 2) - 1) & 1);
      if (fence) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      // page n: the first 4 KB of block n (bulk, store) or its box of columns 0-63 x 64 tokens (tensor)
      const unsigned char* page = cache + (long long)n * kBlockBytes;
      if (mode == 2) {
        for (int i = 0; i < kPageBytes / 16; ++i) {
          reinterpret_cast<uint4*>(slots[s])[i] = reinterpret_cast<const uint4*>(page)[i];
        }
        arrive(&full[s]);
        continue;
      }
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem(&full[s])), "r"(kPageBytes)
                   : "memory");
      if (mode == 0) {
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(smem(slots[s])), "l"(page), "r"(kPageBytes), "r"(smem(&full[s])) : "memory");
      } else {
        asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
                     " [%0], [%1, {%2, %3, %4, %5}], [%6];"
                     :: "r"(smem(slots[s])), "l"(map), "r"(0), "r"(0), "r"(0), "r"(n), "r"(smem(&full[s]))
                     : "memory");
      }
    }
    return;
  }
  float sum = 0.f;  // the four computing warps
  for (int n = 0; n < kPages; ++n) {
    const int s = n % 2;
    wait(&full[s], (n / 2) & 1);
    if (unsafe) arrive(&empty[s]);  // released before it is read: the next fill races with the reads
    const uint4* mine = reinterpret_cast<const uint4*>(slots[s]) + 2 * threadIdx.x;
    for (int i = 0; i < 2; ++i) {
      const uint4 v = mine[i];
      const unsigned words[4] = {v.x, v.y, v.z, v.w};
      for (int w = 0; w < 4; ++w) {
        for (int b = 0; b < 4; ++b) sum += float((words[w] >> (8 * b)) & 0xff);
      }
    }
    if (every_thread && !unsafe) {
      arrive(&empty[s]);
    } else if (!unsafe) {
      __syncwarp();
      if (lane == 0) arrive(&empty[s]);
    }
  }
  out[threadIdx.x] = sum;
}
'''


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copy", choices=sorted(MODES), default="bulk", help="how the loader fills a slot")
    parser.add_argument("--fence", action="store_true", help="fence.proxy.async between the loader's wait and copy")
    parser.add_argument("--every-thread", action="store_true",
                        help="each reading thread arrives on the empty barrier (128 arrivals) instead of lane 0 of each warp")
    parser.add_argument("--unsafe", action="store_true",
                        help="each thread releases a slot before reading it: a real race, which racecheck should flag "
                             "for every kind of copy it sees (the sum may differ)")
    args = parser.parse_args(argv)

    import cupy as cp

    from flashmla_cupy import launch

    rng = np.random.default_rng(0)
    cache = rng.integers(0, 4, size=(PAGES, BLOCK_TOKENS, 1, ROW_BYTES), dtype=np.uint8)  # small bytes: exact sums
    if args.copy == "tensor":  # 64 tokens x columns 0-63 of each block (swizzling moves bytes, not their sum)
        expected = float(cache[:, :, 0, :64].sum(dtype=np.int64))
    else:
        expected = float(sum(cache[n].reshape(-1)[:PAGE_BYTES].sum(dtype=np.int64) for n in range(PAGES)))
    cache_dev = cp.asarray(cache)
    strides = tuple(s // cache.itemsize for s in cache.strides)
    descriptor = launch.kv_tensor_map(cache_dev.data.ptr, cache.shape, strides, np.dtype("uint8"), BLOCK_TOKENS, 64)
    map_dev = cp.asarray(np.frombuffer(bytes(descriptor), dtype=np.uint8))  # 256-byte aligned
    out = cp.zeros(160, cp.float32)
    kernel = cp.RawKernel(SOURCE, "ring", options=("-arch=sm_90a",))
    kernel((1,), (160,), (cache_dev, map_dev, out, cp.int32(MODES[args.copy]), cp.int32(args.fence),
                          cp.int32(args.every_thread), cp.int32(args.unsafe)))
    total = float(out[:128].sum())
    print(f"copy {args.copy}, fence {args.fence}, every thread {args.every_thread}, unsafe {args.unsafe}: "
          f"sum {total:.0f} (expected {expected:.0f})")
    return 0 if total == expected or args.unsafe else 1


if __name__ == "__main__":
    raise SystemExit(main())
