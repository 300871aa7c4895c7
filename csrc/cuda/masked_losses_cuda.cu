// CUDA kernels of the masked losses: one block per token row (a grid-stride
// loop over rows, so any row count fits the grid).
// Cross entropy forward: an online logsumexp over C (running max and rescaled
// sum per thread, then a block reduction), so log-softmax is never
// materialized; only the per-token logsumexp is kept. Backward: softmax -
// onehot, scaled by the upstream gradient. Logits are read 16 bytes at a time
// where the row is aligned. Rows with mask false are never read. No host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "../cell_math.h"
#include "../loss_args.h"
#include "launch.h"

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

// 16-byte vectors of logits.
template <typename scalar_t>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Rows are read as 16-byte vectors when the row start is aligned (uniform
// across the block), else one element at a time.
template <typename scalar_t>
__device__ __forceinline__ bool row_aligned(const scalar_t* x) {
  return reinterpret_cast<std::uintptr_t>(x) % 16 == 0;
}

// Adds the values v[0..n) to a running (max, sum of exp(x - max)). A -inf value
// adds exp(-inf) = 0 (never exp(-inf - -inf) = NaN).
template <typename acc_t, int N>
__device__ __forceinline__ void online_add(MaxSum<acc_t>& ms, const acc_t (&v)[N]) {
  acc_t m = ms.m;
#pragma unroll
  for (int k = 0; k < N; ++k) m = v[k] > m ? v[k] : m;
  if (m == -INFINITY) return;  // everything so far is -inf: the sum stays 0
  acc_t s = ms.s * Math<acc_t>::exp(ms.m - m);  // ms.m = -inf gives 0
#pragma unroll
  for (int k = 0; k < N; ++k) s += Math<acc_t>::exp(v[k] - m);
  ms.m = m;
  ms.s = s;
}

template <typename scalar_t, typename acc_t>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ logits,
                                  const int64_t* __restrict__ target,
                                  const bool* __restrict__ mask, acc_t* loss, acc_t* lse_out,
                                  int64_t R, int64_t C, acc_t eps) {
  VK_SHARED(MaxSum<acc_t>, shared_ms, kThreads / 32);
  VK_SHARED(acc_t, shared_sum, kThreads / 32);
  constexpr int V = Vec16<scalar_t>::kSize;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    if (!mask[r]) {  // uniform across the block
      if (threadIdx.x == 0) loss[r] = lse_out[r] = acc_t(0);
      continue;
    }
    const int64_t t = target[r];
    CUDA_KERNEL_ASSERT(t >= 0 && t < C && "target out of class range at a valid position");
    const scalar_t* x = logits + r * C;
    const MaxSum<acc_t> none{-INFINITY, acc_t(0)};
    MaxSum<acc_t> ms = none;
    acc_t sum = acc_t(0);
    int64_t c0 = 0;
    if (row_aligned(x)) {
      const int64_t nvec = C / V;
      for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
        const Vec16<scalar_t> in = reinterpret_cast<const Vec16<scalar_t>*>(x)[i];
        acc_t v[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          v[k] = acc_t(in.v[k]);
          sum += v[k];
        }
        online_add(ms, v);
      }
      c0 = nvec * V;
    }
    for (int64_t c = c0 + threadIdx.x; c < C; c += blockDim.x) {
      const acc_t v[1] = {acc_t(x[c])};
      online_add(ms, v);
      sum += v[0];
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
}

template <typename scalar_t, typename acc_t>
__global__ void ce_backward_kernel(const acc_t* __restrict__ grad_loss,
                                   const scalar_t* __restrict__ logits,
                                   const int64_t* __restrict__ target,
                                   const bool* __restrict__ mask, const acc_t* __restrict__ lse,
                                   scalar_t* __restrict__ grad, int64_t R, int64_t C, acc_t eps) {
  constexpr int V = Vec16<scalar_t>::kSize;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    scalar_t* g = grad + r * C;
    const bool aligned = row_aligned(g) && row_aligned(logits + r * C);
    const int64_t c0 = aligned ? C / V * V : 0;
    if (!mask[r]) {
      Vec16<scalar_t> zero;
#pragma unroll
      for (int k = 0; k < V; ++k) zero.v[k] = scalar_t(0);
      for (int64_t i = threadIdx.x; i < c0 / V; i += blockDim.x)
        reinterpret_cast<Vec16<scalar_t>*>(g)[i] = zero;
      for (int64_t c = c0 + threadIdx.x; c < C; c += blockDim.x) g[c] = scalar_t(0);
      continue;
    }
    const scalar_t* x = logits + r * C;
    const acc_t go = grad_loss[r], l = lse[r], uniform = go * eps / acc_t(C);
    const acc_t hit = go * (acc_t(1) - eps);
    const int64_t t = target[r];
    for (int64_t i = threadIdx.x; i < c0 / V; i += blockDim.x) {
      const Vec16<scalar_t> in = reinterpret_cast<const Vec16<scalar_t>*>(x)[i];
      Vec16<scalar_t> out;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc_t v = Math<acc_t>::exp(acc_t(in.v[k]) - l) * go - uniform;
        if (i * V + k == t) v -= hit;
        out.v[k] = scalar_t(v);
      }
      reinterpret_cast<Vec16<scalar_t>*>(g)[i] = out;
    }
    for (int64_t c = c0 + threadIdx.x; c < C; c += blockDim.x) {
      acc_t v = Math<acc_t>::exp(acc_t(x[c]) - l) * go - uniform;
      if (c == t) v -= hit;
      g[c] = scalar_t(v);
    }
  }
}

std::tuple<Tensor, Tensor> cross_entropy_forward_cuda(const Tensor& logits, const Tensor& target,
                                                      const Tensor& mask,
                                                      double label_smoothing) {
  check_cross_entropy_args(logits, target, mask, label_smoothing);
  const cuda::DeviceGuard guard(logits.device());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const int64_t R = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor loss = at::empty({R}, x.options().dtype(acc));
  Tensor lse = at::empty({R}, x.options().dtype(acc));
  if (R == 0) return {loss, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(ce_forward_kernel<scalar_t, acc_t>, cuda::grid_for(R, 1), kThreads, 0,
                 cuda::current_stream(), x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                 m.const_data_ptr<bool>(), loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), R, C,
                 acc_t(label_smoothing));
  });
  return {loss, lse};
}

Tensor cross_entropy_backward_cuda(const Tensor& grad_loss, const Tensor& logits,
                                   const Tensor& target, const Tensor& mask, const Tensor& lse,
                                   double label_smoothing) {
  check_cross_entropy_backward_args(grad_loss, logits, target, mask, lse, label_smoothing);
  const cuda::DeviceGuard guard(logits.device());
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const Tensor g = grad_loss.to(acc).contiguous(), l = lse.contiguous();
  Tensor grad = at::empty({R, C}, x.options());
  if (R == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(ce_backward_kernel<scalar_t, acc_t>, cuda::grid_for(R, 1), kThreads, 0,
                 cuda::current_stream(), g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(),
                 t.const_data_ptr<int64_t>(), m.const_data_ptr<bool>(), l.const_data_ptr<acc_t>(),
                 grad.data_ptr<scalar_t>(), R, C, acc_t(label_smoothing));
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
                                      int64_t R, int64_t F, ElemLoss kind) {
  VK_SHARED(acc_t, shared, kThreads / 32);
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    if (!mask[r]) {  // uniform across the block
      if (threadIdx.x == 0) out[r] = acc_t(0);
      continue;
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

Tensor elementwise_loss_forward_cuda(const Tensor& input, const Tensor& target, const Tensor& mask,
                                    const c10::optional<Tensor>& pos_weight,
                                    c10::string_view kind_name, bool reduce_rows) {
  const ElemLossOperands o =
      elementwise_loss_operands(input, target, mask, pos_weight, std::string(kind_name));
  const cuda::DeviceGuard guard(input.device());
  const Tensor &x = o.x, &y = o.y, &m = o.mask, &pw = o.pos_weight;
  const int64_t R = o.R, F = o.F;
  const ElemLoss kind = o.kind;
  const auto acc = o.acc;
  Tensor out = reduce_rows ? at::empty({R}, x.options().dtype(acc))
                           : at::empty({R, F}, x.options().dtype(acc));
  if (R == 0) return out;
  const auto stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pwp = pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr;
    if (reduce_rows) {
      cuda::launch(elem_loss_rows_kernel<scalar_t, acc_t>, cuda::grid_for(R, 1), kThreads, 0,
                   stream, x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                   m.const_data_ptr<bool>(), pwp, out.data_ptr<acc_t>(), R, F, kind);
    } else if (F > 0) {
      cuda::launch(elem_loss_elements_kernel<scalar_t, acc_t, false>,
                   cuda::grid_for(R * F, kThreads, 65535), kThreads, 0, stream,
                   x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                   m.const_data_ptr<bool>(), pwp, static_cast<const acc_t*>(nullptr), false,
                   out.data_ptr<acc_t>(), static_cast<scalar_t*>(nullptr),
                   static_cast<scalar_t*>(nullptr), R, F, kind);
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> elementwise_loss_backward_cuda(
    const Tensor& grad, const Tensor& input, const Tensor& target, const Tensor& mask,
    const c10::optional<Tensor>& pos_weight, c10::string_view kind_name, bool reduce_rows) {
  const ElemLossOperands o =
      elementwise_loss_operands(input, target, mask, pos_weight, std::string(kind_name));
  const cuda::DeviceGuard guard(input.device());
  const Tensor &x = o.x, &y = o.y, &m = o.mask, &pw = o.pos_weight;
  const int64_t R = o.R, F = o.F;
  const ElemLoss kind = o.kind;
  const Tensor g = elementwise_loss_grad(grad, o, reduce_rows);
  Tensor gx = at::empty({R, F}, x.options()), gy = at::empty({R, F}, x.options());
  if (R * F == 0) return {gx, gy};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(elem_loss_elements_kernel<scalar_t, acc_t, true>,
                 cuda::grid_for(R * F, kThreads, 65535), kThreads, 0, cuda::current_stream(),
                 x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                 m.const_data_ptr<bool>(),
                 pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr, g.const_data_ptr<acc_t>(),
                 reduce_rows, static_cast<acc_t*>(nullptr), gx.data_ptr<scalar_t>(),
                 gy.data_ptr<scalar_t>(), R, F, kind);
  });
  return {gx, gy};
}

}  // namespace
}  // namespace varlen

VK_CUDA_LIBRARY_IMPL(m) {
  m.impl("cross_entropy_forward", &varlen::cross_entropy_forward_cuda);
  m.impl("cross_entropy_backward", &varlen::cross_entropy_backward_cuda);
  m.impl("elementwise_loss_forward", &varlen::elementwise_loss_forward_cuda);
  m.impl("elementwise_loss_backward", &varlen::elementwise_loss_backward_cuda);
}
