// The 16-bit element type of q, k_cache and out, chosen at compile time (-DFLASHMLA_BF16=1 or
// -DFLASHMLA_FP16=1), and the constants of the output that the decode and combine kernels share.
#pragma once

#if !defined(FLASHMLA_BF16) && !defined(FLASHMLA_FP16)
#error "define FLASHMLA_BF16 or FLASHMLA_FP16"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace flashmla {

// Two floats rounded to a pair of 16-bit values, the pair's type chosen by the caller.
template <class Pair>
__device__ __forceinline__ Pair round_pair(float a, float b);
template <>
__device__ __forceinline__ __nv_bfloat162 round_pair<__nv_bfloat162>(float a, float b) {
  return __floats2bfloat162_rn(a, b);
}
template <>
__device__ __forceinline__ __half2 round_pair<__half2>(float a, float b) {
  return __floats2half2_rn(a, b);
}

#if defined(FLASHMLA_BF16)
using Element = __nv_bfloat16;
using Element2 = __nv_bfloat162;
#else
using Element = __half;
using Element2 = __half2;
#endif

// The element type of q as stored: e4m3 bytes (-DFLASHMLA_Q_E4M3=1, with an FP8 cache), else Element.
// An e4m3 Q tile stays e4m3 in shared memory (QK^T on FP8 tensor cores, in both decode kernels). The
// output's type: bf16 for an e4m3 q (the FP8 forks' output), which computes in fp16 (P and V): e4m3
// converts to fp16 exactly in one instruction per two values, to bf16 in four (dequant.cuh).
#if defined(FLASHMLA_Q_E4M3)
using QElement = unsigned char;
using OutElement = __nv_bfloat16;
using OutElement2 = __nv_bfloat162;
#else
using QElement = Element;
using OutElement = Element;
using OutElement2 = Element2;
#endif

__device__ __forceinline__ Element2 to_element2(float a, float b) { return round_pair<Element2>(a, b); }
__device__ __forceinline__ OutElement2 to_out_element2(float a, float b) { return round_pair<OutElement2>(a, b); }

constexpr int kHeadDimV = 512;  // the value is the first 512 columns of the key row
constexpr float kLn2 = 0.69314718055994531f;

// Where fp16 partial rows (-DFLASHMLA_PARTIAL_F16: decode.cu's split pieces, epilogue.cuh, and the combine
// built to read them) keep each (row, half of the columns)'s 2^-k: float [slots, heads_kv, rows, 2] right
// after the fp16 values [slots, heads_kv, rows, 512], which take half of the fp32 rows' bytes.
template <class Float>
__device__ __forceinline__ Float* partial_inv_scales(Float* out_partial, int partial_slots, int heads_kv, int rows) {
  return out_partial + static_cast<long long>(partial_slots) * heads_kv * rows * (kHeadDimV / 2);
}

// decode.cu's fp16 partial rows lie in "quad order" (private to it and the combine built to match,
// -DFLASHMLA_PARTIAL_F16_QUAD_ORDER): in each group of 16 columns, the t-th 4 values are columns 2t, 2t + 1,
// 8 + 2t, 9 + 2t, as lane t of a quad holds them in a wgmma accumulator. decode.cu stores a lane's two words
// as they lie (the quad's 8-byte stores still fill one 32-byte sector, with no swaps: those ran once a
// piece), and the combine, which writes each row once, puts the columns back in order with
// quad_adjacent_words. decode_ring.cu's thread holds two adjacent columns of each O^T tile and stores them
// where they belong: its rows stay in column order.

// The quad's words for 16 adjacent columns: each lane holds the pairs of columns 2t and 8 + 2t (`a`, `b`;
// t = lane % 4) and gets back columns 4t..4t+3, so that the quad's stores are one 32-byte sector. Two
// swaps: across lane pairs {0,2} and {1,3} (lanes 0-1 collect the a's, 2-3 the b's), then inside {0,1} and
// {2,3}. Every lane of the warp takes part.
__device__ __forceinline__ uint2 quad_adjacent_words(uint32_t a, uint32_t b, int quad_lane) {
  const bool low = quad_lane < 2;
  const uint32_t got = __shfl_xor_sync(0xffffffffu, low ? b : a, 2);
  const uint32_t first = low ? a : got, second = low ? got : b;
  const bool even = (quad_lane & 1) == 0;
  const uint32_t swapped = __shfl_xor_sync(0xffffffffu, even ? second : first, 1);
  return even ? make_uint2(first, swapped) : make_uint2(swapped, second);
}

}  // namespace flashmla
