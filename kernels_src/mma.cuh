// Tensor-core steps on named register tiles: S = Q K^T (64 x 64 per page) and O += P V (64 x 256 per
// warpgroup per page), with CuTe's wgmma atoms and hand-made shared-memory descriptors for the
// 128-byte-swizzled boxes.
#pragma once
#include <cuda/std/utility>
#include <cute/arch/mma_sm90_gmma.hpp>
#include "sync.cuh"

namespace flashmla {

namespace gmma = cute::SM90::GMMA;

#if defined(FLASHMLA_BF16)
using MmaQK = gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
using MmaQKFromRegs = gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::K>;
using MmaPVFromRegs = gmma::MMA_64x256x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>;
using MmaPVFromSmem = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>;
#else
using MmaQK = gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
using MmaQKFromRegs = gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::K>;
using MmaPVFromRegs = gmma::MMA_64x256x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>;
using MmaPVFromSmem = gmma::MMA_64x256x16_F32F16F16_SS<gmma::Major::K, gmma::Major::MN>;
#endif

constexpr int kMmaK = 16;                         // k of one wgmma
constexpr int kStepsPerBox = kBoxCols / kMmaK;    // 4 QK^T steps per 64-column box
constexpr int kPVSteps = kPageSize / kMmaK;       // 4 PV steps per page
constexpr int kSwizzleAtomBytes = 8 * kRowBytes;  // 8 rows x 128 B: one swizzle pattern

// A warpgroup's 64 x 64 fp32 scores of one page, in the wgmma accumulator layout (softmax.cuh).
struct ScoreTile {
  float v[32];
};

// A warpgroup's 64 x 256 fp32 output columns (its half of O), in the accumulator layout.
struct OutputHalf {
  float v[128];
};

// Probabilities of one page as wgmma A fragments: step k holds P[:, 16k .. 16k+16) of this thread.
struct ProbFragment {
  uint32_t v[kPVSteps][4];
};
// The same fragments of the Q tile's rope box, held in registers for a whole piece (16 a thread). A
// QK^T k-step of n = 64 reads 4 KB of shared memory (2 KB of Q, 2 KB of K) per 32 tensor cycles, the
// whole of shared memory's 128 bytes a cycle, so QK^T is bound by shared-memory reads, which the TMA
// landings and the PV operands share: the rope box's k-steps from registers read K alone (2-2.5 %
// faster at h_q = 128: benchmarks/results/2026-11-30-h200-8f821d2-ab66-*).
using RopeFragment = ProbFragment;

// Shared-memory matrix descriptor of a 128-byte-swizzled operand, made once per tile and advanced by
// adding to it: its lowest field is the start address >> 4 (14 bits), and a start address inside the
// 228 KB shared window never carries out of it. So a wgmma's descriptor costs one 64-bit add, not a
// fresh encode (about 12 dependent uniform-datapath instructions, measured slower on the H200: QK^T
// issues a wgmma every 32 tensor cycles).
// K-major (rows of 64 k-values): `leading` is unused, `stride` = bytes between 8-row groups.
// MN-major (rows of 64 n-values, V read as B of PV): `leading` = bytes between 64-column boxes,
// `stride` = bytes between groups of 8 k-rows.
struct SmemDesc {
  uint64_t base;

  // held_high: the high word made a run-time value by or-ing in the address's bits 30-31 (always 0; ptxas
  // cannot tell), so that ptxas keeps it in the descriptor's register pair: as a constant, ptxas moved it
  // back before every wgmma or split the add into a carry chain. With the low-word add (at<true>) each
  // descriptor is then one UIADD3 (decode.cu's page loops: 0.95-1.00 of the edge-only low word on every
  // cell timed, H200, ab220 / ab221; decode_ring.cu's FP8 loops with it were level, ab222, and keep the add).
  __device__ __forceinline__ SmemDesc(const void* start, uint32_t leading, uint32_t stride, bool held_high = false)
      : base(((smem_addr(start) & 0x3FFFF) >> 4) | (uint64_t((leading >> 4) & 0x3FFF) << 16) |
             (uint64_t(((stride >> 4) & 0x3FFF) | (held_high ? smem_addr(start) >> 30 : 0u)) << 32) |
             (1ull << 62)) {}  // layout type 1: 128-byte swizzle

  // The descriptor of the operand starting `bytes` further on (a multiple of 16). kLowWord: the add on
  // the low word alone, which it never carries out of, and the high word put back. ptxas builds the 64-bit
  // add as one UIADD3.64 only in the first page loop of each warpgroup; in decode.cu's edge pair loops it
  // became a carry chain and moves, ~9 instructions a wgmma against 3 (NVRTC 13.0.88); the low-word add on a
  // held high word costs 2 in every loop (the low word alone, in every loop, was 1.8 % faster at
  // b128/h128/1k var on the H200: ab219's d32, benchmarks/results/2026-12-04-h200-31c8e8f-ab219-*).
  template <bool kLowWord = false>
  __device__ __forceinline__ uint64_t at(uint32_t bytes) const {
    if constexpr (kLowWord) {
      return (base & 0xFFFFFFFF00000000ull) | (uint32_t(base) + (bytes >> 4));
    } else {
      return base + (bytes >> 4);
    }
  }
};

// A K-major tile made of boxes: k-step `step` starts 32 bytes further inside a row, every 4 steps a box.
template <bool kHeldHigh = false>
__device__ __forceinline__ SmemDesc k_major_desc(const uint8_t* tile) {
  return SmemDesc(tile, 16, kSwizzleAtomBytes, kHeldHigh);
}
__host__ __device__ constexpr uint32_t k_step_offset(int step) {
  return (step / kStepsPerBox) * kBoxBytes + (step % kStepsPerBox) * kMmaK * 2;
}

// A K-major operand of 64-byte swizzled FP8 rows (decode_config.cuh's FP8 box: a page's K box, or a box of
// an e4m3 Q tile); k-step i of a box starts 32 bytes further inside a row.
__device__ __forceinline__ SmemDesc fp8_k_major_desc(const uint8_t* tile) {
  SmemDesc d(tile, 16, kFp8SwizzleAtomBytes);
  d.base = (d.base & ~(3ull << 62)) | (2ull << 62);  // layout type 2: 64-byte swizzle
  return d;
}

// The V half `half` (columns half*256 .. +256) of a page; PV k-step `step` covers 16 tokens, in two
// groups of 8 rows (decode_config.cuh's v_row: where they lie).
template <bool kHeldHigh = false>
__device__ __forceinline__ SmemDesc v_desc(const uint8_t* tile, int half) {
  return SmemDesc(tile + half * kBoxesPerHalf * kBoxBytes, kBoxBytes, kVGroupStrideBytes, kHeldHigh);
}
__host__ __device__ constexpr uint32_t v_step_offset(int step) { return step * kVStepBytes; }
__host__ __device__ constexpr bool v_steps_read_v_rows() {
  for (int token = 0; token < kPageSize; ++token) {
    const int step = token / kMmaK, group = token % kMmaK / 8;
    if (v_row(token) * kRowBytes != int(v_step_offset(step)) + group * kVGroupStrideBytes + token % 8 * kRowBytes) return false;
  }
  return true;
}
static_assert(v_steps_read_v_rows(), "PV's descriptors find every token's V row where v_row puts it");

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
__device__ __forceinline__ void mma_rs(const uint32_t (&a)[4], uint64_t b, float (&d)[N], bool accumulate,
                                       cuda::std::index_sequence<I...>) {
  Mma::fma(a[0], a[1], a[2], a[3], b, d[I]..., accumulate ? gmma::ScaleOut::One : gmma::ScaleOut::Zero);
}
template <class Mma, int N, size_t... I>
__device__ __forceinline__ void mma_rs(const uint32_t (&a)[4], uint64_t b, float (&d)[N],
                                       cuda::std::index_sequence<I...> i) {
  mma_rs<Mma>(a, b, d, true, i);  // accumulating
}

// S = Q K^T over the 576 columns, box by box as the TMA boxes of the page land; the rope box's Q from
// registers. Leaves the wgmmas committed but not awaited. With kRightFirst the boxes go 4..7, 0..3, 8:
// buffer B's right V half is released first (decode.cu, issue_scores).
template <bool kRightFirst = false, bool kLowWord = false>
__device__ __forceinline__ void issue_qk(const uint8_t* q_tile, const RopeFragment& q_rope, const uint8_t* k_tile,
                                         uint64_t* full, int phase, ScoreTile& s) {
  const SmemDesc q = k_major_desc<kLowWord>(q_tile);
  const SmemDesc k = k_major_desc<kLowWord>(k_tile);
  fence_fragment(s.v);
  cute::warpgroup_arrive();
#pragma unroll
  for (int j = 0; j < kBoxes; ++j) {
    const int box = !kRightFirst || j == kRopeBox ? j : (j + kBoxesPerHalf) % (2 * kBoxesPerHalf);
    mbarrier_wait_uniform(&full[box], phase);
#pragma unroll
    for (int i = 0; i < kStepsPerBox; ++i) {
      const int step = box * kStepsPerBox + i;
      if (box == kRopeBox) {
        mma_rs<MmaQKFromRegs>(q_rope.v[i], k.template at<kLowWord>(k_step_offset(step)), s.v,
                              cuda::std::make_index_sequence<32>{});
      } else {
        mma_ss<MmaQK>(q.template at<kLowWord>(k_step_offset(step)), k.template at<kLowWord>(k_step_offset(step)), s.v,
                      j > 0 || i > 0, cuda::std::make_index_sequence<32>{});
      }
    }
  }
  cute::warpgroup_commit_batch();
  fence_fragment(s.v);
}

#if defined(FLASHMLA_FP8_SCORES)
// S = Q K^T on FP8 wgmmas (k = 32), Q and K both e4m3 in FP8 boxes: Q's at q_tile + 4 KB * box, K's
// landed in the upper half of each 16-bit box of the page (dequant.cuh). Same accumulator layout as
// issue_qk. Committed, not awaited.
using MmaQKFp8 = gmma::MMA_64x64x32_F32E4M3E4M3_SS_TN<>;
__device__ __forceinline__ void issue_qk_fp8(const uint8_t* q_tile, const uint8_t* k_tile, uint64_t* landed,
                                             int phase, ScoreTile& s) {
  constexpr int kSteps = kBoxCols / 32;  // k-steps of 32 bytes per box row
  const SmemDesc q = fp8_k_major_desc(q_tile);
  const SmemDesc k = fp8_k_major_desc(k_tile + kBoxBytes / 2);
  fence_fragment(s.v);
  cute::warpgroup_arrive();
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
    mbarrier_wait_uniform(&landed[box], phase);
#pragma unroll
    for (int i = 0; i < kSteps; ++i) {
      mma_ss<MmaQKFp8>(q.at(box * kFp8BoxBytes + 32 * i), k.at(box * kBoxBytes + 32 * i), s.v, box > 0 || i > 0,
                       cuda::std::make_index_sequence<32>{});
    }
  }
  cute::warpgroup_commit_batch();
  fence_fragment(s.v);
}
#endif

// O[:, half] += P V[:, half] with P held in registers as wgmma A fragments (the page's own scorer).
template <bool kLowWord = false>
__device__ __forceinline__ void issue_pv_from_regs(const ProbFragment& p, const uint8_t* v_tile, int half,
                                                   OutputHalf& o) {
  const SmemDesc v = v_desc<kLowWord>(v_tile, half);
  fence_fragment(o.v);
  cute::warpgroup_arrive();
#pragma unroll
  for (int step = 0; step < kPVSteps; ++step) {
    mma_rs<MmaPVFromRegs>(p.v[step], v.template at<kLowWord>(v_step_offset(step)), o.v,
                          cuda::std::make_index_sequence<128>{});
  }
  cute::warpgroup_commit_batch();
  fence_fragment(o.v);
}

// O[:, half] += P V[:, half] with P read from its swizzled 64 x 64 box in shared memory (the other
// warpgroup's page).
template <bool kLowWord = false>
__device__ __forceinline__ void issue_pv_from_smem(const uint8_t* p_box, const uint8_t* v_tile, int half,
                                                   OutputHalf& o) {
  const SmemDesc p = k_major_desc<kLowWord>(p_box);
  const SmemDesc v = v_desc<kLowWord>(v_tile, half);
  fence_fragment(o.v);
  cute::warpgroup_arrive();
#pragma unroll
  for (int step = 0; step < kPVSteps; ++step) {
    mma_ss<MmaPVFromSmem>(p.template at<kLowWord>(k_step_offset(step)), v.template at<kLowWord>(v_step_offset(step)),
                          o.v, true, cuda::std::make_index_sequence<128>{});
  }
  cute::warpgroup_commit_batch();
  fence_fragment(o.v);
}

}  // namespace flashmla
