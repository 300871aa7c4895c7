// The length plan, the packed token layout and the GEMMs over tokens: see
// token_plan.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "launch.h"
#include "settings.h"
#include "token_plan.h"

namespace varlen {

namespace {

using at::Tensor;

constexpr int kThreads = 256;

// One element of the (T, B, C) grid each: slot (t, i) of the length order is
// token row off[t] + i while i < bs[t]; the padded slots, in order, fill the
// rows past N (so every row of the result is written once, those with zeros).
template <typename scalar_t>
__global__ void pack_kernel(const scalar_t* x, const int64_t* perm, const int64_t* off,
                            scalar_t* out, int64_t T, int64_t B, int64_t C) {
  const int64_t n = T * B * C;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % C, slot = idx / C, t = slot / B, i = slot % B;
    const int64_t begin = off[t], end = off[t + 1];
    if (i < end - begin)
      out[(begin + i) * C + c] = x[(t * B + perm[i]) * C + c];
    else
      out[(off[T] + t * B + i - end) * C + c] = scalar_t(0);
  }
}

// One element of the (T, B, C) result each: token (t, b) from row
// off[t] + rank[b] while sequence b runs at t, zero otherwise.
template <typename scalar_t>
__global__ void unpack_kernel(const scalar_t* packed, int64_t ld, const int64_t* rank,
                              const int64_t* off, scalar_t* out, int64_t T, int64_t B,
                              int64_t C) {
  const int64_t n = T * B * C;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % C, slot = idx / C, t = slot / B, b = slot % B;
    const int64_t i = rank[b], begin = off[t];
    out[idx] = i < off[t + 1] - begin ? packed[(begin + i) * ld + c] : scalar_t(0);
  }
}

enum class TokenGemm { Auto, AllRows, ValidRows };

TokenGemm token_gemm_setting() {
  return choice_setting<TokenGemm>("VARLEN_KERNELS_TOKEN_GEMM",
                                   {{"auto", TokenGemm::Auto}, {"all_rows", TokenGemm::AllRows},
                                    {"valid_rows", TokenGemm::ValidRows}});
}

// The plan on the device: a few ATen ops, no host read.
TokenPlan device_plan(const Tensor& lengths, int64_t T) {
  TokenPlan p;
  p.T = T;
  p.B = lengths.size(0);
  const Tensor len = p.lengths = lengths.contiguous();
  std::tie(p.sorted_len, p.perm) = at::sort(len, /*stable=*/true, 0, /*descending=*/true);
  p.rank = at::empty_like(p.perm).scatter_(0, p.perm, at::arange(p.B, p.perm.options()));
  // bs[t] = #{b : lengths[b] > t}, a (T, B) comparison: small next to the work
  // per token, and no sort or scan of the host.
  const Tensor bs = (len.unsqueeze(0) > at::arange(T, len.options()).unsqueeze(1)).sum(1);
  p.off = at::zeros({T + 1}, len.options());
  if (T > 0) p.off.narrow(0, 1, T).copy_(at::cumsum(bs, 0));
  p.count = p.off.narrow(0, T, 1).to(at::kInt);
  return p;
}

// The same plan from lengths in host memory, computed there (a counting pass,
// O(B log B + T)) and copied to the device as one buffer
// [lengths | sorted_len | perm | rank | off]: pinned, so the copy is
// asynchronous and the host memory stays reserved until it is done.
TokenPlan host_plan(const Tensor& lengths, int64_t T, const at::Device& device) {
  TORCH_CHECK(!cuda::capturing(),
              "lengths in host memory cannot be captured in a CUDA graph (the graph would "
              "replay the lengths of its capture): pass lengths on the input's device");
  const int64_t B = lengths.size(0);
  Tensor buf = at::empty({4 * B + T + 1}, lengths.options());
  int64_t* const len = buf.data_ptr<int64_t>();
  int64_t *const sorted = len + B, *const perm = len + 2 * B, *const rank = len + 3 * B,
                 *const off = len + 4 * B;
  const Tensor in = lengths.contiguous();
  const int64_t* src = in.const_data_ptr<int64_t>();
  std::vector<int64_t> ends(T + 1, 0);  // ends[l]: sequences of length l
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(src[b] >= 0 && src[b] <= T, "lengths must be in [0, T] with T=", T,
                " (the input's time dimension), got lengths[", b, "] = ", src[b]);
    len[b] = src[b];
    ++ends[src[b]];
  }
  for (int64_t b = 0; b < B; ++b) perm[b] = b;
  std::stable_sort(perm, perm + B, [&](int64_t a, int64_t b) { return len[a] > len[b]; });
  for (int64_t i = 0; i < B; ++i) {
    sorted[i] = len[perm[i]];
    rank[perm[i]] = i;
  }
  // off[t + 1] = off[t] + bs[t], bs[t] = #{b : lengths[b] > t}.
  int64_t running = B;
  off[0] = 0;
  for (int64_t t = 0; t < T; ++t) {
    running -= ends[t];
    off[t + 1] = off[t] + running;
  }
  TokenPlan p;
  p.T = T;
  p.B = B;
  p.host_count = off[T];
  p.host_steps = B > 0 ? sorted[0] : 0;
#ifndef VK_EMULATE_CUDA
  buf = buf.pin_memory().to(device, /*non_blocking=*/true);
#else
  (void)device;
#endif
  p.lengths = buf.narrow(0, 0, B);
  p.sorted_len = buf.narrow(0, B, B);
  p.perm = buf.narrow(0, 2 * B, B);
  p.rank = buf.narrow(0, 3 * B, B);
  p.off = buf.narrow(0, 4 * B, T + 1);
  p.count = p.off.narrow(0, T, 1).to(at::kInt);
  return p;
}

}  // namespace

TokenPlan make_token_plan(const Tensor& lengths, int64_t T, const at::Device& device) {
  return cuda::in_host_memory(lengths) ? host_plan(lengths, T, device) : device_plan(lengths, T);
}

Tensor pack_tokens(const Tensor& x, const TokenPlan& p) {
  TORCH_INTERNAL_ASSERT(x.dim() == 3 && x.size(0) == p.T && x.size(1) == p.B);
  const int64_t T = p.T, B = p.B, C = x.size(2);
  const Tensor xc = x.contiguous();
  Tensor out = at::empty({T * B, C}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "pack_tokens", [&] {
    cuda::launch(pack_kernel<scalar_t>, cuda::grid_for(T * B * C, kThreads), kThreads, 0,
                 cuda::current_stream(), xc.const_data_ptr<scalar_t>(),
                 p.perm.const_data_ptr<int64_t>(), p.off.const_data_ptr<int64_t>(),
                 out.data_ptr<scalar_t>(), T, B, C);
  });
  return out;
}

Tensor unpack_tokens(const Tensor& packed_in, const TokenPlan& p) {
  TORCH_INTERNAL_ASSERT(packed_in.dim() == 2 && packed_in.size(0) == p.T * p.B);
  const Tensor packed = packed_in.stride(1) == 1 ? packed_in : packed_in.contiguous();
  const int64_t T = p.T, B = p.B, C = packed.size(1);
  Tensor out = at::empty({T, B, C}, packed.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, packed.scalar_type(),
                                  "unpack_tokens", [&] {
    cuda::launch(unpack_kernel<scalar_t>, cuda::grid_for(T * B * C, kThreads), kThreads, 0,
                 cuda::current_stream(), packed.const_data_ptr<scalar_t>(), packed.stride(0),
                 p.rank.const_data_ptr<int64_t>(), p.off.const_data_ptr<int64_t>(),
                 out.data_ptr<scalar_t>(), T, B, C);
  });
  return out;
}

// The grouped GEMM's fast path (a CUTLASS kernel reading its problem sizes
// from the device) is PyTorch's for bfloat16 on sm_90 and sm_100 in its CUDA
// builds (not ROCm, not Windows); other types and devices go through a
// fallback that reads the offsets on the host, which would break the no-sync
// design, so they take at::mm. Its operands need 16-byte aligned pointers and
// leading dimensions, and a unit stride in one dimension; its problem sizes
// are int32.
bool token_gemm_valid_only(std::initializer_list<const Tensor*> operands) {
#if defined(USE_ROCM) || defined(_WIN32)
  return false;
#endif
  if (token_gemm_setting() == TokenGemm::AllRows) return false;
  const int major = cuda::compute_major();
  if (major != 9 && major != 10) return false;
  for (const Tensor* t : operands) {
    if (t->size(0) > std::numeric_limits<int32_t>::max() ||
        t->size(1) > std::numeric_limits<int32_t>::max())
      return false;
    if (t->scalar_type() != at::kBFloat16 || t->dim() != 2) return false;
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
    const int64_t s0 = t->stride(0), s1 = t->stride(1);
    if (!((s1 == 1 && s0 % 8 == 0 && s0 >= t->size(1)) ||
          (s0 == 1 && s1 % 8 == 0 && s1 >= t->size(0))))
      return false;
    if (t->size(0) == 0 || t->size(1) == 0) return false;
  }
  return true;
}

bool token_gemm_valid_rows_asked(std::initializer_list<const Tensor*> operands) {
  return token_gemm_setting() == TokenGemm::ValidRows && token_gemm_valid_only(operands);
}

Tensor tokens_times(const Tensor& a, const Tensor& w, const Tensor& count) {
  if (token_gemm_valid_only({&a, &w}) && w.size(1) % 8 == 0)
    return at::_grouped_mm(a, w.unsqueeze(0), count);
  return at::mm(a, w);
}

Tensor tokens_outer(const Tensor& d, const Tensor& x, const Tensor& count) {
  if (token_gemm_valid_only({&d, &x}) && d.stride(1) == 1 && x.stride(1) == 1 &&
      x.size(1) % 8 == 0) {
    // A reduction over no row is not defined to give zero in the grouped
    // kernel; the rows past the count are zero in both operands, so a count
    // of at least one row gives the same sum and is always defined.
    return at::_grouped_mm(d.t(), x, count.clamp_min(1)).select(0, 0);
  }
  return at::mm(d.t(), x);
}

Tensor tokens_times(const Tensor& a, const Tensor& w, const TokenPlan& p) {
  if (p.host_count < 0) return tokens_times(a, w, p.count);
  Tensor out = at::empty({a.size(0), w.size(1)}, a.options());
#ifdef VK_EMULATE_CUDA
  // Rows past N are unspecified: NaN under the emulation, so that a caller
  // that reads them fails its checks.
  out.narrow(0, p.host_count, a.size(0) - p.host_count)
      .fill_(std::numeric_limits<double>::quiet_NaN());
#endif
  Tensor valid = out.narrow(0, 0, p.host_count);
  at::mm_out(valid, a.narrow(0, 0, p.host_count), w);
  return out;
}

Tensor tokens_outer(const Tensor& d, const Tensor& x, const TokenPlan& p) {
  if (p.host_count < 0) return tokens_outer(d, x, p.count);
  return at::mm(d.narrow(0, 0, p.host_count).t(), x.narrow(0, 0, p.host_count));
}

}  // namespace varlen
