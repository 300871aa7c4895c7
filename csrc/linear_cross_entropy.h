// Fused linear + masked cross entropy, shared by the CPU and CUDA backends:
// the logits hidden @ weight^T + bias are never held for all tokens, only for
// a chunk of tokens at a time (extra memory O(chunk * V + V * H)).
//
// Per chunk: one GEMM for the logits, the backend's cross-entropy kernel for
// the per-token loss and logsumexp, and, where gradients are wanted, the
// backend's cross-entropy backward kernel for d loss / d logits followed by
// the two GEMMs of the gradients w.r.t. hidden (rows of the chunk) and weight
// (accumulated over chunks, in the math type). With `compute_grad` the forward
// does this right away for the reduced loss (sum or mean), so the backward
// only scales (as in Liger-Kernel's fused linear cross entropy: logits are
// computed once); for reduction "none" the backward recomputes each chunk's
// logits (as in Cut Cross-Entropy).
//
// Rows (RowMode):
//  - Valid (CPU): the valid tokens are gathered first, so work is done for
//    them alone (finding them is a host sync, free on the CPU);
//  - Ordered (GPU, where the backend's GEMMs can take a device-side row count:
//    bfloat16 on sm_90 / sm_100, csrc/cuda/token_plan.h): the rows in an order
//    with the valid ones first (a stable sort of the mask on the device), and
//    each chunk's GEMMs cover its rows before the valid count only;
//  - All (the GPU otherwise): every row goes through the GEMMs.
// On the GPU the hidden rows of invalid tokens are replaced by zeros, so that
// NaN there cannot reach the weight gradient (0 * NaN is NaN).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <initializer_list>
#include <string>
#include <tuple>

#include "loss_args.h"

namespace varlen {

using LinearCeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LinearCeGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// hidden (N, H); weight (V, H); bias (V,) or None; target (N,) int64; mask (N,) bool.
inline void check_linear_ce_args(const at::Tensor& hidden, const at::Tensor& weight,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                 const at::Tensor& mask, double label_smoothing, int64_t chunk) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be 2-D (N, H), got shape ", hidden.sizes());
  TORCH_CHECK(hidden.is_floating_point(), "hidden must be floating point, got ",
              hidden.scalar_type());
  const int64_t N = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H && weight.size(0) > 0,
              "weight must be (V, H) with H = ", H, " (hidden's last dim) and V >= 1, got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight must have hidden's dtype ",
              hidden.scalar_type(), ", got ", weight.scalar_type());
  check_same_device(hidden, weight, "weight");
  if (bias.has_value()) {
    VK_CHECK_SHAPE(*bias, weight.size(0));
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "bias must have hidden's dtype ",
                hidden.scalar_type(), ", got ", bias->scalar_type());
    check_same_device(hidden, *bias, "bias");
  }
  VK_CHECK_SHAPE(target, N);
  VK_CHECK_SHAPE(mask, N);
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  check_same_device(hidden, target, "target");
  check_same_device(hidden, mask, "mask");
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(chunk >= 0, "chunk must be >= 0 (0: automatic), got ", chunk);
}

// The backend's cross-entropy ops, by library ("varlen_kernels", or
// "varlen_kernels_emu" for the CUDA code executed on the CPU), called without
// class weights.
struct CeOps {
  using Forward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, double,
                                                     const c10::optional<at::Tensor>&);
  using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, double,
                              const c10::optional<at::Tensor>&);
  c10::TypedOperatorHandle<Forward> forward_op;
  c10::TypedOperatorHandle<Backward> backward_op;
  explicit CeOps(const std::string& ns)
      : forward_op(c10::Dispatcher::singleton()
                       .findSchemaOrThrow((ns + "::cross_entropy_forward").c_str(), "")
                       .typed<Forward>()),
        backward_op(c10::Dispatcher::singleton()
                        .findSchemaOrThrow((ns + "::cross_entropy_backward").c_str(), "")
                        .typed<Backward>()) {}
  std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor& target,
                                             const at::Tensor& mask, double eps) const {
    return forward_op.call(logits, target, mask, eps, c10::nullopt);
  }
  at::Tensor backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                      const at::Tensor& mask, const at::Tensor& lse, double eps) const {
    return backward_op.call(grad, logits, target, mask, lse, eps, c10::nullopt);
  }
};

// A backend's GEMMs that take a device-side row count: count (1,) int32, rows
// past it unspecified in `times`' result and zero in `outer`'s operands (see
// csrc/cuda/token_plan.h).
struct RowCountGemms {
  bool (*usable)(std::initializer_list<const at::Tensor*> operands);
  at::Tensor (*times)(const at::Tensor& a, const at::Tensor& w, const at::Tensor& count);
  at::Tensor (*outer)(const at::Tensor& d, const at::Tensor& x, const at::Tensor& count);
};

enum class RowMode { Valid, Ordered, All };

// The rows of a call (checked arguments): Valid where the backend gathers the
// valid tokens (compact), Ordered where its row-count GEMMs take the weight
// and the GEMMs' leading dimensions (H, and V for the logits and their
// gradient) are multiples of 8 elements, else All.
inline RowMode row_mode(bool compact, const RowCountGemms* gemms, const at::Tensor& weight) {
  if (compact) return RowMode::Valid;
  if (gemms != nullptr && weight.size(0) % 8 == 0 && weight.size(1) % 8 == 0 &&
      gemms->usable({&weight}))
    return RowMode::Ordered;
  return RowMode::All;
}

// Tokens per chunk: about 64 MiB of logits, or H (hidden features) where that
// is more. Every chunk reads and writes the weight gradient's accumulator
// (V x H, in the math type) once and, in half and bfloat16, writes and reads
// a V x H product beside it: about 12 * V * H bytes whatever its rows, against
// 6 * rows * V * H flops of its three GEMMs, so at least H rows make that
// H / 2 flops a byte. (On an H200, 16k tokens, H = 1024, V = 128k in
// bfloat16, 64 MiB was 256 rows a chunk, 64 passes over the accumulator, and
// the op took 3.6x the time of the unfused idiom; H rows there are 256 MiB of
// logits.) At least 1.
inline int64_t linear_ce_chunk(int64_t chunk, int64_t V, const at::Tensor& hidden) {
  if (chunk > 0) return chunk;
  const int64_t elem = hidden.element_size();
  return std::max<int64_t>({1, (int64_t(64) << 20) / (V * elem), hidden.size(1)});
}

struct LinearCeRows {
  RowMode mode;
  at::Tensor index;                  // (M,) rows of the full batch, or undefined: all rows
  at::Tensor hidden, target, mask;   // (M, H), (M,), (M,)
  at::Tensor count;                  // Ordered: (1,) int64, the valid rows (the first ones)
};

inline LinearCeRows linear_ce_rows(const at::Tensor& hidden, const at::Tensor& target,
                                   const at::Tensor& mask, RowMode mode) {
  LinearCeRows r;
  r.mode = mode;
  if (mode == RowMode::Ordered) {
    // Valid rows first, each group in its order: a permutation of all N rows.
    r.index = std::get<1>(
        at::sort(mask.logical_not().to(at::kByte), /*stable=*/true, 0, /*descending=*/false));
    r.mask = mask.index_select(0, r.index);
    r.hidden = at::where(r.mask.unsqueeze(1), hidden.index_select(0, r.index),
                         at::zeros({}, hidden.options()));
    r.target = target.index_select(0, r.index);
    r.count = mask.sum().reshape({1});
  } else if (mode == RowMode::Valid) {
    r.index = mask.nonzero().squeeze(1);
    r.hidden = hidden.index_select(0, r.index);
    r.target = target.index_select(0, r.index);
    r.mask = at::ones({r.index.numel()}, mask.options());
  } else {
    r.hidden = at::where(mask.unsqueeze(1), hidden, at::zeros({}, hidden.options()));
    r.target = target.contiguous();
    r.mask = mask.contiguous();
  }
  return r;
}

inline at::Tensor scatter_rows(const LinearCeRows& rows, const at::Tensor& values, int64_t N) {
  if (!rows.index.defined()) return values;
  if (rows.mode == RowMode::Ordered) {  // a permutation; rows of invalid tokens zero
    const at::Tensor m = values.dim() == 2 ? rows.mask.unsqueeze(1) : rows.mask;
    const at::Tensor v = at::where(m, values, at::zeros({}, values.options()));
    return at::empty_like(v).index_copy_(0, rows.index, v);
  }
  std::vector<int64_t> shape = values.sizes().vec();
  shape[0] = N;
  return at::zeros(shape, values.options()).index_copy_(0, rows.index, values);
}

// Runs the chunks. grad_rows: (M,) d loss / d per-token loss, or undefined for
// no gradients. Fills loss/lse (M,) if defined, and the gradients. gemms: the
// backend's row-count GEMMs (Ordered rows only).
inline void linear_ce_chunks(const CeOps& ops, const LinearCeRows& rows,
                             const RowCountGemms* gemms, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, double eps, int64_t chunk,
                             at::Tensor loss, at::Tensor lse, const at::Tensor& lse_in,
                             const at::Tensor& grad_rows, at::Tensor& grad_hidden,
                             at::Tensor& grad_weight, at::Tensor& grad_bias) {
  const int64_t M = rows.hidden.size(0);
  const at::Tensor wt = weight.t();
  const bool grads = grad_rows.defined();
  const auto acc = at::toOpMathType(weight.scalar_type());
  if (grads) {
    grad_hidden = at::empty({M, weight.size(1)}, rows.hidden.options());
    grad_weight = at::zeros(weight.sizes(), weight.options().dtype(acc));
    grad_bias = at::zeros({weight.size(0)}, weight.options().dtype(acc));
  }
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t n = std::min(chunk, M - c0);
    const at::Tensor h = rows.hidden.narrow(0, c0, n);
    const at::Tensor t = rows.target.narrow(0, c0, n), m = rows.mask.narrow(0, c0, n);
    // Ordered rows: the chunk's valid ones are its first `end` (on the device).
    // With a bias the logits stay one addmm over the chunk: the grouped GEMM
    // takes no bias, and adding it would be a separate pass over the logits.
    const at::Tensor end = rows.mode == RowMode::Ordered
                               ? (rows.count - c0).clamp(0, n).to(at::kInt)
                               : at::Tensor();
    const at::Tensor logits = bias.has_value() ? at::addmm(*bias, h, wt)
                              : end.defined()  ? gemms->times(h, wt, end)
                                               : at::mm(h, wt);
    at::Tensor chunk_lse;
    if (loss.defined()) {
      auto [l, s] = ops.forward(logits, t, m, eps);
      loss.narrow(0, c0, n).copy_(l);
      lse.narrow(0, c0, n).copy_(s);
      chunk_lse = s;
    } else {
      chunk_lse = lse_in.narrow(0, c0, n);
    }
    if (!grads) continue;
    const at::Tensor g = ops.backward(grad_rows.narrow(0, c0, n), logits, t, m, chunk_lse, eps);
    at::Tensor gh = grad_hidden.narrow(0, c0, n);
    if (end.defined()) {  // g is zero at the rows of invalid tokens, as h is
      gh.copy_(gemms->times(g, weight, end));
      grad_weight.add_(gemms->outer(g, h, end));  // bfloat16 GEMM, float accumulator
    } else {
      at::mm_out(gh, g, weight);
      if (grad_weight.scalar_type() == g.scalar_type()) grad_weight.addmm_(g.t(), h);
      else grad_weight.add_(at::mm(g.t(), h));  // half/bfloat16 GEMM, float accumulator
    }
    grad_bias.add_(g.sum(at::IntArrayRef{0}, /*keepdim=*/false, acc));
  }
}

// linear_cross_entropy_forward: see csrc/op_schemas.h.
inline LinearCeResult linear_ce_forward(const std::string& ns, bool compact,
                                        const RowCountGemms* gemms,
                                        const at::Tensor& hidden, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& target, const at::Tensor& mask,
                                        double label_smoothing, const std::string& reduction,
                                        bool compute_grad, int64_t chunk) {
  check_linear_ce_args(hidden, weight, bias, target, mask, label_smoothing, chunk);
  TORCH_CHECK(reduction == "none" || reduction == "sum" || reduction == "mean",
              "reduction must be 'none', 'sum' or 'mean', got '", reduction, "'");
  TORCH_CHECK(!(compute_grad && reduction == "none"),
              "compute_grad needs reduction 'sum' or 'mean' (a scalar loss)");
  const CeOps ops(ns);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto acc = at::toOpMathType(hidden.scalar_type());
  const LinearCeRows rows =
      linear_ce_rows(hidden, target, mask, row_mode(compact, gemms, weight));
  const int64_t M = rows.hidden.size(0);
  at::Tensor loss_rows = at::empty({M}, hidden.options().dtype(acc));
  at::Tensor lse_rows = at::empty({M}, hidden.options().dtype(acc));
  // The mean's divisor, on the device: the number of valid tokens (at least 1).
  const at::Tensor count = mask.sum().clamp_min(1).to(acc);
  at::Tensor grad_rows;
  if (compute_grad) {
    grad_rows = at::ones({M}, hidden.options().dtype(acc));
    if (reduction == "mean") grad_rows = grad_rows / count;
  }
  at::Tensor gh, gw, gb;
  linear_ce_chunks(ops, rows, gemms, weight, bias, label_smoothing, linear_ce_chunk(chunk, V, hidden),
                   loss_rows, lse_rows, at::Tensor(), grad_rows, gh, gw, gb);
  const at::Tensor per_token = scatter_rows(rows, loss_rows, N);
  at::Tensor loss = reduction == "none"  ? per_token
                    : reduction == "sum" ? per_token.sum()
                                         : per_token.sum() / count;
  auto empty = [&] { return at::empty({0}, hidden.options()); };  // distinct outputs, no aliases
  if (!compute_grad) return {loss, scatter_rows(rows, lse_rows, N), empty(), empty(), empty()};
  return {loss, scatter_rows(rows, lse_rows, N), scatter_rows(rows, gh, N),
          gw.to(weight.scalar_type()),
          bias.has_value() ? gb.to(weight.scalar_type()) : empty()};
}

// linear_cross_entropy_backward: see csrc/op_schemas.h.
inline LinearCeGrads linear_ce_backward(const std::string& ns, bool compact,
                                        const RowCountGemms* gemms,
                                        const at::Tensor& grad_loss, const at::Tensor& hidden,
                                        const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& target, const at::Tensor& mask,
                                        const at::Tensor& lse, double label_smoothing,
                                        int64_t chunk) {
  check_linear_ce_args(hidden, weight, bias, target, mask, label_smoothing, chunk);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto acc = at::toOpMathType(hidden.scalar_type());
  VK_CHECK_SHAPE(grad_loss, N);
  VK_CHECK_SHAPE(lse, N);
  check_same_device(hidden, grad_loss, "grad_loss");
  check_same_device(hidden, lse, "lse");
  const CeOps ops(ns);
  const LinearCeRows rows =
      linear_ce_rows(hidden, target, mask, row_mode(compact, gemms, weight));
  auto pick = [&](const at::Tensor& t) {
    const at::Tensor v = t.to(acc);
    return rows.index.defined() ? v.index_select(0, rows.index) : v.contiguous();
  };
  at::Tensor gh, gw, gb;
  linear_ce_chunks(ops, rows, gemms, weight, bias, label_smoothing, linear_ce_chunk(chunk, V, hidden),
                   at::Tensor(), at::Tensor(), pick(lse), pick(grad_loss), gh, gw, gb);
  return {scatter_rows(rows, gh, N), gw.to(weight.scalar_type()),
          bias.has_value() ? gb.to(weight.scalar_type()) : at::empty({0}, hidden.options())};
}

// The ops as registered by a backend: B::kLibrary names the library of its
// cross-entropy ops, B::kCompact whether the valid rows are gathered first,
// B::row_count_gemms() its GEMMs that take a device-side row count (or
// nullptr), B::Guard the device guard.
template <typename B>
LinearCeResult linear_ce_forward_op(const at::Tensor& hidden, const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& target, const at::Tensor& mask,
                                    double label_smoothing, c10::string_view reduction,
                                    bool compute_grad, int64_t chunk) {
  const typename B::Guard guard(hidden.device());
  return linear_ce_forward(B::kLibrary, B::kCompact, B::row_count_gemms(), hidden, weight, bias,
                           target, mask, label_smoothing, std::string(reduction), compute_grad,
                           chunk);
}

template <typename B>
LinearCeGrads linear_ce_backward_op(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                    const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    const at::Tensor& target, const at::Tensor& mask,
                                    const at::Tensor& lse, double label_smoothing,
                                    int64_t chunk) {
  const typename B::Guard guard(hidden.device());
  return linear_ce_backward(B::kLibrary, B::kCompact, B::row_count_gemms(), grad_loss, hidden,
                            weight, bias, target, mask, lse, label_smoothing, chunk);
}

}  // namespace varlen
