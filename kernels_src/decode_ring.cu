// Split-KV MLA decode for an FP8 (e4m3) cache with an e4m3 q and more than 32 query rows per KV head (the
// compute-bound FP8 cells), sm_90a. One CTA = 64 packed query rows x one KV head x one part of the plan, as
// decode.cu; grid (ceil(rows / 64), heads_kv, num_parts), kRingThreads threads, kRingSharedBytes of
// dynamic shared memory.
//
// Why a third kernel: decode.cu converts each FP8 page in place into a 72 KB 16-bit page buffer, so only
// two pages fit, and the refill of the second buffer sits on the critical path of every pair of pages
// (docs/PERF_NOTES.md, nineteenth session). Here pages stay FP8 in shared memory, in a ring of four
// 36 KB slots that a loader lane keeps up to three pages ahead, and nothing is converted in shared
// memory:
//
//   S = Q K^T           (64 rows x 64 tokens, k = 576)   FP8 wgmmas, Q and K e4m3 from shared memory
//   O^T += V^T P^T      (256 columns x 64 rows, k = 64)  fp16 wgmmas, V^T from registers, P from smem
//
// The scores are row-major as in decode.cu, so the softmax is decode.cu's (softmax.cuh: a row's values
// within a quad). The output is transposed as in decode_narrow.cu, value columns on wgmma's M: V^T's
// fragments are built by each thread from the page's FP8 bytes, loaded by transposed ldmatrix, with exact
// e4m3 -> fp16 conversions (O^T's rows are taken in the order ldmatrix hands them out: OutputSteps), so P V keeps
// fp16 operands and fp32 accumulators and SPEC's output bar holds as in the 16-bit kernels; P, stored in
// decode.cu's [row][token] layout, is O^T's K-major B operand as it lies.
//
// Schedule: decode.cu's seesaw. The pages of a piece go in pairs (a, b): warpgroup 0 scores page a,
// warpgroup 1 page b; warpgroup w keeps value columns [256 w, 256 w + 256) of O^T (128 fp32 registers a
// thread) and multiplies both pages' P into them. Per pair:
//
//   warpgroup 0:  softmax(a) -> P_a, max_a | rescale, O_L += V_a^T P_a^T | rescale, S_a', O_L += V_b^T P_b^T
//   warpgroup 1:  S_b | rescale, O_R += V_a^T P_a^T; softmax(b) from max_a -> P_b, max_b | rescale, O_R += ...
//
// (S_a' is the next pair's S_a, issued ahead so that it runs on the tensor cores beside P V's fragment
// build; a piece's first S_a is issued before its first pair.)
//
// A page's P goes to both warpgroups through the P box of its ring slot, its running max through
// `max_after`; each warpgroup rescales its own O^T columns (query rows) from the max it holds to the new
// one, reading both from shared memory, so no factor is held in registers across the wgmmas.
//
// Handshakes: per ring slot a TMA barrier ("full") and an "empty" barrier with one arrival per computing
// warpgroup (its last wgmma reading the slot, K, V or P, has completed); page A ready (warpgroup 0 -> 1:
// P_a and max_a written) and page B ready (1 -> 0), both synced by both warpgroups as in decode.cu;
// "q_full" for the Q tile, which one thread issues through TMA at the part's start and at the end of each
// piece for the next (as decode.cu; without a q map all consumer threads copy it between two consumers'
// barriers); the consumers' barrier at each piece's start and twice in the epilogue.
//
// CuTe supplies the wgmma atoms (mma.cuh). TMA, mbarriers, named barriers and the descriptors are
// hand-written PTX, as in decode.cu and decode_narrow.cu, and so is P V's ldmatrix (load_columns_t: the
// step's constant part of the address in the instruction's offset).
//
// Measured (H200, docs/PERF_NOTES.md, twenty-first session): exact, and 0.94-1.02 of decode.cu's FP8 path's
// time on the FP8 cells of 64 and 128 rows, then 1-5 % less with the Q tile through TMA, so
// kernels.RING_FP8 sends those calls here. V's fragments through transposed ldmatrix instead of 8-byte
// predicated loads: 1.3-3.6 % less time on its cells (fifty-fourth session); those loads issued before the
// wait for their fragment set, so that they run beside it: 0.4-3.2 % less (fifty-seventh session, ab255); and
// warpgroup 0 issuing the next pair's S_a before V_b^T P_b^T: 0.5-2.8 % less on nine of ten cells (ab256).
#include "decode_config.cuh"
#include "sync.cuh"
#include "mma.cuh"
#include "softmax.cuh"
#include "plan.cuh"
#include "load.cuh"
#include "epilogue.cuh"
#include "dequant.cuh"
#include "trace.cuh"

namespace flashmla {

#if !defined(FLASHMLA_KV_E4M3) || !defined(FLASHMLA_Q_E4M3) || defined(FLASHMLA_BF16)
#error "the ring kernel takes an e4m3 q and cache (and computes P V in fp16)"
#endif

constexpr int kRingPages = 4;                           // ring slots, one FP8 page each
constexpr int kFp8PageBytes = kBoxes * kFp8BoxBytes;    // 36 KB: nine 64 x 64-byte boxes
constexpr int kProbBoxBytes = kTileRows * kRowBytes;    // P: 64 query rows x 64 tokens, fp16, 8 KB
constexpr int kRowSlots = kTileRows / 4;                // query rows a thread holds in an m64n64 tile
constexpr int kHalfTiles = kHalfV / kBoxCols;           // O^T tiles (64 value columns) of a warpgroup: 4
constexpr float kFp8PartialBound = 448.f;               // the largest e4m3 magnitude (fp16 partial rows)
constexpr int kRingLoaderRegisters = 24;                // one lane issuing TMA loads
constexpr int kRingConsumerRegisters = 240;
static_assert(2 * kRingConsumerRegisters + kRingLoaderRegisters == 3 * 168, "the registers handed over add up");
constexpr int kRingThreads = kLaunchThreads;            // two computing warpgroups and the loader's

using MmaScoresRing = gmma::MMA_64x64x32_F32E4M3E4M3_SS_TN<>;
using MmaOutputRing = gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::K>;
constexpr int kFp8StepBytes = 32;                       // one FP8 k-step: 32 e4m3 values of a row

struct RingStorage {
  alignas(1024) uint8_t q[kBoxes * kFp8BoxBytes];            // e4m3 Q: nine boxes of 64 rows x 64 bytes
  alignas(1024) uint8_t page[kRingPages][kFp8PageBytes];     // FP8 pages as landed
  alignas(1024) uint8_t prob[kRingPages][kProbBoxBytes];     // P of the page in the same slot
  float max_after[2][2][kTileRows];          // [pair parity][page a, b][row]: running max after the page
  float row_sum[2][kTileRows];               // epilogue: each warpgroup's row sums
  float row_scale[kTileRows];                // epilogue: each row's normaliser
  int64_t row_at[kTileRows];                 // epilogue: where each row of an unsplit piece goes in out (-1: nowhere)
  PageStreamOf<1> stream;                    // the loader lane's pages of the part
  int bad_page[kRingPages];                  // [slot]: the loader found the page's block index bad
  alignas(8) uint64_t full[kRingPages];
  uint64_t empty[kRingPages];
  uint64_t q_full;                           // the Q tile has landed (through TMA: DecodeParams::q_tma)
};
constexpr int kRingSharedBytes = int(sizeof(RingStorage)) + 1024;
static_assert(kRingSharedBytes <= 227 * 1024, "fits the SM's shared memory");

// Where the n-th page this CTA reads lies in the ring, and the parity of that slot's use.
struct RingPage {
  int slot, phase;
  __device__ __forceinline__ explicit RingPage(uint32_t seq)
      : slot(int(seq % kRingPages)), phase(int((seq / kRingPages) & 1)) {}
};

// Accumulator coordinates of an m64n64 tile of O^T (M = value columns, N = query rows): register
// 4 j + 2 i + c holds M index 16 warp + lane / 4 + 8 i and query row 8 j + 2 (lane % 4) + c. Slot
// k = 2 j + c names the query row; i picks one of the thread's two M indices (softmax.cuh, reg_of). A
// slot's query row is 2 (lane % 4) + slot_row(slot): per-row fields are addressed from one pointer per
// thread at row 2 (lane % 4) plus these constants. (Sixteen row indices or addresses held through the
// page loop spill: ptxas hoists them out of it. So does the lane's quad unless it is read where it is
// used: lane_quad.)
__device__ __forceinline__ constexpr int slot_row(int slot) { return 8 * (slot / 2) + slot % 2; }
__device__ __forceinline__ int lane_id() {
  int lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}
__device__ __forceinline__ int lane_quad() { return lane_id() % 4; }
__device__ __forceinline__ int thread_index() {
  int thread;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(thread));
  return thread;
}

struct RingOutput {
  float v[kHalfTiles][32];
};
// A thread's value columns: two neighbours in each O^T tile, tile t's kTileColumnStride t further than
// tile 0's (OutputSteps).
constexpr int kTileColumnStride = 16;
// Slot k's query row of the thread's two value columns of each O^T tile, times `scale`, stored from
// `at` (tile 0's pair) one word a tile; `word` makes two floats one word (out_word: the output dtype;
// half_word: fp16 partial rows; float_pair: fp32 ones, 8 bytes).
__device__ __forceinline__ float2 float_pair(float a, float b) { return make_float2(a, b); }
template <auto word, class Element>
__device__ __forceinline__ void store_row_words(Element* at, const RingOutput& o, int k, float scale) {
  using Word = decltype(word(0.f, 0.f));
  static_assert(sizeof(Word) == 2 * sizeof(Element), "two values a word");
#pragma unroll
  for (int t = 0; t < kHalfTiles; ++t) {
    *reinterpret_cast<Word*>(at + kTileColumnStride * t) =
        word(o.v[t][reg_of(k, 0)] * scale, o.v[t][reg_of(k, 1)] * scale);
  }
}
// V^T's A fragments of one P V k-step, for the warpgroup's four tiles; two sets take turns.
using RingFragments = uint32_t[2][kHalfTiles][4];

// S = Q K^T over the 576 columns of the page in `at` (query rows on M, as in decode.cu, so that the
// softmax is row-wise within a quad), once it has landed. Committed, not awaited.
__device__ __forceinline__ void issue_scores(RingStorage& smem, const RingPage& at, ScoreTile& s) {
  const SmemDesc q = fp8_k_major_desc(smem.q);
  const SmemDesc k = fp8_k_major_desc(smem.page[at.slot]);
  mbarrier_wait_uniform(&smem.full[at.slot], at.phase);
  fence_fragment(s.v);
  cute::warpgroup_arrive();
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
#pragma unroll
    for (int i = 0; i < kBoxCols / kFp8StepBytes; ++i) {
      const uint32_t offset = box * kFp8BoxBytes + i * kFp8StepBytes;
      mma_ss<MmaScoresRing>(q.at(offset), k.at(offset), s.v, box > 0 || i > 0, cuda::std::make_index_sequence<32>{});
    }
  }
  cute::warpgroup_commit_batch();
  fence_fragment(s.v);
}

// O^T[half] += V^T[half] P^T over the page in `at`, one k-step (16 tokens) at a time, so that a caller
// can run other work between the steps. Tile t's fragments come from the 16-byte chunk t of the warp's
// box (value columns 16 t .. 16 t + 15) through two transposed 8 x 8 loads a step (tokens 0-7 and 8-15 of
// it): a lane gets the bytes (column c, token k), (c + 1, k), (c, k + 1), (c + 1, k + 1) with c = 2 (lane / 4)
// and k = 2 (lane % 4) (+ 8), and one byte permute makes each column's token pair a 16-bit half for the
// e4m3x2 conversion. So row 16 warp + lane / 4 + 8 i of tile t is value column
//   256 half + 64 warp + kTileColumnStride t + 2 (lane / 4) + i.
// Each row of 8 lanes' addresses covers the 8 bank quads (the swizzle moves a token pair's chunk), so a
// load takes its four wavefronts. Stale tokens (>= valid, on a request's last page; FP8 NaN may lie there)
// become zeros in the byte permute (column_pairs). Two fragment sets take turns: step s's is built once step
// s - 2's wgmmas are done, so that at most two steps are in flight when `step` returns (the caller waits
// for them before `frags` go out of scope).
struct OutputSteps {
  const uint8_t* boxes;  // the page's first value box of this half (the warp's is `warp` boxes further)
  const uint8_t* prob;   // its P
  int valid;             // tokens of the page that exist
  int warp;

  // The per-lane addresses are worked out again in each step from the lane index read there: held
  // between the steps (across the other warpgroup's softmax in warpgroup1_pair) they spill.
  __device__ __forceinline__ OutputSteps(RingStorage& smem, const RingPage& at, int half, int valid_tokens,
                                         int thread)
      : boxes(smem.page[at.slot] + kBoxesPerHalf * half * kFp8BoxBytes), prob(smem.prob[at.slot]),
        valid(valid_tokens), warp(thread / 32) {
    mbarrier_wait_uniform(&smem.full[at.slot], at.phase);  // the bytes are seen here
  }

  template <int kStep>
  __device__ __forceinline__ void step(RingOutput& o, RingFragments& frags) const {
    const int lane = lane_id();
    // Lane l: row r = l % 8 (token 8 (m % 2) + r of the step) of matrix m = l / 8, chunk 2 j + m / 2 in the
    // j-th load (tiles 2 j, 2 j + 1). The token's swizzle phase is r / 2 (fp8_offset), and chunk 2 + x lies
    // where chunk x does with the address's bit 5 flipped.
    const int m = lane / 8, r = lane % 8;
    const uint32_t first =
        smem_addr(boxes + warp * kFp8BoxBytes + (8 * (m % 2) + r) * kFp8RowBytes) + (((m / 2) ^ (r / 2)) << 4);
    constexpr int kOffset = kStep * kMmaK * kFp8RowBytes;
    uint32_t d[2][4];  // [j][matrix]: tile 2 j + matrix / 2, tokens 8 (matrix % 2) ..
    load_columns_t<kOffset>(d[0], first);
    load_columns_t<kOffset>(d[1], first ^ 32);
    // The loads above run while the wait does: they write d, not the fragments.
    if constexpr (kStep >= 2) cute::warpgroup_wait<1>();  // step kStep - 2's fragments are free
    uint32_t (&a)[kHalfTiles][4] = frags[kStep % 2];
    fragments_from_columns(a, d, valid, kStep * kMmaK, lane);
#pragma unroll
    for (int t = 0; t < kHalfTiles; ++t) fence_fragment(o.v[t]);
    cute::warpgroup_arrive();
#pragma unroll
    for (int t = 0; t < kHalfTiles; ++t) {
      mma_rs<MmaOutputRing>(a[t], k_major_desc(prob).at(kStep * kMmaK * 2), o.v[t], cuda::std::make_index_sequence<32>{});
    }
    cute::warpgroup_commit_batch();
#pragma unroll
    for (int t = 0; t < kHalfTiles; ++t) fence_fragment(o.v[t]);
  }

  // All four steps.
  __device__ __forceinline__ void all(RingOutput& o, RingFragments& frags) const {
    step<0>(o, frags);
    step<1>(o, frags);
    step<2>(o, frags);
    step<3>(o, frags);
  }
};

// The fragments stay untouched until the wgmmas reading them have completed (the caller has waited).
__device__ __forceinline__ void retire_fragments(RingFragments& frags) {
#pragma unroll
  for (int b = 0; b < 2; ++b) {
#pragma unroll
    for (int t = 0; t < kHalfTiles; ++t) {
#pragma unroll
      for (int r = 0; r < 4; ++r) cute::warpgroup_fence_operand(frags[b][t][r]);
    }
  }
}

// The loader (one lane): every page of the part in order into the ring, each slot as soon as both
// computing warpgroups have released the page that held it. A bad page's flag is written before its TMA
// barrier is armed, so whoever waits on it sees it. (Two lanes splitting each page's boxes measured level
// on the H200: docs/PERF_NOTES.md, twenty-third session.)
__device__ __forceinline__ void ring_loader(const DecodeParams& p, const PartPlan& part, RingStorage& smem,
                                            const TensorMap* map, int kv_head) {
  Tracer trace(kHelperWarpgroup, 0);
  trace.mark(kMarkKernelStart);
  PageStreamOf<1>& stream = smem.stream;
  stream.start(p, part, 0);
  const uint64_t hint = cache_load_hint(part.payload, gridDim.x);
  for (uint32_t seq = 0; stream.valid(); ++seq) {
    bool flagged;
    const int block = stream.block_index(p, flagged);
    stream.advance(p, part);  // the next block entry comes in while this slot is awaited
    const RingPage at(seq);
    if (seq >= kRingPages) mbarrier_wait_single(&smem.empty[at.slot], at.phase ^ 1);
    trace.mark(kMarkBlockIndexed);  // the slot is free
    if (kFlagBadPages) smem.bad_page[at.slot] = flagged;
    mbarrier_arrive_expect_tx(&smem.full[at.slot], kFp8PageBytes);
#pragma unroll 1
    for (int box = 0; box < kBoxes; ++box) {
      tma_load_box(map, &smem.full[at.slot], smem.page[at.slot] + box * kFp8BoxBytes, box * kBoxCols, kv_head, 0,
                   block, hint);
    }
    trace.mark(kMarkBoxesIssued);
  }
}

// The Q tile of one request and KV head, e4m3 in FP8 boxes (the K boxes' layout), where no q tensor map
// is (p.q_tma 0; otherwise load.cuh's issue_q_tile_tma): tile row r is packed row rows_base + r; rows past
// p.rows are zeros. Both computing warpgroups copy it; the caller fences and synchronises.
__device__ __forceinline__ void load_ring_q(const DecodeParams& p, RingStorage& smem, int request, int kv_head,
                                            int rows_base) {
  constexpr int kChunksPerRow = kHeadDim / 16;
  const uint8_t* q = static_cast<const uint8_t*>(p.q);
  // The thread index read here: its first copy's addresses, worked out before the piece loop, would
  // be held through it (spilled).
  for (int idx = thread_index(); idx < kTileRows * kChunksPerRow; idx += kThreads) {
    const int r = idx / kChunksPerRow;
    const int c = idx % kChunksPerRow;
    const int row = rows_base + r;
    const uint8_t* src = query_row_at(p, q, request, kv_head, row, c * 16);
    async_copy_16(smem.q + (c / 4) * kFp8BoxBytes + fp8_offset(r, c % 4), src, row < p.rows ? 16 : 0);
  }
  async_copy_commit();
  async_copy_wait_all();
}

// One piece, as one computing warpgroup sees it.
struct RingPiece {
  const DecodeParams& p;
  RingStorage& smem;
  Piece piece;
  int thread, wg, kv_head, rows_base;  // thread: within the warpgroup; wg: 0 or 1, the half of O^T it keeps
  int mask_from;                       // pages reaching past this token need the masked softmax
  float scale_log2;
  // The running max and this thread's share of the row sums of its two rows in the scores' layout
  // (softmax.cuh's FragmentCoords): both warpgroups follow the same max; each sums the pages it scored.
  float max[2];
  float sum[2];

  __device__ __forceinline__ RingPiece(const DecodeParams& params, RingStorage& s, const Piece& pc, int t, int group,
                                       int head, int base, float scale)
      : p(params), smem(s), piece(pc), thread(t), wg(group), kv_head(head), rows_base(base), scale_log2(scale) {
    mask_from = mask_from_token(p, piece.seqlen);
    max[0] = max[1] = kInitialMax;
    sum[0] = sum[1] = 0.f;
  }

  __device__ __forceinline__ int valid_tokens(int page) const { return piece.seqlen - page * kPageSize; }

  // Scores of `page` (its S in s, completed) -> P into the slot's P box, rows of 64 tokens (the B operand
  // of O^T's wgmmas, in the layout decode.cu hands P over in), and the new running max into
  // max_after[pair][which], both for the other warpgroup; this warpgroup's row sums follow the move. The
  // caller fences and passes the ready barrier. O^T is rescaled later (rescale), when no wgmma writes it.
  // (Scores transposed, S^T = K Q^T, put a query row across the warpgroup's four warps: its max took 24
  // shuffles and an exchange through shared memory, and the kernel 1.4 times as long: PERF_NOTES.)
  template <bool kMasked>
  __device__ __forceinline__ void score_page(ScoreTile& s, int page, const RingPage& at, int pair, int which) {
    const FragmentCoords fc(thread);
    PageMask mask;
    mask.token0 = page * kPageSize;
    if constexpr (kMasked) {
      row_limits(p, piece.seqlen, rows_base, fc.row, mask.limit);  // worked out here: held, they spill
    } else {
      mask.limit[0] = mask.limit[1] = 0;
    }
    mask.bad = kMasked && kFlagBadPages && smem.bad_page[at.slot];
    float to[2], page_sum[2];
    page_max<kMasked>(s, fc, mask, scale_log2, max, to);
    exponentiate(s, fc, scale_log2, to, page_sum);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      sum[i] = sum[i] * fast_exp2(max[i] - to[i]) + page_sum[i];
      max[i] = to[i];
      if (fc.publishes()) smem.max_after[pair & 1][which][fc.row[i]] = to[i];
    }
    ProbFragment prob;
    pack_probabilities(s, prob);
    store_probabilities(prob, smem.prob[at.slot], fc);
  }

  // The scores of `page`, masked where the page needs it.
  __device__ __forceinline__ void softmax(ScoreTile& s, int page, const RingPage& at, int pair, int which) {
    const bool bad = kFlagBadPages && smem.bad_page[at.slot];
    if (bad || page * kPageSize + kPageSize > mask_from) {
      score_page<true>(s, page, at, pair, which);
    } else {
      score_page<false>(s, page, at, pair, which);
    }
    fence_generic_to_async_smem();  // P (generic stores) before the wgmmas that read it
  }

  // O^T's columns (query rows) from the running max `from` to `to`, and with `follow` this warpgroup's
  // row sums and max too (the other warpgroup scored the page). Nothing moves in most pages
  // (softmax.cuh's slack): O^T's multiplies are skipped where no row of the warp moved.
  __device__ __forceinline__ void rescale(RingOutput& o, int pair, int to_page, bool follow) {
    const int q4 = lane_quad();
    const float* const from_max = to_page == 1 ? &smem.max_after[pair & 1][0][2 * q4]
                                  : pair == 0  ? nullptr
                                               : &smem.max_after[(pair - 1) & 1][1][2 * q4];
    const float* const to_max = &smem.max_after[pair & 1][to_page][2 * q4];
    float factor[kRowSlots];
    bool moved = false;
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      const float from = from_max == nullptr ? kInitialMax : from_max[slot_row(k)];
      const float to = to_max[slot_row(k)];
      factor[k] = fast_exp2(from - to);
      moved |= from != to;
    }
    if (__any_sync(0xffffffffu, moved)) {
#pragma unroll
      for (int t = 0; t < kHalfTiles; ++t) {
#pragma unroll
        for (int k = 0; k < kRowSlots; ++k) {
          o.v[t][reg_of(k, 0)] *= factor[k];
          o.v[t][reg_of(k, 1)] *= factor[k];
        }
      }
    }
    if (follow) {
      const FragmentCoords fc(thread);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float to = smem.max_after[pair & 1][to_page][fc.row[i]];
        sum[i] *= fast_exp2(max[i] - to);
        max[i] = to;
      }
    }
  }

  // The page's slot back to the loader from this warpgroup (its last wgmma on it has completed).
  __device__ __forceinline__ void release(const RingPage& at) const {
    __syncwarp();
    if (thread == 0) mbarrier_arrive(&smem.empty[at.slot]);
  }

  // O^T[half] += V^T P^T over the whole page in `at`, waited for; then the slot goes back to the loader
  // as far as this warpgroup is concerned. `frags` are the caller's, so that they outlive the wgmmas.
  __device__ __forceinline__ void multiply_page(RingOutput& o, const RingPage& at, int half, int page,
                                                RingFragments& frags) const {
    OutputSteps(smem, at, half, valid_tokens(page), thread).all(o, frags);
    cute::warpgroup_wait<0>();
    retire_fragments(frags);
    release(at);
  }

  // Warpgroup 0, one pair: page a (seq), whose S the caller or the pair before has issued into `s` and
  // waited for, scored here and, with kHasB, page b (seq + 1) scored by warpgroup 1. With kHasB the next
  // pair's S_a (page seq + 2) is issued before V_b^T P_b^T, so that it runs on the tensor cores while this
  // warpgroup builds P V's fragments; multiply_page's last wait completes it. The piece's last pair issues
  // S of page b again instead (dropped): one copy of the pair's code, whatever follows it.
  template <bool kHasB>
  __device__ __forceinline__ void warpgroup0_pair(int page, uint32_t seq, int pair, RingOutput& o, ScoreTile& s,
                                                  Tracer& trace) {
    const RingPage a(seq);
    trace.mark(kMarkPairStart);
    softmax(s, page, a, pair, 0);
    named_barrier_sync(kBarrierPageAReady, kThreads);
    trace.mark(kMarkProbsPublished);
    rescale(o, pair, 0, false);
    RingFragments frags;
    multiply_page(o, a, 0, page, frags);
    trace.mark(kMarkOwnPvDone);
    if constexpr (kHasB) {
      const RingPage b(seq + 1);
      named_barrier_sync(kBarrierPageBReady, kThreads);
      trace.mark(kMarkHandoffIn);
      rescale(o, pair, 1, true);
      // b's slot stays held until multiply_page releases it.
      issue_scores(smem, page + 2 < piece.page_end ? RingPage(seq + 2) : b, s);
      multiply_page(o, b, 0, page + 1, frags);
      trace.mark(kMarkRemotePvDone);
    }
  }

  // Warpgroup 0's pages of the piece from `page`, in pairs.
  __device__ __forceinline__ void warpgroup0_pages(int page, uint32_t seq, RingOutput& o, Tracer& trace) {
    if (page >= piece.page_end) return;
    ScoreTile s;
    issue_scores(smem, RingPage(seq), s);
    trace.mark(kMarkScoresIssued);
    cute::warpgroup_wait<0>();  // nothing in flight where the pair loop begins (C7514 otherwise)
    trace.mark(kMarkScoresIn);
    int pair = 0;
    for (; page + 1 < piece.page_end; page += 2, seq += 2, ++pair) warpgroup0_pair<true>(page, seq, pair, o, s, trace);
    if (page < piece.page_end) warpgroup0_pair<false>(page, seq, pair, o, s, trace);
  }

  // Warpgroup 1, one pair: page a scored by warpgroup 0 and, with kHasB, page b scored here.
  template <bool kHasB>
  __device__ __forceinline__ void warpgroup1_pair(int page, uint32_t seq, int pair, RingOutput& o, Tracer& trace) {
    const RingPage a(seq), b(seq + 1);
    ScoreTile s;
    trace.mark(kMarkPairStart);
    if constexpr (kHasB) issue_scores(smem, b, s);
    trace.mark(kMarkScoresIssued);
    // A no-op at run time (S_b is the only batch in flight), but it tells ptxas that O^T is no longer a
    // wgmma accumulator, so that rescaling it does not wait for S_b (C7517).
    cute::warpgroup_wait<1>();
    named_barrier_sync(kBarrierPageAReady, kThreads);
    trace.mark(kMarkHandoffIn);
    rescale(o, pair, 0, true);
    RingFragments frags;
    {
      // V_a^T P_a^T's first two steps, then the softmax of page b beside them (and beside warpgroup 0's
      // V_a^T P_a^T), then its last two: its steps wait for each other (two fragment sets), so issuing all
      // four first would hold the softmax back until most of them had run.
      const OutputSteps pv(smem, a, 1, valid_tokens(page), thread);
      pv.step<0>(o, frags);
      pv.step<1>(o, frags);
      if constexpr (kHasB) {
        cute::warpgroup_wait<2>();  // S_b (the two steps may still run)
        trace.mark(kMarkScoresIn);
        softmax(s, page + 1, b, pair, 1);
        named_barrier_sync(kBarrierPageBReady, kThreads);
        trace.mark(kMarkProbsPublished);
      }
      pv.step<2>(o, frags);
      pv.step<3>(o, frags);
    }
    cute::warpgroup_wait<0>();
    retire_fragments(frags);
    release(a);
    trace.mark(kMarkRemotePvDone);
    if constexpr (kHasB) {
      rescale(o, pair, 1, false);
      multiply_page(o, b, 1, page + 1, frags);
      trace.mark(kMarkOwnPvDone);
    }
  }

  // Warpgroup 1's pages of the piece from `page`, in pairs (warpgroup 0's: warpgroup0_pages).
  __device__ __forceinline__ void warpgroup1_pages(int page, uint32_t seq, RingOutput& o, Tracer& trace) {
    int pair = 0;
    for (; page + 1 < piece.page_end; page += 2, seq += 2, ++pair) warpgroup1_pair<true>(page, seq, pair, o, trace);
    if (page < piece.page_end) warpgroup1_pair<false>(page, seq, pair, o, trace);
  }

  // A split piece's rows from the thread's `first` value column, each row's scale times `factor`. They lie
  // one after another in the piece's partial slot, so a row's address is the thread's base plus a constant:
  // no per-row address arithmetic in the unrolled, run-once code. fp32 rows: a tile's pair of columns is
  // one 8-byte store, the 8 lanes of a quad row's together two whole sectors; fp16 rows a 4-byte word.
  template <auto word, class Element>
  __device__ __forceinline__ void store_split_rows(Element* partial, const RingOutput& o, int first, int q4,
                                                   const float* scales, float factor) const {
    const int64_t slot_row0 = (int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + rows_base + 2 * q4;
    Element* const base = partial + slot_row0 * kHeadDimV + first;
    const int rows_left = p.rows - rows_base - 2 * q4;
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      if (slot_row(k) >= rows_left) continue;
      store_row_words<word>(base + slot_row(k) * kHeadDimV, o, k, scales[slot_row(k)] * factor);
    }
  }

  // Normalise and write this warpgroup's 256 value columns of the piece's rows: out / lse, or the partial
  // buffers of a split request. `last_page` (0: a, 1: b) says where the piece's final max lies. One thread
  // a row first works out the row's normaliser, its lse and where it goes; the unrolled row loop that
  // reads O^T's registers then only scales and stores. This code runs once a piece, so its instructions
  // come from L2: with the divisions, the lse and the address arithmetic unrolled sixteen times it took
  // ~35000 cycles on the H200 (b1/h128/32k), with no store at all still 34500.
  // With `next_q` the next piece's Q tile is issued here through `q_map`, as soon as nobody reads this one.
  __device__ __forceinline__ void finish(const RingOutput& o, int last_pair, int last_page, float out_scale,
                                         const TensorMap* q_map, bool next_q, Tracer& trace) {
    {
      const FragmentCoords fc(thread);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        // A bad page makes O NaN (its P is NaN): carry it into the sums, as decode.cu does.
        const float share = quad_sum(sum[i] + 0.f * o.v[0][0]);
        if (fc.publishes()) smem.row_sum[wg][fc.row[i]] = share;
      }
    }
    named_barrier_sync(kBarrierCta, kThreads);  // also: every S wgmma of the piece has completed
    trace.mark(kMarkSumsExchanged);
    if (next_q && wg == 0 && thread == 0) issue_q_tile_tma(p, q_map, smem, piece.request + 1, kv_head, rows_base);
    // Whether the piece is split, and its slot inside the workspace, read again here (Piece::of's): held
    // through the page loop they spill.
    const int first_slot = p.num_splits[piece.request];
    const bool split = p.num_splits[piece.request + 1] - first_slot > 1;
    if (kGuards && split && !(piece.slot >= 0 && piece.slot < p.partial_slots)) return;
#if defined(FLASHMLA_PARTIAL_F16)
    // fp16 partial rows (the combine's _p16 build reads them) with one power of two 2^k for every row of the
    // launch instead of epilogue.cuh's per row and half: a normalised row is a convex mix of the pages' e4m3
    // values (|v| <= 448) times out_scale, so kFp8PartialBound |out_scale| 2^k in [2^14, 2^15) keeps every
    // value inside fp16 with no reduction over the row's columns (spread over the warpgroup here).
    const int fp16_k = partial_f16_exponent(kFp8PartialBound * fabsf(out_scale));
#endif
    if (wg == 0 && thread < kTileRows) {
      const int r = thread;
      const int row = rows_base + r;
      const float total = smem.row_sum[0][r] + smem.row_sum[1][r];
      smem.row_scale[r] = total == 0.f ? 0.f : out_scale / total;  // NaN (a bad page) stays NaN
      int64_t at = -1;  // a split piece's rows: the split path below addresses them from the slot itself
      if (row < p.rows) {
        const PackedQuery query = split ? PackedQuery{} : packed_query(p, kv_head, row);
        store_row_lse(p, piece, kv_head, row, last_pair < 0 ? kInitialMax : smem.max_after[last_pair & 1][last_page][r],
                      total, &query);
#if defined(FLASHMLA_PARTIAL_F16)
        if (split) {  // both halves' 2^-k
          const int64_t row_index = (int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row;
          float* const inv_scales = partial_inv_scales(p.out_partial, p.partial_slots, p.heads_kv, p.rows);
          const float inv = power_of_two(-fp16_k);
          inv_scales[2 * row_index] = inv;
          inv_scales[2 * row_index + 1] = inv;
        }
#endif
        if (!split) at = ((int64_t(piece.request) * p.seqlen_q + query.s) * p.heads_q + query.head) * kHeadDimV;
      }
      smem.row_at[r] = at;
    }
    named_barrier_sync(kBarrierCta, kThreads);
    trace.mark(kMarkLseStored);
    const int q4 = lane_quad();
    // The thread's value columns: first and first + 1 of tile 0, kTileColumnStride further each tile.
    const int first = kHalfV * wg + 64 * (thread / 32) + 2 * (lane_id() / 4);
    const float* const scales = &smem.row_scale[2 * q4];
    const int64_t* const at = &smem.row_at[2 * q4];
#if defined(FLASHMLA_PARTIAL_F16)
    if (split) {  // the fp16 rows, scaled by 2^fp16_k
      store_split_rows<half_word>(reinterpret_cast<__half*>(p.out_partial), o, first, q4, scales, power_of_two(fp16_k));
    } else
#endif
    if (split) {
      store_split_rows<float_pair>(p.out_partial, o, first, q4, scales, 1.f);
    } else {
#pragma unroll
      for (int k = 0; k < kRowSlots; ++k) {
        const int64_t row_at = at[slot_row(k)];
        if (row_at < 0) continue;
        store_row_words<out_word>(static_cast<OutElement*>(p.out) + row_at + first, o, k, scales[slot_row(k)]);
      }
    }
    trace.mark(kMarkOutputStored);
  }
};

}  // namespace flashmla

using namespace flashmla;

extern "C" __global__ void __launch_bounds__(kRingThreads, 1)
    flashmla_decode_ring(const __grid_constant__ DecodeParams p, const __grid_constant__ TensorMap kv_map,
                         const __grid_constant__ TensorMap q_map) {
  extern __shared__ uint8_t smem_raw[];
  RingStorage& smem = *reinterpret_cast<RingStorage*>(smem_raw + storage_offset(smem_raw));

  prefetch_maps(p, &kv_map, &q_map);
  const PartPlan part = PartPlan::load(p, blockIdx.z);
  if (part.empty(p)) return;
  const int kv_head = blockIdx.y;
  const int rows_base = blockIdx.x * kTileRows;

  allow_dependent_launch();

  if (threadIdx.x == 0) {
    for (int slot = 0; slot < kRingPages; ++slot) {
      mbarrier_init(&smem.full[slot], 1);
      mbarrier_init(&smem.empty[slot], 2);  // one arrival per computing warpgroup
    }
    mbarrier_init(&smem.q_full, 1);
    fence_barrier_init();
  }
  __syncthreads();

  // Broadcast from lane 0 so that the compiler sees the role as warp-uniform (decode.cu).
  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / kWarpgroupThreads, 0);
  if (warpgroup == kHelperWarpgroup) {
    release_registers<kRingLoaderRegisters>();
    if (threadIdx.x % kWarpgroupThreads == 0) ring_loader(p, part, smem, &kv_map, kv_head);
    return;
  }
  claim_registers<kRingConsumerRegisters>();
  const int thread = threadIdx.x % kWarpgroupThreads;
  // With p.q_tma one thread issues each Q tile through TMA: the part's first one at once, the next ones
  // at the end of the piece before (finish); otherwise all consumer threads copy it (load_ring_q).
  if (p.q_tma && warpgroup == 0 && thread == 0) issue_q_tile_tma(p, &q_map, smem, part.begin_request, kv_head, rows_base);
  const Descales scales = read_descales(p);  // the FP8 descales folded in (dequant.cuh)
  Tracer trace(warpgroup, thread);
  trace.mark(kMarkKernelStart);

  uint32_t seq = 0;     // pages this CTA has read: where the next one lies in the ring
  uint32_t q_tiles = 0;  // Q tiles landed through TMA: the parity of q_full
  for (int request = part.begin_request; request <= part.end_request; ++request) {
    const Piece piece = Piece::of(p, part, request);
    // Nobody still reads the previous row sums, nor (where q comes without TMA) the previous Q tile.
    named_barrier_sync(kBarrierCta, kThreads);
    trace.mark(kMarkQTileFree);
    if (p.q_tma) {
      mbarrier_wait_uniform(&smem.q_full, q_tiles & 1);
      ++q_tiles;
    } else {
      load_ring_q(p, smem, request, kv_head, rows_base);
      fence_generic_to_async_smem();
      named_barrier_sync(kBarrierCta, kThreads);
    }

    trace.mark(kMarkPieceStart);
    RingPiece c(p, smem, piece, thread, warpgroup, kv_head, rows_base, scales.scale_log2);
    RingOutput o;
#pragma unroll
    for (int t = 0; t < kHalfTiles; ++t) {
#pragma unroll
      for (int r = 0; r < 32; ++r) o.v[t][r] = 0.f;
      fence_fragment(o.v[t]);
    }
    const int pages = piece.page_end - piece.page_begin;
    if (warpgroup == 0) {
      c.warpgroup0_pages(piece.page_begin, seq, o, trace);
    } else {
      c.warpgroup1_pages(piece.page_begin, seq, o, trace);
    }
    if (pages > 0) seq += pages;
    // The final max: after the last pair's page b, or its page a when the piece has an odd page count.
    const int last_pair = pages > 0 ? (pages - 1) / 2 : -1;
    c.finish(o, last_pair, pages % 2 == 0 ? 1 : 0, scales.out_scale, &q_map, p.q_tma && request < part.end_request,
             trace);
    trace.mark(kMarkPieceEnd);
  }
}
