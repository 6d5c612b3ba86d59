// Parameter structs shared by the host (flashmla_cupy/params.py mirrors them with ctypes) and the kernels.
// The Python side appends static_asserts on every field offset to each compiled program, so the two
// definitions cannot drift apart without a compile error.
#pragma once
#include <cuda/std/cstdint>  // NVRTC predefines no int64_t

namespace flashmla {

using cuda::std::int64_t;
using cuda::std::uint32_t;

// The kernels' guards against device-side contents that disagree with the tensors (plan.cuh, combine.cu).
// FLASHMLA_UNGUARDED compiles them out: only the benchmark's guard-cost comparison
// (scripts/kernel_ab.py) builds it, to show what they cost. Never shipped.
#ifdef FLASHMLA_UNGUARDED
constexpr bool kGuards = false;
#else
constexpr bool kGuards = true;
#endif

// Division of non-negative ints below 2^31 by a divisor d >= 1 known before launch, which the host works
// out once (params.py's FastDivisor.of): n / d = (umulhi(n, multiplier) + n) >> shift, with shift =
// ceil(log2 d) and multiplier = floor(2^32 (2^shift - d) / d) + 1 (Granlund and Montgomery's division by
// invariant integers; the sum stays below 2^32 for n < 2^31). Three instructions where a run-time integer
// division takes ~25: the kernels split packed rows into query positions and heads in code they run once a
// piece (fetched cold) and on every masked page.
struct FastDivisor {
  uint32_t multiplier;
  int shift;
  __device__ __forceinline__ int divide(int n) const {
    return static_cast<int>((__umulhi(static_cast<uint32_t>(n), multiplier) + static_cast<uint32_t>(n)) >> shift);
  }
};

// get_mla_metadata's device planner (scheduler.cu).
struct SchedulerParams {
  const int* seqlens;   // [batch]
  int* metadata;        // [num_parts, kMetadataFields]
  int* num_splits;      // [batch + 1]
  int batch;
  int num_parts;
  int page_size;        // tokens per KV page (64)
  int overhead_pages;   // fixed cost of one piece, in pages of work
  int whole_slack_percent;  // plan.py's WHOLE_SLACK_PERCENT (negative: requests are cut as needed)
};

// The split-KV decode kernel (decode.cu). Strides are in elements.
struct DecodeParams {
  const void* q;            // [batch, seqlen_q, heads_q, 576]
  const int* block_table;   // [batch, >= pages of the longest request]
  const int* seqlens;       // [batch]
  const int* metadata;      // [num_parts, kMetadataFields]
  const int* num_splits;    // [batch + 1]
  void* out;                // [batch, seqlen_q, heads_q, 512], contiguous
  float* lse;               // [batch, heads_q, seqlen_q], contiguous
  float* out_partial;       // [batch + num_parts, heads_kv, rows, 512]
  float* lse_partial;       // [batch + num_parts, heads_kv, rows], log2 domain
  int64_t q_batch_stride;
  int64_t q_seq_stride;
  int64_t q_head_stride;
  int64_t block_table_stride;
  int batch;
  int seqlen_q;
  int heads_q;
  int heads_kv;
  int heads_per_group;      // heads_q / heads_kv
  int rows;                 // seqlen_q * heads_per_group: query rows per KV head
  int num_parts;
  int causal;
  float scale_log2;         // softmax_scale * log2(e)
  // Bounds the kernel enforces itself, whatever the device-side contents of the plan and tables:
  int num_blocks;           // k_cache.shape[0]: larger (or negative) block indices read as NaN
  int block_table_width;    // block_table.shape[1]: pages past it read as NaN, the table is not read
  int partial_slots;        // capacity of out_partial / lse_partial, in pieces
  int q_tma;                // decode.cu, decode_ring.cu: 1 when the Q tile comes in through the q tensor
                            // map (a box of 64 packed rows exists: heads_per_group a multiple or a
                            // divisor of 64)
  // An FP8 cache's per-tensor descales, float32 [1] on the device (null: 1): scores are scaled by
  // descale_q * descale_k, the output by descale_k. Read by the kernel, so CUDA graphs may change them.
  const float* descale_q;
  const float* descale_k;
  FastDivisor per_group;    // heads_per_group: a packed row's query position is row / heads_per_group
};

// The combine kernel (combine.cu): merges the pieces of split requests.
struct CombineParams {
  const float* out_partial;  // as DecodeParams
  const float* lse_partial;  // as DecodeParams
  const int* num_splits;     // [batch + 1]
  void* out;                 // as DecodeParams
  float* lse;                // as DecodeParams
  int batch;
  int seqlen_q;
  int heads_q;
  int heads_kv;
  int heads_per_group;
  int rows;
  int partial_slots;         // as DecodeParams: split requests whose slots fall outside get NaN rows
  FastDivisor per_group;     // as DecodeParams
};

// The query a packed row of a KV head stands for: row = s * heads_per_group + h_in_group is query position
// s of query head kv_head * heads_per_group + h_in_group. One home for the split, which the decode kernels
// (DecodeParams), their q loaders and the combine kernel (CombineParams) all make.
struct PackedQuery {
  int s, head;
};
template <class Params>
__device__ __forceinline__ PackedQuery packed_query(const Params& p, int kv_head, int row) {
  const int s = p.per_group.divide(row);
  return {s, kv_head * p.heads_per_group + row - s * p.heads_per_group};
}

// Fields of one row of tile_scheduler_metadata (int32), written by scheduler.cu / plan.py.
enum MetadataField : int {
  kBeginRequest = 0,   // first request this part touches; >= batch marks an empty part
  kBeginPage = 1,      // first page of kBeginRequest it processes
  kEndRequest = 2,     // last request it touches (inclusive)
  kEndPage = 3,        // one past the last page of kEndRequest it processes
  kBeginPiece = 4,     // index of its piece of kBeginRequest among that request's pieces
  kPayload = 5,        // the plan's budget of every part, in pages of work (the same in every row)
  kMetadataFields = 8  // fields 6..7 are zero
};

}  // namespace flashmla
