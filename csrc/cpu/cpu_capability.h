// Which build of the CPU row kernels to run: kernels_avx512.cpp (RNN cells and panel GEMM),
// kernels_avx2.cpp or kernels_base.cpp, chosen once at run time.
//
// VARLEN_KERNELS_CPU_CAPABILITY caps the choice: "default" runs the portable
// build everywhere, "avx2" stops at AVX2, "avx512" at AVX-512 (AVX512-BF16's
// bfloat16 kernel, kernels_avx512_bf16.cpp, included), "amx" (or unset) takes
// the best the CPU has, AMX's bfloat16 kernel (kernels_amx_bf16.cpp) included
// (for tests and comparisons; any case; anything else is an error).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "panel_gemm.h"  // VK_AVX512_BF16_KERNEL, VK_AMX_BF16_KERNEL

#if VK_AMX_BF16_KERNEL
#include <cpuid.h>
#endif

namespace varlen {

enum class CpuIsa { Base, Avx2, Avx512 };

// VARLEN_KERNELS_CPU_CAPABILITY, checked and in lower case ("" where unset).
inline const std::string& cpu_capability_setting() {
  static const std::string cap = [] {
    const char* env = std::getenv("VARLEN_KERNELS_CPU_CAPABILITY");
    std::string v = env != nullptr ? env : "";
    std::transform(v.begin(), v.end(), v.begin(),
                   [](unsigned char ch) { return char(std::tolower(ch)); });
    TORCH_CHECK(v.empty() || v == "amx" || v == "avx512" || v == "avx2" || v == "default",
                "VARLEN_KERNELS_CPU_CAPABILITY must be amx, avx512, avx2 or default, got '",
                env != nullptr ? env : "", "'");
    return v;
  }();
  return cap;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const std::string& cap = cpu_capability_setting();
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

// Whether bfloat16 products may run on AMX (kernels_amx_bf16.cpp): the
// AVX-512 build is chosen, VARLEN_KERNELS_CPU_CAPABILITY does not stop at
// avx512, the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24, 22)
// and Linux grants this process the tile state.
inline bool cpu_has_amx_bf16() {
#if VK_AMX_BF16_KERNEL
  static const bool has = [] {
    if (!cpu_has_avx512_bf16() || cpu_capability_setting() == "avx512") return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx = (edx >> 24 & 1u) != 0 && (edx >> 22 & 1u) != 0;
    return amx && amx_bf16::request_tile_state();
  }();
  return has;
#else
  return false;
#endif
}

// The kernel of the CPU path's bfloat16 per-step products (panel_gemm.h) on
// this machine and setting, where the products run on the panel kernels:
// "amx", "avx512_bf16" or "widened" (float32 arithmetic on widened operands).
inline const char* cpu_bfloat16_kernel() {
  if (cpu_has_amx_bf16()) return "amx";
  if (cpu_has_avx512_bf16()) return "avx512_bf16";
  return "widened";
}

// The AVX2 build (or better) where the CPU has AVX2, FMA and F16C and
// VARLEN_KERNELS_CPU_CAPABILITY is not "default"; otherwise the portable one.
inline bool use_avx2() { return cpu_isa() != CpuIsa::Base; }

}  // namespace varlen
