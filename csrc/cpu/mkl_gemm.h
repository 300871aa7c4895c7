// MKL's packed and bf16 GEMM, found at run time in the torch build already loaded.
//
// torch's libtorch_cpu.so (built with MKL) exports cblas_sgemm_pack_get_size,
// cblas_sgemm_pack, cblas_sgemm_compute and cblas_gemm_bf16bf16f32. We declare
// their prototypes here (LP64 interface: MKL_INT is int, as torch links MKL) and
// look them up with dlsym, so the extension neither needs MKL's headers nor
// fails to load against a torch build without MKL: mkl_gemm() is then null and
// the CPU RNN runs its ATen path. A tiny product checked against a plain loop
// at first use guards against an interface that does not match.
//
// VARLEN_KERNELS_CPU_GEMM (read at each call, so tests can compare the paths in
// one process): "aten" forces the ATen path; "mkl" requires the MKL path for
// float32 and bfloat16 (an error where it is missing); "panel" runs every
// float32, bfloat16 and half product on panel_gemm.h's kernel; unset or
// "auto": the panel kernel for products on one thread, MKL (float32, where
// it is found) or ATen (half, bfloat16) for products shared between threads
// (see masked_rnn_cpu.cpp).
#pragma once

#include <cstddef>
#include <cstdint>

namespace varlen {

// CBLAS enumerations, with MKL's values.
enum MklLayout : int { kMklRowMajor = 101 };
enum MklTranspose : int { kMklNoTrans = 111, kMklTrans = 112 };
enum MklIdentifier : int { kMklAMatrix = 161, kMklBMatrix = 162 };
constexpr int kMklPacked = 151;  // transa / transb of cblas_sgemm_compute: "already packed"

struct MklGemm {
  // bytes of a packed matrix: (identifier, m, n, k)
  size_t (*sgemm_pack_get_size)(int, int, int, int);
  // (layout, identifier, trans, m, n, k, alpha, src, ld, dest)
  void (*sgemm_pack)(int, int, int, int, int, int, float, const float*, int, float*);
  // (layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc); transb =
  // kMklPacked and b = the packed buffer (ldb ignored)
  void (*sgemm_compute)(int, int, int, int, int, int, const float*, int, const float*, int, float,
                        float*, int);
  // C (float) = alpha op(A) op(B) + beta C, A and B bfloat16 (as uint16_t bits):
  // (layout, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); null if absent
  void (*gemm_bf16bf16f32)(int, int, int, int, int, int, float, const uint16_t*, int,
                           const uint16_t*, int, float, float*, int);
  // MKL_Set_Num_Threads_Local (C interface; returns the previous value); null if absent
  int (*set_num_threads_local)(int);
};

// MKL's entry points, or nullptr where the torch build lacks them or they fail
// the self-check.
const MklGemm* mkl_gemm();

enum class GemmChoice { Auto, Aten, Mkl, Panel };
// VARLEN_KERNELS_CPU_GEMM, checked.
GemmChoice gemm_choice();

// Runs MKL single-threaded on this thread for the guard's lifetime (the callers
// split the work across threads themselves).
class MklSequential {
 public:
  explicit MklSequential(const MklGemm* m)
      : m_(m), prev_(m && m->set_num_threads_local ? m->set_num_threads_local(1) : 0) {}
  ~MklSequential() {
    if (m_ && m_->set_num_threads_local) m_->set_num_threads_local(prev_);
  }
  MklSequential(const MklSequential&) = delete;
  MklSequential& operator=(const MklSequential&) = delete;

 private:
  const MklGemm* m_;
  int prev_;
};

}  // namespace varlen
