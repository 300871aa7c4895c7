// Row kernels of the masked cross entropy on the CPU, compiled per CPU
// capability like rnn_pointwise.h. One row = one token's C logits.
#pragma once

#include <cstdint>

namespace varlen {

// Per-token loss and logsumexp; rows with mask false get 0 and are not read.
//   logits (R, C) row-major; target, mask (R,); loss, lse (R,) in acc_t
template <typename scalar_t, typename acc_t>
struct CeArgs {
  const scalar_t* logits;
  const int64_t* target;
  const bool* mask;
  acc_t* loss;   // forward out
  acc_t* lse;    // forward out / backward in
  const acc_t* grad_loss;  // backward in (R,)
  scalar_t* grad_logits;   // backward out (R, C)
  int64_t C;
  double label_smoothing;
  const acc_t* weight = nullptr;  // (C,) class weights, or null (all 1)
  acc_t weight_sum = acc_t(0);    // sum of weight (when given)
  int64_t grad_stride = 1;        // of grad_loss: 0 for one value expanded to every row
};

#define VK_DECLARE_CE(NS)                                                        \
  namespace NS {                                                                 \
  template <typename scalar_t, typename acc_t>                                   \
  void ce_forward_rows(const CeArgs<scalar_t, acc_t>& a, int64_t r0, int64_t r1);  \
  template <typename scalar_t, typename acc_t>                                   \
  void ce_backward_rows(const CeArgs<scalar_t, acc_t>& a, int64_t r0, int64_t r1); \
  }
VK_DECLARE_CE(avx2)
VK_DECLARE_CE(base)
#undef VK_DECLARE_CE

}  // namespace varlen

#ifdef VK_CPU_NS
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <vector>

namespace varlen {
namespace VK_CPU_NS {

// A row in the math type: the row itself for float/double, a converted copy
// for half/bfloat16.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_in_acc(const scalar_t* row, int64_t C, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    buf.resize(C);
    for (int64_t c = 0; c < C; ++c) buf[c] = acc_t(row[c]);
    return buf.data();
  }
}

template <typename scalar_t, typename acc_t>
void ce_forward_rows(const CeArgs<scalar_t, acc_t>& a, int64_t r0, int64_t r1) {
  using V = at::vec::Vectorized<acc_t>;
  const int64_t C = a.C;
  const acc_t eps = acc_t(a.label_smoothing);
  std::vector<acc_t> buf;
  for (int64_t r = r0; r < r1; ++r) {
    if (!a.mask[r]) {
      a.loss[r] = acc_t(0);
      a.lse[r] = acc_t(0);
      continue;
    }
    const int64_t t = a.target[r];
    TORCH_CHECK(t >= 0 && t < C, "target at valid position ", r, " (flattened) is ", t,
                ", outside the class range [0, ", C, ")");
    const acc_t* x = row_in_acc<scalar_t, acc_t>(a.logits + r * C, C, buf);
    const acc_t mx = at::vec::reduce_all<acc_t>(
        [](const V& p, const V& q) { return at::vec::maximum(p, q); }, x, C);
    // A row of -inf (or with +inf) has no finite shift; use 0 so the result
    // is what the math gives (inf or nan), as in PyTorch.
    const acc_t shift = std::isfinite(mx) ? mx : acc_t(0);
    const acc_t sum = at::vec::map_reduce_all<acc_t>(
        [shift](const V& v) { return (v - V(shift)).exp(); },
        [](const V& p, const V& q) { return p + q; }, x, C);
    const acc_t lse = shift + std::log(sum);
    const acc_t wt = a.weight ? a.weight[t] : acc_t(1);
    acc_t loss = (acc_t(1) - eps) * wt * (lse - x[t]);
    if (eps != acc_t(0)) {
      if (a.weight) {  // eps / C * sum_c w[c] (lse - x[c])
        const acc_t wx = at::vec::map2_reduce_all<acc_t>(
            [](const V& v, const V& w) { return v * w; },
            [](const V& p, const V& q) { return p + q; }, x, a.weight, C);
        loss += eps / acc_t(C) * (a.weight_sum * lse - wx);
      } else {
        const acc_t mean = at::vec::reduce_all<acc_t>(
                               [](const V& p, const V& q) { return p + q; }, x, C) /
                           acc_t(C);
        loss += eps * (lse - mean);
      }
    }
    a.loss[r] = loss;
    a.lse[r] = lse;
  }
}

// grad_logits[r] = grad_loss[r] * (softmax - (1 - eps) * onehot(t) - eps / C);
// with class weights w (sum W):
//   grad_loss[r] * (softmax ((1 - eps) w[t] + eps W / C) - (1 - eps) w[t] onehot(t) - eps w / C)
template <typename scalar_t, typename acc_t>
void ce_backward_rows(const CeArgs<scalar_t, acc_t>& a, int64_t r0, int64_t r1) {
  using V = at::vec::Vectorized<acc_t>;
  const int64_t C = a.C;
  const acc_t eps = acc_t(a.label_smoothing);
  std::vector<acc_t> buf, out;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* g = a.grad_logits + r * C;
    if (!a.mask[r]) {
      std::fill_n(g, C, scalar_t(0));
      continue;
    }
    const acc_t* x = row_in_acc<scalar_t, acc_t>(a.logits + r * C, C, buf);
    const acc_t go = a.grad_loss[r * a.grad_stride], lse = a.lse[r], uniform = go * eps / acc_t(C);
    acc_t* dst;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      dst = g;
    } else {
      out.resize(C);
      dst = out.data();
    }
    const int64_t t = a.target[r];
    TORCH_CHECK(t >= 0 && t < C, "target at valid position ", r, " (flattened) is ", t,
                ", outside the class range [0, ", C, ")");
    if (a.weight) {
      const acc_t wt = a.weight[t];
      const acc_t scale = go * ((acc_t(1) - eps) * wt + eps * a.weight_sum / acc_t(C));
      const acc_t per_weight = go * eps / acc_t(C);
      at::vec::map2<acc_t>(
          [lse, scale, per_weight](const V& v, const V& w) {
            return (v - V(lse)).exp() * V(scale) - w * V(per_weight);
          },
          dst, x, a.weight, C);
      dst[t] -= go * (acc_t(1) - eps) * wt;
    } else {
      at::vec::map<acc_t>(
          [go, lse, uniform](const V& v) { return (v - V(lse)).exp() * V(go) - V(uniform); }, dst,
          x, C);
      dst[t] -= go * (acc_t(1) - eps);
    }
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t c = 0; c < C; ++c) g[c] = scalar_t(dst[c]);
    }
  }
}

#define VK_INSTANTIATE_CE(S)                                                                  \
  template void ce_forward_rows<S, at::opmath_type<S>>(const CeArgs<S, at::opmath_type<S>>&, \
                                                       int64_t, int64_t);                    \
  template void ce_backward_rows<S, at::opmath_type<S>>(                                     \
      const CeArgs<S, at::opmath_type<S>>&, int64_t, int64_t);
VK_INSTANTIATE_CE(float)
VK_INSTANTIATE_CE(double)
VK_INSTANTIATE_CE(c10::BFloat16)
VK_INSTANTIATE_CE(c10::Half)
#undef VK_INSTANTIATE_CE

}  // namespace VK_CPU_NS
}  // namespace varlen
#endif  // VK_CPU_NS
