// Online softmax in base 2 over the S fragment of one warpgroup.
//
// wgmma accumulator layout (m64nN, per thread of the warpgroup): register 4*j + 2*i + c holds row
// 16*warp + lane/4 + 8*i and column 8*j + 2*(lane%4) + c. So a thread owns two rows, and the four
// threads of a quad share them: row reductions are two shuffles.
#pragma once
#include "decode_config.cuh"

namespace flashmla {

struct FragmentCoords {
  int row[2];   // tile rows of this thread
  int column;   // first of its column pairs inside each 8-column block
  __device__ __forceinline__ FragmentCoords(int thread) {
    const int warp = thread / 32;
    const int lane = thread % 32;
    row[0] = warp * 16 + lane / 4;
    row[1] = row[0] + 8;
    column = 2 * (lane % 4);
  }
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

struct OnlineSoftmax {
  float row_max[2];  // running max of score * scale * log2(e)
  float row_sum[2];  // this thread's share of the running sum; the quad adds them up at the end

  __device__ __forceinline__ void reset() {
    row_max[0] = row_max[1] = kInitialMax;
    row_sum[0] = row_sum[1] = 0.f;
  }

  // Turn the raw scores of one page into probabilities relative to the new running max, in place.
  // `rescale[i]` is what the output accumulated so far must be multiplied by. Masked version: token
  // token0 + column is visible to row i only below limit[i].
  template <bool kMasked>
  __device__ __forceinline__ void update(float (&s)[32], float scale_log2, const FragmentCoords& at,
                                         int token0, const int (&limit)[2], float (&rescale)[2]) {
    float new_max[2] = {row_max[0], row_max[1]};
    for_each_score(at, [&](int k, int i, int column) {
      float x = s[k] * scale_log2;
      // A select, not an add: stale tokens may be NaN and must vanish.
      if (kMasked && token0 + column >= limit[i]) x = -positive_infinity();
      s[k] = x;
      new_max[i] = fmaxf(new_max[i], x);
    });
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      new_max[i] = quad_max(new_max[i]);
      rescale[i] = exp2f(row_max[i] - new_max[i]);
      row_max[i] = new_max[i];
      row_sum[i] *= rescale[i];
    }
    for_each_score(at, [&](int k, int i, int) {
      s[k] = exp2f(s[k] - row_max[i]);
      row_sum[i] += s[k];
    });
  }
};

// Probabilities as wgmma A fragments: PV k-step `step` covers columns 16*step .. +16, which are the
// accumulator blocks j = 2*step (registers 0, 1) and 2*step + 1 (registers 2, 3), rows 0 and 1 each.
__device__ __forceinline__ void pack_probabilities(const float (&s)[32], uint32_t (&frag)[4][4]) {
#pragma unroll
  for (int step = 0; step < 4; ++step) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = 2 * step + r / 2;
      const int i = r % 2;
      const Element2 pair = to_element2(s[4 * j + 2 * i], s[4 * j + 2 * i + 1]);
      frag[step][r] = *reinterpret_cast<const uint32_t*>(&pair);
    }
  }
}

// Write the packed probabilities into the 64 x 64 swizzled P tile that warpgroup 1 reads with wgmma.
__device__ __forceinline__ void store_probabilities(const uint32_t (&frag)[4][4], uint8_t* tile,
                                                    const FragmentCoords& at) {
#pragma unroll
  for (int step = 0; step < 4; ++step) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = 2 * step + r / 2;
      const int row = at.row[r % 2];
      *reinterpret_cast<uint32_t*>(tile + row * kRowBytes + ((j ^ (row & 7)) << 4) + at.column * 2) =
          frag[step][r];
    }
  }
}

template <int N>
__device__ __forceinline__ void scale_rows(float (&o)[N], const float (&factor)[2]) {
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      o[4 * j + 2 * i] *= factor[i];
      o[4 * j + 2 * i + 1] *= factor[i];
    }
  }
}

}  // namespace flashmla
