// CPU kernels of the masked cross entropy: rows are tokens, parallel over rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../loss_args.h"
#include "cpu_capability.h"
#include "loss_rows.h"

namespace varlen {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> cross_entropy_forward_cpu(const Tensor& logits, const Tensor& target,
                                                     const Tensor& mask,
                                                     double label_smoothing) {
  check_cross_entropy_args(logits, target, mask, label_smoothing);
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor loss = at::empty({R}, x.options().dtype(acc));
  Tensor lse = at::empty({R}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CeArgs<scalar_t, acc_t> a{x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                                    m.const_data_ptr<bool>(), loss.data_ptr<acc_t>(),
                                    lse.data_ptr<acc_t>(), nullptr, nullptr, C, label_smoothing};
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
                       if (use_avx2()) avx2::ce_forward_rows(a, r0, r1);
                       else base::ce_forward_rows(a, r0, r1);
                     });
  });
  return {loss, lse};
}

Tensor cross_entropy_backward_cpu(const Tensor& grad_loss, const Tensor& logits,
                                  const Tensor& target, const Tensor& mask, const Tensor& lse,
                                  double label_smoothing) {
  check_cross_entropy_backward_args(grad_loss, logits, target, mask, lse, label_smoothing);
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const Tensor g = grad_loss.to(acc).contiguous(), l = lse.contiguous();
  Tensor grad = at::empty({R, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CeArgs<scalar_t, acc_t> a{x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                                    m.const_data_ptr<bool>(), nullptr,
                                    const_cast<acc_t*>(l.const_data_ptr<acc_t>()),
                                    g.const_data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), C,
                                    label_smoothing};
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
                       if (use_avx2()) avx2::ce_backward_rows(a, r0, r1);
                       else base::ce_backward_rows(a, r0, r1);
                     });
  });
  return grad;
}

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen_kernels, CPU, m) {
  m.impl("cross_entropy_forward", &varlen::cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &varlen::cross_entropy_backward_cpu);
}
