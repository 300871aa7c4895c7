// rnn_pointwise.h for CPUs with AVX-512 F/BW/VL/DQ (chosen at run time): the
// RNN cells on 16-float (8-double) vectors.
#if defined(__x86_64__) || defined(_M_X64)
// The extension is built for the baseline ISA; this translation unit alone is
// compiled for AVX-512 (as kernels_avx2.cpp is for AVX2). GCC's target pragma
// does not announce the ISA to the preprocessor, so the macros that ATen's and
// Sleef's headers test are set here.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define VK_CPU_NS avx512
#include "rnn_pointwise.h"
#include "panel_gemm.h"
#else
// Not x86: the dispatcher never picks this build; give it the portable code.
#define CPU_CAPABILITY DEFAULT
#define VK_CPU_NS avx512
#include "rnn_pointwise.h"
#include "panel_gemm.h"
#endif
