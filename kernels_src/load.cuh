// Getting tiles into shared memory: KV boxes through TMA, the Q tile through TMA too where the host
// encodes a q tensor map (DecodeParams::q_tma), else through 16-byte asynchronous copies.
#pragma once
#include "shared_storage.cuh"
#include "sync.cuh"
#include "dequant.cuh"

namespace flashmla {

// The host encodes a 4-D tensor map over k_cache [num_blocks, page, h_kv, 576] with a 64 x 1 x 64 x 1
// box and 128-byte swizzle (FP8: 64 x 1 x kLandingTokens x 1, no swizzle); it arrives as a
// __grid_constant__ kernel parameter.
struct alignas(64) TensorMap {
  uint64_t opaque[16];
};

// L2 policy of the cache loads (H200, 2026-11-30, L2 left full of dirty lines by the benchmark's flush):
// - evict-first where two row tiles (128 query rows) read the same pages: the second tile's request
//   arrives while the first's is in flight, and lines kept out of the way leave L2 to the split pieces'
//   partials, which the combine reads back (evict-normal there: b64/h128/1k, b16/h128/2k 4-5 % slower,
//   b1/32k 4 %; benchmarks/results/2026-11-30-h200-663ad38-ab46-*, -ab47-*);
// - evict-normal where one row tile streams a long part of a 16-bit cache (payload >= kLongPartPages):
//   h16 at 4k-16k 1.8-3.6 % faster, h32/h64 at 4k-16k 1.7-3.3 %, q2-h16/4k causal 2.2 %;
//   evict-first for short parts: h16/1k, h32/1k and b8/h16/16k (payload ~21) were 1.7-2.7 % slower
//   with evict-normal (-ab51-*, -ab52-*), and so were the FP8 narrow cells (1 %): every FP8 cache keeps
//   evict-first (the wide FP8 kernel's cells were not measured with evict-normal).
constexpr uint64_t kCacheHintEvictFirst = 0x12F0000000000000ull;
constexpr uint64_t kCacheHintEvictNormal = 0x1000000000000000ull;
constexpr int kLongPartPages = 48;

__device__ __forceinline__ uint64_t cache_load_hint(int payload, int row_tiles) {
#if defined(FLASHMLA_KV_E4M3)
  return kCacheHintEvictFirst;
#else
  return row_tiles == 1 && payload >= kLongPartPages ? kCacheHintEvictNormal : kCacheHintEvictFirst;
#endif
}

__device__ __forceinline__ void tma_load_box(const TensorMap* map, uint64_t* bar, void* dst, int col,
                                             int head, int token, int block, uint64_t hint) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%3, %4, %5, %6}], [%2], %7;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(col), "r"(head), "r"(token),
      "r"(block), "l"(hint)
      : "memory");
}

// Ask L2 for a box ahead of its load (no shared memory, no barrier): the load then finds it there.
__device__ __forceinline__ void tma_prefetch_box(const TensorMap* map, int col, int head, int token, int block) {
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(col), "r"(head), "r"(token), "r"(block)
               : "memory");
}

// Ask for a tensor map's descriptor ahead of its first bulk load, which otherwise fetches it on the first
// page's path. Called at kernel entry, before the plan's reads (on the H200, against the build without
// it: FP8 level to -1.0 % at b64/h128/1k, ab153; bf16 level, ab154).
__device__ __forceinline__ void tma_prefetch_map(const TensorMap* map) {
  asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
// The cache map's descriptor and, where the Q tile comes through TMA, the q map's (decode.cu and
// decode_ring.cu; otherwise the q map is never used). Thread 0, at kernel entry.
__device__ __forceinline__ void prefetch_maps(const DecodeParams& p, const TensorMap* kv_map, const TensorMap* q_map) {
  if (threadIdx.x != 0) return;
  tma_prefetch_map(kv_map);
  if (p.q_tma) tma_prefetch_map(q_map);
}

// Which boxes of a page buffer each warpgroup loads: the ones whose last reader it is, so that it can
// refill them as soon as its own wgmma on them has completed. Bit i = box i.
//   buffer A: warpgroup 0 reads V columns 0..255 last (its PV); warpgroup 1 reads V 256..511 and the
//             rope box (which carries P_a) last.
//   buffer B: warpgroup 1 reads V 256..511 last; warpgroup 0 reads V 0..255 and the rope box (P_b).
constexpr uint32_t kLeftBoxes = 0x00F;    // boxes 0..3
constexpr uint32_t kRightBoxes = 0x0F0;   // boxes 4..7
constexpr uint32_t kRopeBoxBit = 1u << kRopeBox;
__host__ __device__ constexpr uint32_t boxes_loaded_by(int buffer, int warpgroup) {
  const uint32_t v_half = warpgroup == 0 ? kLeftBoxes : kRightBoxes;
  const bool reads_p = buffer == kBufferA ? warpgroup == 1 : warpgroup == 0;
  return v_half | (reads_p ? kRopeBoxBit : 0u);
}
static_assert((boxes_loaded_by(kBufferA, 0) | boxes_loaded_by(kBufferA, 1)) == 0x1FF, "every box of A is loaded");
static_assert((boxes_loaded_by(kBufferB, 0) | boxes_loaded_by(kBufferB, 1)) == 0x1FF, "every box of B is loaded");
static_assert((boxes_loaded_by(kBufferA, 0) & boxes_loaded_by(kBufferA, 1)) == 0, "no box of A is loaded twice");
static_assert((boxes_loaded_by(kBufferB, 0) & boxes_loaded_by(kBufferB, 1)) == 0, "no box of B is loaded twice");

// Issue the boxes `mask` of one KV page into a buffer; each box completes its own barrier, so QK^T
// can start on the first box (an FP8 box lands inside its 16-bit box, whole or as four sub-boxes, and
// completes its "landed" barrier: dequant.cuh). Called by one thread; `hint`: cache_load_hint.
__device__ __forceinline__ void load_page_boxes(const TensorMap* map, SharedStorage& smem, int buffer,
                                                uint32_t mask, int block, int head, uint64_t hint) {
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
    if (mask & (1u << box)) {
      uint64_t* bar = landing_barrier(smem, buffer, box);
      mbarrier_arrive_expect_tx(bar, kLandedBoxBytes);
#pragma unroll
      for (int part = 0; part < kLandingsPerBox; ++part) {
        tma_load_box(map, bar, smem.kv[buffer] + box * kBoxBytes + landing_offset(part), box * kBoxCols, head,
                     part * kLandingTokens, block, hint);
      }
    }
  }
}

// The boxes `mask` of one KV page into L2, for a load_page_boxes of the same page later; a box is
// kParts TMA boxes of the map (the narrow kernel's FP8 map has whole boxes).
template <int kParts = kLandingsPerBox>
__device__ __forceinline__ void prefetch_page_boxes(const TensorMap* map, uint32_t mask, int block, int head) {
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
    if (mask & (1u << box)) {
#pragma unroll
      for (int part = 0; part < kParts; ++part) {
        tma_prefetch_box(map, box * kBoxCols, head, part * (kPageSize / kParts), block);
      }
    }
  }
}

// decode.cu's Q tile boxes: 16-bit, or FP8 with FP8 scores (an e4m3 q).
constexpr int kQTileBoxBytes = kFp8Scores ? kFp8BoxBytes : kBoxBytes;

// Load the 64 x 576 query tile of one request and KV head without a tensor map (the narrow kernel's
// tiles and heads_per_group that no q box fits use copies like these): tile row r is packed row
// rows_base + r = s * heads_per_group + h_in_group. Rows past p.rows become zeros. All threads take part.
// q is copied as it is, through asynchronous copies, so that all of a thread's 16-byte chunks are in
// flight at once (loads through registers went out a few at a time, each batch waiting a global-memory
// latency): a 16-bit q into 16-bit boxes, an e4m3 q (FP8 scores) into FP8 boxes (9 x 4 KB,
// decode_config.cuh's layout). The caller fences and synchronises before wgmma reads the tile.
__device__ __forceinline__ void load_q_tile(const DecodeParams& p, SharedStorage& smem, int request,
                                            int kv_head, int rows_base) {
  static_assert(kFp8Scores == (sizeof(QElement) == 1), "an e4m3 q goes to decode.cu only with FP8 scores");
  constexpr int kPerChunk = 16 / sizeof(QElement);  // q's elements in 16 bytes
  constexpr int kChunksPerRow = kHeadDim / kPerChunk;
  constexpr int kChunksPerBox = kBoxCols / kPerChunk;
  const QElement* q = static_cast<const QElement*>(p.q);
  for (int idx = threadIdx.x; idx < kTileRows * kChunksPerRow; idx += kThreads) {
    const int r = idx / kChunksPerRow;
    const int c = idx % kChunksPerRow;
    const int row = rows_base + r;
    const QElement* src = query_row_at(p, q, request, kv_head, row, c * kPerChunk);
    uint8_t* dst = smem.q + (c / kChunksPerBox) * kQTileBoxBytes +
                   (kFp8Scores ? fp8_offset(r, c % kChunksPerBox) : swizzled_offset(r, c % kChunksPerBox));
    async_copy_16(dst, src, row < p.rows ? 16 : 0);
  }
  async_copy_commit();
  async_copy_wait_all();
}

// The same tile through TMA, issued by one thread, landing on `smem.q_full`: the host encodes a 4-D map
// over q [batch, seqlen_q, heads_q, 576] (innermost first: column, head, query position, request) whose
// box is 64 columns x min(heads_per_group, 64) heads x max(64 / heads_per_group, 1) positions, so that
// one box is one 64-column box of the tile in packed-row order (row = s * heads_per_group + h), 128-byte
// swizzled like the K boxes (an e4m3 q: 64-byte, the FP8 boxes' layout). Positions past seqlen_q land as
// zeros. The tile's 64 rows start at query position rows_base / heads_per_group, head
// kv_head * heads_per_group + rows_base % heads_per_group. load_q_tile's copies took 8000-10000 cycles a
// tile (traced, H200) while the page streams ran; through TMA the h_q = 128 cells were 0.4-4.8 % faster
// (benchmarks/results/2026-12-01-h200-*-ab71-*).
// (Storage: decode.cu's SharedStorage or decode_ring.cu's RingStorage, each with `q` and `q_full`.)
template <class Storage>
__device__ __forceinline__ void issue_q_tile_tma(const DecodeParams& p, const TensorMap* q_map, Storage& smem,
                                                 int request, int kv_head, int rows_base) {
  const PackedQuery first = packed_query(p, kv_head, rows_base);
  mbarrier_arrive_expect_tx(&smem.q_full, kBoxes * kQTileBoxBytes);
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
    tma_load_box(q_map, &smem.q_full, smem.q + box * kQTileBoxBytes, box * kBoxCols, first.head, first.s, request,
                 kCacheHintEvictFirst);
  }
}

// Stale tokens [valid, 64) of the last page may hold NaN; P is 0 there but 0 * NaN = NaN, so the V
// rows a warpgroup multiplies (its half: boxes 4*half .. +4) are zeroed before its PV. Whole 128-byte
// rows are cleared, which is independent of the swizzle: each box's bytes from row `valid` on, the
// warpgroup sweeping 2 KB of each of the four boxes at a time (at most four sweeps, and no integer
// division: this runs once a piece, from code fetched cold). `valid` is clamped, so lengths that
// disagree with the plan never write outside the tile.
__device__ __forceinline__ void zero_stale_v_rows(uint8_t* tile, int half, int valid, int thread) {
  const int first = max(0, min(valid, kTileRows)) * kRowBytes + thread * 16;
  uint8_t* boxes = tile + half * kBoxesPerHalf * kBoxBytes;
#pragma unroll 1
  for (int offset = first; offset < kBoxBytes; offset += kWarpgroupThreads * 16) {
#pragma unroll
    for (int box = 0; box < kBoxesPerHalf; ++box) {
      *reinterpret_cast<uint4*>(boxes + box * kBoxBytes + offset) = make_uint4(0, 0, 0, 0);
    }
  }
}

}  // namespace flashmla
