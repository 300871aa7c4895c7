// Fused linear + masked cross entropy on the GPU: every row goes through the
// GEMMs (selecting the valid ones would need a host sync); the cross-entropy
// kernels of masked_losses_cuda.cu skip the rest (csrc/linear_cross_entropy.h).
#include "../linear_cross_entropy.h"
#include "launch.h"

namespace varlen {
namespace {

LinearCeResult linear_ce_forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& target, const at::Tensor& mask,
                                      double label_smoothing, c10::string_view reduction,
                                      bool compute_grad, int64_t chunk) {
  const cuda::DeviceGuard guard(hidden.device());
  return linear_ce_forward(VK_CUDA_LIBRARY, /*compact=*/false, hidden, weight, bias, target, mask,
                           label_smoothing, std::string(reduction), compute_grad, chunk);
}

LinearCeGrads linear_ce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                      const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const at::Tensor& target, const at::Tensor& mask,
                                      const at::Tensor& lse, double label_smoothing,
                                      int64_t chunk) {
  const cuda::DeviceGuard guard(hidden.device());
  return linear_ce_backward(VK_CUDA_LIBRARY, /*compact=*/false, grad_loss, hidden, weight, bias,
                            target, mask, lse, label_smoothing, chunk);
}

}  // namespace
}  // namespace varlen

VK_CUDA_LIBRARY_IMPL(m) {
  m.impl("linear_cross_entropy_forward", &varlen::linear_ce_forward_cuda);
  m.impl("linear_cross_entropy_backward", &varlen::linear_ce_backward_cuda);
}
