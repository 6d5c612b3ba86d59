// Split-KV combine: merges the pieces of every request that the plan cut into several, writing the
// final `out` and `lse` rows. Requests with a single piece were written directly by the decode kernel
// and are skipped. Partial-result format: docs/ARCHITECTURE.md ("Partial results").
//
// Launch geometry: kWarpsPerRow (W = 1 or 16, one build each) warps per (request, KV head, query row), blocks
// of kCombineWarpsPerBlock warps (4 where W = 1, else W: a block a row):
//   grid  = (batch, ceil(heads_kv * rows * W / kCombineWarpsPerBlock), 1)
//   block = (32 * kCombineWarpsPerBlock, 1, 1), no dynamic shared memory (32 KB static, used when W > 1),
// With W > 1 (few requests cut into many pieces, e.g. one long request over every SM), the warps of a
// row take a contiguous share of its pieces each and add up their sums in shared memory: one warp a
// row would leave most SMs idle and pay a memory latency per kPiecesInFlight pieces.
// launched as a programmatic dependent of the decode kernel (PDL): it may start before the decode
// kernel ends, and waits for it with griddepcontrol.wait before it reads any of its results. The plan
// (num_splits) is read before that wait: the scheduler kernel that wrote it had completed before the
// decode kernel (launched without PDL) began. So the blocks of unsplit requests (all of them, when
// the plan cut nothing) leave at once, on SMs that the decode kernel's tail leaves idle, instead of
// holding their slots until the decode grid has ended (one block still waits: see below).
// The request is on x (limit 2^31 - 1) and the warps of one request on y (limit 65535, so
// heads_kv * rows = seqlen_q * heads_q <= 4 * 65535): the index math stays 32-bit, where a 64-bit
// division would be a slow subroutine call.
//
// Output dtype: compile with -DFLASHMLA_BF16=1 or -DFLASHMLA_FP16=1 (element.cuh).
#include <cuda/std/cstdint>  // before params.cuh: NVRTC predefines no int64_t
#include <cuda/std/limits>

#include "element.cuh"
#include "params.cuh"
#if defined(FLASHMLA_TRACE)
#include "trace.cuh"
extern "C" __device__ unsigned long long* flashmla_combine_trace = nullptr;  // CombineTrace's buffer
#endif

namespace {

using flashmla::kHeadDimV;
using flashmla::kLn2;

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Each lane owns kVecPerLane groups of 4 columns, interleaved across the warp so that every 16-byte
// vector load instruction of the warp reads 512 contiguous bytes.
constexpr int kVecPerLane = kHeadDimV / (4 * kWarpSize);
constexpr float kInf = cuda::std::numeric_limits<float>::infinity();
// Warps that merge one output row, a build each (-DFLASHMLA_COMBINE_WARPS_PER_ROW, variants.py's
// COMBINE_WARPS_PER_ROW): 1, or the whole block (kCombineWarpsPerBlock).
#ifndef FLASHMLA_COMBINE_WARPS_PER_ROW
#define FLASHMLA_COMBINE_WARPS_PER_ROW 1
#endif
constexpr int kWarpsPerRow = FLASHMLA_COMBINE_WARPS_PER_ROW;
static_assert(kWarpsPerRow == 1 || kWarpsPerRow == 16, "a warp or a block of 16 a row");
#if defined(FLASHMLA_PARTIAL_F16)
static_assert(kWarpsPerRow == 1, "fp16 partials are merged a warp a row");
#elif defined(FLASHMLA_PARTIAL_F16_QUAD_ORDER)
#error "quad order is a layout of fp16 partial rows (-DFLASHMLA_PARTIAL_F16)"
#endif
constexpr int kCombineWarpsPerBlock = kWarpsPerRow == 1 ? 4 : kWarpsPerRow;
// Pieces of a row whose partial values a warp loads at once (each takes 16 registers of a lane). A warp
// a row merges few pieces (2-3 at b = 128) beside many other rows: 2 keep it at 78 registers, six blocks
// an SM, so that the rows of every split request fit on the SMs at once (4: 119 registers, four blocks,
// the split rows of b = 128 in two waves; H200, ab203: 2 in flight 2.7-3.4 % faster on the
// variable-length 1k cells, 1.2-1.4 % at 4k, level elsewhere; 1 in flight (64 registers) +4.5 % at
// b16/2k, where rows have ~5 pieces). A block of 16 warps a row (512 threads, at most 128 registers)
// gives each warp ~4 of a row's ~66 pieces, so 4 in flight there: every SM has 64 pieces' loads in
// flight at once. -DFLASHMLA_COMBINE_IN_FLIGHT=N sets the W = 1 build's (scripts/kernel_ab.py).
#ifndef FLASHMLA_COMBINE_IN_FLIGHT
#define FLASHMLA_COMBINE_IN_FLIGHT 2
#endif
constexpr int kPiecesInFlight = kWarpsPerRow == 1 ? FLASHMLA_COMBINE_IN_FLIGHT : 4;
// Pieces' lse values a lane loads at once in the first pass (pieces j, j + 32, ...): 4 where a block
// merges a row of up to ~128 pieces, one memory latency for all; 1 where a warp merges a row of a few.
constexpr int kLseInFlight = kWarpsPerRow == 1 ? 1 : 4;
// A warp a row (W = 1) issues every load of its row's first pieces at once, right after the wait: the
// lse of piece `lane` (and its fp16 scales) and the values of the first kPiecesInFlight pieces, whose
// weights are not known yet. Loaded in turn (the lse, then the weights from it again, then the values)
// a row of 2-3 pieces paid three memory latencies after the decode's end; now one, and a second for a
// third piece. A value whose weight turns out 0 is loaded but never used (the merge skips the piece).
// With the plain warp sums below, the variable-length 1k cells took 1.3-2.1 % less on the H200 (ab228).
constexpr bool kEarlyLoads = kWarpsPerRow == 1;

// The partial rows' format, a build each: fp32, or fp16 with a power-of-two scale per (row, half of the
// columns) where the decode kernel wrote them so (-DFLASHMLA_PARTIAL_F16, epilogue.cuh; variants.py picks
// the combine that matches the decode kernel), in column order (decode_ring.cu's) or in quad order
// (decode.cu's, -DFLASHMLA_PARTIAL_F16_QUAD_ORDER: element.cuh). A lane's group of 4 columns is one 16- or
// 8-byte load.
#if defined(FLASHMLA_PARTIAL_F16)
using PartialGroup = uint2;  // four fp16 values
#else
using PartialGroup = float4;
#endif
// Four fp16 values as floats (from the words' halves by value: taking the words' addresses as __half2
// put them on the stack under NVRTC 13.5).
__device__ __forceinline__ float half_of(uint32_t word, int shift) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(word >> shift)));
}
__device__ __forceinline__ float4 unpack(uint2 v) {
  return make_float4(half_of(v.x, 0), half_of(v.x, 16), half_of(v.y, 0), half_of(v.y, 16));
}

// Four floats rounded to the output dtype, packed into 8 bytes.
__device__ __forceinline__ uint2 pack4(float4 v) {
  const flashmla::Element2 lo = flashmla::to_element2(v.x, v.y);
  const flashmla::Element2 hi = flashmla::to_element2(v.z, v.w);
  return make_uint2(*reinterpret_cast<const unsigned*>(&lo), *reinterpret_cast<const unsigned*>(&hi));
}

// Running (max, sum of exp2(x - max)) of log2-domain values; -inf values contribute nothing, and a
// NaN (a piece that read a bad page) makes the sum NaN for good.
struct Lse2 {
  float max = -kInf;
  float sum = 0.0f;

  __device__ void add(float x) { merge(x, 1.0f); }

  __device__ void merge(float other_max, float other_sum) {
    if (isnan(other_max) || isnan(other_sum)) {
      sum = cuda::std::numeric_limits<float>::quiet_NaN();
      return;
    }
    const float m = fmaxf(max, other_max);
    if (m == -kInf) return;  // both empty: -inf - -inf would be NaN
    sum = sum * exp2f(max - m) + other_sum * exp2f(other_max - m);
    max = m;
  }
};

// scripts/kernel_trace.py (-DFLASHMLA_TRACE=1 builds only): thread 0 of each block writes, at word
// 4 * (blockIdx.x * gridDim.y + blockIdx.y) of the buffer the host points flashmla_combine_trace at, the
// trace clock (trace.cuh) when the block starts, when its wait for the decode returns (0: a block that
// does not wait) and when it ends, then its SM id and whether it merges a row (bit 32).
#if defined(FLASHMLA_TRACE)
constexpr unsigned kCombineTraceBlocks = 1u << 16;
struct CombineTrace {
  unsigned long long* slot = nullptr;
  __device__ __forceinline__ CombineTrace() {
    const unsigned block = blockIdx.x * gridDim.y + blockIdx.y;
    if (flashmla_combine_trace != nullptr && threadIdx.x == 0 && block < kCombineTraceBlocks) {
      slot = flashmla_combine_trace + 4ull * block;
      slot[0] = flashmla::trace_time();
    }
  }
  __device__ __forceinline__ void waited() {
    if (slot != nullptr) slot[1] = flashmla::trace_time();
  }
  __device__ __forceinline__ void end(bool merges) {
    if (slot != nullptr) {
      slot[2] = flashmla::trace_time();
      slot[3] = (uint64_t(merges) << 32) | flashmla::trace_sm();
    }
  }
};
#else
struct CombineTrace {
  __device__ __forceinline__ void waited() {}
  __device__ __forceinline__ void end(bool) {}
};
#endif

}  // namespace

// The fp16-partial build (W = 1: variants.py) also asks for one block an SM at least: without it NVRTC 13.5
// held it to 64 registers and spilled a pointer (13.0.88: 69, no spill). The fp32 builds stay as measured.
#if defined(FLASHMLA_PARTIAL_F16)
#define FLASHMLA_COMBINE_BOUNDS __launch_bounds__(kWarpSize * kCombineWarpsPerBlock, 1)
#else
#define FLASHMLA_COMBINE_BOUNDS __launch_bounds__(kWarpSize * kCombineWarpsPerBlock)
#endif

extern "C" __global__ void FLASHMLA_COMBINE_BOUNDS
flashmla_combine(const flashmla::CombineParams p) {
  CombineTrace trace;
  const int lane = threadIdx.x % kWarpSize;
  const long long request = blockIdx.x;
  const int warp = threadIdx.x / kWarpSize;
  const int share = warp % kWarpsPerRow;  // which share of the row's pieces this warp takes
  const int row_of_request = (blockIdx.y * kCombineWarpsPerBlock + warp) / kWarpsPerRow;  // over heads_kv * rows
  const int row = row_of_request % p.rows;
  const int g = row_of_request / p.rows;

  // The plan, complete before the decode kernel began (see the top): no wait needed to read it.
  const int first_slot = p.num_splits[request];
  const int pieces = p.num_splits[request + 1] - first_slot;
  if (pieces <= 1) {  // written directly by the decode kernel
    // One block waits all the same, so that this grid never completes before the decode grid: work
    // queued after the combine may read out and lse of any request.
    if (blockIdx.x == 0 && blockIdx.y == 0) {
      asm volatile("griddepcontrol.wait;" ::: "memory");
      trace.waited();
    }
    trace.end(false);
    return;
  }

  // The decode kernel, our PDL primary, writes everything else we read: wait for it.
  asm volatile("griddepcontrol.wait;" ::: "memory");
  trace.waited();
  if (g >= p.heads_kv) return;  // the last block of a request may have idle warps

  // Output row and lse element of this (request, query token s, query head h).
  const flashmla::PackedQuery query = flashmla::packed_query(p, g, row);
  const int s = query.s, h = query.head;
  const long long out_row = (request * p.seqlen_q + s) * p.heads_q + h;
  float* lse_out = p.lse + (request * p.heads_q + h) * p.seqlen_q + s;
  uint2* out = reinterpret_cast<uint2*>(p.out) + out_row * (kHeadDimV / 4);

  float4 acc[kVecPerLane];
  for (int v = 0; v < kVecPerLane; ++v) acc[v] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

  // A plan whose pieces fall outside the workspace (num_splits from another batch): never read
  // there, and say so with NaN rows.
  if (flashmla::kGuards && (first_slot < 0 || first_slot > p.partial_slots - pieces)) {
    const float nan = cuda::std::numeric_limits<float>::quiet_NaN();
    if (share == 0) {
      for (int v = 0; v < kVecPerLane; ++v) out[v * kWarpSize + lane] = pack4(make_float4(nan, nan, nan, nan));
      if (lane == 0) *lse_out = nan;
    }
    trace.end(true);
    return;
  }

  // Piece j of this row: lse at lse_partial[slot][g][row], values at out_partial[slot][g][row][:] (fp16:
  // their 2^-k for columns 0-255 and 256-511 at inv_scales[slot][g][row][0..1]).
  const long long row_stride = static_cast<long long>(p.heads_kv) * p.rows;
  const long long first_row = static_cast<long long>(first_slot) * row_stride + static_cast<long long>(g) * p.rows + row;
  const float* lse_piece = p.lse_partial + first_row;  // piece j at lse_piece[j * row_stride]
  const PartialGroup* values = reinterpret_cast<const PartialGroup*>(p.out_partial) + first_row * (kHeadDimV / 4);
  const long long piece_stride = row_stride * (kHeadDimV / 4);  // in groups of 4 columns
#if defined(FLASHMLA_PARTIAL_F16)
  const float2* inv_scales = reinterpret_cast<const float2*>(
                                 flashmla::partial_inv_scales(p.out_partial, p.partial_slots, p.heads_kv, p.rows)) +
                             first_row;  // piece j at inv_scales[j * row_stride]
#endif

  // The partial values of kPiecesInFlight pieces at a time (each lane's kVecPerLane groups of 4 columns),
  // and (kEarlyLoads) the early loads: piece `lane`'s lse and scales, the first pieces' values (pieces >= 2
  // here, so the first two exist; a later one past the row's end reads its last piece again, unused).
  PartialGroup x[kPiecesInFlight][kVecPerLane];
  float my_lse = -kInf;
#if defined(FLASHMLA_PARTIAL_F16)
  float2 my_inv_scale = make_float2(1.0f, 1.0f);
#endif
  if constexpr (kEarlyLoads) {
    if (lane < pieces) {
      my_lse = lse_piece[lane * row_stride];
#if defined(FLASHMLA_PARTIAL_F16)
      my_inv_scale = inv_scales[lane * row_stride];
#endif
    }
#pragma unroll
    for (int u = 0; u < kPiecesInFlight; ++u) {
      const PartialGroup* piece = values + min(u, pieces - 1) * piece_stride;
#pragma unroll
      for (int v = 0; v < kVecPerLane; ++v) x[u][v] = piece[v * kWarpSize + lane];
    }
  }

  // 1. max M and S = sum_j exp2(lse_j - M) over all the pieces, lane-strided then across the warp (each
  // of a row's warps computes them).
  Lse2 total;
  float my_term = 0.0f;  // kEarlyLoads: exp2(lse - M) of piece `lane`, its weight in the merge
  if (kEarlyLoads && pieces <= kWarpSize) {
    // Every piece's lse is in a lane: the warp's max, then the sum of the lanes' terms, one exp2 a lane (the
    // running pair's merges took one at every step). A NaN lse (a piece that read a bad page) makes its term,
    // and so the sum, NaN; fmaxf passes over it.
    float max = my_lse;
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      max = fmaxf(max, __shfl_xor_sync(kFullMask, max, offset));
    }
    my_term = my_lse == -kInf ? 0.0f : exp2f(my_lse - max);
    float sum = my_term;
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
    total.max = max;
    total.sum = sum;
  } else {
    if constexpr (kEarlyLoads) total.add(my_lse);
    for (int j = lane + (kEarlyLoads ? kWarpSize : 0); j < pieces; j += kLseInFlight * kWarpSize) {
      float x[kLseInFlight];  // loaded before any is used: one memory latency for up to 128 pieces
#pragma unroll
      for (int u = 0; u < kLseInFlight; ++u) {
        const int piece = j + u * kWarpSize;
        x[u] = piece < pieces ? lse_piece[piece * row_stride] : -kInf;
      }
#pragma unroll
      for (int u = 0; u < kLseInFlight; ++u) total.add(x[u]);
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other_max = __shfl_xor_sync(kFullMask, total.max, offset);
      const float other_sum = __shfl_xor_sync(kFullMask, total.sum, offset);
      total.merge(other_max, other_sum);
    }
    if constexpr (kEarlyLoads) my_term = lane < pieces ? exp2f(my_lse - total.max) : 0.0f;
  }

  if (total.sum == 0.0f) {  // no piece saw a key for this row (a NaN sum goes on, to NaN rows)
    if (lane == 0 && share == 0) *lse_out = kInf;
  } else {
    // 2. out = sum_j exp2(lse_j - M) * out_partial_j / S. Weights are computed 32 pieces at a time,
    // one per lane, and broadcast. A piece of weight 0 is skipped: it saw no key, and its partial row
    // is not guaranteed to be finite.
    // kPiecesInFlight pieces' loads are issued before any is used: one piece at a time, a long
    // request (tens of pieces) paid one memory latency per piece.
    // This warp's share: pieces [begin, end).
    const int per_warp = (pieces + kWarpsPerRow - 1) / kWarpsPerRow;
    const int begin = min(pieces, share * per_warp);
    const int end = min(pieces, begin + per_warp);
    for (int base = begin; base < end; base += kWarpSize) {
      const bool mine = base + lane < end;
      const bool early = kEarlyLoads && base == 0;  // this lane's lse (and scales) and the first values are in
      const float my_weight =
          early ? my_term : (mine ? exp2f(lse_piece[(base + lane) * row_stride] - total.max) : 0.0f);
      const int count = min(kWarpSize, end - base);
#if defined(FLASHMLA_PARTIAL_F16)
      {
        // The weight of each half of the piece's columns with its 2^-k folded in (a power of two: the
        // product is exact but for underflow far below the row's sum).
        const float2 inv_scale = early ? my_inv_scale
                                       : (mine ? inv_scales[(base + lane) * row_stride] : make_float2(1.0f, 1.0f));
        for (int first = 0; first < count; first += kPiecesInFlight) {
          float weight[kPiecesInFlight][2];  // columns 0-255, 256-511
#pragma unroll
          for (int u = 0; u < kPiecesInFlight; ++u) {
            const int from = (first + u) % kWarpSize;
            const float w = first + u < count ? __shfl_sync(kFullMask, my_weight, from) : 0.0f;
            weight[u][0] = w * __shfl_sync(kFullMask, inv_scale.x, from);
            weight[u][1] = w * __shfl_sync(kFullMask, inv_scale.y, from);
            if (early && first == 0) continue;  // loaded at the top
            const PartialGroup* piece = values + (base + first + u) * piece_stride;
#pragma unroll
            for (int v = 0; v < kVecPerLane; ++v) x[u][v] = w != 0.0f ? piece[v * kWarpSize + lane] : make_uint2(0, 0);
          }
#pragma unroll
          for (int u = 0; u < kPiecesInFlight; ++u) {
#pragma unroll
            for (int v = 0; v < kVecPerLane; ++v) {
              const float wv = weight[u][v / (kVecPerLane / 2)];  // groups v < 2 hold columns 0-255
              if (wv == 0.0f) continue;
              const float4 xv = unpack(x[u][v]);
              acc[v].x = fmaf(wv, xv.x, acc[v].x);
              acc[v].y = fmaf(wv, xv.y, acc[v].y);
              acc[v].z = fmaf(wv, xv.z, acc[v].z);
              acc[v].w = fmaf(wv, xv.w, acc[v].w);
            }
          }
        }
      }
#else
      for (int first = 0; first < count; first += kPiecesInFlight) {
        float weight[kPiecesInFlight];
#pragma unroll
        for (int u = 0; u < kPiecesInFlight; ++u) {
          weight[u] = __shfl_sync(kFullMask, my_weight, (first + u) % kWarpSize);
          if (first + u >= count) weight[u] = 0.0f;
          if (early && first == 0) continue;  // loaded at the top
          const float4* piece = values + (base + first + u) * piece_stride;
#pragma unroll
          for (int v = 0; v < kVecPerLane; ++v) {
            x[u][v] = weight[u] != 0.0f ? piece[v * kWarpSize + lane] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          }
        }
#pragma unroll
        for (int u = 0; u < kPiecesInFlight; ++u) {
          if (weight[u] == 0.0f) continue;
#pragma unroll
          for (int v = 0; v < kVecPerLane; ++v) {
            acc[v].x = fmaf(weight[u], x[u][v].x, acc[v].x);
            acc[v].y = fmaf(weight[u], x[u][v].y, acc[v].y);
            acc[v].z = fmaf(weight[u], x[u][v].z, acc[v].z);
            acc[v].w = fmaf(weight[u], x[u][v].w, acc[v].w);
          }
        }
      }
#endif
    }
    const float inv_sum = 1.0f / total.sum;
    for (int v = 0; v < kVecPerLane; ++v) {
      acc[v].x *= inv_sum;
      acc[v].y *= inv_sum;
      acc[v].z *= inv_sum;
      acc[v].w *= inv_sum;
    }
    // Natural-log lse: log2(sum_t 2^x_t) = M + log2(S), times ln 2.
    if (lane == 0 && share == 0) *lse_out = (total.max + log2f(total.sum)) * kLn2;
  }

  if constexpr (kWarpsPerRow == 1) {
#if defined(FLASHMLA_PARTIAL_F16_QUAD_ORDER)
    // decode.cu's fp16 partials lie in quad order (element.cuh): this lane's group holds columns 2t, 2t + 1,
    // 8 + 2t, 9 + 2t of its quad's 16 (t = lane % 4); the quad swaps them back into order as it writes.
    for (int v = 0; v < kVecPerLane; ++v) {
      const uint2 words = pack4(acc[v]);
      out[v * kWarpSize + lane] = flashmla::quad_adjacent_words(words.x, words.y, lane % 4);
    }
#else
    for (int v = 0; v < kVecPerLane; ++v) out[v * kWarpSize + lane] = pack4(acc[v]);
#endif
  } else {
    // The block's warps are one row's (all of them got here, as every branch above depends on the row
    // alone). Add up their sums; thread c of the block writes the row's c-th group of 4 columns.
    constexpr int kGroups = kVecPerLane * kWarpSize;
    static_assert(kGroups <= kWarpSize * kCombineWarpsPerBlock, "a group of columns per thread at most");
    __shared__ float4 sums[kCombineWarpsPerBlock][kGroups];
    for (int v = 0; v < kVecPerLane; ++v) sums[warp][v * kWarpSize + lane] = acc[v];
    __syncthreads();
    const int group = threadIdx.x;
    if (group < kGroups) {
      float4 row_sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int w = 0; w < kCombineWarpsPerBlock; ++w) {
        const float4 x = sums[w][group];
        row_sum = make_float4(row_sum.x + x.x, row_sum.y + x.y, row_sum.z + x.z, row_sum.w + x.w);
      }
      out[group] = pack4(row_sum);
    }
  }
  trace.end(true);
}
