// The 16-bit element type of q, k_cache and out, chosen at compile time (-DFLASHMLA_BF16=1 or
// -DFLASHMLA_FP16=1), and the constants of the output that the decode and combine kernels share.
#pragma once

#if defined(FLASHMLA_BF16)
#include <cuda_bf16.h>
#elif defined(FLASHMLA_FP16)
#include <cuda_fp16.h>
#if defined(FLASHMLA_Q_E4M3)
#include <cuda_bf16.h>
#endif
#else
#error "define FLASHMLA_BF16 or FLASHMLA_FP16"
#endif

namespace flashmla {

#if defined(FLASHMLA_BF16)
using Element = __nv_bfloat16;
using Element2 = __nv_bfloat162;
__device__ __forceinline__ Element2 to_element2(float a, float b) { return __floats2bfloat162_rn(a, b); }
#else
using Element = __half;
using Element2 = __half2;
__device__ __forceinline__ Element2 to_element2(float a, float b) { return __floats2half2_rn(a, b); }
#endif

// The element type of q as stored: e4m3 bytes (-DFLASHMLA_Q_E4M3=1, with an FP8 cache), else Element.
// Its tile is converted to Element in shared memory (load.cuh). The output's type: bf16 for an e4m3 q
// (the FP8 forks' output), which computes in fp16: e4m3 converts to fp16 exactly in one instruction
// per two values, to bf16 in four (dequant.cuh).
#if defined(FLASHMLA_Q_E4M3)
using QElement = unsigned char;
using OutElement = __nv_bfloat16;
using OutElement2 = __nv_bfloat162;
__device__ __forceinline__ OutElement2 to_out_element2(float a, float b) { return __floats2bfloat162_rn(a, b); }
#else
using QElement = Element;
using OutElement = Element;
using OutElement2 = Element2;
__device__ __forceinline__ OutElement2 to_out_element2(float a, float b) { return to_element2(a, b); }
#endif

constexpr int kHeadDimV = 512;  // the value is the first 512 columns of the key row
constexpr float kLn2 = 0.69314718055994531f;

}  // namespace flashmla
