// One (sequence row, hidden unit) of a recurrent step, as every CUDA RNN
// kernel runs it: the cell from cell_math.h plus the reads and writes of the
// backward's workspace rows. The per-step kernels (masked_rnn_cuda.cu) and
// the persistent ones (rnn_persistent.cu) differ only in where the hidden-side
// pre-activations come from and where the state lives; this is the rest.
//
// Workspace rows (storage type, H columns per block, unit j at offset 0 of
// the pointers passed in):
//   gates  sg: GS blocks. LSTM: activated [i, f, g, o]; GRU: [r, z, n, W_hn h + b_hn];
//              RNN: [h'].
//   states st: S blocks. [h_prev] or, for LSTM, [h_prev, c_prev].
#pragma once

#include "../cell_math.h"

namespace varlen {

// The input side of a row's gates at unit j: x, the input projection x W_ih^T
// of this row at unit j (G blocks of H), plus bias, the (G*H,) folded biases in
// the math type (b_ih + b_hh; GRU's n gate: b_in only) or nullptr. Loaded
// apart from the step so that a kernel can issue the loads early.
template <typename acc_t, Cell K>
struct GateInputs {
  acc_t v[num_gates(K)];
};
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ GateInputs<acc_t, K> gate_inputs(const scalar_t* x, const acc_t* bias,
                                                            int64_t j, int64_t H) {
  GateInputs<acc_t, K> in;
#pragma unroll
  for (int k = 0; k < num_gates(K); ++k)
    in.v[k] = acc_t(x[k * H]) + (bias ? bias[k * H + j] : acc_t(0));
  return in;
}

// Forward. xin: gate_inputs(); b_hn: GRU's (H,) b_hn or nullptr. hid[k]: the
// hidden side (W_hh h_prev)[k*H + j], without biases. c: LSTM's cell state,
// read and updated in place (unused otherwise). Returns h'.
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ acc_t forward_point(const GateInputs<acc_t, K>& xin, const acc_t* b_hn,
                                               int64_t j, int64_t H,
                                               const acc_t (&hid)[num_gates(K)], acc_t h_prev,
                                               acc_t* c, scalar_t* sg, scalar_t* st) {
  const acc_t* x = xin.v;
  st[0] = scalar_t(h_prev);
  if constexpr (K == Cell::LSTM) {
    const acc_t c_prev = *c;
    st[H] = scalar_t(c_prev);
    const auto r = lstm_forward<acc_t>(x[0] + hid[0], x[1] + hid[1], x[2] + hid[2],
                                       x[3] + hid[3], c_prev);
    sg[0] = scalar_t(r.i);
    sg[H] = scalar_t(r.f);
    sg[2 * H] = scalar_t(r.g);
    sg[3 * H] = scalar_t(r.o);
    *c = r.c;
    return r.h;
  } else if constexpr (K == Cell::GRU) {
    const acc_t hn = hid[2] + (b_hn ? b_hn[j] : acc_t(0));
    const auto r = gru_forward<acc_t>(x[0], x[1], x[2], hid[0], hid[1], hn, h_prev);
    sg[0] = scalar_t(r.r);
    sg[H] = scalar_t(r.z);
    sg[2 * H] = scalar_t(r.n);
    sg[3 * H] = scalar_t(hn);
    return r.h;
  } else {
    const acc_t h = rnn_forward<acc_t, K == Cell::RNN_RELU>(x[0] + hid[0]);
    sg[0] = scalar_t(h);
    return h;
  }
}

// The same, loading the gate inputs: x and bias as gate_inputs() takes them.
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ acc_t forward_point(const scalar_t* x, const acc_t* bias,
                                               const acc_t* b_hn, int64_t j, int64_t H,
                                               const acc_t (&hid)[num_gates(K)], acc_t h_prev,
                                               acc_t* c, scalar_t* sg, scalar_t* st) {
  return forward_point<scalar_t, acc_t, K>(gate_inputs<scalar_t, acc_t, K>(x, bias, j, H), b_hn,
                                           j, H, hid, h_prev, c, sg, st);
}

// What the backward of a step reads of the forward's workspace rows (sg, st
// as above, unit j at offset 0): the saved gates (GS) and the state the cell
// needs (LSTM: c_prev; GRU: h_prev; none otherwise). Loaded apart from the
// step so that a kernel can issue the loads early.
template <typename acc_t, Cell K>
struct SavedStep {
  acc_t g[num_saved_gates(K)];
  acc_t state;
};
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ SavedStep<acc_t, K> saved_step(const scalar_t* sg, const scalar_t* st,
                                                          int64_t H) {
  SavedStep<acc_t, K> in;
#pragma unroll
  for (int k = 0; k < num_saved_gates(K); ++k) in.g[k] = acc_t(sg[k * H]);
  in.state = K == Cell::LSTM ? acc_t(st[H]) : K == Cell::GRU ? acc_t(st[0]) : acc_t(0);
  return in;
}

// Backward. saved: saved_step(); dh: the whole gradient reaching this step's h'
// (output, later steps, h_n); dc: LSTM's gradient reaching c', replaced by the
// one reaching c_prev. Writes the pre-activation gradients: gx (input side, G
// blocks of H) and gh (hidden side; differs from gx for GRU only, and may
// alias it otherwise). Returns the part of d h_prev that does not pass
// through W_hh (GRU: dh * z; 0 otherwise).
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ acc_t backward_point(const SavedStep<acc_t, K>& saved, int64_t H,
                                                acc_t dh, acc_t* dc, scalar_t* gx,
                                                scalar_t* gh) {
  const acc_t* sg = saved.g;
  if constexpr (K == Cell::LSTM) {
    const auto r = lstm_backward<acc_t>(sg[0], sg[1], sg[2], sg[3], saved.state, dh, *dc);
    gx[0] = scalar_t(r.di);
    gx[H] = scalar_t(r.df);
    gx[2 * H] = scalar_t(r.dg);
    gx[3 * H] = scalar_t(r.do_);
    *dc = r.dc_prev;
    return acc_t(0);
  } else if constexpr (K == Cell::GRU) {
    const auto r = gru_backward<acc_t>(sg[0], sg[1], sg[2], sg[3], saved.state, dh);
    gx[0] = gh[0] = scalar_t(r.dr);
    gx[H] = gh[H] = scalar_t(r.dz);
    gx[2 * H] = scalar_t(r.dxn);
    gh[2 * H] = scalar_t(r.dhn);
    return r.dh_prev_direct;
  } else {
    gx[0] = scalar_t(rnn_backward<acc_t, K == Cell::RNN_RELU>(sg[0], dh));
    return acc_t(0);
  }
}

// The same, loading the workspace rows sg and st (as saved_step() takes them).
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ acc_t backward_point(const scalar_t* sg, const scalar_t* st, int64_t H,
                                                acc_t dh, acc_t* dc, scalar_t* gx,
                                                scalar_t* gh) {
  return backward_point<scalar_t, acc_t, K>(saved_step<scalar_t, acc_t, K>(sg, st, H), H, dh, dc,
                                            gx, gh);
}

}  // namespace varlen
