// Split-KV MLA decode for an FP8 (e4m3) cache with an e4m3 q and more than 32 query rows per KV head (the
// compute-bound FP8 cells), sm_90a. One CTA = 64 packed query rows x one KV head x one part of the plan, as
// decode.cu; grid (ceil(rows / 64), heads_kv, num_parts), kRingThreads threads, kRingSharedBytes of
// dynamic shared memory.
//
// Why a third kernel: decode.cu converts each FP8 page in place into a 72 KB 16-bit page buffer, so only
// two pages fit, and the refill of the second buffer sits on the critical path of every pair of pages
// (docs/PERF_NOTES.md, nineteenth session). Here pages stay FP8 in shared memory, in a ring of four
// 36 KB slots that a loader lane keeps up to three pages ahead, and nothing is converted in shared
// memory. Every product is transposed as in decode_narrow.cu, tokens and value columns on wgmma's M and
// the 64 query rows on N:
//
//   S^T = K Q^T         (64 tokens x 64 rows, k = 576)   FP8 wgmmas, K and Q e4m3 from shared memory
//   O^T += V^T P^T      (256 columns x 64 rows, k = 64)  fp16 wgmmas, V^T from registers, P^T from smem
//
// V^T's fragments are built by each thread from the page's FP8 bytes with exact e4m3 -> fp16 conversions
// (O^T's rows are taken in the order that makes a thread's bytes contiguous: issue_output), so P V keeps
// fp16 operands and fp32 accumulators: SPEC's output bar holds as in the 16-bit kernels.
//
// Schedule: decode.cu's seesaw. The pages of a piece go in pairs (a, b): warpgroup 0 scores page a,
// warpgroup 1 page b; warpgroup w keeps value columns [256 w, 256 w + 256) of O^T (128 fp32 registers a
// thread) and multiplies both pages' P^T into them. Per pair:
//
//   warpgroup 0:  S_a; softmax(a) -> P^T_a, max_a  | rescale, O_L += V_a^T P_a^T | rescale, O_L += V_b^T P_b^T
//   warpgroup 1:  S_b | rescale, O_R += V_a^T P_a^T; softmax(b) from max_a -> P^T_b, max_b | rescale, O_R += ...
//
// The softmax runs down the columns of S^T (a query row is spread over the warpgroup's four warps, so
// its page max goes through shared memory: one warpgroup barrier a page). A page's P^T goes to both
// warpgroups through the P box of its ring slot, its running max through `max_after`; each warpgroup
// rescales its own O^T columns (query rows) from the max it holds to the new one, reading both from
// shared memory, so no factor is held in registers across the wgmmas.
//
// Handshakes: per ring slot nine TMA barriers ("full", one per 64-column box, so S^T starts as the first
// box lands) and an "empty" barrier with one arrival per computing warpgroup (its last wgmma reading the
// slot, K, V or P^T, has completed); page A ready (warpgroup 0 -> 1: P^T_a and max_a written) and page B
// ready (1 -> 0), both synced by both warpgroups as in decode.cu; each warpgroup's own barrier for its
// column maxima; the consumers' barrier around each Q reload and in the epilogue.
//
// CuTe supplies the wgmma atoms (mma.cuh). TMA, mbarriers, named barriers, stmatrix and the descriptors
// are hand-written PTX, as in decode.cu and decode_narrow.cu.
//
// Status (H200, 2026-12-01, docs/PERF_NOTES.md twentieth session): exact (the FP8 GPU tests, memcheck and
// synccheck clean), but 0.69 of decode.cu's FP8 path at h_q = 128, 4096 (357 against 245 us), so
// kernels.RING_FP8 keeps calls on decode.cu. Its trace: ~8650 cycles a pair against ~3200 of tensor work,
// each warpgroup's chain latency-bound with two consumer warps a scheduler. Timed without its softmax it is
// level with decode.cu (240.6 against 245.4 us) and without the V conversion unchanged: the softmax down
// S^T's columns is the bound (devtools/candidates/ring-rowmajor-scores.patch scores row-major instead).
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
constexpr int kProbBoxBytes = kTileRows * kRowBytes;    // P^T: 64 query rows x 64 tokens, fp16, 8 KB
constexpr int kRingWarps = kWarpgroupThreads / 32;
constexpr int kRowSlots = kTileRows / 4;                // query rows a thread holds in an m64n64 tile
constexpr int kHalfTiles = kHalfV / kBoxCols;           // O^T tiles (64 value columns) of a warpgroup: 4
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
  alignas(1024) uint8_t prob[kRingPages][kProbBoxBytes];     // P^T of the page in the same slot
  float warp_max[2][kRingWarps][kTileRows];  // [warpgroup][warp][row]: a warp's page max per query row
  float max_after[2][2][kTileRows];          // [pair parity][page a, b][row]: running max after the page
  float warp_sum[2][kRingWarps][kTileRows];  // epilogue: each warp's share of the row sums
  int row_limit[kTileRows];                  // the piece's visible tokens per query row (causal: fewer)
  PageStreamOf<1> stream;
  int bad_page[kRingPages];                  // [slot]: the loader found the page's block index bad
  alignas(8) uint64_t full[kRingPages];
  uint64_t empty[kRingPages];
};
constexpr int kRingSharedBytes = int(sizeof(RingStorage)) + 1024;
static_assert(kRingSharedBytes <= 227 * 1024, "fits the SM's shared memory");

// Where the n-th page this CTA reads lies in the ring, and the parity of that slot's use.
struct RingPage {
  int slot, phase;
  __device__ __forceinline__ explicit RingPage(uint32_t seq)
      : slot(int(seq % kRingPages)), phase(int((seq / kRingPages) & 1)) {}
};

// Accumulator coordinates of an m64n64 tile with M = tokens (S^T) or value columns (O^T) and N = query
// rows: register 4 j + 2 i + c holds M index 16 warp + lane / 4 + 8 i and query row 8 j + 2 (lane % 4) + c.
// Slot k = 2 j + c names the query row; i picks one of the thread's two M indices (softmax.cuh, reg_of).
// A slot's query row is 2 (lane % 4) + slot_row(slot): per-row fields are addressed from one pointer per
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

struct RingScores {
  float v[32];
};
struct RingOutput {
  float v[kHalfTiles][32];
};
// V^T's A fragments of one P V k-step, for the warpgroup's four tiles; two sets take turns.
using RingFragments = uint32_t[2][kHalfTiles][4];

// Four 8 x 8 blocks of 16-bit values, each held in the mma fragment layout, stored transposed: lane L
// gives the address of the stored row L % 8 of block L / 8 (16 bytes).
__device__ __forceinline__ void stmatrix_trans_x4(uint32_t address, const uint32_t (&words)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(address),
               "r"(words[0]), "r"(words[1]), "r"(words[2]), "r"(words[3])
               : "memory");
}

// S^T = K Q^T over the 576 columns of the page in `at`, once it has landed. Committed, not awaited.
__device__ __forceinline__ void issue_scores(RingStorage& smem, const RingPage& at, RingScores& s) {
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
      mma_ss<MmaScoresRing>(k.at(offset), q.at(offset), s.v, box > 0 || i > 0, cuda::std::make_index_sequence<32>{});
    }
  }
  cute::warpgroup_commit_batch();
  fence_fragment(s.v);
}

// O^T[half] += V^T[half] P^T over the page in `at`, one k-step (16 tokens) at a time, so that a caller
// can run other work between the steps. The thread's rows of O^T are taken in the order that makes its
// bytes contiguous: row 16 warp + lane / 4 + 8 i of tile t is value column
//   256 half + 64 warp + 8 (lane / 4) + 2 t + i,
// so each token's 8 bytes for all four tiles come in one 8-byte load from box 4 half + warp, and byte
// permutes pair each column's two tokens. The odd lanes of a quad take a step's two neighbouring tokens
// in the other order (the load of token 2 q + 1 first), so that one load instruction reads rows from both
// halves of the banks (rows 0, 3, 4, 7 rather than 0, 2, 4, 6: two wavefronts instead of four); their
// byte permutes undo it. Stale tokens (>= valid; FP8 NaN may lie there) load as zeros. Two fragment sets
// take turns: step s's is built once step s - 2's wgmmas are done, so that at most two steps are in
// flight when `step` returns (the caller waits for them before `frags` go out of scope).
struct OutputSteps {
  const uint8_t* boxes;  // the page's first value box of this half (the warp's is `warp` boxes further)
  const uint8_t* prob;   // its P^T
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
    if constexpr (kStep >= 2) cute::warpgroup_wait<1>();  // step kStep - 2's fragments are free
    const int lane = lane_id();
    const int quad = lane % 4;
    const int group = lane / 4;  // the thread's 8 value columns: 8 group .. 8 group + 7 of the box
    const int swap = quad & 1;
    // Every token the thread reads has the swizzle phase `quad` (token / 2 % 4, tokens 16 s + 2 quad + ...).
    const uint8_t* const columns = boxes + warp * kFp8BoxBytes + (((group / 2) ^ quad) << 4) + 8 * (group % 2);
    const uint32_t select_even = swap ? 0x1504u : 0x5140u;  // bytes 0, 1 of both tokens, in pair order
    const uint32_t select_odd = swap ? 0x3726u : 0x7362u;   // bytes 2, 3
    uint2 v[4];  // tokens 16 step + 2 quad + {0, 1} + 8 {0, 1}, the first two swapped on odd quads
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // Token first + 16 step + 8 (k / 2), compared as first < room with a uniform room: a per-lane token
      // index held from step to step spills under NVRTC 12.9.
      const int first = 2 * quad + ((k % 2) ^ swap);
      const int room = valid - (kStep * kMmaK + 8 * (k / 2));
      v[k] = first < room ? *reinterpret_cast<const uint2*>(columns + (first + kStep * kMmaK + 8 * (k / 2)) * kFp8RowBytes)
                          : make_uint2(0, 0);
    }
    uint32_t (&a)[kHalfTiles][4] = frags[kStep % 2];
#pragma unroll
    for (int t = 0; t < kHalfTiles; ++t) {
      const uint32_t selector = t % 2 == 0 ? select_even : select_odd;
      const int w = t / 2;
      const uint32_t low = __byte_perm((&v[0].x)[w], (&v[1].x)[w], selector);   // tokens 2 quad, 2 quad + 1
      const uint32_t high = __byte_perm((&v[2].x)[w], (&v[3].x)[w], selector);  // and 8 further
      a[t][0] = e4m3x2_to_element2(low);
      a[t][1] = e4m3x2_high_to_element2(low);
      a[t][2] = e4m3x2_to_element2(high);
      a[t][3] = e4m3x2_high_to_element2(high);
#pragma unroll
      for (int r = 0; r < 4; ++r) cute::warpgroup_fence_operand(a[t][r]);
    }
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
// computing warpgroups have released the page that held it. A bad page's flag is written before its
// TMA barriers are armed, so whoever waits on them sees it.
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
    if constexpr (kFlagBadPages) smem.bad_page[at.slot] = flagged;
    mbarrier_arrive_expect_tx(&smem.full[at.slot], kFp8PageBytes);
#pragma unroll 1
    for (int box = 0; box < kBoxes; ++box) {
      tma_load_box(map, &smem.full[at.slot], smem.page[at.slot] + box * kFp8BoxBytes, box * kBoxCols, kv_head, 0,
                   block, hint);
    }
    trace.mark(kMarkBoxesIssued);
  }
}

// The Q tile of one request and KV head, e4m3 in FP8 boxes (the K boxes' layout): tile row r is packed
// row rows_base + r; rows past p.rows are zeros. Both computing warpgroups copy it; the caller fences and
// synchronises.
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
  float sum[kRowSlots];                // this thread's share of the row sums of the pages this warpgroup scored

  __device__ __forceinline__ RingPiece(const DecodeParams& params, RingStorage& s, const Piece& pc, int t, int group,
                                       int head, int base, float scale)
      : p(params), smem(s), piece(pc), thread(t), wg(group), kv_head(head), rows_base(base), scale_log2(scale) {
    mask_from = piece.seqlen - (p.causal ? p.seqlen_q - 1 : 0);
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) sum[k] = 0.f;
  }

  __device__ __forceinline__ int valid_tokens(int page) const { return piece.seqlen - page * kPageSize; }

  // Scores of `page` (its S^T in s, completed) -> P^T into the slot's P box and the new running max into
  // max_after[pair][which], both for the other warpgroup; this warpgroup's row sums follow the move. The
  // caller fences and passes the ready barrier. O^T is rescaled later (rescale), when no wgmma writes it.
  // A query row is spread over the warpgroup's four warps, so its page max takes 24 shuffles a thread and
  // an exchange through shared memory; but after a piece's first pages the running max rarely moves
  // (softmax.cuh's slack), so a vote in the warpgroup's barrier first finds whether any row's max moves
  // at all, and only then are the page maxima taken.
  template <bool kMasked>
  __device__ __forceinline__ void score_page(RingScores& s, int page, const RingPage& at, int pair, int which) {
    const int warp = thread / 32;
    const int lane = lane_id();
    const int q4 = lane % 4;
    const int token0 = page * kPageSize + 16 * warp + lane / 4;
    const bool bad = kMasked && kFlagBadPages && smem.bad_page[at.slot];
    const float* const from_max = which == 1 ? &smem.max_after[pair & 1][0][2 * q4]
                                  : pair == 0 ? nullptr
                                              : &smem.max_after[(pair - 1) & 1][1][2 * q4];
    const int* const limits = &smem.row_limit[2 * q4];
    bool moves = false;
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      const float from = from_max == nullptr ? kInitialMax : from_max[slot_row(k)];
      float m = -positive_infinity();
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float& x = s.v[reg_of(k, i)];
        if (kMasked && token0 + 8 * i >= limits[slot_row(k)]) x = -positive_infinity();
        if (kMasked && bad) x = quiet_nan();  // a flagged FP8 page: its request's rows come out NaN
        m = fmaxf(m, x);
      }
      moves |= m * scale_log2 > from + kMaxSlack;
    }
    const NamedBarrier own = NamedBarrier(kBarrierWarpgroup0 + wg);
    moves = named_barrier_any(own, kWarpgroupThreads, moves);
    if (moves) {  // the page's row maxima: over 8 lanes, then over the 4 warps through shared memory
      float* const own_max = &smem.warp_max[wg][warp][2 * q4];
#pragma unroll
      for (int k = 0; k < kRowSlots; ++k) {
        const float m = octet_max(fmaxf(s.v[reg_of(k, 0)], s.v[reg_of(k, 1)]));
        if (lane < 4) own_max[slot_row(k)] = m;
      }
    }
    // Passed whether or not the max moves, so that both warpgroups pass as many of their own barriers
    // (compute-sanitizer's racecheck reports false hazards otherwise: run_pages in decode_narrow.cu).
    named_barrier_sync(own, kWarpgroupThreads);
    const float* const all_max = &smem.warp_max[wg][0][2 * q4];
    float* const out_max = &smem.max_after[pair & 1][which][2 * q4];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      const float from = from_max == nullptr ? kInitialMax : from_max[slot_row(k)];
      float to = from;
      if (moves) {
        float m = all_max[slot_row(k)];
#pragma unroll
        for (int w = 1; w < kRingWarps; ++w) m = fmaxf(m, all_max[w * kTileRows + slot_row(k)]);
        const float scaled = m * scale_log2;
        to = scaled > from + kMaxSlack ? scaled : from;
      }
      if (warp == 0 && lane < 4) out_max[slot_row(k)] = to;
      float page_sum = 0.f;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float& x = s.v[reg_of(k, i)];
        x = fast_exp2(fmaf(x, scale_log2, -to));
        page_sum += x;
      }
      sum[k] = (moves ? sum[k] * fast_exp2(from - to) : sum[k]) + page_sum;
    }
    store_probabilities(s, at, warp, lane);
  }

  // P^T[row][token] into the slot's P box: 128-byte swizzled rows of 64 tokens, the B operand of O^T's
  // wgmmas. The accumulator's 8 x 8 blocks (8 tokens x 8 rows: j, i below) are the mma fragment layout,
  // which stmatrix.trans writes transposed, a row of 8 tokens (16 bytes, one swizzle chunk) at a time:
  // four instructions a thread for the page. Lane L gives the address of row L % 8 of block L / 8 of
  // each group of four, blocks (j, 0), (j, 1), (j + 1, 0), (j + 1, 1) for j = 2 g: query row
  // 16 g + 8 (L / 16) + L % 8, tokens 16 warp + 8 ((L / 8) % 2) + 0..7.
  __device__ __forceinline__ void store_probabilities(const RingScores& s, const RingPage& at, int warp, int lane) const {
    const int row = 8 * (lane / 16) + lane % 8;
    const uint32_t base = smem_addr(smem.prob[at.slot]) + row * kRowBytes +
                          (((2 * warp + (lane / 8) % 2) ^ (lane % 8)) << 4);
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      uint32_t words[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int j = 2 * g + b / 2, i = b % 2;  // block (j, i): registers 4 j + 2 i and + 1
        const Element2 pair = to_element2(s.v[4 * j + 2 * i], s.v[4 * j + 2 * i + 1]);
        words[b] = *reinterpret_cast<const uint32_t*>(&pair);
      }
      stmatrix_trans_x4(base + g * 16 * kRowBytes, words);
    }
  }

  // The scores of `page`, masked where the page needs it.
  __device__ __forceinline__ void softmax(RingScores& s, int page, const RingPage& at, int pair, int which) {
    const bool bad = kFlagBadPages && smem.bad_page[at.slot];
    if (bad || page * kPageSize + kPageSize > mask_from) {
      score_page<true>(s, page, at, pair, which);
    } else {
      score_page<false>(s, page, at, pair, which);
    }
    fence_generic_to_async_smem();  // P^T (generic stores) before the wgmmas that read it
  }

  // O^T's columns (query rows) from the running max `from` to `to`, and with `sums` the row sums too.
  // Nothing moves in most pages (softmax.cuh's slack): the multiplies are skipped where no row of the
  // warp moved.
  __device__ __forceinline__ void rescale(RingOutput& o, int pair, int to_page, bool sums) {
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
      if (sums) {
#pragma unroll
        for (int k = 0; k < kRowSlots; ++k) sum[k] *= factor[k];
      }
    }
  }

  // The page's slot back to the loader from this warpgroup (its last wgmma on it has completed).
  __device__ __forceinline__ void release(const RingPage& at) const {
    __syncwarp();
    if (thread == 0) mbarrier_arrive(&smem.empty[at.slot]);
  }

  // Warpgroup 0, one pair: page a (seq) scored here and, with kHasB, page b (seq + 1) scored by warpgroup 1.
  template <bool kHasB>
  __device__ __forceinline__ void warpgroup0_pair(int page, uint32_t seq, int pair, RingOutput& o, Tracer& trace) {
    const RingPage a(seq);
    RingScores s;
    trace.mark(kMarkPairStart);
    issue_scores(smem, a, s);
    trace.mark(kMarkScoresIssued);
    cute::warpgroup_wait<0>();
    trace.mark(kMarkScoresIn);
    softmax(s, page, a, pair, 0);
    named_barrier_sync(kBarrierPageAReady, kThreads);
    trace.mark(kMarkProbsPublished);
    rescale(o, pair, 0, false);
    RingFragments frags;
    OutputSteps(smem, a, 0, valid_tokens(page), thread).all(o, frags);
    cute::warpgroup_wait<0>();
    retire_fragments(frags);
    release(a);
    trace.mark(kMarkOwnPvDone);
    if constexpr (kHasB) {
      const RingPage b(seq + 1);
      named_barrier_sync(kBarrierPageBReady, kThreads);
      trace.mark(kMarkHandoffIn);
      rescale(o, pair, 1, true);
      OutputSteps(smem, b, 0, valid_tokens(page + 1), thread).all(o, frags);
      cute::warpgroup_wait<0>();
      retire_fragments(frags);
      release(b);
      trace.mark(kMarkRemotePvDone);
    }
  }

  // Warpgroup 1, one pair: page a scored by warpgroup 0 and, with kHasB, page b scored here.
  template <bool kHasB>
  __device__ __forceinline__ void warpgroup1_pair(int page, uint32_t seq, int pair, RingOutput& o, Tracer& trace) {
    const RingPage a(seq), b(seq + 1);
    RingScores s;
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
    if constexpr (!kHasB) {
      // Warpgroup 0 passed its own barrier twice more (its softmax: the vote and the exchange): so does
      // this one. Nothing needs them, but compute-sanitizer's racecheck reports false hazards when the two
      // have passed different numbers of their own barriers (decode_narrow.cu, run_pages).
      named_barrier_sync(kBarrierWarpgroup1, kWarpgroupThreads);
      named_barrier_sync(kBarrierWarpgroup1, kWarpgroupThreads);
    }
    cute::warpgroup_wait<0>();
    retire_fragments(frags);
    release(a);
    trace.mark(kMarkRemotePvDone);
    if constexpr (kHasB) {
      rescale(o, pair, 1, false);
      OutputSteps(smem, b, 1, valid_tokens(page + 1), thread).all(o, frags);
      cute::warpgroup_wait<0>();
      retire_fragments(frags);
      release(b);
      trace.mark(kMarkOwnPvDone);
    }
  }

  // Normalise and write this warpgroup's 256 value columns of the piece's rows: out / lse, or the partial
  // buffers of a split request. `last_page` (0: a, 1: b) says where the piece's final max lies.
  __device__ __forceinline__ void finish(const RingOutput& o, int last_pair, int last_page, float out_scale) {
    const int warp = thread / 32;
    const int lane = lane_id();
    const int q4 = lane % 4;
    float* const own_sum = &smem.warp_sum[wg][warp][2 * q4];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      // A bad page makes O NaN (its P is NaN): carry it into the sums, as decode.cu does.
      const float share = octet_sum(sum[k] + 0.f * o.v[0][reg_of(k, 0)]);
      if (lane < 4) own_sum[slot_row(k)] = share;
    }
    named_barrier_sync(kBarrierCta, kThreads);
    // Whether the piece is split, and its slot inside the workspace, read again here (Piece::of's): held
    // through the page loop they spill.
    const int first_slot = p.num_splits[piece.request];
    const bool split = p.num_splits[piece.request + 1] - first_slot > 1;
    if (kGuards && split && !(piece.slot >= 0 && piece.slot < p.partial_slots)) return;
    const int first = kHalfV * wg + 64 * warp + 8 * (lane / 4);  // the thread's 8 value columns
    const float* const all_sums = &smem.warp_sum[0][0][2 * q4];
    const float* const final_max = last_pair < 0 ? nullptr : &smem.max_after[last_pair & 1][last_page][2 * q4];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      const int row = rows_base + 2 * q4 + slot_row(k);
      if (row >= p.rows) continue;
      float total = 0.f;
#pragma unroll
      for (int w = 0; w < 2 * kRingWarps; ++w) total += all_sums[w * kTileRows + slot_row(k)];
      const float inv = total == 0.f ? 0.f : out_scale / total;
      if (wg == 0 && warp == 0 && lane < 4) {
        store_row_lse(p, piece, kv_head, row, final_max == nullptr ? kInitialMax : final_max[slot_row(k)], total);
      }
      float v[8];
#pragma unroll
      for (int t = 0; t < kHalfTiles; ++t) {
#pragma unroll
        for (int i = 0; i < 2; ++i) v[2 * t + i] = o.v[t][reg_of(k, i)] * inv;
      }
      if (split) {
        float* partial = p.out_partial + ((int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows + row) * kHeadDimV;
        reinterpret_cast<float4*>(partial + first)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(partial + first)[1] = make_float4(v[4], v[5], v[6], v[7]);
      } else {
        const PackedQuery query = packed_query(p, kv_head, row);
        OutElement* out = static_cast<OutElement*>(p.out) +
                          ((int64_t(piece.request) * p.seqlen_q + query.s) * p.heads_q + query.head) * kHeadDimV;
        uint32_t packed[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const OutElement2 pair = to_out_element2(v[2 * j], v[2 * j + 1]);
          packed[j] = *reinterpret_cast<const uint32_t*>(&pair);
        }
        *reinterpret_cast<uint4*>(out + first) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
      }
    }
  }
};

}  // namespace flashmla

using namespace flashmla;

extern "C" __global__ void __launch_bounds__(kRingThreads, 1)
    flashmla_decode_ring(const __grid_constant__ DecodeParams p, const __grid_constant__ TensorMap kv_map) {
  extern __shared__ uint8_t smem_raw[];
  // Align by offsetting the shared array itself, so that the compiler keeps shared-space accesses.
  const uint32_t misalignment = smem_addr(smem_raw) & 1023;
  RingStorage& smem = *reinterpret_cast<RingStorage*>(smem_raw + ((1024 - misalignment) & 1023));

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
  const Descales scales = read_descales(p);  // the FP8 descales folded in (dequant.cuh)
  Tracer trace(warpgroup, thread);
  trace.mark(kMarkKernelStart);

  uint32_t seq = 0;  // pages this CTA has read: where the next one lies in the ring
  for (int request = part.begin_request; request <= part.end_request; ++request) {
    const Piece piece = Piece::of(p, part, request);
    named_barrier_sync(kBarrierCta, kThreads);  // nobody still reads the previous Q tile or row sums
    load_ring_q(p, smem, request, kv_head, rows_base);
    if (threadIdx.x < kTileRows) {  // each row's visible tokens, for the masked pages
      const int rows[1] = {int(threadIdx.x)};
      int limit[1];
      row_limits(p, piece.seqlen, rows_base, rows, limit);
      smem.row_limit[threadIdx.x] = limit[0];
    }
    fence_generic_to_async_smem();
    named_barrier_sync(kBarrierCta, kThreads);

    trace.mark(kMarkPieceStart);
    RingPiece c(p, smem, piece, thread, warpgroup, kv_head, rows_base, scales.scale_log2);
    RingOutput o;
#pragma unroll
    for (int t = 0; t < kHalfTiles; ++t) {
#pragma unroll
      for (int r = 0; r < 32; ++r) o.v[t][r] = 0.f;
      fence_fragment(o.v[t]);
    }
    int page = piece.page_begin, pair = 0;
    if (warpgroup == 0) {
      for (; page + 1 < piece.page_end; page += 2, seq += 2, ++pair) c.warpgroup0_pair<true>(page, seq, pair, o, trace);
      if (page < piece.page_end) c.warpgroup0_pair<false>(page, seq, pair, o, trace);
    } else {
      for (; page + 1 < piece.page_end; page += 2, seq += 2, ++pair) c.warpgroup1_pair<true>(page, seq, pair, o, trace);
      if (page < piece.page_end) c.warpgroup1_pair<false>(page, seq, pair, o, trace);
    }
    const int pages = piece.page_end - piece.page_begin;
    if (pages % 2 == 1) ++seq;
    // The final max: after the last pair's page b, or its page a when the piece has an odd page count.
    const int last_pair = pages > 0 ? (pages - 1) / 2 : -1;
    c.finish(o, last_pair, pages % 2 == 0 ? 1 : 0, scales.out_scale);
    trace.mark(kMarkPieceEnd);
  }
}
