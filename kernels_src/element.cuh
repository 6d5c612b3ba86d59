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

}  // namespace flashmla
