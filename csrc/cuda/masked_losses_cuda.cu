// CUDA kernels of the masked losses: one block per token row (a grid-stride
// loop over rows, so any row count fits the grid).
// Cross entropy forward: an online logsumexp over C (running max and rescaled
// sum per thread, then a block reduction), so log-softmax is never
// materialized; only the per-token logsumexp is kept. Backward: softmax -
// onehot, scaled by the upstream gradient. Class weights (optional) scale
// each token's loss by the weight of its target and, with label smoothing,
// weight the smoothing term per class (F.cross_entropy's formula); the
// kernels are instantiated with and without weights, so the unweighted path
// does no extra work. Logits are read 16 bytes at a time
// from each row's first 16-byte boundary on. Rows with mask false are never
// read. No host sync. masked_cross_entropy_forward decides in the same kernel
// which rows count (from the lengths or the mask, and ignore_index) and
// leaves each block's sums, which a one-block kernel adds in a fixed order
// for the reduction: two launches for what the Python idiom takes a dozen.
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

// A running logsumexp: (max, sum of exp(x - max)). Special values end up as in
// PyTorch's logsumexp: a NaN makes it NaN, a +inf makes it +inf (m = +inf,
// s = 1), a -inf adds exp(-inf) = 0 (never exp(-inf - -inf) = NaN).
template <typename T>
struct MaxSum {
  T m, s;
};
template <typename T>
__device__ __forceinline__ bool is_nan(T v) {
  return v != v;
}
template <typename T>
__device__ __forceinline__ MaxSum<T> merge(MaxSum<T> a, MaxSum<T> b) {
  if (is_nan(a.m) || a.m == T(INFINITY)) return a;
  if (is_nan(b.m) || b.m == T(INFINITY)) return b;
  if (a.m == T(-INFINITY)) return b;
  if (b.m == T(-INFINITY)) return a;
  const T m = a.m > b.m ? a.m : b.m;
  return {m, a.s * Math<T>::exp(a.m - m) + b.s * Math<T>::exp(b.m - m)};
}

// Adds one value: one exp (the sum is rescaled only when the max moves).
template <typename T>
__device__ __forceinline__ void online_add(MaxSum<T>& ms, T v) {
  if (is_nan(ms.m) || ms.m == T(INFINITY)) return;  // final already
  if (is_nan(v) || v == T(INFINITY)) {
    ms = {v, T(1)};
  } else if (v > ms.m) {  // ms.m = -inf gives exp(-inf) = 0
    ms.s = ms.s * Math<T>::exp(ms.m - v) + T(1);
    ms.m = v;
  } else if (v != T(-INFINITY)) {
    ms.s += Math<T>::exp(v - ms.m);
  }
}

// Adds N values at once: their max first, then one rescale and N exps.
template <typename T, int N>
__device__ __forceinline__ void online_add(MaxSum<T>& ms, const T (&v)[N]) {
  if (is_nan(ms.m) || ms.m == T(INFINITY)) return;
  T m = ms.m;
  bool special = false;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    special |= is_nan(v[k]) || v[k] == T(INFINITY);
    m = v[k] > m ? v[k] : m;
  }
  if (special) {
#pragma unroll
    for (int k = 0; k < N; ++k) online_add(ms, v[k]);
    return;
  }
  if (m == T(-INFINITY)) return;  // everything so far is -inf: the sum stays 0
  T s = ms.s * Math<T>::exp(ms.m - m);
#pragma unroll
  for (int k = 0; k < N; ++k) s += Math<T>::exp(v[k] - m);
  ms = {m, s};
}

template <typename T>
__device__ __forceinline__ T shfl_down(T v, int o) {
  return __shfl_down_sync(0xffffffff, v, o);
}
template <typename T>
__device__ __forceinline__ MaxSum<T> shfl_down(MaxSum<T> v, int o) {
  return {__shfl_down_sync(0xffffffff, v.m, o), __shfl_down_sync(0xffffffff, v.s, o)};
}

// Reduction over the block (a multiple of 32 threads); `identity` fills the
// lanes of missing warps. Every thread gets the result.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity, T* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o /= 2) v = op(v, shfl_down(v, o));
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int((blockDim.x + 31) / 32) ? shared[lane] : identity;
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

// A row of C elements split into a head before its first 16-byte boundary,
// whole 16-byte vectors from there, and a tail: [0, head), vectors
// [head, tail), [tail, C). `other`, if given, must share the split (the
// backward reads logits and writes gradients with the same vectors);
// otherwise the whole row is head.
struct RowSplit {
  int64_t head, nvec, tail;
};
template <typename scalar_t>
__device__ __forceinline__ RowSplit split_row(const void* p, int64_t C,
                                              const void* other = nullptr) {
  constexpr int V = Vec16<scalar_t>::kSize;
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  if (a % sizeof(scalar_t) != 0 ||
      (other != nullptr && (reinterpret_cast<std::uintptr_t>(other) - a) % 16 != 0))
    return {C, 0, C};
  const int64_t to_boundary = int64_t((16 - a % 16) % 16 / sizeof(scalar_t));
  const int64_t head = to_boundary < C ? to_boundary : C;
  const int64_t nvec = (C - head) / V;
  return {head, nvec, head + nvec * V};
}

// The rows' loss and lse; which rows count from `rows` (loss_math.h), also
// written to counted (where not null); with `partial` (3 values a block), the
// block's sums over its counted rows, in row order: of the loss, of the
// weights of their targets (1 each without weights), and their count.
template <typename scalar_t, typename acc_t, bool kWeighted>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ logits,
                                  const int64_t* __restrict__ target, CeRows rows,
                                  const acc_t* __restrict__ weight,
                                  const acc_t* __restrict__ weight_sum, acc_t* loss,
                                  acc_t* lse_out, bool* counted, acc_t* partial, int64_t R,
                                  int64_t C, acc_t eps) {
  VK_SHARED(MaxSum<acc_t>, shared_ms, kThreads / 32);
  VK_SHARED(acc_t, shared_sum, kThreads / 32);
  constexpr int V = Vec16<scalar_t>::kSize;
  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // (thread 0's: partial)
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    int64_t len = 0;
    if (rows.mask == nullptr && rows.lengths != nullptr) {
      len = rows.lengths[rows.seq(r)];
      CUDA_KERNEL_ASSERT(len >= 0 && len <= rows.T && "lengths must be in [0, T]");
    }
    const bool on = rows.counts(r, len, rows.has_ignore ? target[r] : 0);  // uniform across the block
    if (counted != nullptr && threadIdx.x == 0) counted[r] = on;
    if (!on) {
      if (threadIdx.x == 0) loss[r] = lse_out[r] = acc_t(0);
      continue;
    }
    const int64_t t = target[r];
    CUDA_KERNEL_ASSERT(t >= 0 && t < C && "target out of class range at a valid position");
    const scalar_t* x = logits + r * C;
    const RowSplit part = split_row<scalar_t>(x, C);
    const MaxSum<acc_t> none{-INFINITY, acc_t(0)};
    MaxSum<acc_t> ms = none;
    acc_t sum = acc_t(0);
    // sum: of the logits, or of weight * logits with class weights (needed
    // only with label smoothing).
    auto scalar = [&](int64_t c) {
      const acc_t v = acc_t(x[c]);
      online_add(ms, v);
      if constexpr (kWeighted) sum += weight[c] * v;
      else sum += v;
    };
    for (int64_t c = threadIdx.x; c < part.head; c += blockDim.x) scalar(c);
    const Vec16<scalar_t>* xv = reinterpret_cast<const Vec16<scalar_t>*>(x + part.head);
    for (int64_t i = threadIdx.x; i < part.nvec; i += blockDim.x) {
      const Vec16<scalar_t> in = xv[i];
      acc_t v[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        v[k] = acc_t(in.v[k]);
        if constexpr (kWeighted) sum += weight[part.head + i * V + k] * v[k];
        else sum += v[k];
      }
      online_add(ms, v);
    }
    for (int64_t c = part.tail + threadIdx.x; c < C; c += blockDim.x) scalar(c);
    ms = block_reduce(ms, [](MaxSum<acc_t> a, MaxSum<acc_t> b) { return merge(a, b); }, none,
                      shared_ms);
    if (eps != acc_t(0))
      sum = block_reduce(sum, [](acc_t a, acc_t b) { return a + b; }, acc_t(0), shared_sum);
    if (threadIdx.x == 0) {
      const acc_t lse = ms.m + Math<acc_t>::log(ms.s);
      acc_t l;
      if constexpr (kWeighted) {
        l = (acc_t(1) - eps) * weight[t] * (lse - acc_t(x[t]));
        if (eps != acc_t(0)) l += eps / acc_t(C) * (*weight_sum * lse - sum);
      } else {
        l = (acc_t(1) - eps) * (lse - acc_t(x[t]));
        if (eps != acc_t(0)) l += eps * (lse - sum / acc_t(C));
      }
      loss[r] = l;
      lse_out[r] = lse;
      sums[0] += l;
      sums[1] += kWeighted ? weight[t] : acc_t(1);
      sums[2] += acc_t(1);
    }
  }
  if (partial != nullptr && threadIdx.x == 0)
    for (int i = 0; i < 3; ++i) partial[3 * blockIdx.x + i] = sums[i];
}

// One block: the blocks' sums (ce_forward_kernel's partial) added in a fixed
// order, then total = the loss's sum, or with `mean` its sum over the
// weights' (0 where no row counts), and scale = d total / d loss[r].
template <typename acc_t>
__global__ void ce_total_kernel(const acc_t* __restrict__ partial, int64_t blocks, bool mean,
                                acc_t* total, acc_t* scale) {
  VK_SHARED(acc_t, shared, kThreads / 32);
  acc_t s[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x)
    for (int i = 0; i < 3; ++i) s[i] += partial[3 * b + i];
  for (int i = 0; i < 3; ++i)
    s[i] = block_reduce(s[i], [](acc_t a, acc_t b) { return a + b; }, acc_t(0), shared);
  if (threadIdx.x == 0) {
    const bool divide = mean && s[2] > acc_t(0);
    *total = divide ? s[0] / s[1] : s[0];
    *scale = divide ? acc_t(1) / s[1] : acc_t(1);
  }
}

template <typename scalar_t, typename acc_t, bool kWeighted>
__global__ void ce_backward_kernel(const acc_t* __restrict__ grad_loss,
                                   const scalar_t* __restrict__ logits,
                                   const int64_t* __restrict__ target,
                                   const bool* __restrict__ mask, const acc_t* __restrict__ lse,
                                   const acc_t* __restrict__ weight,
                                   const acc_t* __restrict__ weight_sum,
                                   scalar_t* __restrict__ grad, int64_t R, int64_t C,
                                   int64_t grad_stride, acc_t eps) {
  constexpr int V = Vec16<scalar_t>::kSize;
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    scalar_t* g = grad + r * C;
    Vec16<scalar_t>* gv;
    if (!mask[r]) {
      const RowSplit part = split_row<scalar_t>(g, C);
      gv = reinterpret_cast<Vec16<scalar_t>*>(g + part.head);
      Vec16<scalar_t> zero;
#pragma unroll
      for (int k = 0; k < V; ++k) zero.v[k] = scalar_t(0);
      for (int64_t c = threadIdx.x; c < part.head; c += blockDim.x) g[c] = scalar_t(0);
      for (int64_t i = threadIdx.x; i < part.nvec; i += blockDim.x) gv[i] = zero;
      for (int64_t c = part.tail + threadIdx.x; c < C; c += blockDim.x) g[c] = scalar_t(0);
      continue;
    }
    const scalar_t* x = logits + r * C;
    const RowSplit part = split_row<scalar_t>(x, C, g);
    const int64_t t = target[r];
    CUDA_KERNEL_ASSERT(t >= 0 && t < C && "target out of class range at a valid position");
    // go * (softmax * scale - (1 - eps) w[t] onehot - eps w / C), w = 1 without weights.
    const acc_t go = grad_loss[r * grad_stride], l = lse[r], uniform = go * eps / acc_t(C);
    acc_t hit = go * (acc_t(1) - eps), scale = go;
    if constexpr (kWeighted) {
      hit *= weight[t];
      scale = go * ((acc_t(1) - eps) * weight[t] + eps * *weight_sum / acc_t(C));
    }
    auto grad_of = [&](acc_t v, int64_t c) {
      acc_t d;
      if constexpr (kWeighted) d = Math<acc_t>::exp(v - l) * scale - weight[c] * uniform;
      else d = Math<acc_t>::exp(v - l) * go - uniform;
      return c == t ? d - hit : d;
    };
    for (int64_t c = threadIdx.x; c < part.head; c += blockDim.x)
      g[c] = scalar_t(grad_of(acc_t(x[c]), c));
    const Vec16<scalar_t>* xv = reinterpret_cast<const Vec16<scalar_t>*>(x + part.head);
    gv = reinterpret_cast<Vec16<scalar_t>*>(g + part.head);
    for (int64_t i = threadIdx.x; i < part.nvec; i += blockDim.x) {
      const Vec16<scalar_t> in = xv[i];
      Vec16<scalar_t> out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = scalar_t(grad_of(acc_t(in.v[k]), part.head + i * V + k));
      gv[i] = out;
    }
    for (int64_t c = part.tail + threadIdx.x; c < C; c += blockDim.x)
      g[c] = scalar_t(grad_of(acc_t(x[c]), c));
  }
}

// Device pointer of an optional operand (null when undefined).
template <typename acc_t>
const acc_t* weight_ptr(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

// ce_forward_kernel over x's rows (contiguous operands), one block a row (or
// with `partial`, its blocks: partial->numel() / 3).
void launch_ce_forward(const Tensor& x, const Tensor& t, const CeRows& rows,
                       const c10::optional<Tensor>& weight, Tensor& loss, Tensor& lse,
                       Tensor* counted, Tensor* partial, double label_smoothing) {
  const int64_t R = x.size(0), C = x.size(1);
  const CeWeight w = cross_entropy_weight(weight, loss.scalar_type());
  const unsigned blocks =
      partial != nullptr ? unsigned(partial->numel() / 3) : cuda::grid_for(R, 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(w.w.defined() ? ce_forward_kernel<scalar_t, acc_t, true>
                               : ce_forward_kernel<scalar_t, acc_t, false>,
                 blocks, kThreads, 0, cuda::current_stream(), x.const_data_ptr<scalar_t>(),
                 t.const_data_ptr<int64_t>(), rows, weight_ptr<acc_t>(w.w),
                 weight_ptr<acc_t>(w.sum), loss.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
                 counted != nullptr ? counted->data_ptr<bool>() : nullptr,
                 partial != nullptr ? partial->data_ptr<acc_t>() : nullptr, R, C,
                 acc_t(label_smoothing));
  });
}

std::tuple<Tensor, Tensor> cross_entropy_forward_cuda(const Tensor& logits, const Tensor& target,
                                                      const Tensor& mask, double label_smoothing,
                                                      const c10::optional<Tensor>& weight) {
  check_cross_entropy_args(logits, target, mask, label_smoothing, weight);
  const cuda::DeviceGuard guard(logits.device());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const int64_t R = x.size(0);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor loss = at::empty({R}, x.options().dtype(acc));
  Tensor lse = at::empty({R}, x.options().dtype(acc));
  if (R == 0) return {loss, lse};
  CeRows rows;
  rows.mask = m.const_data_ptr<bool>();
  launch_ce_forward(x, t, rows, weight, loss, lse, nullptr, nullptr, label_smoothing);
  return {loss, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> masked_cross_entropy_forward_cuda(
    const Tensor& logits, const Tensor& target, const c10::optional<Tensor>& mask,
    const c10::optional<Tensor>& lengths, bool batch_first, c10::optional<int64_t> ignore_index,
    double label_smoothing, const c10::optional<Tensor>& weight, c10::string_view reduction) {
  const MaskedCeOperands o = masked_cross_entropy_operands(
      logits, target, mask, lengths, batch_first, ignore_index, label_smoothing, weight, reduction);
  const cuda::DeviceGuard guard(logits.device());
  const Tensor x = logits.contiguous();
  const Tensor &t = o.target, &len = o.lengths;
  const CeRows& rows = o.rows;
  const CeReduction red = o.reduction;
  const int64_t R = x.size(0);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor loss = at::empty({R}, x.options().dtype(acc));
  Tensor lse = at::empty({R}, x.options().dtype(acc));
  Tensor counted = at::empty({R}, x.options().dtype(at::kBool));
  if (R == 0) {
    // No row: nothing to read but the lengths, which must all be 0 (T = 0).
    if (len.defined() && len.numel() > 0)
      at::_assert_async(len.eq(0).all(), "lengths must be in [0, T] with T=0 (no step)");
    return {loss, lse, counted, at::zeros({}, loss.options()), at::ones({}, loss.options())};
  }
  // Blocks: one a row up to kTotalBlocks (a wave of 8 blocks an SM on 128
  // SMs), each then taking several; their sums are what ce_total_kernel adds.
  constexpr int64_t kTotalBlocks = 1024;
  const unsigned blocks = cuda::grid_for(R, 1, kTotalBlocks);
  Tensor partial = at::empty({3 * int64_t(blocks)}, loss.options());
  Tensor total = at::empty({}, loss.options()), scale = at::empty({}, loss.options());
  launch_ce_forward(x, t, rows, weight, loss, lse, &counted, &partial, label_smoothing);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_total_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(ce_total_kernel<acc_t>, 1, kThreads, 0, cuda::current_stream(),
                 partial.const_data_ptr<acc_t>(), int64_t(blocks), red == CeReduction::Mean,
                 total.data_ptr<acc_t>(), scale.data_ptr<acc_t>());
  });
  return {loss, lse, counted, total, scale};
}

Tensor cross_entropy_backward_cuda(const Tensor& grad_loss, const Tensor& logits,
                                   const Tensor& target, const Tensor& mask, const Tensor& lse,
                                   double label_smoothing, const c10::optional<Tensor>& weight) {
  check_cross_entropy_backward_args(grad_loss, logits, target, mask, lse, label_smoothing, weight);
  const cuda::DeviceGuard guard(logits.device());
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const RowGrad rg = row_grad(grad_loss, acc);
  const Tensor& g = rg.g;
  const Tensor l = lse.contiguous();
  Tensor grad = at::empty({R, C}, x.options());
  if (R == 0) return grad;
  const CeWeight w = cross_entropy_weight(weight, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(w.w.defined() ? ce_backward_kernel<scalar_t, acc_t, true>
                               : ce_backward_kernel<scalar_t, acc_t, false>,
                 cuda::grid_for(R, 1), kThreads, 0,
                 cuda::current_stream(), g.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(),
                 t.const_data_ptr<int64_t>(), m.const_data_ptr<bool>(), l.const_data_ptr<acc_t>(),
                 weight_ptr<acc_t>(w.w), weight_ptr<acc_t>(w.sum), grad.data_ptr<scalar_t>(), R,
                 C, rg.stride, acc_t(label_smoothing));
  });
  return grad;
}

// ------------------------------------------------------ elementwise losses
// One block per row, a block reduction over F: the rows' sums, or with
// per_element each element's loss (out (R, F)); which rows count from `rows`
// (loss_math.h; target-free), also written to counted (where not null); with
// `partial` (3 values a block), the block's sums over its counted rows in row
// order: of the loss, and twice of their elements (F each; so that with F = 0
// nothing counts and a mean is 0, never 0 / 0). The elements are counted in
// the math type: exact up to 2^24 in float, a relative 6e-8 past that.
template <typename scalar_t, typename acc_t>
__global__ void elem_loss_rows_kernel(const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ y, CeRows rows,
                                      const scalar_t* __restrict__ pos_weight, acc_t* out,
                                      bool per_element, bool* counted, acc_t* partial, int64_t R,
                                      int64_t F, ElemLoss kind) {
  VK_SHARED(acc_t, shared, kThreads / 32);
  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // (thread 0's: partial)
  for (int64_t r = blockIdx.x; r < R; r += gridDim.x) {
    int64_t len = 0;
    if (rows.mask == nullptr && rows.lengths != nullptr) {
      len = rows.lengths[rows.seq(r)];
      CUDA_KERNEL_ASSERT(len >= 0 && len <= rows.T && "lengths must be in [0, T]");
    }
    const bool on = rows.counts(r, len, 0);  // uniform across the block
    if (counted != nullptr && threadIdx.x == 0) counted[r] = on;
    if (!on) {
      if (per_element) {
        for (int64_t f = threadIdx.x; f < F; f += blockDim.x) out[r * F + f] = acc_t(0);
      } else if (threadIdx.x == 0) {
        out[r] = acc_t(0);
      }
      continue;
    }
    acc_t sum = acc_t(0);
    for (int64_t f = threadIdx.x; f < F; f += blockDim.x) {
      const int64_t i = r * F + f;
      const acc_t l = elem_loss<acc_t>(kind, acc_t(x[i]), acc_t(y[i]),
                                       pos_weight ? acc_t(pos_weight[f]) : acc_t(1)).loss;
      if (per_element) out[i] = l;
      sum += l;
    }
    sum = block_reduce(sum, [](acc_t a, acc_t b) { return a + b; }, acc_t(0), shared);
    if (threadIdx.x == 0) {
      if (!per_element) out[r] = sum;
      sums[0] += sum;
      sums[1] += acc_t(F);
      sums[2] += acc_t(F);
    }
  }
  if (partial != nullptr && threadIdx.x == 0)
    for (int i = 0; i < 3; ++i) partial[3 * blockIdx.x + i] = sums[i];
}

// Per-element losses (forward, reduce_rows = false) or gradients (backward),
// over the R x F elements; which rows count from `rows` (loss_math.h;
// target-free), also written to counted by each row's first element (where
// not null). grad: per row (stride grad_stride: 0 where it is one value) or
// per element.
template <typename scalar_t, typename acc_t, bool kBackward>
__global__ void elem_loss_elements_kernel(const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ y, CeRows rows,
                                          const scalar_t* __restrict__ pos_weight,
                                          const acc_t* __restrict__ grad, bool grad_per_row,
                                          int64_t grad_stride, acc_t* out, bool* counted,
                                          scalar_t* gx, scalar_t* gy, int64_t R, int64_t F,
                                          ElemLoss kind) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < R * F;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / F, f = i % F;
    int64_t len = 0;
    if (rows.mask == nullptr && rows.lengths != nullptr) {
      len = rows.lengths[rows.seq(r)];
      CUDA_KERNEL_ASSERT(len >= 0 && len <= rows.T && "lengths must be in [0, T]");
    }
    const bool on = rows.counts(r, len, 0);
    if (counted != nullptr && f == 0) counted[r] = on;
    if (!on) {
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
      const acc_t g = grad_per_row ? grad[r * grad_stride] : grad[i];
      gx[i] = scalar_t(g * o.dx);
      gy[i] = scalar_t(g * o.dy);
    } else {
      out[i] = o.loss;
    }
  }
}

// elem_loss_elements_kernel's forward over x's R x F elements (contiguous
// operands) into out (R, F), counted (where not null) the rows that count.
void launch_elem_loss_elements(const Tensor& x, const Tensor& y, const CeRows& rows,
                               const Tensor& pw, Tensor& out, Tensor* counted, ElemLoss kind) {
  const int64_t R = x.size(0), F = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_elements_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(elem_loss_elements_kernel<scalar_t, acc_t, false>,
                 cuda::grid_for(R * F, kThreads, 65535), kThreads, 0, cuda::current_stream(),
                 x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), rows,
                 pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr,
                 static_cast<const acc_t*>(nullptr), false, int64_t(0), out.data_ptr<acc_t>(),
                 counted != nullptr ? counted->data_ptr<bool>() : nullptr,
                 static_cast<scalar_t*>(nullptr), static_cast<scalar_t*>(nullptr), R, F, kind);
  });
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
  CeRows rows;
  rows.mask = m.const_data_ptr<bool>();
  if (!reduce_rows) {
    if (F > 0) launch_elem_loss_elements(x, y, rows, pw, out, nullptr, kind);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(elem_loss_rows_kernel<scalar_t, acc_t>, cuda::grid_for(R, 1), kThreads, 0,
                 cuda::current_stream(), x.const_data_ptr<scalar_t>(),
                 y.const_data_ptr<scalar_t>(), rows,
                 pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<acc_t>(),
                 false, static_cast<bool*>(nullptr), static_cast<acc_t*>(nullptr), R, F, kind);
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
  const RowGrad rg = elementwise_loss_grad(grad, o, reduce_rows);
  Tensor gx = at::empty({R, F}, x.options()), gy = at::empty({R, F}, x.options());
  if (R * F == 0) return {gx, gy};
  CeRows rows;
  rows.mask = m.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(elem_loss_elements_kernel<scalar_t, acc_t, true>,
                 cuda::grid_for(R * F, kThreads, 65535), kThreads, 0, cuda::current_stream(),
                 x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), rows,
                 pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr,
                 rg.g.const_data_ptr<acc_t>(), reduce_rows, rg.stride,
                 static_cast<acc_t*>(nullptr), static_cast<bool*>(nullptr),
                 gx.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), R, F, kind);
  });
  return {gx, gy};
}

// "sum", "mean": the rows' rule, losses and partial sums in one kernel
// (elem_loss_rows_kernel), their total in another (ce_total_kernel). "none":
// the rule and the losses element by element (elem_loss_elements_kernel; the
// row kernel where F = 0, for the rule alone), no total.
std::tuple<Tensor, Tensor, Tensor, Tensor> masked_elementwise_loss_forward_cuda(
    const Tensor& input, const Tensor& target, const c10::optional<Tensor>& mask,
    const c10::optional<Tensor>& lengths, bool batch_first,
    const c10::optional<Tensor>& pos_weight, c10::string_view kind_name,
    c10::string_view reduction) {
  const MaskedElemOperands o = masked_elementwise_loss_operands(
      input, target, mask, lengths, batch_first, pos_weight, std::string(kind_name), reduction);
  const cuda::DeviceGuard guard(input.device());
  const Tensor &x = o.elem.x, &y = o.elem.y, &pw = o.elem.pos_weight, &len = o.rule.lengths;
  const int64_t R = o.elem.R, F = o.elem.F;
  const bool per_element = o.reduction == CeReduction::None;
  const auto acc = o.elem.acc;
  Tensor loss = per_element ? at::empty({R, F}, x.options().dtype(acc))
                            : at::empty({R}, x.options().dtype(acc));
  Tensor counted = at::empty({R}, x.options().dtype(at::kBool));
  // The result without a total (per-element losses, or no row): total 0, scale 1.
  auto no_total = [&]() -> std::tuple<Tensor, Tensor, Tensor, Tensor> {
    return {loss, counted, at::zeros({}, loss.options()), at::ones({}, loss.options())};
  };
  if (R == 0) {
    // No row: nothing to read but the lengths, which must all be 0 (T = 0).
    if (len.defined() && len.numel() > 0)
      at::_assert_async(len.eq(0).all(), "lengths must be in [0, T] with T=0 (no step)");
    return no_total();
  }
  if (per_element && F > 0) {
    launch_elem_loss_elements(x, y, o.rule.rows, pw, loss, &counted, o.elem.kind);
    return no_total();
  }
  constexpr int64_t kTotalBlocks = 1024;  // as for masked_cross_entropy_forward
  const unsigned blocks = cuda::grid_for(R, 1, kTotalBlocks);
  Tensor partial = at::empty({3 * int64_t(blocks)}, loss.options());
  Tensor total = at::empty({}, loss.options()), scale = at::empty({}, loss.options());
  const auto stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_elem_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(elem_loss_rows_kernel<scalar_t, acc_t>, blocks, kThreads, 0, stream,
                 x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), o.rule.rows,
                 pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr, loss.data_ptr<acc_t>(),
                 per_element, counted.data_ptr<bool>(), partial.data_ptr<acc_t>(), R, F,
                 o.elem.kind);
    if (!per_element)
      cuda::launch(ce_total_kernel<acc_t>, 1, kThreads, 0, stream,
                   partial.const_data_ptr<acc_t>(), int64_t(blocks),
                   o.reduction == CeReduction::Mean, total.data_ptr<acc_t>(),
                   scale.data_ptr<acc_t>());
  });
  if (per_element) return no_total();
  return {loss, counted, total, scale};
}

}  // namespace
}  // namespace varlen

VK_CUDA_LIBRARY_IMPL(m) {
  m.impl("cross_entropy_forward", &varlen::cross_entropy_forward_cuda);
  m.impl("cross_entropy_backward", &varlen::cross_entropy_backward_cuda);
  m.impl("masked_cross_entropy_forward", &varlen::masked_cross_entropy_forward_cuda);
  m.impl("elementwise_loss_forward", &varlen::elementwise_loss_forward_cuda);
  m.impl("elementwise_loss_backward", &varlen::elementwise_loss_backward_cuda);
  m.impl("masked_elementwise_loss_forward", &varlen::masked_elementwise_loss_forward_cuda);
}
