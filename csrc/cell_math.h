// Cell formulas shared by the CPU and CUDA paths.
//
// Every function here works on one hidden unit j of one sequence row and is
// `__host__ __device__`, so the CPU test suite exercises the formulas the GPU
// kernels run. T is the math type (float for half/bfloat16 storage,
// otherwise the storage type). In float, the CUDA kernels take sigmoid and
// tanh from the special-function unit's exp2 and reciprocal (fast_exp,
// fast_rcp below; the CPU execution of CUDA runs a model of them), the CPU
// path from its vectorized exp.
//
// Gate layouts follow PyTorch (torch.nn.LSTM / GRU / RNN):
//   LSTM: pre-activations [i, f, g, o], c' = f*c + i*g, h' = o*tanh(c')
//   GRU:  [r, z, n], n = tanh(x_n + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h
//   RNN:  h' = act(x + W_hh h), act = tanh or relu
#pragma once

#include <cfloat>
#include <cmath>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VK_HD __host__ __device__ __forceinline__
#else
#define VK_HD inline
#endif

namespace varlen {

enum class Cell : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

// Number of gate blocks (of H columns each) in W_ih / W_hh.
constexpr int num_gates(Cell c) {
  return c == Cell::LSTM ? 4 : (c == Cell::GRU ? 3 : 1);
}
// Width (in blocks of H) of the per-step gate workspace kept for backward.
//   LSTM: activated [i, f, g, o]; GRU: [r, z, n, W_hn h + b_hn]; RNN: [h'].
constexpr int num_saved_gates(Cell c) {
  return c == Cell::LSTM ? 4 : (c == Cell::GRU ? 4 : 1);
}
// Recurrent states per row: LSTM (h, c), others h.
constexpr int num_states(Cell c) { return c == Cell::LSTM ? 2 : 1; }

// Elementary functions, per math type. The scalar versions below serve the
// CUDA kernels and the CPU's scalar tails; the CPU path specializes Math for
// SIMD vectors (csrc/cpu/rnn_pointwise.h), so the formulas below run
// unchanged on whole vectors.
template <typename T>
struct Math;
template <>
struct Math<float> {
  static VK_HD float exp(float x) { return ::expf(x); }
  static VK_HD float log(float x) { return ::logf(x); }
  static VK_HD float log1p(float x) { return ::log1pf(x); }
  static VK_HD float tanh(float x) { return ::tanhf(x); }
  static VK_HD float relu(float x) { return x > 0.f ? x : 0.f; }
  // d relu / d pre, from the output h, times dh.
  static VK_HD float relu_grad(float h, float dh) { return h > 0.f ? dh : 0.f; }
};
template <>
struct Math<double> {
  static VK_HD double exp(double x) { return ::exp(x); }
  static VK_HD double log(double x) { return ::log(x); }
  static VK_HD double log1p(double x) { return ::log1p(x); }
  static VK_HD double tanh(double x) { return ::tanh(x); }
  static VK_HD double relu(double x) { return x > 0. ? x : 0.; }
  static VK_HD double relu_grad(double h, double dh) { return h > 0. ? dh : 0.; }
};

// The CUDA kernels' float exp and reciprocal for the activations: on the GPU
// __expf (exp2 of x * log2(e) by the special-function unit, ex2.approx.ftz:
// within 2 + 1.2|x| ulp, CUDA's bound, which the rounding of the product
// makes grow with |x|; results below FLT_MIN flushed to 0) and
// __fdividef(1, d) (2 ulp at most; 0 for 2^126 < |d| < 2^128), where expf and an
// IEEE division take about 140 SASS instructions for an LSTM cell's five
// activations; under the CPU execution of CUDA a model of them: exp2 of the
// float product x * log2(e) (ex2.approx's own error not modelled), flushed
// below FLT_MIN, and the division with __fdividef's range.
#if defined(__CUDA_ARCH__)
#define VK_FAST_ACTIVATIONS 1
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ float fast_rcp(float d) { return __fdividef(1.f, d); }
#elif defined(VK_EMULATE_CUDA)
#define VK_FAST_ACTIVATIONS 1
inline float fast_exp(float x) {
  const float r = std::exp2(x * 1.44269504088896341f);
  return r < FLT_MIN ? 0.f : r;  // (NaN stays NaN)
}
inline float fast_rcp(float d) {
  const float a = std::fabs(d);
  return a > 0x1p126f && a < 0x1p128f ? 0.f : 1.f / d;
}
#endif

template <typename T>
VK_HD T sigmoid(T x) {
#ifdef VK_FAST_ACTIVATIONS
  if constexpr (std::is_same_v<T, float>) return fast_rcp(1.f + fast_exp(-x));
#endif
  return T(1) / (T(1) + Math<T>::exp(-x));
}
// tanh in float on the GPU: (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1],
// signed as x; 1 - e is exact where e >= 1/2 (|x| < 0.35), so near 0 the
// error is exp's, about 2^-22 / (2|x|) relative (2^-23 absolute).
template <typename T>
VK_HD T vk_tanh(T x) {
#ifdef VK_FAST_ACTIVATIONS
  if constexpr (std::is_same_v<T, float>) {
    const float e = fast_exp(-2.f * std::fabs(x));
    return std::copysign((1.f - e) * fast_rcp(1.f + e), x);
  }
#endif
  return Math<T>::tanh(x);
}
// Derivatives expressed through the activation's output y.
template <typename T>
VK_HD T dsigmoid_from_y(T y) {
  return y * (T(1) - y);
}
template <typename T>
VK_HD T dtanh_from_y(T y) {
  return T(1) - y * y;
}

// ---------------------------------------------------------------- LSTM
// Inputs: pre-activations (x-part + h-part + biases) and c_prev.
template <typename T>
struct LstmFwd {
  T i, f, g, o, c, h;
};
template <typename T>
VK_HD LstmFwd<T> lstm_forward(T pi, T pf, T pg, T po, T c_prev) {
  LstmFwd<T> r;
  r.i = sigmoid(pi);
  r.f = sigmoid(pf);
  r.g = vk_tanh(pg);
  r.o = sigmoid(po);
  r.c = r.f * c_prev + r.i * r.g;
  r.h = r.o * vk_tanh(r.c);
  return r;
}

// Gradients w.r.t. the four pre-activations and c_prev.
// dh: total gradient reaching h' (from the output and from step t+1);
// dc: gradient reaching c' from step t+1 (or from c_n).
template <typename T>
struct LstmBwd {
  T di, df, dg, do_, dc_prev;
};
template <typename T>
VK_HD LstmBwd<T> lstm_backward(T i, T f, T g, T o, T c_prev, T dh, T dc) {
  const T c = f * c_prev + i * g;  // the forward's c', recomputed
  const T tc = vk_tanh(c);
  const T dct = dc + dh * o * dtanh_from_y(tc);
  LstmBwd<T> r;
  r.do_ = dh * tc * dsigmoid_from_y(o);
  r.di = dct * g * dsigmoid_from_y(i);
  r.df = dct * c_prev * dsigmoid_from_y(f);
  r.dg = dct * i * dtanh_from_y(g);
  r.dc_prev = dct * f;
  return r;
}

// ---------------------------------------------------------------- GRU
// xr, xz, xn: input part with b_ih; hr, hz: hidden part with b_hh;
// hn: W_hn h + b_hn (kept for backward).
template <typename T>
struct GruFwd {
  T r, z, n, h;
};
template <typename T>
VK_HD GruFwd<T> gru_forward(T xr, T xz, T xn, T hr, T hz, T hn, T h_prev) {
  GruFwd<T> o;
  o.r = sigmoid(xr + hr);
  o.z = sigmoid(xz + hz);
  o.n = vk_tanh(xn + o.r * hn);
  o.h = (T(1) - o.z) * o.n + o.z * h_prev;
  return o;
}

// Gradients w.r.t. input-side pre-activations (dxr, dxz, dxn), hidden-side
// ones (dhr = dxr, dhz = dxz, dhn), and the direct path to h_prev.
template <typename T>
struct GruBwd {
  T dr, dz, dxn, dhn, dh_prev_direct;
};
template <typename T>
VK_HD GruBwd<T> gru_backward(T r, T z, T n, T hn, T h_prev, T dh) {
  GruBwd<T> o;
  const T dn = dh * (T(1) - z) * dtanh_from_y(n);
  o.dxn = dn;
  o.dhn = dn * r;
  o.dr = dn * hn * dsigmoid_from_y(r);
  o.dz = dh * (h_prev - n) * dsigmoid_from_y(z);
  o.dh_prev_direct = dh * z;
  return o;
}

// ---------------------------------------------------------------- RNN
template <typename T, bool kRelu>
VK_HD T rnn_forward(T pre) {
  if constexpr (kRelu) return Math<T>::relu(pre);
  else return vk_tanh(pre);
}
// Gradient w.r.t. the pre-activation, from the output h'.
template <typename T, bool kRelu>
VK_HD T rnn_backward(T h, T dh) {
  if constexpr (kRelu) return Math<T>::relu_grad(h, dh);
  else return dh * dtanh_from_y(h);
}

}  // namespace varlen
