// rnn_pointwise.h and loss_rows.h for CPUs with AVX2, FMA and F16C (chosen at run time).
#if defined(__x86_64__) || defined(_M_X64)
// The extension is built for the baseline ISA; this translation unit alone is
// compiled for AVX2+FMA. GCC's target pragma does not announce the ISA to the
// preprocessor, so the macros that ATen's and Sleef's headers test are set here.
#pragma GCC target("avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define VK_CPU_NS avx2
#include "rnn_pointwise.h"
#include "panel_gemm.h"
#include "loss_rows.h"
#else
// Not x86: the dispatcher never picks this build; give it the portable code.
#define CPU_CAPABILITY DEFAULT
#define VK_CPU_NS avx2
#include "rnn_pointwise.h"
#include "panel_gemm.h"
#include "loss_rows.h"
#endif
