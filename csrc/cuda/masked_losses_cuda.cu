// CUDA kernels of the masked cross entropy: one block per token row.
// Forward: an online logsumexp over C (running max and rescaled sum per thread,
// then a block reduction), so log-softmax is never materialized; only the
// per-token logsumexp is kept. Backward: softmax - onehot, scaled by the
// upstream gradient. Rows with mask false are never read. No host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "../cell_math.h"
#include "../loss_args.h"

namespace varlen {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

// (max, sum of exp(x - max)) pairs, merged.
template <typename T>
struct MaxSum {
  T m, s;
};
template <typename T>
__device__ __forceinline__ MaxSum<T> merge(MaxSum<T> a, MaxSum<T> b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  const T m = a.m > b.m ? a.m : b.m;
  return {m, a.s * Math<T>::exp(a.m - m) + b.s * Math<T>::exp(b.m - m)};
}

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int o) {
  return __shfl_down_sync(0xffffffff, v, o);
}
template <typename T>
__device__ __forceinline__ MaxSum<T> shfl_down(MaxSum<T> v, int o) {
  return {__shfl_down_sync(0xffffffff, v.m, o), __shfl_down_sync(0xffffffff, v.s, o)};
}

// Reduction over the block; `identity` fills the lanes of missing warps.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) v = op(v, shfl_down(v, o));
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x / 32) ? shared[lane] : identity;
    for (int o = 16; o > 0; o /= 2) v = op(v, shfl_down(v, o));
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  const T out = shared[0];
  __syncthreads();
  return out;
}

template <typename scalar_t, typename acc_t>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ logits,
                                  const int64_t* __restrict__ target,
                                  const bool* __restrict__ mask, acc_t* loss, acc_t* lse_out,
                                  int64_t C, acc_t eps) {
  __shared__ MaxSum<acc_t> shared_ms[kThreads / 32];
  __shared__ acc_t shared_sum[kThreads / 32];
  const int64_t r = blockIdx.x;
  if (!mask[r]) {  // uniform across the block
    if (threadIdx.x == 0) loss[r] = lse_out[r] = acc_t(0);
    return;
  }
  const int64_t t = target[r];
  CUDA_KERNEL_ASSERT(t >= 0 && t < C && "target out of class range at a valid position");
  const scalar_t* x = logits + r * C;
  const MaxSum<acc_t> none{-INFINITY, acc_t(0)};
  MaxSum<acc_t> ms = none;
  acc_t sum = acc_t(0);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {  // online logsumexp, one exp each
    const acc_t v = acc_t(x[c]);
    if (v > ms.m) {
      ms.s = ms.s * Math<acc_t>::exp(ms.m - v) + acc_t(1);
      ms.m = v;
    } else {
      ms.s += Math<acc_t>::exp(v - ms.m);
    }
    sum += v;
  }
  ms = block_reduce(ms, [](MaxSum<acc_t> a, MaxSum<acc_t> b) { return merge(a, b); }, none,
                    shared_ms);
  if (eps != acc_t(0))
    sum = block_reduce(sum, [](acc_t a, acc_t b) { return a + b; }, acc_t(0), shared_sum);
  if (threadIdx.x == 0) {
    const acc_t lse = ms.m + ::log(ms.s);
    acc_t l = (acc_t(1) - eps) * (lse - acc_t(x[t]));
    if (eps != acc_t(0)) l += eps * (lse - sum / acc_t(C));
    loss[r] = l;
    lse_out[r] = lse;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void ce_backward_kernel(const acc_t* __restrict__ grad_loss,
                                   const scalar_t* __restrict__ logits,
                                   const int64_t* __restrict__ target,
                                   const bool* __restrict__ mask, const acc_t* __restrict__ lse,
                                   scalar_t* __restrict__ grad, int64_t C, acc_t eps) {
  const int64_t r = blockIdx.x;
  scalar_t* g = grad + r * C;
  if (!mask[r]) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) g[c] = scalar_t(0);
    return;
  }
  const scalar_t* x = logits + r * C;
  const acc_t go = grad_loss[r], l = lse[r], uniform = go * eps / acc_t(C);
  const int64_t t = target[r];
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t v = Math<acc_t>::exp(acc_t(x[c]) - l) * go - uniform;
    if (c == t) v -= go * (acc_t(1) - eps);
    g[c] = scalar_t(v);
  }
}

std::tuple<Tensor, Tensor> cross_entropy_forward_cuda(const Tensor& logits, const Tensor& target,
                                                      const Tensor& mask,
                                                      double label_smoothing) {
  check_cross_entropy_args(logits, target, mask, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor loss = at::empty({R}, x.options().dtype(acc));
  Tensor lse = at::empty({R}, x.options().dtype(acc));
  if (R == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_forward_kernel<scalar_t, acc_t><<<R, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(), m.const_data_ptr<bool>(),
        loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), C, acc_t(label_smoothing));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse};
}

Tensor cross_entropy_backward_cuda(const Tensor& grad_loss, const Tensor& logits,
                                   const Tensor& target, const Tensor& mask, const Tensor& lse,
                                   double label_smoothing) {
  check_cross_entropy_backward_args(grad_loss, logits, target, mask, lse, label_smoothing);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const Tensor g = grad_loss.to(acc).contiguous(), l = lse.contiguous();
  Tensor grad = at::empty({R, C}, x.options());
  if (R == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ce_backward_kernel<scalar_t, acc_t><<<R, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
        m.const_data_ptr<bool>(), l.const_data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), C,
        acc_t(label_smoothing));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

// ------------------------------------------------------ elementwise losses
// Per-token sums: one block per row, a block reduction over F.
template <typename scalar_t, typename acc_t>
__global__ void elem_loss_rows_kernel(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ y,
                                      const bool* __restrict__ mask,
                                      const scalar_t* __restrict__ pos_weight, acc_t* out,
                                      int64_t F, ElemLoss kind) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t r = blockIdx.x;
  if (!mask[r]) {  // uniform across the block
    if (threadIdx.x == 0) out[r] = acc_t(0);
    return;
  }
  acc_t sum = acc_t(0);
  for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
    const int64_t i = r * F + f;
    sum += elem_loss<acc_t>(kind, acc_t(x[i]), acc_t(y[i]),
                            pos_weight ? acc_t(pos_weight[f]) : acc_t(1)).loss;
  }
  sum = block_reduce(sum, [](acc_t a, acc_t b) { return a + b; }, acc_t(0), shared);
  if (threadIdx.x == 0) out[r] = sum;
}

// Per-element losses (forward, reduce_rows = false) or gradients (backward).
template <typename scalar_t, typename acc_t, bool kBackward>
__global__ void elem_loss_elements_kernel(const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ y,
                                          const bool* __restrict__ mask,
                                          const scalar_t* __restrict__ pos_weight,
                                          const acc_t* __restrict__ grad, bool grad_per_row,
                                          acc_t* out, scalar_t* gx, scalar_t* gy, int64_t R,
                                          int64_t F, ElemLoss kind) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < R * F;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i % F;
    if (!mask[r]) {
      if constexpr (kBackward) {
        gx[i] = gy[i] = scalar_t(0);
      } else {
        out[i] = acc_t(0);
      }
      continue;
    }
    const auto o = elem_loss<acc_t>(kind, acc_t(x[i]), acc_t(y[i]),
                                    pos_weight ? acc_t(pos_weight[f]) : acc_t(1));
    if constexpr (kBackward) {
      const acc_t g = grad_per_row ? grad[r] : grad[i];
      gx[i] = scalar_t(g * o.dx);
      gy[i] = scalar_t(g * o.dy);
    } else {
      out[i] = o.loss;
    }
  }
}

int elementwise_blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

Tensor elementwise_loss_forward_cuda(const Tensor& input, const Tensor& target, const Tensor& mask,
                                    const c10::optional<Tensor>& pos_weight,
                                    c10::string_view kind_name, bool reduce_rows) {
  const ElemLossOperands o =
      elementwise_loss_operands(input, target, mask, pos_weight, std::string(kind_name));
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor &x = o.x, &y = o.y, &m = o.mask, &pw = o.pos_weight;
  const int64_t R = o.R, F = o.F;
  const ElemLoss kind = o.kind;
  const auto acc = o.acc;
  Tensor out = reduce_rows ? at::empty({R}, x.options().dtype(acc))
                           : at::empty({R, F}, x.options().dtype(acc));
  if (R == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pwp = pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr;
    if (reduce_rows) {
      elem_loss_rows_kernel<scalar_t, acc_t><<<R, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
          pwp, out.data_ptr<acc_t>(), F, kind);
    } else if (F > 0) {
      elem_loss_elements_kernel<scalar_t, acc_t, false>
          <<<elementwise_blocks(R * F), kThreads, 0, stream>>>(
              x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
              m.const_data_ptr<bool>(), pwp, nullptr, false, out.data_ptr<acc_t>(), nullptr,
              nullptr, R, F, kind);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> elementwise_loss_backward_cuda(
    const Tensor& grad, const Tensor& input, const Tensor& target, const Tensor& mask,
    const c10::optional<Tensor>& pos_weight, c10::string_view kind_name, bool reduce_rows) {
  const ElemLossOperands o =
      elementwise_loss_operands(input, target, mask, pos_weight, std::string(kind_name));
  const c10::cuda::CUDAGuard guard(input.device());
  const Tensor &x = o.x, &y = o.y, &m = o.mask, &pw = o.pos_weight;
  const int64_t R = o.R, F = o.F;
  const ElemLoss kind = o.kind;
  const Tensor g = elementwise_loss_grad(grad, o, reduce_rows);
  Tensor gx = at::empty({R, F}, x.options()), gy = at::empty({R, F}, x.options());
  if (R * F == 0) return {gx, gy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    elem_loss_elements_kernel<scalar_t, acc_t, true>
        <<<elementwise_blocks(R * F), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), m.const_data_ptr<bool>(),
            pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr, g.const_data_ptr<acc_t>(),
            reduce_rows, nullptr, gx.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), R, F, kind);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gy};
}

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen_kernels, CUDA, m) {
  m.impl("cross_entropy_forward", &varlen::cross_entropy_forward_cuda);
  m.impl("cross_entropy_backward", &varlen::cross_entropy_backward_cuda);
  m.impl("elementwise_loss_forward", &varlen::elementwise_loss_forward_cuda);
  m.impl("elementwise_loss_backward", &varlen::elementwise_loss_backward_cuda);
}
