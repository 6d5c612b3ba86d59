// get_mla_metadata on the device: the split-KV plan of flashmla_cupy/plan.py (plan_numpy, whose
// docstring explains the cost model), computed stream-ordered so that a decode step needs no host
// synchronisation and can be captured in a CUDA graph. It must agree with plan_numpy bit for bit,
// hence integer arithmetic only (64-bit for costs: batch * pages can exceed int32).
//
// Launch geometry: grid (1), block (kSchedulerThreads), no dynamic shared memory. (Any multiple of 32
// up to kSchedulerThreads, the launch bound, is also correct.)
//
// How: the whole block counts pages (staging them in shared memory) and reduces the total; then
// warp 0 walks the batch once, filling the parts in order. The walk is sequential by nature, so warp
// 0 takes up to 32 whole requests per step with a prefix sum of their costs, and falls back to one
// request at a time only where a part boundary falls (at most num_parts times).
#include <cuda/std/cstdint>  // before params.cuh: NVRTC predefines no int64_t

#include "pages.cuh"
#include "params.cuh"

namespace {

constexpr int kSchedulerThreads = 256;  // enough loads in flight to count 64K requests' pages quickly
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr long long kInt32Max = 0x7fffffff;  // metadata is int32 (plan.py's INT32_MAX)
// Requests whose page counts are staged in shared memory at a time (32 KiB).
constexpr int kChunk = 8192;

using flashmla::pages_of;

__device__ __forceinline__ long long warp_sum(long long v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ int warp_max(int v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

__device__ __forceinline__ long long warp_inclusive_scan(long long v, int lane) {
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const long long other = __shfl_up_sync(kFullMask, v, offset);
    if (lane >= offset) v += other;
  }
  return v;
}

// The state of the walk, held identically by every lane of warp 0 (all branches are warp-uniform).
// Lane 0 writes the metadata rows; the part being filled is "open" until it is closed.
struct Walk {
  const flashmla::SchedulerParams& p;
  long long payload;   // budget of a fresh part
  bool whole;          // every request whole: a part that cannot take the next request ends before it
  long long budget;    // what the open part can still spend
  int part;            // the open part
  int splits;          // pieces of all requests before the cursor
  int last_end_page;   // pages of the last finished request: the end of the open part if it stops there
  int lane;

  __device__ void open_part(int request, int page, int piece) {
    budget = payload;
    if (lane == 0 && part < p.num_parts) {  // part < num_parts always holds (plan.py docstring)
      int* row = p.metadata + part * flashmla::kMetadataFields;
      row[flashmla::kBeginRequest] = request;
      row[flashmla::kBeginPage] = page;
      row[flashmla::kBeginPiece] = piece;
      row[flashmla::kPayload] = stored_payload();
      for (int f = flashmla::kPayload + 1; f < flashmla::kMetadataFields; ++f) row[f] = 0;
    }
  }

  // The payload as every metadata row carries it (int32, capped as plan_numpy caps it).
  __device__ int stored_payload() const { return static_cast<int>(payload < kInt32Max ? payload : kInt32Max); }

  __device__ void close_part(int request, int end_page) {
    if (lane == 0 && part < p.num_parts) {
      int* row = p.metadata + part * flashmla::kMetadataFields;
      row[flashmla::kEndRequest] = request;
      row[flashmla::kEndPage] = end_page;
    }
    ++part;
  }

  // Request r, of `pages` pages, is finished after `pieces` pieces: extend the num_splits prefix sum.
  __device__ void finish_request(int r, int pieces, int pages) {
    if (lane == 0) p.num_splits[r + 1] = splits + pieces;
    splits += pieces;
    last_end_page = pages;
  }

  // Request r (none of it taken yet) does not fit whole in the open part: cut it over as many parts
  // as it needs, exactly as plan_numpy does.
  __device__ void place_with_cuts(int r, int pages) {
    const int overhead = p.overhead_pages;
    int page = 0, piece = 0;
    while (pages - page + overhead > budget) {
      const long long take = budget - overhead;
      if (take > 0 && !whole) {  // the open part ends with the next `take` pages of r
        page += static_cast<int>(take);  // take < pages - page here, so it fits an int
        close_part(r, page);
        ++piece;
      } else {  // the open part cannot afford a page: it ends with request r - 1
        close_part(r - 1, last_end_page);
      }
      open_part(r, page, piece);
    }
    budget -= pages - page + overhead;
    finish_request(r, piece + 1, pages);
  }

  // Places requests [begin, end), whose page counts are pages[0 .. end - begin).
  __device__ void place_chunk(const int* pages, int begin, int end) {
    int r = begin;
    while (r < end) {
      // Take whole requests r, r+1, ... while the prefix sum of their costs fits the budget. A lane
      // past the chunk gets a cost above any budget, so it never counts as fitting.
      const int j = r + lane;
      const int pages_j = j < end ? pages[j - begin] : 0;
      const long long cost = j < end ? pages_j + static_cast<long long>(p.overhead_pages) : payload + 1;
      const long long prefix = warp_inclusive_scan(cost, lane);
      // Costs are >= 0, so the lanes that fit are a run starting at lane 0.
      const int whole = __popc(__ballot_sync(kFullMask, prefix <= budget));
      if (whole > 0) {
        if (lane < whole) p.num_splits[j + 1] = splits + lane + 1;  // one piece each
        const long long spent = __shfl_sync(kFullMask, prefix, whole - 1);
        const int end_pages = __shfl_sync(kFullMask, pages_j, whole - 1);
        budget -= spent;
        splits += whole;
        last_end_page = end_pages;
        r += whole;
      }
      if (whole < kWarpSize && r < end) {  // a part boundary falls inside request r
        place_with_cuts(r, pages[r - begin]);
        ++r;
      }
    }
  }
};

}  // namespace

extern "C" __global__ void __launch_bounds__(kSchedulerThreads)
flashmla_scheduler(const flashmla::SchedulerParams p) {
  __shared__ int s_pages[kChunk];
  __shared__ long long s_warp_pages[kWarpSize];
  __shared__ int s_warp_most[kWarpSize];  // the most pages of one request, per warp

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;

  // 1. Total pages of the batch and its longest request; the first chunk of page counts stays in shared
  // memory for the walk.
  long long my_pages = 0;
  int my_most = 0;
  for (int i = threadIdx.x; i < p.batch; i += blockDim.x) {
    const int n = pages_of(p.seqlens[i], p.page_size);
    if (i < kChunk) s_pages[i] = n;
    my_pages += n;
    my_most = max(my_most, n);
  }
  my_pages = warp_sum(my_pages);
  my_most = warp_max(my_most);
  if (lane == 0) {
    s_warp_pages[warp] = my_pages;
    s_warp_most[warp] = my_most;
  }
  __syncthreads();

  Walk walk{p, 0, false, 0, 0, 0, 0, lane};
  if (warp == 0) {
    const long long overhead = p.overhead_pages;
    const long long total = warp_sum(lane < num_warps ? s_warp_pages[lane] : 0) + overhead * p.batch;
    const long long payload = (total + p.num_parts - 1) / p.num_parts + overhead;
    // Every request whole where the costliest one is at most whole_slack_percent above the payload and
    // the parts are enough for one request each (plan.py).
    const long long costliest = warp_max(lane < num_warps ? s_warp_most[lane] : 0) + overhead;
    walk.whole = p.whole_slack_percent >= 0 && p.batch <= p.num_parts &&
                 100 * costliest <= (100 + p.whole_slack_percent) * payload;
    walk.payload = walk.whole ? max(payload, costliest) : payload;
    if (p.batch > 0) walk.open_part(0, 0, 0);
    if (lane == 0) p.num_splits[0] = 0;
  }

  // 2. Warp 0 walks the batch chunk by chunk; the block stages each further chunk's page counts.
  for (int begin = 0; begin < p.batch; begin += kChunk) {
    const int end = min(p.batch, begin + kChunk);
    if (begin > 0) {
      __syncthreads();  // warp 0 is done with the previous chunk
      for (int i = threadIdx.x; i < end - begin; i += blockDim.x) s_pages[i] = pages_of(p.seqlens[begin + i], p.page_size);
      __syncthreads();
    }
    if (warp == 0) walk.place_chunk(s_pages, begin, end);
  }

  // 3. The open part ends with the last request; every later part is empty.
  if (warp == 0) {
    if (p.batch > 0) walk.close_part(p.batch - 1, walk.last_end_page);
    for (int part = walk.part + lane; part < p.num_parts; part += kWarpSize) {
      int* row = p.metadata + part * flashmla::kMetadataFields;
      for (int f = 0; f < flashmla::kMetadataFields; ++f) row[f] = 0;
      row[flashmla::kBeginRequest] = p.batch;
      row[flashmla::kEndRequest] = p.batch;
      row[flashmla::kPayload] = walk.stored_payload();
    }
  }
}
