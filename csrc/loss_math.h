// Elementwise loss formulas shared by the CPU and CUDA kernels: value and
// derivatives w.r.t. the prediction x and the target y, in the math type T.
#pragma once

#include "cell_math.h"  // VK_HD, Math<T>

namespace varlen {

enum class ElemLoss : int { MSE = 0, BCE_WITH_LOGITS = 1 };

template <typename T>
struct ElemLossOut {
  T loss, dx, dy;
};

// PyTorch's formulations: mse (x - y)^2; binary cross entropy with logits
// (1 - y) x + (1 + (p - 1) y) softplus(-x), softplus written stably.
template <typename T>
VK_HD ElemLossOut<T> elem_loss(ElemLoss kind, T x, T y, T pos_weight) {
  ElemLossOut<T> o;
  if (kind == ElemLoss::MSE) {
    const T d = x - y;
    o.loss = d * d;
    o.dx = T(2) * d;
    o.dy = -o.dx;
  } else {
    const T ax = x < T(0) ? -x : x;
    const T softplus_neg_x = Math<T>::log1p(Math<T>::exp(-ax)) + (x < T(0) ? -x : T(0));
    const T w = T(1) + (pos_weight - T(1)) * y;
    o.loss = (T(1) - y) * x + w * softplus_neg_x;
    o.dx = (T(1) - y) - w * sigmoid(-x);
    o.dy = -x + (pos_weight - T(1)) * softplus_neg_x;
  }
  return o;
}

// Which rows (tokens) of masked_cross_entropy_forward count (op_schemas.h):
// mask[r] where a mask is given; else, with lengths, of R = B*T rows in a
// (B, T) grid (batch_first) or a (T, B) one, whether the row's step is below
// its sequence's length; else every row; then not where the target is
// `ignore` (has_ignore).
struct CeRows {
  const bool* mask = nullptr;
  const int64_t* lengths = nullptr;
  int64_t B = 0, T = 0;
  bool batch_first = false, has_ignore = false;
  int64_t ignore = 0;
  // Row r's sequence and step (with lengths).
  VK_HD int64_t seq(int64_t r) const { return batch_first ? r / T : r % B; }
  VK_HD int64_t step(int64_t r) const { return batch_first ? r % T : r / B; }
  // Whether row r counts, given its sequence's length `len` (with lengths;
  // the caller reads and checks it) and its target.
  VK_HD bool counts(int64_t r, int64_t len, int64_t target) const {
    const bool in = mask != nullptr ? mask[r] : lengths == nullptr || step(r) < len;
    return in && !(has_ignore && target == ignore);
  }
};

}  // namespace varlen
