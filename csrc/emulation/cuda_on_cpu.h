// The CPU execution of CUDA code: the project's csrc/cuda sources compile as
// C++ under g++ with this header included first, and their kernels run on the
// CPU with CUDA's semantics (csrc/emulation/executor.cpp):
//  - the threads of a block run as fibers; each runs until it blocks at a
//    barrier or a warp intrinsic, in forward, reverse or seeded random thread
//    order (set_thread_order), so a kernel that forgets a barrier gives
//    different results in different orders;
//  - __syncthreads, cluster.sync() and grid.sync() are barriers; one reached by only some
//    threads, or a warp intrinsic that not every lane of its mask reaches, is
//    an error, not a hang;
//  - warp intrinsics complete when every lane of the mask has arrived; each
//    lane gets its own result, so a later shuffle cannot overwrite an earlier
//    one before all lanes have read it;
//  - shared memory is a per-block heap buffer filled with NaN bytes (0xff) at
//    every launch, declared with VK_SHARED / VK_DYNAMIC_SHARED (a bare
//    __shared__ does not compile here), so AddressSanitizer sees overflows;
//  - asynchronous copies into shared memory (cp.async, csrc/cuda/async_copy.h)
//    complete at the latest moment CUDA allows, the thread's wait, leaving
//    garbage in their destination until then;
//  - ldmatrix and mma.sync (csrc/cuda/mma.h) move each lane's registers as
//    the PTX ISA lays them out;
//  - CUDA_KERNEL_ASSERT raises an error naming block, thread and condition.
// Launches go through csrc/cuda/launch.h, which is <<<...>>> under nvcc.
#pragma once

#if defined(__CUDACC__)
#error "cuda_on_cpu.h is for the g++ build of the CUDA sources only"
#endif

#define VK_EMULATE_CUDA 1

#include <c10/macros/Macros.h>

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <type_traits>

// ------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__                                                              \
  static_assert(false, "bare __shared__ does not run under the CPU execution " \
                       "of CUDA: declare with VK_SHARED(T, name, n)");

// Kernels assert with CUDA_KERNEL_ASSERT; on the host torch's version aborts
// the process. Here it raises an error naming block, thread and condition.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                          \
  do {                                                                    \
    if (C10_UNLIKELY(!(cond))) ::vk_emu::assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)                                  \
  do {                                                                    \
    if (C10_UNLIKELY(!(cond))) ::vk_emu::assert_failed(msg, __FILE__, __LINE__); \
  } while (0)

// ------------------------------------------------------------ indices
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// CUDA's vector of two floats, 8-byte aligned as there.
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
// Variables, not macros: the executor sets them at every fiber switch.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace vk_emu {

// ------------------------------------------------------------ executor API
enum class Order : int { Forward = 0, Reverse = 1, Random = 2 };
void set_thread_order(Order order, uint64_t seed);
Order thread_order();

// The emulated device: what launches are checked against.
struct DeviceLimits {
  int sm_count = 132;
  // SMs that cooperative launches get at run time (0: sm_count). Fewer, as
  // where MPS gives a process part of a GPU, whose properties and occupancy
  // queries still show all of them: a grid the queries allowed is then
  // refused at launch (cooperative_fits).
  int runtime_sm_count = 0;
  int max_threads_per_block = 1024;
  int max_threads_per_sm = 2048;
  int max_blocks_per_sm = 32;
  size_t max_shared_per_block = 227 * 1024;
  size_t max_shared_per_sm = 228 * 1024;
  // Fibers of one cooperative launch (each has a guarded stack mapping; under
  // ThreadSanitizer each is a TSan thread too, of which it has about 8k).
#if defined(__SANITIZE_THREAD__)
  int max_cooperative_threads = 6144;
#else
  int max_cooperative_threads = 16384;
#endif
  // Blocks of a grid-stride launch (varlen::cuda::grid_for): the nvcc build
  // uses 65535 * 16; tests make it small so that the loops go round.
  int64_t max_grid_blocks = 65535 * 16;
  // Blocks of a thread block cluster: 16, sm_90's most (beyond 8, the portable
  // size, a kernel needs the NonPortableClusterSizeAllowed attribute).
  int max_cluster_blocks = 16;
  // Every tensor is a CPU one here: whether the ops take their lengths as
  // lengths in host memory (a CPU tensor next to a GPU input), else as lengths
  // in device memory (varlen::cuda::in_host_memory).
  bool lengths_in_host_memory = false;
};
DeviceLimits& device_limits();

// Launches run so far, for tests that check how work was launched.
struct LaunchCounts {
  uint64_t launches = 0;     // every launch, cooperative ones included
  uint64_t cooperative = 0;  // cooperative launches
  uint64_t last_cooperative_blocks = 0;  // grid size of the latest cooperative launch
  uint64_t clustered = 0;                // launches in clusters
  uint64_t last_cluster_grid = 0;        // grid size of the latest of them
  uint64_t last_cluster_blocks = 0;      // and its blocks per cluster
  uint64_t bulk_copies = 0;              // bulk copies issued (bulk_copy)
  uint64_t async_stores = 0;             // stores into other blocks' shared memory (store_async)
  uint64_t cluster_syncs = 0;            // cluster.sync() calls, counted per thread
};
LaunchCounts& launch_counts();

// Runs `body` as the kernel of a <<<grid, block, smem>>> launch. Throws
// std::runtime_error on a bad configuration or a kernel error. Cooperative
// launches run all blocks at once (grid.sync() allowed) and are refused, as
// cudaLaunchCooperativeKernel refuses them, when the grid cannot be resident.
// `cluster` > 0: a launch in thread block clusters of that many consecutive
// blocks along x (sm_90's cluster dimension; grid.x a multiple of it, at most
// max_cluster_blocks): the blocks of one cluster run together
// (cluster.sync() allowed), the clusters one after another, as CUDA orders
// clusters in no way. A plain launch (0) runs its blocks as clusters of one.
void launch(dim3 grid, dim3 block, size_t dynamic_smem, bool cooperative,
            const std::function<void()>& body, unsigned cluster = 0);
// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that
// can be resident on one SM of the emulated device (0: none fits).
uint64_t blocks_per_sm(uint64_t threads, size_t smem);
// Whether a cooperative launch of this grid can be resident at run time
// (runtime_sm_count), as cudaLaunchCooperativeKernel checks.
bool cooperative_fits(dim3 grid, dim3 block, size_t dynamic_smem);

[[noreturn]] void assert_failed(const char* cond, const char* file, int line);

// Synchronization and warp primitives, called by the intrinsics below.
// Barriers remember their call site: threads waiting at different
// __syncthreads() calls are a divergent barrier, an error.
void sync_block(const char* file, unsigned line);
int sync_block_reduce(int pred, int op, const char* file, unsigned line);  // op: 0 count, 1 and, 2 or
void sync_grid();
void sync_cluster();
unsigned cluster_blocks();  // blocks per cluster of the running launch (1 if not clustered)
// The address in the dynamic shared memory of block `rank` of the calling
// block's cluster that corresponds to `p` in the caller's own (distributed
// shared memory); an error for an address outside the caller's dynamic shared
// memory or a rank outside the cluster.
void* cluster_shared(const void* p, unsigned rank);
void yield();  // for spin waits on flags set by other threads or blocks
// Asynchronous copies from global to shared memory (sm_80's cp.async): a copy
// of `bytes` (4, 8 or 16) bytes to shared memory dst, aligned to that many, the
// first src_bytes from src and zeros after them; the copies of a thread since
// its last commit form a group; async_wait(n) completes all but the newest n
// committed groups. A copy completes at the latest moment CUDA allows, the
// wait: until then its destination holds garbage (NaN bytes), so a read that
// comes before the wait (or, by another thread, before a barrier after it)
// reads garbage. A source that changes between the copy and its wait, and a
// thread that exits with copies it did not wait for, are errors.
void async_copy(void* dst, const void* src, size_t bytes, size_t src_bytes);
void async_commit();
void async_wait(int pending);
// mbarriers in shared memory and bulk copies completing on them (sm_90's
// mbarrier.* and cp.async.bulk): init gives a barrier `count` arrivals a
// phase; arrive_expect_tx arrives once and adds `bytes` to the bytes the phase
// waits for; bulk_copy copies `bytes` (a multiple of 16, both addresses
// 16-byte aligned) from global src to shared dst, completing on `bar`; wait
// returns once the phase of parity `parity` has completed. A phase completes
// when all its arrivals are in and its copies have completed, which they do at
// the latest moment CUDA allows, the first wait after the last arrival: until
// then their destination holds garbage. Copies of more bytes than the phase
// expects are an error, as are a source that changes before its copy
// completes and a block that ends with copies not waited for; bytes expected
// that no copy brings leave the waits spinning, the livelock error.
void mbarrier_init(void* bar, unsigned count);
void mbarrier_arrive_expect_tx(void* bar, unsigned bytes);
void bulk_copy(void* dst, const void* src, size_t bytes, void* bar);
void mbarrier_wait(void* bar, unsigned parity);
// sm_90's st.async: `bytes` (4, 8 or 16, dst aligned to them) of `src` stored
// into dst in the shared memory of a block of the running cluster (an address
// from cluster_shared), completing on the mbarrier `bar` there (also from
// cluster_shared) as a bulk copy does: its destination holds garbage from the
// store until the phase completes, and the phase waits for its bytes. The
// value is taken at the store (a register's, on a GPU).
void store_async(void* dst, const void* src, size_t bytes, void* bar);
// Tensor cores (csrc/cuda/mma.h, which states the lane layouts): the warp's
// ldmatrix.x4 from shared memory (each lane's 16-byte row is read as the lane
// reaches it), its ldmatrix.x2 (the rows of lanes 0-15 only) and its
// mma.sync of a 16x8 float tile, the products of each element added in k
// order with fma in float. All need all 32 lanes of a
// whole warp; a lane's row address must be 16-byte aligned. TF32 operands
// are read with their low 13 mantissa bits dropped, as the tensor cores read
// a float that was not rounded by to_tf32 (to nearest, ties away from zero,
// as cvt.rna.tf32.f32 rounds).
enum class MmaKind : int { F16, BF16, TF32 };  // as varlen::cuda::MmaKind
void ldmatrix_x4(uint32_t* r, const void* row);
void ldmatrix_x2(uint32_t* r, const void* row);
void mma(MmaKind kind, float* d, const uint32_t* a, const uint32_t* b);
float to_tf32(float v);
enum class WarpOp : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Gather };
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width);
unsigned active_mask();  // the lanes of the calling warp that have not exited

// Shared memory of the current block: one buffer per declaration site, the
// same for every thread of the block (as a __shared__ variable is one per
// block, however often its function runs).
void* shared_array(const void* site, size_t bytes, size_t align);
void* dynamic_shared(size_t align);

template <typename T>
T* shared_array_of(const void* site, size_t n) {
  return static_cast<T*>(shared_array(site, n * sizeof(T), alignof(T)));
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move values of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace vk_emu

// One buffer per site and block; the static is only an address to key on.
// `name` is an array reference of a compile-time size, as under nvcc.
#define VK_SHARED(T, name, n)                                             \
  static char name##_vk_site;                                             \
  constexpr size_t name##_vk_n = (n);                                     \
  T(&name)[name##_vk_n] = *reinterpret_cast<T(*)[name##_vk_n]>(           \
      ::vk_emu::shared_array_of<T>(&name##_vk_site, name##_vk_n))
#define VK_DYNAMIC_SHARED(T, name) \
  T* const name = static_cast<T*>(::vk_emu::dynamic_shared(alignof(T)))

// ------------------------------------------------------------ intrinsics
using vk_site = std::source_location;
inline void __syncthreads(vk_site s = vk_site::current()) { vk_emu::sync_block(s.file_name(), s.line()); }
inline int __syncthreads_count(int p, vk_site s = vk_site::current()) {
  return vk_emu::sync_block_reduce(p, 0, s.file_name(), s.line());
}
inline int __syncthreads_and(int p, vk_site s = vk_site::current()) {
  return vk_emu::sync_block_reduce(p, 1, s.file_name(), s.line());
}
inline int __syncthreads_or(int p, vk_site s = vk_site::current()) {
  return vk_emu::sync_block_reduce(p, 2, s.file_name(), s.line());
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  vk_emu::warp_op(vk_emu::WarpOp::Sync, mask, 0, 0, 32);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return vk_emu::from_bits<T>(
      vk_emu::warp_op(vk_emu::WarpOp::ShflIdx, mask, vk_emu::to_bits(v), src, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return vk_emu::from_bits<T>(
      vk_emu::warp_op(vk_emu::WarpOp::ShflUp, mask, vk_emu::to_bits(v), int(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return vk_emu::from_bits<T>(
      vk_emu::warp_op(vk_emu::WarpOp::ShflDown, mask, vk_emu::to_bits(v), int(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return vk_emu::from_bits<T>(
      vk_emu::warp_op(vk_emu::WarpOp::ShflXor, mask, vk_emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(vk_emu::warp_op(vk_emu::WarpOp::Ballot, mask, pred != 0, 0, 32));
}
inline int __any_sync(unsigned mask, int pred) {
  return int(vk_emu::warp_op(vk_emu::WarpOp::Any, mask, pred != 0, 0, 32));
}
inline int __all_sync(unsigned mask, int pred) {
  return int(vk_emu::warp_op(vk_emu::WarpOp::All, mask, pred != 0, 0, 32));
}
inline unsigned __activemask() { return vk_emu::active_mask(); }

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// Atomics: the fibers of a launch share one OS thread, but atomic_ref keeps
// the memory semantics explicit.
template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomicSub(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_sub(v);
}
template <typename T>
T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v);
}
template <typename T>
T atomicCAS(T* p, T expected, T desired) {
  std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired);
  return expected;  // the old value either way
}
template <typename T>
T atomicMax(T* p, T v) {
  static_assert(std::is_integral_v<T>, "atomicMax takes integers, as in CUDA");
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  static_assert(std::is_integral_v<T>, "atomicMin takes integers, as in CUDA");
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old > v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}

// ------------------------------------------------------------ cooperative groups
namespace cooperative_groups {
struct grid_group {
  void sync() const { vk_emu::sync_grid(); }
};
struct thread_block {
  void sync(vk_site s = vk_site::current()) const { vk_emu::sync_block(s.file_name(), s.line()); }
};
// A thread block cluster along x (the only clusters the project launches).
struct cluster_group {
  void sync() const { vk_emu::sync_cluster(); }
  unsigned block_rank() const { return blockIdx.x % vk_emu::cluster_blocks(); }
  unsigned num_blocks() const { return vk_emu::cluster_blocks(); }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {
    return static_cast<T*>(vk_emu::cluster_shared(p, rank));
  }
};
inline grid_group this_grid() { return {}; }
inline cluster_group this_cluster() { return {}; }
inline thread_block this_thread_block() { return {}; }
}  // namespace cooperative_groups

// ------------------------------------------------------------ tensor cores
// ldmatrix.x4, ldmatrix.x2 and mma.sync (csrc/cuda/mma.h) are in vk_emu: warp-collective,
// with the PTX ISA's lane layouts (executor.cpp).
