// CPU kernels of the masked cross entropy: rows are tokens, parallel over rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "../loss_args.h"
#include "cpu_capability.h"
#include "loss_rows.h"

namespace varlen {
namespace {

using at::Tensor;

template <typename scalar_t, typename acc_t>
void set_weight(CeArgs<scalar_t, acc_t>& a, const CeWeight& w) {
  if (!w.w.defined()) return;
  a.weight = w.w.const_data_ptr<acc_t>();
  a.weight_sum = w.sum.item<acc_t>();  // a CPU tensor: no device sync
}

// The rows' losses and log-sum-exps of arguments already checked: x, t and m
// contiguous.
std::tuple<Tensor, Tensor> ce_rows(const Tensor& x, const Tensor& t, const Tensor& m,
                                   double label_smoothing, const c10::optional<Tensor>& weight) {
  const int64_t R = x.size(0), C = x.size(1);
  const auto acc = at::toOpMathType(x.scalar_type());
  Tensor loss = at::empty({R}, x.options().dtype(acc));
  Tensor lse = at::empty({R}, x.options().dtype(acc));
  const CeWeight w = cross_entropy_weight(weight, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CeArgs<scalar_t, acc_t> a{x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                              m.const_data_ptr<bool>(), loss.data_ptr<acc_t>(),
                              lse.data_ptr<acc_t>(), nullptr, nullptr, C, label_smoothing};
    set_weight(a, w);
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
                       if (use_avx2()) avx2::ce_forward_rows(a, r0, r1);
                       else base::ce_forward_rows(a, r0, r1);
                     });
  });
  return {loss, lse};
}

std::tuple<Tensor, Tensor> cross_entropy_forward_cpu(const Tensor& logits, const Tensor& target,
                                                     const Tensor& mask, double label_smoothing,
                                                     const c10::optional<Tensor>& weight) {
  check_cross_entropy_args(logits, target, mask, label_smoothing, weight);
  return ce_rows(logits.contiguous(), target.contiguous(), mask.contiguous(), label_smoothing,
                 weight);
}

Tensor cross_entropy_backward_cpu(const Tensor& grad_loss, const Tensor& logits,
                                  const Tensor& target, const Tensor& mask, const Tensor& lse,
                                  double label_smoothing, const c10::optional<Tensor>& weight) {
  check_cross_entropy_backward_args(grad_loss, logits, target, mask, lse, label_smoothing, weight);
  const int64_t R = logits.size(0), C = logits.size(1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const Tensor x = logits.contiguous(), t = target.contiguous(), m = mask.contiguous();
  const RowGrad rg = row_grad(grad_loss, acc);
  const Tensor& g = rg.g;
  const Tensor l = lse.contiguous();
  Tensor grad = at::empty({R, C}, x.options());
  const CeWeight w = cross_entropy_weight(weight, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ce_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    CeArgs<scalar_t, acc_t> a{x.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                                    m.const_data_ptr<bool>(), nullptr,
                                    const_cast<acc_t*>(l.const_data_ptr<acc_t>()),
                                    g.const_data_ptr<acc_t>(), grad.data_ptr<scalar_t>(), C,
                                    label_smoothing};
    set_weight(a, w);
    a.grad_stride = rg.stride;
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t r0, int64_t r1) {
                       if (use_avx2()) avx2::ce_backward_rows(a, r0, r1);
                       else base::ce_backward_rows(a, r0, r1);
                     });
  });
  return grad;
}

// Which of R rows count by `rows` (the CUDA kernels' rule, loss_math.h),
// their lengths checked; target: the rows' targets, or null (none ignored).
Tensor counted_rows(const CeRows& rows, int64_t R, const int64_t* target) {
  check_rows_lengths_on_host(rows);
  Tensor counted = at::empty({R}, at::TensorOptions().dtype(at::kBool));
  bool* const on = counted.data_ptr<bool>();
  for (int64_t r = 0; r < R; ++r)  // (mask and lengths are never both given)
    on[r] = rows.counts(r, rows.lengths != nullptr ? rows.lengths[rows.seq(r)] : 0,
                        target != nullptr ? target[r] : 0);
  return counted;
}

// Which rows count (the CUDA kernel's rule, loss_math.h), the rows' losses
// (ce_rows, the arguments checked once), and their reduction by ATen's sums.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> masked_cross_entropy_forward_cpu(
    const Tensor& logits, const Tensor& target, const c10::optional<Tensor>& mask,
    const c10::optional<Tensor>& lengths, bool batch_first, c10::optional<int64_t> ignore_index,
    double label_smoothing, const c10::optional<Tensor>& weight, c10::string_view reduction) {
  const MaskedCeOperands o = masked_cross_entropy_operands(
      logits, target, mask, lengths, batch_first, ignore_index, label_smoothing, weight, reduction);
  const CeRows& rows = o.rows;
  const CeReduction red = o.reduction;
  const Tensor& t = o.target;
  const Tensor counted = counted_rows(rows, logits.size(0), t.const_data_ptr<int64_t>());
  auto [loss, lse] = ce_rows(logits.contiguous(), t, counted, label_smoothing, weight);
  Tensor total = loss.sum(), scale = at::ones({}, loss.options());
  const Tensor count = counted.sum();
  if (red == CeReduction::Mean && count.item<int64_t>() > 0) {
    // The counted rows' number, or the weights of their targets.
    const Tensor divisor =
        weight.has_value()
            ? at::where(counted, weight->to(loss.scalar_type()).index_select(
                                     0, at::where(counted, t, at::zeros({}, t.options()))),
                        at::zeros({}, loss.options()))
                  .sum()
            : count.to(loss.scalar_type());
    total = total / divisor;
    scale = scale / divisor;
  }
  return {loss, lse, counted, total, scale};
}

// ------------------------------------------------------ elementwise losses
// The rows' losses (summed a row where reduce_rows, else each element's) of
// operands already checked.
Tensor elem_loss_rows(const ElemLossOperands& o, bool reduce_rows) {
  const Tensor &x = o.x, &y = o.y, &m = o.mask, &pw = o.pos_weight;
  const int64_t R = o.R, F = o.F;
  const ElemLoss kind = o.kind;
  const auto acc = o.acc;
  Tensor out = reduce_rows ? at::empty({R}, x.options().dtype(acc))
                           : at::empty({R, F}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    const scalar_t* pwp = pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr;
    const bool* mp = m.const_data_ptr<bool>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (!mp[r]) {
          if (reduce_rows) op[r] = acc_t(0);
          else std::fill_n(op + r * F, F, acc_t(0));
          continue;
        }
        acc_t sum = acc_t(0);
        for (int64_t f = 0; f < F; ++f) {
          const acc_t l = elem_loss<acc_t>(kind, xp[r * F + f], yp[r * F + f],
                                           pwp ? acc_t(pwp[f]) : acc_t(1)).loss;
          if (reduce_rows) sum += l;
          else op[r * F + f] = l;
        }
        if (reduce_rows) op[r] = sum;
      }
    });
  });
  return out;
}

Tensor elementwise_loss_forward_cpu(const Tensor& input, const Tensor& target, const Tensor& mask,
                                   const c10::optional<Tensor>& pos_weight,
                                   c10::string_view kind_name, bool reduce_rows) {
  return elem_loss_rows(
      elementwise_loss_operands(input, target, mask, pos_weight, std::string(kind_name)),
      reduce_rows);
}

std::tuple<Tensor, Tensor> elementwise_loss_backward_cpu(
    const Tensor& grad, const Tensor& input, const Tensor& target, const Tensor& mask,
    const c10::optional<Tensor>& pos_weight, c10::string_view kind_name, bool reduce_rows) {
  const ElemLossOperands o =
      elementwise_loss_operands(input, target, mask, pos_weight, std::string(kind_name));
  const Tensor &x = o.x, &y = o.y, &m = o.mask, &pw = o.pos_weight;
  const int64_t R = o.R, F = o.F;
  const ElemLoss kind = o.kind;
  const RowGrad rg = elementwise_loss_grad(grad, o, reduce_rows);
  const Tensor& g = rg.g;
  const int64_t g_stride = rg.stride;
  Tensor gx = at::empty({R, F}, x.options()), gy = at::empty({R, F}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "elem_loss_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    const scalar_t* pwp = pw.defined() ? pw.const_data_ptr<scalar_t>() : nullptr;
    const bool* mp = m.const_data_ptr<bool>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gyp = gy.data_ptr<scalar_t>();
    at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (!mp[r]) {
          std::fill_n(gxp + r * F, F, scalar_t(0));
          std::fill_n(gyp + r * F, F, scalar_t(0));
          continue;
        }
        for (int64_t f = 0; f < F; ++f) {
          const int64_t i = r * F + f;
          const auto o = elem_loss<acc_t>(kind, xp[i], yp[i], pwp ? acc_t(pwp[f]) : acc_t(1));
          const acc_t gi = reduce_rows ? gp[r * g_stride] : gp[i];
          gxp[i] = scalar_t(gi * o.dx);
          gyp[i] = scalar_t(gi * o.dy);
        }
      }
    });
  });
  return {gx, gy};
}

// Which rows count (counted_rows), their losses (elem_loss_rows, the
// arguments checked once), and their reduction by ATen's sums.
std::tuple<Tensor, Tensor, Tensor, Tensor> masked_elementwise_loss_forward_cpu(
    const Tensor& input, const Tensor& target, const c10::optional<Tensor>& mask,
    const c10::optional<Tensor>& lengths, bool batch_first,
    const c10::optional<Tensor>& pos_weight, c10::string_view kind_name,
    c10::string_view reduction) {
  const MaskedElemOperands o = masked_elementwise_loss_operands(
      input, target, mask, lengths, batch_first, pos_weight, std::string(kind_name), reduction);
  ElemLossOperands e = o.elem;
  e.mask = counted_rows(o.rule.rows, e.R, nullptr);
  const Tensor& counted = e.mask;
  const Tensor loss = elem_loss_rows(e, o.reduction != CeReduction::None);
  Tensor scale = at::ones({}, loss.options());
  if (o.reduction == CeReduction::None) return {loss, counted, at::zeros({}, loss.options()), scale};
  Tensor total = loss.sum();
  if (o.reduction == CeReduction::Mean) {
    const int64_t elements = counted.sum().item<int64_t>() * o.elem.F;
    if (elements > 0) {
      total = total / double(elements);
      scale = scale / double(elements);
    }
  }
  return {loss, counted, total, scale};
}

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen_kernels, CPU, m) {
  m.impl("cross_entropy_forward", &varlen::cross_entropy_forward_cpu);
  m.impl("cross_entropy_backward", &varlen::cross_entropy_backward_cpu);
  m.impl("masked_cross_entropy_forward", &varlen::masked_cross_entropy_forward_cpu);
  m.impl("elementwise_loss_forward", &varlen::elementwise_loss_forward_cpu);
  m.impl("elementwise_loss_backward", &varlen::elementwise_loss_backward_cpu);
  m.impl("masked_elementwise_loss_forward", &varlen::masked_elementwise_loss_forward_cpu);
}
