// The host side of the CUDA kernels, in one place: the stream, the device
// guard, kernel launches (plain, cooperative, in clusters), shared-memory
// declarations and the op registration.
//
// Under nvcc this is the CUDA runtime (<<<grid, block, smem, stream>>>, the
// current stream, c10's device guard). In the emulation build (g++, with
// csrc/emulation/cuda_on_cpu.h included first) the same calls run the kernels
// on the CPU through the emulator, on CPU tensors, and need no CUDA runtime.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#ifdef VK_EMULATE_CUDA
// cuda_on_cpu.h (included first) provides dim3, the intrinsics, VK_SHARED.
#define VK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(varlen_kernels_emu, CPU, m)
#define VK_CUDA_LIBRARY "varlen_kernels_emu"  // where the CUDA kernels' ops live
#else
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define VK_SHARED(T, name, n) __shared__ T name[n]
#define VK_DYNAMIC_SHARED(T, name)                                    \
  extern __shared__ __align__(128) unsigned char vk_dynamic_smem_[]; \
  T* const name = reinterpret_cast<T*>(vk_dynamic_smem_)
#define VK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(varlen_kernels, CUDA, m)
#define VK_CUDA_LIBRARY "varlen_kernels"
#endif

namespace varlen {
namespace cuda {

#ifdef VK_EMULATE_CUDA
struct Stream {};
inline Stream current_stream() { return {}; }
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

// Whether an argument of a CUDA op (the lengths) lives in host memory: a CPU
// tensor next to GPU inputs. Under the emulation every tensor is a CPU one, and
// the emulated device says how the lengths are taken.
inline bool in_host_memory(const at::Tensor& t) {
#ifdef VK_EMULATE_CUDA
  (void)t;
  return ::vk_emu::device_limits().lengths_in_host_memory;
#else
  return t.is_cpu();
#endif
}

// Whether the current stream is being captured into a CUDA graph.
inline bool capturing() {
#ifdef VK_EMULATE_CUDA
  return false;
#else
  return at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
#endif
}

// Blocks for a grid-stride loop over n items, `per_block` at a time: never more
// than max_blocks (nor the build's cap), so an int64 count never narrows into a
// launch dimension.
inline unsigned grid_for(int64_t n, int64_t per_block, int64_t max_blocks = 65535 * 16) {
#ifdef VK_EMULATE_CUDA
  max_blocks = std::min(max_blocks, ::vk_emu::device_limits().max_grid_blocks);
#endif
  return static_cast<unsigned>(std::clamp<int64_t>((n + per_block - 1) / per_block, 1, max_blocks));
}

// Every kernel launch of the project goes through here.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream stream,
            Args&&... args) {
#ifdef VK_EMULATE_CUDA
  (void)stream;
  // Each thread calls the kernel with its own copy of the arguments, as each
  // CUDA thread has its own view of the parameters.
  ::vk_emu::launch(grid, block, smem, /*cooperative=*/false, [&] { kernel(args...); });
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

#ifndef VK_EMULATE_CUDA
// The current device's properties, as torch caches them (read once per device).
inline const cudaDeviceProp& device_properties() { return *at::cuda::getCurrentDeviceProperties(); }

// A launch's status `err`: false, the error cleared, where it is `refused` (the
// device's refusal of that launch at run time); true on success; any other
// error fails.
inline bool launch_status(cudaError_t err, cudaError_t refused) {
  if (err == refused) {
    (void)cudaGetLastError();
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}
#endif

// Largest dynamic shared memory one block may ask for (the opt-in limit).
inline size_t max_dynamic_smem() {
#ifdef VK_EMULATE_CUDA
  return ::vk_emu::device_limits().max_shared_per_block;
#else
  return device_properties().sharedMemPerBlockOptin;
#endif
}

// Streaming multiprocessors of the current device.
inline int64_t sm_count() {
#ifdef VK_EMULATE_CUDA
  return ::vk_emu::device_limits().sm_count;
#else
  return device_properties().multiProcessorCount;
#endif
}

// Major compute capability of the current device (the emulated one is a 9.0).
inline int compute_major() {
#ifdef VK_EMULATE_CUDA
  return 9;
#else
  return device_properties().major;
#endif
}

// Most blocks of `kernel` (block threads, smem bytes of dynamic shared memory)
// that can be resident at once on the current device: the grid limit of a
// cooperative launch. 0 when not even one block fits. On a GPU the answer is
// computed once per device, kernel, threads and smem, then remembered.
template <typename... Params>
int64_t cooperative_grid_limit(void (*kernel)(Params...), int threads, size_t smem) {
#ifdef VK_EMULATE_CUDA
  (void)kernel;
  const auto& d = ::vk_emu::device_limits();
  return std::min<int64_t>(int64_t(::vk_emu::blocks_per_sm(uint64_t(threads), smem)) * d.sm_count,
                           d.max_cooperative_threads / threads);
#else
  const cudaDeviceProp& prop = device_properties();
  if (smem > prop.sharedMemPerBlockOptin || !prop.cooperativeLaunch) return 0;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  using Key = std::tuple<int, const void*, int, size_t>;
  static std::mutex mutex;
  static std::map<Key, int64_t> known;
  const Key key{device, reinterpret_cast<const void*>(kernel), threads, smem};
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  // The attribute is a cap, not a reservation: set to the device's limit, so
  // that concurrent launches of other sizes never see a smaller one.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(prop.sharedMemPerBlockOptin)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  return known[key] = int64_t(per_sm) * prop.multiProcessorCount;
#endif
}

// A cooperative launch (cooperative_groups::this_grid().sync() allowed): every
// block is resident at once; a grid beyond cooperative_grid_limit is refused.
// Call cooperative_grid_limit for the kernel on the current device first (it
// sets the kernel's shared-memory cap there, once per device; a
// cudaDeviceReset would clear that cap and is not supported). Returns false,
// the error cleared, where the device refuses the grid as too large at run
// time (cudaErrorCooperativeLaunchTooLarge: fewer SMs than the limit saw, as
// under MPS); fails on any other error.
template <typename... Params, typename... Args>
bool launch_cooperative(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                        Stream stream, Args&&... args) {
#ifdef VK_EMULATE_CUDA
  (void)stream;
  if (!::vk_emu::cooperative_fits(grid, block, smem)) return false;
  ::vk_emu::launch(grid, block, smem, /*cooperative=*/true, [&] { kernel(args...); });
  return true;
#else
  std::tuple<Params...> held(std::forward<Args>(args)...);
  void* ptrs[sizeof...(Params) > 0 ? sizeof...(Params) : 1];
  std::apply([&](auto&... p) {
    int i = 0;
    ((ptrs[i++] = static_cast<void*>(&p)), ...);
  }, held);
  return launch_status(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), grid,
                                                   block, ptrs, smem, stream),
                       cudaErrorCooperativeLaunchTooLarge);
#endif
}

// Blocks of a thread block cluster that every device with clusters (sm_90 and
// later) can schedule, and the most the project launches (0 on devices without
// clusters): clusters beyond the portable size need the kernel's
// NonPortableClusterSizeAllowed attribute (max_active_clusters sets it), and
// whether the device can schedule them is max_active_clusters' answer.
constexpr int64_t kPortableClusterBlocks = 8;
inline int64_t max_cluster_blocks() {
#ifdef VK_EMULATE_CUDA
  return ::vk_emu::device_limits().max_cluster_blocks;
#else
  return device_properties().major >= 9 ? 16 : 0;
#endif
}

// Whether the code of `kernel` the current device runs was compiled from PTX
// for sm_90 or later (cudaFuncAttributes::ptxVersion; code just-in-time
// compiled from older PTX, such as the build's 8.0 PTX on an H100 whose
// TORCH_CUDA_ARCH_LIST left out 9.0, keeps its PTX's version): the kernels'
// clusters, mbarriers and bulk copies exist only in such code (elsewhere they
// trap). Remembered per device and kernel on a GPU; the emulated device's
// code has them.
template <typename... Params>
bool has_sm90_code(void (*kernel)(Params...)) {
#ifdef VK_EMULATE_CUDA
  (void)kernel;
  return true;
#else
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  using Key = std::tuple<int, const void*>;
  static std::mutex mutex;
  static std::map<Key, bool> known;
  const Key key{device, reinterpret_cast<const void*>(kernel)};
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  cudaFuncAttributes attributes;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel)));
  return known[key] = attributes.ptxVersion >= 90;
#endif
}

#ifndef VK_EMULATE_CUDA
// A launch configuration in clusters of `cluster` consecutive blocks along x;
// `attr` holds its cluster attribute (and must outlive it).
inline cudaLaunchConfig_t cluster_config(dim3 grid, dim3 block, size_t smem, Stream stream,
                                         int64_t cluster, cudaLaunchAttribute& attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = unsigned(cluster);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  return config;
}
#endif

// Most clusters of `cluster` blocks of `kernel` (block threads, smem bytes of
// dynamic shared memory) that can be resident at once on the current device,
// 0 when not even one can (or the device has no clusters). Remembered per
// device, kernel, threads, smem and cluster size on a GPU.
template <typename... Params>
int64_t max_active_clusters(void (*kernel)(Params...), int threads, size_t smem,
                            int64_t cluster) {
  if (cluster < 1 || cluster > max_cluster_blocks()) return 0;
#ifdef VK_EMULATE_CUDA
  (void)kernel;
  const auto& d = ::vk_emu::device_limits();
  if (cluster * threads > d.max_cooperative_threads) return 0;  // the emulator runs a cluster at once
  return int64_t(::vk_emu::blocks_per_sm(uint64_t(threads), smem)) * d.sm_count / cluster;
#else
  const cudaDeviceProp& prop = device_properties();
  if (smem > prop.sharedMemPerBlockOptin) return 0;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  using Key = std::tuple<int, const void*, int, size_t, int64_t>;
  static std::mutex mutex;
  static std::map<Key, int64_t> known;
  const Key key{device, reinterpret_cast<const void*>(kernel), threads, smem, cluster};
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  // The code that runs must have been compiled for sm_90 or later: a device
  // that JIT-compiles an older PTX (e.g. a newer GPU than the build's SASS)
  // runs a kernel without clusters.
  if (!has_sm90_code(kernel)) return known[key] = 0;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      int(prop.sharedMemPerBlockOptin)));
  if (cluster > kPortableClusterBlocks)  // a kernel-wide permission, never withdrawn
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = cluster_config(dim3(unsigned(cluster)), dim3(unsigned(threads)),
                                                   smem, nullptr, cluster, attr);
  int clusters = 0;
  // A cluster the device cannot co-schedule is an error of this query (cleared
  // here): none fits. An invalid cluster size is remembered, other errors not.
  if (const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
      err != cudaSuccess) {
    (void)cudaGetLastError();
    if (err == cudaErrorInvalidClusterSize)
      return known[key] = 0;
    return 0;
  }
  return known[key] = clusters;
#endif
}

// A launch in thread block clusters of `cluster` consecutive blocks along x
// (cooperative_groups::this_cluster().sync() allowed; grid.x a multiple of
// cluster). Call max_active_clusters for the kernel first (it sets the
// kernel's shared-memory cap on the current device). Returns false, the
// error cleared, where the device refuses the cluster size at run time
// (cudaErrorInvalidClusterSize); fails on any other error.
template <typename... Params, typename... Args>
bool launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, int64_t cluster,
                    size_t smem, Stream stream, Args&&... args) {
#ifdef VK_EMULATE_CUDA
  (void)stream;
  ::vk_emu::launch(grid, block, smem, /*cooperative=*/false, [&] { kernel(args...); },
                   unsigned(cluster));
  return true;
#else
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t config = cluster_config(grid, block, smem, stream, cluster, attr);
  return launch_status(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...),
                       cudaErrorInvalidClusterSize);
#endif
}

}  // namespace cuda
}  // namespace varlen
