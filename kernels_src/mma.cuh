// Tensor-core steps: wgmma descriptors for the 128-byte-swizzled boxes and the two products,
// S = Q K^T (64 x 64 per page) and O += P V (64 x 256 per warpgroup per page).
#pragma once
#include <cuda/std/utility>
#include <cute/arch/mma_sm90_gmma.hpp>
#include "sync.cuh"

namespace flashmla {

namespace gmma = cute::SM90::GMMA;

#if defined(FLASHMLA_BF16)
using MmaQK = gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
using MmaPVFromRegs = gmma::MMA_64x256x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>;
using MmaPVFromSmem = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>;
#else
using MmaQK = gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
using MmaPVFromRegs = gmma::MMA_64x256x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>;
using MmaPVFromSmem = gmma::MMA_64x256x16_F32F16F16_SS<gmma::Major::K, gmma::Major::MN>;
#endif

constexpr int kMmaK = 16;                         // k of one wgmma
constexpr int kStepsPerBox = kBoxCols / kMmaK;    // 4 QK^T steps per 64-column box
constexpr int kPVSteps = kPageSize / kMmaK;       // 4 PV steps per page
constexpr int kSwizzleAtomBytes = 8 * kRowBytes;  // 8 rows x 128 B: one swizzle pattern

// Shared-memory matrix descriptor for a 128-byte-swizzled operand.
// K-major (rows of 64 k-values): `leading` is unused, `stride` = bytes between 8-row groups.
// MN-major (rows of 64 n-values, V read as B of PV): `leading` = bytes between 64-column boxes,
// `stride` = bytes between groups of 8 k-rows.
__device__ __forceinline__ uint64_t smem_desc(const void* start, uint32_t leading, uint32_t stride) {
  const uint64_t addr = smem_addr(start);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t((leading >> 4) & 0x3FFF) << 16) |
         (uint64_t((stride >> 4) & 0x3FFF) << 32) | (1ull << 62);  // layout type 1: 128-byte swizzle
}

// Descriptor of k-step `step` of a K-major tile made of boxes: k-steps advance 32 bytes inside a row.
__device__ __forceinline__ uint64_t k_major_desc(const uint8_t* tile, int step) {
  return smem_desc(tile + (step / kStepsPerBox) * kBoxBytes + (step % kStepsPerBox) * kMmaK * 2, 16,
                   kSwizzleAtomBytes);
}

// Descriptor of the V half `half` (columns half*256 .. +256) for PV k-step `step` (16 tokens).
__device__ __forceinline__ uint64_t v_desc(const uint8_t* tile, int half, int step) {
  return smem_desc(tile + half * kBoxesPerHalf * kBoxBytes + step * kMmaK * kRowBytes, kBoxBytes,
                   kSwizzleAtomBytes);
}

template <int N>
__device__ __forceinline__ void fence_fragment(float (&frag)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(frag[i]);
}

template <class Mma, int N, size_t... I>
__device__ __forceinline__ void mma_ss(uint64_t a, uint64_t b, float (&d)[N], bool accumulate,
                                       cuda::std::index_sequence<I...>) {
  Mma::fma(a, b, d[I]..., accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero);
}

template <class Mma, int N, size_t... I>
__device__ __forceinline__ void mma_rs(const uint32_t (&a)[4], uint64_t b, float (&d)[N],
                                       cuda::std::index_sequence<I...>) {
  Mma::fma(a[0], a[1], a[2], a[3], b, d[I]..., gmma::ScaleOut::One);
}

// S = Q K^T over the 576 columns, box by box as the TMA boxes of the page land. Leaves the wgmmas
// committed but not awaited.
__device__ __forceinline__ void issue_qk(const uint8_t* q_tile, const uint8_t* k_tile, uint64_t* full,
                                         int phase, float (&s)[32]) {
  fence_fragment(s);
  cute::warpgroup_arrive();
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
    mbarrier_wait(&full[box], phase);
#pragma unroll
    for (int i = 0; i < kStepsPerBox; ++i) {
      const int step = box * kStepsPerBox + i;
      mma_ss<MmaQK>(k_major_desc(q_tile, step), k_major_desc(k_tile, step), s, step > 0,
                    cuda::std::make_index_sequence<32>{});
    }
  }
  cute::warpgroup_commit_batch();
  fence_fragment(s);
}

// O[:, half] += P V[:, half] with P held in registers as wgmma A fragments (warpgroup 0).
__device__ __forceinline__ void issue_pv_from_regs(const uint32_t (&p)[kPVSteps][4], const uint8_t* v_tile,
                                                   int half, float (&o)[128]) {
  fence_fragment(o);
  cute::warpgroup_arrive();
#pragma unroll
  for (int step = 0; step < kPVSteps; ++step) {
    mma_rs<MmaPVFromRegs>(p[step], v_desc(v_tile, half, step), o, cuda::std::make_index_sequence<128>{});
  }
  cute::warpgroup_commit_batch();
  fence_fragment(o);
}

// O[:, half] += P V[:, half] with P read from its shared-memory tile (warpgroup 1).
__device__ __forceinline__ void issue_pv_from_smem(const uint8_t* p_tile, const uint8_t* v_tile, int half,
                                                   float (&o)[128]) {
  fence_fragment(o);
  cute::warpgroup_arrive();
#pragma unroll
  for (int step = 0; step < kPVSteps; ++step) {
    mma_ss<MmaPVFromSmem>(k_major_desc(p_tile, step), v_desc(v_tile, half, step), o, true,
                          cuda::std::make_index_sequence<128>{});
  }
  cute::warpgroup_commit_batch();
  fence_fragment(o);
}

}  // namespace flashmla
