// Writing one piece's result: to out/lse when the request has a single piece (out through shared
// memory), otherwise to the fp32 partial buffers that the combine kernel merges.
#pragma once
#include "plan.cuh"
#include "softmax.cuh"
#include "trace.cuh"

namespace flashmla {

// A single piece's output half (64 rows x 256 columns, 16-bit) staged in shared memory: rows padded by
// 16 bytes, so that the fragment writes (8 rows x 16 bytes a warp) hit 32 different banks.
constexpr int kStagedRowBytes = kHalfV * 2 + 16;
constexpr int kStagedHalfBytes = kTileRows * kStagedRowBytes;
static_assert(2 * kStagedHalfBytes <= kTileBytes, "both halves fit in the Q tile");

// Store this warpgroup's 256 output columns (`half`) of the piece, normalised. A split piece's fp32
// partials go straight from registers (8 bytes a thread, whole 32-byte sectors a warp). A single
// piece's 16-bit output is written into `staging` first (the Q tile, which no wgmma reads any more),
// then copied out a row per warp and 16 bytes per lane: whole 512-byte rows, not 4-byte pieces of 8.
__device__ __forceinline__ void store_output(const DecodeParams& p, const Piece& piece, int kv_head,
                                             int rows_base, const FragmentCoords& at, int half,
                                             const OutputHalf& o, const float (&inv_sum)[2], uint8_t* staging,
                                             int thread, NamedBarrier own, Tracer& trace) {
  if (!piece.writable) return;
  if (piece.split) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = rows_base + at.row[i];
      if (row >= p.rows) continue;
      float* dst = p.out_partial + ((int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row) * kHeadDimV +
                   half * kHalfV + at.column;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(dst + 8 * j) =
            make_float2(o.v[4 * j + 2 * i] * inv_sum[i], o.v[4 * j + 2 * i + 1] * inv_sum[i]);
      }
    }
    return;
  }
  uint8_t* mine = staging + half * kStagedHalfBytes;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    uint8_t* row = mine + at.row[i] * kStagedRowBytes + at.column * 2;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      *reinterpret_cast<OutElement2*>(row + 16 * j) =
          to_out_element2(o.v[4 * j + 2 * i] * inv_sum[i], o.v[4 * j + 2 * i + 1] * inv_sum[i]);
    }
  }
  named_barrier_sync(own, kWarpgroupThreads);
  trace.mark(kMarkOutputStaged);
  constexpr int kChunksPerRow = kHalfV * 2 / 16;
  static_assert(kChunksPerRow == 32, "a warp copies one row, 16 bytes a lane");
  const int lane = thread % 32;
  for (int r = thread / 32; r < kTileRows; r += kWarpgroupThreads / 32) {
    const int row = rows_base + r;
    if (row >= p.rows) break;
    const PackedQuery query = packed_query(p, kv_head, row);
    OutElement* dst = static_cast<OutElement*>(p.out) +
                      ((int64_t(piece.request) * p.seqlen_q + query.s) * p.heads_q + query.head) * kHeadDimV +
                      half * kHalfV;
    reinterpret_cast<uint4*>(dst)[lane] = *reinterpret_cast<const uint4*>(mine + r * kStagedRowBytes + 16 * lane);
  }
}

// Log-sum-exp of one packed row (< p.rows) of a writable piece: natural log in `lse`, +inf when the row
// saw no key; log2 in `lse_partial`, -inf when this piece saw no key for the row. A NaN row sum (a bad
// page) stays NaN. Shared with decode_narrow.cu.
__device__ __forceinline__ void store_row_lse(const DecodeParams& p, const Piece& piece, int kv_head, int row,
                                              float row_max, float row_sum) {
  const bool empty = row_sum == 0.f;
  const float lse2 = row_max + log2f(row_sum);
  if (piece.split) {
    p.lse_partial[(int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row] = empty ? -positive_infinity() : lse2;
  } else {
    const PackedQuery query = packed_query(p, kv_head, row);
    p.lse[(int64_t(piece.request) * p.heads_q + query.head) * p.seqlen_q + query.s] =
        empty ? positive_infinity() : lse2 * kLn2;
  }
}

// The log-sum-exp of the thread's two rows (one thread of each quad writes).
__device__ __forceinline__ void store_lse(const DecodeParams& p, const Piece& piece, int kv_head, int rows_base,
                                          const FragmentCoords& at, const float (&row_max)[2],
                                          const float (&row_sum)[2]) {
  if (!piece.writable) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = rows_base + at.row[i];
    if (row >= p.rows) continue;
    store_row_lse(p, piece, kv_head, row, row_max[i], row_sum[i]);
  }
}

}  // namespace flashmla
