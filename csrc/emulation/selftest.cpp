// Kernels that test the executor itself (tests/test_emulation.py), written as
// CUDA code is written in csrc/cuda. Each takes x (n,) float32 and writes
// out (n, k) float32, one row per thread, so that every thread's view is
// checked, not only thread 0's.
#include "emulation/cuda_on_cpu.h"

#include "cuda/async_copy.h"
#include "cuda/launch.h"
#include "cuda/mma.h"

#include <bit>
#include <cctype>
#include <string>

namespace varlen {
namespace {

// Two block sums in a row through one shared buffer, as the loss kernels
// reduce: shuffles within warps, warp totals through shared memory. `skip`
// removes one of the three barriers (1, 2, 3) to show the executor catches it.
__device__ float block_sum(float v, float* shared, int skip) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) shared[warp] = v;
  if (skip != 1) __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x / 32) ? shared[lane] : 0.f;
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shared[0] = v;
  }
  if (skip != 2) __syncthreads();
  const float out = shared[0];
  if (skip != 3) __syncthreads();
  return out;
}

__global__ void reduce_kernel(const float* x, float* out, int skip) {
  VK_SHARED(float, shared, 32);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float a = block_sum(x[i], shared, skip);
  const float b = block_sum(2.f * x[i], shared, skip);
  out[2 * i] = a;
  out[2 * i + 1] = b;
}

// Every warp intrinsic, each lane's results in a row of 10.
__global__ void warp_kernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  const float v = x[i];
  float* o = out + 10 * i;
  const unsigned full = 0xffffffffu;
  o[0] = __shfl_sync(full, v, (lane + 3) % 32);
  o[1] = __shfl_up_sync(full, v, 1);
  o[2] = __shfl_down_sync(full, v, 2);
  o[3] = __shfl_xor_sync(full, v, 5);
  o[4] = __shfl_sync(full, v, 1, 8);       // lane 1 of each group of 8
  o[5] = __shfl_down_sync(full, v, 4, 8);  // within groups of 8
  o[6] = float(__ballot_sync(full, v > 0.f) & 0xffffu);
  o[7] = float(__ballot_sync(full, v > 0.f) >> 16);
  o[8] = float(__any_sync(full, v > 1.f));
  o[9] = float(__all_sync(full, v > -1.f));
  // Only the even lanes, with a mask of their own.
  if (lane % 2 == 0) o[0] += 1000.f * __shfl_xor_sync(0x55555555u, v, 2);
  __syncwarp();
}

// Atomics on shared and global memory: out[0] = sum of x (float atomicAdd),
// out[1] = thread count (int), out[2] = max index (atomicMax), out[3] = count of
// CAS wins (exactly 1 per block).
__global__ void atomics_kernel(const float* x, float* out, int* counters) {
  VK_SHARED(int, block_count, 1);
  if (threadIdx.x == 0) block_count[0] = 0;
  __syncthreads();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&out[0], x[i]);
  atomicAdd(&block_count[0], 1);
  atomicMax(&counters[0], i);
  if (atomicCAS(&counters[1 + blockIdx.x], 0, 1) == 0) atomicAdd(&counters[1 + gridDim.x], 1);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&counters[2 + gridDim.x], block_count[0]);
  __threadfence();
}

// Cooperative: each block writes its sum, grid.sync(), every thread reads all.
// Without the grid.sync (`sync` false) blocks read sums others may not have
// written: a race in global memory.
__global__ void grid_kernel(const float* x, float* out, float* partial, bool sync) {
  VK_SHARED(float, shared, 32);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float s = block_sum(x[i], shared, 0);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
  if (sync) cooperative_groups::this_grid().sync();
  float total = 0.f;
  for (unsigned b = 0; b < gridDim.x; ++b) total += partial[b];
  out[i] = total;
}

// In clusters: each block writes its sum, cluster.sync(), every thread reads
// the sums of its cluster's blocks (`mode` 0), or reads them with no
// cluster.sync() (1: a race), or reads the next cluster's after its own
// cluster.sync() (2: a race too, as a cluster barrier orders no other cluster).
__global__ void cluster_kernel(const float* x, float* out, float* partial, int mode) {
  VK_SHARED(float, shared, 32);
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float s = block_sum(x[i], shared, 0);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
  if (mode != 1) cluster.sync();
  const unsigned n = cluster.num_blocks(), first = blockIdx.x - cluster.block_rank();
  const unsigned from = mode == 2 ? (first + n) % gridDim.x : first;
  float total = 0.f;
  for (unsigned b = 0; b < n; ++b) total += partial[from + b];
  out[i] = total;
}

// Dynamic shared memory: each thread writes its slot, reads its mirror.
__global__ void dynamic_kernel(const float* x, float* out) {
  VK_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
  out[2 * i] = buf[t];  // before any write: the poison (NaN)
  buf[t] = x[i];
  __syncthreads();
  out[2 * i + 1] = buf[blockDim.x - 1 - t];
}

__global__ void assert_kernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  CUDA_KERNEL_ASSERT(x[i] >= 0.f && "x must be non-negative");
  out[i] = x[i];
}

// Half the threads leave before a barrier the others wait at.
__global__ void divergent_barrier_kernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x % 2) return;
  __syncthreads();
  out[i] = x[i];
}

// Odd lanes leave; even lanes shuffle with the full mask (and read the odd ones).
__global__ void divergent_warp_kernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x % 2) return;
  out[i] = __shfl_down_sync(0xffffffffu, x[i], 1);
}

// Threads wait at two different barriers: a divergent barrier.
__global__ void two_barriers_kernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (threadIdx.x < 16) {
    __syncthreads();
    out[i] = x[i];
  } else {
    __syncthreads();
    out[i] = -x[i];
  }
}

// Lane arguments outside [0, 32) (PTX uses their low 5 bits) and a partial
// last warp shuffling among its active lanes: out (n, 3).
__global__ void lane_args_kernel(const float* x, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const unsigned active = __activemask();
  out[3 * i] = __shfl_xor_sync(active, x[i], 33);      // lane ^ 1
  out[3 * i + 1] = __shfl_sync(active, x[i], 32 + 2);  // lane 2 of the warp
  out[3 * i + 2] = float(std::popcount(active));
}

// One tensor-core product per warp, as the persistent kernels form it (mma.h):
// A (16 x K, x[0, 16K)) and W (16 x K, x[16K, 32K)), row-major in shared
// memory with rows padded by 16 bytes, loaded by ldmatrix; D = 0.5 + A W^T by
// two mma.sync of 8 columns. Each thread's row of out (n, 22): its D
// registers (both halves), then the bits of its 4 ldmatrix registers of A and
// of its 4 of W; then, with W's columns 8-15 loaded alone by ldmatrix.x2
// (lanes 16-31 giving misaligned addresses, which it does not read), the D
// registers of that half and the bits of its 2 registers.
// mode 1: lane 3 gives a misaligned row; mode 2: lanes 16-31 exit first;
// mode 3: lanes 16-31 skip the ldmatrix of A (a divergent warp).
template <typename T>
__global__ void mma_kernel(const float* x, float* out, int mode) {
  constexpr int K = std::is_same_v<T, float> ? 8 : 16, E = 16 / int(sizeof(T)), ld = K + E;
  VK_SHARED(T, a_s, 16 * ld);
  VK_SHARED(T, w_s, 16 * ld);
  const int lane = threadIdx.x % 32, i = blockIdx.x * blockDim.x + threadIdx.x;
  for (int e = threadIdx.x; e < 16 * K; e += blockDim.x) {
    a_s[e / K * ld + e % K] = T(x[e]);
    w_s[e / K * ld + e % K] = T(x[16 * K + e]);
  }
  __syncthreads();
  if (mode == 2 && lane >= 16) return;
  uint32_t a[4] = {}, b[4];
  if (mode != 3 || lane < 16)
    cuda::ldmatrix_x4(
        a, cuda::smem_row_of(a_s + (lane % 16) * ld + lane / 16 * E + (mode == 1 && lane == 3)));
  cuda::ldmatrix_x4(b, cuda::smem_row_of(w_s + (lane % 8 + lane / 16 * 8) * ld + lane / 8 % 2 * E));
  float d[2][4];
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 4; ++r) d[h][r] = 0.5f;
  for (int h = 0; h < 2; ++h) {
    constexpr cuda::MmaKind kind = std::is_same_v<T, float>            ? cuda::MmaKind::TF32
                                   : std::is_same_v<T, c10::BFloat16> ? cuda::MmaKind::BF16
                                                                      : cuda::MmaKind::F16;
    cuda::mma_16x8<kind>(d[h], a, b[2 * h], b[2 * h + 1]);
  }
  uint32_t b2[2];
  cuda::ldmatrix_x2(b2, cuda::smem_row_of(w_s + (8 + lane % 8) * ld + lane / 8 % 2 * E +
                                          (lane >= 16 ? 1 : 0)));
  float d2[4] = {0.5f, 0.5f, 0.5f, 0.5f};
  {
    constexpr cuda::MmaKind kind = std::is_same_v<T, float>            ? cuda::MmaKind::TF32
                                   : std::is_same_v<T, c10::BFloat16> ? cuda::MmaKind::BF16
                                                                      : cuda::MmaKind::F16;
    cuda::mma_16x8<kind>(d2, a, b2[0], b2[1]);
  }
  float* const o = out + 22 * i;
  for (int h = 0; h < 2; ++h)
    for (int r = 0; r < 4; ++r) o[4 * h + r] = d[h][r];
  std::memcpy(o + 8, a, 16);
  std::memcpy(o + 12, b, 16);
  for (int r = 0; r < 4; ++r) o[16 + r] = d2[r];
  std::memcpy(o + 20, b2, 8);
}

// Cooperative: block 0's last thread publishes a flag the other blocks spin on.
__global__ void spin_kernel(const float* x, float* out, int* flag) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (blockIdx.x == 0 && threadIdx.x == blockDim.x - 1) {
    out[i] = x[i];
    __threadfence();
    atomicExch(flag, 1);
    return;
  }
  while (atomicAdd(flag, 0) == 0) vk_emu::yield();
  out[i] = x[i] + 1.f;
}

// Writes past a 32-element shared array when the block has more than 32
// threads: AddressSanitizer must report it (only run under ASan).
__global__ void shared_overflow_kernel(const float* x, float* out) {
  VK_SHARED(float, s, 32);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = x[i];
  __syncthreads();
  out[i] = s[threadIdx.x];
}

// Each block's thread 0 stores its index in out[0], plain stores: a race
// between blocks in global memory whatever order they run in.
__global__ void blocks_store_kernel(float* out) {
  if (threadIdx.x == 0) out[0] = float(blockIdx.x);
}

// Lane 0 fills a tile the other lanes then read, with a __syncwarp between
// (`sync`) or without: ordered by the warp barrier, or a race.
__global__ void warp_handoff_kernel(const float* x, float* out, bool sync) {
  VK_SHARED(float, tile, 1024);
  const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
  float* mine = tile + (threadIdx.x / 32) * 32;
  if (lane == 0)
    for (int k = 0; k < 32; ++k) mine[k] = x[i + k];
  if (sync) __syncwarp();
  out[i] = mine[lane];
}

// Every block waits for a flag the last block sets: fine on a GPU where all
// blocks are resident; a plain launch guarantees no such thing.
__global__ void wait_for_last_block_kernel(float* out, int* flag) {
  if (blockIdx.x == gridDim.x - 1) {
    atomicExch(flag, 1);
    return;
  }
  while (atomicAdd(flag, 0) == 0) vk_emu::yield();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.f;
}

// Asynchronous copies into shared memory: every 4th thread copies 4 floats of
// its block's x into dynamic shared memory, the first 2 only where its group
// of 4 is odd (zeros after them), through two groups (the first two floats,
// then the rest); then each thread reads the value of the thread 4 after it.
// mode 0: waits for both groups, then a barrier; 1: reads before its waits
// (garbage); 2: no barrier (a race: another thread's copy may not be done);
// 3: waits for the older group only (await<1>), reads its own first value and,
// after a barrier, the value 4 after it; 4: never waits (an error at exit);
// 5: changes the source before the wait (an error); 6: a misaligned copy (an
// error).
// Bulk copies completing on an mbarrier (after the block's floats in shared
// memory): thread 0 arrives expecting the block's bytes, each fourth thread
// copies 16 bytes of the source, everyone waits for the phase and reads its
// own value. mode 0: two phases, x then x2 (out's two columns); 1: also reads
// before the wait (garbage, column 1); 2: expects 16 bytes too many (the
// waits never end: livelock); 3: never waits (an error at the block's end);
// 4: changes the source before the wait (an error); 5: expects 16 bytes too
// few, every copy issued before the waits (an error; where a wait came
// first, the phase would complete early, as on a GPU); 6: a store over the
// mbarrier's bytes (an error at its next use); 7: a store into a copy's
// destination before it completes (an error).
__global__ void bulk_copy_kernel(float* x, float* x2, float* out, int mode) {
  VK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x, n = blockDim.x, i = blockIdx.x * n + t;
  uint64_t* const bar = reinterpret_cast<uint64_t*>(s + n);
  if (t == 0) cuda::mbarrier_init(bar, 1);
  __syncthreads();
  if (mode == 6 && t == 1) s[n + 1] = 0.f;  // (the mbarrier's second 4 bytes)
  for (int round = 0; round < (mode == 0 ? 2 : 1); ++round) {
    float* const src = (round == 0 ? x : x2) + blockIdx.x * n + t;
    const unsigned bytes = unsigned(n) * 4u;
    if (t == 0)
      cuda::mbarrier_arrive_expect_tx(bar, mode == 2 ? bytes + 16 : mode == 5 ? bytes - 16 : bytes);
    if (t % 4 == 0) {
      cuda::fence_proxy_async_global();
      cuda::bulk_copy_async(s + t, src, 16, bar);
      if (mode == 4) src[0] += 1.f;
      if (mode == 7) s[t + 1] = 0.f;
    }
    if (mode == 3) return;
    if (mode == 5) __syncthreads();  // every copy issued before the first wait
    if (mode == 1) out[2 * i + 1] = s[t];
    cuda::mbarrier_wait(bar, unsigned(round));
    out[2 * i + round] = s[t];
    __syncthreads();  // read by all before the next phase's copies
  }
}

// Stores into the next block of a cluster of 4 completing on its mbarrier
// (st.async; the block's floats, then the mbarrier, in shared memory): thread
// 0 of each block arms its mbarrier for the block's bytes, a cluster barrier,
// then each fourth thread stores its 4 values (16 bytes) into the same place
// of the next block's shared memory; every thread waits for its block's phase
// and reads its own value, the previous block's. mode 0: two phases, x then
// x2 (out's two columns), the second armed after every value of the first
// was read; 1: every thread also reads before any thread of its block waits
// (garbage, column 1); 2: expects 16
// bytes too many (the waits never end: livelock); 3: never waits (an error at
// the block's end); 4: a plain store into a destination after the st.async,
// before it completes (an error); 5: a misaligned store (an error); 6: expects
// 16 bytes too few (an error, in the forward order: a wait sees every store
// issued; in an order where a wait sees all but one, the phase completes then,
// and the last store is left to a phase nothing waits for).
__global__ void store_async_kernel(const float* x, const float* x2, float* out, int mode) {
  VK_DYNAMIC_SHARED(float, s);
  namespace cg = cooperative_groups;
  const int t = threadIdx.x, n = blockDim.x, i = blockIdx.x * n + t;
  uint64_t* const bar = reinterpret_cast<uint64_t*>(s + n);
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned next = (cluster.block_rank() + 1) % cluster.num_blocks();
  if (t == 0) cuda::mbarrier_init(bar, 1);
  for (int round = 0; round < (mode == 0 ? 2 : 1); ++round) {
    const unsigned bytes = unsigned(n) * 4u;
    if (t == 0) cuda::mbarrier_arrive_expect_tx(bar, mode == 2 ? bytes + 16 : mode == 6 ? bytes - 16 : bytes);
    cluster.sync();  // every mbarrier armed (and every value of the last phase read)
    if (t % 4 == 0) {
      uint32_t w[4];
      std::memcpy(w, (round == 0 ? x : x2) + blockIdx.x * n + t, 16);
      cuda::store16_async_to(s + t + (mode == 5 ? 1 : 0), w, bar, next);
      if (mode == 4) *cluster.map_shared_rank(s + t + 1, next) = 0.f;
    }
    if (mode == 1) {
      out[2 * i + 1] = s[t];
      __syncthreads();  // (every thread of the block reads before any waits)
    }
    if (mode != 3) {
      cuda::mbarrier_wait_cluster(bar, unsigned(round));
      out[2 * i + round] = s[t];
    }
  }
  cluster.sync();  // every block's stores completed before any block ends
}

__global__ void async_copy_kernel(float* x, float* out, int mode) {
  VK_DYNAMIC_SHARED(float, s);
  const int t = threadIdx.x, n = blockDim.x, i = blockIdx.x * n + t;
  float* const src = x + blockIdx.x * n + t;
  if (t % 4 == 0) {
    const int valid = (t / 4) % 2 == 1 ? 8 : 16;
    cuda::copy16_async(s + t + (mode == 6 ? 1 : 0), src, valid);
    cuda::async_commit();
    if (mode == 5) src[0] += 1.f;
    cuda::async_commit();  // an empty group
  }
  if (mode == 1) {
    out[2 * i] = s[t];
    out[2 * i + 1] = s[(t + 4) % n];
  }
  if (mode == 3) {
    cuda::async_wait<1>();  // the copy's group, not the newest (empty) one
    out[2 * i] = t % 4 == 0 ? s[t] : 0.f;
    cuda::async_wait<0>();
    __syncthreads();
    out[2 * i + 1] = s[(t + 4) % n];
    return;
  }
  if (mode != 4) cuda::async_wait<0>();
  if (mode != 2) __syncthreads();
  if (mode != 1) {
    out[2 * i] = s[t];
    out[2 * i + 1] = s[(t + 4) % n];
  }
}

at::Tensor selftest(const at::Tensor& x_in, c10::string_view name_view, int64_t blocks,
                    int64_t threads) {
  const std::string name(name_view);
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  TORCH_CHECK(x.numel() == blocks * threads, "x must have blocks * threads elements");
  const float* xp = x.const_data_ptr<float>();
  const dim3 grid{unsigned(blocks)}, block{unsigned(threads)};
  const auto stream = cuda::current_stream();
  auto f32 = x.options();
  if (name.rfind("reduce", 0) == 0) {
    const int skip = name == "reduce" ? 0 : std::stoi(name.substr(name.size() - 1));
    at::Tensor out = at::empty({x.numel(), 2}, f32);
    cuda::launch(reduce_kernel, grid, block, 0, stream, xp, out.data_ptr<float>(), skip);
    return out;
  }
  if (name == "warp") {
    at::Tensor out = at::empty({x.numel(), 10}, f32);
    cuda::launch(warp_kernel, grid, block, 0, stream, xp, out.data_ptr<float>());
    return out;
  }
  if (name == "atomics") {
    at::Tensor out = at::zeros({1}, f32);
    at::Tensor counters = at::zeros({blocks + 3}, x.options().dtype(at::kInt));
    cuda::launch(atomics_kernel, grid, block, 0, stream, xp, out.data_ptr<float>(),
                 counters.data_ptr<int>());
    return at::cat({out, counters.to(at::kFloat)});
  }
  if (name == "grid_sync" || name == "grid_race") {
    const bool sync = name == "grid_sync";
    at::Tensor out = at::empty({x.numel()}, f32), partial = at::zeros({blocks}, f32);
    float* o = out.data_ptr<float>();
    float* p = partial.data_ptr<float>();
    vk_emu::launch(grid, block, 0, /*cooperative=*/true, [&] { grid_kernel(xp, o, p, sync); });
    return out;
  }
  if (name.rfind("cluster", 0) == 0 || name == "cross_cluster_race") {
    // "cluster_sync", "cluster_race", "cross_cluster_race": clusters of 4
    // blocks; "cluster_N": of N blocks.
    const int mode = name == "cluster_race" ? 1 : name == "cross_cluster_race" ? 2 : 0;
    const unsigned cluster =
        name.rfind("cluster_", 0) == 0 && std::isdigit(static_cast<unsigned char>(name[8]))
            ? unsigned(std::stoi(name.substr(8)))
            : 4u;
    at::Tensor out = at::empty({x.numel()}, f32), partial = at::zeros({blocks}, f32);
    cuda::launch_cluster(cluster_kernel, grid, block, cluster, 0, stream, xp,
                         out.data_ptr<float>(), partial.data_ptr<float>(), mode);
    return out;
  }
  if (name == "warp_handoff" || name == "warp_handoff_race") {
    TORCH_CHECK(threads % 32 == 0 && threads <= 1024, "warp_handoff: whole warps");
    at::Tensor out = at::empty({x.numel()}, f32);
    cuda::launch(warp_handoff_kernel, grid, block, 0, stream, xp, out.data_ptr<float>(),
                 name == "warp_handoff");
    return out;
  }
  if (name == "grid_sync_noncooperative") {
    at::Tensor out = at::empty({x.numel()}, f32), partial = at::empty({blocks}, f32);
    cuda::launch(grid_kernel, grid, block, 0, stream, xp, out.data_ptr<float>(),
                 partial.data_ptr<float>(), true);
    return out;
  }
  if (name == "dynamic") {
    at::Tensor out = at::empty({x.numel(), 2}, f32);
    cuda::launch(dynamic_kernel, grid, block, threads * sizeof(float), stream, xp,
                 out.data_ptr<float>());
    return out;
  }
  if (name.rfind("async_", 0) == 0) {
    static const char* modes[] = {"async_copy", "async_read_early", "async_race", "async_older",
                                  "async_exit", "async_source_changed", "async_misaligned"};
    int mode = -1;
    for (int m = 0; m < 7; ++m) mode = name == modes[m] ? m : mode;
    TORCH_CHECK(mode >= 0, "unknown self-test '", name, "'");
    TORCH_CHECK(threads % 4 == 0, "async tests: a multiple of 4 threads");
    at::Tensor xc = x.clone(), out = at::zeros({x.numel(), 2}, f32);
    cuda::launch(async_copy_kernel, grid, block, threads * sizeof(float), stream,
                 xc.data_ptr<float>(), out.data_ptr<float>(), mode);
    return out;
  }
  if (name.rfind("bulk_", 0) == 0) {
    static const char* modes[] = {"bulk_copy", "bulk_read_early", "bulk_bytes", "bulk_unwaited",
                                  "bulk_source_changed", "bulk_excess", "bulk_overwrite",
                                  "bulk_store_in_flight"};
    int mode = -1;
    for (int m = 0; m < 8; ++m) mode = name == modes[m] ? m : mode;
    TORCH_CHECK(mode >= 0, "unknown self-test '", name, "'");
    TORCH_CHECK(threads % 4 == 0, "bulk tests: a multiple of 4 threads");
    at::Tensor xc = x.clone(), x2 = x * 2, out = at::zeros({x.numel(), 2}, f32);
    cuda::launch(bulk_copy_kernel, grid, block, threads * sizeof(float) + 16, stream,
                 xc.data_ptr<float>(), x2.data_ptr<float>(), out.data_ptr<float>(), mode);
    return out;
  }
  if (name.rfind("dsmem_", 0) == 0) {
    static const char* modes[] = {"dsmem_store", "dsmem_read_early", "dsmem_bytes",
                                  "dsmem_unwaited", "dsmem_store_in_flight", "dsmem_misaligned",
                                  "dsmem_excess"};
    int mode = -1;
    for (int m = 0; m < 7; ++m) mode = name == modes[m] ? m : mode;
    TORCH_CHECK(mode >= 0, "unknown self-test '", name, "'");
    TORCH_CHECK(threads % 4 == 0 && blocks % 4 == 0,
                "dsmem tests: a multiple of 4 threads, clusters of 4 blocks");
    at::Tensor x2 = x * 2, out = at::zeros({x.numel(), 2}, f32);
    cuda::launch_cluster(store_async_kernel, grid, block, 4, threads * sizeof(float) + 16, stream,
                         xp, x2.const_data_ptr<float>(), out.data_ptr<float>(), mode);
    return out;
  }
  if (name.rfind("mma_", 0) == 0) {
    // "mma_bf16", "mma_f16", "mma_tf32", then "_misaligned", "_partial" or "_diverged".
    const int mode = name.find("_misaligned") != std::string::npos ? 1
                     : name.find("_partial") != std::string::npos  ? 2
                     : name.find("_diverged") != std::string::npos ? 3
                                                                   : 0;
    at::Tensor out = at::zeros({x.numel(), 22}, f32);
    TORCH_CHECK(x.numel() >= 512, "mma tests: at least 512 elements of x");
    if (name.rfind("mma_bf16", 0) == 0)
      cuda::launch(mma_kernel<c10::BFloat16>, grid, block, 0, stream, xp, out.data_ptr<float>(), mode);
    else if (name.rfind("mma_f16", 0) == 0)
      cuda::launch(mma_kernel<c10::Half>, grid, block, 0, stream, xp, out.data_ptr<float>(), mode);
    else if (name.rfind("mma_tf32", 0) == 0)
      cuda::launch(mma_kernel<float>, grid, block, 0, stream, xp, out.data_ptr<float>(), mode);
    else
      TORCH_CHECK(false, "unknown self-test '", name, "'");
    return out;
  }
  if (name == "lane_args") {
    at::Tensor out = at::empty({x.numel(), 3}, f32);
    cuda::launch(lane_args_kernel, grid, block, 0, stream, xp, out.data_ptr<float>());
    return out;
  }
  if (name == "spin") {
    at::Tensor out = at::empty({x.numel()}, f32);
    at::Tensor flag = at::zeros({1}, x.options().dtype(at::kInt));
    float* o = out.data_ptr<float>();
    int* fl = flag.data_ptr<int>();
    vk_emu::launch(grid, block, 0, /*cooperative=*/true, [&] { spin_kernel(xp, o, fl); });
    return out;
  }
  at::Tensor out = at::zeros({x.numel()}, f32);
  if (name == "assert")
    cuda::launch(assert_kernel, grid, block, 0, stream, xp, out.data_ptr<float>());
  else if (name == "divergent_barrier")
    cuda::launch(divergent_barrier_kernel, grid, block, 0, stream, xp, out.data_ptr<float>());
  else if (name == "two_barriers")
    cuda::launch(two_barriers_kernel, grid, block, 0, stream, xp, out.data_ptr<float>());
  else if (name == "spin_noncooperative")
    cuda::launch(wait_for_last_block_kernel, grid, block, 0, stream, out.data_ptr<float>(),
                 at::zeros({1}, x.options().dtype(at::kInt)).data_ptr<int>());
  else if (name == "shared_overflow")
    cuda::launch(shared_overflow_kernel, grid, block, 0, stream, xp, out.data_ptr<float>());
  else if (name == "blocks_store")
    cuda::launch(blocks_store_kernel, grid, block, 0, stream, out.data_ptr<float>());
  else if (name == "divergent_warp")
    cuda::launch(divergent_warp_kernel, grid, block, 0, stream, xp, out.data_ptr<float>());
  else
    TORCH_CHECK(false, "unknown self-test '", name, "'");
  return out;
}

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_FRAGMENT(varlen_kernels_emu, m) {
  m.def("selftest(Tensor x, str name, int blocks, int threads) -> Tensor");
}
TORCH_LIBRARY_IMPL(varlen_kernels_emu, CPU, m) { m.impl("selftest", &varlen::selftest); }
