// Fused linear + masked cross entropy on the CPU: the valid tokens are
// gathered first, so the GEMMs cost work for them alone
// (csrc/linear_cross_entropy.h).
#include <torch/library.h>

#include "../linear_cross_entropy.h"

namespace varlen {
namespace {

LinearCeResult linear_ce_forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& target, const at::Tensor& mask,
                                     double label_smoothing, c10::string_view reduction,
                                     bool compute_grad, int64_t chunk) {
  return linear_ce_forward("varlen_kernels", /*compact=*/true, hidden, weight, bias, target, mask,
                           label_smoothing, std::string(reduction), compute_grad, chunk);
}

LinearCeGrads linear_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                     const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias,
                                     const at::Tensor& target, const at::Tensor& mask,
                                     const at::Tensor& lse, double label_smoothing,
                                     int64_t chunk) {
  return linear_ce_backward("varlen_kernels", /*compact=*/true, grad_loss, hidden, weight, bias,
                            target, mask, lse, label_smoothing, chunk);
}

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen_kernels, CPU, m) {
  m.impl("linear_cross_entropy_forward", &varlen::linear_ce_forward_cpu);
  m.impl("linear_cross_entropy_backward", &varlen::linear_ce_backward_cpu);
}
