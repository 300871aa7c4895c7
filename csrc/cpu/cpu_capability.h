// Which build of the CPU row kernels to run: kernels_avx512.cpp (RNN cells and panel GEMM),
// kernels_avx2.cpp or kernels_base.cpp, chosen once at run time.
//
// VARLEN_KERNELS_CPU_CAPABILITY caps the choice: "default" runs the portable
// build everywhere, "avx2" stops at AVX2, "avx512" (or unset) takes the best
// the CPU has, AVX512-BF16's bfloat16 kernel (kernels_avx512_bf16.cpp)
// included (for tests and comparisons; any case; anything else is an error).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "panel_gemm.h"  // VK_AVX512_BF16_KERNEL

namespace varlen {

enum class CpuIsa { Base, Avx2, Avx512 };

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const char* env = std::getenv("VARLEN_KERNELS_CPU_CAPABILITY");
    std::string cap = env != nullptr ? env : "";
    std::transform(cap.begin(), cap.end(), cap.begin(),
                   [](unsigned char ch) { return char(std::tolower(ch)); });
    TORCH_CHECK(cap.empty() || cap == "avx512" || cap == "avx2" || cap == "default",
                "VARLEN_KERNELS_CPU_CAPABILITY must be avx512, avx2 or default, got '",
                env != nullptr ? env : "", "'");
    if (cap == "default") return CpuIsa::Base;
#if defined(__x86_64__) || defined(_M_X64)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    if (avx512 && cap != "avx2") return CpuIsa::Avx512;
    return avx2 ? CpuIsa::Avx2 : CpuIsa::Base;
#else
    return CpuIsa::Base;
#endif
  }();
  return isa;
}

// Calls NS::<the call> in the build for this CPU, NS in avx512 / avx2 / base (each
// compiled for its ISA: kernels_avx512.cpp, kernels_avx2.cpp, kernels_base.cpp).
#define VK_CALL_FOR_CPU(...)                    \
  do {                                          \
    switch (::varlen::cpu_isa()) {              \
      case ::varlen::CpuIsa::Avx512:            \
        ::varlen::avx512::__VA_ARGS__;          \
        break;                                  \
      case ::varlen::CpuIsa::Avx2:              \
        ::varlen::avx2::__VA_ARGS__;            \
        break;                                  \
      default:                                  \
        ::varlen::base::__VA_ARGS__;            \
    }                                           \
  } while (0)

// Whether bfloat16 products may run on AVX512-BF16's dot products
// (kernels_avx512_bf16.cpp): the AVX-512 build is chosen and the CPU has them.
inline bool cpu_has_avx512_bf16() {
#if VK_AVX512_BF16_KERNEL  // panel_gemm.h: the kernel is in this build
  static const bool has = cpu_isa() == CpuIsa::Avx512 && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// The AVX2 build (or better) where the CPU has AVX2, FMA and F16C and
// VARLEN_KERNELS_CPU_CAPABILITY is not "default"; otherwise the portable one.
inline bool use_avx2() { return cpu_isa() != CpuIsa::Base; }

}  // namespace varlen
