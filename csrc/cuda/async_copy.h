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
//
// Bulk copies (cp.async.bulk, sm_90), completing on an mbarrier in shared
// memory (vk_emu::bulk_copy and vk_emu::mbarrier_* under the CPU execution):
//  - mbarrier_init(bar, count): `count` arrivals a phase; before a barrier
//    that orders it before any other use.
//  - mbarrier_arrive_expect_tx(bar, bytes): one arrival, and `bytes` more
//    that the phase waits for.
//  - bulk_copy_async(dst, src, bytes, bar): `bytes` (a multiple of 16) from
//    global src to shared dst, both 16-byte aligned, completing on bar. The
//    copy reads and writes through the async proxy: a thread that wrote dst
//    through the generic proxy runs fence_proxy_async_shared() before the
//    barrier that orders that write before the copy, and the issuing thread
//    runs fence_proxy_async_global() after it (src was written by other CTAs,
//    before the grid's or cluster's barrier). Each fence covers one state
//    space: on sm_90a the one of all state spaces (fence.proxy.async) is a
//    GPU-scope MEMBAR, which waits for every global store of the thread
//    still in flight; the shared one is a CTA-scope MEMBAR, the global one
//    none.
//  - mbarrier_wait(bar, parity): until the phase of that parity has
//    completed; the copies that completed on it are then visible to the
//    thread. A wait that lasts 2^36 cycles (about half a minute) traps: a
//    phase that can never complete is an error, not a hung GPU.
// Only the tensor-core kernels' staging on sm_90 issues them (the host checks).
//
// Stores into the shared memory of another CTA of the cluster, completing on
// an mbarrier there (st.async, sm_90; vk_emu::store_async under the CPU
// execution), the cluster form's exchange (rnn_persistent.cuh):
//  - store16_async_to(dst, v, bar, rank): the 16 bytes v into CTA `rank` of
//    the cluster, at the place of its shared memory that corresponds to dst
//    in the caller's own (16-byte aligned), completing on the mbarrier there
//    that corresponds to bar: 16 bytes of that phase's expected ones. No
//    fence: the mbarrier's phase completes after the store has.
//  - mbarrier_wait_cluster(bar, parity): mbarrier_wait at cluster scope,
//    then an acquire fence restricted to shared memory
//    (fence.acquire.sync_restrict::shared::cluster.cluster): what other
//    CTAs' stores that completed on the phase wrote is visible to the thread
//    after it, without the L1 invalidation (CCTL.IVALL) of a wait with
//    acquire semantics at cluster scope.
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

#if defined(__CUDA_ARCH__) && !defined(VK_EMULATE_CUDA)
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
#ifdef VK_EMULATE_CUDA
  vk_emu::mbarrier_init(bar, count);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count)
               : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#ifdef VK_EMULATE_CUDA
  vk_emu::mbarrier_arrive_expect_tx(bar, bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   shared_address(bar)),
               "r"(bytes)
               : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// Orders the thread's accesses through the generic proxy with those through
// the async proxy: of global memory (sm_90a: FENCE.VIEW.ASYNC.G), and of the
// CTA's shared memory (MEMBAR.ALL.CTA, FENCE.VIEW.ASYNC.S).
__device__ __forceinline__ void fence_proxy_async_global() {
#if !defined(VK_EMULATE_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void fence_proxy_async_shared() {
#if !defined(VK_EMULATE_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void bulk_copy_async(void* dst, const void* src, unsigned bytes,
                                                uint64_t* bar) {
#ifdef VK_EMULATE_CUDA
  vk_emu::bulk_copy(dst, src, bytes, bar);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(shared_address(dst)), "l"(src), "r"(bytes), "r"(shared_address(bar))
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// (Cluster: mbarrier_wait_cluster, else mbarrier_wait.)
template <bool Cluster>
__device__ __forceinline__ void mbarrier_wait_at(uint64_t* bar, unsigned parity) {
#ifdef VK_EMULATE_CUDA
  vk_emu::mbarrier_wait(bar, parity);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const long long start = clock64();
  unsigned done = 0;
  for (;;) {
    if constexpr (Cluster)
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.relaxed.cluster.shared::cta.b64 p, [%1], "
          "%2;\nselp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(shared_address(bar)), "r"(parity)
          : "memory");
    else
      asm volatile(
          "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
          "selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(shared_address(bar)), "r"(parity)
          : "memory");
    if (done) break;
    if (clock64() - start > (1ll << 36)) __trap();
  }
  if constexpr (Cluster)
    asm volatile("fence.acquire.sync_restrict::shared::cluster.cluster;\n" ::: "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
  mbarrier_wait_at<false>(bar, parity);
}
__device__ __forceinline__ void mbarrier_wait_cluster(uint64_t* bar, unsigned parity) {
  mbarrier_wait_at<true>(bar, parity);
}

__device__ __forceinline__ void store16_async_to(void* dst, const uint32_t (&v)[4], uint64_t* bar,
                                                 unsigned rank) {
#ifdef VK_EMULATE_CUDA
  vk_emu::store_async(vk_emu::cluster_shared(dst, rank), v, 16, vk_emu::cluster_shared(bar, rank));
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned to, at;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(to) : "r"(shared_address(dst)), "r"(rank));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(at) : "r"(shared_address(bar)), "r"(rank));
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];\n"
      ::"r"(to), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]), "r"(at)
      : "memory");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace cuda
}  // namespace varlen
