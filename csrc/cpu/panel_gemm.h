// The per-step recurrent product of the CPU path for few rows:
// C (m, n) = A (m, k) @ B (k, n) + beta C, with B packed once per call into
// float32 column panels and reused at every step. A is float32, bfloat16 or
// half (widened to float as it is read); C and the arithmetic are float32, so
// half / bfloat16 products are not rounded to the storage type. On CPUs with
// AVX512-BF16, bfloat16 runs on a kernel of the same shape over AVX512-BF16's
// dot products instead (kernels_avx512_bf16.cpp; B packed in bfloat16 pairs by
// pack_panels_pairs): the same exact products summed in float32, twice as
// many per instruction.
//
// Why a hand-written kernel: the recurrence multiplies a handful of rows (the
// rows of one thread that are still running, often 1-8) by the same W_hh at
// every step. MKL's packed GEMM (cblas_sgemm_compute) reaches about 40-60
// GFLOP/s on one AVX-512 core there, oneDNN's padded LSTM about 80-90 (both
// measured here, see masked_rnn_cpu.cpp). The panel kernel keeps an
// (MR rows x one panel) block of C in registers for the whole k loop and
// streams each panel of B once per block of MR rows.
//
// Layout of a packed B: ceil(n / kPanel) panels, panel p holding columns
// [p * kPanel, p * kPanel + kPanel) of B for every k, row by row (k rows of
// kPanel floats; columns past n are zero). One layout for every ISA: a build
// covers a panel in kPanel / (2 vectors) passes (one on AVX-512, two on AVX2).
//
// Like rnn_pointwise.h, the kernel is compiled per ISA (kernels_avx512.cpp,
// kernels_avx2.cpp, kernels_base.cpp) inside namespace varlen::VK_CPU_NS, with
// ATen's Vectorized<float>; panel_gemm() picks the build at run time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace varlen {

constexpr int64_t kPanel = 32;

// bfloat16 elements of a (k, n) right operand packed in pairs of k for the
// AVX512-BF16 and AMX kernels (kernels_avx512_bf16.cpp, kernels_amx_bf16.cpp):
// ceil(n / kPanel) panels, panel p holding panel_pair_rows(k) rows of kPanel
// pairs (B[2q][col], B[2q + 1][col]), zero past k and past n. The rows are
// ceil(k / 2) rounded up to whole AMX tiles of kPairTile rows, so that a
// tile never reads past its panel.
constexpr int64_t kPairTile = 16;
inline int64_t panel_pair_rows(int64_t k) {
  return ((k + 1) / 2 + kPairTile - 1) / kPairTile * kPairTile;
}
inline int64_t panel_pair_elems(int64_t k, int64_t n) {
  return (n + kPanel - 1) / kPanel * kPanel * 2 * panel_pair_rows(k);
}

#ifndef VK_CPU_NS  // packing: in masked_rnn_cpu.cpp only (built for the baseline ISA)
// Floats of a packed (k, n) right operand.
inline int64_t panel_floats(int64_t k, int64_t n) {
  return (n + kPanel - 1) / kPanel * kPanel * k;
}

// dst <- op(B) packed (panel_floats(k, n) floats): op(B) (k, n) is src (n, k)
// transposed (trans, row stride ld) or src (k, n) as is.
template <typename src_t>
inline void pack_panels(const src_t* src, int64_t ld, bool trans, int64_t k, int64_t n,
                        float* dst) {
  for (int64_t p = 0; p * kPanel < n; ++p)
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t col = p * kPanel + c;
        *dst++ = col >= n ? 0.f : float(trans ? src[col * ld + kk] : src[kk * ld + col]);
      }
}

// dst <- op(B) in bfloat16 pairs (panel_pair_elems(k, n) elements), op(B) as
// for pack_panels.
inline void pack_panels_pairs(const c10::BFloat16* src, int64_t ld, bool trans, int64_t k,
                              int64_t n, c10::BFloat16* dst) {
  for (int64_t p = 0; p * kPanel < n; ++p)
    for (int64_t q = 0; q < panel_pair_rows(k); ++q)
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t col = p * kPanel + c, kk = 2 * q + e;
          *dst++ = col >= n || kk >= k ? c10::BFloat16(0.f)
                                       : (trans ? src[col * ld + kk] : src[kk * ld + col]);
        }
}
#endif

// A_t: float, c10::BFloat16 or c10::Half.
#define VK_DECLARE_PANEL_GEMM(NS)                                                      \
  namespace NS {                                                                       \
  template <typename A_t>                                                              \
  void panel_gemm(int64_t m, int64_t n, int64_t k, const A_t* A, int64_t lda,         \
                  const float* packed_b, float beta, float* C, int64_t ldc);           \
  }
VK_DECLARE_PANEL_GEMM(avx512)
VK_DECLARE_PANEL_GEMM(avx2)
VK_DECLARE_PANEL_GEMM(base)
#undef VK_DECLARE_PANEL_GEMM

// bfloat16 A and B (packed by pack_panels_pairs) on AVX512-BF16's dot
// products, float32 C; where cpu_has_avx512_bf16() (cpu_capability.h). Built
// on x86-64 with GCC 10 or newer (its target pragma and AVX512-BF16
// intrinsics); elsewhere a stub that is never chosen.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__) && \
    __GNUC__ >= 10
#define VK_AVX512_BF16_KERNEL 1
#else
#define VK_AVX512_BF16_KERNEL 0
#endif
namespace avx512_bf16 {
void panel_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* A, int64_t lda,
                const c10::BFloat16* packed_b, float beta, float* C, int64_t ldc);
}

// The same product on AMX's tiles (kernels_amx_bf16.cpp), B packed the same
// way; where cpu_has_amx_bf16() (cpu_capability.h). Built on x86-64 Linux
// with GCC 11 or newer (AMX intrinsics); elsewhere a stub that is never chosen.
#if VK_AVX512_BF16_KERNEL && __GNUC__ >= 11 && defined(__linux__)
#define VK_AMX_BF16_KERNEL 1
#else
#define VK_AMX_BF16_KERNEL 0
#endif
namespace amx_bf16 {
void panel_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* A, int64_t lda,
                const c10::BFloat16* packed_b, float beta, float* C, int64_t ldc);
// Asks Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, once a
// process): whether AMX may be used. False where the kernel is not built.
bool request_tile_state();
}

}  // namespace varlen

// ------------------------------------------------------------------------
// Definitions: only in the capability translation units.
#ifdef VK_CPU_NS
#include <ATen/cpu/vec/vec.h>

#include <algorithm>

namespace varlen {
namespace VK_CPU_NS {
namespace panel_detail {

using Vec = at::vec::Vectorized<float>;
constexpr int kV = Vec::size();
// Vectors per pass over a panel, and the most rows per block: the block's
// accumulators (MR x NV vectors), NV vectors of B and a broadcast fit the
// register file (AVX-512: 16 + 2 + 1 of 32; AVX2: 12 + 2 + 1 of 16; the
// portable build's 8-float vectors are two SSE registers each: 8 + 4 + 1 of 16).
constexpr int kNV = 2;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMaxRows = 8;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMaxRows = 6;
#else
constexpr int kMaxRows = 2;
#endif
constexpr int kPassCols = kNV * kV;
static_assert(kPanel % kPassCols == 0, "a panel is a whole number of passes");

// C (MR, cols) = A (MR, k) @ B (k, cols) + beta C, cols <= kPassCols; B: the
// pass's first column within a panel (row stride kPanel). beta == 0 never
// reads C (it may hold anything, NaN included).
template <int MR, typename A_t>
inline void block(const A_t* A, int64_t lda, const float* B, int64_t k, float beta, float* C,
                  int64_t ldc, int64_t cols) {
  Vec acc[MR][kNV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) acc[r][v] = Vec(0.f);
  for (int64_t kk = 0; kk < k; ++kk) {
    Vec b[kNV];
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) b[v] = Vec::loadu(B + kk * kPanel + v * kV);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec a(static_cast<float>(A[r * lda + kk]));
#pragma GCC unroll 4
      for (int v = 0; v < kNV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kNV; ++v) {
      const int64_t c0 = int64_t(v) * kV;
      if (c0 >= cols) break;
      float* c = C + r * ldc + c0;
      const int count = int(std::min<int64_t>(kV, cols - c0));
      Vec out = acc[r][v];
      if (beta != 0.f) out = at::vec::fmadd(Vec(beta), Vec::loadu(c, count), out);
      if (count == kV) out.store(c);
      else out.store(c, count);
    }
}

template <int MR = kMaxRows, typename A_t>
inline void block_rows(int64_t rows, const A_t* A, int64_t lda, const float* B, int64_t k,
                       float beta, float* C, int64_t ldc, int64_t cols) {
  if constexpr (MR > 1) {
    if (rows < MR) return block_rows<MR - 1>(rows, A, lda, B, k, beta, C, ldc, cols);
  }
  block<MR>(A, lda, B, k, beta, C, ldc, cols);
}

}  // namespace panel_detail

template <typename A_t>
void panel_gemm(int64_t m, int64_t n, int64_t k, const A_t* A, int64_t lda,
                const float* packed_b, float beta, float* C, int64_t ldc) {
  using namespace panel_detail;
  for (int64_t p = 0; p * kPanel < n; ++p) {
    const float* panel = packed_b + p * kPanel * k;
    for (int64_t c0 = 0; c0 < kPanel && p * kPanel + c0 < n; c0 += kPassCols) {
      const int64_t col = p * kPanel + c0, cols = std::min<int64_t>(kPassCols, n - col);
      for (int64_t r = 0; r < m; r += kMaxRows)
        block_rows(std::min<int64_t>(kMaxRows, m - r), A + r * lda, lda, panel + c0, k, beta,
                   C + r * ldc + col, ldc, cols);
    }
  }
}

#define VK_INSTANTIATE_PANEL_GEMM(A_t)                                                      \
  template void panel_gemm<A_t>(int64_t, int64_t, int64_t, const A_t*, int64_t, const float*, \
                                float, float*, int64_t);
VK_INSTANTIATE_PANEL_GEMM(float)
VK_INSTANTIATE_PANEL_GEMM(c10::BFloat16)
VK_INSTANTIATE_PANEL_GEMM(c10::Half)
#undef VK_INSTANTIATE_PANEL_GEMM

}  // namespace VK_CPU_NS
}  // namespace varlen
#endif  // VK_CPU_NS
