// Split-KV MLA decode for few query rows (memory-bound: rows = s_q * h_q / h_kv <= 16), sm_90a, 16-bit
// cache. One CTA = up to kNarrowRows (-DFLASHMLA_NARROW_ROWS: 16 is shipped; 32 builds but measured 3-4 %
// slower than decode.cu on the H200, docs/PERF_NOTES.md) packed query rows x one KV head x one part of
// the plan, as decode.cu.
//
// Why a second kernel: wgmma's M is at least 64, and decode.cu puts the query rows on M, so with 16 rows
// three quarters of its tensor work multiply padding. Here every product is transposed, tokens and value
// columns on M and the query rows on N:
//
//   S^T = K Q^T       (64 tokens x N rows, k = 576)       A = the page's K boxes, K-major (as loaded)
//   O^T += V^T P^T    (512 columns x N rows, k = 64)      A = the page's V boxes, MN-major (as loaded)
//
// so the tensor work per page is N / 64 of decode.cu's, and what is left is streaming the cache. The
// softmax runs down the columns of S^T: a column (query row) is spread over the warpgroup's four warps,
// so its max goes through shared memory (one warpgroup barrier a page), while its sum stays in each
// thread until the piece ends.
//
// An FP8 (e4m3) cache with an e4m3 q (-DFLASHMLA_KV_E4M3 -DFLASHMLA_Q_E4M3, 16 or 32 rows) stays FP8 in
// shared memory, no converter warpgroup. With 32 rows: 4 KB boxes landed 64-byte swizzled (the wgmma
// layout of FP8 rows), a ring of 44, S^T on FP8 wgmmas straight from shared memory; with 16 rows whole
// pages as they lie in the cache, a ring of five, S^T taking K from registers (kLinear, below). Q stays
// e4m3 too; S^T is issued behind the previous page's PV, as for a 16-bit cache. PV takes V^T from
// registers, which each thread fills from the FP8 bytes with exact conversions to fp16 (issue_output:
// O^T's rows are taken in an order that makes every thread's bytes contiguous); stale tokens of the
// last page load as zeros, and a page with a bad block index (plan.cuh) makes its request's rows NaN:
// its warpgroup reads the page's block-table entry itself, a page ahead. (With a 16-bit q, K would have
// to be converted too, in registers: measured slower than decode.cu's converter warpgroup, so those
// calls go there.) Two computing warpgroups take every other page of a piece, each with its own S^T,
// O^T, P^T and running max, so that one's softmax and V^T conversion run beside the other's wgmmas; at
// the piece's end warpgroup 1's O goes to warpgroup 0 through a buffer of their own (finish). The loader
// is then a warpgroup that hands its registers over (setmaxnreg).
//
// Shared memory holds the Q tile, the P^T tile and a ring of kRingBoxes 8 KB boxes (64 tokens x 64
// columns): box b of the n-th page this CTA reads goes to slot (9n + b) mod kRingBoxes, so about 2.8
// pages are in flight or resident (two whole-page buffers would be two). A page's slots are released
// together once its PV has completed; with an FP8 cache each slot as soon as it has been read (the rope
// box after S^T, the value boxes once converted into registers).
//
// Grid (ceil(rows / kNarrowRows), heads_kv, num_parts), kNarrowThreads threads, kNarrowSharedBytes of
// dynamic shared memory. 16-bit cache: 160 threads, warpgroup 0 computes, warp 4 is the loader (one
// lane). FP8 cache: 384 threads, warpgroups 0 and 1 compute, warpgroup 2 is the loader (one lane, or on
// a long part two taking the pages in turn: narrow_loader). Per
// page, in its warpgroup: S^T of that warpgroup's next page is issued right behind this page's PV, so the
// tensor cores run the two back to back.
//
// Handshakes: per ring slot a TMA barrier ("full") and an "empty" barrier (the slot's page is done
// with: the loader refills it); warpgroup barriers per page (column maxima written, then P^T written;
// with an FP8 cache one that publishes P^T and votes whether any row's max moved, and the other two only
// where one did: softmax_unmoved), one around each Q reload and the epilogue; with two computing
// warpgroups, each warpgroup's own, and the computing threads' barrier around each round of the O merge
// (finish).
//
// CuTe supplies the wgmma atoms; TMA, mbarriers and descriptors are decode.cu's hand-written PTX.
#include "decode_config.cuh"
#include "sync.cuh"
#include "mma.cuh"
#include "softmax.cuh"
#include "plan.cuh"
#include "load.cuh"
#include "epilogue.cuh"
#include "dequant.cuh"

namespace flashmla {

#if !defined(FLASHMLA_NARROW_ROWS)
#error "define FLASHMLA_NARROW_ROWS (16 or 32)"
#endif
#ifndef FLASHMLA_NARROW_LOADERS
#define FLASHMLA_NARROW_LOADERS 2  // lanes issuing an FP8 cache's loads on a long part (kNarrowLoaders)
#endif
// With an FP8 cache and 16 rows, pages as they lie in the cache (FLASHMLA_NARROW_LINEAR, kLinear; 0
// restores nine TMA boxes of 64-byte rows at a 576-byte stride, which the H200 reads 5-6 % slower,
// load-only, ab125): a page lands as one TMA box of its 64 whole 576-byte rows (the host's map reads
// rows as 4-byte words: variants.Variant.kv_box) in a ring of whole pages. S^T then takes K from
// registers (issue_scores_linear) and V^T's loads read rows (issue_output). On the H200 -3.3 % at
// h16/4k, -3.8 % at h16/16k, level at h16/1k and b8/h16/16k, exact (ab131). A linear bulk copy a page
// measured the same (ab128), but racecheck then reports every slot's refill as racing with its reads:
// it does not take one lane's release after __syncwarp as covering its warp's reads (it flags plain
// stores behind that release too), and it does not see TMA box writes at all, so the box keeps its
// report to the threads' own traffic (devtools/racecheck_bulk_repro.py, docs/PERF_NOTES.md).
#ifndef FLASHMLA_NARROW_LINEAR
#define FLASHMLA_NARROW_LINEAR 1
#endif
#if !defined(FLASHMLA_KV_E4M3) || FLASHMLA_NARROW_ROWS != 16
#undef FLASHMLA_NARROW_LINEAR
#define FLASHMLA_NARROW_LINEAR 0  // an FP8 cache's, 16 rows (with 32, K's registers spill)
#endif
// With an FP8 cache in boxes, one TMA barrier per page instead of one per box (kPageBarriers): on the
// H200 -2 % at h16/4k, -6 % at h32/8k (docs/PERF_NOTES.md, ab109, ab111). 0 restores the per-box
// barriers, which the load-only hook below needs (its 32-row storage is then 1 KB smaller, variants.py).
#ifndef FLASHMLA_NARROW_PAGE_BARRIER
#define FLASHMLA_NARROW_PAGE_BARRIER 1
#endif
#if !defined(FLASHMLA_KV_E4M3) || FLASHMLA_NARROW_LINEAR
#undef FLASHMLA_NARROW_PAGE_BARRIER
#define FLASHMLA_NARROW_PAGE_BARRIER 0  // an FP8 cache's only (a linear page has one barrier anyway)
#endif
constexpr bool kLinear = FLASHMLA_NARROW_LINEAR != 0;
// Pacing: a narrow kernel's loader holds a page while its CTA has issued more than FLASHMLA_NARROW_PACE
// pages past the average of the CTAs still issuing (GridPace). The H200 streams to some SMs (runs of
// neighbouring ids, likely whole GPCs) faster than to others: with one request a CTA, CTAs took pages at
// 0.8-0.95 us on those, 1.1-1.4 us elsewhere (load-only trace, h16/4k), and the slow ones then work off
// their backlog at the computing warpgroups' pace (0.93 us a page) while the rest have ended.
// On the H200, slack 2 against none on the linear kernel (ab152, docs/PERF_NOTES.md): h16/4k -3.2 %,
// h16/16k -1.9 %, b8/h16/16k -3.2 %, h16/1k -5.3 %, b2/h16/32k -5.0 %; slack 3 and 1 or 4 re-reads a page
// within 1 % of it. On the box loaders (32 rows, 16-bit caches), with the CTA counted once beside its two
// lanes: FP8 h32/8k -1.4 %, bf16 h16 -0.5 to -0.7 % (ab155-ab158; an earlier form that counted each lane
// as a CTA was +12 % at h32, ab150). Pacing only while most CTAs still issue was no better (ab157; its
// first form, with a CAS loop at every stop, +26 us, ab155). 0 switches it off.
// With 16 rows slack 1 (ab269, H200, against 2): FP8 h16/4k -2.0 %, h16/16k -1.2 %, h16/1k -1.5 %, bf16
// h16/4k -0.7 %, no 16-row cell slower. With 32 rows it stays 2: slack 1 there was +7.8 % (FP8 h32/8k, ab159).
// Half a page either side (ab270) was no better: 0.5 lost bf16 h16/16k 0.9 %, 1.5 lost FP8 h16/4k 2.2 %.
#ifndef FLASHMLA_NARROW_PACE
#if FLASHMLA_NARROW_ROWS == 16
#define FLASHMLA_NARROW_PACE 1
#else
#define FLASHMLA_NARROW_PACE 2
#endif
#endif
#ifndef FLASHMLA_NARROW_PACE_SPINS
#define FLASHMLA_NARROW_PACE_SPINS 2  // re-reads of the count a page at most (40: h16/16k +7.9 %, ab149)
#endif
constexpr int kPaceSlack = FLASHMLA_NARROW_PACE;
constexpr bool kPageBarrier = FLASHMLA_NARROW_PAGE_BARRIER != 0;
// An unmasked page's softmax passes one warpgroup barrier where no row's max moves (softmax_unmoved).
// With an FP8 cache on the H200 -5.6 % at h32/8k, -1 to -3 % on the other narrow FP8 cells
// (docs/PERF_NOTES.md, ab122, ab123); 0 restores two barriers a page. With a 16-bit cache (one
// computing warpgroup) it measured level (ab124: within 0.4 % on nine bf16/fp16 narrow cells, exact):
// those cells are bound by their loads, so it stays off there.
#ifndef FLASHMLA_NARROW_VOTE_MAX
#if defined(FLASHMLA_KV_E4M3)
#define FLASHMLA_NARROW_VOTE_MAX 1
#else
#define FLASHMLA_NARROW_VOTE_MAX 0
#endif
#endif
constexpr bool kVoteMax = FLASHMLA_NARROW_VOTE_MAX != 0;
constexpr int kNarrowRows = FLASHMLA_NARROW_ROWS;             // query rows per CTA: N of every wgmma
static_assert(kNarrowRows == 16 || kNarrowRows == 32, "N = 16 or 32");
constexpr int kNarrowBoxBytes = kNarrowRows * kRowBytes;      // a box of Q or P^T: N rows x 64 columns
constexpr int kNarrowWarps = kWarpgroupThreads / 32;          // warps of a computing warpgroup
#if defined(FLASHMLA_KV_E4M3)
// Two computing warpgroups, each taking every row and every other page of a piece. (For 32 rows, each
// taking 16 rows, or half the value columns, and every page measured 0.71 of FlashMLA FP8 at h32 against
// 0.97 this way: each warpgroup then runs every page's chain of waits.)
constexpr int kNarrowConsumers = 2;
#else
constexpr int kNarrowConsumers = 1;
#endif
constexpr int kConsumerThreads = kNarrowConsumers * kWarpgroupThreads;
// + the loader: a warp, or with two computing warpgroups a whole one (decode.cu's helper warpgroup) that
// hands its registers to them: 9 warps would leave ptxas 168 registers a thread (three warps on one SM
// sub-partition), and the computing warpgroups need more.
constexpr int kLoaderThreads = kNarrowConsumers > 1 ? kHelperThreads : 32;
constexpr int kNarrowThreads = kConsumerThreads + kLoaderThreads;
// Lanes issuing the loads (lane 0 of the loader's first warps) on a long part, taking the pages in turn
// (narrow_loader).
constexpr int kNarrowLoaders = kNarrowConsumers > 1 ? FLASHMLA_NARROW_LOADERS : 1;
// Registers a thread after the hand-over: with 32 rows O^T alone takes 128 of a computing thread's, and
// the loader (one lane issuing TMA loads) needs few.
constexpr int kNarrowLoaderRegisters = kNarrowRows > 16 ? 24 : kHelperRegisters;
constexpr int kNarrowConsumerRegisters = kNarrowRows > 16 ? 240 : kConsumerRegisters;
static_assert(2 * kNarrowConsumerRegisters + kNarrowLoaderRegisters == 3 * 168, "the registers handed over add up");
// All computing threads: the Q tile's reloads and the epilogue's exchanges.
constexpr NamedBarrier kBarrierConsumers = kNarrowConsumers > 1 ? kBarrierCta : kBarrierWarpgroup0;
constexpr int kValueTiles = kHeadDimV / kBoxCols;             // 8 M-tiles of O^T, one per V box
constexpr int kRowSlots = kNarrowRows / 4;                    // query rows a thread owns
constexpr int kAccumulators = kNarrowRows / 2;                // fp32 registers of one m64nN tile
// Measurement hooks (scripts/kernel_ab.py -D...; PERF_NOTES has what they showed): the loader alone,
// each page released as soon as it lands; or the computing warpgroups alone, on stale slots.
#ifndef FLASHMLA_LOAD_ONLY
#define FLASHMLA_LOAD_ONLY 0
#endif
#ifndef FLASHMLA_COMPUTE_ONLY
#define FLASHMLA_COMPUTE_ONLY 0
#endif
#if defined(FLASHMLA_KV_E4M3)
// An FP8 cache stays FP8 in shared memory: a box is 64 tokens x 64 one-byte columns, rows of 64 bytes,
// landed by one TMA load 64-byte swizzled (16-byte chunk c of row r at chunk c ^ (r / 2 % 4)): twice the
// pages in flight of a 16-bit cache.
constexpr int kRingBoxBytes = kFp8BoxBytes;               // 4 KB (decode_config.cuh: the FP8 box layout)
// The page barrier (switch above): a page's nine boxes complete one "page landed" barrier of a ring of
// kPageBarriers (one expect_tx per page for the loader lane, one wait for S^T) instead of their slots'.
// A lane arms page n's barrier once box 0's slot is free: that slot's last page (n - 5 or n - 6) has been
// through its warpgroup, and its own loads had waited for slots of a page of n's parity at most 11
// before n, so n's warpgroup has waited for page n - 16, this barrier's last phase.
constexpr int kPageBarriers = 16;
static_assert(!(kPageBarrier && FLASHMLA_LOAD_ONLY),
              "the load-only hook waits for each box's barrier: build it with -DFLASHMLA_NARROW_PAGE_BARRIER=0");
#else
constexpr int kRingBoxBytes = kBoxBytes;               // 8 KB, 128-byte swizzled as TMA lands it
#endif
#if defined(FLASHMLA_KV_E4M3)
constexpr int kQTileBytes = kBoxes * kNarrowRows * kBoxCols;  // e4m3 Q, 9 KB
#else
constexpr int kQTileBytes = kBoxes * kNarrowBoxBytes;
#endif
// The ring fills what the Q and P^T tiles, the handover buffer and the per-row fields leave of the 227 KB
// (a 1 KB margin for the other small fields).
#if defined(FLASHMLA_KV_E4M3)
// Two computing warpgroups merge their O at a piece's end through a buffer of their own: a round of
// two value tiles, 16 bytes per thread and float4.
constexpr int kHandoverBytes = 2 * (kNarrowRows / 2) * kWarpgroupThreads * 4;
#else
constexpr int kHandoverBytes = 0;
#endif
constexpr int kRowFieldBytes = 3 * kNarrowConsumers * kNarrowWarps * kNarrowRows * 4;  // warp_max, warp_sum
constexpr int kRingBoxes = (227 * 1024 - 1024 - kRowFieldBytes - kQTileBytes - kNarrowConsumers * kNarrowBoxBytes -
                            kHandoverBytes - 2048) /
                           kRingBoxBytes;
#if defined(FLASHMLA_KV_E4M3)
static_assert(!kPageBarrier || (kRingBoxes >= 4 * kBoxes && kRingBoxes < 6 * kBoxes),
              "the page barriers' arming argument (above) counts on these page distances");
#endif
// kLinear: the ring's bytes hold whole pages of 64 rows x 576 e4m3 bytes, page n of the CTA in slot
// n mod kLinearSlots (5 with 16 rows), each slot with an "empty" barrier (nine arrivals: the rope box's
// and each value box's, as with boxes); a page's one copy lands on a barrier of its own (PageSlot).
constexpr int kLinearPageBytes = kPageSize * kHeadDim;
constexpr int kLinearSlots = kRingBoxes * kRingBoxBytes / kLinearPageBytes;
static_assert(!kLinear || kLinearSlots >= 3, "a ring of three pages at least");

template <int N, bool kBf16> struct NarrowAtoms;
template <> struct NarrowAtoms<32, true> {
  using Scores = gmma::MMA_64x32x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
  using Output = gmma::MMA_64x32x16_F32BF16BF16_SS<gmma::Major::MN, gmma::Major::K>;
};
template <> struct NarrowAtoms<16, true> {
  using Scores = gmma::MMA_64x16x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
  using Output = gmma::MMA_64x16x16_F32BF16BF16_SS<gmma::Major::MN, gmma::Major::K>;
};
template <> struct NarrowAtoms<32, false> {
  using Scores = gmma::MMA_64x32x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
  using Output = gmma::MMA_64x32x16_F32F16F16_SS<gmma::Major::MN, gmma::Major::K>;
};
template <> struct NarrowAtoms<16, false> {
  using Scores = gmma::MMA_64x16x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>;
  using Output = gmma::MMA_64x16x16_F32F16F16_SS<gmma::Major::MN, gmma::Major::K>;
};
#if defined(FLASHMLA_BF16)
using MmaScoresT = NarrowAtoms<kNarrowRows, true>::Scores;
using MmaOutputT = NarrowAtoms<kNarrowRows, true>::Output;
#else
using MmaScoresT = NarrowAtoms<kNarrowRows, false>::Scores;
using MmaOutputT = NarrowAtoms<kNarrowRows, false>::Output;
#endif
#if defined(FLASHMLA_KV_E4M3)
#if !defined(FLASHMLA_Q_E4M3) || defined(FLASHMLA_BF16)
#error "the FP8 narrow kernel takes an e4m3 q (and computes PV in fp16)"
#endif
// S^T on FP8 wgmmas (k = 32), K and Q from shared memory; O^T += V^T P^T with V^T from registers (fp16,
// converted from the FP8 bytes).
template <int N> struct NarrowFp8Atoms;
template <> struct NarrowFp8Atoms<16> {
  using Scores = gmma::MMA_64x16x32_F32E4M3E4M3_SS_TN<>;
  using ScoresFromRegs = gmma::MMA_64x16x32_F32E4M3E4M3_RS_TN<>;
  using OutputFromRegs = gmma::MMA_64x16x16_F32F16F16_RS<gmma::Major::K, gmma::Major::K>;
};
template <> struct NarrowFp8Atoms<32> {
  using Scores = gmma::MMA_64x32x32_F32E4M3E4M3_SS_TN<>;
  using OutputFromRegs = gmma::MMA_64x32x16_F32F16F16_RS<gmma::Major::K, gmma::Major::K>;
};
using MmaScoresFp8 = NarrowFp8Atoms<kNarrowRows>::Scores;
using MmaOutputFromRegs = NarrowFp8Atoms<kNarrowRows>::OutputFromRegs;
constexpr int kFp8MmaK = 32;
constexpr int kFp8StepsPerBox = kBoxCols / kFp8MmaK;       // 2
constexpr int kFp8QBoxBytes = kNarrowRows * kFp8RowBytes;  // N rows x 64 e4m3 columns
#endif

// S^T's operands as they lie in shared memory, K's ring boxes and the Q tile's boxes alike: the wgmma
// atom, its k-steps per 64-column box (32 bytes of a row each), a Q box's bytes, a box's descriptor and
// where 16-byte chunk c of Q row r goes.
#if defined(FLASHMLA_KV_E4M3)
using ScoresAtom = MmaScoresFp8;
constexpr int kScoreStepsPerBox = kFp8StepsPerBox;
constexpr int kQBoxBytes = kFp8QBoxBytes;
__device__ __forceinline__ SmemDesc box_desc(const uint8_t* box) { return fp8_k_major_desc(box); }
__device__ __forceinline__ int q_chunk_offset(int r, int c) { return (c / 4) * kQBoxBytes + fp8_offset(r, c % 4); }
#else
using ScoresAtom = MmaScoresT;
constexpr int kScoreStepsPerBox = kStepsPerBox;
constexpr int kQBoxBytes = kNarrowBoxBytes;
__device__ __forceinline__ SmemDesc box_desc(const uint8_t* box) { return k_major_desc(box); }
__device__ __forceinline__ int q_chunk_offset(int r, int c) { return (c / 8) * kQBoxBytes + swizzled_offset(r, c % 8); }
#endif

struct NarrowStorage {
  alignas(1024) uint8_t q[kQTileBytes];                  // Q, 9 boxes of N rows x 64 columns
  alignas(1024) uint8_t ring[kRingBoxes][kRingBoxBytes]; // K/V boxes of 64 tokens x 64 columns
  alignas(1024) uint8_t p[kNarrowConsumers][kNarrowBoxBytes];  // [warpgroup] P^T of its page: N rows x 64 tokens
#if defined(FLASHMLA_KV_E4M3)
  alignas(16) uint8_t handover[kHandoverBytes];           // finish: warpgroup 1's O, two value tiles a round
#endif
  float warp_max[kNarrowConsumers][2][kNarrowWarps][kNarrowRows];  // [warpgroup][page parity][warp]: column maxima
  float warp_sum[kNarrowConsumers][kNarrowWarps][kNarrowRows];     // epilogue: each warp's share of the row sums
  PageStreamOf<1> stream[kNarrowLoaders];               // each loader lane's copy of the part's pages
#if defined(FLASHMLA_KV_E4M3)
#if FLASHMLA_NARROW_PAGE_BARRIER
  alignas(8) uint64_t page_landed[kPageBarriers];       // [page_seq % 16]: the page's boxes have landed
#endif
  int barriers_passed[kNarrowConsumers];                // finish: each warpgroup's own barriers
#endif
  float row_max[kNarrowConsumers][kNarrowRows];          // finish: each warpgroup's running max per row
  alignas(8) uint64_t full[kRingBoxes];
  uint64_t empty[kRingBoxes];
};
constexpr int kNarrowSharedBytes = int(sizeof(NarrowStorage)) + 1024;
static_assert(kNarrowSharedBytes <= 227 * 1024, "fits the SM's shared memory");

// Where box `box` of the n-th page this CTA reads lies in the ring, and the parity of that slot's use.
struct RingSlot {
  int slot, phase;
  __device__ __forceinline__ RingSlot(uint32_t page_seq, int box) {
    const uint32_t index = page_seq * kBoxes + box;
    slot = int(index % kRingBoxes);
    phase = int((index / kRingBoxes) & 1);
  }
};

// kLinear: where the n-th page this CTA reads lies (slot n mod kLinearSlots, released on that slot's
// empty barrier, `phase` the parity of the slot's use) and which barrier says it has landed: one of
// kLandedBarriers = 2 kLinearSlots (`landed`, parity `landed_phase`). A barrier per slot is not enough:
// with five slots, page n - 5 is the other warpgroup's, and copies complete out of order, so a
// warpgroup could reach page n before page n - 5 had landed, and a parity wait cannot tell that phase
// from page n's: it passed, the slot was released early and refilled while a copy still ran into it
// (ab127's launch failures; gone with the loader waiting for each page to land). Barrier n mod 10's
// previous phase is page n - 10's, whose slot the loader got back before issuing page n - 5, so before
// page n - 2, the warpgroup's previous page (or before the piece: all consumed at its request barrier).
constexpr int kLandedBarriers = 2 * kLinearSlots;
static_assert(!kLinear || kLandedBarriers <= kRingBoxes, "the landed barriers are the ring's full barriers");
struct PageSlot {
  int slot, phase, landed, landed_phase;
  __device__ __forceinline__ explicit PageSlot(uint32_t page_seq)
      : slot(int(page_seq % kLinearSlots)),
        phase(int((page_seq / kLinearSlots) & 1)),
        landed(int(page_seq % kLandedBarriers)),
        landed_phase(int((page_seq / kLandedBarriers) & 1)) {}
  __device__ __forceinline__ uint8_t* bytes(NarrowStorage& smem) const {
    return &smem.ring[0][0] + slot * kLinearPageBytes;
  }
};
// The empty barrier a box of page `page_seq` is released on.
__device__ __forceinline__ uint64_t* empty_barrier(NarrowStorage& smem, uint32_t page_seq, int box) {
  return kLinear ? &smem.empty[PageSlot(page_seq).slot] : &smem.empty[RingSlot(page_seq, box).slot];
}

// kLinear: the page row that M index m of S^T (a token of the page, and P^T's column m) reads. Rows
// keep their group of four and swap the middle two (0 1 3 2): the rows one V^T load takes (m = 2t + c
// for lanes t = 0..3 of a quad) then alternate between the two 64-byte halves of the banks, which a
// 576-byte row stride would otherwise put all on one (four-way conflicts), and the two rows of a phase
// of K's loads (m, m + 1) still fall on both halves.
__device__ __forceinline__ int linear_row(int m) { return m ^ ((m >> 1) & 1); }

// Accumulator coordinates of an m64nN tile (softmax.cuh's layout with M and N in these roles):
// register 4*j + 2*i + c holds M index 16*warp + lane/4 + 8*i and query row 8*j + 2*(lane%4) + c. Slot
// 2*j + c names the query row; i picks one of the thread's two M indices.
struct ColumnCoords {
  int m;             // first M index (a token of the page, or a value column inside a tile)
  int row[kRowSlots];   // query row of each slot
  __device__ __forceinline__ explicit ColumnCoords(int thread) {
    const int warp = thread / 32;
    const int lane = thread % 32;
    m = warp * 16 + lane / 4;
#pragma unroll
    for (int s = 0; s < kRowSlots; ++s) row[s] = 8 * (s / 2) + 2 * (lane % 4) + s % 2;
  }
  // Lanes 0..3 of a warp hold every query row between them.
  __device__ __forceinline__ bool publishes() const { return m % 16 == 0; }
};

struct ScoresT {
  float v[kAccumulators];
};
struct OutputT {
  float v[kValueTiles][kAccumulators];
};

// S^T = K Q^T over the 576 columns, box by box as the page's boxes land (with an FP8 cache on FP8
// wgmmas, K and the e4m3 Q tile as they are: nothing is converted). Committed, not awaited.
__device__ __forceinline__ void issue_scores(NarrowStorage& smem, uint32_t page_seq, ScoresT& s, int /*thread*/) {
  const SmemDesc q = box_desc(smem.q);
  fence_fragment(s.v);
  cute::warpgroup_arrive();
#if FLASHMLA_NARROW_PAGE_BARRIER && !FLASHMLA_COMPUTE_ONLY
  mbarrier_wait_uniform(&smem.page_landed[page_seq % kPageBarriers], (page_seq / kPageBarriers) & 1);
#endif
#pragma unroll
  for (int box = 0; box < kBoxes; ++box) {
    const RingSlot at(page_seq, box);
#if !FLASHMLA_COMPUTE_ONLY
    if (!kPageBarrier) mbarrier_wait_uniform(&smem.full[at.slot], at.phase);
#endif
    const SmemDesc k = box_desc(smem.ring[at.slot]);
#pragma unroll
    for (int i = 0; i < kScoreStepsPerBox; ++i) {
      const uint32_t in_box = i * 32;
      mma_ss<ScoresAtom>(k.at(in_box), q.at(box * kQBoxBytes + in_box), s.v, box > 0 || i > 0,
                         cuda::std::make_index_sequence<kAccumulators>{});
    }
  }
  cute::warpgroup_commit_batch();
  fence_fragment(s.v);
}

#if FLASHMLA_NARROW_LINEAR
// kLinear: S^T's A operand, K, from registers: a thread's rows are M indices m and m + 8 (page rows
// linear_row of them), and a 16-byte load of each row at column 64 g + 16 t (t = lane % 4) gives its four
// bytes of both rows for k-steps 2g and 2g + 1, once the k order inside each 64-column group is
// permuted: logical k 16 i + 4 t + b of step 2g + h is page column 64 g + 16 t + 8 h + 4 i + b. The Q
// tile is stored in that logical order (load_narrow_q). The registers stay read until the wait for S^T,
// so the caller holds them (run_pages). All 18 steps' at once (72 registers) make ptxas serialise every
// wgmma of the kernel (C7512), and 16, 14 or 12 sets spill: 10 sets, steps 0-7 go first as a batch of
// their own, and once it has completed (behind steps 8-9) their registers take steps 10-17.
constexpr int kScoreSteps = kHeadDim / kFp8MmaK;  // 18
constexpr int kKSets = 10;                        // step s in set s % kKSets
constexpr int kKFirst = kScoreSteps - kKSets;     // steps in the first batch, whose sets are reused
struct KFragments {
  uint32_t v[kKSets][4];
  // Held until here: an RS wgmma reads its A registers until it is awaited, which the compiler does
  // not see (as the PV's fragments, page_step).
  __device__ __forceinline__ void done() {
#pragma unroll
    for (int s = 0; s < kKSets; ++s) {
#pragma unroll
      for (int i = 0; i < 4; ++i) cute::warpgroup_fence_operand(v[s][i]);
    }
  }
};
using MmaScoresFromRegs = NarrowFp8Atoms<kNarrowRows>::ScoresFromRegs;

// K's registers for the two steps of 64-column group g (see above), into sets of steps mod kKSets.
__device__ __forceinline__ void load_k_group(const uint8_t* const (&row)[2], int g, KFragments& k) {
  uint4 word[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) word[r] = *reinterpret_cast<const uint4*>(row[r] + 64 * g);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t (&a)[4] = k.v[(2 * g + h) % kKSets];
    a[0] = (&word[0].x)[2 * h];
    a[1] = (&word[1].x)[2 * h];
    a[2] = (&word[0].x)[2 * h + 1];
    a[3] = (&word[1].x)[2 * h + 1];
#pragma unroll
    for (int i = 0; i < 4; ++i) cute::warpgroup_fence_operand(a[i]);
  }
}

// S^T of the page: nothing else may be in flight in the warpgroup (the wait between the batches).
__device__ __forceinline__ void issue_scores_linear(NarrowStorage& smem, uint32_t page_seq, ScoresT& s, int thread,
                                                    KFragments& k) {
  const PageSlot at(page_seq);
#if !FLASHMLA_COMPUTE_ONLY
  mbarrier_wait_uniform(&smem.full[at.landed], at.landed_phase);
#endif
  const int m = 16 * (thread / 32) + (thread % 32) / 4;
  const uint8_t* const page = at.bytes(smem) + 16 * (thread % 4);
  const uint8_t* const row[2] = {page + linear_row(m) * kHeadDim, page + linear_row(m + 8) * kHeadDim};
#pragma unroll
  for (int g = 0; g < kKSets / 2; ++g) load_k_group(row, g, k);
  const SmemDesc q = box_desc(smem.q);
  auto issue = [&](int first, int end) {
#pragma unroll
    for (int step = first; step < end; ++step) {
      mma_rs<MmaScoresFromRegs>(k.v[step % kKSets], q.at((step / 2) * kQBoxBytes + (step % 2) * 32), s.v, step > 0,
                                cuda::std::make_index_sequence<kAccumulators>{});
    }
    cute::warpgroup_commit_batch();
  };
  fence_fragment(s.v);
  cute::warpgroup_arrive();
  issue(0, kKFirst);
  issue(kKFirst, kKSets);
  cute::warpgroup_wait<1>();  // the first batch
#pragma unroll
  for (int step = 0; step < kKFirst; ++step) {
#pragma unroll
    for (int i = 0; i < 4; ++i) cute::warpgroup_fence_operand(k.v[step][i]);  // read until the wait above
  }
#pragma unroll
  for (int g = kKSets / 2; g < kScoreSteps / 2; ++g) load_k_group(row, g, k);
  cute::warpgroup_arrive();
  issue(kKSets, kScoreSteps);
  fence_fragment(s.v);
}
#else
struct KFragments {
  __device__ __forceinline__ void done() {}
};
#endif

// S^T of page `page_seq`, issued (committed, not awaited): from the ring's boxes, or with kLinear from
// K in registers that the caller keeps until it waits.
__device__ __forceinline__ void issue_page_scores(NarrowStorage& smem, uint32_t page_seq, ScoresT& s, int thread,
                                                  KFragments& k) {
#if FLASHMLA_NARROW_LINEAR
  issue_scores_linear(smem, page_seq, s, thread, k);
#else
  issue_scores(smem, page_seq, s, thread);
#endif
}


#if defined(FLASHMLA_KV_E4M3)
// The A fragments of PV: two sets of the eight value tiles' (issue_output). With 32 rows O^T takes 128
// registers a thread: one set then (each step's wgmmas awaited before the next step's fragments are
// built; the other warpgroup's keep the tensor cores busy meanwhile). One set with 16 rows measured level
// to +0.6 % (ab141, docs/PERF_NOTES.md).
constexpr int kFragmentSets = kNarrowRows == 16 ? 2 : 1;
static_assert(kFragmentSets == 1 || kFragmentSets == 2, "one or two sets of P V fragments");
using OutputFragments = uint32_t[kFragmentSets][kValueTiles][4];

// One P V k-step's wgmmas, V^T's fragments `a` built: O^T's tiles += a[t] P^T's rows at `p_step`. Committed.
__device__ __forceinline__ void issue_output_wgmmas(uint32_t (&a)[kValueTiles][4], uint64_t p_step, OutputT& o) {
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) fence_fragment(o.v[t]);
  cute::warpgroup_arrive();
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) {
    mma_rs<MmaOutputFromRegs>(a[t], p_step, o.v[t], cuda::std::make_index_sequence<kAccumulators>{});
  }
  cute::warpgroup_commit_batch();
}

// O^T += V^T P^T with V^T from registers; byte permutes pair each column's two tokens for the e4m3x2
// conversions. The thread's rows of O^T (value columns) are taken in the order its loads hand them out:
// row 16*warp + lane/4 + 8*i of tile t is value column value_column(t, i) (below). Stale tokens of the
// last page (>= valid; FP8 NaN there) become zeros. Two sets of fragments with 16 rows, the wgmmas of step
// s - 2 awaited before step s's are built; the last steps' are still running when this returns (the
// caller awaits them before `frags` go out of scope).
// - kLinear (576-byte page rows): value_column(t, i) = 128*warp + 16*(lane/4) + 2*t + i, so one 16-byte
//   load per token, behind a select, gives the thread's part of all eight tiles. (Transposed ldmatrix
//   reads 8 rows of one 16-byte column chunk, which a 576-byte stride puts on two bank quads: four-way.)
// - boxes (64-byte rows): value_column(t, i) = 128*warp + 16*t + 2*(lane/4) + i: tile t's fragments are
//   chunk t % 4 of box 2*warp + t/4 through transposed ldmatrix (dequant.cuh's load_columns_t), two 8 x 8
//   matrices a step (tokens 0-7 and 8-15), and the stale tokens come out of the permute's zero word.
#if FLASHMLA_NARROW_LINEAR
__device__ __forceinline__ void issue_output(NarrowStorage& smem, const uint8_t* p_tile, uint32_t page_seq,
                                             OutputT& o, int valid, int thread, OutputFragments& frags) {
  const SmemDesc p = k_major_desc(p_tile);
  const int warp = thread / 32;
  const int lane = thread % 32;
  // The thread's 16 columns of each page row (a 576-byte row; linear_row gives the token order).
  const uint8_t* columns = PageSlot(page_seq).bytes(smem) + 128 * warp + 16 * (lane / 4);
  constexpr int kRowStride = kHeadDim;
  const int pair = 2 * (lane % 4);  // tokens pair, pair + 1, pair + 8, pair + 9 of each 16-token step
#pragma unroll
  for (int step = 0; step < kPVSteps; ++step) {
    if (step >= kFragmentSets) cute::warpgroup_wait<kFragmentSets - 1>();
    uint4 v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int index = step * kMmaK + pair + (k % 2) + 8 * (k / 2);  // P^T's column
      const int token = linear_row(index);
      v[k] = token < valid ? *reinterpret_cast<const uint4*>(columns + token * kRowStride) : make_uint4(0, 0, 0, 0);
    }
    uint32_t (&a)[kValueTiles][4] = frags[step % kFragmentSets];
#pragma unroll
    for (int t = 0; t < kValueTiles; ++t) {
      const uint32_t selector = t % 2 == 0 ? 0x5140u : 0x7362u;  // bytes (2t, 2t + 1) of both tokens
      const uint32_t word[4] = {(&v[0].x)[t / 2], (&v[1].x)[t / 2], (&v[2].x)[t / 2], (&v[3].x)[t / 2]};
      column_pairs_to_fragment(a[t], __byte_perm(word[0], word[1], selector),   // tokens pair, pair + 1
                               __byte_perm(word[2], word[3], selector));  // tokens pair + 8, pair + 9
    }
    issue_output_wgmmas(a, p.at(step * kMmaK * 2), o);
  }
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) fence_fragment(o.v[t]);
}
#else
// One P V k-step's fragments from the boxes: lane l addresses row r = l % 8 (token 8 (m % 2) + r of the
// step) of matrix m = l / 8, chunk 2 j + m / 2 of the box in the j-th load of a box (tiles 4 b + 2 j, + 1);
// the token's swizzle phase is r / 2 (fp8_offset), and chunk 2 + x lies where chunk x does with the
// address's bit 5 flipped.
template <int kStep>
__device__ __forceinline__ void build_output_fragments(uint32_t (&a)[kValueTiles][4], uint32_t first_box,
                                                       uint32_t second_box, int valid) {
  const int lane = int(threadIdx.x % 32);
  const int m = lane / 8, r = lane % 8;
  const uint32_t row = (8 * (m % 2) + r) * kFp8RowBytes + (((m / 2) ^ (r / 2)) << 4);
  constexpr int kOffset = kStep * kMmaK * kFp8RowBytes;
  uint32_t d[4][4];  // [2 b + j][matrix]: tile 2 (2 b + j) + matrix / 2, tokens 8 (matrix % 2) ..
  load_columns_t<kOffset>(d[0], first_box + row);
  load_columns_t<kOffset>(d[1], (first_box + row) ^ 32);
  load_columns_t<kOffset>(d[2], second_box + row);
  load_columns_t<kOffset>(d[3], (second_box + row) ^ 32);
  fragments_from_columns(a, d, valid, kStep * kMmaK, lane);
}

template <int kStep>
__device__ __forceinline__ void issue_output_step(NarrowStorage& smem, const SmemDesc& p, uint32_t page_seq,
                                                  OutputT& o, int valid, int warp, OutputFragments& frags) {
  if constexpr (kStep >= kFragmentSets) cute::warpgroup_wait<kFragmentSets - 1>();
  uint32_t (&a)[kValueTiles][4] = frags[kStep % kFragmentSets];
  // The box addresses worked out again in each step: held between them they would take registers. Box
  // 2 warp + 1 lies in the ring slot after box 2 warp's (the first again after the last).
  const int slot = RingSlot(page_seq, 2 * warp).slot;
  build_output_fragments<kStep>(a, smem_addr(smem.ring[slot]), smem_addr(smem.ring[slot + 1 < kRingBoxes ? slot + 1 : 0]),
                                valid);
  issue_output_wgmmas(a, p.at(kStep * kMmaK * 2), o);
}

__device__ __forceinline__ void issue_output(NarrowStorage& smem, const uint8_t* p_tile, uint32_t page_seq,
                                             OutputT& o, int valid, int thread, OutputFragments& frags) {
  static_assert(kPVSteps == 4, "four k-steps a page");
  const SmemDesc p = k_major_desc(p_tile);
  const int warp = thread / 32;
  issue_output_step<0>(smem, p, page_seq, o, valid, warp, frags);
  issue_output_step<1>(smem, p, page_seq, o, valid, warp, frags);
  issue_output_step<2>(smem, p, page_seq, o, valid, warp, frags);
  issue_output_step<3>(smem, p, page_seq, o, valid, warp, frags);
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) fence_fragment(o.v[t]);
}
#endif

#else
// O^T += V^T P^T: value tile t is the page's V box t read MN-major (tokens are its rows); P^T is
// K-major (a row of 64 tokens per query row). Committed, not awaited.
__device__ __forceinline__ void issue_output(NarrowStorage& smem, uint32_t page_seq, OutputT& o) {
  const SmemDesc p = k_major_desc(smem.p[0]);
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) fence_fragment(o.v[t]);
  cute::warpgroup_arrive();
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) {
    const SmemDesc v(smem.ring[RingSlot(page_seq, t).slot], kBoxBytes, kSwizzleAtomBytes);
#pragma unroll
    for (int step = 0; step < kPVSteps; ++step) {
      mma_ss<MmaOutputT>(v.at(v_step_offset(step)), p.at(step * kMmaK * 2), o.v[t], true,
                         cuda::std::make_index_sequence<kAccumulators>{});
    }
  }
  cute::warpgroup_commit_batch();
#pragma unroll
  for (int t = 0; t < kValueTiles; ++t) fence_fragment(o.v[t]);
}

#endif

#if FLASHMLA_NARROW_LINEAR
// kLinear: page `block` of KV head `kv_head` into a ring slot as it lies in the cache, 64 rows of 576
// bytes: one box of `map`, whose boxes are 64 whole rows. A block index outside the cache loads block 0
// (with the guards on, its warpgroup has flagged the page already).
__device__ __forceinline__ void load_linear_page(const DecodeParams& p, const TensorMap* map, int block, int kv_head,
                                                 uint64_t* full, uint8_t* dst) {
  if (block < 0 || block >= p.num_blocks) block = 0;
  mbarrier_arrive_expect_tx(full, kLinearPageBytes);
  tma_load_box(map, full, dst, 0, kv_head, 0, block, kCacheHintEvictFirst);
}
#endif

#if FLASHMLA_NARROW_PACE
// The grid's pace: the pages issued by the CTAs still issuing (low word) and how many they are (high
// word), one read for both. A CTA that has issued its last page takes its pages and itself out, so a CTA
// with a longer part is not held against CTAs that have ended (varlen), and the count is back at zero
// when the last is out: the next launch, or a CUDA graph's replay, starts from zero. A module's count is
// shared by its launches on every stream of the device: concurrent launches pace each other loosely,
// never more than kPaceSpins reads a page (results never depend on it). C linkage: the GPU test finds it
// by this name.
extern "C" {
__device__ unsigned long long narrow_pace;
}
#endif
struct GridPace {
  static constexpr int kPaceSpins = FLASHMLA_NARROW_PACE_SPINS;  // each re-read a global round trip
  unsigned long long seen = 0;          // the count as last read (0 until the first page is issued)
  uint32_t mine = 0;                    // pages this lane issued
  // Only a grid of one wave (one CTA an SM, all resident): CTAs of a later wave would start behind.
  static __device__ __forceinline__ bool on() {
    if (kPaceSlack == 0) return false;
    uint32_t sms;
    asm("mov.u32 %0, %%nsmid;" : "=r"(sms));
    return gridDim.x * gridDim.y * gridDim.z <= sms;
  }
#if FLASHMLA_NARROW_PACE
  // The count: its high word the CTAs still issuing, its low word the pages they have issued.
  static constexpr unsigned long long kCta = 1ull << 32;
  static __device__ __forceinline__ uint32_t issuing(unsigned long long v) { return uint32_t(v >> 32); }
  static __device__ __forceinline__ unsigned long long read() {
    unsigned long long v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(&narrow_pace) : "memory");
    return v;
  }
  // `cta`: this lane counts its CTA (the box loaders' two lanes count it once; both add their pages).
  // Its CTA into the count, the sum not awaited: with `seen` 0 the first page passes hold, and the add's
  // round trip (128 CTAs on one word) stays off the first page's path (a trace of the awaited form: the
  // first page issued at 1.28 us, 0.42 unpaced; this form -0.3 to -1.3 %, ab153).
  __device__ __forceinline__ void start(bool cta) {
    if (cta) asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(&narrow_pace), "l"(kCta) : "memory");
  }
  // Before the CTA's page `loaded`: wait while the CTA is more than kPaceSlack pages past the average.
  __device__ __forceinline__ void hold(int loaded) {
    for (int spin = 0; spin < kPaceSpins; ++spin) {
      const uint32_t pages = uint32_t(seen), ctas = issuing(seen);
      if (uint32_t(loaded) * ctas <= pages + uint32_t(kPaceSlack) * ctas) return;
      __nanosleep(64);
      seen = read();
    }
  }
  __device__ __forceinline__ void issued() {
    ++mine;
    asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(&narrow_pace) : "memory");
    seen = read();  // awaited only at the next hold
  }
  // After the lane's last issue: its pages and its CTA out of the count.
  __device__ __forceinline__ void stop(bool cta) { atomicAdd(&narrow_pace, 0ull - ((cta ? kCta : 0ull) + mine)); }
#else
  __device__ __forceinline__ void start(bool) {}
  __device__ __forceinline__ void hold(int) {}
  __device__ __forceinline__ void issued() {}
  __device__ __forceinline__ void stop(bool) {}
#endif
};

// The loader: every page of the part in order, box by box into the ring, each slot as soon as the page
// that held it has been released. Right after the first page it asks L2 for the second (decode.cu's
// loader asks once its first page has landed; that order was measured there only).
// With an FP8 cache on a long part, kNarrowLoaders lanes (lane 0 of the loader's first warps) take the
// pages in turn, each following the whole page stream: one lane issued a page every ~2600 cycles at
// h16/4k (H200 trace: ~1900 of them the nine boxes' barrier operations and TMA issue, ~750 the stream's
// shared-memory bookkeeping, both slow while the computing warpgroups use shared memory), so the
// computing warpgroups waited for pages whose slots had long been free. On short parts the extra lane
// was slower (b8/h16/16k, h16/1k: +8 %), so they keep one. A page's ring slots and their uses are
// counted from its place in the part (RingSlot), whichever lane loads it; the lanes never run more than
// the ring apart, since each waits for the slots of pages the other loaded before. (Stepping over the
// other lane's pages without reading their block entries measured 1-2 % slower at h16: ab110, ab111.)
// The loaders write nothing the computing warpgroups read: a bad-page flag in shared memory, rewritten
// by a lane 8 pages on, was ordered after its readers only through another warp's release when two
// lanes took turns (racecheck: WAR hazards), so each warpgroup checks its pages' block entries itself.
__device__ __forceinline__ void narrow_loader(const DecodeParams& p, const PartPlan& part, NarrowStorage& smem,
                                              const TensorMap* map, int kv_head, int lane_index) {
  if (FLASHMLA_COMPUTE_ONLY) return;
  const int lanes = !kLinear && part.payload >= kLongPartPages ? kNarrowLoaders : 1;
  if (lane_index >= lanes) return;
  PageStreamOf<1>& stream = smem.stream[lane_index];
  stream.start(p, part, 0);
#if !FLASHMLA_NARROW_LINEAR
  const uint64_t hint = cache_load_hint(part.payload, 1);  // the boxes' L2 policy (a linear page: evict-first)
#endif
  Tracer trace(kNarrowConsumers, lane_index);  // FLASHMLA_TRACE only: how long a lane waits for free slots
  trace.mark(kMarkKernelStart);
  const bool paced = GridPace::on();
  GridPace pace;
  const bool counts_cta = lane_index == 0;  // the box loaders' two lanes count their CTA once
  if (paced) pace.start(counts_cta);
  for (int loaded = 0; stream.valid(); ++loaded) {
    bool flagged;
    const int block = stream.block_index(p, flagged);  // a bad page loads block 0; its warpgroup checks the entry
    // The next page's block entry comes in while this page's slots are awaited: read after the boxes
    // were issued, it held the loader back from slots freed meanwhile (2-4 % on the long FP8 cells).
    stream.advance(p, part);
    if (loaded % lanes != lane_index) continue;
    trace.mark(kMarkBlockIndexed);
    if (paced) pace.hold(loaded);
    trace.mark(kMarkPaceHeld);
#if FLASHMLA_NARROW_LINEAR
    const PageSlot at(loaded);
    if (loaded >= kLinearSlots) mbarrier_wait_single(&smem.empty[at.slot], at.phase ^ 1);
    load_linear_page(p, map, block, kv_head, &smem.full[at.landed], at.bytes(smem));
#else
#pragma unroll 1
    for (int box = 0; box < kBoxes; ++box) {
      const RingSlot at(loaded, box);
      if (loaded * kBoxes + box >= kRingBoxes) mbarrier_wait_single(&smem.empty[at.slot], at.phase ^ 1);
#if FLASHMLA_NARROW_PAGE_BARRIER
      uint64_t* landed = &smem.page_landed[loaded % kPageBarriers];  // armed once box 0's slot is free
      if (box == 0) mbarrier_arrive_expect_tx(landed, kBoxes * kRingBoxBytes);
#else
      uint64_t* landed = &smem.full[at.slot];
      mbarrier_arrive_expect_tx(landed, kRingBoxBytes);
#endif
      tma_load_box(map, landed, smem.ring[at.slot], box * kBoxCols, kv_head, 0, block, hint);
    }
#endif
    trace.mark(kMarkBoxesIssued);
    if (paced) pace.issued();
    if (loaded == 0 && stream.valid()) {
      const int next = stream.block_index(p, flagged);
      if (next >= 0 && next < p.num_blocks) {
        if (kLinear) {
          tma_prefetch_box(map, 0, kv_head, 0, next);  // the whole page: one box (ab132: -1 to -2 % on short parts)
        } else {
          constexpr uint32_t kAllBoxes = (1u << kBoxes) - 1;
          prefetch_page_boxes<1>(map, kAllBoxes, next, kv_head);  // whole boxes
        }
      }
    }
  }
  if (paced) pace.stop(counts_cta);
}

// The Q tile of one request and KV head, as stored (16-bit, or e4m3 with an FP8 cache) and laid out as
// the K boxes: tile row r is packed row rows_base + r; rows past p.rows are zeros. The computing
// warpgroup's threads copy it; the caller fences and synchronises.
__device__ __forceinline__ void load_narrow_q(const DecodeParams& p, NarrowStorage& smem, int request, int kv_head,
                                              int rows_base, int thread) {
  constexpr int kPerChunk = 16 / sizeof(QElement);
  constexpr int kChunksPerRow = kHeadDim / kPerChunk;
  const QElement* q = static_cast<const QElement*>(p.q);
  for (int idx = thread; idx < kNarrowRows * kChunksPerRow; idx += kConsumerThreads) {
    const int r = idx / kChunksPerRow;
    const int c = idx % kChunksPerRow;
    const int row = rows_base + r;
    const QElement* src = query_row_at(p, q, request, kv_head, row, c * kPerChunk);
#if FLASHMLA_NARROW_LINEAR
    // issue_scores_linear's k order: word w of 16-byte chunk 4g + t goes to bytes 4t.. of chunk 4g + w.
    const uint4 chunk = row < p.rows ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      *reinterpret_cast<uint32_t*>(smem.q + q_chunk_offset(r, c - c % 4 + w) + 4 * (c % 4)) = (&chunk.x)[w];
    }
#else
    async_copy_16(smem.q + q_chunk_offset(r, c), src, row < p.rows ? 16 : 0);
#endif
  }
  async_copy_commit();
  async_copy_wait_all();
}

// One piece: the pages of one request in this part, then its rows written.
struct NarrowPiece {
  const DecodeParams& p;
  NarrowStorage& smem;
  Piece piece;
  ColumnCoords at;
  int thread, wg, kv_head, rows_base;  // thread: within its warpgroup; wg: which computing warpgroup
  int mask_from;       // pages reaching past this token need the masked softmax
  float max[kRowSlots];   // running max per slot (scaled, base 2): the same in every thread holding the row
  float sum[kRowSlots];   // this thread's share of the row sums, relative to `max`
  int barriers = 0;       // FP8: this warpgroup's own barriers passed in the piece (finish)

  __device__ __forceinline__ NarrowPiece(const DecodeParams& params, NarrowStorage& s, const Piece& pc, int t,
                                         int group, int head, int base)
      : p(params), smem(s), piece(pc), at(t), thread(t), wg(group), kv_head(head), rows_base(base) {
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      max[k] = kInitialMax;
      sum[k] = 0.f;
    }
    mask_from = mask_from_token(p, piece.seqlen);
  }

  // This warpgroup's index (a constant 0 with one computing warpgroup), and its own barrier.
  __device__ __forceinline__ int consumer() const { return kNarrowConsumers > 1 ? wg : 0; }
  __device__ __forceinline__ void warpgroup_sync() const {
    named_barrier_sync(NamedBarrier(kBarrierWarpgroup0 + consumer()), kWarpgroupThreads);
  }

  // O's columns (query rows) times each row slot's factor.
  static __device__ __forceinline__ void scale_rows(OutputT& o, const float (&factor)[kRowSlots]) {
#pragma unroll
    for (int t = 0; t < kValueTiles; ++t) {
#pragma unroll
      for (int k = 0; k < kRowSlots; ++k) {
        o.v[t][reg_of(k, 0)] *= factor[k];
        o.v[t][reg_of(k, 1)] *= factor[k];
      }
    }
  }

  // Scores of page `page` (in s) -> P^T in smem, the running max moved where a row's page max exceeds
  // it by more than kMaxSlack (softmax.cuh), O and the sums following it.
  template <bool kMasked>
  __device__ __forceinline__ void softmax(ScoresT& s, int page, float scale_log2, OutputT& o, bool bad) {
    const int token0 = page * kPageSize + (kLinear ? linear_row(at.m) : at.m);  // + 8 i: the thread's other M index
    // Visible tokens of each slot's query row, worked out only where masking needs them: held through
    // the pages they would cost registers (with 32 rows O^T alone takes 128).
    int limit[kRowSlots];
    if (kMasked) row_limits(p, piece.seqlen, rows_base, at.row, limit);
    const int parity = (page / kNarrowConsumers) & 1;  // this warpgroup's pages alternate
    float page_max[kRowSlots];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      float m = -positive_infinity();
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float& x = s.v[reg_of(k, i)];
        if (kMasked && token0 + 8 * i >= limit[k]) x = -positive_infinity();
        if (kMasked && bad) x = quiet_nan();  // a flagged FP8 page: its request's rows come out NaN
        m = fmaxf(m, x);
      }
      page_max[k] = octet_max(m);
    }
    const int warp = thread / 32;
    if (at.publishes()) {
#pragma unroll
      for (int k = 0; k < kRowSlots; ++k) smem.warp_max[consumer()][parity][warp][at.row[k]] = page_max[k];
    }
    warpgroup_sync();
    float factor[kRowSlots];
    bool moved = false;
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      float m = smem.warp_max[consumer()][parity][0][at.row[k]];
#pragma unroll
      for (int w = 1; w < kNarrowWarps; ++w) m = fmaxf(m, smem.warp_max[consumer()][parity][w][at.row[k]]);
      const float scaled = m * scale_log2;
      const float to = scaled > max[k] + kMaxSlack ? scaled : max[k];
      factor[k] = fast_exp2(max[k] - to);
      moved |= to != max[k];
      max[k] = to;
    }
    // Every thread sees every row's max (the warps read the same values): uniform across the warpgroup.
    if (__any_sync(0xffffffffu, moved)) scale_rows(o, factor);
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      float page_sum = 0.f;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float& x = s.v[reg_of(k, i)];
        x = fast_exp2(fmaf(x, scale_log2, -max[k]));
        page_sum += x;
      }
      sum[k] = sum[k] * factor[k] + page_sum;
    }
    store_probabilities(s.v);
  }

  // P^T[row][token], 128-byte swizzled rows of 64 tokens. A slot's row is 8 (k / 2) + at.row[k % 2],
  // so its swizzle phase (row & 7) is that of slot k % 2: four offsets serve every slot, the rest
  // are constants (with 32 rows, sixteen addresses held through the pages would spill).
  __device__ __forceinline__ void store_probabilities(const float (&v)[kAccumulators]) {
    uint8_t* const tile = smem.p[consumer()];
    int offset[2][2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int token = at.m + 8 * i;
        offset[c][i] = at.row[c] * kRowBytes + (((token / 8) ^ (at.row[c] & 7)) << 4) + (token % 8) * 2;
      }
    }
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        *reinterpret_cast<Element*>(tile + offset[k % 2][i] + 8 * (k / 2) * kRowBytes) =
            to_element2(v[reg_of(k, i)], 0.f).x;
      }
    }
  }

  // An unmasked page's softmax with one warpgroup barrier instead of softmax's two, where no row's running
  // max moves (the common case past a piece's first pages; kVoteMax): P^T from the running max as it is,
  // and one barrier that both publishes P^T and asks whether any thread saw a score past the slack. The
  // result is softmax<false>'s where nothing moves. False (s untouched, P^T to be rewritten) when a
  // score did move a max: softmax<false> then.
  __device__ __forceinline__ bool softmax_unmoved(const ScoresT& s, float scale_log2) {
    float probs[kAccumulators];
    float page_sum[kRowSlots];
    bool moves = false;
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      page_sum[k] = 0.f;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float x = s.v[reg_of(k, i)];
        moves |= x * scale_log2 > max[k] + kMaxSlack;
        probs[reg_of(k, i)] = fast_exp2(fmaf(x, scale_log2, -max[k]));
        page_sum[k] += probs[reg_of(k, i)];
      }
    }
    store_probabilities(probs);
    fence_generic_to_async_smem();
    if (__any_sync(0xffffffffu, named_barrier_any(NamedBarrier(kBarrierWarpgroup0 + consumer()), kWarpgroupThreads, moves))) {
      return false;
    }
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) sum[k] += page_sum[k];
    return true;
  }

  // The page's softmax, its P^T published to the warpgroup (past its barrier): with kVoteMax an unmasked
  // page tries softmax_unmoved first; otherwise, or where a max moved, softmax<masked>, then
  // `before_publish` (what else must be written before the barrier) and the barrier. With two computing
  // warpgroups `barriers` counts the warpgroup's own barriers it passed: 1, 2 or 3 (finish).
  template <typename BeforePublish>
  __device__ __forceinline__ void publish_probabilities(ScoresT& s, int page, float scale_log2, OutputT& o, bool masked,
                                                       bool bad, BeforePublish&& before_publish) {
    bool published = false;
    if (kVoteMax && !masked) {
      published = softmax_unmoved(s, scale_log2);
      if (kNarrowConsumers > 1) ++barriers;
    }
    if (!published) {
      if (masked) {
        softmax<true>(s, page, scale_log2, o, bad);
      } else {
        softmax<false>(s, page, scale_log2, o, false);
      }
      before_publish();
      fence_generic_to_async_smem();
      warpgroup_sync();
      if (kNarrowConsumers > 1) barriers += 2;
    }
  }

#if !defined(FLASHMLA_KV_E4M3)
  // Zero the V rows of the last page's stale tokens (they may hold NaN, and 0 * NaN = NaN). Whole
  // 128-byte rows, which is independent of the swizzle; `valid` is clamped, so lengths that disagree with
  // the plan never write outside the ring.
  __device__ __forceinline__ void clear_stale_rows(int page, uint32_t page_seq) {
    const int valid = piece.seqlen - page * kPageSize;
    if (valid >= kPageSize) return;
    const int first = valid > 0 ? valid * kRowBytes : 0;
    constexpr int kTileChunks = kBoxBytes / 16;
#pragma unroll
    for (int t = 0; t < kValueTiles; ++t) {
      uint8_t* box = smem.ring[RingSlot(page_seq, t).slot];
      for (int offset = first + thread * 16; offset < kTileChunks * 16; offset += kWarpgroupThreads * 16) {
        *reinterpret_cast<uint4*>(box + offset) = make_uint4(0, 0, 0, 0);
      }
    }
  }
#endif

  // The page's slots are done with (its PV has completed): to the loader.
  __device__ __forceinline__ void release(uint32_t page_seq) const {
    if (!FLASHMLA_COMPUTE_ONLY && thread == 0) {
#pragma unroll
      for (int box = 0; box < kBoxes; ++box) mbarrier_arrive(empty_barrier(smem, page_seq, box));
    }
  }

#if defined(FLASHMLA_KV_E4M3)
  // With an FP8 cache a slot goes back to the loader as soon as nothing reads it any more, which keeps
  // more of the ring in flight: the rope box once S^T has completed; each warp's two value boxes once the
  // warp holds them in registers (PV reads no slot: its A operand is the converted registers).
  __device__ __forceinline__ void release_rope(uint32_t page_seq) const {
    if (!FLASHMLA_COMPUTE_ONLY && thread == 0) mbarrier_arrive(empty_barrier(smem, page_seq, kBoxes - 1));
  }
  __device__ __forceinline__ void release_values(uint32_t page_seq) const {
    __syncwarp();  // every lane's loads of the warp's boxes are done
    const int lane = thread % 32;
    if (!FLASHMLA_COMPUTE_ONLY && lane < 2) mbarrier_arrive(empty_barrier(smem, page_seq, 2 * (thread / 32) + lane));
  }
#endif

#if defined(FLASHMLA_KV_E4M3)
  // One page whose S^T is in flight: its softmax and PV, with kNext the next page's S^T issued behind
  // the PV; its slots go back as soon as they are read. The PV is awaited here, not at the next step:
  // its A fragments live in registers of this function. `block` holds the page's block-table entry
  // (kFlagBadPages), and on return the next page's, read a step ahead of its use.
  template <bool kNext>
  __device__ __forceinline__ void page_step(ScoresT& s, int page, uint32_t page_seq, float scale_log2, OutputT& o,
                                            int& block, KFragments& k, Tracer& trace) {
    trace.mark(kMarkPairStart);
    const bool bad = kFlagBadPages && bad_block(p, page, block);
    if (kFlagBadPages && kNext) block = block_entry(p, piece.request, page + kNarrowConsumers);
    cute::warpgroup_wait<0>();
    k.done();  // kLinear: S^T has read K's registers
    trace.mark(kMarkScoresIn);
    release_rope(page_seq);
    const bool masked = bad || page * kPageSize + kPageSize > mask_from;
    publish_probabilities(s, page, scale_log2, o, masked, bad, [] {});
    trace.mark(kMarkProbsPublished);
    OutputFragments frags;
    issue_output(smem, smem.p[wg], page_seq, o, piece.seqlen - page * kPageSize, thread, frags);
    release_values(page_seq);
    trace.mark(kMarkOwnPvDone);
    auto pv_done = [&] {
#pragma unroll
      for (int b = 0; b < kFragmentSets; ++b) {
#pragma unroll
        for (int t = 0; t < kValueTiles; ++t) {
#pragma unroll
          for (int r = 0; r < 4; ++r) cute::warpgroup_fence_operand(frags[b][t][r]);  // live until here
        }
      }
    };
    // K's registers would add to the PV's fragments. (The next S^T issued before the PV completes, both
    // live, made the computing warpgroups alone 5 % faster and the whole kernel no faster: ab141, ab142.)
    constexpr bool kPvFirst = kLinear && kNext;
    if constexpr (kPvFirst) {
      cute::warpgroup_wait<0>();
      pv_done();
    }
    if constexpr (kNext) issue_page_scores(smem, page_seq + kNarrowConsumers, s, thread, k);  // its next page
    trace.mark(kMarkScoresIssued);
    if constexpr (!kPvFirst) {
      cute::warpgroup_wait<kNext ? 1 : 0>();  // the PV (the next S^T may still run)
      pv_done();
    }
    trace.mark(kMarkRemotePvDone);
  }

  // This warpgroup's pages of the piece: every other one, from page_begin + wg. `page_seq` counts the
  // pages this CTA read (both warpgroups'), and goes past the whole piece.
  __device__ __forceinline__ void run_pages(uint32_t& page_seq, float scale_log2, OutputT& o, Tracer& trace) {
    int page = piece.page_begin + wg;
    uint32_t seq = page_seq + wg;
#if FLASHMLA_LOAD_ONLY
    // Experiment: the loader alone; each page released as soon as it has landed.
    for (; page < piece.page_end; page += kNarrowConsumers, seq += kNarrowConsumers) {
      if (kLinear) {
        const PageSlot at(seq);
        mbarrier_wait_uniform(&smem.full[at.landed], at.landed_phase);
      } else {
        for (int box = 0; box < kBoxes; ++box) {
          const RingSlot at(seq, box);
          mbarrier_wait_uniform(&smem.full[at.slot], at.phase);
        }
      }
      trace.mark(kMarkScoresIn);
      release(seq);
    }
    page = piece.page_end;
#endif
    if (page < piece.page_end) {
      int block = kFlagBadPages ? block_entry(p, piece.request, page) : 0;
      ScoresT s;
      KFragments k;  // kLinear: S^T's A operand, read by its wgmmas until the next page_step's wait
      issue_page_scores(smem, seq, s, thread, k);
      for (; page + kNarrowConsumers < piece.page_end; page += kNarrowConsumers, seq += kNarrowConsumers) {
        page_step<true>(s, page, seq, scale_log2, o, block, k, trace);
      }
      page_step<false>(s, page, seq, scale_log2, o, block, k, trace);
    }
    if (wg == 1 && (piece.page_end - piece.page_begin) % 2 == 1) {
      // Warpgroup 0 took one page more: pass as many barriers as it did. Nothing needs them, but
      // compute-sanitizer's racecheck reports false WAR hazards in finish's merge when the two
      // warpgroups have passed different numbers of their own barriers (shown on a 60-line kernel:
      // benchmarks/results/2026-11-30-h200-2wg-racecheck-investigation.txt). With kVoteMax a page
      // takes one or three, so finish evens them out.
      if (!kVoteMax) {
        warpgroup_sync();
        warpgroup_sync();
      }
      __syncwarp();
    }
    page_seq += piece.page_end - piece.page_begin;
  }

  // The piece's end, both warpgroups: their O, max and sums merged, and the rows written by warpgroup 0
  // (out / lse, or the partial buffers of a split request). Warpgroup 1 moves its O to the rows' common
  // max (scale_rows) and hands it over through the handover buffer, two value tiles a round, in its
  // register order (the two warpgroups' accumulator layouts are the same); warpgroup 0 moves its own in
  // the multiply-add that takes it in, then normalises and writes every row.
  //
  // This code runs once a piece, so its instructions are fetched cold (not in the SM's instruction cache;
  // after the benchmark's L2 flush not in L2 either), and that fetch is most of its time (ncu:
  // no_instruction). Hence the short form: the rows' scalars worked out once, a lane a row
  // (row_scalars), and a slot's code only its multiplies and stores. On the H200 the earlier form (~190
  // instructions a row slot) spent ~14 us of FP8 q1-h32/1k's ~42 in this epilogue (docs/PERF_NOTES.md).
  // Both warpgroups swapping halves and each writing its own measured ~0.5 % faster still, but spilled
  // under NVRTC 13.5, as did the normaliser folded into the hand-over's multiplies (row_scalars before it).
  __device__ __forceinline__ void finish(OutputT& o, float out_scale, Tracer& trace) {
    if constexpr (kVoteMax) {
      // The warpgroup that passed fewer barriers of its own in the piece passes the difference: with
      // different counts, compute-sanitizer's racecheck reports false WAR hazards in the exchanges below
      // (benchmarks/results/2026-11-30-h200-2wg-racecheck-investigation.txt). The counts go through
      // atomics: racecheck flagged plain stores and loads of them across the consumers' barrier too.
      if (thread == 0) atomicExch(&smem.barriers_passed[wg], barriers);
      named_barrier_sync(kBarrierConsumers, kConsumerThreads);
      const int other = atomicAdd(&smem.barriers_passed[wg ^ 1], 0);
      for (int n = barriers; n < other; ++n) warpgroup_sync();
    }
    publish_max();
    named_barrier_sync(kBarrierConsumers, kConsumerThreads);
    float factor[kRowSlots];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      const float common = fmaxf(smem.row_max[0][at.row[k]], smem.row_max[1][at.row[k]]);
      factor[k] = fast_exp2(max[k] - common);
    }
    publish_sums(o, factor);
    named_barrier_sync(kBarrierConsumers, kConsumerThreads);
    trace.mark(kMarkSumsExchanged);
    if (!piece.writable) return;
    if (wg == 1) scale_rows(o, factor);
    constexpr int kQuads = kAccumulators / 4;  // float4s of one tile
    constexpr int kTilesPerRound = 2;
    static_assert(kTilesPerRound * kQuads * kWarpgroupThreads * 16 == kHandoverBytes, "a round fills the buffer");
    float4* handover = reinterpret_cast<float4*>(smem.handover);  // [quad of the round][thread]
#pragma unroll
    for (int round = 0; round < kValueTiles / kTilesPerRound; ++round) {
      if (round > 0) named_barrier_sync(kBarrierConsumers, kConsumerThreads);  // the last round was read
      if (wg == 1) {
#pragma unroll
        for (int i = 0; i < kTilesPerRound * kQuads; ++i) {
          const float* v = &o.v[round * kTilesPerRound + i / kQuads][4 * (i % kQuads)];
          handover[i * kWarpgroupThreads + thread] = make_float4(v[0], v[1], v[2], v[3]);
        }
      }
      named_barrier_sync(kBarrierConsumers, kConsumerThreads);
      if (wg == 0) {
#pragma unroll
        for (int i = 0; i < kTilesPerRound * kQuads; ++i) {
          float* v = &o.v[round * kTilesPerRound + i / kQuads][4 * (i % kQuads)];
          const float4 other = handover[i * kWarpgroupThreads + thread];
          const int q = i % kQuads;  // register 4 q + c is slot 2 q + c % 2 (ColumnCoords)
          v[0] = fmaf(v[0], factor[2 * q], other.x);
          v[1] = fmaf(v[1], factor[2 * q + 1], other.y);
          v[2] = fmaf(v[2], factor[2 * q], other.z);
          v[3] = fmaf(v[3], factor[2 * q + 1], other.w);
        }
      }
    }
    if (wg == 0) write_rows(o, out_scale, trace);
  }
#else
  // One page whose S^T is in flight (behind the previous page's PV, if any): its softmax and PV, and
  // with kNext the next page's S^T issued behind that PV. `page_seq` counts the pages this CTA read.
  template <bool kNext>
  __device__ __forceinline__ void page_step(ScoresT& s, int page, uint32_t page_seq, float scale_log2, OutputT& o) {
    if (page > piece.page_begin) {
      cute::warpgroup_wait<1>();  // the previous page's PV: its slots are free
      release(page_seq - 1);
    }
    cute::warpgroup_wait<0>();
    // (softmax_unmoved takes unmasked pages only, which have no stale rows: clear_stale_rows only touches
    // the piece's last page.)
    publish_probabilities(s, page, scale_log2, o, page * kPageSize + kPageSize > mask_from, false,
                          [&] { clear_stale_rows(page, page_seq); });
    issue_output(smem, page_seq, o);
    if constexpr (kNext) issue_scores(smem, page_seq + 1, s, thread);
  }
#endif

#if !defined(FLASHMLA_KV_E4M3)
  // Normalise and write the piece's rows: out / lse, or the partial buffers of a split request. As the
  // FP8 kernel's finish (above), in the short form: this code is fetched cold.
  __device__ __forceinline__ void finish(OutputT& o, float out_scale, Tracer& trace) {
    float factor[kRowSlots];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) factor[k] = 1.f;
    publish_sums(o, factor);
    publish_max();
    named_barrier_sync(kBarrierConsumers, kConsumerThreads);
    trace.mark(kMarkSumsExchanged);
    if (!piece.writable) return;
    write_rows(o, out_scale, trace);
  }
#endif

  // This warpgroup's running max of each row into row_max: lanes 0-3 of warp 0 hold every row between them.
  __device__ __forceinline__ void publish_max() const {
    if (thread < 32 && at.publishes()) {
#pragma unroll
      for (int k = 0; k < kRowSlots; ++k) smem.row_max[consumer()][at.row[k]] = max[k];
    }
  }

  // The merged O (warpgroup 0's, relative to each row's final max) normalised and written, with the lse:
  // out, or the partial buffers of a split piece. After publish_sums, publish_max and a barrier.
  __device__ __forceinline__ void write_rows(OutputT& o, float out_scale, Tracer& trace) {
    const RowScalars rows = row_scalars(out_scale);
    trace.mark(kMarkLseStored);
    float inv[kRowSlots];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) inv[k] = __shfl_sync(0xffffffffu, rows.inv, at.row[k]);
    scale_rows(o, inv);
    store_tiles(o, rows.offset);
    trace.mark(kMarkOutputStored);
  }

  // Each warp's share of the row sums (moved by `factor` to the rows' common max) into warp_sum.
  __device__ __forceinline__ void publish_sums(const OutputT& o, const float (&factor)[kRowSlots]) {
    const int warp = thread / 32;
    float share[kRowSlots];
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      // A bad page (TMA's NaN fill) makes O NaN: carry it into the sums, as decode.cu does.
      share[k] = octet_sum(sum[k] * factor[k] + 0.f * o.v[0][reg_of(k, 0)]);
    }
    if (at.publishes()) {  // warp_sum's readers of the previous piece passed the piece's first barrier
#pragma unroll
      for (int k = 0; k < kRowSlots; ++k) smem.warp_sum[consumer()][warp][at.row[k]] = share[k];
    }
  }

  // Row r's normaliser and where it goes in lane r % kNarrowRows of every warp (which then need no
  // barrier before the slots' threads shuffle them over); warp 0 of warpgroup 0 writes the lse. After
  // publish_sums, publish_max and a barrier. `offset`: the row's first element counted from the piece's
  // block of rows (its slot's in out_partial, its request's in out: store_tiles), so that it shuffles as
  // 32 bits; -1 past p.rows.
  struct RowScalars {
    float inv;
    int offset;
  };
  __device__ __forceinline__ RowScalars row_scalars(float out_scale) const {
    const int lane = thread % 32;
    const int r = lane % kNarrowRows;
    const int row = rows_base + r;
    float total = 0.f;
#pragma unroll
    for (int c = 0; c < kNarrowConsumers; ++c) {
#pragma unroll
      for (int w = 0; w < kNarrowWarps; ++w) total += smem.warp_sum[c][w][r];
    }
    RowScalars out{total == 0.f ? 0.f : out_scale / total, -1};
    if (row < p.rows) {
      PackedQuery query{};  // a single piece's rows only
      if (piece.split) {
        out.offset = row * kHeadDimV;
      } else {
        query = packed_query(p, kv_head, row);
        out.offset = (query.s * p.heads_q + query.head) * kHeadDimV;
      }
      if (consumer() == 0 && thread == lane && lane < kNarrowRows) {
        float row_max = smem.row_max[0][r];
#pragma unroll
        for (int c = 1; c < kNarrowConsumers; ++c) row_max = fmaxf(row_max, smem.row_max[c][r]);
        store_row_lse(p, piece, kv_head, row, row_max, total, &query);
      }
    }
    return out;
  }

  // `o` (normalised) into each of the thread's rows: out's element type, or fp32 partial rows when the
  // piece is split. `offset`: row_scalars' (lane r's, for row r).
  __device__ __forceinline__ void store_tiles(const OutputT& o, int offset) const {
    if (piece.split) {
      store_tiles_as(o, offset, p.out_partial + (int64_t(piece.slot) * p.heads_kv + kv_head) * p.rows * kHeadDimV);
    } else {
      store_tiles_as(o, offset, static_cast<OutElement*>(p.out) + int64_t(piece.request) * p.seqlen_q * p.heads_q * kHeadDimV);
    }
  }
  template <class T>
  __device__ __forceinline__ void store_tiles_as(const OutputT& o, int offset, T* dst) const {
    const int warp = thread / 32;
#pragma unroll
    for (int k = 0; k < kRowSlots; ++k) {
      const int row_offset = __shfl_sync(0xffffffffu, offset, at.row[k]);
      if (row_offset < 0) continue;
#if defined(FLASHMLA_KV_E4M3) && FLASHMLA_NARROW_LINEAR
      // The thread's 16 value columns are contiguous, two a tile (issue_output): whole 16-byte stores.
      T* out = dst + row_offset + 128 * warp + 16 * ((thread % 32) / 4);
      if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int t = 0; t < kValueTiles; t += 2) {
          reinterpret_cast<float4*>(out)[t / 2] =
              make_float4(o.v[t][reg_of(k, 0)], o.v[t][reg_of(k, 1)], o.v[t + 1][reg_of(k, 0)], o.v[t + 1][reg_of(k, 1)]);
        }
      } else {
#pragma unroll
        for (int t = 0; t < kValueTiles; t += 4) {
          uint32_t packed[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const OutElement2 pair = to_out_element2(o.v[t + j][reg_of(k, 0)], o.v[t + j][reg_of(k, 1)]);
            packed[j] = *reinterpret_cast<const uint32_t*>(&pair);
          }
          reinterpret_cast<uint4*>(out)[t / 4] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
      }
#elif defined(FLASHMLA_KV_E4M3)
      // The thread's two value columns of tile t lie at 16 t on (issue_output): a word a tile (8 bytes
      // in fp32), the 8 lanes of a quad row writing 32 (64) neighbouring bytes.
      T* out = dst + row_offset + 128 * warp + 2 * ((thread % 32) / 4);
#pragma unroll
      for (int t = 0; t < kValueTiles; ++t) {
        const float a = o.v[t][reg_of(k, 0)], b = o.v[t][reg_of(k, 1)];
        if constexpr (sizeof(T) == 4) {
          *reinterpret_cast<float2*>(out + 16 * t) = make_float2(a, b);
        } else {
          const OutElement2 pair = to_out_element2(a, b);
          *reinterpret_cast<uint32_t*>(out + 16 * t) = *reinterpret_cast<const uint32_t*>(&pair);
        }
      }
#else
      // Column 64 t + m + 8 i: a warp's 8 lanes of one row write 8 neighbouring columns.
      T* out = dst + row_offset + at.m;
#pragma unroll
      for (int t = 0; t < kValueTiles; ++t) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float x = o.v[t][reg_of(k, i)];
          if constexpr (sizeof(T) == 4) {
            out[t * kBoxCols + 8 * i] = x;
          } else {
            out[t * kBoxCols + 8 * i] = to_out_element2(x, 0.f).x;
          }
        }
      }
#endif
    }
  }
};

}  // namespace flashmla

using namespace flashmla;

extern "C" __global__ void __launch_bounds__(kNarrowThreads, 1)
    flashmla_decode_narrow(const __grid_constant__ DecodeParams p, const __grid_constant__ TensorMap kv_map) {
  extern __shared__ uint8_t smem_raw[];
  NarrowStorage& smem = *reinterpret_cast<NarrowStorage*>(smem_raw + storage_offset(smem_raw));

  if (threadIdx.x == 0) tma_prefetch_map(&kv_map);
  if (PartPlan::load(p, blockIdx.z).empty(p)) return;
  const int kv_head = blockIdx.y;
  const int rows_base = blockIdx.x * kNarrowRows;

  allow_dependent_launch();

  if (threadIdx.x == 0) {
    for (int slot = 0; slot < kRingBoxes; ++slot) {
      mbarrier_init(&smem.full[slot], 1);
      mbarrier_init(&smem.empty[slot], kLinear ? kBoxes : 1);
    }
#if FLASHMLA_NARROW_PAGE_BARRIER
    for (int page = 0; page < kPageBarriers; ++page) mbarrier_init(&smem.page_landed[page], 1);
#endif
    fence_barrier_init();
  }
  __syncthreads();

  const int warp = __shfl_sync(0xffffffffu, threadIdx.x / 32, 0);
  constexpr int kLoaderWarp = kNarrowConsumers * kNarrowWarps;
  // Each role reads the part's plan again after the hand-over (L1 has it): kept live across it, the
  // plan's six fields spilled to local memory under NVRTC 12.9 with 32 rows (24 loader registers).
  if (kNarrowConsumers > 1 ? warp >= kLoaderWarp : warp == kLoaderWarp) {
    if constexpr (kNarrowConsumers > 1) release_registers<kNarrowLoaderRegisters>();
    if (threadIdx.x % 32 == 0 && warp - kLoaderWarp < kNarrowLoaders) {
      narrow_loader(p, PartPlan::load(p, blockIdx.z), smem, &kv_map, kv_head, warp - kLoaderWarp);
    }
    return;
  }
  if constexpr (kNarrowConsumers > 1) claim_registers<kNarrowConsumerRegisters>();
  const PartPlan part = PartPlan::load(p, blockIdx.z);
  const int wg = kNarrowConsumers > 1 ? warp / kNarrowWarps : 0;  // which computing warpgroup
  const int thread = kNarrowConsumers > 1 ? int(threadIdx.x) % kWarpgroupThreads : int(threadIdx.x);
  const Descales scales = read_descales(p);  // an FP8 cache's descales folded in (dequant.cuh)
  Tracer trace(wg, thread);                  // FLASHMLA_TRACE only (the FP8 cache's page steps)
  trace.mark(kMarkKernelStart);

  uint32_t page_seq = 0;  // pages this CTA has read: where the next page's boxes lie in the ring
  for (int request = part.begin_request; request <= part.end_request; ++request) {
    const Piece piece = Piece::of(p, part, request);
    named_barrier_sync(kBarrierConsumers, kConsumerThreads);  // nobody still reads the previous Q tile
    load_narrow_q(p, smem, request, kv_head, rows_base, threadIdx.x);
    fence_generic_to_async_smem();
    named_barrier_sync(kBarrierConsumers, kConsumerThreads);
    trace.mark(kMarkPieceStart);

    NarrowPiece c(p, smem, piece, thread, wg, kv_head, rows_base);
    OutputT o;
#pragma unroll
    for (int t = 0; t < kValueTiles; ++t) {
#pragma unroll
      for (int r = 0; r < kAccumulators; ++r) o.v[t][r] = 0.f;
      fence_fragment(o.v[t]);  // zeroed here, not between the first S^T's issue and its wait (C7515)
    }
#if defined(FLASHMLA_KV_E4M3)
    c.run_pages(page_seq, scales.scale_log2, o, trace);
#else
    if (piece.page_begin < piece.page_end) {
      ScoresT s;
      issue_scores(smem, page_seq, s, thread);
      int page = piece.page_begin;
      for (; page + 1 < piece.page_end; ++page, ++page_seq) {
        c.page_step<true>(s, page, page_seq, scales.scale_log2, o);
      }
      c.page_step<false>(s, page, page_seq, scales.scale_log2, o);
      cute::warpgroup_wait<0>();
      c.release(page_seq);  // the last page's slots
      ++page_seq;
    }
#endif
    c.finish(o, scales.out_scale, trace);
    trace.mark(kMarkPieceEnd);
  }
}
