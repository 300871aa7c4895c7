// Fused linear + masked cross entropy on the GPU: every row goes through the
// GEMMs (selecting the valid ones would need a host sync); the cross-entropy
// kernels of masked_losses_cuda.cu skip the rest (csrc/linear_cross_entropy.h).
#include "../linear_cross_entropy.h"
#include "launch.h"

namespace varlen {
namespace {

struct CudaBackend {
  static constexpr const char* kLibrary = VK_CUDA_LIBRARY;
  static constexpr bool kCompact = false;
  using Guard = cuda::DeviceGuard;
};

}  // namespace
}  // namespace varlen

VK_CUDA_LIBRARY_IMPL(m) {
  m.impl("linear_cross_entropy_forward", &varlen::linear_ce_forward_op<varlen::CudaBackend>);
  m.impl("linear_cross_entropy_backward", &varlen::linear_ce_backward_op<varlen::CudaBackend>);
}
