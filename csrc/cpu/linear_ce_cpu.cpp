// Fused linear + masked cross entropy on the CPU: the valid tokens are
// gathered first, so the GEMMs cost work for them alone
// (csrc/linear_cross_entropy.h).
#include <torch/library.h>

#include "../linear_cross_entropy.h"

namespace varlen {
namespace {

struct CpuBackend {
  static constexpr const char* kLibrary = "varlen_kernels";
  static constexpr bool kCompact = true;
  static const RowCountGemms* row_count_gemms() { return nullptr; }
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };
};

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen_kernels, CPU, m) {
  m.impl("linear_cross_entropy_forward", &varlen::linear_ce_forward_op<varlen::CpuBackend>);
  m.impl("linear_cross_entropy_backward", &varlen::linear_ce_backward_op<varlen::CpuBackend>);
}
