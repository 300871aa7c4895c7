// rnn_bidirectional_forward / rnn_bidirectional_backward (op_schemas.h), the
// parts every backend shares: the weight list cut into the two directions,
// the arguments of each direction as rnn_forward / rnn_backward take them,
// and the two directions' results put together. How the directions run (one
// after the other, concurrently, in one launch) is the backend's.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "rnn_args.h"

namespace varlen {

// One direction's parameters, as rnn_forward takes them.
struct DirectionWeights {
  at::Tensor w_ih, w_hh;
  c10::optional<at::Tensor> b_ih, b_hh, w_hr;
};

// weights: both directions' parameters in nn.*'s order (see op_schemas.h).
inline std::array<DirectionWeights, 2> split_directions(at::TensorList weights, bool has_biases,
                                                        const std::string& cell) {
  const int64_t base = has_biases ? 4 : 2, n = int64_t(weights.size());
  const bool proj = n == 2 * (base + 1);
  TORCH_CHECK(n == 2 * base || (proj && cell == "lstm"),
              "weights must hold both directions' w_ih, w_hh", has_biases ? ", b_ih, b_hh" : "",
              cell == "lstm" ? " (and w_hr with a projection)" : "", ": ", 2 * base,
              cell == "lstm" ? " or " + std::to_string(2 * (base + 1)) : std::string(),
              " tensors with has_biases=", has_biases ? "True" : "False", " and cell '", cell,
              "', got ", n);
  const int64_t per = n / 2;
  std::array<DirectionWeights, 2> d;
  for (int k = 0; k < 2; ++k) {
    const at::Tensor* w = weights.data() + k * per;
    d[k].w_ih = w[0];
    d[k].w_hh = w[1];
    if (has_biases) {
      d[k].b_ih = w[2];
      d[k].b_hh = w[3];
    }
    if (proj) d[k].w_hr = w[base];
  }
  return d;
}

// The per-direction (B, *) slice d of a (2, B, *) state, after checking that
// it has two directions.
inline at::Tensor direction_of(const at::Tensor& x, int64_t d, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 2, name,
              " must be 3-D with one entry per direction (2, B, *), got shape ", x.sizes());
  return x.select(0, d);
}

// Direction d's (gates, states) of rnn_bidirectional_forward's workspaces.
inline std::pair<at::Tensor, at::Tensor> workspaces_of(at::TensorList workspaces, int64_t d) {
  TORCH_CHECK(workspaces.size() == 4,
              "workspaces must be the unchanged [gates, states] of both directions from "
              "rnn_bidirectional_forward (4 tensors), got ", workspaces.size());
  return {workspaces[2 * d], workspaces[2 * d + 1]};
}

inline c10::optional<at::Tensor> direction_of(const c10::optional<at::Tensor>& x, int64_t d,
                                              const char* name) {
  if (!x.has_value()) return c10::nullopt;
  return direction_of(*x, d, name);
}

using RnnForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BidirectionalForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                              at::Tensor, at::Tensor, at::Tensor>;
using RnnBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                     at::Tensor, at::Tensor, at::Tensor>;
using BidirectionalBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>;

// (output, h_n, c_n, gates, states) of the two directions -> the op's result
// (the workspaces as they are, not copied).
inline BidirectionalForwardResult join_forward(const RnnForwardResult& f,
                                               const RnnForwardResult& r, bool lstm) {
  return {at::cat({std::get<0>(f), std::get<0>(r)}, 2),
          at::stack({std::get<1>(f), std::get<1>(r)}),
          lstm ? at::stack({std::get<2>(f), std::get<2>(r)}) : std::get<2>(f),
          std::get<3>(f),
          std::get<4>(f),
          std::get<3>(r),
          std::get<4>(r)};
}

// One direction's arguments of rnn_backward, views of the bidirectional op's.
struct DirectionGrads {
  at::Tensor grad_output, grad_h_n, grad_c_n, gates, states;
};

// grad_output (T, B, 2P), grad_h_n (2, B, P), grad_c_n (2, B, H) for lstm
// (else (0,), shared) and the workspaces of rnn_bidirectional_backward, per
// direction.
inline std::array<DirectionGrads, 2> split_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    at::TensorList workspaces, const std::array<DirectionWeights, 2>& w, bool lstm) {
  std::array<DirectionGrads, 2> g;
  for (int64_t d = 0; d < 2; ++d) {
    const int64_t P = w[d].w_hr ? w[d].w_hr->size(0) : w[d].w_hh.size(1);
    TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(2) == 2 * P,
                "grad_output must be (T, B, 2P) with P = ", P, ", got shape ",
                grad_output.sizes());
    g[d].grad_output = grad_output.narrow(2, d * P, P);
    g[d].grad_h_n = direction_of(grad_h_n, d, "grad_h_n");
    g[d].grad_c_n = lstm ? direction_of(grad_c_n, d, "grad_c_n") : grad_c_n;
    std::tie(g[d].gates, g[d].states) = workspaces_of(workspaces, d);
  }
  return g;
}

// rnn_backward's results of the two directions -> the op's: the input
// gradients summed, the state gradients stacked, the weight gradients in
// the order of `weights`.
// grad_input: the layer's, both directions' together.
inline BidirectionalBackwardResult join_backward(const at::Tensor& grad_input,
                                                 const RnnBackwardResult& f,
                                                 const RnnBackwardResult& r, bool lstm,
                                                 bool has_biases, bool proj) {
  std::vector<at::Tensor> grads;
  for (const RnnBackwardResult* g : {&f, &r}) {
    grads.push_back(std::get<3>(*g));
    grads.push_back(std::get<4>(*g));
    if (has_biases) {
      grads.push_back(std::get<5>(*g));
      grads.push_back(std::get<6>(*g));
    }
    if (proj) grads.push_back(std::get<7>(*g));
  }
  return {grad_input, at::stack({std::get<1>(f), std::get<1>(r)}),
          lstm ? at::stack({std::get<2>(f), std::get<2>(r)}) : std::get<2>(f), std::move(grads)};
}

inline BidirectionalBackwardResult join_backward(const RnnBackwardResult& f,
                                                 const RnnBackwardResult& r, bool lstm,
                                                 bool has_biases, bool proj) {
  return join_backward(std::get<0>(f) + std::get<0>(r), f, r, lstm, has_biases, proj);
}

}  // namespace varlen
