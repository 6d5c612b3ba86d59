// How many KV pages a cached length takes: the one definition that the planner (scheduler.cu) and the
// decode kernel (plan.cuh) share; flashmla_cupy/plan.py mirrors it. (check.cu counts the pages of a
// length already clamped to the table's capacity, in 64-bit arithmetic, the same number.)
#pragma once

namespace flashmla {

// A negative length is invalid input and counts as empty, as in plan.py. (seqlen - 1) / page_size + 1
// cannot overflow, unlike seqlen + page_size - 1.
__device__ __forceinline__ int pages_of(int seqlen, int page_size) {
  return seqlen <= 0 ? 0 : (seqlen - 1) / page_size + 1;
}

}  // namespace flashmla
