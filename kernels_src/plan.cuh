// The decode kernel's side of the split-KV plan (get_mla_metadata): which requests and pages one CTA
// processes, where each piece's result goes, and the page streams its loads follow.
//
// Nothing here trusts device-side contents: a plan made for other lengths or another batch, lengths
// past the block table's capacity and block indices outside the cache never make the kernel touch
// memory outside its tensors. Pages past the block table and out-of-range block indices are "bad"
// (their request's rows come out NaN); partial slots outside the workspace are never written.
#pragma once
#include "decode_config.cuh"
#include "pages.cuh"
#include "sync.cuh"

namespace flashmla {

// How a bad page stays out of memory the kernel does not own. A 16-bit cache hands the block index to
// TMA unchecked: a box outside the tensor map is never read but filled with NaN (the host encodes the
// map with the NaN fill), and the NaN reaches the scores, P, the row sums and O by itself, with nothing
// on the loading thread's path (range checks there cost 3 % at h_q = 128: docs/PERF_NOTES.md). TMA fills
// only floating-point maps with NaN, and an FP8 cache is mapped as bytes (filled with zeros), so its
// loading thread checks the index and flags the page, and the consumer turns the page's scores into NaN.
#if defined(FLASHMLA_KV_E4M3)
constexpr bool kFlagBadPages = kGuards;
#else
constexpr bool kFlagBadPages = false;
#endif
// The block a page past the block table loads: outside every tensor map.
constexpr int kBlockOutsideCache = -1;

// A page past the block table's width is bad, and the table is not read there.
__device__ __forceinline__ bool past_table(const DecodeParams& p, int page) { return page >= p.block_table_width; }
// Where the block-table entry of a request's page lies.
__device__ __forceinline__ const int* table_entry(const DecodeParams& p, int request, int page) {
  return p.block_table + int64_t(request) * p.block_table_stride + page;
}
// With kFlagBadPages, whether a page with block-table entry `block` is bad: past the table (whose entry
// is then kBlockOutsideCache, not read), or an index outside [0, num_blocks).
__device__ __forceinline__ bool bad_block(const DecodeParams& p, int page, int block) {
  return past_table(p, page) || block < 0 || block >= p.num_blocks;
}
// The block-table entry of a request's page, read directly (a consumer's own check; the loaders copy
// theirs in asynchronously: PageStreamOf).
__device__ __forceinline__ int block_entry(const DecodeParams& p, int request, int page) {
  return past_table(p, page) ? kBlockOutsideCache : __ldg(table_entry(p, request, page));
}

// One row of tile_scheduler_metadata, read once and clamped to the batch.
struct PartPlan {
  int begin_request, begin_page, end_request, end_page, begin_piece;
  int payload;  // every part's budget, in pages of work

  __device__ __forceinline__ static PartPlan load(const DecodeParams& p, int part) {
    const int* meta = p.metadata + part * kMetadataFields;
    PartPlan plan;
    plan.begin_request = meta[kBeginRequest];
    plan.begin_page = meta[kBeginPage];
    plan.end_request = kGuards ? min(meta[kEndRequest], p.batch - 1) : meta[kEndRequest];
    plan.end_page = meta[kEndPage];
    plan.begin_piece = meta[kBeginPiece];
    plan.payload = meta[kPayload];
    return plan;
  }
  // The plan gave this part nothing (or nothing that exists).
  __device__ __forceinline__ bool empty(const DecodeParams& p) const {
    return begin_request < 0 || begin_request >= p.batch || end_request < begin_request;
  }
};

// Pages [begin, end) of `request` that the part processes. Pages past the length are cut off (they
// hold no visible key), and so is everything after the first page past the block table (that one is
// bad, which is all the request's rows need).
__device__ __forceinline__ void page_range(const DecodeParams& p, const PartPlan& part, int request, int seqlen,
                                           int& begin, int& end) {
  begin = request == part.begin_request ? max(part.begin_page, 0) : 0;
  end = request == part.end_request ? part.end_page : pages_of(seqlen, kPageSize);
  end = kGuards ? min(end, min(pages_of(seqlen, kPageSize), p.block_table_width + 1))
                : min(end, pages_of(seqlen, kPageSize));
}

// One request's share of this CTA's part.
struct Piece {
  int request;
  int seqlen;
  int page_begin;  // pages [page_begin, page_end) of the request
  int page_end;
  int slot;        // partial-buffer slot of this piece
  bool split;      // the request has more than one piece: the result goes to the partial buffers
  bool writable;   // a split piece's slot lies inside the workspace

  __device__ __forceinline__ static Piece of(const DecodeParams& p, const PartPlan& part, int request) {
    Piece piece;
    piece.request = request;
    piece.seqlen = p.seqlens[request];
    page_range(p, part, request, piece.seqlen, piece.page_begin, piece.page_end);
    // Broadcast from lane 0: the page loop holds wgmmas, and ptxas serialises them unless it can
    // prove the loop bounds warp-uniform.
    piece.page_begin = __shfl_sync(0xffffffffu, piece.page_begin, 0);
    piece.page_end = __shfl_sync(0xffffffffu, piece.page_end, 0);
    const int first_slot = p.num_splits[request];
    piece.slot = first_slot + (request == part.begin_request ? part.begin_piece : 0);
    piece.split = p.num_splits[request + 1] - first_slot > 1;
    piece.writable = !kGuards || !piece.split || (piece.slot >= 0 && piece.slot < p.partial_slots);
    return piece;
  }
};

// The pages loaded into one page buffer, in order over the whole part: buffer A takes the first page
// of every pair of every piece, buffer B the second (kStride 2). The loads of a piece's first pages are
// thus issued while the previous piece is still being computed. With kStride 1 (decode_narrow.cu's
// ring of boxes) one stream takes every page.
//
// A stream lives in shared memory and is followed by one thread. Where that thread is a consumer (an
// FP8 cache), the refill reads the whole state at once into registers (`snapshot`) and writes the cursor
// back (`follow`): with the tensor cores busy on shared memory, each dependent shared-memory read of a
// refill cost ~100 cycles on that thread's path (trace: 311-368 cycles to read the block index alone).
template <int kStride>
struct alignas(16) PageStreamOf {
  int request, page, page_end;  // the page the buffer loads at its next refill
  int block;                    // its block-table entry, copied in asynchronously one refill ahead of its use
  int parity;                   // kStride 2: 0 for buffer A's pages, 1 for buffer B's; kStride 1: 0

  __device__ __forceinline__ void start(const DecodeParams& p, const PartPlan& part, int buffer) {
    parity = buffer;
    request = part.begin_request;
    int begin;
    page_range(p, part, request, p.seqlens[request], begin, page_end);
    page = begin + parity;
    settle(p, part);
    fetch_block(p);
  }
  __device__ __forceinline__ bool valid() const { return page < page_end; }

  // The whole state, for registers, the block entry's copy waited for first (the calling thread issued it).
  __device__ __forceinline__ PageStreamOf snapshot() const {
    async_copy_wait_all();
    const int4 first = *reinterpret_cast<const int4*>(this);  // one 16-byte read: the fields above
    PageStreamOf s;
    s.request = first.x;
    s.page = first.y;
    s.page_end = first.z;
    s.block = first.w;
    s.parity = parity;
    return s;
  }

  // The cache block of the page, once its copy has been waited for (block_index, snapshot). With
  // kFlagBadPages, also whether the page is bad (past the table, or an index outside [0, num_blocks));
  // a flagged page loads block 0, which exists, and is never used. Otherwise the index goes to TMA as
  // it is (kBlockOutsideCache past the table).
  __device__ __forceinline__ int checked_block(const DecodeParams& p, bool& flagged) const {
    flagged = kFlagBadPages && bad_block(p, page, block);
    return flagged ? 0 : block;
  }
  __device__ __forceinline__ int block_index(const DecodeParams& p, bool& flagged) const {
    async_copy_wait_all();
    return checked_block(p, flagged);
  }

  // On to the stream's next page, its block entry copied in.
  __device__ __forceinline__ void advance(const DecodeParams& p, const PartPlan& part) {
    step(p, part);
    fetch_block(p);
  }
  // The cursor only (on a snapshot): `follow` then makes it this stream's.
  __device__ __forceinline__ void step(const DecodeParams& p, const PartPlan& part) {
    page += kStride;
    settle(p, part);
  }
  // The cursor of a snapshot moved on with `step`, then its block entry's copy issued.
  __device__ __forceinline__ void follow(const PageStreamOf& moved, const DecodeParams& p) {
    request = moved.request;
    page = moved.page;
    page_end = moved.page_end;
    fetch_block(p);
  }

 private:
  // Move past finished pieces.
  __device__ __forceinline__ void settle(const DecodeParams& p, const PartPlan& part) {
    while (page >= page_end && request < part.end_request) {
      ++request;
      int begin;
      page_range(p, part, request, p.seqlens[request], begin, page_end);
      page = begin + parity;
    }
  }

  // Read the block-table entry of the page it is on, asynchronously.
  __device__ __forceinline__ void fetch_block(const DecodeParams& p) {
    if (valid() && !(kGuards && past_table(p, page))) {
      async_copy_u32(&block, table_entry(p, request, page));
    } else {
      block = kBlockOutsideCache;  // past the table (or past the part: never loaded)
    }
  }
};

using PageStream = PageStreamOf<kPageBuffers>;
// snapshot's one 16-byte read takes the first four fields in this order (checked where NVRTC takes
// __builtin_offsetof in a constant expression: 13.5, which CI installs; params.py's layout_asserts alike).
#if __CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1305
static_assert(__builtin_offsetof(PageStream, request) == 0 && __builtin_offsetof(PageStream, page) == 4 &&
                  __builtin_offsetof(PageStream, page_end) == 8 && __builtin_offsetof(PageStream, block) == 12,
              "PageStreamOf starts with request, page, page_end, block");
#endif

// Where element `element` of packed row `row` of a request's query lies in q (strides in elements of
// q). Rows past p.rows get q itself: the tile loaders copy zeros for them and read nothing there.
template <class T>
__device__ __forceinline__ const T* query_row_at(const DecodeParams& p, const T* q, int request, int kv_head,
                                                 int row, int element) {
  if (row >= p.rows) return q;
  const PackedQuery at = packed_query(p, kv_head, row);
  return q + request * p.q_batch_stride + at.s * p.q_seq_stride + at.head * p.q_head_stride + element;
}

// The first token that not every row of a request sees (past its length, or, causal, past the first
// query position's limit): only pages reaching past it need the masked softmax.
__device__ __forceinline__ int mask_from_token(const DecodeParams& p, int seqlen) {
  return seqlen - (p.causal ? p.seqlen_q - 1 : 0);
}

// Per-row visibility limits of the rows a thread owns (causal: bottom-right aligned).
template <int N>
__device__ __forceinline__ void row_limits(const DecodeParams& p, int seqlen, int rows_base, const int (&rows)[N],
                                           int (&limit)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int row = rows_base + rows[i];
    const int s = row < p.rows ? p.per_group.divide(row) : p.seqlen_q - 1;
    limit[i] = seqlen - (p.causal ? p.seqlen_q - 1 - s : 0);
  }
}

}  // namespace flashmla
