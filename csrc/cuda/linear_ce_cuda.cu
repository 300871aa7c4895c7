// Fused linear + masked cross entropy on the GPU (csrc/linear_cross_entropy.h):
// every row goes through the GEMMs (selecting the valid ones on the host would
// need a host sync), padded rows as zeros; with VARLEN_KERNELS_TOKEN_GEMM=
// valid_rows, where the GEMMs over tokens can take a device-side row count
// (bfloat16 on sm_90 / sm_100, token_plan.h), the valid tokens are ordered
// first on the device and the GEMMs cover them alone, which was 1.5x slower on
// an H200 (token_plan.h). The cross-entropy kernels of masked_losses_cuda.cu
// skip the invalid rows either way.
#include "../linear_cross_entropy.h"
#include "launch.h"
#include "token_plan.h"

namespace varlen {
namespace {

struct CudaBackend {
  static constexpr const char* kLibrary = VK_CUDA_LIBRARY;
  static constexpr bool kCompact = false;
  static const RowCountGemms* row_count_gemms() {
    static const RowCountGemms gemms{token_gemm_valid_rows_asked, tokens_times, tokens_outer};
    return &gemms;
  }
  using Guard = cuda::DeviceGuard;
};

}  // namespace
}  // namespace varlen

VK_CUDA_LIBRARY_IMPL(m) {
  m.impl("linear_cross_entropy_forward", &varlen::linear_ce_forward_op<varlen::CudaBackend>);
  m.impl("linear_cross_entropy_backward", &varlen::linear_ce_backward_op<varlen::CudaBackend>);
}
