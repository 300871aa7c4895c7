// panel_gemm.h's bfloat16 kernel for CPUs with AVX512-BF16 (chosen at run time):
// C (m, n) = A (m, k) @ B (k, n) + beta C with A and B in bfloat16 and C in
// float32, on vdpbf16ps, which multiplies pairs of bfloat16 (exactly) and adds
// both products to a float32 lane, twice the products of a float32 FMA per
// instruction. B is packed once per call by pack_panels_pairs (the pairs of k
// of each column side by side); A's pair of a row is one 32-bit broadcast.
// Like the float kernel, a block of up to 8 rows x 32 columns of C stays in
// registers for the whole k loop and each panel streams once per row block.
// vdpbf16ps treats bfloat16 subnormal inputs as zero and flushes subnormal
// results; everything else is the float kernel's arithmetic up to the order of
// the sums.
#include "panel_gemm.h"

#include <cstring>

#if VK_AVX512_BF16_KERNEL
#include <immintrin.h>
// Only the kernel below is compiled for AVX512-BF16 (the headers above, with
// their inline functions, stay at the baseline ISA like the rest of the
// extension; the kernel instantiates no template from them).
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

namespace varlen {
namespace avx512_bf16 {
namespace {

constexpr int kMaxRows = 8;  // 16 accumulators + 2 vectors of B + 1 broadcast of 32 registers

// The pair (A[kk], A[kk + 1]) of one row as a 32-bit lane; (A[kk], 0) past k.
inline int32_t pair_at(const uint16_t* a, int64_t kk, int64_t k) {
  if (kk + 1 < k) {
    int32_t v;
    std::memcpy(&v, a + kk, sizeof(v));
    return v;
  }
  return int32_t(a[kk]);  // the last, odd k: the upper half (a[k]) is zero
}

// C (MR, cols) = A (MR, k) @ panel + beta C, cols <= kPanel; P: the panel,
// whose first (k + 1) / 2 rows of kPanel pairs are read (the rest, padding to
// whole AMX tiles, is zero). beta == 0 never reads C.
template <int MR>
void block(const uint16_t* A, int64_t lda, const uint16_t* P, int64_t k, float beta, float* C,
           int64_t ldc, int64_t cols) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t pairs = (k + 1) / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(P + q * 2 * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(P + q * 2 * kPanel + kPanel);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair_at(A + r * lda, 2 * q, k));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) {
      const int64_t c0 = int64_t(v) * 16;
      if (c0 >= cols) break;
      const int count = cols - c0 < 16 ? int(cols - c0) : 16;
      const __mmask16 mask = count == 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
      float* c = C + r * ldc + c0;
      __m512 out = acc[r][v];
      if (beta != 0.f) out = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mask, c), out);
      _mm512_mask_storeu_ps(c, mask, out);
    }
}

template <int MR = kMaxRows>
void block_rows(int64_t rows, const uint16_t* A, int64_t lda, const uint16_t* P, int64_t k,
                float beta, float* C, int64_t ldc, int64_t cols) {
  if constexpr (MR > 1) {
    if (rows < MR) return block_rows<MR - 1>(rows, A, lda, P, k, beta, C, ldc, cols);
  }
  block<MR>(A, lda, P, k, beta, C, ldc, cols);
}

}  // namespace

void panel_gemm(int64_t m, int64_t n, int64_t k, const c10::BFloat16* A, int64_t lda,
                const c10::BFloat16* packed_b, float beta, float* C, int64_t ldc) {
  static_assert(kPanel == 32, "a panel is two 16-lane vectors of pairs");
  const auto* a = reinterpret_cast<const uint16_t*>(A);
  const auto* b = reinterpret_cast<const uint16_t*>(packed_b);
  const int64_t panel_elems = panel_pair_elems(k, kPanel);  // one panel
  for (int64_t p = 0; p * kPanel < n; ++p) {
    const int64_t col = p * kPanel, cols = n - col < kPanel ? n - col : kPanel;
    for (int64_t r = 0; r < m; r += kMaxRows)
      block_rows(m - r < kMaxRows ? m - r : kMaxRows, a + r * lda, lda, b + p * panel_elems, k,
                 beta, C + r * ldc + col, ldc, cols);
  }
}

}  // namespace avx512_bf16
}  // namespace varlen
#pragma GCC pop_options

#else  // not built (see VK_AVX512_BF16_KERNEL): never chosen, cpu_has_avx512_bf16() is false
#include <c10/util/Exception.h>
namespace varlen {
namespace avx512_bf16 {
void panel_gemm(int64_t, int64_t, int64_t, const c10::BFloat16*, int64_t, const c10::BFloat16*,
                float, float*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "the AVX512-BF16 kernel is not in this build");
}
}  // namespace avx512_bf16
}  // namespace varlen
#endif
