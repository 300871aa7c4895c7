// Argument checks shared by the CPU and CUDA rnn kernels. Every message names
// the argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>
#include <string>
#include <type_traits>
#include <utility>

#include "cell_math.h"

#define VK_CHECK_SHAPE(x, ...)                                                 \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x               \
              " must have shape (" #__VA_ARGS__ ") = ",                      \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

namespace varlen {

inline Cell parse_cell(const std::string& cell) {
  if (cell == "lstm") return Cell::LSTM;
  if (cell == "gru") return Cell::GRU;
  if (cell == "rnn_tanh") return Cell::RNN_TANH;
  if (cell == "rnn_relu") return Cell::RNN_RELU;
  TORCH_CHECK(false, "cell must be one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu', got '", cell, "'");
}

struct RnnSizes {
  Cell cell;
  int64_t T, B, I, H, G, GS, S;
};

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the input's device ", ref.device(),
              ", got ", t.device());
}

inline void check_lengths_meta(const at::Tensor& lengths, const at::Tensor& input, int64_t B) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B,
              "lengths must be 1-D with one entry per sequence (", B, "), got shape ",
              lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "lengths must be int64, got ",
              lengths.scalar_type());
  // On the input's device, or in host memory for a GPU input (the plan is then
  // made on the host: csrc/cuda/token_plan.h).
  TORCH_CHECK(lengths.device() == input.device() || lengths.is_cpu(),
              "lengths must be on the input's device ", input.device(), " or on the CPU, got ",
              lengths.device());
}

// The forward's initial states and biases, with or without a projection:
// dtypes and devices of h0 and c0 (required for LSTM, None otherwise), and the
// biases (both or neither) of gate_rows = G*H entries. Shapes of h0 and c0 are
// the caller's (their widths differ with a projection).
inline void check_states_and_biases(const at::Tensor& input, const at::Tensor& h0,
                                    const c10::optional<at::Tensor>& c0,
                                    const c10::optional<at::Tensor>& b_ih,
                                    const c10::optional<at::Tensor>& b_hh, Cell cell,
                                    const std::string& cell_name, int64_t gate_rows) {
  auto same_dtype_and_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                input.scalar_type(), ", got ", t.scalar_type());
    check_same_device(input, t, name);
  };
  same_dtype_and_device(h0, "h0");
  if (cell == Cell::LSTM) {
    TORCH_CHECK(c0.has_value(), "c0 is required for cell 'lstm'");
    same_dtype_and_device(*c0, "c0");
  } else {
    TORCH_CHECK(!c0.has_value(), "c0 must be None for cell '", cell_name, "'");
  }
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "b_ih and b_hh must both be given or both be None");
  if (b_ih.has_value()) {
    VK_CHECK_SHAPE(*b_ih, gate_rows);
    VK_CHECK_SHAPE(*b_hh, gate_rows);
    same_dtype_and_device(*b_ih, "b_ih");
    same_dtype_and_device(*b_hh, "b_hh");
  }
}

// Checks the forward's arguments and returns the problem sizes.
inline RnnSizes check_rnn_forward_args(const at::Tensor& input, const at::Tensor& lengths,
                                       const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const c10::optional<at::Tensor>& b_ih,
                                       const c10::optional<at::Tensor>& b_hh,
                                       const std::string& cell_name) {
  RnnSizes s;
  s.cell = parse_cell(cell_name);
  TORCH_CHECK(input.dim() == 3, "input must be 3-D (T, B, I), got shape ", input.sizes());
  TORCH_CHECK(input.is_floating_point(), "input must be floating point, got ", input.scalar_type());
  s.T = input.size(0);
  s.B = input.size(1);
  s.I = input.size(2);
  TORCH_CHECK(w_hh.dim() == 2, "w_hh must be 2-D (G*H, H), got shape ", w_hh.sizes());
  s.H = w_hh.size(1);
  s.G = num_gates(s.cell);
  s.GS = num_saved_gates(s.cell);
  s.S = num_states(s.cell);
  const int64_t G = s.G, H = s.H, I = s.I, B = s.B;
  VK_CHECK_SHAPE(w_hh, G * H, H);
  VK_CHECK_SHAPE(w_ih, G * H, I);
  VK_CHECK_SHAPE(h0, B, H);
  check_lengths_meta(lengths, input, B);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&w_ih, "w_ih"},
                                {&w_hh, "w_hh"}}) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                input.scalar_type(), ", got ", t->scalar_type());
    check_same_device(input, *t, name);
  }
  check_states_and_biases(input, h0, c0, b_ih, b_hh, s.cell, cell_name, G * H);
  if (s.cell == Cell::LSTM) VK_CHECK_SHAPE(*c0, B, H);
  return s;
}

// The workspaces of rnn_forward (gates, states) have these shapes on every
// backend, (T*B, gate_cols) and (T*B, state_cols), so shape inference needs no
// device. Their rows are in one layout on every backend, the packed one of
// csrc/cuda/token_plan.h: the valid tokens in the first sum(lengths) rows,
// step by step, each step's sequences longest first (row off[t] + i is step t
// of the i-th longest sequence). The rest is zero.
inline void check_workspace_shapes(const at::Tensor& gates, const at::Tensor& states, int64_t T,
                                   int64_t B, int64_t gate_cols, int64_t state_cols) {
  VK_CHECK_SHAPE(gates, T * B, gate_cols);
  VK_CHECK_SHAPE(states, T * B, state_cols);
}

// Checks the backward's arguments against the forward's workspaces and returns
// the problem sizes.
inline RnnSizes check_rnn_backward_args(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                                        const at::Tensor& grad_c_n, const at::Tensor& input,
                                        const at::Tensor& lengths, const at::Tensor& w_ih,
                                        const at::Tensor& w_hh, const at::Tensor& gates,
                                        const at::Tensor& states, const std::string& cell_name) {
  RnnSizes s;
  s.cell = parse_cell(cell_name);
  TORCH_CHECK(input.dim() == 3, "input must be 3-D (T, B, I), got shape ", input.sizes());
  TORCH_CHECK(w_hh.dim() == 2, "w_hh must be 2-D (G*H, H), got shape ", w_hh.sizes());
  s.T = input.size(0);
  s.B = input.size(1);
  s.I = input.size(2);
  s.H = w_hh.size(1);
  s.G = num_gates(s.cell);
  s.GS = num_saved_gates(s.cell);
  s.S = num_states(s.cell);
  const int64_t T = s.T, B = s.B, H = s.H;
  check_lengths_meta(lengths, input, B);
  VK_CHECK_SHAPE(grad_output, T, B, H);
  VK_CHECK_SHAPE(grad_h_n, B, H);
  if (s.cell == Cell::LSTM) VK_CHECK_SHAPE(grad_c_n, B, H);
  VK_CHECK_SHAPE(w_ih, s.G * H, s.I);
  VK_CHECK_SHAPE(w_hh, s.G * H, H);
  // Row counts depend on the backend's layout and are checked there.
  TORCH_CHECK(gates.size(-1) == s.GS * H && states.size(-1) == s.S * H,
              "gates and states must be the unchanged workspaces from rnn_forward, got shapes ",
              gates.sizes(), " and ", states.sizes());
  TORCH_CHECK(gates.is_contiguous() && states.is_contiguous(),
              "gates and states must be the unchanged workspaces from rnn_forward");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_output, "grad_output"},
                                {&grad_h_n, "grad_h_n"},
                                {&w_ih, "w_ih"},
                                {&w_hh, "w_hh"},
                                {&gates, "gates"},
                                {&states, "states"}})
    check_same_device(input, *t, name);
  if (s.cell == Cell::LSTM) check_same_device(input, grad_c_n, "grad_c_n");
  return s;
}

// LSTM with a projection (nn.LSTM's proj_size): w_hr (P, H), w_hh (4H, P).
struct ProjSizes {
  int64_t T, B, I, H, P;
};

// The shapes, dtypes and devices of the input, lengths and weights.
inline ProjSizes check_proj_args(const at::Tensor& input, const at::Tensor& lengths,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const at::Tensor& w_hr, const std::string& cell) {
  TORCH_CHECK(cell == "lstm", "w_hr (a projection) is for cell 'lstm' only, got '", cell, "'");
  TORCH_CHECK(input.dim() == 3, "input must be 3-D (T, B, I), got shape ", input.sizes());
  TORCH_CHECK(w_hr.dim() == 2, "w_hr must be 2-D (P, H), got shape ", w_hr.sizes());
  ProjSizes s{input.size(0), input.size(1), input.size(2), w_hr.size(1), w_hr.size(0)};
  TORCH_CHECK(s.P >= 1 && s.P < s.H, "w_hr (P, H) must have 1 <= P < H (nn.LSTM's proj_size < ",
              "hidden_size), got shape ", w_hr.sizes());
  VK_CHECK_SHAPE(w_hh, 4 * s.H, s.P);
  VK_CHECK_SHAPE(w_ih, 4 * s.H, s.I);
  check_lengths_meta(lengths, input, s.B);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&w_ih, "w_ih"},
                                {&w_hh, "w_hh"},
                                {&w_hr, "w_hr"}}) {
    TORCH_CHECK(t->scalar_type() == input.scalar_type(), name, " must have the input's dtype ",
                input.scalar_type(), ", got ", t->scalar_type());
    check_same_device(input, *t, name);
  }
  return s;
}

// The forward's arguments with a projection: h0 (B, P), c0 (B, H), biases (4H,).
inline ProjSizes check_proj_forward_args(const at::Tensor& input, const at::Tensor& lengths,
                                         const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const c10::optional<at::Tensor>& b_ih,
                                         const c10::optional<at::Tensor>& b_hh,
                                         const at::Tensor& w_hr, const std::string& cell) {
  const ProjSizes s = check_proj_args(input, lengths, w_ih, w_hh, w_hr, cell);
  const int64_t B = s.B, H = s.H, P = s.P;
  check_states_and_biases(input, h0, c0, b_ih, b_hh, Cell::LSTM, cell, 4 * H);
  VK_CHECK_SHAPE(h0, B, P);
  VK_CHECK_SHAPE(*c0, B, H);
  return s;
}

// The backward's arguments with a projection; the workspaces' row counts
// depend on the backend's layout and are checked there.
inline ProjSizes check_proj_backward_args(const at::Tensor& grad_output,
                                          const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                                          const at::Tensor& input, const at::Tensor& lengths,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const at::Tensor& w_hr, const at::Tensor& gates,
                                          const at::Tensor& states, const std::string& cell) {
  const ProjSizes s = check_proj_args(input, lengths, w_ih, w_hh, w_hr, cell);
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  VK_CHECK_SHAPE(grad_output, T, B, P);
  VK_CHECK_SHAPE(grad_h_n, B, P);
  VK_CHECK_SHAPE(grad_c_n, B, H);
  TORCH_CHECK(gates.size(-1) == 4 * H && states.size(-1) == 2 * H + P,
              "gates and states must be the unchanged workspaces from rnn_forward, got shapes ",
              gates.sizes(), " and ", states.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&grad_output, "grad_output"},
                                {&grad_h_n, "grad_h_n"},
                                {&grad_c_n, "grad_c_n"},
                                {&gates, "gates"},
                                {&states, "states"}})
    check_same_device(input, *t, name);
  return s;
}

// The input projection x @ w_ih^T of rows x (M, I), (M, G*H), with the biases
// that fold into it: b_ih and all of b_hh except GRU's b_hn, which sits inside
// r * (W_hn h + b_hn) and is returned apart ((H,), undefined otherwise).
inline std::pair<at::Tensor, at::Tensor> input_projection(const at::Tensor& x,
                                                          const at::Tensor& w_ih,
                                                          const c10::optional<at::Tensor>& b_ih,
                                                          const c10::optional<at::Tensor>& b_hh,
                                                          Cell cell, int64_t H) {
  if (!b_ih.has_value()) return {at::mm(x, w_ih.t()), at::Tensor()};
  at::Tensor bias = *b_ih + *b_hh;
  at::Tensor b_hn;
  if (cell == Cell::GRU) {
    bias = at::cat({bias.narrow(0, 0, 2 * H), b_ih->narrow(0, 2 * H, H)});
    b_hn = b_hh->narrow(0, 2 * H, H).contiguous();
  }
  return {at::addmm(bias, x, w_ih.t()), b_hn};
}

// The same biases, unfolded, in the math type `acc` (float for half and
// bfloat16, so that b_ih + b_hh is not rounded to the storage type): per gate
// (G*H,) b_ih + b_hh, GRU's n gate b_in only; and GRU's b_hn (H,). Undefined
// tensors when there are no biases (and for b_hn outside GRU).
inline std::pair<at::Tensor, at::Tensor> gate_biases(const c10::optional<at::Tensor>& b_ih,
                                                     const c10::optional<at::Tensor>& b_hh,
                                                     Cell cell, int64_t H, at::ScalarType acc) {
  if (!b_ih.has_value()) return {at::Tensor(), at::Tensor()};
  const at::Tensor bi = b_ih->to(acc), bh = b_hh->to(acc);
  if (cell != Cell::GRU) return {(bi + bh).contiguous(), at::Tensor()};
  at::Tensor bias = at::cat({bi.narrow(0, 0, 2 * H) + bh.narrow(0, 0, 2 * H), bi.narrow(0, 2 * H, H)});
  return {bias, bh.narrow(0, 2 * H, H).contiguous()};
}

// Runtime cell -> compile-time cell: f(std::integral_constant<Cell, K>{}).
template <typename F>
auto dispatch_cell(Cell cell, F&& f) {
  switch (cell) {
    case Cell::LSTM:
      return f(std::integral_constant<Cell, Cell::LSTM>{});
    case Cell::GRU:
      return f(std::integral_constant<Cell, Cell::GRU>{});
    case Cell::RNN_TANH:
      return f(std::integral_constant<Cell, Cell::RNN_TANH>{});
    default:
      return f(std::integral_constant<Cell, Cell::RNN_RELU>{});
  }
}

}  // namespace varlen
