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

}  // namespace varlen
