// Split-KV MLA decode for sm_90a: one CTA = 64 packed query rows x one KV head x one part of the plan.
//
// Grid (ceil(rows / 64), heads_kv, num_parts), 256 threads, kSharedBytes of dynamic shared memory.
// Roles ("split roles" design):
//   warpgroup 0: S = Q K^T, online softmax, P -> smem, O[:, 0:256] += P V with P from registers.
//   warpgroup 1: TMA producer (one thread) and O[:, 256:512] += P V with P from shared memory.
// Pages stream through a two-stage ring of 72 KB tiles; V is the first 512 columns of the K tile.
#include "decode_config.cuh"
#include "sync.cuh"
#include "load.cuh"
#include "mma.cuh"
#include "softmax.cuh"
#include "epilogue.cuh"

namespace flashmla {

constexpr int kProducerThread = kWarpgroupThreads;  // first thread of warpgroup 1

__device__ __forceinline__ int pages_of(int seqlen) { return (seqlen + kPageSize - 1) / kPageSize; }

// The piece of `request` that the part described by `meta` processes.
__device__ __forceinline__ Piece piece_of(const DecodeParams& p, const int* meta, int request) {
  Piece piece;
  piece.request = request;
  piece.seqlen = p.seqlens[request];
  const bool first = request == meta[kBeginRequest];
  piece.page_begin = first ? meta[kBeginPage] : 0;
  piece.page_end = request == meta[kEndRequest] ? meta[kEndPage] : pages_of(piece.seqlen);
  const int first_slot = p.num_splits[request];
  piece.slot = first_slot + (first ? meta[kBeginPiece] : 0);
  piece.split = p.num_splits[request + 1] - first_slot > 1;
  return piece;
}

// The producer's walk over the part's (request, page) sequence, which runs up to two pages ahead.
struct PageCursor {
  const DecodeParams& p;
  const int* meta;
  int request, page, page_end;

  __device__ __forceinline__ PageCursor(const DecodeParams& params, const int* m) : p(params), meta(m) {
    request = meta[kBeginRequest];
    const Piece piece = piece_of(p, meta, request);
    page = piece.page_begin;
    page_end = piece.page_end;
    skip_finished();
  }
  __device__ __forceinline__ void skip_finished() {
    while (page >= page_end && request < meta[kEndRequest]) {
      const Piece piece = piece_of(p, meta, ++request);
      page = piece.page_begin;
      page_end = piece.page_end;
    }
  }
  __device__ __forceinline__ bool valid() const { return page < page_end; }
  __device__ __forceinline__ void issue(const TensorMap* map, SharedStorage& smem, int stage, int kv_head,
                                        uint64_t hint) {
    const int block = p.block_table[request * p.block_table_stride + page];
    load_kv_page(map, smem, stage, block, kv_head, hint);
    ++page;
    skip_finished();
  }
};

// Per-row visibility limits of the two rows a thread owns (causal: bottom-right aligned).
__device__ __forceinline__ void row_limits(const DecodeParams& p, const Piece& piece, int rows_base,
                                           const FragmentCoords& at, int (&limit)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = rows_base + at.row[i];
    const int s = row < p.rows ? row / p.heads_per_group : p.seqlen_q - 1;
    limit[i] = piece.seqlen - (p.causal ? p.seqlen_q - 1 - s : 0);
  }
}

// Warpgroup 0: scores, softmax, left half of the output. `item` counts pages over the whole part.
__device__ __forceinline__ void softmax_warpgroup(const DecodeParams& p, SharedStorage& smem, const Piece& piece,
                                                  int kv_head, int rows_base, int& item) {
  const int thread = threadIdx.x % kWarpgroupThreads;
  const FragmentCoords at(thread);
  int limit[2];
  row_limits(p, piece, rows_base, at, limit);
  // Pages that end past this token hold masked or stale keys for some row.
  const int mask_from = piece.seqlen - (p.causal ? p.seqlen_q - 1 : 0);

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  OnlineSoftmax softmax;
  softmax.reset();

  for (int page = piece.page_begin; page < piece.page_end; ++page, ++item) {
    const int stage = item % kStages;
    const int phase = (item / kStages) & 1;
    uint8_t* tile = smem.kv[stage];
    float s[32];
    issue_qk(smem.q, tile, smem.full[stage], phase, s);
    cute::warpgroup_wait<0>();

    const int token0 = page * kPageSize;
    float rescale[2];
    if (token0 + kPageSize > mask_from) {
      softmax.update<true>(s, p.scale_log2, at, token0, limit, rescale);
    } else {
      softmax.update<false>(s, p.scale_log2, at, token0, limit, rescale);
    }
    uint32_t frag[4][4];
    pack_probabilities(s, frag);

    // Warpgroup 1 is done with the previous P and row scales (before a piece's first page, the CTA
    // barrier of the Q reload ordered that already).
    if (page > piece.page_begin) named_barrier_sync(kBarrierPFree, kThreads);
    store_probabilities(frag, smem.p, at);
    if (at.column == 0) {
      smem.row_scale[at.row[0]] = rescale[0];
      smem.row_scale[at.row[1]] = rescale[1];
    }
    const int valid = piece.seqlen - token0;
    if (valid < kPageSize) zero_stale_v_rows(tile, valid, thread);
    fence_generic_to_async_smem();
    if (valid < kPageSize) named_barrier_sync(kBarrierWarpgroup0, kWarpgroupThreads);
    named_barrier_arrive(kBarrierPReady, kThreads);

    scale_rows(o, rescale);
    issue_pv_from_regs(frag, tile, 0, o);
    cute::warpgroup_wait<0>();
    mbarrier_arrive(&smem.empty[stage]);
  }

  float inv_sum[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    softmax.row_sum[i] = quad_sum(softmax.row_sum[i]);
    inv_sum[i] = softmax.row_sum[i] > 0.f ? 1.f / softmax.row_sum[i] : 0.f;
  }
  if (at.column == 0) {
    smem.row_inv_sum[at.row[0]] = inv_sum[0];
    smem.row_inv_sum[at.row[1]] = inv_sum[1];
    store_lse(p, piece, kv_head, rows_base, at, softmax.row_max, softmax.row_sum);
  }
  named_barrier_arrive(kBarrierEpilogue, kThreads);
  store_output(p, piece, kv_head, rows_base, at, 0, o, inv_sum);
}

// Warpgroup 1: the right half of the output, and the TMA producer.
__device__ __forceinline__ void value_warpgroup(const DecodeParams& p, SharedStorage& smem, const Piece& piece,
                                                int kv_head, int rows_base, int& item,
                                                PageCursor& cursor, const TensorMap* kv_map, uint64_t hint) {
  const int thread = threadIdx.x % kWarpgroupThreads;
  const FragmentCoords at(thread);
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;

  for (int page = piece.page_begin; page < piece.page_end; ++page, ++item) {
    const int stage = item % kStages;
    const int phase = (item / kStages) & 1;
    uint8_t* tile = smem.kv[stage];
    named_barrier_sync(kBarrierPReady, kThreads);
    const float rescale[2] = {smem.row_scale[at.row[0]], smem.row_scale[at.row[1]]};
    scale_rows(o, rescale);
    // Already complete (warpgroup 0 waited on them); waiting here makes the TMA data visible to us.
#pragma unroll
    for (int box = kBoxesPerHalf; box < kVBoxes; ++box) mbarrier_wait(&smem.full[stage][box], phase);
    issue_pv_from_smem(smem.p, tile, 1, o);
    cute::warpgroup_wait<0>();

    if (threadIdx.x == kProducerThread && cursor.valid()) {
      mbarrier_wait(&smem.empty[stage], phase);  // warpgroup 0's PV of this page is done too
      cursor.issue(kv_map, smem, stage, kv_head, hint);
    }
    __syncwarp();
    // P and the row scales may be overwritten now. A full sync rather than an arrive: warpgroup 1 has
    // nothing to do until the next P anyway, and the handoff is then ordered for every tool.
    if (page + 1 < piece.page_end) named_barrier_sync(kBarrierPFree, kThreads);
  }

  named_barrier_sync(kBarrierEpilogue, kThreads);
  const float inv_sum[2] = {smem.row_inv_sum[at.row[0]], smem.row_inv_sum[at.row[1]]};
  store_output(p, piece, kv_head, rows_base, at, 1, o, inv_sum);
}

}  // namespace flashmla

using namespace flashmla;

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    flashmla_decode(const __grid_constant__ DecodeParams p, const __grid_constant__ TensorMap kv_map) {
  extern __shared__ uint8_t smem_raw[];
  // Align by offsetting the shared array itself, so that the compiler keeps shared-space accesses.
  const uint32_t misalignment = smem_addr(smem_raw) & 1023;
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw + ((1024 - misalignment) & 1023));

  const int* meta = p.metadata + blockIdx.z * kMetadataFields;
  const int begin_request = meta[kBeginRequest];
  if (begin_request >= p.batch) return;  // the plan gave this part nothing
  const int end_request = meta[kEndRequest];
  const int kv_head = blockIdx.y;
  const int rows_base = blockIdx.x * kTileRows;
  // Several row tiles read the same pages: keep them in L2 for the siblings.
  const uint64_t hint = gridDim.x > 1 ? kCacheHintEvictNormal : kCacheHintEvictFirst;

  allow_dependent_launch();

  if (threadIdx.x == 0) {
    for (int stage = 0; stage < kStages; ++stage) {
      for (int box = 0; box < kBoxes; ++box) mbarrier_init(&smem.full[stage][box], 1);
      mbarrier_init(&smem.empty[stage], kWarpgroupThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  PageCursor cursor(p, meta);
  if (threadIdx.x == kProducerThread) {
    for (int stage = 0; stage < kStages && cursor.valid(); ++stage) cursor.issue(&kv_map, smem, stage, kv_head, hint);
  }
  __syncwarp();  // reconverge the producer's warp before the barriers below

  // Broadcast from lane 0 so that the compiler sees the role as warp-uniform; otherwise it serialises
  // the wgmmas behind the role branch.
  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / kWarpgroupThreads, 0);
  int item = 0;
  for (int request = begin_request; request <= end_request; ++request) {
    const Piece piece = piece_of(p, meta, request);
    named_barrier_sync(kBarrierCta, kThreads);  // nobody still reads the previous Q tile or row sums
    load_q_tile(p, smem, request, kv_head, rows_base);
    fence_generic_to_async_smem();
    named_barrier_sync(kBarrierCta, kThreads);
    if (warpgroup == 0) {
      softmax_warpgroup(p, smem, piece, kv_head, rows_base, item);
    } else {
      value_warpgroup(p, smem, piece, kv_head, rows_base, item, cursor, &kv_map, hint);
    }
  }
}
