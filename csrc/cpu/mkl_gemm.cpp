// Run-time lookup of MKL's GEMM entry points in the loaded torch (see mkl_gemm.h).
#include "mkl_gemm.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace varlen {
namespace {

// A symbol of the process, or of the library holding at::get_num_threads
// (libtorch_cpu.so) when that was loaded with local scope.
void* find_symbol(const char* name) {
  if (void* p = dlsym(RTLD_DEFAULT, name)) return p;
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&at::get_num_threads), &info) == 0 || !info.dli_fname)
    return nullptr;
  void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return nullptr;
  void* p = dlsym(lib, name);
  dlclose(lib);  // drops the reference RTLD_NOLOAD took; the library stays loaded
  return p;
}

template <typename F>
void bind(F& fn, const char* name) {
  fn = reinterpret_cast<F>(find_symbol(name));
}

uint16_t to_bf16_bits(float x) {  // exact for the small integers used below
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>(u >> 16);
}

// C = A B^T with A (3, 5), B (4, 5) through the packed path (and the bf16 one),
// against a plain loop; small integers, so every result is exact.
bool self_check(const MklGemm& m) {
  const int M = 3, N = 4, K = 5;
  std::vector<float> a(M * K), b(N * K), want(M * N, 0.f);
  for (int i = 0; i < M * K; ++i) a[i] = float((i * 7) % 5 - 2);
  for (int i = 0; i < N * K; ++i) b[i] = float((i * 3) % 7 - 3);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      for (int k = 0; k < K; ++k) want[i * N + j] += a[i * K + k] * b[j * K + k];
  const size_t bytes = m.sgemm_pack_get_size(kMklBMatrix, M, N, K);
  if (bytes == 0) return false;
  std::vector<float> packed(bytes / sizeof(float) + 16);
  m.sgemm_pack(kMklRowMajor, kMklBMatrix, kMklTrans, M, N, K, 1.f, b.data(), K, packed.data());
  for (int rows = 1; rows <= M; ++rows) {  // fewer rows than packed for, as the RNN does
    std::vector<float> c(M * N, -1.f);
    m.sgemm_compute(kMklRowMajor, kMklNoTrans, kMklPacked, rows, N, K, a.data(), K,
                    packed.data(), N, 0.f, c.data(), N);
    for (int i = 0; i < rows * N; ++i)
      if (c[i] != want[i]) return false;
  }
  return true;
}

bool self_check_bf16(const MklGemm& m) {
  const int M = 3, N = 4, K = 5;
  std::vector<uint16_t> a(M * K), b(N * K);
  std::vector<float> want(M * N, 0.f), c(M * N, -1.f);
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) a[i * K + k] = to_bf16_bits(float((i + 2 * k) % 5 - 2));
  for (int j = 0; j < N; ++j)
    for (int k = 0; k < K; ++k) b[j * K + k] = to_bf16_bits(float((3 * j + k) % 7 - 3));
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j)
      for (int k = 0; k < K; ++k)
        want[i * N + j] += float((i + 2 * k) % 5 - 2) * float((3 * j + k) % 7 - 3);
  m.gemm_bf16bf16f32(kMklRowMajor, kMklNoTrans, kMklTrans, M, N, K, 1.f, a.data(), K, b.data(),
                     K, 0.f, c.data(), N);
  for (int i = 0; i < M * N; ++i)
    if (c[i] != want[i]) return false;
  return true;
}

const MklGemm* load() {
  MklGemm m{};
  bind(m.sgemm_pack_get_size, "cblas_sgemm_pack_get_size");
  bind(m.sgemm_pack, "cblas_sgemm_pack");
  bind(m.sgemm_compute, "cblas_sgemm_compute");
  bind(m.gemm_bf16bf16f32, "cblas_gemm_bf16bf16f32");
  // mkl_service.h maps mkl_set_num_threads_local to MKL_Set_Num_Threads_Local; the
  // lower-case symbols are the Fortran interface (arguments by pointer).
  bind(m.set_num_threads_local, "MKL_Set_Num_Threads_Local");
  if (!m.sgemm_pack_get_size || !m.sgemm_pack || !m.sgemm_compute) return nullptr;
  MklSequential one(&m);
  if (!self_check(m)) return nullptr;
  if (m.gemm_bf16bf16f32 && !self_check_bf16(m)) m.gemm_bf16bf16f32 = nullptr;
  static const MklGemm found = m;
  return &found;
}

}  // namespace

const MklGemm* mkl_gemm() {
  static const MklGemm* const found = load();
  return found;
}

GemmChoice gemm_choice() {
  const char* env = std::getenv("VARLEN_KERNELS_CPU_GEMM");
  const std::string v = env != nullptr ? env : "";
  if (v.empty() || v == "auto") return GemmChoice::Auto;
  if (v == "aten") return GemmChoice::Aten;
  if (v == "panel") return GemmChoice::Panel;
  TORCH_CHECK(v == "mkl", "VARLEN_KERNELS_CPU_GEMM must be auto, aten, mkl or panel, got '", v,
              "'");
  return GemmChoice::Mkl;
}

}  // namespace varlen
