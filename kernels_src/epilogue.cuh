// Writing one piece's result: to out/lse when the request has a single piece, otherwise to the fp32
// partial buffers that the combine kernel merges.
#pragma once
#include "plan.cuh"
#include "softmax.cuh"

namespace flashmla {

__device__ __forceinline__ uint32_t out_word(float a, float b) {
  const OutElement2 pair = to_out_element2(a, b);
  return *reinterpret_cast<const uint32_t*>(&pair);
}
__device__ __forceinline__ uint32_t half_word(float a, float b) {
  const __half2 pair = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

#if defined(FLASHMLA_PARTIAL_F16)
// The fp16 partial rows (-DFLASHMLA_PARTIAL_F16: decode.cu's, in quad order, and decode_ring.cu's with one
// 2^k a launch; the combine built to match, ARCHITECTURE "Partial results"): half the bytes of fp32 rows to
// write and for the combine to read. In decode.cu each (row, half of the columns) is scaled by the power of
// two 2^k that brings its largest magnitude into [2^14, 2^15), so fp16 neither overflows (a bf16 cache may
// hold values far above 65504) nor drops small rows to subnormals; k = 0 where the largest is 0, inf or NaN
// (such rows keep what they hold). |k| <= 126, so 2^k and 2^-k are normal floats and the products with them
// exact.
__device__ __forceinline__ int partial_f16_exponent(float largest) {
  if (!(largest > 0.f) || isinf(largest)) return 0;
  const int exponent = ((__float_as_int(largest) >> 23) & 0xff) - 127;  // floor(log2); -127 if subnormal
  return min(126, max(-126, 14 - exponent));
}
__device__ __forceinline__ float power_of_two(int k) { return __int_as_float((127 + k) << 23); }

// A split piece's half rows as fp16: the quad's largest magnitude per row (a row's 256 columns of this
// half are the quad's: two shuffles), scaled, rounded and stored in quad order (element.cuh): each lane's two
// words as they lie, the quad's stores whole 32-byte sectors; the quad's first lane stores 2^-k.
__device__ __forceinline__ void store_partial_f16(const DecodeParams& p, const Piece& piece, int kv_head,
                                                  int rows_base, const FragmentCoords& at, int half,
                                                  const OutputHalf& o, const float (&inv_sum)[2]) {
  __half* const values = reinterpret_cast<__half*>(p.out_partial);
  float* const inv_scales = partial_inv_scales(p.out_partial, p.partial_slots, p.heads_kv, p.rows);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    // Four running maxima, each over every fourth pair: chains of 8 dependent FMNMX instead of one of 32
    // (fmaxf is associative, NaN included: a NaN operand is passed over either way).
    float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      part[j % 4] = fmaxf(part[j % 4], fmaxf(fabsf(o.v[4 * j + 2 * i]), fabsf(o.v[4 * j + 2 * i + 1])));
    }
    float largest = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
    largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, 1));
    largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, 2));
    const int k = partial_f16_exponent(largest * inv_sum[i]);
    const float scale = power_of_two(k);  // after inv_sum: their product may overflow where neither does
    const int row = rows_base + at.row[i];
    const bool real = row < p.rows;
    const int64_t row_index = (int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row;
    __half* const dst = values + row_index * kHeadDimV + half * kHalfV + 2 * at.column;
#pragma unroll
    for (int m = 0; m < 16; ++m) {
      const int a = 4 * (2 * m) + 2 * i, b = 4 * (2 * m + 1) + 2 * i;  // columns 16m + 2t and 16m + 8 + 2t
      if (real) {
        *reinterpret_cast<uint2*>(dst + 16 * m) =
            make_uint2(half_word(o.v[a] * inv_sum[i] * scale, o.v[a + 1] * inv_sum[i] * scale),
                       half_word(o.v[b] * inv_sum[i] * scale, o.v[b + 1] * inv_sum[i] * scale));
      }
    }
    if (real && at.publishes()) inv_scales[2 * row_index + half] = power_of_two(-k);
  }
}
#endif

// Store this warpgroup's 256 output columns (`half`) of the piece, normalised, straight from registers
// in whole 32-byte sectors: a split piece's fp32 partials 8 bytes a thread as they lie, a single piece's
// 16-bit output 8 bytes a thread once the quad has swapped words (quad_adjacent_words). Nothing goes
// through shared memory, so the next piece's Q tile may land meanwhile (finish_piece).
__device__ __forceinline__ void store_output(const DecodeParams& p, const Piece& piece, int kv_head,
                                             int rows_base, const FragmentCoords& at, int half,
                                             const OutputHalf& o, const float (&inv_sum)[2]) {
  if (!piece.writable) return;
#if defined(FLASHMLA_PARTIAL_F16)
  if (piece.split) {
    store_partial_f16(p, piece, kv_head, rows_base, at, half, o, inv_sum);
    return;
  }
#endif
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
  const int quad_lane = at.column / 2;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = rows_base + at.row[i];
    const bool real = row < p.rows;  // the swaps below take every lane of the warp, real row or not
    OutElement* dst = nullptr;
    if (real) {
      const PackedQuery query = packed_query(p, kv_head, row);
      dst = static_cast<OutElement*>(p.out) +
            ((int64_t(piece.request) * p.seqlen_q + query.s) * p.heads_q + query.head) * kHeadDimV +
            half * kHalfV + 4 * quad_lane;
    }
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int a = 4 * (2 * k) + 2 * i, b = 4 * (2 * k + 1) + 2 * i;  // columns 16k + 2t and 16k + 8 + 2t
      const uint2 words = quad_adjacent_words(out_word(o.v[a] * inv_sum[i], o.v[a + 1] * inv_sum[i]),
                                              out_word(o.v[b] * inv_sum[i], o.v[b + 1] * inv_sum[i]), quad_lane);
      if (real) *reinterpret_cast<uint2*>(dst + 16 * k) = words;
    }
  }
}

// Log-sum-exp of one packed row (< p.rows) of a writable piece: natural log in `lse`, +inf when the row
// saw no key; log2 in `lse_partial`, -inf when this piece saw no key for the row. A NaN row sum (a bad
// page) stays NaN. Shared with decode_narrow.cu and decode_ring.cu, which pass the row's `known` query
// (packed_query's, worked out already for its output; read for a single piece only) so that its division
// is not done twice.
__device__ __forceinline__ void store_row_lse(const DecodeParams& p, const Piece& piece, int kv_head, int row,
                                              float row_max, float row_sum, const PackedQuery* known = nullptr) {
  const bool empty = row_sum == 0.f;
  const float lse2 = row_max + log2f(row_sum);
  if (piece.split) {
    p.lse_partial[(int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row] = empty ? -positive_infinity() : lse2;
  } else {
    const PackedQuery query = known != nullptr ? *known : packed_query(p, kv_head, row);
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
