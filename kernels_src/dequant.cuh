// The FP8 (e4m3) KV cache: pages land in FP8 and are dequantised in shared memory, exactly, into the
// 16-bit boxes that the main loop reads, so that the main loop runs unchanged.
//
// Why exact: every e4m3 value (and NaN) is representable in fp16 and in bf16 (3 mantissa bits, exponents
// 2^-9 .. 2^8), so the 16-bit copy holds the same numbers; the per-tensor descales are folded into the
// score scale (descale_q * descale_k) and into the output (descale_k), never into the data.
//
// Why in place: the Q tile and the two 72 KB page buffers fill 219 of the 227 KB of shared memory, and an
// FP8 page is 36 KB. So each 16-bit box is converted from FP8 rows that landed inside it: box k of a page
// (64 tokens x 64 columns) is fetched as four TMA sub-boxes of 16 tokens (1 KB each, no swizzle), and
// sub-box w lands in the upper half of the 2 KB that its 16 rows take in 16-bit form. The boxes keep
// their owners: a loading thread refills exactly the boxes it refilled before (load.cuh,
// boxes_loaded_by); the TMA now completes a "landed" barrier per box instead of the "full" one.
//
// Who converts: a third warpgroup, the converter; its warp w converts rows 16w .. 16w + 15 of every box.
// Each warp overwrites only the FP8 rows it has read itself, so the warps need no barrier among them
// and run ahead of each other. A warp follows the loaders' page order (the pages of each piece
// alternate between buffers A and B), waits for each box to land, converts its rows, fences the
// generic writes for wgmma and arrives on the box's "full" barrier (every converter thread arrives).
// The consumer warpgroups wait on "full" exactly as for a 16-bit cache, so their code is unchanged. The
// converter is the helper warpgroup (decode_config.cuh): a 16-bit cache's helper issues the loads, an
// FP8 cache's consumers issue their own.
//
// Measured (H200, 2026-11-30, e4m3 q and cache, b = 128; benchmarks/results/2026-11-30-h200-fp8-*):
// this is correct but slower than our own bf16 kernel, at about 0.55 of FlashMLA's FP8 kernel. Whole
// boxes converted by the warpgroup (a warpgroup barrier between the reads and the writes of each box):
// h_q = 16, 4096 in 224 us; split by warps as here: 229 us; fp16 compute for an e4m3 q and two boxes a
// step: 213 us (bf16 cache and q: 177 us; FlashMLA FP8: 118 us). So the conversion is not what limits
// it: in place, a buffer holds one page, so only two FP8 pages (72 KB) are in flight per SM where the
// bf16 kernel keeps 144 KB in flight, and the page's round trip (load, convert, use) is latency-bound.
// Faster FP8 needs FP8 staging beside the 16-bit boxes (less Q tile, or fewer 16-bit boxes: a schedule
// that converts half a page at a time), or FP8 tensor cores on K (wgmma e4m3 with V transposed).
//
// NaN in stale slots converts to NaN; the consumers zero stale V rows and mask stale scores after the
// conversion, as for a 16-bit cache.
#pragma once
#include "mma.cuh"
#include "shared_storage.cuh"
#include "sync.cuh"
#include "plan.cuh"
#include "trace.cuh"

namespace flashmla {

// The descales folded into the softmax: scores are scaled by scale_log2 (softmax_scale * log2 e, times
// descale_q * descale_k for an FP8 cache), the normalised output by out_scale (descale_k). Read on the
// device at every launch, so that a CUDA graph replays with new descales. A null pointer means 1.
struct Descales {
  float scale_log2;
  float out_scale;
};

__device__ __forceinline__ Descales read_descales(const DecodeParams& p) {
#if defined(FLASHMLA_KV_E4M3)
  const float q = p.descale_q != nullptr ? *p.descale_q : 1.f;
  const float k = p.descale_k != nullptr ? *p.descale_k : 1.f;
  return {p.scale_log2 * q * k, k};
#else
  return {p.scale_log2, 1.f};
#endif
}

// Two e4m3 values (low byte first) -> two 16-bit elements (Element2 bits), exactly.
__device__ __forceinline__ uint32_t e4m3x2_to_element2(uint32_t pair) {
  uint32_t half2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(half2) : "h"(static_cast<unsigned short>(pair)));
#if defined(FLASHMLA_BF16)
  // fp16 -> fp32 -> bf16 is exact for these values (and keeps NaN a NaN).
  uint32_t bf162;
  asm("{\n"
      ".reg .b16 lo, hi;\n"
      ".reg .f32 a, b;\n"
      "mov.b32 {lo, hi}, %1;\n"
      "cvt.f32.f16 a, lo;\n"
      "cvt.f32.f16 b, hi;\n"
      "cvt.rn.bf16x2.f32 %0, b, a;\n"
      "}\n"
      : "=r"(bf162)
      : "r"(half2));
  return bf162;
#else
  return half2;
#endif
}

// The upper two of four e4m3 values, as e4m3x2_to_element2 takes the lower two. (As a 16-bit half of
// the register, ptxas converts them in place, F2FP's .H1 operand, where `four >> 16` costs a shift:
// 1-2 % on the FP8 h_q = 16 and 32 cells, H200, 2026-11-30.)
__device__ __forceinline__ uint32_t e4m3x2_high_to_element2(uint32_t four) {
#if defined(FLASHMLA_BF16)
  return e4m3x2_to_element2(four >> 16);
#else
  uint32_t half2;
  asm("{\n"
      ".reg .b16 lo, hi;\n"
      "mov.b32 {lo, hi}, %1;\n"
      "cvt.rn.f16x2.e4m3x2 %0, hi;\n"
      "}\n"
      : "=r"(half2)
      : "r"(four));
  return half2;
#endif
}

// V^T's fragments from 64-byte FP8 boxes (decode_ring.cu, decode_narrow.cu with 32 rows): four transposed
// 8 x 8 matrices of 16-bit elements (two FP8 value columns of one token each) from `address` + kOffset: lane
// l gives the address of row l % 8 of matrix l / 8, and gets in register m the element pair of matrix m's
// rows 2 (l % 4) and 2 (l % 4) + 1 (tokens) in column l / 4 (a column pair).
template <int kOffset>
__device__ __forceinline__ void load_columns_t(uint32_t (&d)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4 + %5];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(address), "n"(kOffset));
}

// The byte permute of a transposed load's register, (c, k), (c + 1, k), (c, k + 1), (c + 1, k + 1), into
// each column's token pair, (c, k), (c, k + 1), (c + 1, k), (c + 1, k + 1), for the e4m3x2 conversions; where
// only `room` < 2 of the two tokens exist, the others' bytes come from the permute's zero word.
constexpr uint32_t kColumnPairs = 0x3120u;
__device__ __forceinline__ uint32_t column_pairs(int room) {
  return room >= 2 ? kColumnPairs : room == 1 ? 0x4140u : 0x4444u;
}
// PTX's prmt (__byte_perm masks the selector first: two more instructions a step where it is not a constant).
__device__ __forceinline__ uint32_t permute_bytes(uint32_t a, uint32_t selector) {
  uint32_t out;
  asm("prmt.b32 %0, %1, 0, %2;" : "=r"(out) : "r"(a), "r"(selector));
  return out;
}

// One O^T tile's V^T A fragment from a thread's two token pairs, each register an e4m3 column pair:
// `low` holds tokens k, k + 1 of columns c, c + 1 and `high` tokens k + 8, k + 9; fenced for the wgmma.
__device__ __forceinline__ void column_pairs_to_fragment(uint32_t (&a)[4], uint32_t low, uint32_t high) {
  a[0] = e4m3x2_to_element2(low);
  a[1] = e4m3x2_high_to_element2(low);
  a[2] = e4m3x2_to_element2(high);
  a[3] = e4m3x2_high_to_element2(high);
#pragma unroll
  for (int i = 0; i < 4; ++i) cute::warpgroup_fence_operand(a[i]);
}

// V^T's A fragments of one P V k-step (its first token `step_token`) from the step's transposed loads:
// d[j] holds tiles 2 j and 2 j + 1, matrix 2 (t % 2) tile t's tokens 0-7 of the step and the next one tokens
// 8-15. Tokens at or past `valid` (a request's last page, FP8 NaN behind it) come out as zeros through the
// permute's selector, worked out only on such a page (a uniform branch).
template <int kTiles>
__device__ __forceinline__ void fragments_from_columns(uint32_t (&a)[kTiles][4], const uint32_t (&d)[kTiles / 2][4],
                                                       int valid, int step_token, int lane) {
  uint32_t low_pairs = kColumnPairs, high_pairs = kColumnPairs;  // tokens 2 (lane % 4), + 1 and 8 further
  if (valid < kPageSize) {
    const int room = valid - step_token - 2 * (lane % 4);  // tokens of the lane's first pair that exist
    low_pairs = column_pairs(room);
    high_pairs = column_pairs(room - 8);
  }
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
    column_pairs_to_fragment(a[t], permute_bytes(d[t / 2][2 * (t % 2)], low_pairs),
                             permute_bytes(d[t / 2][2 * (t % 2) + 1], high_pairs));
  }
}

// Eight e4m3 values -> eight 16-bit elements: one 16-byte chunk of a 16-bit row.
__device__ __forceinline__ uint4 e4m3x8_to_chunk(uint2 fp8) {
  return make_uint4(e4m3x2_to_element2(fp8.x), e4m3x2_high_to_element2(fp8.x), e4m3x2_to_element2(fp8.y),
                    e4m3x2_high_to_element2(fp8.y));
}

// The converter's walk over the pages of a part, in the loaders' order (PageStream's: the pages of a
// piece in pairs, a -> buffer A, b -> buffer B): f(buffer, phase, valid) per page, with the parity of
// that buffer's barriers and the page's tokens that exist (< 64 only on a request's last page).
template <class F>
__device__ __forceinline__ void for_each_converted_page(const DecodeParams& p, const PartPlan& part, F&& f) {
  uint32_t phases = 0;  // bit b: parity of buffer b's barriers (pages converted from it, mod 2); a
                        // bit mask, as an array indexed at run time would live in local memory
  for (int request = part.begin_request; request <= part.end_request; ++request) {
    const Piece piece = Piece::of(p, part, request);
    for (int page = piece.page_begin; page < piece.page_end; ++page) {
      const int buffer = (page - piece.page_begin) & 1;
      f(buffer, int(phases >> buffer) & 1, piece.seqlen - page * kPageSize);
      phases ^= 1u << buffer;
    }
  }
}

#if defined(FLASHMLA_FP8_SCORES)

// With an e4m3 q (decode.cu) QK^T runs on FP8 wgmmas straight from the landed page, as in
// decode_narrow.cu, and only V is converted, after that QK^T:
// - box k of a page lands whole (64 tokens x 64 bytes, 64-byte swizzled: decode_config.cuh's FP8 box) in
//   the upper half of its 16-bit box, completing its "landed" barrier; the Q tile is e4m3 in the same
//   layout (load_q_tile). The warpgroup scoring the page waits on "landed" and, once its QK^T has
//   completed, arrives on the buffer's "scored" barrier (one arrival per warp).
// - the converter turns the V boxes (0..7) into 16-bit rows in place, warp w the tokens 16w .. 16w+15
//   (one PV k-step) of each, from their FP8 rows (the 1 KB at slot 4 + w of the box) to 16-bit rows at
//   slots w and 4 + w (decode_config.cuh's v_row), which cover only bytes it has read itself; so the
//   warps never wait for each other. Slot w lies in the box's lower half, which QK^T does not read: the
//   first 8 tokens go there as soon as the page lands, beside its QK^T. Slot 4 + w overwrites the FP8
//   rows: the last 8 tokens go there once the page is scored (the "scored" barrier), then each thread
//   fences and arrives on the box's "full" barrier, which PV waits on. The stale tail of a request's
//   last page (maybe NaN: P is 0 there, but 0 * NaN = NaN) is written as zeros. The rope box is not
//   converted: its QK^T is its only use, and then it carries P as for a 16-bit cache.
// So half the conversion runs beside QK^T and the rest beside the softmax, and QK^T costs half.
// (Measured, H200, 2026-11-30, h_q = 128, 4096: converting before QK^T, 411 us; after it, with rows in
// token order, which needs a warpgroup barrier per box between the reads and the writes, 322 us; warp by
// warp, all of it after the scores, 270 us; half of it before the scores as here, 259-260 us (2-4 % on
// every 128-row cell, but 1.7 % slower at h_q = 64, 16384); with no conversion at all (not exact) 234 us.)
constexpr int kLandingsPerBox = 1;
constexpr int kLandingTokens = kPageSize;
constexpr int kLandingBytes = kFp8BoxBytes;
constexpr int kFullArrivals = kHelperThreads;  // a V box is full once every converter thread wrote
constexpr int kScoredArrivals = kWarpgroupThreads / 32;
constexpr int kConvertTokens = kPageSize / (kHelperThreads / 32);  // 16 per converter warp
// Boxes per step, each step's reads in flight together (and after the scores one fence and arrival for
// them). Measured (H200, h_q = 128, 4096) when both groups went after the scores: one box a step 302 us,
// two 270 us; more boxes a fence (4 or 8, in steps of 2 or 4, the converter given 56 or 72 registers),
// one arrival per warp, or 56 registers: 274-289 us. (4 boxes a step of one group: spills under 13.0.)
constexpr int kConvertBoxesPerStep = 2;
static_assert(kConvertTokens * kFp8RowBytes == 2 * 16 * 32, "a warp reads its FP8 rows in two 16-byte chunks a lane");

__host__ __device__ constexpr int landing_offset(int) { return kBoxBytes / 2; }

__device__ __forceinline__ uint64_t* landing_barrier(SharedStorage& smem, int buffer, int box) {
  return &smem.landed[buffer][box];
}

// One 8-token group of a converter warp's 16 tokens, in kCount consecutive V boxes from `first_box` on:
// kGroup 0, tokens 16w .. 16w+7, go to slot w of the box's free lower half, which QK^T does not read,
// so they are converted as soon as the page has landed; kGroup 1, tokens 16w+8 .. 16w+15, go to slot
// 4 + w, over the warp's own FP8 rows, so only once the page is scored. Lane l reads the physical FP8
// chunk l of the group's rows (16 bytes: token 16w + 8 kGroup + l / 4); a chunk holding columns
// 16c .. 16c + 15 (c = l % 4 ^ the 64-byte swizzle) becomes the 16-bit chunks 2c and 2c + 1 of the
// token's row. A warp reads 512 contiguous bytes and writes four chunks of each of 8 rows of one 8-row
// group: no bank conflicts. Stale tokens are written as zeros.
template <int kCount, int kGroup>
__device__ __forceinline__ void convert_v_group(uint8_t* first_box, int warp, int lane, int valid) {
  const int token = warp * kConvertTokens + 8 * kGroup + lane / 4;
  const uint8_t* fp8 = first_box + kBoxBytes / 2 + (warp * kConvertTokens + 8 * kGroup) * kFp8RowBytes + lane * 16;
  uint4 raw[kCount];
#pragma unroll
  for (int b = 0; b < kCount; ++b) {
    raw[b] = token >= valid ? make_uint4(0, 0, 0, 0) : *reinterpret_cast<const uint4*>(fp8 + b * kBoxBytes);
  }
  if constexpr (kGroup == 1) __syncwarp();  // the warp's FP8 bytes all read before slot 4 + w is overwritten
  const int first = 2 * ((lane % 4) ^ ((token >> 1) & 3));  // the FP8 box's 64-byte swizzle undone
  uint8_t* lo = first_box + swizzled_offset(v_row(token), first);
  uint8_t* hi = first_box + swizzled_offset(v_row(token), first + 1);
#pragma unroll
  for (int b = 0; b < kCount; ++b) {
    *reinterpret_cast<uint4*>(lo + b * kBoxBytes) = e4m3x8_to_chunk(make_uint2(raw[b].x, raw[b].y));
    *reinterpret_cast<uint4*>(hi + b * kBoxBytes) = e4m3x8_to_chunk(make_uint2(raw[b].z, raw[b].w));
  }
}

// The converter's whole work: the V boxes of every page of the part, in the loaders' order. Each page's
// first groups as soon as its boxes land (beside its QK^T), its second groups once it is scored, a step
// of kConvertBoxesPerStep boxes per fence and arrival on their "full" barriers.
__device__ __forceinline__ void convert_part(const DecodeParams& p, const PartPlan& part, SharedStorage& smem,
                                             int thread, Tracer& trace) {
  const int warp = thread / 32;
  const int lane = thread % 32;
  for_each_converted_page(p, part, [&](int buffer, int phase, int valid) {
    uint8_t* boxes = smem.kv[buffer];
#pragma unroll 1
    for (int box = 0; box < kRopeBox; box += kConvertBoxesPerStep) {
#pragma unroll
      for (int b = 0; b < kConvertBoxesPerStep; ++b) mbarrier_wait_uniform(&smem.landed[buffer][box + b], phase);
      convert_v_group<kConvertBoxesPerStep, 0>(boxes + box * kBoxBytes, warp, lane, valid);
    }
    mbarrier_wait_uniform(&smem.scored[buffer], phase);
    trace.mark(kMarkConvertStart);
#pragma unroll 1
    for (int box = 0; box < kRopeBox; box += kConvertBoxesPerStep) {
      convert_v_group<kConvertBoxesPerStep, 1>(boxes + box * kBoxBytes, warp, lane, valid);
      fence_generic_to_async_smem();  // both groups' writes, for PV's wgmma
#pragma unroll
      for (int b = 0; b < kConvertBoxesPerStep; ++b) mbarrier_arrive(&smem.full[buffer][box + b]);
      if (box + kConvertBoxesPerStep == kBoxesPerHalf) trace.mark(kMarkConvertedHalf);
    }
    trace.mark(kMarkConverted);
  });
}

#elif defined(FLASHMLA_KV_E4M3)

constexpr int kConverterWarps = kHelperThreads / 32;
constexpr int kLandingsPerBox = kConverterWarps;            // one TMA sub-box per converter warp
constexpr int kLandingTokens = kPageSize / kLandingsPerBox;  // 16 tokens, 64 e4m3 bytes each
constexpr int kLandingBytes = kLandingTokens * kBoxCols;     // 1 KB of FP8
constexpr int kLandingStride = kLandingTokens * kRowBytes;   // 2 KB: the same rows in 16-bit form
constexpr int kFullArrivals = kHelperThreads;                // a box is full once every converter thread wrote
static_assert(kLandingBytes == 2 * 16 * 32, "a warp reads its landing in two 16-byte chunks per lane");
// Boxes converted per step (convert_step). Two boxes a step halve the waits, fences and arrivals per
// box; converting to fp16, ptxas then needs one register more than the converter's 40 (a spill), so fp16
// goes box by box (its conversion is a quarter of bf16's instructions anyway).
#if defined(FLASHMLA_BF16)
constexpr int kBoxesPerStep = 2;
#else
constexpr int kBoxesPerStep = 1;
#endif

// Where landing `part` of a box goes, from the box's start: the upper half of its rows' 16-bit bytes.
__host__ __device__ constexpr int landing_offset(int part) { return part * kLandingStride + kLandingStride / 2; }

__device__ __forceinline__ uint64_t* landing_barrier(SharedStorage& smem, int buffer, int box) {
  return &smem.landed[buffer][box];
}

// A warp's 16 rows of `boxes` consecutive landed boxes, converted in place. `rows` is the first 16-bit
// byte of its rows in the first box; their FP8 bytes lie in the upper half. FP8 chunk c (16 bytes: row
// c / 4, columns 16 (c % 4) ..) becomes the 16-bit chunks 2 (c % 4) and 2 (c % 4) + 1 of its row, at
// their 128-byte-swizzled places (rows 16w .. keep the swizzle phase of rows 0 ..). Consecutive lanes
// read consecutive chunks, and each store fills every bank group 4 times: no bank conflicts. All the
// reads come first: a warp overwrites only FP8 bytes it has read itself.
template <int kCount>
__device__ __forceinline__ void convert_rows(uint8_t* rows, int lane) {
  uint4 raw[kCount][2];
#pragma unroll
  for (int b = 0; b < kCount; ++b) {
    const uint8_t* fp8 = rows + b * kBoxBytes + kLandingStride / 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) raw[b][i] = *reinterpret_cast<const uint4*>(fp8 + (lane + 32 * i) * 16);
  }
  __syncwarp();
#pragma unroll
  for (int b = 0; b < kCount; ++b) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int chunk = lane + 32 * i;
      uint8_t* row = rows + b * kBoxBytes;
      const int first = 2 * (chunk % 4);
      *reinterpret_cast<uint4*>(row + swizzled_offset(chunk / 4, first)) =
          e4m3x8_to_chunk(make_uint2(raw[b][i].x, raw[b][i].y));
      *reinterpret_cast<uint4*>(row + swizzled_offset(chunk / 4, first + 1)) =
          e4m3x8_to_chunk(make_uint2(raw[b][i].z, raw[b][i].w));
    }
  }
}

// Boxes [box, box + kCount) of a buffer's page, one warp's rows: wait for them to land, convert, make
// the writes visible to wgmma, then arrive on each box's "full" barrier. (Neighbouring boxes land
// together: one loader issues each half page.)
template <int kCount>
__device__ __forceinline__ void convert_step(SharedStorage& smem, int buffer, int box, int phase, int warp,
                                             int lane) {
#pragma unroll
  for (int b = 0; b < kCount; ++b) mbarrier_wait_uniform(landing_barrier(smem, buffer, box + b), phase);
  convert_rows<kCount>(smem.kv[buffer] + box * kBoxBytes + warp * kLandingStride, lane);
  fence_generic_to_async_smem();
  __syncwarp();
  // Every thread arrives after its own writes. With one arrival per warp after __syncwarp, racecheck
  // reported write-write hazards between the converter's stores and the consumers' stale-row zeroing
  // (8 errors on scripts/sanitize_cases.py --fp8); with one per thread it reports none (H200, 2026-11-30).
#pragma unroll
  for (int b = 0; b < kCount; ++b) mbarrier_arrive(&smem.full[buffer][box + b]);
}

// A converter warp's whole work: its rows of every page of the part, in the loaders' order.
__device__ __forceinline__ void convert_part(const DecodeParams& p, const PartPlan& part, SharedStorage& smem,
                                             int thread, Tracer& trace) {
  const int warp = thread / 32;
  const int lane = thread % 32;
  for_each_converted_page(p, part, [&](int buffer, int phase, int) {
    trace.mark(kMarkConvertStart);  // (its first boxes' wait is inside the first step)
#pragma unroll 1
    for (int box = 0; box + kBoxesPerStep <= kBoxes; box += kBoxesPerStep) {
      convert_step<kBoxesPerStep>(smem, buffer, box, phase, warp, lane);
      if (box + kBoxesPerStep == kBoxesPerHalf) trace.mark(kMarkConvertedHalf);
    }
    if constexpr (kBoxes % kBoxesPerStep != 0) {  // the rope box
      convert_step<kBoxes % kBoxesPerStep>(smem, buffer, kBoxes - kBoxes % kBoxesPerStep, phase, warp, lane);
    }
    trace.mark(kMarkConverted);
  });
}

#else

constexpr int kLandingsPerBox = 1;  // a 16-bit box lands whole, swizzled: it is its own final form
constexpr int kLandingTokens = kPageSize;
constexpr int kLandingBytes = kBoxBytes;
constexpr int kFullArrivals = 1;  // the TMA's own arrival

__host__ __device__ constexpr int landing_offset(int) { return 0; }

__device__ __forceinline__ uint64_t* landing_barrier(SharedStorage& smem, int buffer, int box) {
  return &smem.full[buffer][box];
}

#endif

// Bytes one box's TMA loads bring.
constexpr uint32_t kLandedBoxBytes = kLandingsPerBox * kLandingBytes;

}  // namespace flashmla
