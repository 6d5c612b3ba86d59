// Getting tiles into shared memory: the KV page through TMA, the Q tile through 16-byte loads.
#pragma once
#include "sync.cuh"

namespace flashmla {

// The host encodes a 4-D tensor map over k_cache [num_blocks, page, h_kv, 576] with a 64 x 1 x 64 x 1
// box and 128-byte swizzle; it arrives as a __grid_constant__ kernel parameter.
struct alignas(64) TensorMap {
  uint64_t opaque[16];
};

// L2 policies for the cache loads: evict-first when a page is read by one CTA only.
constexpr uint64_t kCacheHintEvictFirst = 0x12F0000000000000ull;
constexpr uint64_t kCacheHintEvictNormal = 0x1000000000000000ull;

__device__ __forceinline__ void tma_load_box(const TensorMap* map, uint64_t* bar, void* dst, int col,
                                             int head, int token, int block, uint64_t hint) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5, %6}], [%2], %7;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(col), "r"(head), "r"(token),
      "r"(block), "l"(hint)
      : "memory");
}

// Issue the nine boxes of one KV page (all 576 columns of 64 tokens) into a stage; each box completes
// its own barrier so QK^T can start on the first box.
__device__ __forceinline__ void load_kv_page(const TensorMap* map, SharedStorage& smem, int stage,
                                             int block, int head, uint64_t hint) {
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
    uint64_t* bar = &smem.full[stage][box];
    mbarrier_arrive_expect_tx(bar, kBoxBytes);
    tma_load_box(map, bar, smem.kv[stage] + box * kBoxBytes, box * kBoxCols, head, 0, block, hint);
  }
}

// Byte offset of the 16-byte chunk `chunk` (0..7) of row `row` inside a 128-byte-swizzled box.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ (row & 7)) << 4);
}

// Load the 64 x 576 query tile of one request and KV head: tile row r is packed row
// rows_base + r = s * heads_per_group + h_in_group. Rows past p.rows become zeros. All threads take part;
// the caller fences and synchronises before wgmma reads the tile.
__device__ __forceinline__ void load_q_tile(const DecodeParams& p, SharedStorage& smem, int request,
                                            int kv_head, int rows_base) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  const Element* q = static_cast<const Element*>(p.q);
  for (int idx = threadIdx.x; idx < kTileRows * kChunksPerRow; idx += kThreads) {
    const int r = idx / kChunksPerRow;
    const int c = idx % kChunksPerRow;
    const int row = rows_base + r;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row < p.rows) {
      const int s = row / p.heads_per_group;
      const int h = kv_head * p.heads_per_group + row % p.heads_per_group;
      const Element* src = q + request * p.q_batch_stride + s * p.q_seq_stride + h * p.q_head_stride;
      value = *reinterpret_cast<const uint4*>(src + c * 8);
    }
    *reinterpret_cast<uint4*>(smem.q + (c / 8) * kBoxBytes + swizzled_offset(r, c % 8)) = value;
  }
}

// Stale tokens [valid, 64) of the last page may hold NaN; P is 0 there but 0 * NaN = NaN, so the V
// rows are zeroed before PV. Whole 128-byte rows are cleared, which is independent of the swizzle.
__device__ __forceinline__ void zero_stale_v_rows(uint8_t* tile, int valid, int thread) {
  const int chunks = (kTileRows - valid) * (kRowBytes / 16);
  for (int idx = thread; idx < kVBoxes * chunks; idx += kWarpgroupThreads) {
    const int box = idx / chunks;
    const int chunk = idx % chunks;
    *reinterpret_cast<uint4*>(tile + box * kBoxBytes + valid * kRowBytes + chunk * 16) = make_uint4(0, 0, 0, 0);
  }
}

}  // namespace flashmla
