// Fused per-step cell updates of the CPU path, over rows [r0, r1) and hidden
// units [j0, j1) of one step.
//
// This header is compiled three times (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_base.cpp), each time inside namespace varlen::VK_CPU_NS with its own
// CPU_CAPABILITY, and masked_rnn_cpu.cpp picks one at run time. Everything runs
// on SIMD vectors of the math type (at::vec::Vectorized<float or double>, with
// Sleef's exp/tanh) through the same cell_math.h formulas as the CUDA kernels;
// half and bfloat16 are converted to float on load and back on store.
//
// The recurrent state (h, c forward; dh, dc backward) is kept in the math type
// (float for half/bfloat16) between steps; only what the GEMMs read and what is
// saved for the backward is in the storage type.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../cell_math.h"

namespace varlen {

// One step's rows. All row-major; row i of each array belongs to the i-th
// longest sequence still running at this step. acc_t: the math type.
template <typename scalar_t>
struct FwdStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gx;    // (n, G*H) input projection + folded biases
  // W_hh h_prev: the pre-activation of gate g, unit j of row i is at
  // gh[i * gh_ld + g * gh_gs + (j - gh_j0)] (a whole step: gh_ld = G*H,
  // gh_gs = H, gh_j0 = 0; a slice of units [gh_j0, ...) laid out gate by gate
  // also works)
  const acc_t* gh;
  int64_t gh_ld, gh_gs, gh_j0;
  const scalar_t* b_hn;  // (H,) GRU's b_hn, or nullptr
  acc_t* h;              // (n, H) h_prev in, h' out
  acc_t* c;              // (n, H) LSTM c_prev in, c' out
  // h' also goes to rows [0, n_next) of h_next (row stride h_next_ld): the
  // next step's GEMM operand. nullptr: nowhere.
  scalar_t* h_next;
  int64_t n_next, h_next_ld;
  scalar_t* y;           // (B, *) this step of the padded output; row i goes to
                         // y + perm[i] * y_stride
  const int64_t* perm;   // (n,) batch index of each row
  int64_t y_stride;
  scalar_t* gates;       // (n, GS*H) saved for backward
  scalar_t* states;      // (n, S*H) saved [h_prev (, c_prev)]: the kernel writes
                         // c_prev; h_prev is already there (the GEMM read it)
  int64_t H;
};

template <typename scalar_t>
struct BwdStep {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gates;   // (n, GS*H) from the forward
  const scalar_t* states;  // (n, S*H) from the forward
  const scalar_t* dy;      // (B, *) this step of grad_output; row i is at
                           // dy + perm[i] * dy_stride
  const int64_t* perm;     // (n,) batch index of each row
  int64_t dy_stride;
  acc_t* dh;               // (n, H) in: gradient w.r.t. h' from later steps;
                           //        out (GRU): the direct part of d h_prev
  acc_t* dc;               // (n, H) LSTM: d c' in, d c_prev out
  scalar_t* dgx;           // (n, G*H) d pre-activations, input side
  scalar_t* dgh;           // (n, G*H) d pre-activations, hidden side (GRU only)
  int64_t H;
};

#define VK_DECLARE_POINTWISE(NS)                                                    \
  namespace NS {                                                                    \
  template <typename scalar_t, Cell K>                                              \
  void forward_rows(const FwdStep<scalar_t>& a, int64_t r0, int64_t r1, int64_t j0, \
                    int64_t j1);                                                    \
  template <typename scalar_t, Cell K>                                              \
  void backward_rows(const BwdStep<scalar_t>& a, int64_t r0, int64_t r1, int64_t j0,\
                     int64_t j1);                                                   \
  }
VK_DECLARE_POINTWISE(avx512)
VK_DECLARE_POINTWISE(avx2)
VK_DECLARE_POINTWISE(base)
#undef VK_DECLARE_POINTWISE

}  // namespace varlen

// ------------------------------------------------------------------------
// Definitions: only in the capability translation units.
#ifdef VK_CPU_NS
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace varlen {

template <typename S>
struct Math<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V exp(V x) { return x.exp(); }
  static V tanh(V x) { return x.tanh(); }
  static V relu(V x) { return at::vec::maximum(x, V(S(0))); }
  static V relu_grad(V h, V dh) { return V::blendv(V(S(0)), dh, h > V(S(0))); }
};

namespace VK_CPU_NS {

// M: the math type (a scalar or a SIMD vector of float/double); S: the type in
// memory (the storage type or the math type).
template <typename M, typename S>
inline M load(const S* p) {
  if constexpr (std::is_arithmetic_v<M>) {
    return M(*p);
  } else if constexpr (std::is_same_v<typename M::value_type, S>) {
    return M::loadu(p);
  } else {  // half / bfloat16 in memory, float vectors (ATen's vector conversion)
    M out;
    at::vec::load_to_float<S>(p, out);
    return out;
  }
}
template <typename M, typename S>
inline void store(S* p, M v) {
  if constexpr (std::is_arithmetic_v<M>) {
    *p = S(v);
  } else if constexpr (std::is_same_v<typename M::value_type, S>) {
    v.store(p);
  } else {  // rounded to nearest even, as S(float) rounds
    at::vec::convert_from_float<S>(v, v).store(p, M::size());
  }
}

template <Cell K, typename M, typename S>
inline void forward_elem(const FwdStep<S>& a, int64_t i, int64_t j) {
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S_ = num_states(K);
  const int64_t H = a.H;
  const S* x = a.gx + i * G * H + j;
  const auto* hh = a.gh + i * a.gh_ld + (j - a.gh_j0);
  const int64_t gs = a.gh_gs;
  auto* h = a.h + i * H + j;
  S* sg = a.gates + i * GS * H + j;
  S* st = a.states + i * S_ * H + j;
  const M h_prev = load<M>(h);
  M h_new;
  if constexpr (K == Cell::LSTM) {
    auto* c = a.c + i * H + j;
    const M c_prev = load<M>(c);
    store(st + H, c_prev);
    const auto r = lstm_forward<M>(load<M>(x) + load<M>(hh), load<M>(x + H) + load<M>(hh + gs),
                                   load<M>(x + 2 * H) + load<M>(hh + 2 * gs),
                                   load<M>(x + 3 * H) + load<M>(hh + 3 * gs), c_prev);
    store(sg, r.i);
    store(sg + H, r.f);
    store(sg + 2 * H, r.g);
    store(sg + 3 * H, r.o);
    store(c, r.c);
    h_new = r.h;
  } else if constexpr (K == Cell::GRU) {
    M hn = load<M>(hh + 2 * gs);
    if (a.b_hn) hn = hn + load<M>(a.b_hn + j);
    const auto r = gru_forward<M>(load<M>(x), load<M>(x + H), load<M>(x + 2 * H), load<M>(hh),
                                  load<M>(hh + gs), hn, h_prev);
    store(sg, r.r);
    store(sg + H, r.z);
    store(sg + 2 * H, r.n);
    store(sg + 3 * H, hn);
    h_new = r.h;
  } else {
    h_new = rnn_forward<M, K == Cell::RNN_RELU>(load<M>(x) + load<M>(hh));
    store(sg, h_new);
  }
  store(h, h_new);
  store(a.y + a.perm[i] * a.y_stride + j, h_new);
  if (i < a.n_next) store(a.h_next + i * a.h_next_ld + j, h_new);
}

template <Cell K, typename M, typename S>
inline void backward_elem(const BwdStep<S>& a, int64_t i, int64_t j) {
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S_ = num_states(K);
  const int64_t H = a.H;
  const S* sg = a.gates + i * GS * H + j;
  const S* st = a.states + i * S_ * H + j;
  auto* dh = a.dh + i * H + j;
  S* gx = a.dgx + i * G * H + j;
  const M dht = load<M>(dh) + load<M>(a.dy + a.perm[i] * a.dy_stride + j);
  if constexpr (K == Cell::LSTM) {
    auto* dc = a.dc + i * H + j;
    const auto r = lstm_backward<M>(load<M>(sg), load<M>(sg + H), load<M>(sg + 2 * H),
                                    load<M>(sg + 3 * H), load<M>(st + H), dht, load<M>(dc));
    store(gx, r.di);
    store(gx + H, r.df);
    store(gx + 2 * H, r.dg);
    store(gx + 3 * H, r.do_);
    store(dc, r.dc_prev);
  } else if constexpr (K == Cell::GRU) {
    S* gh = a.dgh + i * G * H + j;
    const auto r = gru_backward<M>(load<M>(sg), load<M>(sg + H), load<M>(sg + 2 * H),
                                   load<M>(sg + 3 * H), load<M>(st), dht);
    store(gx, r.dr);
    store(gh, r.dr);
    store(gx + H, r.dz);
    store(gh + H, r.dz);
    store(gx + 2 * H, r.dxn);
    store(gh + 2 * H, r.dhn);
    store(dh, r.dh_prev_direct);
  } else {
    store(gx, rnn_backward<M, K == Cell::RNN_RELU>(load<M>(sg), dht));
  }
}

// Units [j0, j1): whole vectors first, then a scalar tail, with the same formulas.
template <typename S, typename F>
inline void over_units(int64_t j0, int64_t j1, F&& f) {
  using acc_t = at::opmath_type<S>;
  using V = at::vec::Vectorized<acc_t>;
  int64_t j = j0;
  for (; j + V::size() <= j1; j += V::size()) f(V(), j);
  for (; j < j1; ++j) f(acc_t(), j);
}

template <typename scalar_t, Cell K>
void forward_rows(const FwdStep<scalar_t>& a, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  for (int64_t i = r0; i < r1; ++i)
    over_units<scalar_t>(j0, j1, [&](auto m, int64_t j) {
      forward_elem<K, decltype(m)>(a, i, j);
    });
}

template <typename scalar_t, Cell K>
void backward_rows(const BwdStep<scalar_t>& a, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  for (int64_t i = r0; i < r1; ++i)
    over_units<scalar_t>(j0, j1, [&](auto m, int64_t j) {
      backward_elem<K, decltype(m)>(a, i, j);
    });
}

#define VK_INSTANTIATE_CELL(S, K)                                                      \
  template void forward_rows<S, K>(const FwdStep<S>&, int64_t, int64_t, int64_t, int64_t); \
  template void backward_rows<S, K>(const BwdStep<S>&, int64_t, int64_t, int64_t, int64_t);
#define VK_INSTANTIATE(S)                  \
  VK_INSTANTIATE_CELL(S, Cell::LSTM)       \
  VK_INSTANTIATE_CELL(S, Cell::GRU)        \
  VK_INSTANTIATE_CELL(S, Cell::RNN_TANH)   \
  VK_INSTANTIATE_CELL(S, Cell::RNN_RELU)
VK_INSTANTIATE(float)
VK_INSTANTIATE(double)
VK_INSTANTIATE(c10::BFloat16)
VK_INSTANTIATE(c10::Half)
#undef VK_INSTANTIATE
#undef VK_INSTANTIATE_CELL

}  // namespace VK_CPU_NS
}  // namespace varlen
#endif  // VK_CPU_NS
