// Phase marks of the decode kernel, for scripts/kernel_trace.py: where each warpgroup's time goes
// within a pair of pages, measured inside the kernel.
//
// Built with -DFLASHMLA_TRACE=1 only (never shipped): thread 0 of each consumer warpgroup (and of the
// FP8 converter) of the first kTraceCtas CTAs writes (mark, time) words into the buffer the host points
// `flashmla_trace` at: [kTraceCtas][kTraceWarpgroups][kTraceRecords] 64-bit words, word = mark << 56 |
// time (56 bits). The time is the SM's clock64 (cycles), or with -DFLASHMLA_TRACE_GLOBALTIMER=1 the
// %globaltimer (nanoseconds, one clock for all SMs, so CTAs can be compared). The first word of a record
// holds kMarkHeader, the CTA's blockIdx.z (bits 40-55) and blockIdx.x (32-39), and the SM id. Without
// the define a mark is nothing.
#pragma once
#include "decode_config.cuh"

namespace flashmla {

// scripts/kernel_trace.py's MARKS lists these names in this order.
enum TraceMark : uint32_t {
  kMarkPieceStart = 0,      // the piece's Q tile is in
  kMarkPairStart = 1,
  kMarkScoresIssued = 2,    // QK^T issued (its issue waits for the page's boxes)
  kMarkScoresIn = 3,        // QK^T complete
  kMarkProbsPublished = 4,  // P and the max handed to the other warpgroup
  kMarkHandoffIn = 5,       // the other warpgroup's P and max are here
  kMarkRemotePvDone = 6,    // PV with the other warpgroup's P complete
  kMarkOwnPvDone = 7,       // PV with this warpgroup's P complete and its boxes released (FP8: reloaded)
  kMarkLoaded = 8,          // the boxes read by the remote PV released (FP8: reloaded)
  kMarkPieceEnd = 9,        // output written
  kMarkKernelStart = 10,    // the warpgroup's first instruction after the set-up (barrier init, plan row)
  // The FP8 converter (helper warpgroup, dequant.cuh), per page:
  kMarkConvertStart = 11,   // its wait for the page (scores in, or boxes landed) has returned
  kMarkConvertedHalf = 12,  // V's first half (boxes 0..3) converted and arrived on
  kMarkConverted = 13,      // every box it converts done
  // A consumer loading its own boxes (an FP8 cache), after its remote PV:
  kMarkBlockIndexed = 14,   // the page's block index read (its cp.async waited for)
  kMarkBoxesIssued = 15,    // the page's TMA boxes issued
  // A piece's end (decode.cu's finish_piece and the next piece's Q tile):
  kMarkSumsExchanged = 16,  // both warpgroups' row sums are in (the epilogue's CTA barrier)
  kMarkLseStored = 17,      // the lse written and the rows' normalisers computed
  kMarkOutputStored = 18,   // this warpgroup's rows of the piece stored (the stores issued)
  kMarkQTileFree = 19,      // the loop top's CTA barrier, before the next Q tile's wait (TMA) or reload
  // decode_narrow.cu's loader, between kMarkBlockIndexed and kMarkBoxesIssued:
  kMarkPaceHeld = 20,       // GridPace::hold passed (the time before it: held back, or awaiting the count)
  kMarkHeader = 255,
};

#if defined(FLASHMLA_TRACE)
#ifndef FLASHMLA_TRACE_CTAS
#define FLASHMLA_TRACE_CTAS 16  // kernel_trace.py --ctas
#endif
constexpr int kTraceCtas = FLASHMLA_TRACE_CTAS;
constexpr int kTraceWarpgroups = 3;
constexpr int kTraceRecords = 4096;
constexpr uint64_t kTraceCycleMask = (1ull << 56) - 1;
}  // namespace flashmla

extern "C" __device__ unsigned long long* flashmla_trace = nullptr;

namespace flashmla {

__device__ __forceinline__ uint64_t trace_time() {
#if defined(FLASHMLA_TRACE_GLOBALTIMER)
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
#else
  return clock64();
#endif
}

// The SM this thread runs on (a record's header; combine.cu's block records).
__device__ __forceinline__ uint32_t trace_sm() {
  uint32_t sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  return sm;
}

struct Tracer {
  unsigned long long* slot;  // this thread's record, or null: not traced
  int count;

  __device__ __forceinline__ Tracer(int warpgroup, int thread) : slot(nullptr), count(0) {
    const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (flashmla_trace != nullptr && thread == 0 && cta < kTraceCtas) {
      const uint32_t sm = trace_sm();
      slot = flashmla_trace + (int64_t(cta) * kTraceWarpgroups + warpgroup) * kTraceRecords;
      slot[count++] = (uint64_t(kMarkHeader) << 56) | (uint64_t(blockIdx.z & 0xFFFF) << 40) |
                      (uint64_t(blockIdx.x & 0xFF) << 32) | sm;
    }
  }
  __device__ __forceinline__ void mark(TraceMark m) {
    if (slot != nullptr && count < kTraceRecords) {
      slot[count++] = (uint64_t(m) << 56) | (trace_time() & kTraceCycleMask);
    }
  }
};
#else
struct Tracer {
  __device__ __forceinline__ Tracer(int, int) {}
  __device__ __forceinline__ void mark(TraceMark) {}
};
#endif

}  // namespace flashmla
