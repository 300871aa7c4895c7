// The persistent CUDA kernels of rnn_forward / rnn_backward (rnn_persistent.cu):
// one cooperative launch per layer direction runs all its time steps.
//
// Each CTA owns a slice of `units` hidden units and keeps the matching slice of
// W_hh in shared memory for the whole sequence (forward: the rows of its units
// for every gate; backward: the columns of its units). The batch is ordered by
// length on the device (longest first), so the sequences still running at step
// t are a prefix of that order: each step works on that prefix only, in tiles
// of rows, and stops at the longest length. The recurrent state (h, c; in the
// backward the dh/dc carry) stays in the math type in global memory, in length
// order, and the grid synchronizes once per step (cooperative groups).
// Lengths are never read on the host.
//
// The workspaces and results are the per-step path's, element for element in
// layout: gates (T, B, GS*H), states (T, B, S*H), zero at padded steps; either
// path's backward consumes either path's forward.
//
// The recurrent product: float32 and float64 with fma on CUDA cores (IEEE,
// never TF32); half and bfloat16 on tensor cores (wmma, float accumulation),
// with W_hh and the product's row operand (h, or the backward's dgh) in the
// storage type, as in the per-step path's GEMMs. The product itself, the
// state and the backward's carry stay float (the per-step path rounds its
// GEMMs' outputs to the storage type), so the paths differ in half/bfloat16
// by that rounding; both are held to the same error bound by the tests.
//
// Which path runs: VARLEN_KERNELS_RNN_PATH = "auto" (default: persistent when
// its shared memory and grid fit the device, per-step otherwise), "persistent"
// (an error when it does not fit; the projection LSTM, which has no persistent
// kernel, stays per-step) or "per_step".
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../cell_math.h"

namespace varlen {

enum class RnnPath { Auto, Persistent, PerStep };
RnnPath rnn_path_setting();  // reads VARLEN_KERNELS_RNN_PATH, checks its value

// Forward of one layer direction, or nullopt when the persistent path is not
// taken (setting, or it does not fit). gx: (T*B, G*H) input projection in the
// storage type; bias / b_hn: gate_biases() (undefined when there are none).
// Returns (output, h_n, c_n, gates, states) as rnn_forward does.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>>
rnn_forward_persistent(Cell cell, const at::Tensor& gx, const at::Tensor& lengths,
                       const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                       const at::Tensor& bias, const at::Tensor& b_hn, int64_t T, int64_t B,
                       bool reverse);

// Backward recurrence of one layer direction, or nullopt as above. dy: (T, B,
// H) contiguous, storage type; grad_h_n / grad_c_n: (B, H) (grad_c_n unused
// unless LSTM). Returns (dgx, dgh, grad_h0, grad_c0): the pre-activation
// gradients (T*B, G*H), input and hidden side (the same tensor unless GRU),
// zero at padded steps, and the gradients of h0 and c0 in the math type.
std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>> rnn_backward_persistent(
    Cell cell, const at::Tensor& dy, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& lengths, const at::Tensor& w_hh, const at::Tensor& gates,
    const at::Tensor& states, int64_t T, int64_t B, bool reverse);

}  // namespace varlen
