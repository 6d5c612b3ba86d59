"""How fast does an SM turn e4m3 pairs into fp16 pairs? (GPU; CuPy.)

The FP8 kernels build V^T's wgmma A fragments in registers: per 16-bit register one byte permute and one
`cvt.rn.f16x2.e4m3x2` (SASS F2FP). If F2FP issues at a fraction of the integer pipe's rate, the conversions
of both computing warpgroups (which share each SM sub-partition) can bound a page's P V however its
wgmmas are scheduled. An exact alternative uses the integer pipe: the two bytes permuted into the high
byte of each 16-bit half, then `((w >> 1) & 0x3F803F80) | (w & 0x80008000)`, which is each value times
2^-8 as fp16 bits (the power of two folded into the output scale; e4m3 subnormals become fp16
subnormals, exactly). This probe times, per SM and clock, independent chains of:

- `f2fp`: byte permute + cvt.rn.f16x2.e4m3x2 (what the kernels do today, per register),
- `bits`: byte permute + shift + masks (the integer form),
- `half`: half of each, interleaved (both pipes at once),
- `ex2`: ex2.approx.ftz.f32 (the softmax's MUFU, for scale),
- `prmt`: byte permutes alone (the integer pipe's rate, for scale),

and checks on all 65536 byte pairs that `bits` times 256 equals `f2fp` (NaN bytes aside: 0x7F/0xFF become
+-480 there, where F2FP gives NaN; the kernels zero stale tokens before converting).

    python devtools/convert_rate_probe.py      # prints one JSON report

Measured on the H200 (benchmarks/results/2026-12-02-h200-4351b25-convert-rate-probe.json): F2FP is not slow.
A permute-and-convert step runs at 61 per ns per SM against 120 for a permute alone, so F2FP issues at the
integer pipe's rate; the integer form at 31 (twice the instructions), half of each at 42; ex2 at 32 (MUFU,
16 a clock). The integer form agrees with F2FP times 2^-8 on every finite e4m3 pair, and in the FP8 kernels
(ab162) it was exact (the tensor cores take fp16 subnormals as they are) but 0.5-11 % slower for half the
tiles and 2-28 % for all of them.
"""
import json

import cupy as cp
import numpy as np

SOURCE = r'''
__device__ __forceinline__ unsigned cvt_pair(unsigned w, unsigned sel) {
  const unsigned p = __byte_perm(w, 0x3c3c3c3cu, sel);
  unsigned h;
  asm volatile("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)p));
  return h;
}
__device__ __forceinline__ unsigned bits_pair(unsigned w, unsigned sel) {
  const unsigned q = __byte_perm(w, 0x3c3c3c3cu, sel);  // bytes at 1 and 3
  return ((q >> 1) & 0x3F803F80u) | (q & 0x80008000u);
}

// One step of a chain: f2fp and bits as the kernels would spend them per 16-bit register; prmt and ex2
// one instruction each, for the integer pipe's and MUFU's rates.
template <int kMode>
__device__ __forceinline__ unsigned step(unsigned x, int j) {
  if (kMode == 0) return cvt_pair(x, 0x5140u);
  if (kMode == 1) return bits_pair(x, 0x4000u);
  if (kMode == 2) return (j & 1) ? bits_pair(x, 0x4000u) : cvt_pair(x, 0x5140u);
  if (kMode == 3) {
    float f = __uint_as_float(x);
    asm volatile("ex2.approx.ftz.f32 %0, %0;" : "+f"(f));
    return __float_as_uint(f);
  }
  return __byte_perm(x, 0x3c3c3c3cu, 0x4051u);
}

template <int kMode>
__device__ void run(unsigned* out, int iters) {
  unsigned v[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = threadIdx.x * 2654435761u + j * 40503u + blockIdx.x;
#pragma unroll 1
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = step<kMode>(v[j], j);
    }
  }
  unsigned s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) s ^= v[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

extern "C" __global__ void rate_f2fp(unsigned* out, int iters) { run<0>(out, iters); }
extern "C" __global__ void rate_bits(unsigned* out, int iters) { run<1>(out, iters); }
extern "C" __global__ void rate_half(unsigned* out, int iters) { run<2>(out, iters); }
extern "C" __global__ void rate_ex2(unsigned* out, int iters) { run<3>(out, iters); }
extern "C" __global__ void rate_prmt(unsigned* out, int iters) { run<4>(out, iters); }

extern "C" __global__ void agree(unsigned* f2fp, unsigned* bits) {
  const unsigned pair = blockIdx.x * blockDim.x + threadIdx.x;  // 0 .. 65535: low byte, high byte
  unsigned h;
  asm volatile("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"((unsigned short)pair));
  f2fp[pair] = h;
  const unsigned q = ((pair & 0xffu) << 8) | ((pair >> 8) << 24);
  bits[pair] = ((q >> 1) & 0x3F803F80u) | (q & 0x80008000u);
}
'''
MODES = ("f2fp", "bits", "half", "ex2", "prmt")
THREADS = 512
ITERS = 1024


def main() -> None:
    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    sms = props["multiProcessorCount"]
    module = cp.RawModule(code=SOURCE, options=("-arch=sm_90a", "-std=c++17"))
    out = cp.zeros(sms * 4 * THREADS, dtype=cp.uint32)
    report = {"card": props["name"].decode(), "sms": sms, "threads_per_block": THREADS, "blocks": 4 * sms,
              "chains_per_thread": 8, "iters": ITERS, "rates": {}}
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    for mode in MODES:
        kernel = module.get_function(f"rate_{mode}")
        kernel((4 * sms,), (THREADS,), (out, cp.int32(64)))  # warm-up
        best = None
        for _ in range(5):
            start.record()
            kernel((4 * sms,), (THREADS,), (out, cp.int32(ITERS)))
            stop.record()
            stop.synchronize()
            ms = cp.cuda.get_elapsed_time(start, stop)
            best = ms if best is None else min(best, ms)
        steps = 4 * sms * THREADS * 8 * 4 * ITERS
        report["rates"][mode] = {"ms": best, "steps_per_ns_per_sm": steps / (best * 1e6) / sms}
    f2fp = cp.zeros(65536, dtype=cp.uint32)
    bits = cp.zeros(65536, dtype=cp.uint32)
    module.get_function("agree")((256,), (256,), (f2fp, bits))
    a = f2fp.get().view(np.float16).reshape(-1, 2).astype(np.float64)
    b = bits.get().view(np.float16).reshape(-1, 2).astype(np.float64) * 256.0
    finite = np.isfinite(a)
    report["agree_on_finite_values"] = bool(np.array_equal(a[finite], b[finite]))
    report["nan_values_in_f2fp"] = int((~finite).sum())
    report["bits_at_nan_bytes"] = sorted({float(x) for x in b[~finite]})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
