// Warp-level tensor-core instructions (sm_80 and later), the form of the
// persistent kernels' recurrent product (tc_product, rnn_persistent.cuh), and
// what the CPU execution of CUDA runs in their place (vk_emu::ldmatrix_x4,
// ldmatrix_x2 and mma, with the lane layouts of the PTX ISA). Each is
// warp-collective: all 32 lanes execute it together.
//  - ldmatrix_x4(r, row): loads four 8x8 matrices of 16-bit elements, rows of
//    16 bytes, from shared memory. Lane l gives the address of row l % 8 of
//    matrix l / 8 (16-byte aligned; smem_row_of(pointer), below); r[j]
//    receives, of matrix j, the 4 bytes at byte 4 * (l % 4) of row l / 4: two
//    16-bit elements, or one 32-bit element of a matrix of 8 rows of 4 (TF32).
//  - ldmatrix_x2(r, row): the same for two matrices, whose rows lanes 0-15
//    give (the addresses of lanes 16-31 are not read).
//  - mma_16x8<MmaKind::F16 / BF16>(d, a, b0, b1): the 16x8 float tile d +=
//    A (16x16) times B (16x8). With g = lane / 4 and t = lane % 4:
//      a[0]: A[g][2t, 2t+1], a[1]: A[g+8][2t, 2t+1], a[2]: A[g][2t+8, 2t+9],
//      a[3]: A[g+8][2t+8, 2t+9]; b0: B[2t, 2t+1][g], b1: B[2t+8, 2t+9][g];
//      d[0], d[1]: D[g][2t, 2t+1]; d[2], d[3]: D[g+8][2t, 2t+1].
//  - mma_16x8<MmaKind::TF32>(d, a, b0, b1): d += A (16x8) times B (8x8), TF32 operands
//    (float bits, the low 13 mantissa bits unread):
//      a[0]: A[g][t], a[1]: A[g+8][t], a[2]: A[g][t+4], a[3]: A[g+8][t+4];
//      b0: B[t][g], b1: B[t+4][g]; d as above.
//  - to_tf32(v): v rounded to TF32, as the kernels store their TF32 operands.
// So a row-major 16x16 (16x8 TF32) tile of A at p, row stride ld bytes, is
// ldmatrix_x4 with lane l at p + (l % 16) * ld + (l / 16) * 16 bytes, and the
// B operands of two 8-column halves, stored column by column (W[n][k], k
// contiguous), at w + (l % 8 + (l / 16) * 8) * ld + (l / 8 % 2) * 16 bytes:
// r[0], r[1] for columns 0-7, r[2], r[3] for columns 8-15; the B operand of
// one 8-column tile alone is ldmatrix_x2 with lane l at w + (l % 8) * ld +
// (l / 8 % 2) * 16 bytes.
#pragma once

#include <cstdint>

#include "cuda/async_copy.h"

namespace varlen {
namespace cuda {

// A lane's row for ldmatrix: on the GPU its 32-bit shared-memory address, so
// that a loop advances it by one 32-bit addition (a generic pointer takes
// 64-bit arithmetic); under the CPU execution the pointer. smem_row_of(p) of a
// pointer into shared memory; + and - move it by bytes.
#ifdef VK_EMULATE_CUDA
using smem_row = const unsigned char*;
inline smem_row smem_row_of(const void* p) { return static_cast<const unsigned char*>(p); }
#else
using smem_row = uint32_t;
__device__ __forceinline__ smem_row smem_row_of(const void* p) {
#if defined(__CUDA_ARCH__)
  return shared_address(p);  // (async_copy.h)
#else
  return 0;
#endif
}
#endif

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], smem_row row) {
#ifdef VK_EMULATE_CUDA
  vk_emu::ldmatrix_x4(r, row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], smem_row row) {
#ifdef VK_EMULATE_CUDA
  vk_emu::ldmatrix_x2(r, row);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(row));
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// The element types of mma_16x8 (below).
enum class MmaKind : int { F16, BF16, TF32 };

// d += A B for one 8-column half of B: registers 2h, 2h + 1 of
// ldmatrix_x4's (the header's layouts); K = 16 in half and bfloat16, 8 in TF32.
#define VK_MMA_SYNC(shape_types)                                                          \
  asm("mma.sync.aligned." shape_types " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, " \
      "{%0, %1, %2, %3};\n"                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                    \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <MmaKind K>
__device__ __forceinline__ void mma_16x8(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#ifdef VK_EMULATE_CUDA
  const uint32_t b[2] = {b0, b1};
  vk_emu::mma(vk_emu::MmaKind(int(K)), d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (K == MmaKind::BF16) VK_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32");
  else if constexpr (K == MmaKind::F16) VK_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32");
  else VK_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32");
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}
#undef VK_MMA_SYNC

// v rounded to TF32 (10 mantissa bits; to nearest, ties away from zero), as
// cuBLAS's TF32 GEMMs round their operands.
__device__ __forceinline__ float to_tf32(float v) {
#ifdef VK_EMULATE_CUDA
  return vk_emu::to_tf32(v);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return __uint_as_float(r);
#else
  return v;  // never multiplied: the tensor-core kernels trap below sm_80
#endif
}

}  // namespace cuda
}  // namespace varlen
