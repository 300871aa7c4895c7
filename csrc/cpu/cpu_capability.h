// Which build of the CPU row kernels to run (kernels_avx2.cpp or kernels_base.cpp).
#pragma once

#include <cstdlib>
#include <string>

namespace varlen {

// The AVX2 build where the CPU has AVX2, FMA and F16C and
// VARLEN_KERNELS_CPU_CAPABILITY is not "default"; otherwise the portable one.
inline bool use_avx2() {
  static const bool avx2 = [] {
    const char* env = std::getenv("VARLEN_KERNELS_CPU_CAPABILITY");
    if (env != nullptr && std::string(env) == "default") return false;
#if defined(__x86_64__) || defined(_M_X64)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return avx2;
}

}  // namespace varlen
