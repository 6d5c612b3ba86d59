"""compute-sanitizer racecheck's false WAR reports on a two-warpgroup exchange, in a kernel race-free by
construction (the pattern of the two-warpgroup FP8 narrow kernel's O merge, branch wip/narrow-fp8-2wg).

Warpgroup 1 hands 4 rounds of a float4 per thread to warpgroup 0 through one shared buffer; every write
and every read of the buffer is separated by `barrier.sync 1, 256` (both warpgroups), or, with --arrive,
by barrier.arrive / barrier.sync pairs (PTX: an arriving thread's earlier accesses are performed when
the barrier completes). Before the exchange each warpgroup passes pairs of barriers of its own (ids 4
and 5, 128 threads each) as the kernel's per-page softmax does, `--own P0,P1` pairs.

Measured on the H200 (compute-sanitizer 2025.3.1, 2026-11-30) with the session's scratch version of
this kernel (the same code paths; this file restates it and has not run on a GPU itself): with 3,3
pairs racecheck reports nothing; with 3,2 it reports "Potential WAR hazard detected at __shared__
0xa00 ... Read Thread (96,0,0) ... Write Thread (224,0,0) ... Current Value : 0, Incoming Value : 0",
the kernel's own signature; with the arrive/sync rounds it reports hazards with no pairs at all
(0,0). Every run's sums were right.

    compute-sanitizer --tool racecheck python devtools/racecheck_repro.py --own 3,2
"""
from __future__ import annotations

import argparse

SOURCE = r'''
extern "C" __global__ void __launch_bounds__(384, 1) exchange(float* out, int own0, int own1, int arrive) {
  __shared__ __align__(16) float4 buffer[4 * 128];
  __shared__ float scratch[2][128];
  const int warp = __shfl_sync(0xffffffffu, threadIdx.x / 32, 0);
  if (warp >= 8) return;  // the kernel's loader warpgroup, idle here
  const int wg = warp / 4, t = threadIdx.x % 128;
  float sum = 0.f;
  for (int i = 0; i < (wg == 0 ? own0 : own1); ++i) {  // each warpgroup's own barriers
    if (t % 32 == 0) scratch[wg][t] = i;
    asm volatile("barrier.sync %0, 128;" ::"r"(4 + wg) : "memory");
    sum += 0.f * scratch[wg][t / 32 * 32];
    asm volatile("barrier.sync %0, 128;" ::"r"(4 + wg) : "memory");
  }
  for (int round = 0; round < 4; ++round) {
    if (arrive) {
      if (wg == 1) {
        if (round > 0) asm volatile("barrier.sync 3, 256;" ::: "memory");   // round - 1 was read
        for (int i = 0; i < 4; ++i) buffer[i * 128 + t] = make_float4(round, i, t, 1.f);
        asm volatile("barrier.arrive 2, 256;" ::: "memory");                 // round written
      } else {
        asm volatile("barrier.sync 2, 256;" ::: "memory");
        for (int i = 0; i < 4; ++i) sum += buffer[i * 128 + t].x;
        if (round < 3) asm volatile("barrier.arrive 3, 256;" ::: "memory");  // round read
      }
    } else {
      if (round > 0) asm volatile("barrier.sync 1, 256;" ::: "memory");     // round - 1 was read
      if (wg == 1) for (int i = 0; i < 4; ++i) buffer[i * 128 + t] = make_float4(round, i, t, 1.f);
      asm volatile("barrier.sync 1, 256;" ::: "memory");                     // round written
      if (wg == 0) for (int i = 0; i < 4; ++i) sum += buffer[i * 128 + t].x;
    }
  }
  out[threadIdx.x] = sum;
}
'''


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--own", default="3,2", help="pairs of barriers of their own, warpgroup 0 and 1 (default 3,2)")
    parser.add_argument("--arrive", action="store_true", help="the rounds on barrier.arrive/sync pairs")
    args = parser.parse_args(argv)
    own0, own1 = (int(n) for n in args.own.split(","))

    import cupy as cp

    kernel = cp.RawKernel(SOURCE, "exchange", options=("-arch=sm_90a",))
    out = cp.zeros(384, cp.float32)
    kernel((4,), (384,), (out, cp.int32(own0), cp.int32(own1), cp.int32(args.arrive)))
    total = float(out[0])
    print(f"own barrier pairs {own0},{own1}, arrive {args.arrive}: warpgroup 0's sum {total} (expected 24.0)")
    return 0 if total == 24.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
