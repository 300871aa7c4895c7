// Argument checks of the masked-loss kernels, shared by the backends.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <string>

#include "loss_math.h"
#include "rnn_args.h"  // VK_CHECK_SHAPE

namespace varlen {

// logits (R, C) floating; target (R,) int64; mask (R,) bool (where not
// null); weight (C,) of the logits' dtype or None; all on one device.
inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                                     const at::Tensor* mask_or_null, double label_smoothing,
                                     const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 2, "logits must be 2-D (R, C), got shape ", logits.sizes());
  TORCH_CHECK(logits.is_floating_point(), "logits must be floating point, got ",
              logits.scalar_type());
  const int64_t R = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C > 0, "logits must have at least one class, got shape ", logits.sizes());
  VK_CHECK_SHAPE(target, R);
  TORCH_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ",
              target.scalar_type());
  check_same_device(logits, target, "target");
  if (mask_or_null != nullptr) {
    const at::Tensor& mask = *mask_or_null;
    VK_CHECK_SHAPE(mask, R);
    TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
    check_same_device(logits, mask, "mask");
  }
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "label_smoothing must be in [0, 1], got ", label_smoothing);
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == C,
                "weight must have shape (C,) = (", C, "), one per class, got ", weight->sizes());
    TORCH_CHECK(weight->scalar_type() == logits.scalar_type(),
                "weight must have the logits' dtype ", logits.scalar_type(), ", got ",
                weight->scalar_type());
    check_same_device(logits, *weight, "weight");
  }
}
inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                                     const at::Tensor& mask, double label_smoothing,
                                     const c10::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, &mask, label_smoothing, weight);
}

// The backward's extra arguments: grad_loss and lse (R,) in the math type.
inline void check_cross_entropy_backward_args(const at::Tensor& grad_loss, const at::Tensor& logits,
                                              const at::Tensor& target, const at::Tensor& mask,
                                              const at::Tensor& lse, double label_smoothing,
                                              const c10::optional<at::Tensor>& weight) {
  check_cross_entropy_args(logits, target, mask, label_smoothing, weight);
  const int64_t R = logits.size(0);
  const auto acc = at::toOpMathType(logits.scalar_type());
  VK_CHECK_SHAPE(grad_loss, R);
  VK_CHECK_SHAPE(lse, R);
  TORCH_CHECK(lse.scalar_type() == acc, "lse must be ", acc, ", got ", lse.scalar_type());
  check_same_device(logits, grad_loss, "grad_loss");
  check_same_device(logits, lse, "lse");
}

// A backward's per-row gradient (R,) in the math type: where it is one value
// expanded to every row (stride 0), as a reduction's gradient is, read in
// place with stride 0; else contiguous, stride 1.
struct RowGrad {
  at::Tensor g;
  int64_t stride;
};
inline RowGrad row_grad(const at::Tensor& grad, at::ScalarType acc) {
  const at::Tensor g = grad.to(acc);
  if (g.size(0) > 1 && g.stride(0) == 0) return {g, 0};
  return {g.contiguous(), 1};
}

// Class weights in the math type, contiguous (undefined when not given), and
// their sum W as a one-element tensor on the same device (no host sync).
struct CeWeight {
  at::Tensor w, sum;
};
inline CeWeight cross_entropy_weight(const c10::optional<at::Tensor>& weight,
                                     at::ScalarType acc) {
  if (!weight.has_value()) return {};
  at::Tensor w = weight->to(acc).contiguous();
  return {w, w.sum().reshape({1})};
}

// Which rows of R count (op_schemas.h, masked_cross_entropy_forward): mask
// (R,) bool or lengths (B,) int64 with R = B*T, not both; neither: every row.
// The rule points into the contiguous mask and lengths kept here.
struct RowsRule {
  CeRows rows;
  at::Tensor mask, lengths;  // contiguous; undefined where not given
};
// (rows_of: what the errors call the rows' tensor, possessive: "logits'".)
inline RowsRule rows_rule(const at::Tensor& x, const char* rows_of,
                          const c10::optional<at::Tensor>& mask_or_none,
                          const c10::optional<at::Tensor>& lengths, bool batch_first) {
  TORCH_CHECK(!(mask_or_none.has_value() && lengths.has_value()),
              "give a mask or lengths, not both");
  const int64_t R = x.size(0);
  RowsRule o;
  CeRows& rows = o.rows;
  rows.batch_first = batch_first;
  if (mask_or_none.has_value()) {
    const at::Tensor& mask = *mask_or_none;
    VK_CHECK_SHAPE(mask, R);
    TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
    check_same_device(x, mask, "mask");
    o.mask = mask.contiguous();
    rows.mask = o.mask.const_data_ptr<bool>();
  }
  if (lengths.has_value()) {
    TORCH_CHECK(lengths->dim() == 1 && lengths->scalar_type() == at::kLong,
                "lengths must be 1-D int64, got shape ", lengths->sizes(), " and dtype ",
                lengths->scalar_type());
    check_same_device(x, *lengths, "lengths");
    rows.B = lengths->size(0);
    TORCH_CHECK(rows.B > 0 ? R % rows.B == 0 : R == 0, rows_of, " ", R,
                " rows must be B*T for the ", rows.B, " lengths (B)");
    rows.T = rows.B > 0 ? R / rows.B : 0;
    o.lengths = lengths->contiguous();
    rows.lengths = o.lengths.const_data_ptr<int64_t>();
  }
  return o;
}

// A CPU rule's lengths, each in [0, T] (a GPU kernel asserts them instead).
inline void check_rows_lengths_on_host(const CeRows& rows) {
  if (rows.lengths == nullptr) return;
  for (int64_t b = 0; b < rows.B; ++b)
    TORCH_CHECK(rows.lengths[b] >= 0 && rows.lengths[b] <= rows.T,
                "lengths must be in [0, T] with T=", rows.T, ", got lengths[", b, "] = ",
                rows.lengths[b]);
}

enum class CeReduction { None, Sum, Mean };
inline CeReduction parse_reduction(c10::string_view reduction) {
  if (reduction == "none") return CeReduction::None;
  if (reduction == "sum") return CeReduction::Sum;
  TORCH_CHECK(reduction == "mean", "reduction must be 'none', 'sum' or 'mean', got '", reduction,
              "'");
  return CeReduction::Mean;
}

// masked_cross_entropy_forward's arguments (op_schemas.h), checked: what
// check_cross_entropy_args checks of logits, target, weight and
// label_smoothing; the rows' rule (rows_rule) less ignore_index; the
// reduction. The rule points into the contiguous tensors kept here.
struct MaskedCeOperands {
  CeRows rows;
  CeReduction reduction;
  at::Tensor target, mask, lengths;  // contiguous; mask, lengths undefined where not given
};
inline MaskedCeOperands masked_cross_entropy_operands(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& lengths, bool batch_first,
    c10::optional<int64_t> ignore_index, double label_smoothing,
    const c10::optional<at::Tensor>& weight, c10::string_view reduction) {
  check_cross_entropy_args(logits, target, mask.has_value() ? &*mask : nullptr, label_smoothing,
                           weight);
  RowsRule rule = rows_rule(logits, "logits'", mask, lengths, batch_first);
  MaskedCeOperands o;
  o.rows = rule.rows;
  o.rows.has_ignore = ignore_index.has_value();
  o.rows.ignore = ignore_index.value_or(0);
  o.target = target.contiguous();
  o.mask = std::move(rule.mask);
  o.lengths = std::move(rule.lengths);
  o.reduction = parse_reduction(reduction);
  return o;
}

inline ElemLoss parse_elem_loss(const std::string& kind) {
  if (kind == "mse") return ElemLoss::MSE;
  if (kind == "bce_with_logits") return ElemLoss::BCE_WITH_LOGITS;
  TORCH_CHECK(false, "kind must be 'mse' or 'bce_with_logits', got '", kind, "'");
}

// input, target (R, F) of one floating dtype; mask (R,) bool (where not
// null); pos_weight (F,).
inline ElemLoss check_elementwise_loss_args(const at::Tensor& input, const at::Tensor& target,
                                            const at::Tensor* mask_or_null,
                                            const c10::optional<at::Tensor>& pos_weight,
                                            const std::string& kind_name) {
  const ElemLoss kind = parse_elem_loss(kind_name);
  TORCH_CHECK(input.dim() == 2, "input must be 2-D (R, F), got shape ", input.sizes());
  TORCH_CHECK(input.is_floating_point(), "input must be floating point, got ", input.scalar_type());
  const int64_t R = input.size(0), F = input.size(1);
  VK_CHECK_SHAPE(target, R, F);
  TORCH_CHECK(target.scalar_type() == input.scalar_type(), "target must have the input's dtype ",
              input.scalar_type(), ", got ", target.scalar_type());
  check_same_device(input, target, "target");
  if (mask_or_null != nullptr) {
    const at::Tensor& mask = *mask_or_null;
    VK_CHECK_SHAPE(mask, R);
    TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
    check_same_device(input, mask, "mask");
  }
  if (pos_weight.has_value()) {
    TORCH_CHECK(kind == ElemLoss::BCE_WITH_LOGITS, "pos_weight is only for 'bce_with_logits'");
    VK_CHECK_SHAPE(*pos_weight, F);
    TORCH_CHECK(pos_weight->scalar_type() == input.scalar_type(),
                "pos_weight must have the input's dtype ", input.scalar_type(), ", got ",
                pos_weight->scalar_type());
    check_same_device(input, *pos_weight, "pos_weight");
  }
  return kind;
}

// The checked, contiguous operands of the elementwise-loss kernels.
struct ElemLossOperands {
  ElemLoss kind;
  at::Tensor x, y, mask, pos_weight;  // pos_weight undefined when not given
  int64_t R, F;
  at::ScalarType acc;  // the math type
};

inline ElemLossOperands elementwise_loss_operands(const at::Tensor& input, const at::Tensor& target,
                                                  const at::Tensor& mask,
                                                  const c10::optional<at::Tensor>& pos_weight,
                                                  const std::string& kind_name) {
  const ElemLoss kind = check_elementwise_loss_args(input, target, &mask, pos_weight, kind_name);
  return {kind,
          input.contiguous(),
          target.contiguous(),
          mask.contiguous(),
          pos_weight.has_value() ? pos_weight->contiguous() : at::Tensor(),
          input.size(0),
          input.size(1),
          at::toOpMathType(input.scalar_type())};
}

// masked_elementwise_loss_forward's arguments (op_schemas.h), checked: the
// elementwise loss's operands (mask undefined), the rows' rule and the
// reduction.
struct MaskedElemOperands {
  ElemLossOperands elem;
  RowsRule rule;
  CeReduction reduction;
};
inline MaskedElemOperands masked_elementwise_loss_operands(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& lengths, bool batch_first,
    const c10::optional<at::Tensor>& pos_weight, const std::string& kind_name,
    c10::string_view reduction) {
  const ElemLoss kind = check_elementwise_loss_args(input, target, nullptr, pos_weight, kind_name);
  MaskedElemOperands o{{kind, input.contiguous(), target.contiguous(), at::Tensor(),
                        pos_weight.has_value() ? pos_weight->contiguous() : at::Tensor(),
                        input.size(0), input.size(1), at::toOpMathType(input.scalar_type())},
                       rows_rule(input, "input's", mask, lengths, batch_first),
                       parse_reduction(reduction)};
  return o;
}

// The backward's grad in the math type: (R,) for per-token sums if
// reduce_rows (one value expanded to every row read in place, as row_grad
// does), else (R, F) contiguous (stride 1).
inline RowGrad elementwise_loss_grad(const at::Tensor& grad, const ElemLossOperands& o,
                                     bool reduce_rows) {
  if (reduce_rows) {
    VK_CHECK_SHAPE(grad, o.R);
  } else {
    VK_CHECK_SHAPE(grad, o.R, o.F);
  }
  check_same_device(o.x, grad, "grad");
  if (reduce_rows) return row_grad(grad, o.acc);
  return {grad.to(o.acc).contiguous(), 1};
}

}  // namespace varlen
