// Asynchronous copies from global to shared memory (cp.async, sm_80 and
// later), the form the persistent kernels stage their operands in, and what
// the CPU execution of CUDA runs in their place (vk_emu::async_copy, with
// CUDA's latest completion: at the wait).
//  - copy16_async(dst, src, src_bytes): 16 bytes into shared memory dst, the
//    first src_bytes (0 to 16) from global memory src, zeros after them; both
//    16-byte aligned (src a valid address even where src_bytes is 0).
//  - async_commit(): the thread's copies since its last commit form a group.
//  - async_wait<N>() (async_wait_for(N) where N is known at run time only):
//    waits until at most the N newest committed groups of the thread are
//    pending. What a copy wrote is visible to the thread that
//    issued it after the wait, and to the other threads of the block after a
//    barrier that follows it.
// Below sm_80 the copies are plain loads and stores (complete at once).
#pragma once

#include <cstdint>
#include <cstring>

namespace varlen {
namespace cuda {

__device__ __forceinline__ void copy16_async(void* dst, const void* src, int src_bytes) {
#ifdef VK_EMULATE_CUDA
  vk_emu::async_copy(dst, src, 16, size_t(src_bytes));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(src_bytes)
               : "memory");
#else
  union {
    uint4 whole;
    unsigned char bytes[16];
  } v{};
  for (int b = 0; b < src_bytes; ++b) v.bytes[b] = static_cast<const unsigned char*>(src)[b];
  *static_cast<uint4*>(dst) = v.whole;
#endif
}

__device__ __forceinline__ void async_commit() {
#ifdef VK_EMULATE_CUDA
  vk_emu::async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
  static_assert(N >= 0 && N <= 8, "cp.async.wait_group takes 0 to 8 here");
#ifdef VK_EMULATE_CUDA
  vk_emu::async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// async_wait<N>() for a count known at run time (at most 8; a branch a count).
template <int N = 0>
__device__ __forceinline__ void async_wait_for(int pending) {
  if constexpr (N >= 8) {
    async_wait<8>();
  } else {
    if (pending <= N) async_wait<N>();
    else async_wait_for<N + 1>(pending);
  }
}

}  // namespace cuda
}  // namespace varlen
