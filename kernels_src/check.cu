// Checked mode (flashmla_cupy/checked.py): validates the device contents that a decode call's kernels
// would trust, before they run. For every request: its length is within [0, block table width * page
// size]; every page it uses holds a block index in [0, num_blocks); its piece count (num_splits)
// equals that of the plan for these lengths. For every part of tile_scheduler_metadata: its row
// equals that plan's. The plan for these lengths is what the scheduler kernel wrote into
// plan_metadata / plan_num_splits just before (stream-ordered), so the two programs cannot disagree
// on the plan algorithm.
//
// Launch geometry: grid (batch + num_parts), block (kCheckThreads), no dynamic shared memory. Block
// i < batch checks request i, its threads striding over the request's pages; block batch + p checks
// part p. Each block writes its fault bits to report[kReportHeader + block] and, when there are
// any, counts itself into the header and ORs its bits there (the header must be zeroed before).
#include <cuda/std/cstdint>  // before params.cuh: NVRTC predefines no int64_t

#include "params.cuh"

namespace flashmla {

// Mirrored by flashmla_cupy/params.py (CheckParams); its offsets are static_asserted against it.
struct CheckParams {
  const int* seqlens;          // [batch]
  const int* block_table;      // [batch, block_table_width], row stride block_table_stride
  const int* metadata;         // [num_parts, kMetadataFields]: the caller's plan
  const int* num_splits;       // [batch + 1]: the caller's plan
  const int* plan_metadata;    // the plan for these seqlens, as the scheduler makes it
  const int* plan_num_splits;
  int* report;                 // [kReportHeader + batch + num_parts]
  int64_t block_table_stride;  // in elements
  int batch;
  int num_parts;
  int num_blocks;              // k_cache.shape[0]
  int block_table_width;       // block_table.shape[1]
  int page_size;
  int padding;
};

// The report: header words, then one word of fault bits per request and per part.
constexpr int kReportFlaggedRequests = 0;
constexpr int kReportFlaggedParts = 1;
constexpr int kReportFaults = 2;
constexpr int kReportHeader = 4;
constexpr int kFaultLength = 1;  // length < 0 or past the block table's capacity
constexpr int kFaultBlock = 2;   // a used page's block index outside [0, num_blocks)
constexpr int kFaultPlan = 4;    // pieces (request) or metadata row (part) differ from the plan

}  // namespace flashmla

namespace {

constexpr int kCheckThreads = 128;

// The faults of request i, as seen by this thread (page checks are spread over the block).
__device__ int request_faults(const flashmla::CheckParams& p, int i) {
  int faults = 0;
  const int seqlen = p.seqlens[i];
  const long long capacity = static_cast<long long>(p.block_table_width) * p.page_size;
  if (seqlen < 0 || seqlen > capacity) faults |= flashmla::kFaultLength;
  if (threadIdx.x == 0) {
    const int pieces = p.num_splits[i + 1] - p.num_splits[i];
    const int plan_pieces = p.plan_num_splits[i + 1] - p.plan_num_splits[i];
    // A shifted prefix sum (num_splits[0] != 0) moves every slot: blamed on request 0.
    if (pieces != plan_pieces || (i == 0 && p.num_splits[0] != 0)) faults |= flashmla::kFaultPlan;
  }
  // The pages the decode kernel would read: those of the length, within the table's width.
  const long long visible = seqlen < 0 ? 0 : (seqlen < capacity ? seqlen : capacity);
  const int pages = static_cast<int>((visible + p.page_size - 1) / p.page_size);
  const int* row = p.block_table + static_cast<long long>(i) * p.block_table_stride;
  for (int j = threadIdx.x; j < pages; j += blockDim.x) {
    const int block = row[j];
    if (block < 0 || block >= p.num_blocks) faults |= flashmla::kFaultBlock;
  }
  return faults;
}

// The faults of part `part` of the plan: one metadata field per thread.
__device__ int part_faults(const flashmla::CheckParams& p, int part) {
  if (threadIdx.x >= flashmla::kMetadataFields) return 0;
  const int field = part * flashmla::kMetadataFields + threadIdx.x;
  return p.metadata[field] != p.plan_metadata[field] ? flashmla::kFaultPlan : 0;
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kCheckThreads)
flashmla_check(const flashmla::CheckParams p) {
  __shared__ int s_faults;
  if (threadIdx.x == 0) s_faults = 0;
  __syncthreads();

  const int item = blockIdx.x;  // a request, then a part
  const bool is_request = item < p.batch;
  const int faults = is_request ? request_faults(p, item) : part_faults(p, item - p.batch);
  if (faults) atomicOr(&s_faults, faults);
  __syncthreads();

  if (threadIdx.x == 0) {
    p.report[flashmla::kReportHeader + item] = s_faults;
    if (s_faults) {
      atomicAdd(&p.report[is_request ? flashmla::kReportFlaggedRequests : flashmla::kReportFlaggedParts], 1);
      atomicOr(&p.report[flashmla::kReportFaults], s_faults);
    }
  }
}
