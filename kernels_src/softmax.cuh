// Online softmax in base 2 over a warpgroup's score tile, split into the verbs the seesaw schedule
// interleaves: the page's row max, the exponentials against a running max, the hand-off of P.
//
// wgmma accumulator layout (m64nN, per thread of the warpgroup): register 4*j + 2*i + c holds row
// 16*warp + lane/4 + 8*i and column 8*j + 2*(lane%4) + c. So a thread owns two rows, and the four
// threads of a quad share them: row reductions are two shuffles.
#pragma once
#include "mma.cuh"

namespace flashmla {

struct FragmentCoords {
  int row[2];   // tile rows of this thread
  int column;   // first of its column pairs inside each 8-column block
  __device__ __forceinline__ explicit FragmentCoords(int thread) {
    const int warp = thread / 32;
    const int lane = thread % 32;
    row[0] = warp * 16 + lane / 4;
    row[1] = row[0] + 8;
    column = 2 * (lane % 4);
  }
  // One thread of each quad publishes the quad's per-row values.
  __device__ __forceinline__ bool publishes() const { return column == 0; }
};

// Visit every score of a thread's fragment: f(register, which of its two rows, column in the page).
template <class F>
__device__ __forceinline__ void for_each_score(const FragmentCoords& at, F&& f) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int c = 0; c < 2; ++c) f(4 * j + 2 * i + c, i, 8 * j + at.column + c);
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// The transposed kernels' accumulators (decode_narrow.cu, decode_ring.cu: N holds the query rows, M tokens
// or value columns): register reg_of(k, i) holds the thread's row slot k (row 8 (k / 2) + 2 (lane % 4) +
// k % 2) at its M index i (16 warp + lane / 4 + 8 i). A row's reductions run over the 8 lanes of a warp
// that share lane % 4.
__device__ __forceinline__ int reg_of(int slot, int i) { return 4 * (slot / 2) + 2 * i + slot % 2; }

__device__ __forceinline__ float octet_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}

__device__ __forceinline__ float octet_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

// 2^x on the special-function unit alone (no denormal fix-up: results below 2^-126 flush to 0, which
// a probability may).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Which keys of a page each of the thread's two rows sees, and whether the page's scores are void.
struct PageMask {
  int token0;      // first token of the page
  int limit[2];    // row i sees tokens < limit[i] (causal: bottom-right aligned)
  bool bad;        // a flagged bad page (FP8: plan.cuh, kFlagBadPages): every score becomes NaN
};

// The running max moves only when a page's row max exceeds it by more than this (base 2): until then
// the exponentials are taken against the stale max, so probabilities reach at most 2^8 (exact in
// bf16/fp16 and fp32 sums), and the output and row sums need no rescaling. Every O rescale costs a
// warpgroup 128 multiplies a thread; with the slack they all but vanish after a piece's first pages.
constexpr float kMaxSlack = 8.0f;

// Mask the raw scores of one page in place and return the new running max (in scaled, base-2 units)
// of the thread's two rows: the page's scaled row max where it exceeds `running` by more than
// kMaxSlack, else `running`. Masked scores become -inf (a select, so NaN in stale slots vanishes); a
// flagged bad page's become NaN, which then reaches P, the row sums and the output. `kMasked` is false
// for pages every row sees whole.
template <bool kMasked>
__device__ __forceinline__ void page_max(ScoreTile& s, const FragmentCoords& at, const PageMask& mask,
                                         float scale_log2, const float (&running)[2], float (&new_max)[2]) {
  float raw_max[2] = {-positive_infinity(), -positive_infinity()};
  for_each_score(at, [&](int k, int i, int column) {
    float x = s.v[k];
    if (kMasked && mask.token0 + column >= mask.limit[i]) x = -positive_infinity();
    if (kMasked && mask.bad) x = quiet_nan();
    s.v[k] = x;
    raw_max[i] = fmaxf(raw_max[i], x);
  });
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float page = quad_max(raw_max[i]) * scale_log2;
    new_max[i] = page > running[i] + kMaxSlack ? page : running[i];
  }
}

// Whether any row of this warp has a new running max, i.e. its slice of O needs rescaling. The answer
// is warp-uniform, so warps whose rows kept their max skip the multiplies as a whole.
__device__ __forceinline__ bool warp_max_moved(const float (&from)[2], const float (&to)[2]) {
  return __any_sync(0xffffffffu, from[0] != to[0] || from[1] != to[1]);
}

// Scores -> probabilities relative to `row_max`, in place: p = 2^(scale_log2 * s - row_max). Returns
// this thread's share of each row's sum (the quad adds them up at the end).
__device__ __forceinline__ void exponentiate(ScoreTile& s, const FragmentCoords& at, float scale_log2,
                                             const float (&row_max)[2], float (&row_sum)[2]) {
  row_sum[0] = row_sum[1] = 0.f;
  for_each_score(at, [&](int k, int i, int) {
    s.v[k] = fast_exp2(fmaf(s.v[k], scale_log2, -row_max[i]));
    row_sum[i] += s.v[k];
  });
}

// Probabilities as wgmma A fragments: PV k-step `step` covers columns 16*step .. +16, which are the
// accumulator blocks j = 2*step (registers 0, 1) and 2*step + 1 (registers 2, 3), rows 0 and 1 each.
__device__ __forceinline__ void pack_probabilities(const ScoreTile& s, ProbFragment& p) {
#pragma unroll
  for (int step = 0; step < kPVSteps; ++step) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = 2 * step + r / 2;
      const int i = r % 2;
      const Element2 pair = to_element2(s.v[4 * j + 2 * i], s.v[4 * j + 2 * i + 1]);
      p.v[step][r] = *reinterpret_cast<const uint32_t*>(&pair);
    }
  }
}

// This thread's words of wgmma A fragments in a 64 x 64 swizzled box: f(step, r, row, chunk) for register
// r of k-step `step`, which lies in tile row `row`, 16-byte chunk `chunk` (before the swizzle), at the
// thread's column pair.
template <class F>
__device__ __forceinline__ void for_each_fragment_word(const FragmentCoords& at, F&& f) {
#pragma unroll
  for (int step = 0; step < kPVSteps; ++step) {
#pragma unroll
    for (int r = 0; r < 4; ++r) f(step, r, at.row[r % 2], 2 * step + r / 2);
  }
}

// Write the packed probabilities into a 64 x 64 swizzled box that the other warpgroup reads with wgmma.
// Here and in load_fragment the swizzle is spelled out rather than called as swizzled_offset: with the
// helper, NVRTC 13.0.88 spills 4 bytes in the 16-bit-q FP8-cache variants (nineteenth session).
__device__ __forceinline__ void store_probabilities(const ProbFragment& p, uint8_t* box, const FragmentCoords& at) {
  for_each_fragment_word(at, [&](int step, int r, int row, int chunk) {
    *reinterpret_cast<uint32_t*>(box + row * kRowBytes + ((chunk ^ (row & 7)) << 4) + at.column * 2) = p.v[step][r];
  });
}

// The inverse: a swizzled 64 x 64 box read back as wgmma A fragments (the Q tile's rope box).
__device__ __forceinline__ void load_fragment(const uint8_t* box, const FragmentCoords& at, ProbFragment& p) {
  for_each_fragment_word(at, [&](int step, int r, int row, int chunk) {
    p.v[step][r] = *reinterpret_cast<const uint32_t*>(box + row * kRowBytes + ((chunk ^ (row & 7)) << 4) + at.column * 2);
  });
}

// A move of the running max of a thread's two rows, `from` -> `to`: the factors 2^(from - to) that
// bring sums and outputs kept against `from` to `to`.
struct MaxMove {
  float factor[2];
  bool warp_moved;  // some row of this warp has a new max

  __device__ __forceinline__ MaxMove(const float (&from)[2], const float (&to)[2])
      : factor{fast_exp2(from[0] - to[0]), fast_exp2(from[1] - to[1])}, warp_moved(warp_max_moved(from, to)) {}

  // O *= factor, row-wise; skipped by warps none of whose rows moved (then every factor is 1).
  __device__ __forceinline__ void rescale(OutputHalf& o) const {
    if (!warp_moved) return;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        o.v[4 * j + 2 * i] *= factor[i];
        o.v[4 * j + 2 * i + 1] *= factor[i];
      }
    }
  }
};

}  // namespace flashmla
