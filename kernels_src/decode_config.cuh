// Compile-time shape of the decode kernel: tile sizes, page buffers, barrier ids.
#pragma once
#include <cuda/std/cstdint>
#include "element.cuh"
#include "params.cuh"

namespace flashmla {

using cuda::std::uint8_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;

constexpr int kHeadDim = 576;    // key width: 512 latent + 64 rope
constexpr int kPageSize = 64;    // tokens per KV page
constexpr int kTileRows = 64;    // query rows per CTA: the M of one warpgroup's wgmma

// Shared-memory tiles are stored as "boxes" of 64 rows x 64 columns of 16-bit values: one 128-byte row
// per token, 128-byte swizzled. That is the TMA box and the canonical wgmma layout at once.
constexpr int kBoxCols = 64;
constexpr int kRowBytes = kBoxCols * 2;
constexpr int kBoxBytes = kTileRows * kRowBytes;  // 8 KB
constexpr int kBoxes = kHeadDim / kBoxCols;       // 9 per K tile
constexpr int kRopeBox = kBoxes - 1;              // box 8: key columns 512..575, not part of V
constexpr int kTileBytes = kBoxes * kBoxBytes;    // 72 KB

// Byte offset of the 16-byte chunk `chunk` (0..7) of row `row` inside a 128-byte-swizzled box.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
}

// An FP8 (e4m3) box of the same 64 x 64 values: rows of 64 bytes, 64-byte swizzled as TMA lands it (16-byte
// chunk c of row r at chunk c ^ (r / 2 % 4)), which is the K-major wgmma layout of FP8 rows.
constexpr int kFp8RowBytes = kBoxCols;                     // 64
constexpr int kFp8BoxBytes = kPageSize * kFp8RowBytes;     // 4 KB
constexpr int kFp8SwizzleBytes = 64;                       // the tensor map's swizzle (variants.py pins it)
constexpr int kFp8SwizzleAtomBytes = 8 * kFp8RowBytes;     // 8 rows x 64 B: one swizzle pattern
__device__ __forceinline__ int fp8_offset(int row, int chunk) {
  return row * kFp8RowBytes + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// FP8 scores: an e4m3 q with an FP8 cache, whose QK^T runs on FP8 wgmmas straight from the landed page
// (dequant.cuh); every other variant scores 16-bit boxes.
#if defined(FLASHMLA_KV_E4M3) && defined(FLASHMLA_Q_E4M3)
#define FLASHMLA_FP8_SCORES 1
constexpr bool kFp8Scores = true;
#else
constexpr bool kFp8Scores = false;
#endif

// Where a token's 16-bit row lies in a V box, and how PV's descriptors step over the rows (mma.cuh's
// v_desc). A 16-bit cache lands rows in token order: PV k-step s (tokens 16s .. 16s+15) starts at row 16s
// and its two 8-token groups lie 1 KB apart. With FP8 scores (an e4m3 q and cache: dequant.cuh) the
// converter writes 8-token group g at slot 4 (g % 2) + g / 2 of the box (1 KB slots), so that each
// converter warp's 16 tokens become 16-bit rows only over FP8 bytes it has read itself (slot 4 + w, in
// the box's upper half where the FP8 box landed) and over the free lower half (slot w): k-step s then
// starts at slot s, and its two groups lie 4 KB apart.
#if defined(FLASHMLA_FP8_SCORES)
constexpr int kVGroupStrideBytes = 4 * 8 * kRowBytes;
constexpr int kVStepBytes = 8 * kRowBytes;
__host__ __device__ constexpr int v_row(int token) { return (token / 8 % 2 * 4 + token / 16) * 8 + token % 8; }
#else
constexpr int kVGroupStrideBytes = 8 * kRowBytes;
constexpr int kVStepBytes = 16 * kRowBytes;
__host__ __device__ constexpr int v_row(int token) { return token; }
#endif

constexpr int kWarpgroupThreads = 128;
constexpr int kThreads = 2 * kWarpgroupThreads;  // the two consumer warpgroups of the main loop
// A third warpgroup helps them: with a 16-bit cache it issues the page loads (the loader, decode.cu),
// with an FP8 cache it dequantises the pages in shared memory (the converter, dequant.cuh). It gives
// most of its registers to the consumers (setmaxnreg): it needs about 40, they all they can get.
constexpr int kHelperWarpgroup = 2;
constexpr int kHelperThreads = kWarpgroupThreads;
constexpr int kLaunchThreads = kThreads + kHelperThreads;
constexpr int kHelperRegisters = 40;
constexpr int kConsumerRegisters = 232;
static_assert(2 * kConsumerRegisters + kHelperRegisters == 3 * 168, "the registers handed over add up");
#if defined(FLASHMLA_KV_E4M3)
constexpr bool kLoaderWarpgroup = false;  // the helper converts; each consumer issues its own loads
#else
constexpr bool kLoaderWarpgroup = true;
#endif
// Each warpgroup holds the output columns [wg * 256, wg * 256 + 256): 128 fp32 registers a thread.
constexpr int kHalfV = kHeadDimV / 2;
constexpr int kBoxesPerHalf = kHalfV / kBoxCols;  // 4

// The two page buffers. Within a piece, pages go in pairs: the first of a pair ("page a") into buffer
// A, whose scores warpgroup 0 computes, the second ("page b") into buffer B, warpgroup 1's.
enum PageBuffer : int { kBufferA = 0, kBufferB = 1, kPageBuffers = 2 };

// Running-max start value: finite and far below any real score, so that masked scores (-inf) give
// exp2(-inf - start) = 0 and exp2(start - real) = 0, and no -inf - -inf ever appears.
constexpr float kInitialMax = -1.0e30f;

__device__ __forceinline__ float positive_infinity() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// Named hardware barriers (0 is __syncthreads).
enum NamedBarrier : int {
  kBarrierCta = 1,         // all 256 threads: Q tile reloads, the epilogue's row-sum exchange
  kBarrierPageAReady = 2,  // warpgroup 0 -> 1: max_a and P of page a are in smem
  kBarrierPageBReady = 3,  // warpgroup 1 -> 0: max_b and P of page b are in smem
  kBarrierWarpgroup0 = 4,  // one warpgroup alone: its zeroed stale V rows before its own wgmma
  kBarrierWarpgroup1 = 5,
};

}  // namespace flashmla
