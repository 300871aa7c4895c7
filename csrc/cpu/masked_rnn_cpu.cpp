// CPU kernels for rnn_forward / rnn_backward.
//
// Strategy: run one direction of one layer on the valid tokens only.
//  1. Order the batch by length, longest first (stable counting sort). In that
//     order the sequences still running at step t are the prefix [0, bs[t]),
//     where bs[t] = #{b : lengths[b] > t}, so every per-step GEMM works on a
//     contiguous block of rows and padded steps are never touched.
//  2. Gather the valid input rows into a packed (N, I) matrix, N = sum(lengths)
//     (row off[t] + i is step t of the i-th longest sequence), and compute the
//     input projection for all of them with one GEMM.
//  3. Step through time: one GEMM of the active hidden rows with W_hh, then the
//     fused cell update from cell_math.h. Rows past the active prefix are not
//     touched, so each one keeps its final state (forward direction) or its
//     initial state until its own last step comes (reverse direction).
//     Each valid step is written straight into the padded output; the padded
//     steps are then set to zero.
// The workspaces hold the packed rows, (N, *).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../cell_math.h"
#include "../rnn_args.h"
#include "cpu_capability.h"
#include "rnn_pointwise.h"

namespace varlen {
namespace {

using at::Tensor;

// The batch in length order, and where each step's rows start in packed form.
struct Plan {
  int64_t T = 0, B = 0, N = 0;
  std::vector<int64_t> perm;  // perm[i]: batch index of the i-th longest sequence
  std::vector<int64_t> bs;    // bs[t]: sequences with length > t
  std::vector<int64_t> off;   // off[t]: sum of bs[s] for s < t
};

Plan make_plan(const Tensor& lengths, int64_t T) {
  Plan p;
  p.T = T;
  p.B = lengths.size(0);
  const Tensor len = lengths.contiguous();
  const int64_t* L = len.data_ptr<int64_t>();
  std::vector<int64_t> count(T + 1, 0);
  for (int64_t b = 0; b < p.B; ++b) {
    TORCH_CHECK(L[b] >= 0 && L[b] <= T, "lengths[", b, "] = ", L[b],
                " is out of range: each length must be in [0, T] with T = ", T);
    ++count[L[b]];
  }
  // greater[l]: sequences longer than l. Longest first, stable in the batch
  // index (counting sort); sequences with length > t are then the prefix
  // [0, greater[t]) of the order.
  std::vector<int64_t> greater(T + 1, 0);
  for (int64_t l = T - 1; l >= 0; --l) greater[l] = greater[l + 1] + count[l + 1];
  p.bs.assign(greater.begin(), greater.begin() + T);
  p.off.assign(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) p.off[t + 1] = p.off[t] + p.bs[t];
  p.perm.assign(p.B, 0);
  for (int64_t b = 0; b < p.B; ++b) p.perm[greater[L[b]]++] = b;
  p.N = p.off[T];
  return p;
}

// dst (N, D) packed <- src (T, B, D) padded, valid rows only.
template <typename scalar_t>
void gather_packed(const Plan& p, const Tensor& src, scalar_t* dst) {
  const int64_t D = src.size(2), s0 = src.stride(0), s1 = src.stride(1);
  const scalar_t* base = src.const_data_ptr<scalar_t>();
  at::parallel_for(0, p.T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < p.bs[t]; ++i)
        std::copy_n(base + t * s0 + p.perm[i] * s1, D, dst + (p.off[t] + i) * D);
  });
}

// dst (T, B, D) contiguous <- src (N, D) packed (if given), and zeros at padded steps.
template <typename scalar_t>
void scatter_padded(const Plan& p, const scalar_t* src, Tensor& dst) {
  const int64_t D = dst.size(2), B = p.B;
  scalar_t* base = dst.data_ptr<scalar_t>();
  at::parallel_for(0, p.T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (src != nullptr)
        for (int64_t i = 0; i < p.bs[t]; ++i)
          std::copy_n(src + (p.off[t] + i) * D, D, base + (t * B + p.perm[i]) * D);
      for (int64_t i = p.bs[t]; i < B; ++i)
        std::fill_n(base + (t * B + p.perm[i]) * D, D, scalar_t(0));
    }
  });
}

// Rows of a (B, D) state tensor into / out of length order.
Tensor to_sorted(const Plan& p, const Tensor& x) {
  return x.index_select(0, at::tensor(p.perm, x.options().dtype(at::kLong)));
}
Tensor from_sorted(const Plan& p, const Tensor& x) {
  Tensor out = at::empty_like(x);
  out.index_copy_(0, at::tensor(p.perm, x.options().dtype(at::kLong)), x);
  return out;
}

// Steps in processing order: forward 0..T-1, reverse T-1..0.
template <typename F>
void for_each_step(const Plan& p, bool reverse, bool backward_pass, F&& f) {
  // The backward pass visits steps in the opposite order to the forward pass.
  const bool descending = reverse != backward_pass;
  for (int64_t k = 0; k < p.T; ++k) {
    const int64_t t = descending ? p.T - 1 - k : k;
    if (p.bs[t] > 0) f(t, p.bs[t]);
  }
}

int64_t grain_rows(int64_t H) { return std::max<int64_t>(1, 2048 / std::max<int64_t>(H, 1)); }

// ------------------------------------------------------------------ forward
template <typename scalar_t, Cell K>
std::vector<Tensor> forward_impl(const Plan& p, const RnnSizes& s, const Tensor& input,
                                 const Tensor& h0, const c10::optional<Tensor>& c0,
                                 const Tensor& w_ih, const Tensor& w_hh,
                                 const c10::optional<Tensor>& b_ih,
                                 const c10::optional<Tensor>& b_hh, bool reverse) {
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S = num_states(K);
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, N = p.N;
  const auto opts = input.options();

  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  // Input projection for every valid token.
  const auto proj = input_projection(xp, w_ih, b_ih, b_hh, K, H);
  const Tensor &gx = proj.first, &b_hn = proj.second;

  Tensor h = to_sorted(p, h0).contiguous();
  Tensor c = K == Cell::LSTM ? to_sorted(p, *c0).contiguous() : Tensor();
  Tensor gh = at::empty({B, G * H}, opts);
  // The pointwise kernel writes each valid step straight into the padded output.
  Tensor output = at::empty({T, B, H}, opts);
  // Workspaces hold the valid tokens only, packed: (N, GS*H) and (N, S*H).
  Tensor gates = at::empty({N, GS * H}, opts);
  Tensor states = at::empty({N, S * H}, opts);
  const Tensor w_hh_t = w_hh.t();

  scalar_t* hp = h.data_ptr<scalar_t>();
  scalar_t* cp = K == Cell::LSTM ? c.data_ptr<scalar_t>() : nullptr;
  const scalar_t* gxp = gx.const_data_ptr<scalar_t>();
  const scalar_t* ghp = gh.const_data_ptr<scalar_t>();
  const scalar_t* bhn = b_hn.defined() ? b_hn.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.data_ptr<scalar_t>();
  scalar_t* wg = gates.data_ptr<scalar_t>();
  scalar_t* ws = states.data_ptr<scalar_t>();

  for_each_step(p, reverse, /*backward_pass=*/false, [&](int64_t t, int64_t n) {
    Tensor gh_n = gh.narrow(0, 0, n);
    at::mm_out(gh_n, h.narrow(0, 0, n), w_hh_t);
    const int64_t o = p.off[t];
    const FwdStep<scalar_t> step{gxp + o * G * H, ghp, bhn, hp, cp, out + t * B * H,
                                 p.perm.data(), H, wg + o * GS * H, ws + o * S * H, H};
    at::parallel_for(0, n, grain_rows(H), [&](int64_t r0, int64_t r1) {
      if (use_avx2()) avx2::forward_rows<scalar_t, K>(step, r0, r1);
      else base::forward_rows<scalar_t, K>(step, r0, r1);
    });
  });

  scatter_padded<scalar_t>(p, static_cast<const scalar_t*>(nullptr), output);
  Tensor h_n = from_sorted(p, h);
  Tensor c_n = K == Cell::LSTM ? from_sorted(p, c) : at::empty({0}, opts);
  return {output, h_n, c_n, gates, states};
}

// ----------------------------------------------------------------- backward
template <typename scalar_t, Cell K>
std::vector<Tensor> backward_impl(const Plan& p, const RnnSizes& s, const Tensor& grad_output,
                                  const Tensor& grad_h_n, const Tensor& grad_c_n,
                                  const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                  const Tensor& gates, const Tensor& states, bool reverse) {
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S = num_states(K);
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, N = p.N;
  const auto opts = input.options();

  Tensor dh = to_sorted(p, grad_h_n).contiguous();
  Tensor dc = K == Cell::LSTM ? to_sorted(p, grad_c_n).contiguous() : Tensor();
  // Gradients w.r.t. the pre-activations, input side and hidden side. They
  // differ only for GRU's n gate (the hidden side is scaled by r).
  Tensor dgx = at::empty({N, G * H}, opts);
  Tensor dgh = K == Cell::GRU ? at::empty({N, G * H}, opts) : dgx;

  scalar_t* dhp = dh.data_ptr<scalar_t>();
  scalar_t* dcp = K == Cell::LSTM ? dc.data_ptr<scalar_t>() : nullptr;
  const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
  const int64_t dy_s0 = grad_output.stride(0), dy_s1 = grad_output.stride(1);
  const scalar_t* wg = gates.const_data_ptr<scalar_t>();
  const scalar_t* ws = states.const_data_ptr<scalar_t>();
  scalar_t* dgxp = dgx.data_ptr<scalar_t>();
  scalar_t* dghp = dgh.data_ptr<scalar_t>();

  for_each_step(p, reverse, /*backward_pass=*/true, [&](int64_t t, int64_t n) {
    const int64_t o = p.off[t];
    const BwdStep<scalar_t> step{wg + o * GS * H, ws + o * S * H, dy + t * dy_s0, p.perm.data(),
                                 dy_s1, dhp, dcp, dgxp + o * G * H, dghp + o * G * H, H};
    at::parallel_for(0, n, grain_rows(H), [&](int64_t r0, int64_t r1) {
      if (use_avx2()) avx2::backward_rows<scalar_t, K>(step, r0, r1);
      else base::backward_rows<scalar_t, K>(step, r0, r1);
    });
    // Gradient reaching the previous hidden state through W_hh.
    Tensor dh_n = dh.narrow(0, 0, n);
    const Tensor dg_t = dgh.narrow(0, p.off[t], n);
    if (K == Cell::GRU) {
      dh_n.addmm_(dg_t, w_hh);
    } else {
      at::mm_out(dh_n, dg_t, w_hh);
    }
  });

  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  const Tensor h_prev = states.narrow(1, 0, H);
  Tensor grad_w_ih = at::mm(dgx.t(), xp);
  Tensor grad_w_hh = at::mm(dgh.t(), h_prev);
  Tensor grad_b_ih = dgx.sum(0);
  Tensor grad_b_hh = K == Cell::GRU ? dgh.sum(0) : grad_b_ih.clone();
  Tensor grad_input = at::empty({T, B, I}, opts);
  Tensor dxp = at::mm(dgx, w_ih);
  scatter_padded<scalar_t>(p, dxp.const_data_ptr<scalar_t>(), grad_input);
  Tensor grad_h0 = from_sorted(p, dh);
  Tensor grad_c0 = K == Cell::LSTM ? from_sorted(p, dc) : at::empty({0}, opts);
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}


// ------------------------------------------------- LSTM with a projection
// nn.LSTM's proj_size: the cell computes r = o * tanh(c) (H features) and the
// state is h = w_hr r (P features), so W_hh is (4H, P). Same plan as above;
// per step the pointwise kernel writes r into a scratch block, one GEMM
// projects it into h, and h goes to the padded output. Workspace rows:
// gates (4H) as without projection; states [r (H) | c_prev (H) | h_prev (P)].

template <typename scalar_t>
std::vector<Tensor> forward_proj(const Plan& p, const ProjSizes& s, const Tensor& input,
                                 const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                 const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                 const c10::optional<Tensor>& b_hh, const Tensor& w_hr,
                                 bool reverse) {
  constexpr Cell K = Cell::LSTM;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P, N = p.N;
  const auto opts = input.options();
  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  const Tensor gx = input_projection(xp, w_ih, b_ih, b_hh, K, H).first;

  Tensor h = to_sorted(p, h0).contiguous();   // (B, P)
  Tensor c = to_sorted(p, c0).contiguous();   // (B, H)
  Tensor gh = at::empty({B, 4 * H}, opts);
  Tensor r = at::empty({B, H}, opts);         // o * tanh(c) of this step's rows
  Tensor y_scratch = at::empty({B, H}, opts);  // the kernel's padded write, unused
  Tensor st_scratch = at::empty({B, 2 * H}, opts);
  Tensor output = at::zeros({T, B, P}, opts);
  Tensor gates = at::empty({N, 4 * H}, opts);
  Tensor states = at::empty({N, 2 * H + P}, opts);
  const Tensor w_hh_t = w_hh.t(), w_hr_t = w_hr.t();
  scalar_t* out = output.data_ptr<scalar_t>();

  for_each_step(p, reverse, /*backward_pass=*/false, [&](int64_t t, int64_t n) {
    const int64_t o = p.off[t];
    Tensor h_n = h.narrow(0, 0, n), r_n = r.narrow(0, 0, n);
    Tensor gh_n = gh.narrow(0, 0, n);
    at::mm_out(gh_n, h_n, w_hh_t);
    Tensor st = states.narrow(0, o, n);
    st.narrow(1, 2 * H, P).copy_(h_n);
    const FwdStep<scalar_t> step{gx.const_data_ptr<scalar_t>() + o * 4 * H,
                                 gh.const_data_ptr<scalar_t>(), nullptr, r.data_ptr<scalar_t>(),
                                 c.data_ptr<scalar_t>(), y_scratch.data_ptr<scalar_t>(),
                                 p.perm.data(), H, gates.data_ptr<scalar_t>() + o * 4 * H,
                                 st_scratch.data_ptr<scalar_t>(), H};
    at::parallel_for(0, n, grain_rows(H), [&](int64_t r0, int64_t r1) {
      if (use_avx2()) avx2::forward_rows<scalar_t, K>(step, r0, r1);
      else base::forward_rows<scalar_t, K>(step, r0, r1);
    });
    st.narrow(1, 0, H).copy_(r_n);
    st.narrow(1, H, H).copy_(st_scratch.narrow(0, 0, n).narrow(1, H, H));
    at::mm_out(h_n, r_n, w_hr_t);
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i)
      std::copy_n(hp + i * P, P, out + (t * B + p.perm[i]) * P);
  });
  return {output, from_sorted(p, h), from_sorted(p, c), gates, states};
}

template <typename scalar_t>
std::vector<Tensor> backward_proj(const Plan& p, const ProjSizes& s, const Tensor& grad_output,
                                  const Tensor& grad_h_n, const Tensor& grad_c_n,
                                  const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                  const Tensor& w_hr, const Tensor& gates, const Tensor& states,
                                  bool reverse) {
  constexpr Cell K = Cell::LSTM;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P, N = p.N;
  const auto opts = input.options();
  VK_CHECK_SHAPE(gates, N, 4 * H);  // N: the valid tokens
  VK_CHECK_SHAPE(states, N, 2 * H + P);
  Tensor dh = to_sorted(p, grad_h_n).contiguous();  // (B, P): d h' from later steps
  Tensor dc = to_sorted(p, grad_c_n).contiguous();
  Tensor dh_all = at::empty({N, P}, opts);          // d h' in total, per valid token
  Tensor dr = at::empty({B, H}, opts);
  Tensor zeros = at::zeros({B, H}, opts);           // grad_output already folded into dh_all
  Tensor st_scratch = at::empty({B, 2 * H}, opts);
  Tensor dgx = at::empty({N, 4 * H}, opts);
  const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
  const int64_t dy_s0 = grad_output.stride(0), dy_s1 = grad_output.stride(1);

  for_each_step(p, reverse, /*backward_pass=*/true, [&](int64_t t, int64_t n) {
    const int64_t o = p.off[t];
    scalar_t* dht = dh_all.data_ptr<scalar_t>() + o * P;
    const scalar_t* dhp = dh.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* g = dy + t * dy_s0 + p.perm[i] * dy_s1;
      for (int64_t j = 0; j < P; ++j) dht[i * P + j] = dhp[i * P + j] + g[j];
    }
    Tensor dr_n = dr.narrow(0, 0, n);
    at::mm_out(dr_n, dh_all.narrow(0, o, n), w_hr);
    st_scratch.narrow(0, 0, n).copy_(states.narrow(0, o, n).narrow(1, 0, 2 * H));
    const BwdStep<scalar_t> step{gates.const_data_ptr<scalar_t>() + o * 4 * H,
                                 st_scratch.const_data_ptr<scalar_t>(),
                                 zeros.const_data_ptr<scalar_t>(), p.perm.data(), H,
                                 dr.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                                 dgx.data_ptr<scalar_t>() + o * 4 * H, nullptr, H};
    at::parallel_for(0, n, grain_rows(H), [&](int64_t r0, int64_t r1) {
      if (use_avx2()) avx2::backward_rows<scalar_t, K>(step, r0, r1);
      else base::backward_rows<scalar_t, K>(step, r0, r1);
    });
    Tensor dh_n = dh.narrow(0, 0, n);
    at::mm_out(dh_n, dgx.narrow(0, o, n), w_hh);
  });

  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  Tensor grad_w_ih = at::mm(dgx.t(), xp);
  Tensor grad_w_hh = at::mm(dgx.t(), states.narrow(1, 2 * H, P));
  Tensor grad_w_hr = at::mm(dh_all.t(), states.narrow(1, 0, H));
  Tensor grad_b = dgx.sum(0);
  Tensor grad_input = at::empty({T, B, I}, opts);
  Tensor dxp = at::mm(dgx, w_ih);
  scatter_padded<scalar_t>(p, dxp.const_data_ptr<scalar_t>(), grad_input);
  return {grad_input, from_sorted(p, dh), from_sorted(p, dc), grad_w_ih, grad_w_hh, grad_b,
          grad_b.clone(), grad_w_hr};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_forward_cpu(
    const Tensor& input, const Tensor& lengths, const Tensor& h0,
    const c10::optional<Tensor>& c0, const Tensor& w_ih, const Tensor& w_hh,
    const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh,
    c10::string_view cell, bool reverse, const c10::optional<Tensor>& w_hr) {
  if (w_hr.has_value()) {
    const ProjSizes s = check_proj_forward_args(input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                *w_hr, std::string(cell));
    const Plan p = make_plan(lengths, s.T);
    const Tensor x = input.stride(2) == 1 ? input : input.contiguous();
    std::vector<Tensor> out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rnn_forward",
                                    [&] {
      out = forward_proj<scalar_t>(p, s, x, h0, *c0, w_ih.contiguous(), w_hh.contiguous(), b_ih,
                                   b_hh, w_hr->contiguous(), reverse);
    });
    return {out[0], out[1], out[2], out[3], out[4]};
  }
  const RnnSizes s = check_rnn_forward_args(input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                            std::string(cell));
  const Plan p = make_plan(lengths, s.T);
  const Tensor x = input.stride(2) == 1 ? input : input.contiguous();
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rnn_forward",
                                  [&] {
    out = dispatch_cell(s.cell, [&](auto k) {
      return forward_impl<scalar_t, decltype(k)::value>(p, s, x, h0, c0, w_ih.contiguous(),
                                                        w_hh.contiguous(), b_ih, b_hh, reverse);
    });
  });
  return {out[0], out[1], out[2], out[3], out[4]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward_cpu(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, const Tensor& lengths, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& gates, const Tensor& states, c10::string_view cell_name, bool reverse,
    const c10::optional<Tensor>& w_hr) {
  if (w_hr.has_value()) {
    const ProjSizes s = check_proj_backward_args(grad_output, grad_h_n, grad_c_n, input, lengths,
                                                 w_ih, w_hh, *w_hr, gates, states,
                                                 std::string(cell_name));
    const Plan p = make_plan(lengths, s.T);
    const Tensor x = input.stride(2) == 1 ? input : input.contiguous();
    std::vector<Tensor> out;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rnn_backward",
                                    [&] {
      const auto dt = input.scalar_type();
      out = backward_proj<scalar_t>(p, s, grad_output.to(dt).contiguous(), grad_h_n.to(dt),
                                    grad_c_n.to(dt), x, w_ih.contiguous(), w_hh.contiguous(),
                                    w_hr->contiguous(), gates.contiguous(), states.contiguous(),
                                    reverse);
    });
    return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
  }
  const RnnSizes s = check_rnn_backward_args(grad_output, grad_h_n, grad_c_n, input, lengths, w_ih,
                                             w_hh, gates, states, std::string(cell_name));
  const int64_t T = s.T;
  const Plan p = make_plan(lengths, T);
  VK_CHECK_SHAPE(gates, p.N, s.GS * s.H);  // N: the valid tokens
  VK_CHECK_SHAPE(states, p.N, s.S * s.H);
  const Tensor go = grad_output.stride(2) == 1 ? grad_output : grad_output.contiguous();
  const Tensor x = input.stride(2) == 1 ? input : input.contiguous();
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rnn_backward",
                                  [&] {
    out = dispatch_cell(s.cell, [&](auto k) {
      return backward_impl<scalar_t, decltype(k)::value>(
          p, s, go.to(input.scalar_type()), grad_h_n.to(input.scalar_type()),
          grad_c_n.to(input.scalar_type()), x, w_ih.contiguous(), w_hh.contiguous(), gates,
          states, reverse);
    });
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], at::empty({0}, input.options())};
}

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen_kernels, CPU, m) {
  m.impl("rnn_forward", &varlen::rnn_forward_cpu);
  m.impl("rnn_backward", &varlen::rnn_backward_cpu);
}
