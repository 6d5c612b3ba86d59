// Split-KV MLA decode for sm_90a: one CTA = 64 packed query rows x one KV head x one part of the plan.
//
// Grid (ceil(rows / 64), heads_kv, num_parts), 384 threads, kSharedBytes of dynamic shared memory: the
// Q tile and two 72 KB page buffers, A and B (V is the first 512 columns of K). Two consumer warpgroups
// run the main loop below; a helper warpgroup feeds them: with a 16-bit cache it issues the page loads
// (loader_warp), with an FP8 cache (-DFLASHMLA_KV_E4M3) it dequantises each page in place (dequant.cuh)
// and the consumers issue their own loads; the main loop is the same. (With an e4m3 q too, QK^T runs on
// FP8 wgmmas from the landed page and only V is dequantised, once the page is scored: issue_scores.)
//
// Schedule ("seesaw"): the pages of a piece go in pairs (a, b). Warpgroup 0 scores page a, warpgroup 1
// page b; each keeps one half of O (256 columns) and multiplies both pages' P into it. Per pair:
//
//   tensor cores:  S_a = Q K_a^T | S_b = Q K_b^T       | O_L += P_a V_a, O_R += P_a V_a | O_L += P_b V_b, O_R += P_b V_b
//   warpgroup 0:   (issue)        softmax(a) -> P_a, m_a (smem)                          | rescale O_L to m_b
//   warpgroup 1:                  (issue S_b)         softmax(b) from m_a -> P_b, m_b    | rescale O_R to m_b
//
// so one warpgroup's softmax runs while the tensor cores work for the other. Each page's P travels to
// the other warpgroup in the page's own rope box (its QK^T is done with it). A warpgroup releases the
// boxes it read last as soon as its wgmma on them has completed (load.cuh, boxes_loaded_by), and they
// are refilled with the next page of that buffer's stream, possibly of the next piece.
//
// Handshakes (named barriers, synced by both warpgroups): page A ready (0 -> 1: max_a, P_a), page B
// ready (1 -> 0: max_b, P_b);
// TMA barriers, one per box and buffer ("full"); per buffer and consumer an "empty" barrier (its boxes
// released to the loader); a consumers' barrier before each Q reload and in the epilogue. The Q tile
// lands through TMA on its own barrier ("q_full"; the host's q tensor map, where 64 packed rows form one
// box of q: load.cuh), issued by one thread, for the next piece as soon as both warpgroups are done
// with the tile (the rows leave from registers, epilogue.cuh); otherwise all consumer threads copy it
// (load_q_tile).
//
// CuTe supplies the wgmma atoms (mma.cuh). TMA loads, mbarriers, named barriers and the swizzled-box
// descriptors are hand-written PTX: CuTe's TMA atoms are built by host helpers that NVRTC compiles out,
// and its barrier wrappers use the .aligned barrier forms, undefined when the warpgroups reach a
// barrier from different instructions, as they do here.
#include "decode_config.cuh"
#include "shared_storage.cuh"
#include "sync.cuh"
#include "load.cuh"
#include "mma.cuh"
#include "softmax.cuh"
#include "plan.cuh"
#include "epilogue.cuh"
#include "trace.cuh"
#include "dequant.cuh"

namespace flashmla {

// A page's loads into the boxes of `buffer` that `consumer` reads last (`hint`: cache_load_hint). A bad
// page's flag (kFlagBadPages) is written before the TMA barriers are armed, so whoever waits on them sees it.
__device__ __forceinline__ void issue_page(SharedStorage& smem, const TensorMap* map, int buffer, int consumer,
                                           int block, bool flagged, int kv_head, uint64_t hint) {
  if constexpr (kFlagBadPages) smem.bad_page[buffer][consumer] = flagged;
  load_page_boxes(map, smem, buffer, boxes_loaded_by(buffer, consumer), block, kv_head, hint);
}

// An FP8 cache's refill, on a consumer's path: the next page of a buffer's stream, if any. The stream's
// state is read at once, into registers (PageStream::snapshot), not field by field.
__device__ __forceinline__ void load_next_page(const DecodeParams& p, const PartPlan& part, SharedStorage& smem,
                                               const TensorMap* map, PageStream& stream, int buffer, int consumer,
                                               int kv_head, Tracer* trace = nullptr) {
  PageStream next = stream.snapshot();
  if (!next.valid()) return;
  bool flagged;
  const int block = next.checked_block(p, flagged);
  if (trace != nullptr) trace->mark(kMarkBlockIndexed);
  issue_page(smem, map, buffer, consumer, block, flagged, kv_head, cache_load_hint(part.payload, gridDim.x));
  if (trace != nullptr) trace->mark(kMarkBoxesIssued);
  next.step(p, part);
  stream.follow(next, p);
}

// The loader (16-bit cache): warp w of the helper warpgroup follows buffer w / 2's page stream for
// consumer warpgroup w % 2, one lane. It loads the first page at once (buffer B's once the first Q tile
// is in: Producer::query_in), then each next page as soon as
// the consumer has released the boxes (the "empty" barrier): the TMA issue, the block-table reads and
// the stream's bookkeeping all stay off the consumers' path. It works on the stream in place (its 40
// registers hold its loop's addresses), and makes each page ready (block entry read, stream moved on)
// before waiting for the boxes: shared-memory reads are slow while the tensor cores stream from it
// (~300 cycles for the block entry, ~440 for the stream's step, traced on the H200), so after the
// release only the flag and the TMA issue remain (1 % faster at h_q = 128: -ab60-*).
// Once its first page has landed, the loader also asks L2 for the stream's second page: at the start of
// a part every SM asks for its query tile and first pages at once, and the first refills waited for
// DRAM. (Asking L2 ahead for every page was 10-22 % slower on long parts: benchmarks/results/
// 2026-11-30-h200-ab9-*, and 1.5-23 % even once each page has landed: -ab57-*; the first page only: 0-2 %
// faster; asked once the first page has landed rather than at once, so that the start's burst carries
// only query tiles and first pages: another 0.5-1.4 % at b64/h128/1k, b128/h64/1k, b1/32k, q2-h64/4k
// causal: -ab53-*.)
__device__ __forceinline__ void loader_warp(const DecodeParams& p, const PartPlan& part, SharedStorage& smem,
                                            const TensorMap* map, int kv_head, int warp) {
  const int consumer = warp % 2;
  const int buffer = warp / 2;
  const uint32_t boxes = boxes_loaded_by(buffer, consumer);
  PageStream& stream = smem.streams[consumer][buffer];
  stream.start(p, part, buffer);
  // Buffer B's first page waits until the consumer's first query tile is in (its one extra arrival on
  // the "empty" barrier, Producer::query_in), so that the start's burst is query tiles and pages a only:
  // warpgroup 1 scores page b after warpgroup 0 starts on page a. So buffer B's refills wait for one
  // arrival more: `arrivals` counts them, from buffer + 1 (kBufferB is 1). The first page is loaded
  // apart from the loop: one loop for both, with its first-page branch, spilled in the lane's registers.
  static_assert(kBufferA == 0 && kBufferB == 1, "buffer B waits for one arrival more");
  if (!stream.valid()) return;
  const uint64_t hint = cache_load_hint(part.payload, gridDim.x);
  bool flagged;
  int block = stream.block_index(p, flagged);
  stream.advance(p, part);
  if (buffer == kBufferB) mbarrier_wait_single(&smem.empty[buffer][consumer], 0);
  issue_page(smem, map, buffer, consumer, block, flagged, kv_head, hint);
  if (!stream.valid()) return;
  // Once this first page has landed (the last of its boxes loaded here). Each next page's block entry
  // is read before the stream moves on (advance copies the following entry into the same field).
  mbarrier_wait_single(&smem.full[buffer][31 - __clz(boxes)], 0);
  block = stream.block_index(p, flagged);
  if (block >= 0 && block < p.num_blocks) prefetch_page_boxes(map, boxes, block, kv_head);
  for (int arrivals = buffer + 1;; ++arrivals) {
    stream.advance(p, part);
    mbarrier_wait_single(&smem.empty[buffer][consumer], (arrivals - 1) & 1);
    issue_page(smem, map, buffer, consumer, block, flagged, kv_head, hint);
    if (!stream.valid()) break;
    block = stream.block_index(p, flagged);
  }
}

// A consumer warpgroup's side of the page loads. Once its last wgmma on the boxes of a buffer that it
// reads last (load.cuh, boxes_loaded_by) has completed, thread 0 releases them to the next page of the
// buffer's stream: with a 16-bit cache by one arrival on their "empty" barrier, which wakes the loader;
// with an FP8 cache (whose helper warpgroup converts) by issuing the loads itself.
struct Producer {
  PageStream* stream;  // [kPageBuffers], smem.streams[warpgroup]: FP8 only
  int warpgroup;
  bool active;

  __device__ __forceinline__ Producer(const DecodeParams& p, const PartPlan& part, SharedStorage& smem, int wg,
                                      bool is_issuer)
      : stream(smem.streams[wg]), warpgroup(wg), active(is_issuer) {
    if (!kLoaderWarpgroup && active) {
      stream[kBufferA].start(p, part, kBufferA);
      stream[kBufferB].start(p, part, kBufferB);
    }
  }

  // The first page of each buffer (FP8; the loader does this itself).
  __device__ __forceinline__ void first_loads(const DecodeParams& p, const PartPlan& part, SharedStorage& smem,
                                              const TensorMap* map, int kv_head) {
    if constexpr (!kLoaderWarpgroup) {
      release(p, part, smem, map, kBufferA, kv_head);
      release(p, part, smem, map, kBufferB, kv_head);
    }
  }

  // The part's first query tile is in: buffer B's loader may start (16-bit cache; loader_warp).
  __device__ __forceinline__ void query_in(SharedStorage& smem) {
    if constexpr (kLoaderWarpgroup) {
      if (active) mbarrier_arrive(&smem.empty[kBufferB][warpgroup]);
    }
  }

  __device__ __forceinline__ void release(const DecodeParams& p, const PartPlan& part, SharedStorage& smem,
                                          const TensorMap* map, int buffer, int kv_head,
                                          Tracer* trace = nullptr) {
    if (active) {
      if constexpr (kLoaderWarpgroup) {
        mbarrier_arrive(&smem.empty[buffer][warpgroup]);
      } else {
        load_next_page(p, part, smem, map, stream[buffer], buffer, warpgroup, kv_head, trace);
      }
    }
    __syncwarp();
  }
};

// Whether the pair bodies advance their wgmma descriptors on the low word of a held high word (mma.cuh,
// SmemDesc): the 16-bit builds, where ptxas otherwise builds the 64-bit add with carries or moves in all but
// one loop a warpgroup. (The FP8-cache builds keep the 64-bit add; not measured with this form.)
constexpr bool kLowWordDescs = kLoaderWarpgroup;

// S = Q K^T of the page in `buffer`: with an e4m3 q and cache on FP8 wgmmas straight from the landed FP8
// page (dequant.cuh), else from the 16-bit boxes. Committed, not awaited. With a 16-bit cache, page b's
// boxes go right V half first: warpgroup 1 releases it after its own P_b V_b, which the tensor cores
// run before warpgroup 0's P_b V_b over the left half (0.5-0.7 % faster with the rope box in registers,
// -ab66-*; no change without it, -ab64-*; starting with the rope box, which carries P_b, was slower).
template <bool kLowWord = false>
__device__ __forceinline__ void issue_scores(SharedStorage& smem, const RopeFragment& q_rope, int buffer, int phase,
                                             ScoreTile& s) {
#if defined(FLASHMLA_FP8_SCORES)
  issue_qk_fp8(smem.q, smem.kv[buffer], smem.landed[buffer], phase, s);
#else
  if (kLoaderWarpgroup && buffer == kBufferB) {
    issue_qk<true, kLowWord>(smem.q, q_rope, smem.kv[buffer], smem.full[buffer], phase, s);
  } else {
    issue_qk<false, kLowWord>(smem.q, q_rope, smem.kv[buffer], smem.full[buffer], phase, s);
  }
#endif
}

// The page in `buffer` has been scored (this warp's wait for its QK^T has returned): with FP8 scores
// the converter may now overwrite its FP8 V in place (one arrival per warp).
__device__ __forceinline__ void mark_scored(SharedStorage& smem, int buffer, int thread) {
#if defined(FLASHMLA_FP8_SCORES)
  __syncwarp();
  if (thread % 32 == 0) mbarrier_arrive(&smem.scored[buffer]);
#endif
}

// What both warpgroups need to process the pages of one piece.
struct PieceContext {
  const DecodeParams& p;
  const PartPlan& part;
  SharedStorage& smem;
  const TensorMap* map;
  const TensorMap* q_map;  // the q tensor map (used where p.q_tma)
  Piece piece;
  FragmentCoords at;
  int thread;       // index inside the warpgroup
  int kv_head;
  int rows_base;
  int limit[2];     // visible tokens of the thread's two rows
  int mask_from;    // pages reaching past this token need the masked softmax
  Descales scales;  // score and output scales (an FP8 cache's descales folded in)
  RopeFragment q_rope;  // the Q tile's rope box as wgmma A fragments (16-bit q)

  __device__ __forceinline__ PieceContext(const DecodeParams& params, const PartPlan& plan, SharedStorage& s,
                                          const TensorMap* m, const TensorMap* qm, const Piece& pc, int t, int head,
                                          int base, const Descales& d)
      : p(params), part(plan), smem(s), map(m), q_map(qm), piece(pc), at(t), thread(t), kv_head(head),
        rows_base(base), scales(d) {
    row_limits(p, piece.seqlen, rows_base, at.row, limit);
    mask_from = mask_from_token(p, piece.seqlen);
    if constexpr (!kFp8Scores) load_fragment(smem.q + kRopeBox * kBoxBytes, at, q_rope);
  }

  // Read once the page's TMA barriers have been waited on (bad-page flags are written before they
  // are armed), and before waiting for its QK^T: the shared-memory read then hides behind the wgmmas
  // instead of delaying the softmax.
  __device__ __forceinline__ PageMask mask_of(int page, int buffer) const {
    PageMask mask;
    mask.token0 = page * kPageSize;
    mask.limit[0] = limit[0];
    mask.limit[1] = limit[1];
    mask.bad = kFlagBadPages && (smem.bad_page[buffer][0] | smem.bad_page[buffer][1]);
    return mask;
  }
  __device__ __forceinline__ bool needs_mask(const PageMask& mask) const {
    return mask.bad || mask.token0 + kPageSize > mask_from;
  }
  // Tokens of the page that exist (< 64 only on the request's last page, whose tail may hold NaN).
  __device__ __forceinline__ int valid_tokens(int page) const { return piece.seqlen - page * kPageSize; }
  __device__ __forceinline__ uint8_t* p_box(int buffer) const { return smem.kv[buffer] + kRopeBox * kBoxBytes; }

  // Scores of a page -> probabilities against the new running max, returned in `new_max`; `sum` is the
  // thread's share of the page's row sums.
  // kEdge = false: a page of the steady state, which needs no mask (only an FP8 bad page's flag is checked).
  template <bool kEdge = true>
  __device__ __forceinline__ void softmax(ScoreTile& s, const PageMask& mask, const float (&running)[2],
                                          float (&new_max)[2], float (&sum)[2]) const {
    if (kEdge ? needs_mask(mask) : kFlagBadPages && mask.bad) {
      page_max<true>(s, at, mask, scales.scale_log2, running, new_max);
    } else {
      page_max<false>(s, at, mask, scales.scale_log2, running, new_max);
    }
    exponentiate(s, at, scales.scale_log2, new_max, sum);
  }

  // Hand P and the new max of a page to the other warpgroup: P into the page's rope box. Both
  // warpgroups sync on the hand-off (the receiver would only need the sender's arrive): with arrives,
  // compute-sanitizer racecheck reported hazards on max_b and the row sums that it does not report
  // with syncs, for about 1 % of time (benchmarks/results/2026-11-30-h200-seesaw-experiments.json).
  __device__ __forceinline__ void publish(const ProbFragment& prob, int buffer, float* max_out,
                                          const float (&row_max)[2], NamedBarrier ready) const {
    store_probabilities(prob, p_box(buffer), at);
    if (at.publishes()) {
      max_out[at.row[0]] = row_max[0];
      max_out[at.row[1]] = row_max[1];
    }
    fence_generic_to_async_smem();
    named_barrier_sync(ready, kThreads);
  }

  // Zero the stale V rows of this warpgroup's half of `buffer` before its PV reads them. (With FP8
  // scores the converter writes them as zeros.)
  template <bool kEdge = true>
  __device__ __forceinline__ void clear_stale_rows(int page, int buffer, int half, NamedBarrier own) const {
    if constexpr (kFp8Scores || !kEdge) return;
    const int valid = valid_tokens(page);
    if (valid < kPageSize) {
      zero_stale_v_rows(smem.kv[buffer], half, valid, thread);
      fence_generic_to_async_smem();
      named_barrier_sync(own, kWarpgroupThreads);
    }
  }

  // O = O * move + P V[:, half] over a page this warpgroup scored itself (P in registers), then
  // the refill of the page's boxes it read last.
  template <bool kEdge = true>
  __device__ __forceinline__ void own_page_pv(Producer& producer, const ProbFragment& prob, int page, int buffer,
                                              int half, NamedBarrier own, const MaxMove& move, OutputHalf& o,
                                              int (&uses)[kPageBuffers]) const {
    if constexpr (kFp8Scores) see_boxes(buffer, half * kBoxesPerHalf, uses[buffer] & 1);  // V converted
    clear_stale_rows<kEdge>(page, buffer, half, own);
    move.rescale(o);
    issue_pv_from_regs<kLowWordDescs>(prob, smem.kv[buffer], half, o);
    cute::warpgroup_wait<0>();
    producer.release(p, part, smem, map, buffer, kv_head);
    ++uses[buffer];
  }

  // O = O * move + P V[:, half] over a page the other warpgroup scored (P in the page's rope box),
  // issued only; `finish_remote_pv` waits for it.
  template <bool kEdge = true>
  __device__ __forceinline__ void issue_remote_pv(int page, int buffer, int half, NamedBarrier own, const MaxMove& move,
                                                  OutputHalf& o, const int (&uses)[kPageBuffers]) const {
    see_boxes(buffer, half * kBoxesPerHalf, uses[buffer] & 1);
    clear_stale_rows<kEdge>(page, buffer, half, own);
    move.rescale(o);
    issue_pv_from_smem<kLowWordDescs>(p_box(buffer), smem.kv[buffer], half, o);
  }

  // Wait for the PV over the other warpgroup's page, then refill the boxes of `buffer` this warpgroup
  // read last.
  __device__ __forceinline__ void finish_remote_pv(Producer& producer, int buffer, int (&uses)[kPageBuffers],
                                                   Tracer& trace) const {
    cute::warpgroup_wait<0>();
    trace.mark(kMarkRemotePvDone);
    producer.release(p, part, smem, map, buffer, kv_head, &trace);
    trace.mark(kMarkLoaded);
    ++uses[buffer];
  }

  // Wait (again) for boxes this warpgroup did not score itself: the TMA data is complete already,
  // the wait makes it visible to this warpgroup. (With FP8 scores, the V boxes of any page: their
  // conversion follows the page's QK^T.)
  __device__ __forceinline__ void see_boxes(int buffer, int first_box, int phase) const {
#pragma unroll
    for (int box = first_box; box < first_box + kBoxesPerHalf; ++box) {
      mbarrier_wait_uniform(&smem.full[buffer][box], phase);
    }
  }
};

// The running state of a warpgroup's rows over one piece.
struct RowState {
  float max[2];   // running max (scaled, base 2); both warpgroups hold the same values between pairs
  float sum[2];   // this thread's share of this warpgroup's row sums, relative to `max`
  __device__ __forceinline__ RowState() : max{kInitialMax, kInitialMax}, sum{0.f, 0.f} {}

  // The sums brought along a move of the max, then a page's own sums (taken against the new max) added.
  __device__ __forceinline__ void move_sums(const MaxMove& move) {
    sum[0] *= move.factor[0];
    sum[1] *= move.factor[1];
  }
  __device__ __forceinline__ void move_sums(const MaxMove& move, const float (&page)[2]) {
    sum[0] = sum[0] * move.factor[0] + page[0];
    sum[1] = sum[1] * move.factor[1] + page[1];
  }
  __device__ __forceinline__ void set_max(const float (&m)[2]) {
    max[0] = m[0];
    max[1] = m[1];
  }
};

// A page this warpgroup scored: its softmax against the running max `from` gives the new max `to`; the
// row sums follow the move, P is packed (returned in `prob` for this warpgroup's own PV) and handed to
// the other warpgroup with `to`. Returns the move, which O still has to follow.
template <bool kEdge = true>
__device__ __forceinline__ MaxMove score_own_page(const PieceContext& c, ScoreTile& s, const PageMask& mask,
                                                  const float (&from)[2], float (&to)[2], RowState& rows,
                                                  ProbFragment& prob, int buffer, float* max_out,
                                                  NamedBarrier ready) {
  float sum[2];
  c.template softmax<kEdge>(s, mask, from, to, sum);
  const MaxMove move(from, to);
  rows.move_sums(move, sum);
  pack_probabilities(s, prob);
  c.publish(prob, buffer, max_out, to, ready);
  return move;
}

// Warpgroup 0, one pair: page a (scored here) and, with kHasB, page b (scored by warpgroup 1).
template <bool kHasB, bool kEdge = true>
__device__ __forceinline__ void warpgroup0_pair(const PieceContext& c, Producer& producer, int page_a,
                                                int (&uses)[kPageBuffers], RowState& rows, OutputHalf& o,
                                                Tracer& trace) {
  SharedStorage& smem = c.smem;
  ScoreTile s;
  trace.mark(kMarkPairStart);
  issue_scores<kLowWordDescs>(smem, c.q_rope, kBufferA, uses[kBufferA] & 1, s);
  trace.mark(kMarkScoresIssued);
  const PageMask mask = c.mask_of(page_a, kBufferA);
  cute::warpgroup_wait<0>();
  mark_scored(smem, kBufferA, c.thread);
  trace.mark(kMarkScoresIn);

  float max_a[2];
  ProbFragment prob;
  const MaxMove to_a =
      score_own_page<kEdge>(c, s, mask, rows.max, max_a, rows, prob, kBufferA, smem.max_a, kBarrierPageAReady);
  trace.mark(kMarkProbsPublished);

  // O_L = O_L * rescale + P_a V_a[:, 0:256]
  c.template own_page_pv<kEdge>(producer, prob, page_a, kBufferA, 0, kBarrierWarpgroup0, to_a, o, uses);
  trace.mark(kMarkOwnPvDone);
  rows.set_max(max_a);

  if constexpr (kHasB) {
    // O_L = O_L * 2^(m_a - m_b) + P_b V_b[:, 0:256], P_b from warpgroup 1 through smem.
    named_barrier_sync(kBarrierPageBReady, kThreads);
    trace.mark(kMarkHandoffIn);
    const float max_b[2] = {smem.max_b[c.at.row[0]], smem.max_b[c.at.row[1]]};
    const MaxMove to_b(max_a, max_b);
    rows.move_sums(to_b);
    c.template issue_remote_pv<kEdge>(page_a + 1, kBufferB, 0, kBarrierWarpgroup0, to_b, o, uses);
    c.finish_remote_pv(producer, kBufferB, uses, trace);
    rows.set_max(max_b);
  }
}

// Warpgroup 1, one pair: page a (scored by warpgroup 0) and, with kHasB, page b (scored here).
template <bool kHasB, bool kEdge = true>
__device__ __forceinline__ void warpgroup1_pair(const PieceContext& c, Producer& producer, int page_a,
                                                int (&uses)[kPageBuffers], RowState& rows, OutputHalf& o,
                                                Tracer& trace) {
  SharedStorage& smem = c.smem;
  ScoreTile s;
  PageMask mask_b;
  trace.mark(kMarkPairStart);
  if constexpr (kHasB) {
    issue_scores<kLowWordDescs>(smem, c.q_rope, kBufferB, uses[kBufferB] & 1, s);
    trace.mark(kMarkScoresIssued);
    mask_b = c.mask_of(page_a + 1, kBufferB);
    if constexpr (kFp8Scores) {
      // Say at once that page b is scored, so that the converter turns to V_b straight after V_a
      // (S_b is done long before warpgroup 0's softmax(a)): 0-2 % faster than after P_a V_a's issue.
      cute::warpgroup_wait<0>();
      mark_scored(smem, kBufferB, c.thread);
    }
  }
  // A no-op at run time (S_b is the only batch in flight), but it tells ptxas that O is no longer
  // a wgmma accumulator, so that rescaling O below does not make it wait for S_b (C7517).
  cute::warpgroup_wait<1>();

  // O_R = O_R * 2^(m - m_a) + P_a V_a[:, 256:512], P_a from warpgroup 0 through smem.
  named_barrier_sync(kBarrierPageAReady, kThreads);
  trace.mark(kMarkHandoffIn);
  const float max_a[2] = {smem.max_a[c.at.row[0]], smem.max_a[c.at.row[1]]};
  const MaxMove to_a(rows.max, max_a);
  rows.move_sums(to_a);
  c.template issue_remote_pv<kEdge>(page_a, kBufferA, 1, kBarrierWarpgroup1, to_a, o, uses);

  if constexpr (kHasB) {
    cute::warpgroup_wait<1>();  // S_b is in; P_a V_a may still run
    trace.mark(kMarkScoresIn);
    float max_b[2];
    ProbFragment prob;
    const MaxMove to_b =
        score_own_page<kEdge>(c, s, mask_b, max_a, max_b, rows, prob, kBufferB, smem.max_b, kBarrierPageBReady);
    trace.mark(kMarkProbsPublished);

    c.finish_remote_pv(producer, kBufferA, uses, trace);

    // O_R = O_R * 2^(m_a - m_b) + P_b V_b[:, 256:512]
    c.template own_page_pv<kEdge>(producer, prob, page_a + 1, kBufferB, 1, kBarrierWarpgroup1, to_b, o, uses);
    trace.mark(kMarkOwnPvDone);
    rows.set_max(max_b);
  } else {
    c.finish_remote_pv(producer, kBufferA, uses, trace);
    rows.set_max(max_a);
  }
}

// Both warpgroups: add up the row sums and write this piece's rows (each warpgroup its half). Where the
// Q tile comes in through TMA, the next piece's is issued as soon as both warpgroups are done with this
// one (by `q_issuer`), so that it lands while the rows are written.
__device__ __forceinline__ void finish_piece(const PieceContext& c, int warpgroup, const RowState& rows,
                                             const OutputHalf& o, bool q_issuer, Tracer& trace) {
  cute::warpgroup_wait<0>();  // nothing is in flight here; saying so keeps ptxas from adding a wait
  float* own = c.smem.row_sum[warpgroup];
  // A bad page that TMA filled with NaN makes O NaN in every row of the request (P is 0 or NaN, V is
  // NaN), but not the sums of causal rows that see none of its tokens (their P is 0): carry O's NaN into
  // the sums so that their lse is NaN too. (Register 0 is row 0's, 2 is row 1's.)
  const float share[2] = {quad_sum(rows.sum[0] + 0.f * o.v[0]), quad_sum(rows.sum[1] + 0.f * o.v[2])};
  if (c.at.publishes()) {
    own[c.at.row[0]] = share[0];
    own[c.at.row[1]] = share[1];
  }
  const bool next_q = c.p.q_tma && c.piece.request < c.part.end_request;
  if (next_q) fence_generic_to_async_smem();  // the rope box's reads (generic) before TMA rewrites the tile
  named_barrier_sync(kBarrierCta, kThreads);
  trace.mark(kMarkSumsExchanged);
  if (next_q && q_issuer) issue_q_tile_tma(c.p, c.q_map, c.smem, c.piece.request + 1, c.kv_head, c.rows_base);
  float total[2], inv_sum[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    total[i] = c.smem.row_sum[0][c.at.row[i]] + c.smem.row_sum[1][c.at.row[i]];
    inv_sum[i] = total[i] == 0.f ? 0.f : c.scales.out_scale / total[i];  // NaN (a bad page) stays NaN
  }
  if (warpgroup == 0 && c.at.publishes()) store_lse(c.p, c.piece, c.kv_head, c.rows_base, c.at, rows.max, total);
  trace.mark(kMarkLseStored);
  store_output(c.p, c.piece, c.kv_head, c.rows_base, c.at, warpgroup, o, inv_sum);
  trace.mark(kMarkOutputStored);
}

}  // namespace flashmla

using namespace flashmla;

extern "C" __global__ void __launch_bounds__(kLaunchThreads, 1)
    flashmla_decode(const __grid_constant__ DecodeParams p, const __grid_constant__ TensorMap kv_map,
                    const __grid_constant__ TensorMap q_map) {
  extern __shared__ uint8_t smem_raw[];
  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw + storage_offset(smem_raw));

  prefetch_maps(p, &kv_map, &q_map);
  const PartPlan part = PartPlan::load(p, blockIdx.z);
  if (part.empty(p)) return;
  const int kv_head = blockIdx.y;
  const int rows_base = blockIdx.x * kTileRows;

  allow_dependent_launch();

  if (threadIdx.x == 0) {
    for (int buffer = 0; buffer < kPageBuffers; ++buffer) {
      for (int box = 0; box < kBoxes; ++box) {
        mbarrier_init(&smem.full[buffer][box], kFullArrivals);
#if defined(FLASHMLA_KV_E4M3)
        mbarrier_init(&smem.landed[buffer][box], 1);
#endif
      }
      mbarrier_init(&smem.empty[buffer][0], 1);
      mbarrier_init(&smem.empty[buffer][1], 1);
#if defined(FLASHMLA_FP8_SCORES)
      mbarrier_init(&smem.scored[buffer], kScoredArrivals);
#endif
    }
    mbarrier_init(&smem.q_full, 1);
    fence_barrier_init();
  }
  __syncthreads();

  // Broadcast from lane 0 so that the compiler sees the role as warp-uniform; otherwise it serialises
  // the wgmmas behind the role branch.
  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / kWarpgroupThreads, 0);
  const int thread = threadIdx.x % kWarpgroupThreads;
  if (warpgroup == kHelperWarpgroup) {
    release_registers();
#if defined(FLASHMLA_KV_E4M3)
    Tracer trace(warpgroup, thread);
    trace.mark(kMarkKernelStart);
    convert_part(p, part, smem, thread, trace);
#else
    if (thread % 32 == 0 && thread / 32 < 2 * kPageBuffers) loader_warp(p, part, smem, &kv_map, kv_head, thread / 32);
#endif
    return;
  }
  claim_registers();
  // With p.q_tma one thread issues each Q tile through TMA: the part's first one at once.
  const bool q_issuer = warpgroup == 0 && thread == 0;
  if (p.q_tma && q_issuer) issue_q_tile_tma(p, &q_map, smem, part.begin_request, kv_head, rows_base);
  const Descales scales = read_descales(p);
  Tracer trace(warpgroup, thread);
  trace.mark(kMarkKernelStart);
  Producer producer(p, part, smem, warpgroup, thread == 0);
  producer.first_loads(p, part, smem, &kv_map, kv_head);

  int uses[kPageBuffers] = {0, 0};  // pages consumed from each buffer: the parity of its TMA barriers
  int q_tiles = 0;                  // Q tiles landed through TMA: the parity of q_full
  for (int request = part.begin_request; request <= part.end_request; ++request) {
    const Piece piece = Piece::of(p, part, request);
    // Nobody still reads the previous row sums, nor (where q comes without TMA) the previous Q tile.
    named_barrier_sync(kBarrierCta, kThreads);
    trace.mark(kMarkQTileFree);
    if (p.q_tma) {
      // This Q tile was issued at the part's start or at the previous piece's end (finish_piece).
      mbarrier_wait_uniform(&smem.q_full, q_tiles & 1);
      ++q_tiles;
    } else {
      load_q_tile(p, smem, request, kv_head, rows_base);
      fence_generic_to_async_smem();
      named_barrier_sync(kBarrierCta, kThreads);
    }
    if (request == part.begin_request) producer.query_in(smem);
    trace.mark(kMarkPieceStart);

    const PieceContext c(p, part, smem, &kv_map, &q_map, piece, thread, kv_head, rows_base, scales);
    RowState rows;
    OutputHalf o;
#pragma unroll
    for (int i = 0; i < 128; ++i) o.v[i] = 0.f;
    int page = piece.page_begin;
    // The steady state: pairs of pages that need no mask and hold 64 tokens each, whose code has neither the
    // masked softmax nor the stale rows' clearing (decode_bf16's loop bodies 708 and 792 instructions
    // against 1299 and 1378 with them; 1.9-2.6 % faster at h128/4k, b32/8k, h64/16k on the H200, ab201).
    // Then the pairs from the first page that needs either. 16-bit caches only: with an FP8 cache the
    // second body made NVRTC 13.0.88 spill (4 bytes) and was not measured; nor in a trace build
    // (kernel_trace.py), where the marks held through both bodies spilled 4 bytes under NVRTC 13.5.
#if !defined(FLASHMLA_TRACE)
    if constexpr (kLoaderWarpgroup) {
      const int steady_end = min(piece.page_end, c.mask_from / kPageSize);
      if (warpgroup == 0) {
        for (; page + 1 < steady_end; page += 2) warpgroup0_pair<true, false>(c, producer, page, uses, rows, o, trace);
      } else {
        for (; page + 1 < steady_end; page += 2) warpgroup1_pair<true, false>(c, producer, page, uses, rows, o, trace);
      }
    }
#endif
    if (warpgroup == 0) {
      for (; page + 1 < piece.page_end; page += 2) warpgroup0_pair<true>(c, producer, page, uses, rows, o, trace);
      if (page < piece.page_end) warpgroup0_pair<false>(c, producer, page, uses, rows, o, trace);
    } else {
      for (; page + 1 < piece.page_end; page += 2) warpgroup1_pair<true>(c, producer, page, uses, rows, o, trace);
      if (page < piece.page_end) warpgroup1_pair<false>(c, producer, page, uses, rows, o, trace);
    }
    finish_piece(c, warpgroup, rows, o, q_issuer, trace);
    trace.mark(kMarkPieceEnd);
  }
}
