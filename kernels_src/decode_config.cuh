// Compile-time shape of the decode kernel: tile sizes, shared-memory carve-up, barrier ids.
#pragma once
#include <cuda/std/cstdint>
#include "element.cuh"
#include "params.cuh"

namespace flashmla {

using cuda::std::uint8_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;

constexpr int kHeadDim = 576;    // key width: 512 latent + 64 rope
constexpr int kPageSize = 64;    // tokens per KV page; one page is one pipeline stage
constexpr int kTileRows = 64;    // query rows per CTA: the M of one warpgroup's wgmma

// Shared-memory tiles are stored as "boxes" of 64 rows x 64 columns of 16-bit values: one 128-byte row
// per token, 128-byte swizzled. That is the TMA box and the canonical wgmma layout at once.
constexpr int kBoxCols = 64;
constexpr int kRowBytes = kBoxCols * 2;
constexpr int kBoxBytes = kTileRows * kRowBytes;  // 8 KB
constexpr int kBoxes = kHeadDim / kBoxCols;       // 9 per K tile
constexpr int kVBoxes = kHeadDimV / kBoxCols;     // 8: the V half of the tile
constexpr int kTileBytes = kBoxes * kBoxBytes;    // 72 KB
constexpr int kStages = 2;                        // KV pages in flight

constexpr int kWarpgroupThreads = 128;
constexpr int kThreads = 2 * kWarpgroupThreads;
// Each warpgroup holds the output columns [wg * 256, wg * 256 + 256): 128 fp32 registers a thread.
constexpr int kHalfV = kHeadDimV / 2;
constexpr int kBoxesPerHalf = kHalfV / kBoxCols;  // 4

// Running-max start value: finite and far below any real score, so that masked scores (-inf) give
// exp2(-inf - start) = 0 and exp2(start - real) = 0, and no -inf - -inf ever appears.
constexpr float kInitialMax = -1.0e30f;

__device__ __forceinline__ float positive_infinity() { return __int_as_float(0x7f800000); }

struct SharedStorage {
  alignas(1024) uint8_t q[kTileBytes];
  alignas(1024) uint8_t kv[kStages][kTileBytes];
  alignas(1024) uint8_t p[kBoxBytes];  // probabilities of the current page, for warpgroup 1
  float row_scale[kTileRows];          // exp2(old max - new max) of the current page
  float row_inv_sum[kTileRows];        // epilogue: 1 / row sum (0 for rows that saw nothing)
  alignas(8) uint64_t full[kStages][kBoxes];  // one TMA barrier per box: QK^T starts on the first 8 KB
  uint64_t empty[kStages];                    // warpgroup 0 is done reading a stage
};

// Dynamic shared memory asked for at launch: the struct plus slack to align it to 1024 bytes
// (128-byte swizzle patterns are anchored to 1024-byte boundaries).
constexpr int kSharedBytes = int(sizeof(SharedStorage)) + 1024;

// Named hardware barriers (0 is __syncthreads).
enum NamedBarrier : int {
  kBarrierCta = 1,        // all 256 threads: Q tile reloads
  kBarrierPReady = 2,     // warpgroup 0 -> 1: P, row scales (and zeroed stale V rows) are in smem
  kBarrierPFree = 3,      // both warpgroups: P of the previous page has been consumed
  kBarrierEpilogue = 4,   // warpgroup 0 -> 1: row sums are in smem
  kBarrierWarpgroup0 = 5  // warpgroup 0 alone: its own smem writes before its own wgmma
};

}  // namespace flashmla
