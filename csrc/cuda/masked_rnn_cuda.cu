// CUDA kernels for rnn_forward / rnn_backward.
//
// Lengths stay on the GPU: nothing here reads them on the host, so forward and
// backward never synchronize and can be captured in a CUDA graph. The tokens
// are in the packed layout of token_plan.h (the CPU kernels' layout):
//  - the valid input tokens are gathered (padding never read, so NaN there
//    cannot leak) and projected by one GEMM over tokens (tokens_times);
//  - the recurrence is one persistent kernel (rnn_persistent.cu; with a
//    projection rnn_persistent_proj.cu) where it fits, else per step one GEMM of the B hidden rows with W_hh plus one fused
//    kernel that applies the cell (cell_math.h) to the rows with t < lengths[b]
//    and leaves the others untouched (frozen state, zero output);
//  - the backward mirrors this; the weight and input gradients are one GEMM
//    each over the tokens (tokens_outer, tokens_times), the input's scattered
//    back to the padded layout with exact zeros at padded steps.
// Recurrent state, the backward's dh/dc carry, the biases and the gate math
// are in the math type (float for half and bfloat16); GEMMs accumulate in
// float. The biases are added in the step kernel, in the math type, not
// folded into the storage-type projection.
// Workspaces: gates (T*B, GS*H) and states (T*B, S*H), packed, rows past the
// valid tokens zero (the projection LSTM's too).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <string>

#include "../cell_math.h"
#include "../rnn_args.h"
#include "../rnn_bidirectional.h"
#include "launch.h"
#include "rnn_point.cuh"
#include "rnn_persistent.h"
#include "settings.h"
#include "token_plan.h"

// The per-step loops' direct cuBLAS calls (StepGemms): in the GPU build linked
// with torch's own cuBLAS (setup.py), with torch >= 2.10 (its settings below).
#if !defined(VK_EMULATE_CUDA) && defined(VK_DIRECT_CUBLAS)
#include <torch/version.h>
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
#define VK_STEP_CUBLAS 1
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/cuda/tunable/Tunable.h>
#include <cublas_v2.h>
#endif
#endif
#include <type_traits>

namespace varlen {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

// Where the step kernels find a sequence's token of the step: sequence b runs
// while t < lengths[b], and its token is row row(b) of the token matrices (gx,
// gates, states; the backward's dgx, dgh).
struct StepRows {
  const int64_t* lengths;  // (B,)
  const int64_t* rank;     // (B,) position of sequence b in the length order
  const int64_t* row0;     // this step's first token row, on the device
  __device__ __forceinline__ int64_t row(int64_t b) const { return *row0 + rank[b]; }
};

StepRows step_rows(const TokenPlan& plan, int64_t t) {
  return {plan.lengths.const_data_ptr<int64_t>(), plan.rank.const_data_ptr<int64_t>(),
          plan.off.const_data_ptr<int64_t>() + t};
}

template <typename scalar_t, typename acc_t>
struct FwdArgs {
  StepRows rows;
  const scalar_t* gx;      // token rows of the input projection x W_ih^T
  const scalar_t* gh;      // (B, G*H) W_hh h_prev
  const acc_t* bias;       // (G*H,) b_ih + b_hh (GRU's n gate: b_in only) or nullptr
  const acc_t* b_hn;       // (H,) GRU's b_hn or nullptr
  acc_t* h;                // (B, H) state, math type
  acc_t* c;                // (B, H) LSTM cell state, math type
  scalar_t* h_out;         // (B, H) h in storage type, the next GEMM's operand
  scalar_t* y;             // (B, H) this step's output rows
  scalar_t* gates;         // token rows of the workspaces
  scalar_t* states;
  int64_t t, T, B, H;
  int64_t gx_ld;           // gx's row stride
};

template <typename scalar_t, typename acc_t, Cell K>
__device__ void forward_step_one(const FwdArgs<scalar_t, acc_t>& a, int64_t idx) {
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S = num_states(K);
  const int64_t H = a.H;
  const int64_t b = idx / H, j = idx % H;
  const int64_t len = a.rows.lengths[b];
  CUDA_KERNEL_ASSERT(len >= 0 && len <= a.T && "lengths must be in [0, T]");
  if (a.t >= len) {  // padded step: zero output; it has no token row
    a.y[idx] = scalar_t(0);
    return;
  }
  const int64_t row = a.rows.row(b);
  acc_t hid[G];
#pragma unroll
  for (int k = 0; k < G; ++k) hid[k] = acc_t(a.gh[b * G * H + k * H + j]);
  const acc_t h_new = forward_point<scalar_t, acc_t, K>(
      a.gx + row * a.gx_ld + j, a.bias, a.b_hn, j, H, hid, a.h[idx],
      K == Cell::LSTM ? a.c + idx : nullptr, a.gates + row * GS * H + j,
      a.states + row * S * H + j);
  a.h[idx] = h_new;
  a.h_out[idx] = scalar_t(h_new);
  a.y[idx] = scalar_t(h_new);
}

template <typename scalar_t, typename acc_t, Cell K>
__global__ void forward_step_kernel(FwdArgs<scalar_t, acc_t> a) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < a.B * a.H;
       idx += int64_t(gridDim.x) * blockDim.x)
    forward_step_one<scalar_t, acc_t, K>(a, idx);
}

template <typename scalar_t, typename acc_t>
struct BwdArgs {
  StepRows rows;
  const scalar_t* gates;    // token rows of the forward's workspaces
  const scalar_t* states;
  const scalar_t* dy;       // (B, H) gradient w.r.t. this step's output
  acc_t* dh;                // (B, H) in: d h' from later steps; out: direct part of d h_prev
  const scalar_t* dh_prod;  // (B, H) the W_hh product of the step before, still to add to dh
                            // (half/bfloat16: a GEMM in the storage type), or nullptr
  acc_t* dc;                // (B, H) LSTM: d c' in, d c_prev out
  scalar_t* dgx;            // token rows of d pre-activations, input side (zero-initialized)
  scalar_t* dgh;            // hidden side (GRU; aliases dgx otherwise)
  scalar_t* dg_step;        // (B, G*H) this step's hidden side in batch order, zero for the
                            // rows not running (the operand of the W_hh GEMM)
  int64_t t, T, B, H;
  int64_t dgx_ld, dgh_ld;   // row strides of dgx and dgh
};

template <typename scalar_t, typename acc_t, Cell K>
__device__ void backward_step_one(const BwdArgs<scalar_t, acc_t>& a, int64_t idx) {
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S = num_states(K);
  const int64_t H = a.H;
  const int64_t b = idx / H, j = idx % H;
  scalar_t* step = a.dg_step + b * G * H + j;
  // d h' (the product added as at::add_ would: the same value)
  const acc_t dh = a.dh_prod != nullptr ? a.dh[idx] + acc_t(a.dh_prod[idx]) : a.dh[idx];
  if (a.t >= a.rows.lengths[b]) {  // padded step: no gradient, the carried dh goes on
#pragma unroll
    for (int k = 0; k < G; ++k) step[k * H] = scalar_t(0);
    if (a.dh_prod != nullptr) a.dh[idx] = dh;
    return;
  }
  const int64_t row = a.rows.row(b);
  scalar_t* gh = a.dgh + row * a.dgh_ld + j;
  const acc_t dht = dh + acc_t(a.dy[idx]);
  const acc_t direct = backward_point<scalar_t, acc_t, K>(
      a.gates + row * GS * H + j, a.states + row * S * H + j, H, dht,
      K == Cell::LSTM ? a.dc + idx : nullptr, a.dgx + row * a.dgx_ld + j, gh);
  a.dh[idx] = direct;  // the W_hh part is added by the GEMM that follows (half/bfloat16:
                       // by the next step's kernel, or after the last step)
#pragma unroll
  for (int k = 0; k < G; ++k) step[k * H] = gh[k * H];
}

template <typename scalar_t, typename acc_t, Cell K>
__global__ void backward_step_kernel(BwdArgs<scalar_t, acc_t> a) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < a.B * a.H;
       idx += int64_t(gridDim.x) * blockDim.x)
    backward_step_one<scalar_t, acc_t, K>(a, idx);
}

int64_t step_order(int64_t k, int64_t T, bool descending) { return descending ? T - 1 - k : k; }

// The per-step loops' GEMMs, c (M, N) = a (M, K) op(w), or c += that
// (accumulate); a, w and c contiguous. op(w) = w^T for w of shape (N, K)
// (w_is_nk), else w (K, N). One StepGemms a loop, made where the loop runs (its
// stream). On a GPU, by default ("blas"), one cuBLAS call a GEMM
// (cublasSgemm / cublasGemmEx / cublasDgemm) on torch's handle for the
// current stream, as at::mm makes it with torch's default settings (float:
// the handle's math mode, TF32 where torch allows it for CUDA matmuls;
// half/bfloat16: float accumulation, reduced-precision split-K reductions
// allowed), without the ATen op around it: a loop makes two to four of these
// a step, and at B = 256, H = 1024 (bfloat16 LSTM, T = 512) the per-step path
// took 26.0 ms of wall time for 18.7 ms of kernels on an H200, ~2600
// launches. The handle is fetched once a loop: nothing else uses it on the
// loop's thread meanwhile (a loop launches our kernels and these GEMMs, all on
// one stream; an ATen op on another stream inside a loop would need the handle
// fetched again). Where torch's settings differ from those defaults
// (reduced-precision reductions disallowed, half accumulated in half,
// cuBLASLt as the preferred BLAS backend, TunableOp, an SM carveout), with
// VARLEN_KERNELS_STEP_GEMM=aten (read once a loop), in a build not linked
// with torch's cuBLAS or with torch before 2.10: at::mm_out / addmm_. Under
// the emulation, always ATen's CPU GEMM.
enum class StepGemm { Blas, Aten };

StepGemm step_gemm_setting() {
  return choice_setting<StepGemm>("VARLEN_KERNELS_STEP_GEMM",
                                  {{"blas", StepGemm::Blas}, {"aten", StepGemm::Aten}});
}

template <typename scalar_t>
class StepGemms {
 public:
  StepGemms() {
    const bool blas = step_gemm_setting() == StepGemm::Blas;
#ifdef VK_STEP_CUBLAS
    if (blas && torch_defaults()) {
      handle_ = at::cuda::getCurrentCUDABlasHandle();  // float: in TF32 math where allowed
      // (torch's half and bfloat16 GEMMs run in the default math mode and
      // leave the handle in it)
      if constexpr (kHalf || kBf16)
        TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle_, CUBLAS_DEFAULT_MATH));
    }
#else
    (void)blas;
#endif
  }

  void operator()(Tensor& c, const Tensor& a, const Tensor& w, bool w_is_nk,
                  bool accumulate = false) const {
    const int64_t M = a.size(0), K = a.size(1), N = c.size(1);
    TORCH_INTERNAL_ASSERT(a.is_contiguous() && w.is_contiguous() && c.is_contiguous() &&
                          c.size(0) == M && w.dim() == 2 && w.size(0) == (w_is_nk ? N : K) &&
                          w.size(1) == (w_is_nk ? K : N));
#ifdef VK_STEP_CUBLAS
    // (K = 0, an empty sum, and empty results are left to ATen: cuBLAS wants
    // leading dimensions of at least 1)
    if (handle_ != nullptr && M > 0 && N > 0 && K > 0) {
      cublas(w_is_nk, M, N, K, a.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
             accumulate, c.data_ptr<scalar_t>());
      return;
    }
#endif
    const Tensor op = w_is_nk ? w.t() : w;
    if (accumulate) c.addmm_(a, op);
    else at::mm_out(c, a, op);
  }

 private:
  static constexpr bool kHalf = std::is_same_v<scalar_t, at::Half>;
  static constexpr bool kBf16 = std::is_same_v<scalar_t, at::BFloat16>;
#ifdef VK_STEP_CUBLAS
  cublasHandle_t handle_ = nullptr;  // null: ATen makes the GEMMs

  // Whether torch's settings are those under which at::mm makes the calls below
  // (not with TunableOp, an SM carveout, cuBLASLt preferred, ...).
  static bool torch_defaults() {
    auto& ctx = at::globalContext();
    const at::BlasBackend backend = ctx.blasPreferredBackend();
    if (backend == at::BlasBackend::Cublaslt || backend == at::BlasBackend::Ck) return false;
    if (at::cuda::tunable::getTuningContext()->IsTunableOpEnabled()) return false;
    if (ctx._SMCarveout_EXPERIMENTAL().has_value()) return false;
    if constexpr (kHalf || kBf16) {
      const auto option = kHalf ? ctx.allowFP16ReductionCuBLAS() : ctx.allowBF16ReductionCuBLAS();
      if (option != at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK) return false;
      if (kHalf && ctx.allowFP16AccumulationCuBLAS()) return false;
    }
    return true;
  }

  // c^T = op(w)^T a^T in column-major terms (row-major (M, N) is column-major
  // (N, M)).
  void cublas(bool w_is_nk, int64_t M, int64_t N, int64_t K, const scalar_t* a,
              const scalar_t* w, bool accumulate, scalar_t* c) const {
    TORCH_CHECK(M <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX,
                "rnn per-step GEMM: sizes (", M, ", ", N, ", ", K, ") past cuBLAS's int range");
    const cublasOperation_t op_w = w_is_nk ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int n = int(N), m = int(M), k = int(K), ldw = int(w_is_nk ? K : N);
    if constexpr (kHalf || kBf16) {
      const cudaDataType_t type = kHalf ? CUDA_R_16F : CUDA_R_16BF;
      const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
      TORCH_CUDABLAS_CHECK(cublasGemmEx(handle_, op_w, CUBLAS_OP_N, n, m, k, &one, w, type, ldw,
                                        a, type, k, &beta, c, type, n, CUBLAS_COMPUTE_32F,
                                        CUBLAS_GEMM_DEFAULT_TENSOR_OP));
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
      TORCH_CUDABLAS_CHECK(
          cublasSgemm(handle_, op_w, CUBLAS_OP_N, n, m, k, &one, w, ldw, a, k, &beta, c, n));
    } else {
      static_assert(std::is_same_v<scalar_t, double>, "per-step GEMM: an unexpected dtype");
      const double one = 1.0, beta = accumulate ? 1.0 : 0.0;
      TORCH_CUDABLAS_CHECK(
          cublasDgemm(handle_, op_w, CUBLAS_OP_N, n, m, k, &one, w, ldw, a, k, &beta, c, n));
    }
  }
#endif
};

// The length plan of a call and its input in the packed layout (rows past
// the valid tokens zero): shared by both directions of a layer.
struct Tokens {
  TokenPlan plan;
  Tensor x;  // (T*B, I)
};

Tokens tokens_of(const Tensor& input, const Tensor& lengths, int64_t T) {
  Tokens k;
  k.plan = make_token_plan(lengths, T, input.device());
  k.x = pack_tokens(input, k.plan);
  return k;
}

// ------------------------------------------------- LSTM with a projection
// nn.LSTM's proj_size: persistent where it fits (rnn_persistent_proj.cu), else
// per step one GEMM h_prev W_hh^T, a step kernel that
// runs the cell on the running rows (r = o * tanh(c)), one GEMM r W_hr^T and
// a kernel that commits it (state, output) for the running rows. Workspaces,
// packed: gates (T*B, 4H); states (T*B, 2H + P) = [r | c_prev | h_prev].
template <typename scalar_t, typename acc_t>
struct ProjFwdArgs {
  StepRows rows;
  const scalar_t* gx;      // token rows (4H) of x W_ih^T, row stride gx_ld
  const scalar_t* gh;      // (B, 4H) h_prev W_hh^T
  const acc_t* bias;       // (4H,) folded biases or nullptr
  const scalar_t* h_out;   // (B, P) h_prev in the storage type
  acc_t* c;                // (B, H) cell state
  scalar_t* r;             // (B, H) o * tanh(c): the projection's operand, zero where not running
  scalar_t* gates;         // token rows of the workspaces
  scalar_t* states;
  int64_t t, T, B, H, P, gx_ld;
};

template <typename scalar_t, typename acc_t>
__global__ void proj_forward_step_kernel(ProjFwdArgs<scalar_t, acc_t> a) {
  const int64_t H = a.H, P = a.P, SW = 2 * H + P;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < a.B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H, len = a.rows.lengths[b];
    CUDA_KERNEL_ASSERT(len >= 0 && len <= a.T && "lengths must be in [0, T]");
    if (a.t >= len) {
      a.r[idx] = scalar_t(0);
      continue;
    }
    const int64_t row = a.rows.row(b);
    acc_t hid[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) hid[k] = acc_t(a.gh[b * 4 * H + k * H + j]);
    scalar_t* st = a.states + row * SW + j;
    // forward_point writes [h_prev, c_prev] of a plain LSTM; here the first
    // block is r and h_prev (P wide) comes last.
    const acc_t r = forward_point<scalar_t, acc_t, Cell::LSTM>(
        a.gx + row * a.gx_ld + j, a.bias, nullptr, j, H, hid, acc_t(0), a.c + idx,
        a.gates + row * 4 * H + j, st);
    st[0] = scalar_t(r);
    a.r[idx] = scalar_t(r);
    if (j < P) a.states[row * SW + 2 * H + j] = a.h_out[b * P + j];  // P < H (nn.LSTM)
  }
}

// h = r W_hr^T (hp) for the running rows: state and output; zero output else.
template <typename scalar_t, typename acc_t>
__global__ void proj_commit_kernel(const int64_t* lengths, const scalar_t* hp, acc_t* h,
                                   scalar_t* h_out, scalar_t* y, int64_t t, int64_t B,
                                   int64_t P) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < B * P;
       idx += int64_t(gridDim.x) * blockDim.x) {
    if (t < lengths[idx / P]) {
      h[idx] = acc_t(hp[idx]);
      h_out[idx] = hp[idx];
      y[idx] = hp[idx];
    } else {
      y[idx] = scalar_t(0);
    }
  }
}

// The per-step forward recurrence with a projection, on the direction's input
// projection gx (T*B, 4H, packed, rows of any stride) and folded biases.
RnnForwardResult proj_forward_per_step(const ProjSizes& s, const TokenPlan& plan,
                                       const Tensor& gx_rows, const Tensor& bias, const Tensor& h0,
                                       const Tensor& c0, const Tensor& w_hh, const Tensor& w_hr,
                                       bool reverse) {
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  const Tensor gx = gx_rows.stride(1) == 1 ? gx_rows : gx_rows.contiguous();
  const auto opts = gx.options();
  const auto acc_type = at::toOpMathType(gx.scalar_type());
  Tensor h = at::empty({B, P}, opts.dtype(acc_type)).copy_(h0);
  Tensor h_out = at::empty({B, P}, opts).copy_(h0);
  Tensor c = at::empty({B, H}, opts.dtype(acc_type)).copy_(c0);
  Tensor r = at::empty({B, H}, opts), gh = at::empty({B, 4 * H}, opts);
  Tensor hp = at::empty({B, P}, opts);
  Tensor output = at::empty({T, B, P}, opts);
  const int64_t L = plan.steps();
  output.narrow(0, L, T - L).zero_();  // steps no sequence reaches
  Tensor gates = at::zeros({T * B, 4 * H}, opts);
  Tensor states = at::zeros({T * B, 2 * H + P}, opts);
  const Tensor w_hh_c = w_hh.contiguous(), w_hr_c = w_hr.contiguous();
  const auto stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gx.scalar_type(),
                                  "rnn_forward_proj_per_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StepGemms<scalar_t> gemm;
    for (int64_t step = 0; step < L && B > 0; ++step) {
      const int64_t t = step_order(step, L, reverse);
      gemm(gh, h_out, w_hh_c, /*w_is_nk=*/true);
      ProjFwdArgs<scalar_t, acc_t> a{step_rows(plan, t),
                                     gx.const_data_ptr<scalar_t>(), gh.const_data_ptr<scalar_t>(),
                                     bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                     h_out.const_data_ptr<scalar_t>(), c.data_ptr<acc_t>(),
                                     r.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                     states.data_ptr<scalar_t>(), t, T, B, H, P,
                                     gx.stride(0)};
      cuda::launch(proj_forward_step_kernel<scalar_t, acc_t>, cuda::grid_for(B * H, kThreads),
                   kThreads, 0, stream, a);
      gemm(hp, r, w_hr_c, /*w_is_nk=*/true);
      cuda::launch(proj_commit_kernel<scalar_t, acc_t>, cuda::grid_for(B * P, kThreads),
                   kThreads, 0, stream, plan.lengths.const_data_ptr<int64_t>(),
                   hp.const_data_ptr<scalar_t>(), h.data_ptr<acc_t>(), h_out.data_ptr<scalar_t>(),
                   output.data_ptr<scalar_t>() + t * B * P, t, B, P);
    }
  });
  return {output, h.to(gx.scalar_type()), c.to(gx.scalar_type()), gates, states};
}

// One direction's recurrence with a projection: persistent where it fits,
// else per step.
RnnForwardResult proj_forward_direction(const ProjSizes& s, const TokenPlan& plan,
                                        const Tensor& gx, const Tensor& bias, const Tensor& h0,
                                        const Tensor& c0, const Tensor& w_hh, const Tensor& w_hr,
                                        bool reverse) {
  if (auto r = rnn_forward_proj_persistent({{gx, h0, c0, w_hh, w_hr, bias, reverse}}, plan))
    return r->front();
  return proj_forward_per_step(s, plan, gx, bias, h0, c0, w_hh, w_hr, reverse);
}

// Arguments checked by check_proj_forward_args.
RnnForwardResult rnn_forward_proj_cuda(const ProjSizes& s, const Tensor& input,
                                       const Tensor& lengths, const Tensor& h0, const Tensor& c0,
                                       const Tensor& w_ih, const Tensor& w_hh,
                                       const c10::optional<Tensor>& b_ih,
                                       const c10::optional<Tensor>& b_hh, const Tensor& w_hr,
                                       bool reverse) {
  const Tokens tok = tokens_of(input, lengths, s.T);
  const Tensor gx = tokens_times(tok.x, w_ih.t(), tok.plan);
  const Tensor bias =
      gate_biases(b_ih, b_hh, Cell::LSTM, s.H, at::toOpMathType(input.scalar_type())).first;
  return proj_forward_direction(s, tok.plan, gx, bias, h0, c0, w_hh, w_hr, reverse);
}

// d h' of step t for the running rows: the carry (plus dh_prod, the W_hh
// product of the step before still to add where it is not nullptr: half and
// bfloat16) plus the output's gradient, to the GEMM operand (batch order, zero
// where not running) and the token's row of dh_tok; the carry restarts at
// zero for them (it has been used).
template <typename scalar_t, typename acc_t>
__global__ void proj_backward_in_kernel(StepRows rows, const scalar_t* dy, acc_t* dh,
                                        const scalar_t* dh_prod, scalar_t* dh_step,
                                        scalar_t* dh_tok, int64_t t, int64_t B, int64_t P) {
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < B * P;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / P, p = idx % P;
    const acc_t d = dh_prod != nullptr ? dh[idx] + acc_t(dh_prod[idx]) : dh[idx];
    if (t < rows.lengths[b]) {
      const scalar_t v = scalar_t(d + acc_t(dy[idx]));
      dh[idx] = acc_t(0);
      dh_step[idx] = v;
      dh_tok[rows.row(b) * P + p] = v;
    } else {
      dh_step[idx] = scalar_t(0);
      if (dh_prod != nullptr) dh[idx] = d;
    }
  }
}

template <typename scalar_t, typename acc_t>
struct ProjBwdArgs {
  StepRows rows;
  const scalar_t* gates;   // token rows of the forward's workspaces
  const scalar_t* states;
  const scalar_t* dr;      // (B, H) d r = d h' W_hr
  acc_t* dc;               // (B, H) d c' in, d c_prev out
  scalar_t* dgx;           // token rows (4H) of the pre-activation gradients, zero-initialized,
                           // row stride dgx_ld
  scalar_t* dg_step;       // (B, 4H) the same in batch order, zero where not running
  int64_t t, T, B, H, P, dgx_ld;
};

template <typename scalar_t, typename acc_t>
__global__ void proj_backward_step_kernel(ProjBwdArgs<scalar_t, acc_t> a) {
  const int64_t H = a.H, SW = 2 * H + a.P;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < a.B * H;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / H, j = idx % H;
    scalar_t* step = a.dg_step + b * 4 * H + j;
    if (a.t >= a.rows.lengths[b]) {
#pragma unroll
      for (int k = 0; k < 4; ++k) step[k * H] = scalar_t(0);
      continue;
    }
    const int64_t row = a.rows.row(b);
    scalar_t* g = a.dgx + row * a.dgx_ld + j;
    backward_point<scalar_t, acc_t, Cell::LSTM>(a.gates + row * 4 * H + j, a.states + row * SW + j,
                                                H, acc_t(a.dr[idx]), a.dc + idx, g, g);
#pragma unroll
    for (int k = 0; k < 4; ++k) step[k * H] = g[k * H];
  }
}

// The per-step backward recurrence with a projection: per step a kernel, two
// GEMMs and a kernel. Fills dgx (T*B, 4H; dgx_into where that is defined, a
// zero block with rows of any stride) and dh_tok (T*B, P), packed, and the
// math-type gradients of h0 (dh) and c0 (dc).
void rnn_backward_proj_per_step(const ProjSizes& s, const TokenPlan& plan, const Tensor& dy,
                                const Tensor& grad_h_n, const Tensor& grad_c_n,
                                const Tensor& w_hh, const Tensor& w_hr, const Tensor& gates,
                                const Tensor& states, bool reverse, const Tensor& dgx_into,
                                Tensor& dgx, Tensor& dh_tok, Tensor& dh, Tensor& dc) {
  const int64_t T = s.T, B = s.B, H = s.H, P = s.P;
  const auto opts = dy.options();
  const auto acc_type = at::toOpMathType(dy.scalar_type());
  dh = at::empty({B, P}, opts.dtype(acc_type)).copy_(grad_h_n);
  dc = at::empty({B, H}, opts.dtype(acc_type)).copy_(grad_c_n);
  Tensor dh_step = at::empty({B, P}, opts), dr = at::empty({B, H}, opts);
  Tensor dg_step = at::empty({B, 4 * H}, opts);
  dh_tok = at::zeros({T * B, P}, opts);  // d h' per token, packed
  dgx = dgx_into.defined() ? dgx_into : at::zeros({T * B, 4 * H}, opts);
  TORCH_INTERNAL_ASSERT(dgx.stride(1) == 1);
  const bool same_type = acc_type == dy.scalar_type();
  // In half/bfloat16 the W_hh GEMM's result, in the storage type, is added to
  // the float carry by the next step's first kernel (after the last, by add_).
  Tensor prod = same_type ? Tensor() : at::empty({B, P}, opts);
  const Tensor w_hh_c = w_hh.contiguous(), w_hr_c = w_hr.contiguous();
  const auto stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(),
                                  "rnn_backward_proj_per_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StepGemms<scalar_t> gemm;
    const int64_t L = plan.steps();
    for (int64_t step = 0; step < L && B > 0; ++step) {
      const int64_t t = step_order(step, L, !reverse);
      cuda::launch(proj_backward_in_kernel<scalar_t, acc_t>, cuda::grid_for(B * P, kThreads),
                   kThreads, 0, stream, step_rows(plan, t),
                   dy.const_data_ptr<scalar_t>() + t * B * P, dh.data_ptr<acc_t>(),
                   step > 0 && !same_type ? prod.const_data_ptr<scalar_t>() : nullptr,
                   dh_step.data_ptr<scalar_t>(), dh_tok.data_ptr<scalar_t>(), t, B, P);
      gemm(dr, dh_step, w_hr_c, /*w_is_nk=*/false);
      ProjBwdArgs<scalar_t, acc_t> a{step_rows(plan, t), gates.const_data_ptr<scalar_t>(),
                                     states.const_data_ptr<scalar_t>(), dr.const_data_ptr<scalar_t>(),
                                     dc.data_ptr<acc_t>(), dgx.data_ptr<scalar_t>(),
                                     dg_step.data_ptr<scalar_t>(), t, T, B, H, P,
                                     dgx.stride(0)};
      cuda::launch(proj_backward_step_kernel<scalar_t, acc_t>, cuda::grid_for(B * H, kThreads),
                   kThreads, 0, stream, a);
      // Running rows restart from zero; the others carry dh (their dg_step is 0).
      if (same_type) gemm(dh, dg_step, w_hh_c, false, /*accumulate=*/true);
      else gemm(prod, dg_step, w_hh_c, false);
    }
    if (!same_type && L > 0 && B > 0) dh.add_(prod);
  });
}

// One direction's backward recurrence with a projection: persistent where it
// fits, else per step. dgx_into: a zero (T*B, 4H) block with rows of any
// stride for the pre-activation gradients (a column block of both
// directions' one), or undefined for a fresh one. Returns (dgx, dh_tok,
// grad_h0, grad_c0) as rnn_backward_proj_persistent.
ProjPersistentBackwardResult proj_backward_direction(
    const ProjSizes& s, const TokenPlan& plan, const Tensor& dy, const Tensor& grad_h_n,
    const Tensor& grad_c_n, const Tensor& w_hh, const Tensor& w_hr, const Tensor& gates,
    const Tensor& states, bool reverse, const Tensor& dgx_into = {}) {
  if (auto r = rnn_backward_proj_persistent(
          {{dy, grad_h_n, grad_c_n, w_hh, w_hr, gates, states, reverse, dgx_into}}, plan))
    return r->front();
  Tensor dgx, dh_tok, dh, dc;
  rnn_backward_proj_per_step(s, plan, dy, grad_h_n, grad_c_n, w_hh, w_hr, gates, states, reverse,
                             dgx_into, dgx, dh_tok, dh, dc);
  return {dgx, dh_tok, dh, dc};
}

// The gradients that follow from the recurrence's, with a projection: the
// weights' and biases' (GEMMs over the tokens) and (with_input) the input's,
// and h0's / c0's in the storage type. states: contiguous.
RnnBackwardResult proj_backward_gemms(const Tokens& tok, const Tensor& w_ih, const Tensor& states,
                                      const Tensor& dgx, const Tensor& dh_tok, const Tensor& dh,
                                      const Tensor& dc, bool with_input = true) {
  const int64_t H = w_ih.size(0) / 4, P = dh_tok.size(1);
  const auto dtype = tok.x.scalar_type();
  Tensor grad_w_ih = tokens_outer(dgx, tok.x, tok.plan);
  Tensor grad_w_hh = tokens_outer(dgx, states.narrow(1, 2 * H, P), tok.plan);
  Tensor grad_w_hr = tokens_outer(dh_tok, states.narrow(1, 0, H), tok.plan);
  Tensor grad_b = dgx.sum(0);
  Tensor grad_input = with_input
                          ? unpack_tokens(tokens_times(dgx, w_ih, tok.plan), tok.plan)
                          : Tensor();
  return {grad_input, dh.to(dtype), dc.to(dtype), grad_w_ih, grad_w_hh, grad_b, grad_b.clone(),
          grad_w_hr};
}

// Arguments checked by check_proj_backward_args, but for the workspaces' rows.
RnnBackwardResult rnn_backward_proj_cuda(const ProjSizes& s, const Tensor& grad_output,
                                         const Tensor& grad_h_n, const Tensor& grad_c_n,
                                         const Tensor& input, const Tensor& lengths,
                                         const Tensor& w_ih, const Tensor& w_hh,
                                         const Tensor& gates_in, const Tensor& states_in,
                                         const Tensor& w_hr, bool reverse) {
  check_workspace_shapes(gates_in, states_in, s.T, s.B, 4 * s.H, 2 * s.H + s.P);
  const Tokens tok = tokens_of(input, lengths, s.T);
  const Tensor gates = gates_in.contiguous(), states = states_in.contiguous();
  const Tensor dy = grad_output.to(input.scalar_type()).contiguous();
  const auto [dgx, dh_tok, dh, dc] = proj_backward_direction(s, tok.plan, dy, grad_h_n, grad_c_n,
                                                             w_hh, w_hr, gates, states, reverse);
  return proj_backward_gemms(tok, w_ih, states, dgx, dh_tok, dh, dc);
}

// A checked forward direction without projection, with its input projection.
struct Prepared {
  RnnSizes s;
  Tensor gx, bias, b_hn;  // gx (T*B, G*H) packed, rows of any stride; bias, b_hn: gate_biases()
};

// gx: the direction's input projection, or undefined to compute it here.
Prepared prepare_forward(const RnnSizes& s, const Tokens& tok, const DirectionWeights& w,
                         const Tensor& gx = {}) {
  Prepared f;
  f.s = s;
  f.gx = gx.defined() ? gx : tokens_times(tok.x, w.w_ih.t(), tok.plan);
  std::tie(f.bias, f.b_hn) =
      gate_biases(w.b_ih, w.b_hh, s.cell, s.H, at::toOpMathType(tok.x.scalar_type()));
  return f;
}

// The per-step forward recurrence: one GEMM and one step kernel per step.
RnnForwardResult forward_per_step(const Prepared& f, const TokenPlan& plan, const Tensor& h0,
                                  const c10::optional<Tensor>& c0, const Tensor& w_hh,
                                  bool reverse) {
  const RnnSizes& s = f.s;
  const Tensor &gx = f.gx, &bias = f.bias, &b_hn = f.b_hn;
  const int64_t T = s.T, B = s.B, H = s.H, G = s.G;
  const auto opts = gx.options();
  const auto acc_type = at::toOpMathType(gx.scalar_type());
  // Fresh buffers: the recurrence updates them in place.
  Tensor h = at::empty({B, H}, opts.dtype(acc_type)).copy_(h0);
  Tensor h_out = at::empty({B, H}, opts).copy_(h0);
  Tensor c = s.cell == Cell::LSTM ? at::empty({B, H}, opts.dtype(acc_type)).copy_(*c0) : Tensor();
  Tensor gh = at::empty({B, G * H}, opts);
  Tensor output = at::empty({T, B, H}, opts);
  const int64_t L = plan.steps();
  output.narrow(0, L, T - L).zero_();  // steps no sequence reaches
  Tensor gates = at::zeros({T * B, s.GS * H}, opts);  // packed
  Tensor states = at::zeros({T * B, s.S * H}, opts);
  const Tensor w_hh_c = w_hh.contiguous(), gxc = gx.stride(1) == 1 ? gx : gx.contiguous();
  const auto stream = cuda::current_stream();
  const unsigned blocks = cuda::grid_for(B * H, kThreads);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gx.scalar_type(), "rnn_forward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StepGemms<scalar_t> gemm;
    dispatch_cell(s.cell, [&](auto k) {
      constexpr Cell K = decltype(k)::value;
      for (int64_t step = 0; step < L; ++step) {
        const int64_t t = step_order(step, L, reverse);
        gemm(gh, h_out, w_hh_c, /*w_is_nk=*/true);
        FwdArgs<scalar_t, acc_t> a{step_rows(plan, t),
                                   gxc.const_data_ptr<scalar_t>(),
                                   gh.const_data_ptr<scalar_t>(),
                                   bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                   b_hn.defined() ? b_hn.const_data_ptr<acc_t>() : nullptr,
                                   h.data_ptr<acc_t>(),
                                   K == Cell::LSTM ? c.data_ptr<acc_t>() : nullptr,
                                   h_out.data_ptr<scalar_t>(),
                                   output.data_ptr<scalar_t>() + t * B * H,
                                   gates.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(),
                                   t, T, B, H, gxc.stride(0)};
        if (B * H > 0)
          cuda::launch(forward_step_kernel<scalar_t, acc_t, K>, blocks, kThreads, 0, stream, a);
      }
      return 0;
    });
  });
  Tensor h_n = h.to(gx.scalar_type());
  Tensor c_n = s.cell == Cell::LSTM ? c.to(gx.scalar_type()) : at::empty({0}, opts);
  return {output, h_n, c_n, gates, states};
}

PersistentForward persistent_operands(const Prepared& f, const Tensor& h0,
                                      const c10::optional<Tensor>& c0, const Tensor& w_hh,
                                      bool reverse) {
  return {f.gx, h0, c0.has_value() ? *c0 : Tensor(), w_hh, f.bias, f.b_hn, reverse};
}

// One direction: persistent where it fits, else per step.
RnnForwardResult forward_direction(const Prepared& f, const TokenPlan& plan, const Tensor& h0,
                                   const c10::optional<Tensor>& c0, const Tensor& w_hh,
                                   bool reverse) {
  if (auto r = rnn_forward_persistent(f.s.cell, {persistent_operands(f, h0, c0, w_hh, reverse)},
                                      plan))
    return r->front();
  return forward_per_step(f, plan, h0, c0, w_hh, reverse);
}

RnnForwardResult rnn_forward_cuda(const Tensor& input, const Tensor& lengths, const Tensor& h0,
                                  const c10::optional<Tensor>& c0, const Tensor& w_ih,
                                  const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                  const c10::optional<Tensor>& b_hh, c10::string_view cell_name,
                                  bool reverse, const c10::optional<Tensor>& w_hr) {
  if (w_hr.has_value()) {
    const ProjSizes s = check_proj_forward_args(input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                *w_hr, std::string(cell_name));
    const cuda::DeviceGuard guard(input.device());
    return rnn_forward_proj_cuda(s, input, lengths, h0, *c0, w_ih, w_hh, b_ih, b_hh, *w_hr,
                                 reverse);
  }
  const RnnSizes s = check_rnn_forward_args(input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                            std::string(cell_name));
  const cuda::DeviceGuard guard(input.device());
  const Tokens tok = tokens_of(input, lengths, s.T);
  const Prepared f = prepare_forward(s, tok, {w_ih, w_hh, b_ih, b_hh, w_hr});
  return forward_direction(f, tok.plan, h0, c0, w_hh, reverse);
}

// The per-step backward recurrence: one step kernel and one GEMM per step.
// Fills dgx, dgh (T*B, G*H, packed; dgx is dgx_into where that is defined, a
// zero block with rows of any stride) and the math-type gradients of h0 (dh)
// and c0 (dc).
void rnn_backward_per_step(const RnnSizes& s, const TokenPlan& plan, const Tensor& dy,
                           const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& w_hh,
                           const Tensor& gates, const Tensor& states, bool reverse,
                           const Tensor& dgx_into, Tensor& dh, Tensor& dc, Tensor& dgx,
                           Tensor& dgh) {
  const Cell cell = s.cell;
  const int64_t T = s.T, B = s.B, H = s.H, G = s.G;
  const auto opts = dy.options();
  const auto acc_type = at::toOpMathType(dy.scalar_type());
  // The carried dh and dc stay in the math type across steps.
  dh = at::empty({B, H}, opts.dtype(acc_type)).copy_(grad_h_n);
  dc = cell == Cell::LSTM ? at::empty({B, H}, opts.dtype(acc_type)).copy_(grad_c_n) : Tensor();
  dgx = dgx_into.defined() ? dgx_into : at::zeros({T * B, G * H}, opts);
  dgh = cell == Cell::GRU ? at::zeros({T * B, G * H}, opts) : dgx;
  TORCH_INTERNAL_ASSERT(dgx.stride(1) == 1);
  Tensor dg_step = at::empty({B, G * H}, opts);
  const Tensor gs = gates.contiguous(), st = states.contiguous(), w_hh_c = w_hh.contiguous();
  const auto stream = cuda::current_stream();
  const unsigned blocks = cuda::grid_for(B * H, kThreads);
  const bool same_type = acc_type == dy.scalar_type();
  // In half/bfloat16 the GEMM's result, in the storage type, is added to the
  // float carry by the next step's kernel (after the last step, by add_).
  Tensor prod = same_type ? Tensor() : at::empty({B, H}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(),
                                  "rnn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StepGemms<scalar_t> gemm;
    dispatch_cell(cell, [&](auto k) {
      constexpr Cell K = decltype(k)::value;
      const int64_t L = plan.steps();
      for (int64_t step = 0; step < L; ++step) {
        const int64_t t = step_order(step, L, !reverse);
        BwdArgs<scalar_t, acc_t> a{step_rows(plan, t),
                                   gs.const_data_ptr<scalar_t>(), st.const_data_ptr<scalar_t>(),
                                   dy.const_data_ptr<scalar_t>() + t * B * H,
                                   dh.data_ptr<acc_t>(),
                                   step > 0 && !same_type ? prod.const_data_ptr<scalar_t>() : nullptr,
                                   K == Cell::LSTM ? dc.data_ptr<acc_t>() : nullptr,
                                   dgx.data_ptr<scalar_t>(), dgh.data_ptr<scalar_t>(),
                                   dg_step.data_ptr<scalar_t>(), t, T, B, H, dgx.stride(0),
                                   dgh.stride(0)};
        if (B * H > 0)
          cuda::launch(backward_step_kernel<scalar_t, acc_t, K>, blocks, kThreads, 0, stream, a);
        // Rows past their length have zero dg_step, so their carried dh is unchanged.
        if (same_type) gemm(dh, dg_step, w_hh_c, false, /*accumulate=*/true);
        else gemm(prod, dg_step, w_hh_c, false);
      }
      if (!same_type && L > 0) dh.add_(prod);
      return 0;
    });
  });
}

// The gradients that follow from the recurrence's: the weights', biases' and
// (with_input) the input's (GEMMs over the tokens; rows of dgx / dgh, of the
// packed input and of the states past the valid tokens are zero), and h0's /
// c0's in the storage type.
RnnBackwardResult backward_gemms(const RnnSizes& s, const Tokens& tok, const Tensor& w_ih,
                                 const Tensor& states, const Tensor& dgx, const Tensor& dgh,
                                 const Tensor& dh, const Tensor& dc, bool with_input = true) {
  const Cell cell = s.cell;
  const int64_t H = s.H;
  const auto opts = tok.x.options();
  const Tensor h_prev = states.contiguous().narrow(1, 0, H);
  Tensor grad_w_ih = tokens_outer(dgx, tok.x, tok.plan);
  Tensor grad_w_hh = tokens_outer(dgh, h_prev, tok.plan);
  Tensor grad_b_ih = dgx.sum(0);
  Tensor grad_b_hh = cell == Cell::GRU ? dgh.sum(0) : grad_b_ih.clone();
  Tensor grad_input = with_input
                          ? unpack_tokens(tokens_times(dgx, w_ih, tok.plan), tok.plan)
                          : Tensor();
  Tensor grad_c0 = cell == Cell::LSTM ? dc.to(opts.dtype()) : at::empty({0}, opts);
  return {grad_input, dh.to(opts.dtype()), grad_c0, grad_w_ih, grad_w_hh, grad_b_ih,
          grad_b_hh, at::empty({0}, opts)};
}

// A checked backward direction without projection: its sizes, and dy in the
// storage type, contiguous.
struct PreparedBackward {
  RnnSizes s;
  Tensor dy;
};

PreparedBackward prepare_backward(const Tensor& grad_output, const Tensor& grad_h_n,
                                  const Tensor& grad_c_n, const Tensor& input,
                                  const Tensor& lengths, const Tensor& w_ih, const Tensor& w_hh,
                                  const Tensor& gates, const Tensor& states,
                                  const std::string& cell) {
  PreparedBackward b;
  b.s = check_rnn_backward_args(grad_output, grad_h_n, grad_c_n, input, lengths, w_ih, w_hh,
                                gates, states, cell);
  check_workspace_shapes(gates, states, b.s.T, b.s.B, b.s.GS * b.s.H, b.s.S * b.s.H);
  const cuda::DeviceGuard guard(input.device());
  b.dy = grad_output.to(input.scalar_type()).contiguous();
  return b;
}

// One direction's recurrence: persistent where it fits, else per step.
// Returns (dgx, dgh, grad_h0, grad_c0) as rnn_backward_persistent.
// dgx_into: as rnn_backward_per_step's.
PersistentBackwardResult backward_direction(const PreparedBackward& b, const TokenPlan& plan,
                                            const Tensor& grad_h_n, const Tensor& grad_c_n,
                                            const Tensor& w_hh, const Tensor& gates,
                                            const Tensor& states, bool reverse,
                                            const Tensor& dgx_into = {}) {
  if (auto r = rnn_backward_persistent(
          b.s.cell, {{b.dy, grad_h_n, grad_c_n, w_hh, gates, states, reverse, dgx_into}}, plan))
    return r->front();
  Tensor dh, dc, dgx, dgh;
  rnn_backward_per_step(b.s, plan, b.dy, grad_h_n, grad_c_n, w_hh, gates, states, reverse,
                        dgx_into, dh, dc, dgx, dgh);
  return {dgx, dgh, dh, dc};
}

RnnBackwardResult rnn_backward_cuda(const Tensor& grad_output, const Tensor& grad_h_n,
                                    const Tensor& grad_c_n, const Tensor& input,
                                    const Tensor& lengths, const Tensor& w_ih, const Tensor& w_hh,
                                    const Tensor& gates, const Tensor& states,
                                    c10::string_view cell_name, bool reverse,
                                    const c10::optional<Tensor>& w_hr) {
  if (w_hr.has_value()) {
    const ProjSizes s = check_proj_backward_args(grad_output, grad_h_n, grad_c_n, input, lengths,
                                                 w_ih, w_hh, *w_hr, gates, states,
                                                 std::string(cell_name));
    const cuda::DeviceGuard guard(input.device());
    return rnn_backward_proj_cuda(s, grad_output, grad_h_n, grad_c_n, input, lengths, w_ih, w_hh,
                                  gates, states, *w_hr, reverse);
  }
  const PreparedBackward b = prepare_backward(grad_output, grad_h_n, grad_c_n, input, lengths,
                                              w_ih, w_hh, gates, states, std::string(cell_name));
  const cuda::DeviceGuard guard(input.device());
  const Tokens tok = tokens_of(input, lengths, b.s.T);
  const auto [dgx, dgh, dh, dc] =
      backward_direction(b, tok.plan, grad_h_n, grad_c_n, w_hh, gates, states, reverse);
  return backward_gemms(b.s, tok, w_ih, states, dgx, dgh, dh, dc);
}

// ------------------------------------------------------- both directions
// With or without a projection: one length plan and one packed input for both
// directions, one input projection GEMM for both (the directions' gx are
// column blocks of it) and one input-gradient GEMM (their dgx are column
// blocks of one matrix); both recurrences in one persistent launch where they
// fit together, else each direction as rnn_forward / rnn_backward runs it,
// one after the other.

// x W_ih^T of both directions, one GEMM over the tokens: direction d's gx is
// the column block [d*G*H, (d+1)*G*H).
Tensor both_directions_projection(const Tokens& tok, const std::array<DirectionWeights, 2>& w) {
  return tokens_times(tok.x, at::cat({w[0].w_ih, w[1].w_ih}).t(), tok.plan);
}

// The layer's input gradient from both directions' dgx, the column blocks of
// dgx in that order, one GEMM over the tokens.
Tensor both_directions_input_grad(const Tokens& tok, const Tensor& dgx,
                                  const std::array<DirectionWeights, 2>& w) {
  return unpack_tokens(tokens_times(dgx, at::cat({w[0].w_ih, w[1].w_ih}), tok.plan), tok.plan);
}
BidirectionalForwardResult rnn_bidirectional_forward_cuda(const Tensor& input, const Tensor& lengths,
                                                const Tensor& h0,
                                                const c10::optional<Tensor>& c0,
                                                at::TensorList weights, bool has_biases,
                                                c10::string_view cell_name) {
  const std::string cell(cell_name);
  const bool lstm = cell == "lstm";
  const auto w = split_directions(weights, has_biases, cell);
  const std::array<Tensor, 2> h0d{direction_of(h0, 0, "h0"), direction_of(h0, 1, "h0")};
  const std::array<c10::optional<Tensor>, 2> c0d{direction_of(c0, 0, "c0"),
                                                 direction_of(c0, 1, "c0")};
  std::array<RnnForwardResult, 2> r;
  if (w[0].w_hr.has_value()) {  // the same, with the projection's kernels
    std::array<ProjSizes, 2> s;
    for (int d = 0; d < 2; ++d)
      s[d] = check_proj_forward_args(input, lengths, h0d[d], c0d[d], w[d].w_ih, w[d].w_hh,
                                     w[d].b_ih, w[d].b_hh, *w[d].w_hr, cell);
    const cuda::DeviceGuard guard(input.device());
    const Tokens tok = tokens_of(input, lengths, s[0].T);
    const int64_t GH = 4 * s[0].H;
    const Tensor gx = both_directions_projection(tok, w);
    const auto acc_type = at::toOpMathType(input.scalar_type());
    std::array<ProjPersistentForward, 2> in;
    for (int d = 0; d < 2; ++d)
      in[d] = {gx.narrow(1, d * GH, GH), h0d[d], *c0d[d], w[d].w_hh, *w[d].w_hr,
               gate_biases(w[d].b_ih, w[d].b_hh, Cell::LSTM, s[d].H, acc_type).first, d == 1};
    if (auto both = rnn_forward_proj_persistent({in[0], in[1]}, tok.plan))
      return join_forward((*both)[0], (*both)[1], lstm);
    for (int d = 0; d < 2; ++d)
      r[d] = proj_forward_direction(s[d], tok.plan, in[d].gx, in[d].bias, in[d].h0, in[d].c0,
                                    in[d].w_hh, in[d].w_hr, d == 1);
    return join_forward(r[0], r[1], lstm);
  }
  std::array<RnnSizes, 2> s;
  for (int d = 0; d < 2; ++d)
    s[d] = check_rnn_forward_args(input, lengths, h0d[d], c0d[d], w[d].w_ih, w[d].w_hh, w[d].b_ih,
                                  w[d].b_hh, cell);
  const cuda::DeviceGuard guard(input.device());
  const Tokens tok = tokens_of(input, lengths, s[0].T);
  const int64_t GH = s[0].G * s[0].H;
  const Tensor gx = both_directions_projection(tok, w);
  const std::array<Prepared, 2> f{prepare_forward(s[0], tok, w[0], gx.narrow(1, 0, GH)),
                                  prepare_forward(s[1], tok, w[1], gx.narrow(1, GH, GH))};
  if (auto both = rnn_forward_persistent(
          f[0].s.cell,
          {persistent_operands(f[0], h0d[0], c0d[0], w[0].w_hh, false),
           persistent_operands(f[1], h0d[1], c0d[1], w[1].w_hh, true)},
          tok.plan))
    return join_forward((*both)[0], (*both)[1], lstm);
  for (int d = 0; d < 2; ++d)
    r[d] = forward_direction(f[d], tok.plan, h0d[d], c0d[d], w[d].w_hh, d == 1);
  return join_forward(r[0], r[1], lstm);
}

BidirectionalBackwardResult rnn_bidirectional_backward_cuda(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, const Tensor& lengths, at::TensorList weights, bool has_biases,
    at::TensorList workspaces, c10::string_view cell_name) {
  const std::string cell(cell_name);
  const bool lstm = cell == "lstm";
  const auto w = split_directions(weights, has_biases, cell);
  const bool proj = w[0].w_hr.has_value();
  const auto g = split_backward_args(grad_output, grad_h_n, grad_c_n, workspaces, w, lstm);
  std::array<RnnBackwardResult, 2> r;
  if (proj) {  // the same, with the projection's kernels
    std::array<ProjSizes, 2> s;
    for (int d = 0; d < 2; ++d) {
      s[d] = check_proj_backward_args(g[d].grad_output, g[d].grad_h_n, g[d].grad_c_n, input,
                                      lengths, w[d].w_ih, w[d].w_hh, *w[d].w_hr, g[d].gates,
                                      g[d].states, cell);
      check_workspace_shapes(g[d].gates, g[d].states, s[d].T, s[d].B, 4 * s[d].H,
                             2 * s[d].H + s[d].P);
    }
    const cuda::DeviceGuard guard(input.device());
    const Tokens tok = tokens_of(input, lengths, s[0].T);
    const int64_t GH = 4 * s[0].H;
    const Tensor dgx = at::zeros({s[0].T * s[0].B, 2 * GH}, input.options());
    std::array<ProjPersistentBackward, 2> in;
    for (int d = 0; d < 2; ++d)
      in[d] = {g[d].grad_output.to(input.scalar_type()).contiguous(), g[d].grad_h_n,
               g[d].grad_c_n, w[d].w_hh, *w[d].w_hr, g[d].gates.contiguous(),
               g[d].states.contiguous(), d == 1, dgx.narrow(1, d * GH, GH)};
    std::array<ProjPersistentBackwardResult, 2> rec;
    if (auto both = rnn_backward_proj_persistent({in[0], in[1]}, tok.plan)) {
      rec = {(*both)[0], (*both)[1]};
    } else {
      for (int d = 0; d < 2; ++d)
        rec[d] = proj_backward_direction(s[d], tok.plan, in[d].dy, in[d].grad_h_n,
                                         in[d].grad_c_n, in[d].w_hh, in[d].w_hr, in[d].gates,
                                         in[d].states, d == 1, in[d].dgx);
    }
    for (int d = 0; d < 2; ++d) {
      const auto& [dgx_d, dh_tok, dh, dc] = rec[d];
      r[d] = proj_backward_gemms(tok, w[d].w_ih, in[d].states, dgx_d, dh_tok, dh, dc,
                                 /*with_input=*/false);
    }
    return join_backward(both_directions_input_grad(tok, dgx, w), r[0], r[1], lstm, has_biases,
                         true);
  }
  std::array<PreparedBackward, 2> b;
  for (int d = 0; d < 2; ++d)
    b[d] = prepare_backward(g[d].grad_output, g[d].grad_h_n, g[d].grad_c_n, input, lengths,
                            w[d].w_ih, w[d].w_hh, g[d].gates, g[d].states, cell);
  const cuda::DeviceGuard guard(input.device());
  const Tokens tok = tokens_of(input, lengths, b[0].s.T);
  const int64_t GH = b[0].s.G * b[0].s.H;
  const Tensor dgx = at::zeros({b[0].s.T * b[0].s.B, 2 * GH}, b[0].dy.options());
  const std::array<Tensor, 2> dgxd{dgx.narrow(1, 0, GH), dgx.narrow(1, GH, GH)};
  std::array<PersistentBackwardResult, 2> rec;
  if (auto both = rnn_backward_persistent(
          b[0].s.cell,
          {{b[0].dy, g[0].grad_h_n, g[0].grad_c_n, w[0].w_hh, g[0].gates, g[0].states, false,
            dgxd[0]},
           {b[1].dy, g[1].grad_h_n, g[1].grad_c_n, w[1].w_hh, g[1].gates, g[1].states, true,
            dgxd[1]}},
          tok.plan)) {
    rec = {(*both)[0], (*both)[1]};
  } else {
    for (int d = 0; d < 2; ++d)
      rec[d] = backward_direction(b[d], tok.plan, g[d].grad_h_n, g[d].grad_c_n, w[d].w_hh,
                                  g[d].gates, g[d].states, d == 1, dgxd[d]);
  }
  for (int d = 0; d < 2; ++d) {
    const auto& [dgx_d, dgh_d, dh, dc] = rec[d];
    r[d] = backward_gemms(b[d].s, tok, w[d].w_ih, g[d].states, dgx_d, dgh_d, dh, dc,
                          /*with_input=*/false);
  }
  return join_backward(both_directions_input_grad(tok, dgx, w), r[0], r[1], lstm, has_biases,
                       false);
}

}  // namespace
}  // namespace varlen

VK_CUDA_LIBRARY_IMPL(m) {
  m.impl("rnn_forward", &varlen::rnn_forward_cuda);
  m.impl("rnn_backward", &varlen::rnn_backward_cuda);
  m.impl("rnn_bidirectional_forward", &varlen::rnn_bidirectional_forward_cuda);
  m.impl("rnn_bidirectional_backward", &varlen::rnn_bidirectional_backward_cuda);
}
