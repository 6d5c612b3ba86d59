// Synchronisation verbs: mbarriers for the TMA pipeline, named barriers between warpgroups, fences.
#pragma once
#include "decode_config.cuh"

namespace flashmla {

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// How far past a kernel's dynamic shared memory its storage starts: at the next 1024-byte boundary (128-byte
// swizzle patterns are anchored to 1024-byte boundaries; each kernel asks for 1024 bytes of slack at launch).
// The kernel adds this offset to the shared array itself, so that the compiler keeps every access in the
// shared space (a helper that returned the aligned storage itself made decode.cu lose the folded offsets
// of its barrier addresses under NVRTC 13.0.88).
__device__ __forceinline__ uint32_t storage_offset(const void* shared_array) {
  return (1024 - (smem_addr(shared_array) & 1023)) & 1023;
}

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}

// Arrive once and announce that `bytes` will land through TMA before the phase completes.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

// One plain arrival (a consumer's "these boxes are free", the FP8 converter's "this box is converted").
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Whether the phase with the given parity has completed (the thread may be suspended a while first).
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, int parity) {
  uint32_t done;
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n"
      "}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Spin until the phase has completed; for a single thread (a loader lane).
__device__ __forceinline__ void mbarrier_wait_single(uint64_t* bar, int parity) {
  while (!mbarrier_try_wait(bar, parity)) {
  }
}

// Spin until the phase has completed, with a loop condition the compiler can see is warp-uniform. Used
// between wgmmas of one batch: a wait it cannot prove uniform makes ptxas serialise the batch (C7520).
__device__ __forceinline__ void mbarrier_wait_uniform(uint64_t* bar, int parity) {
  while (!__all_sync(0xffffffffu, mbarrier_try_wait(bar, parity))) {
  }
}

// The non-.aligned form: the two warpgroups reach the same barrier from different instructions
// (their role code differs), which the .aligned form (`bar.sync`) leaves undefined.
__device__ __forceinline__ void named_barrier_sync(NamedBarrier id, int threads) {
  asm volatile("barrier.sync %0, %1;" ::"r"(int(id)), "r"(threads) : "memory");
}

// named_barrier_sync that also tells every thread whether `pred` held in any of them.
__device__ __forceinline__ bool named_barrier_any(NamedBarrier id, int threads, bool pred) {
  uint32_t any;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n barrier.red.or.pred q, %2, %3, p;\n selp.u32 %0, 1, 0, q;\n}"
      : "=r"(any)
      : "r"(uint32_t(pred)), "r"(int(id)), "r"(threads)
      : "memory");
  return any != 0;
}

// Ordinary smem stores that wgmma or TMA will read next must pass this fence before the barrier.
__device__ __forceinline__ void fence_generic_to_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// A 4-byte global -> shared copy that the issuing thread does not wait for, and the wait that makes
// its copies visible to it. A page stream reads its next block-table entry this way: a plain load
// stored to shared memory would hold the loading warp (and with it its warpgroup's next wgmma) for
// the whole global-memory latency at every refill.
__device__ __forceinline__ void async_copy_u32(int* dst, const int* src) {
  asm volatile(
      "cp.async.ca.shared.global [%0], [%1], 4;\n"
      "cp.async.commit_group;" ::"r"(smem_addr(dst)),
      "l"(__cvta_generic_to_global(src))
      : "memory");
}
// 16 bytes global -> shared without passing through registers; with `bytes` = 0 the destination is
// zero-filled and nothing is read.
__device__ __forceinline__ void async_copy_16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void async_copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void async_copy_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Programmatic dependent launch: let the combine kernel's launch begin while this grid runs.
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// The helper warpgroup hands registers to the consumers (decode_config.cuh, kHelperRegisters).
template <int kRegisters = kHelperRegisters>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters = kConsumerRegisters>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

}  // namespace flashmla
