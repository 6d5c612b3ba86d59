// The decode kernel's shared-memory carve-up.
#pragma once
#include "decode_config.cuh"
#include "plan.cuh"

namespace flashmla {

struct SharedStorage {
  alignas(1024) uint8_t q[kTileBytes];
  // The rope box of a page is free once its own QK^T is done; it then carries that page's
  // probabilities P (64 x 64, same swizzled box layout) to the other warpgroup.
  alignas(1024) uint8_t kv[kPageBuffers][kTileBytes];
  float max_a[kTileRows];        // running max after page a (warpgroup 0 -> 1)
  float max_b[kTileRows];        // running max after page b (warpgroup 1 -> 0)
  float row_sum[2][kTileRows];   // epilogue: each warpgroup's share of the row sums
  // Per buffer and loading warpgroup, with kFlagBadPages (FP8): the page's block index was outside the
  // block table or the cache; the warpgroup scoring the page turns its scores into NaN.
  int bad_page[kPageBuffers][2];
  PageStream streams[2][kPageBuffers];  // [consumer warpgroup][buffer]: the state of the thread loading its boxes
  alignas(8) uint64_t full[kPageBuffers][kBoxes];  // one TMA barrier per box: QK^T starts on the first 8 KB
  // [buffer][consumer warpgroup]: the boxes of the buffer it reads last are free again (a 16-bit cache's
  // loader waits on it before loading them with the next page).
  uint64_t empty[kPageBuffers][2];
  uint64_t q_full;  // the Q tile has landed (through TMA: DecodeParams::q_tma)
#if defined(FLASHMLA_KV_E4M3)
  uint64_t landed[kPageBuffers][kBoxes];  // an FP8 box has landed (TMA); `full` then says it is converted
#endif
#if defined(FLASHMLA_FP8_SCORES)
  uint64_t scored[kPageBuffers];  // the buffer's page has been scored: its FP8 V may be converted in place
#endif
};

// Dynamic shared memory asked for at launch: the struct plus slack to align it to 1024 bytes
// (128-byte swizzle patterns are anchored to 1024-byte boundaries).
constexpr int kSharedBytes = int(sizeof(SharedStorage)) + 1024;

}  // namespace flashmla
