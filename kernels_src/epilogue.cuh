// Writing one piece's result: straight to out/lse when the request has a single piece, otherwise to
// the fp32 partial buffers that the combine kernel merges.
#pragma once
#include "plan.cuh"
#include "softmax.cuh"

namespace flashmla {

// Store this warpgroup's 256 output columns (`half`) of the two rows the thread owns, normalised.
__device__ __forceinline__ void store_output(const DecodeParams& p, const Piece& piece, int kv_head,
                                             int rows_base, const FragmentCoords& at, int half,
                                             const OutputHalf& o, const float (&inv_sum)[2]) {
  if (!piece.writable) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = rows_base + at.row[i];
    if (row >= p.rows) continue;
    if (piece.split) {
      float* dst = p.out_partial + ((int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row) * kHeadDimV +
                   half * kHalfV + at.column;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<float2*>(dst + 8 * j) =
            make_float2(o.v[4 * j + 2 * i] * inv_sum[i], o.v[4 * j + 2 * i + 1] * inv_sum[i]);
      }
    } else {
      const int s = row / p.heads_per_group;
      const int head = kv_head * p.heads_per_group + row % p.heads_per_group;
      OutElement* dst = static_cast<OutElement*>(p.out) +
                        ((int64_t(piece.request) * p.seqlen_q + s) * p.heads_q + head) * kHeadDimV + half * kHalfV +
                        at.column;
#pragma unroll
      for (int j = 0; j < 32; ++j) {
        *reinterpret_cast<OutElement2*>(dst + 8 * j) =
            to_out_element2(o.v[4 * j + 2 * i] * inv_sum[i], o.v[4 * j + 2 * i + 1] * inv_sum[i]);
      }
    }
  }
}

// Log-sum-exp of the two rows (one thread of each quad writes): natural log in `lse`, +inf when the
// row saw no key; log2 in `lse_partial`, -inf when this piece saw no key for the row. A NaN row sum
// (a poisoned page) stays NaN.
__device__ __forceinline__ void store_lse(const DecodeParams& p, const Piece& piece, int kv_head, int rows_base,
                                          const FragmentCoords& at, const float (&row_max)[2],
                                          const float (&row_sum)[2]) {
  if (!piece.writable) return;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = rows_base + at.row[i];
    if (row >= p.rows) continue;
    const bool empty = row_sum[i] == 0.f;
    const float lse2 = row_max[i] + log2f(row_sum[i]);
    if (piece.split) {
      p.lse_partial[(int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row] = empty ? -positive_infinity() : lse2;
    } else {
      const int s = row / p.heads_per_group;
      const int head = kv_head * p.heads_per_group + row % p.heads_per_group;
      p.lse[(int64_t(piece.request) * p.heads_q + head) * p.seqlen_q + s] = empty ? positive_infinity() : lse2 * kLn2;
    }
  }
}

}  // namespace flashmla
