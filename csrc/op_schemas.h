// Every varlen_kernels op schema, declared once. csrc/ops.cpp defines them in
// the `varlen_kernels` library; the emulation build (csrc/emulation) defines
// the same schemas again in `varlen_kernels_emu`, for the CUDA kernels'
// code compiled for the CPU. Fake (meta) kernels and autograd live in
// varlen_kernels/ops.py (the masked losses' autograd in csrc/ops.cpp).
#pragma once

#include <torch/library.h>

namespace varlen {

inline void define_ops(torch::Library& m) {
  // One direction of one recurrent layer over a padded, time-major batch.
  //   input   (T, B, I), any strides with a unit last stride
  //   lengths (B,) int64, each in [0, T], on the input's device or on the CPU
  //           (a GPU op then makes its length plan on the host: csrc/cuda/token_plan.h)
  //   h0      (B, H);  c0 (B, H) for cell == "lstm", else None
  //   w_ih    (G*H, I); w_hh (G*H, H); b_ih, b_hh (G*H,) or None
  //           G = 4 (lstm), 3 (gru), 1 (rnn_tanh, rnn_relu)
  // Returns
  //   output  (T, B, H): h at every valid step, exactly 0 past each length
  //   h_n     (B, H):    state after each sequence's own last valid step
  //   c_n     (B, H) for lstm, (0,) otherwise
  //   gates   (T*B, GS*H), states (T*B, S*H): opaque workspaces for
  //           rnn_backward, to be passed to it unchanged (GS = 4 for lstm and
  //           gru, 1 for rnn; S = 2 for lstm, 1 otherwise). The same shapes on
  //           every device; the rows' contents differ (rnn_args.h,
  //           check_workspace_shapes).
  //   w_hr    (P, H) LSTM projection (nn.LSTM's proj_size = P), or None.
  //           Then h = w_hr (o * tanh(c)) has P features: h0, h_n and output
  //           have P columns, w_hh is (4H, P), states rows are 2H + P wide.
  m.def(
      "rnn_forward(Tensor input, Tensor lengths, Tensor h0, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, str cell, "
      "bool reverse, Tensor? w_hr=None) -> (Tensor output, Tensor h_n, Tensor c_n, "
      "Tensor gates, Tensor states)");
  // Gradients of rnn_forward. grad_c_n is (0,) for non-LSTM cells. The bias
  // gradients are returned whether or not the forward had biases; grad_w_hr
  // is (0,) without a projection.
  m.def(
      "rnn_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor lengths, Tensor w_ih, Tensor w_hh, Tensor gates, "
      "Tensor states, str cell, bool reverse, Tensor? w_hr=None) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr)");

  // Both directions of one bidirectional layer in one call: what two
  // rnn_forward calls (reverse false, then true) return, with the outputs
  // side by side. Where the backend can, the directions run concurrently
  // (CPU: one thread each; CUDA: one persistent launch, a group of CTAs each).
  //   h0      (2, B, P);  c0 (2, B, H) for cell == "lstm", else None
  //   weights both directions' parameters, forward direction first, each in
  //           nn.*'s order: w_ih, w_hh, then b_ih, b_hh if has_biases, then
  //           w_hr if the LSTM has a projection (P = w_hr.size(0); else P = H)
  // Returns
  //   output  (T, B, 2P): [forward | reverse], exactly 0 past each length
  //   h_n     (2, B, P);  c_n (2, B, H) for lstm, (0,) otherwise
  //   gates, states of the forward direction, then of the reverse one:
  //           rnn_forward's workspaces, for rnn_bidirectional_backward
  //           (separate tensors, not a list: AOTInductor takes no list outputs)
  m.def(
      "rnn_bidirectional_forward(Tensor input, Tensor lengths, Tensor h0, Tensor? c0, "
      "Tensor[] weights, bool has_biases, str cell) -> (Tensor output, Tensor h_n, "
      "Tensor c_n, Tensor gates, Tensor states, Tensor gates_reverse, Tensor states_reverse)");
  // Gradients of rnn_bidirectional_forward: grad_output (T, B, 2P), grad_h_n
  // (2, B, P), grad_c_n (2, B, H) for lstm, else (0,); workspaces: the
  // forward's [gates, states, gates_reverse, states_reverse]. grad_weights
  // matches weights, tensor for tensor.
  m.def(
      "rnn_bidirectional_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor lengths, Tensor[] weights, bool has_biases, Tensor[] workspaces, "
      "str cell) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, "
      "Tensor[] grad_weights)");

  // Masked cross entropy over tokens (rows).
  //   logits (R, C); target (R,) int64; mask (R,) bool: which rows count;
  //   weight (C,) class weights of the logits' dtype, or None (all 1).
  // Returns loss (R,) and lse (R,) (logsumexp, kept for backward) in the math
  // type (float32 for half/bfloat16), both 0 where mask is false. Rows with
  // mask false are never read. With eps = label_smoothing, w = weight and
  // W = sum(w), as F.cross_entropy(reduction="none"):
  //   loss = (1 - eps) w[t] (lse - x[t]) + eps / C * sum_c w[c] (lse - x[c])
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor target, Tensor mask, "
      "float label_smoothing, Tensor? weight=None) -> (Tensor loss, Tensor lse)");
  // grad_logits (R, C) = grad_loss * (softmax ((1 - eps) w[t] + eps W / C)
  //                                   - (1 - eps) w[t] onehot - eps w / C)
  // on rows with mask true, 0 elsewhere. grad_loss may be one value expanded
  // to (R,) (stride 0), as a reduction's gradient is: read in place.
  m.def(
      "cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target, Tensor mask, "
      "Tensor lse, float label_smoothing, Tensor? weight=None) -> Tensor");

  // masked_cross_entropy in one op: which rows count, their losses, and the
  // reduction.
  //   logits (R, C); target (R,) int64; weight, label_smoothing as above;
  //   mask (R,) bool, or lengths (B,) int64 in [0, T] (asserted on the
  //           device) of R = B*T rows in a (B, T) grid (batch_first) or a
  //           (T, B) one: a row counts while its step is below its sequence's
  //           length; or neither: every row; in each case not where its
  //           target is ignore_index (when given). Rows that do not count are
  //           never read.
  //   reduction "none" | "sum" | "mean" (over the counted rows; with weight,
  //           divided by the summed weights of their targets).
  // Returns loss and lse (R,) as cross_entropy_forward's (0 where a row does
  // not count); counted (R,) bool: the rows that count; total (): the sum of
  // loss ("none", "sum") or the mean (0 where no row counts); scale ():
  // d total / d loss[r] for a counted row. In the math type. Its gradient is
  // cross_entropy_backward's with counted as the mask.
  m.def(
      "masked_cross_entropy_forward(Tensor logits, Tensor target, Tensor? mask, "
      "Tensor? lengths, bool batch_first, int? ignore_index, float label_smoothing, "
      "Tensor? weight, str reduction) -> (Tensor loss, Tensor lse, Tensor counted, "
      "Tensor total, Tensor scale)");

  // Masked elementwise losses over tokens (rows) of F features.
  //   input, target (R, F); mask (R,) bool; pos_weight (F,) or None (bce only);
  //   kind "mse" or "bce_with_logits".
  // Returns, in the math type (float32 for half/bfloat16), the per-token sums
  // (R,) if reduce_rows else the per-element losses (R, F); 0 where mask is
  // false. Rows with mask false are never read.
  m.def(
      "elementwise_loss_forward(Tensor input, Tensor target, Tensor mask, "
      "Tensor? pos_weight, str kind, bool reduce_rows) -> Tensor");
  // Gradients w.r.t. input and target; grad is (R,) or (R, F) like the forward's
  // result. 0 on rows with mask false.
  m.def(
      "elementwise_loss_backward(Tensor grad, Tensor input, Tensor target, Tensor mask, "
      "Tensor? pos_weight, str kind, bool reduce_rows) -> (Tensor grad_input, "
      "Tensor grad_target)");

  // masked_mse / masked_bce_with_logits in one op: which rows count, their
  // losses, and the reduction.
  //   input, target (R, F); pos_weight, kind as for elementwise_loss_forward;
  //   mask, lengths, batch_first: which rows count, as for
  //           masked_cross_entropy_forward (no ignore_index);
  //   reduction "none" | "sum" | "mean" (over the counted rows' F elements).
  // Returns loss: the per-element losses (R, F) for "none", else the rows'
  // sums (R,), in the math type, 0 where a row does not count; counted (R,)
  // bool; total (): the sum of loss ("sum"), the mean ("mean"; 0 where no row
  // counts) or 0 ("none": no reduction is made); scale (): d total / d (a
  // counted row's sum), 1 for "none". Its gradient is
  // elementwise_loss_backward's with counted as the mask.
  m.def(
      "masked_elementwise_loss_forward(Tensor input, Tensor target, Tensor? mask, "
      "Tensor? lengths, bool batch_first, Tensor? pos_weight, str kind, str reduction) -> "
      "(Tensor loss, Tensor counted, Tensor total, Tensor scale)");

  // Fused linear + masked cross entropy over tokens (rows), chunk by chunk
  // (csrc/linear_cross_entropy.h): the logits hidden @ weight^T + bias are
  // never held for all rows at once.
  //   hidden (N, H); weight (V, H); bias (V,) or None; target (N,) int64;
  //   mask (N,) bool: which rows count (others are never read);
  //   reduction "none" | "sum" | "mean" (over the rows that count, divisor on
  //   the device); compute_grad ("sum"/"mean" only): also return the
  //   gradients of the loss, from the same logits; chunk: rows per chunk, 0
  //   for automatic.
  // Returns loss ((N,) for "none", else ()) and lse (N,) in the math type;
  // grad_hidden (N, H), grad_weight (V, H), grad_bias (V,) if compute_grad,
  // else (0,) (grad_bias also (0,) without bias).
  m.def(
      "linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "Tensor mask, float label_smoothing, str reduction, bool compute_grad, int chunk) -> "
      "(Tensor loss, Tensor lse, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // Gradients for per-token upstream gradients grad_loss (N,), recomputing
  // each chunk's logits; grad_bias is (0,) without bias.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor target, Tensor mask, Tensor lse, float label_smoothing, int chunk) "
      "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace varlen
