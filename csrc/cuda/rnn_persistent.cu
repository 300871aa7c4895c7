// Persistent CUDA kernels for rnn_forward / rnn_backward: see rnn_persistent.h.
//
// Two kernels of each direction: the recurrent product with fma on CUDA cores
// (below: float64, float32 in IEEE precision, and the fallback of the others)
// and on tensor cores (further below: half and bfloat16 with wmma 16x16x16,
// float32 in TF32 with 16x16x8 where torch allows TF32; float accumulation).
//
// Thread layout of a CTA (kThreads threads, `units` = Hs hidden units):
// thread tid works on unit u = tid % Hs and on row group rg = tid / Hs
// (RG = kThreads / Hs groups; threads past RG * Hs only help to load). A tile
// of RB = RG * kRows rows is processed at a time; thread (u, rg) owns rows
// rg, rg + RG, ..., rg + (kRows-1) * RG of the tile, for every gate of its
// unit, so the cell runs on its registers with no exchange between threads.
// The recurrent product is accumulated in the math type (float for half and
// bfloat16, IEEE fma on CUDA cores).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "../cell_math.h"
#include "../rnn_args.h"
#include "launch.h"
#include "rnn_persistent.h"
#include "rnn_point.cuh"

#ifndef VK_EMULATE_CUDA
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace varlen {

RnnPath rnn_path_setting() {
  const char* v = std::getenv("VARLEN_KERNELS_RNN_PATH");
  const std::string s = v ? v : "";
  if (s.empty() || s == "auto") return RnnPath::Auto;
  if (s == "persistent") return RnnPath::Persistent;
  if (s == "per_step") return RnnPath::PerStep;
  TORCH_CHECK(false, "VARLEN_KERNELS_RNN_PATH must be 'auto', 'persistent' or 'per_step', got '",
              s, "'");
}

namespace {

using at::Tensor;
namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kRows = 2;    // rows per thread in a tile
constexpr int kChunk = 16;  // reduction columns staged in shared memory at a time
constexpr int kMinUnits = 2, kMaxUnits = 128;

// Rows of a tile of the fma kernels: kRows per row group of Hs threads.
constexpr int tile_rows(int units) { return (kThreads / units) * kRows; }

// Number of sequences with length > t; sorted_len is in descending order.
__device__ __forceinline__ int64_t count_running(const int64_t* sorted_len, int64_t B, int64_t t) {
  int64_t lo = 0, hi = B;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_len[mid] > t) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// The longest length, clamped to [0, T]; asserts that every length is in range.
__device__ __forceinline__ int64_t longest(const int64_t* sorted_len, int64_t B, int64_t T) {
  if (B == 0) return 0;
  const int64_t hi = sorted_len[0], lo = sorted_len[B - 1];
  if (blockIdx.x == 0 && threadIdx.x == 0)
    CUDA_KERNEL_ASSERT(hi <= T && lo >= 0 && "lengths must be in [0, T]");
  return hi < 0 ? 0 : (hi > T ? T : hi);
}

constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// The kernels' argument: the parameters of one or two directions (of the
// same layer, sharing lengths), each run by its own group of `ctas` CTAs.
// Both groups step through the same steps (the longest length), so they
// meet at every grid-wide barrier.
template <typename Params>
struct Directions {
  Params d[2];
  int64_t ctas;  // CTAs per direction
};

// This CTA's direction, and the first hidden unit of its slice.
template <typename Params>
__device__ __forceinline__ Params direction_of_cta(const Directions<Params>& L, int64_t& j0) {
  const bool second = int64_t(blockIdx.x) >= L.ctas;
  const Params p = second ? L.d[1] : L.d[0];
  j0 = (int64_t(blockIdx.x) - (second ? L.ctas : 0)) * p.units;
  return p;
}

// Shared memory: the W_hh slice (G * Hs * H storage-type values), then the
// staged operand tile (kChunk x (RB + 1) math-type values).
template <typename scalar_t, typename acc_t>
size_t smem_bytes(int G, int units, int64_t H) {
  return align16(size_t(G) * units * H * sizeof(scalar_t)) +
         size_t(kChunk) * (tile_rows(units) + 1) * sizeof(acc_t);
}

// ------------------------------------------------------------------ forward
template <typename scalar_t, typename acc_t>
struct FwdParams {
  const int64_t* sorted_len;  // (B,) lengths, longest first
  const int64_t* perm;        // (B,) batch index of each row of that order
  const int64_t* off;         // (T+1,) first token row of each step (token_plan.h)
  const scalar_t* w_hh;       // (G*H, H)
  const scalar_t* gx;         // (T*B, G*H) x W_ih^T, storage type, packed, row stride gx_ld
  const acc_t* bias;          // (G*H,) folded biases or nullptr
  const acc_t* b_hn;          // (H,) GRU's b_hn or nullptr
  const scalar_t* h0;         // (B, H)
  const scalar_t* c0;         // (B, H) LSTM only
  acc_t* hbuf;                // (2, B, H) h, length order, two buffers read/written alternately
  acc_t* cbuf;                // (B, H) LSTM's c, length order
  scalar_t* y;                // (T, B, H) output, zero-initialized
  scalar_t* gates;            // (T*B, GS*H) workspace, packed, zero-initialized
  scalar_t* states;           // (T*B, S*H) workspace, packed, zero-initialized
  scalar_t* h_n;              // (B, H)
  scalar_t* c_n;              // (B, H) LSTM only
  int64_t T, B, H, gx_ld;
  int units;                  // Hs, hidden units per CTA
  bool reverse;
};

// Buffers of hbuf: forward direction, step t reads buffer t & 1 and writes the
// other; reverse direction, step t reads (t + 1) & 1 and writes t & 1. Both
// start as h0, so a row that has not started yet reads h0 from either; a row's
// final h is in buffer L & 1 (forward) or 0 (reverse).
template <typename acc_t>
struct FwdStep {
  int64_t t, nrun;    // time step, running rows (a prefix of the length order)
  int64_t row0;       // token row of the first of them
  const acc_t* hin;   // (B, H) h_{t-1}
  acc_t* hout;        // (B, H) h_t
};
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ FwdStep<acc_t> forward_step(const FwdParams<scalar_t, acc_t>& p,
                                                       int64_t step, int64_t maxlen) {
  const int64_t t = p.reverse ? maxlen - 1 - step : step, BH = p.B * p.H;
  return {t, count_running(p.sorted_len, p.B, t), p.off[t],
          p.hbuf + (p.reverse ? ((t + 1) & 1) : (t & 1)) * BH,
          p.hbuf + (p.reverse ? (t & 1) : ((t + 1) & 1)) * BH};
}

// The CTA's units [j0, j0 + Hs) of every row: h0 into both buffers, c0.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void load_initial_state(const FwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs) {
  const int64_t H = p.H, B = p.B;
  for (int64_t idx = threadIdx.x; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H) continue;
    const int64_t b = p.perm[i];
    const acc_t h = acc_t(p.h0[b * H + jj]);
    p.hbuf[i * H + jj] = h;
    p.hbuf[(B + i) * H + jj] = h;
    if constexpr (K == Cell::LSTM) p.cbuf[i * H + jj] = acc_t(p.c0[b * H + jj]);
  }
}

// h_n and c_n of the CTA's units, after the last step.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void store_final_state(const FwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs) {
  const int64_t H = p.H, B = p.B;
  for (int64_t idx = threadIdx.x; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H) continue;
    const int64_t b = p.perm[i], buf = p.reverse ? 0 : (p.sorted_len[i] & 1);
    p.h_n[b * H + jj] = scalar_t(p.hbuf[(buf * B + i) * H + jj]);
    if constexpr (K == Cell::LSTM) p.c_n[b * H + jj] = scalar_t(p.cbuf[i * H + jj]);
  }
}

// Row i (length order), unit j of step s, given the hidden side of its gates.
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ void forward_cell(const FwdParams<scalar_t, acc_t>& p,
                                             const FwdStep<acc_t>& s, int64_t i, int64_t j,
                                             const acc_t (&hid)[num_gates(K)]) {
  constexpr int G = num_gates(K), GS = num_saved_gates(K), S = num_states(K);
  const int64_t H = p.H, row = s.row0 + i;
  const acc_t h = forward_point<scalar_t, acc_t, K>(
      p.gx + row * p.gx_ld + j, p.bias, p.b_hn, j, H, hid, s.hin[i * H + j],
      K == Cell::LSTM ? p.cbuf + i * H + j : nullptr, p.gates + row * GS * H + j,
      p.states + row * S * H + j);
  s.hout[i * H + j] = h;
  p.y[(s.t * p.B + p.perm[i]) * H + j] = scalar_t(h);
}

template <typename scalar_t, typename acc_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1) persistent_forward_kernel(Directions<FwdParams<scalar_t, acc_t>> L) {
  constexpr int G = num_gates(K);
  int64_t j0;
  const FwdParams<scalar_t, acc_t> p = direction_of_cta(L, j0);
  const int64_t H = p.H, B = p.B, T = p.T;
  const int Hs = p.units, tid = threadIdx.x;
  const int u = tid % Hs, rg = tid / Hs, RG = kThreads / Hs, RB = RG * kRows, RBp = RB + 1;
  const int64_t j = j0 + u, GHs = int64_t(G) * Hs;
  const bool owns = rg < RG && j < H;  // computes (row, unit j) pairs
  VK_DYNAMIC_SHARED(unsigned char, smem);
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);  // w[k * GHs + g * Hs + u] = W_hh[g*H + j0+u, k]
  acc_t* hs = reinterpret_cast<acc_t*>(smem + align16(GHs * H * sizeof(scalar_t)));  // [kk * RBp + r]

  for (int64_t idx = tid; idx < GHs * H; idx += kThreads) {
    const int64_t k = idx % H, gu = idx / H, g = gu / Hs, jj = j0 + gu % Hs;
    w[k * GHs + gu] = jj < H ? p.w_hh[(g * H + jj) * H + k] : scalar_t(0);
  }
  load_initial_state<scalar_t, acc_t, K>(p, j0, Hs);
  const int64_t maxlen = longest(p.sorted_len, B, T);
  cg::this_grid().sync();  // every unit's h0 is in place (and W is, after the tile's barrier)

  for (int64_t step = 0; step < maxlen; ++step) {
    const FwdStep<acc_t> s = forward_step(p, step, maxlen);
    for (int64_t row0 = 0; row0 < s.nrun; row0 += RB) {
      // Rows of this tile that run; a thread whose first row does not skips
      // the product (the rows it would read past `rows` are never staged).
      const int rows = s.nrun - row0 < RB ? int(s.nrun - row0) : RB;
      const bool active = owns && rg < rows;
      acc_t acc[kRows][G];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int g = 0; g < G; ++g) acc[r][g] = acc_t(0);
      for (int64_t k0 = 0; k0 < H; k0 += kChunk) {
        __syncthreads();  // the previous chunk (and tile) is consumed
        for (int idx = tid; idx < rows * kChunk; idx += kThreads) {
          const int r = idx / kChunk, kk = idx % kChunk;
          const int64_t k = k0 + kk;
          hs[kk * RBp + r] = k < H ? s.hin[(row0 + r) * H + k] : acc_t(0);
        }
        __syncthreads();
        if (active) {
          const int kn = H - k0 < kChunk ? int(H - k0) : kChunk;
          for (int kk = 0; kk < kn; ++kk) {
            acc_t wv[G];
#pragma unroll
            for (int g = 0; g < G; ++g) wv[g] = acc_t(w[(k0 + kk) * GHs + g * Hs + u]);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              if (r * RG + rg >= rows) break;
              const acc_t hv = hs[kk * RBp + r * RG + rg];
#pragma unroll
              for (int g = 0; g < G; ++g) acc[r][g] += wv[g] * hv;
            }
          }
        }
      }
      if (!active) continue;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = row0 + r * RG + rg;
        if (i < s.nrun) forward_cell<scalar_t, acc_t, K>(p, s, i, j, acc[r]);
      }
    }
    cg::this_grid().sync();  // h_t complete before any CTA reads it
  }
  store_final_state<scalar_t, acc_t, K>(p, j0, Hs);
}

// ------------------------------------------------------------------ backward
template <typename scalar_t, typename acc_t>
struct BwdParams {
  const int64_t* sorted_len;  // (B,) lengths, longest first
  const int64_t* perm;        // (B,) batch index of each row of that order
  const int64_t* off;         // (T+1,) first token row of each step (token_plan.h)
  const scalar_t* w_hh;       // (G*H, H)
  const scalar_t* gates;      // (T*B, GS*H) the forward's workspace, packed
  const scalar_t* states;     // (T*B, S*H)
  const scalar_t* dy;         // (T, B, H) gradient of the output, padded
  const acc_t* grad_h_n;      // (B, H)
  const acc_t* grad_c_n;      // (B, H) LSTM only
  acc_t* carry;               // (B, H) length order: d h' not passing through W_hh
  acc_t* dcbuf;               // (B, H) length order: LSTM's d c'
  scalar_t* dgx;              // (T*B, G*H) packed, zero-initialized, row stride dgx_ld
  scalar_t* dgh;              // likewise (row stride dgh_ld); aliases dgx unless GRU
  acc_t* grad_h0;             // (B, H)
  acc_t* grad_c0;             // (B, H) LSTM only
  int64_t T, B, H, G;          // G: gate blocks of H
  int64_t dgx_ld, dgh_ld;
  int units;
  bool reverse;
};

// Steps run in the reverse of the forward's order. At step t a running row
// gets d h_t = dy_t + carry + dgh_prev W_hh[:, j], where dgh_prev is its
// pre-activation gradient at the step processed just before (zero for a row
// that starts here: its carry is still grad_h_n). A row that ran at the
// previous step but not at this one has finished: carry + dgh_prev W_hh is
// its grad_h0. One step past the last handles the rows that finish there.
template <typename scalar_t>
struct BwdStep {
  int64_t t, tp;        // time step (-1 past the last), the one processed before it
  int64_t nrun, nprev;  // rows running at t, rows that ran at tp (prefixes of the order)
  int64_t n;            // rows touched: max(nrun, nprev)
  int64_t row0;         // token row of the first running row at t
  const scalar_t* dg_prev;  // (nprev, G*H) dgh at tp, in the length order
};
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ BwdStep<scalar_t> backward_step(const BwdParams<scalar_t, acc_t>& p,
                                                           int64_t step, int64_t maxlen) {
  BwdStep<scalar_t> s;
  const bool last = step == maxlen;  // no step to run, only rows to finish
  s.t = last ? -1 : (p.reverse ? step : maxlen - 1 - step);
  s.tp = p.reverse ? step - 1 : maxlen - step;
  s.nrun = last ? 0 : count_running(p.sorted_len, p.B, s.t);
  s.nprev = step > 0 ? count_running(p.sorted_len, p.B, s.tp) : 0;
  s.n = s.nrun > s.nprev ? s.nrun : s.nprev;
  s.row0 = last ? 0 : p.off[s.t];
  s.dg_prev = p.dgh + (step > 0 ? p.off[s.tp] : 0) * p.dgh_ld;
  return s;
}

// The CTA's units of every row: the carry starts as grad_h_n, dc as grad_c_n.
// Ends with a barrier: other threads of the CTA read these rows in the steps.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void load_initial_carry(const BwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs) {
  const int64_t H = p.H;
  for (int64_t idx = threadIdx.x; idx < p.B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H) continue;
    const int64_t b = p.perm[i];
    p.carry[i * H + jj] = p.grad_h_n[b * H + jj];
    if constexpr (K == Cell::LSTM) p.dcbuf[i * H + jj] = p.grad_c_n[b * H + jj];
  }
  __syncthreads();
}

// grad_h0 and grad_c0 of the CTA's units, after the last step.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void store_initial_grads(const BwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs) {
  const int64_t H = p.H;
  for (int64_t idx = threadIdx.x; idx < p.B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H) continue;
    const int64_t b = p.perm[i];
    p.grad_h0[b * H + jj] = p.carry[i * H + jj];
    if constexpr (K == Cell::LSTM) p.grad_c0[b * H + jj] = p.dcbuf[i * H + jj];
  }
}

// Row i (< s.n), unit j of step s, given prod = (dgh at tp W_hh)[i, j] (zero
// for a row that did not run at tp).
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ void backward_cell(const BwdParams<scalar_t, acc_t>& p,
                                              const BwdStep<scalar_t>& s, int64_t i, int64_t j,
                                              acc_t prod) {
  constexpr int GS = num_saved_gates(K), S = num_states(K);
  const int64_t H = p.H;
  acc_t* carry = p.carry + i * H + j;
  if (i < s.nrun) {
    const int64_t row = s.row0 + i;
    const acc_t dh = *carry + prod + acc_t(p.dy[(s.t * p.B + p.perm[i]) * H + j]);
    *carry = backward_point<scalar_t, acc_t, K>(
        p.gates + row * GS * H + j, p.states + row * S * H + j, H, dh,
        K == Cell::LSTM ? p.dcbuf + i * H + j : nullptr, p.dgx + row * p.dgx_ld + j,
        p.dgh + row * p.dgh_ld + j);
  } else {
    *carry += prod;  // finished: this is d h0
  }
}

template <typename scalar_t, typename acc_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1) persistent_backward_kernel(Directions<BwdParams<scalar_t, acc_t>> L) {
  int64_t j0;
  const BwdParams<scalar_t, acc_t> p = direction_of_cta(L, j0);
  const int64_t H = p.H, B = p.B, T = p.T, GH = int64_t(p.G) * H;
  const int Hs = p.units, tid = threadIdx.x;
  const int u = tid % Hs, rg = tid / Hs, RG = kThreads / Hs, RB = RG * kRows, RBp = RB + 1;
  const int64_t j = j0 + u;
  const bool owns = rg < RG && j < H;
  VK_DYNAMIC_SHARED(unsigned char, smem);
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);  // w[m * Hs + u] = W_hh[m, j0+u]
  acc_t* ds = reinterpret_cast<acc_t*>(smem + align16(GH * Hs * sizeof(scalar_t)));

  for (int64_t idx = tid; idx < GH * Hs; idx += kThreads) {
    const int64_t m = idx / Hs, jj = j0 + idx % Hs;
    w[idx] = jj < H ? p.w_hh[m * H + jj] : scalar_t(0);
  }
  load_initial_carry<scalar_t, acc_t, K>(p, j0, Hs);
  const int64_t maxlen = longest(p.sorted_len, B, T);

  for (int64_t step = 0; step <= maxlen; ++step) {
    const BwdStep<scalar_t> s = backward_step(p, step, maxlen);
    for (int64_t row0 = 0; row0 < s.n; row0 += RB) {
      acc_t acc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = acc_t(0);
      // Rows of this tile with a product (those that ran at the previous step);
      // a thread whose first row has none skips it.
      const int rows = row0 < s.nprev ? (s.nprev - row0 < RB ? int(s.nprev - row0) : RB) : 0;
      if (rows > 0) {  // the same for the whole block
        for (int64_t m0 = 0; m0 < GH; m0 += kChunk) {
          __syncthreads();
          for (int idx = tid; idx < rows * kChunk; idx += kThreads) {
            const int r = idx / kChunk, kk = idx % kChunk;
            const int64_t m = m0 + kk;
            ds[kk * RBp + r] = m < GH ? acc_t(s.dg_prev[(row0 + r) * p.dgh_ld + m]) : acc_t(0);
          }
          __syncthreads();
          if (owns && rg < rows) {
            const int kn = GH - m0 < kChunk ? int(GH - m0) : kChunk;
            for (int kk = 0; kk < kn; ++kk) {
              const acc_t wv = acc_t(w[(m0 + kk) * Hs + u]);
#pragma unroll
              for (int r = 0; r < kRows; ++r)
                if (r * RG + rg < rows) acc[r] += ds[kk * RBp + r * RG + rg] * wv;
            }
          }
        }
      }
      if (!owns) continue;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = row0 + r * RG + rg;
        if (i < s.n) backward_cell<scalar_t, acc_t, K>(p, s, i, j, acc[r]);
      }
    }
    cg::this_grid().sync();  // this step's dgh complete before any CTA reads it
  }
  store_initial_grads<scalar_t, acc_t, K>(p, j0, Hs);
}

// ------------------------------------------------------------------ tensor cores
// Half and bfloat16, and float32 where torch allows TF32 for CUDA matmuls:
// the recurrent product on tensor cores. Per CTA and step it is C = A B with A
// the running rows of h (forward, rounded to the storage type, as the GEMMs of
// the per-step path and cuDNN round it) or of the previous step's dgh
// (backward), and B the CTA's slice of W_hh, kept in shared memory for the
// whole launch. float32 keeps A and B in float, rounded to TF32 (10 mantissa
// bits, to nearest) as they are written to shared memory, as cuBLAS's TF32
// GEMMs round their operands. Per tile of rows, the 8 warps share the 16x16
// output tiles (at most 2 each), A is staged kTcChunk columns at a time, C
// goes through shared memory to the threads that apply the cell, one
// (row, unit) each. The state, the carry and C stay float.
//
// Tc<scalar_t>: the wmma element type, the type in shared memory, and the
// shape's reduction length (16x16x16 tiles; 16x16x8 for TF32).
template <typename T>
struct Tc;
#ifdef VK_EMULATE_CUDA
template <>
struct Tc<c10::Half> {  // the emulated wmma takes c10::Half / c10::BFloat16
  using type = c10::Half;
  using mem = c10::Half;
  static constexpr int k = 16;
};
template <>
struct Tc<c10::BFloat16> {
  using type = c10::BFloat16;
  using mem = c10::BFloat16;
  static constexpr int k = 16;
};
#else
template <>
struct Tc<c10::Half> {
  using type = __half;
  using mem = __half;
  static constexpr int k = 16;
};
template <>
struct Tc<c10::BFloat16> {
  using type = __nv_bfloat16;
  using mem = __nv_bfloat16;
  static constexpr int k = 16;
};
#endif
// TF32 fragments and __float_to_tf32 exist only when compiling for sm_80 or
// newer (and on the host); an older target's kernels trap before any product.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define VK_HAS_TF32 1
#else
#define VK_HAS_TF32 0
#endif
template <>
struct Tc<float> {
#if VK_HAS_TF32
  using type = nvcuda::wmma::precision::tf32;
#else
  using type = float;  // never multiplied: the kernels trap below sm_80
#endif
  using mem = float;
  static constexpr int k = 8;
};

// A value of the storage type as a tensor-core operand in shared memory.
template <typename scalar_t>
__device__ __forceinline__ scalar_t tc_operand(scalar_t v) {
#if VK_HAS_TF32
  if constexpr (std::is_same_v<scalar_t, float>) return nvcuda::wmma::__float_to_tf32(v);
#endif
  return v;
}

constexpr int kTcChunk = 64;  // columns of A staged at a time
constexpr int kWarps = kThreads / 32;
constexpr int64_t align128(int64_t n) { return (n + 127) / 128 * 128; }

// Tile geometry for a product with n output columns and reduction length k,
// operands of elem bytes. Each shared-memory row is padded by 16 bytes: a
// fragment load reads 8 rows (16-bit types) or 8 rows of 4 (TF32) at once, and
// a row stride of 4 banks (mod 32) spreads them over all banks, where 32 bytes
// (8 banks) would put rows 0 and 4 of a TF32 fragment on the same banks. The
// strides stay multiples of 16 bytes and the tiles 32-byte aligned, as wmma
// requires.
struct TcGeometry {
  int n, np, nt, mt, rbt;   // columns, padded to 16; column tiles; row tiles per tile; rows
  int64_t kp, ldw, lda, ldc;  // k padded to 16; leading dimensions of W, A, C in shared memory
  int elem;                 // bytes of an operand element
  __host__ __device__ TcGeometry(int n_, int64_t k, int elem_) : n(n_), elem(elem_) {
    np = (n + 15) / 16 * 16;
    nt = np / 16;
    mt = nt >= kWarps ? 1 : kWarps / nt;
    rbt = 16 * mt;
    kp = (k + 15) / 16 * 16;
    ldw = kp + 16 / elem;
    lda = kTcChunk + 16 / elem;
    ldc = np + 4;
  }
  // At most two output tiles per warp.
  __host__ __device__ bool fits_warps() const { return mt * nt <= 2 * kWarps; }
  __host__ __device__ int64_t w_bytes() const { return align128(np * ldw * elem); }
  __host__ __device__ int64_t a_bytes() const { return align128(rbt * lda * elem); }
  int64_t smem() const { return w_bytes() + a_bytes() + int64_t(rbt) * ldc * 4; }
};

__host__ __device__ constexpr int round16(int n) { return (n + 15) / 16 * 16; }

// C (rows x g.np) += A (rows x kp, staged per chunk by `stage`) times the
// W slice w (col-major, g.ldw): the output tiles of this warp, those with a
// row below `rows`; then C to shared memory cs. Block-uniform: every thread
// calls it; `stage(k0, kc)` fills as[r * lda + kk] for r < round16(rows),
// kk < kc (zero past `rows`: only whole 16-row tiles are multiplied).
template <typename scalar_t, typename Stage>
__device__ __forceinline__ void tc_product(const TcGeometry& g, int rows, const scalar_t* ws,
                                           scalar_t* as, float* cs, Stage stage) {
  using namespace nvcuda;
  using tc_t = typename Tc<scalar_t>::type;
  using mem_t = typename Tc<scalar_t>::mem;
  constexpr int KK = Tc<scalar_t>::k;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, KK, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int64_t k0 = 0; k0 < g.kp; k0 += kTcChunk) {
    const int kc = g.kp - k0 < kTcChunk ? int(g.kp - k0) : kTcChunk;
    __syncthreads();  // the previous chunk (and tile) is consumed
    stage(k0, kc);
    __syncthreads();
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int q = warp + e * kWarps, mtile = q / g.nt, ntile = q % g.nt;
      if (q >= g.mt * g.nt || mtile * 16 >= rows) continue;  // warp-uniform
      for (int kk = 0; kk < kc; kk += KK) {
        wmma::fragment<wmma::matrix_a, 16, 16, KK, tc_t, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, KK, tc_t, wmma::col_major> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const mem_t*>(as + mtile * 16 * g.lda + kk),
                               unsigned(g.lda));
        wmma::load_matrix_sync(b, reinterpret_cast<const mem_t*>(ws + ntile * 16 * g.ldw + k0 + kk),
                               unsigned(g.ldw));
        wmma::mma_sync(acc[e], a, b, acc[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int q = warp + e * kWarps, mtile = q / g.nt, ntile = q % g.nt;
    if (q >= g.mt * g.nt || mtile * 16 >= rows) continue;
    wmma::store_matrix_sync(cs + mtile * 16 * g.ldc + ntile * 16, acc[e], unsigned(g.ldc),
                            wmma::mem_row_major);
  }
  __syncthreads();  // C complete for the cell threads
}

template <typename scalar_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_tc_kernel(Directions<FwdParams<scalar_t, float>> L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bfloat16 wmma needs sm_80; the host launches it on sm_80 and later only
#else
  constexpr int G = num_gates(K);
  int64_t j0;
  const FwdParams<scalar_t, float> p = direction_of_cta(L, j0);
  const int64_t H = p.H, B = p.B, T = p.T;
  const int Hs = p.units, tid = threadIdx.x;
  const TcGeometry g(G * Hs, H, sizeof(scalar_t));
  VK_DYNAMIC_SHARED(unsigned char, smem);
  // ws[n * ldw + k] = W_hh[gate * H + j0 + u, k] for column n = gate * Hs + u
  scalar_t* ws = reinterpret_cast<scalar_t*>(smem);
  scalar_t* as = reinterpret_cast<scalar_t*>(smem + g.w_bytes());
  float* cs = reinterpret_cast<float*>(smem + g.w_bytes() +
                                       g.a_bytes());
  for (int64_t idx = tid; idx < g.np * g.kp; idx += kThreads) {
    const int64_t n = idx / g.kp, k = idx % g.kp, gate = n / Hs, jj = j0 + n % Hs;
    ws[n * g.ldw + k] =
        (n < g.n && jj < H && k < H) ? tc_operand(p.w_hh[(gate * H + jj) * H + k]) : scalar_t(0);
  }
  load_initial_state<scalar_t, float, K>(p, j0, Hs);
  const int64_t maxlen = longest(p.sorted_len, B, T);
  cg::this_grid().sync();

  for (int64_t step = 0; step < maxlen; ++step) {
    const FwdStep<float> s = forward_step(p, step, maxlen);
    for (int64_t row0 = 0; row0 < s.nrun; row0 += g.rbt) {
      const int rows = s.nrun - row0 < g.rbt ? int(s.nrun - row0) : g.rbt;
      tc_product(g, rows, ws, as, cs, [&](int64_t k0, int kc) {
        for (int idx = tid; idx < round16(rows) * kc; idx += kThreads) {
          const int r = idx / kc, kk = idx % kc;
          const int64_t k = k0 + kk;
          as[r * g.lda + kk] =
              (r < rows && k < H) ? tc_operand(scalar_t(s.hin[(row0 + r) * H + k])) : scalar_t(0);
        }
      });
      for (int idx = tid; idx < rows * Hs; idx += kThreads) {
        const int r = idx / Hs, u = idx % Hs;
        if (j0 + u >= H) continue;
        float hid[G];
#pragma unroll
        for (int gate = 0; gate < G; ++gate) hid[gate] = cs[r * g.ldc + gate * Hs + u];
        forward_cell<scalar_t, float, K>(p, s, row0 + r, j0 + u, hid);
      }
    }
    cg::this_grid().sync();
  }
  store_final_state<scalar_t, float, K>(p, j0, Hs);
#endif
}

template <typename scalar_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_backward_tc_kernel(Directions<BwdParams<scalar_t, float>> L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  int64_t j0;
  const BwdParams<scalar_t, float> p = direction_of_cta(L, j0);
  const int64_t H = p.H, B = p.B, T = p.T, GH = int64_t(p.G) * H;
  const int Hs = p.units, tid = threadIdx.x;
  const TcGeometry g(Hs, GH, sizeof(scalar_t));
  VK_DYNAMIC_SHARED(unsigned char, smem);
  // ws[n * ldw + m] = W_hh[m, j0 + n]
  scalar_t* ws = reinterpret_cast<scalar_t*>(smem);
  scalar_t* as = reinterpret_cast<scalar_t*>(smem + g.w_bytes());
  float* cs = reinterpret_cast<float*>(smem + g.w_bytes() +
                                       g.a_bytes());
  for (int64_t idx = tid; idx < g.np * g.kp; idx += kThreads) {  // n fastest: coalesced reads
    const int64_t n = idx % g.np, m = idx / g.np, jj = j0 + n;
    ws[n * g.ldw + m] = (n < Hs && jj < H && m < GH) ? tc_operand(p.w_hh[m * H + jj]) : scalar_t(0);
  }
  load_initial_carry<scalar_t, float, K>(p, j0, Hs);
  const int64_t maxlen = longest(p.sorted_len, B, T);

  for (int64_t step = 0; step <= maxlen; ++step) {
    const BwdStep<scalar_t> s = backward_step(p, step, maxlen);
    for (int64_t row0 = 0; row0 < s.n; row0 += g.rbt) {
      const int rows = s.n - row0 < g.rbt ? int(s.n - row0) : g.rbt;
      const int with_prev =
          row0 < s.nprev ? (s.nprev - row0 < g.rbt ? int(s.nprev - row0) : g.rbt) : 0;
      if (with_prev > 0) {  // block-uniform
        tc_product(g, with_prev, ws, as, cs, [&](int64_t m0, int kc) {
          for (int idx = tid; idx < round16(with_prev) * kc; idx += kThreads) {
            const int r = idx / kc, kk = idx % kc;
            const int64_t m = m0 + kk;
            as[r * g.lda + kk] = (r < with_prev && m < GH)
                                     ? tc_operand(s.dg_prev[(row0 + r) * p.dgh_ld + m])
                                     : scalar_t(0);
          }
        });
      }
      for (int idx = tid; idx < rows * Hs; idx += kThreads) {
        const int r = idx / Hs, u = idx % Hs;
        if (j0 + u >= H) continue;
        const float prod = r < with_prev ? cs[r * g.ldc + u] : 0.f;
        backward_cell<scalar_t, float, K>(p, s, row0 + r, j0 + u, prod);
      }
    }
    cg::this_grid().sync();
  }
  store_initial_grads<scalar_t, float, K>(p, j0, Hs);
#endif
}

// ------------------------------------------------------------------ host
// Types with a tensor-core kernel: half, bfloat16, and float32 (TF32).
template <typename scalar_t>
constexpr bool kTensorCores = std::is_same_v<scalar_t, c10::Half> ||
                              std::is_same_v<scalar_t, c10::BFloat16> ||
                              std::is_same_v<scalar_t, float>;

// Whether this call may use the tensor cores: sm_80 and later; float32 only
// where torch allows TF32 for CUDA matmuls (torch.backends.cuda.matmul's
// fp32_precision "tf32", or allow_tf32), by the test cuBLAS's handle set-up makes.
template <typename scalar_t>
bool tensor_cores_allowed() {
  if (!kTensorCores<scalar_t> || cuda::compute_major() < 8) return false;
  return !std::is_same_v<scalar_t, float> ||
         (!at::NoTF32Guard::should_disable_tf32() &&
          at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
              at::Float32Precision::TF32);
}

struct Launch {
  int units = 0;     // 0: does not fit
  int64_t ctas = 0;
  size_t smem = 0;
  bool kernel_tc = false;  // the tensor-core kernel (else the fma one)
};

// The fewest units per CTA (the most CTAs) whose W_hh slice fits in shared
// memory and whose grid, `dirs` groups of CTAs, can be resident at once.
// At most one CTA per SM: every CTA reads all running rows of h each step, so
// more CTAs mean more of that traffic, not more useful parallelism.
// smem_for(units): the kernel's shared memory in bytes, or -1 when its tiles
// cannot have that many units.
template <typename Kernel, typename SmemFor>
Launch plan_launch(Kernel kernel, int64_t H, int dirs, SmemFor smem_for) {
  Launch l;
  const int64_t most =
      std::min(cuda::sm_count(), cuda::cooperative_grid_limit(kernel, kThreads, 0)) / dirs;
  if (most < 1 || H < 1) return l;
  int64_t units = std::max<int64_t>(kMinUnits, (H + most - 1) / most);
  for (; units <= kMaxUnits; ++units) {
    const int64_t bytes = smem_for(int(units));
    if (bytes < 0 || size_t(bytes) > cuda::max_dynamic_smem()) return l;
    const size_t smem = size_t(bytes);
    const int64_t ctas = (H + units - 1) / units;
    if (ctas * dirs <= cuda::cooperative_grid_limit(kernel, kThreads, smem)) {
      l.units = int(units);
      l.ctas = ctas;
      l.smem = smem;
      return l;
    }
  }
  return l;
}

// The persistent launch of `dirs` directions, or units = 0 to take another
// path: the tensor-core kernel where tensor_cores_allowed() and it fits, else
// the fma kernel. The error (a
// forced persistent path that does not fit one direction) names the sizes;
// two directions that do not fit one launch are not an error (each runs in a
// launch of its own). `forward` picks the kernels' shared memory: forward
// G*units product columns over H, backward units columns over G*H.
template <typename scalar_t, typename Kernel>
Launch choose(Kernel tc_kernel, Kernel fma_kernel, bool forward, const char* which, int dirs,
              int64_t B, int64_t H, int G, at::ScalarType dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  const RnnPath path = rnn_path_setting();
  if (path == RnnPath::PerStep || B * H == 0) return {};  // nothing to step: either path
  Launch l;
  if (tensor_cores_allowed<scalar_t>()) {
    auto tc_smem = [&](int units) -> int64_t {
      const int elem = sizeof(scalar_t);
      const TcGeometry geo = forward ? TcGeometry(G * units, H, elem)
                                     : TcGeometry(units, int64_t(G) * H, elem);
      return geo.fits_warps() ? geo.smem() : -1;
    };
    l = plan_launch(tc_kernel, H, dirs, tc_smem);
    l.kernel_tc = l.units > 0;
    // Two directions that fit one launch only on CUDA cores: one tensor-core
    // launch each instead, where one direction fits.
    if (l.units == 0 && dirs > 1 && plan_launch(tc_kernel, H, 1, tc_smem).units > 0) return {};
  }
  if (l.units == 0)
    l = plan_launch(fma_kernel, H, dirs, [&](int units) -> int64_t {
      return int64_t(smem_bytes<scalar_t, acc_t>(G, units, H));
    });
  TORCH_CHECK(l.units > 0 || path == RnnPath::Auto || dirs > 1,
              "VARLEN_KERNELS_RNN_PATH=persistent: the ", which,
              " kernel does not fit this device for hidden_size ", H, ", ", G, " gate(s), dtype ",
              dtype, " (W_hh's slices exceed the shared memory of the CTAs that can be resident ",
              "at once); use 'auto' to fall back to the per-step path");
  return l;
}

template <typename scalar_t, typename acc_t>
using FwdKernel = void (*)(Directions<FwdParams<scalar_t, acc_t>>);
template <typename scalar_t, typename acc_t>
using BwdKernel = void (*)(Directions<BwdParams<scalar_t, acc_t>>);

}  // namespace

std::optional<std::vector<RnnForwardResult>> rnn_forward_persistent(
    Cell cell, const std::vector<PersistentForward>& dirs, const TokenPlan& plan) {
  const int64_t T = plan.T, B = plan.B;
  TORCH_INTERNAL_ASSERT(dirs.size() == 1 || dirs.size() == 2);
  const Tensor& gx0 = dirs[0].gx;
  const int64_t H = dirs[0].w_hh.size(1);
  const int G = num_gates(cell), GS = num_saved_gates(cell), S = num_states(cell);
  const auto opts = gx0.options();
  const auto acc_type = at::toOpMathType(gx0.scalar_type());
  std::optional<std::vector<RnnForwardResult>> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gx0.scalar_type(),
                                  "rnn_forward_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_cell(cell, [&](auto k) {
      constexpr Cell K = decltype(k)::value;
      FwdKernel<scalar_t, acc_t> fma_kernel = persistent_forward_kernel<scalar_t, acc_t, K>;
      FwdKernel<scalar_t, acc_t> tc_kernel = fma_kernel;
      if constexpr (kTensorCores<scalar_t>) tc_kernel = persistent_forward_tc_kernel<scalar_t, K>;
      const Launch l = choose<scalar_t>(tc_kernel, fma_kernel, true, "persistent forward",
                                        int(dirs.size()), B, H, G, gx0.scalar_type());
      if (l.units == 0) return 0;
      const auto kernel = l.kernel_tc ? tc_kernel : fma_kernel;
      const Tensor &sorted_len = plan.sorted_len, &perm = plan.perm, &off = plan.off;
      Directions<FwdParams<scalar_t, acc_t>> args{};
      std::vector<Tensor> keep;  // contiguous operands, alive until the launch is queued
      result.emplace();
      for (size_t d = 0; d < dirs.size(); ++d) {
        const PersistentForward& in = dirs[d];
        const Tensor w = in.w_hh.contiguous(), h0c = in.h0.contiguous();
        const Tensor gx = in.gx.stride(1) == 1 ? in.gx : in.gx.contiguous();
        const Tensor c0c = K == Cell::LSTM ? in.c0.contiguous() : Tensor();
        keep.insert(keep.end(), {w, h0c, gx, c0c});
        Tensor hbuf = at::empty({2, B, H}, opts.dtype(acc_type));
        Tensor cbuf = K == Cell::LSTM ? at::empty({B, H}, opts.dtype(acc_type)) : Tensor();
        keep.insert(keep.end(), {hbuf, cbuf});
        Tensor output = at::zeros({T, B, H}, opts);
        Tensor gates = at::zeros({T * B, GS * H}, opts);
        Tensor states = at::zeros({T * B, S * H}, opts);
        Tensor h_n = at::empty({B, H}, opts);
        Tensor c_n = K == Cell::LSTM ? at::empty({B, H}, opts) : at::empty({0}, opts);
        args.d[d] = FwdParams<scalar_t, acc_t>{
            sorted_len.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(),
            off.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(),
            gx.const_data_ptr<scalar_t>(),
            in.bias.defined() ? in.bias.const_data_ptr<acc_t>() : nullptr,
            in.b_hn.defined() ? in.b_hn.const_data_ptr<acc_t>() : nullptr,
            h0c.const_data_ptr<scalar_t>(),
            K == Cell::LSTM ? c0c.const_data_ptr<scalar_t>() : nullptr,
            hbuf.data_ptr<acc_t>(), K == Cell::LSTM ? cbuf.data_ptr<acc_t>() : nullptr,
            output.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(),
            h_n.data_ptr<scalar_t>(), K == Cell::LSTM ? c_n.data_ptr<scalar_t>() : nullptr,
            T, B, H, gx.stride(0), l.units, in.reverse};
        result->emplace_back(output, h_n, c_n, gates, states);
      }
      args.ctas = l.ctas;
      cuda::launch_cooperative(kernel, dim3(unsigned(l.ctas * int64_t(dirs.size()))),
                               dim3(kThreads), l.smem, cuda::current_stream(), args);
      return 0;
    });
  });
  return result;
}

std::optional<std::vector<PersistentBackwardResult>> rnn_backward_persistent(
    Cell cell, const std::vector<PersistentBackward>& dirs, const TokenPlan& plan) {
  const int64_t T = plan.T, B = plan.B;
  TORCH_INTERNAL_ASSERT(dirs.size() == 1 || dirs.size() == 2);
  const Tensor& dy0 = dirs[0].dy;
  const int64_t H = dirs[0].w_hh.size(1);
  const int G = num_gates(cell);
  const auto opts = dy0.options();
  const auto acc_type = at::toOpMathType(dy0.scalar_type());
  std::optional<std::vector<PersistentBackwardResult>> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy0.scalar_type(),
                                  "rnn_backward_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_cell(cell, [&](auto k) {
      constexpr Cell K = decltype(k)::value;
      BwdKernel<scalar_t, acc_t> fma_kernel = persistent_backward_kernel<scalar_t, acc_t, K>;
      BwdKernel<scalar_t, acc_t> tc_kernel = fma_kernel;
      if constexpr (kTensorCores<scalar_t>) tc_kernel = persistent_backward_tc_kernel<scalar_t, K>;
      const Launch l = choose<scalar_t>(tc_kernel, fma_kernel, false, "persistent backward",
                                        int(dirs.size()), B, H, G, dy0.scalar_type());
      if (l.units == 0) return 0;
      const auto kernel = l.kernel_tc ? tc_kernel : fma_kernel;
      const Tensor &sorted_len = plan.sorted_len, &perm = plan.perm, &off = plan.off;
      Directions<BwdParams<scalar_t, acc_t>> args{};
      std::vector<Tensor> keep;  // operands and scratch, alive until the launch is queued
      result.emplace();
      for (size_t d = 0; d < dirs.size(); ++d) {
        const PersistentBackward& in = dirs[d];
        const Tensor w = in.w_hh.contiguous(), gs = in.gates.contiguous();
        const Tensor st = in.states.contiguous(), dy = in.dy.contiguous();
        const Tensor ghn = in.grad_h_n.to(acc_type).contiguous();
        const Tensor gcn = K == Cell::LSTM ? in.grad_c_n.to(acc_type).contiguous() : Tensor();
        Tensor carry = at::empty({B, H}, opts.dtype(acc_type));
        Tensor dcbuf = K == Cell::LSTM ? at::empty({B, H}, opts.dtype(acc_type)) : Tensor();
        keep.insert(keep.end(), {w, gs, st, dy, ghn, gcn, carry, dcbuf});
        Tensor dgx = in.dgx.defined() ? in.dgx : at::zeros({T * B, G * H}, opts);
        Tensor dgh = K == Cell::GRU ? at::zeros({T * B, G * H}, opts) : dgx;
        TORCH_INTERNAL_ASSERT(dgx.stride(1) == 1 && dgx.size(0) == T * B && dgx.size(1) == G * H);
        Tensor grad_h0 = at::empty({B, H}, opts.dtype(acc_type));
        Tensor grad_c0 = K == Cell::LSTM ? at::empty({B, H}, opts.dtype(acc_type)) : Tensor();
        args.d[d] = BwdParams<scalar_t, acc_t>{
            sorted_len.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(),
            off.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(),
            gs.const_data_ptr<scalar_t>(),
            st.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
            ghn.const_data_ptr<acc_t>(), K == Cell::LSTM ? gcn.const_data_ptr<acc_t>() : nullptr,
            carry.data_ptr<acc_t>(), K == Cell::LSTM ? dcbuf.data_ptr<acc_t>() : nullptr,
            dgx.data_ptr<scalar_t>(), dgh.data_ptr<scalar_t>(), grad_h0.data_ptr<acc_t>(),
            K == Cell::LSTM ? grad_c0.data_ptr<acc_t>() : nullptr, T, B, H, G, dgx.stride(0),
            dgh.stride(0), l.units, in.reverse};
        result->emplace_back(dgx, dgh, grad_h0, grad_c0);
      }
      args.ctas = l.ctas;
      cuda::launch_cooperative(kernel, dim3(unsigned(l.ctas * int64_t(dirs.size()))),
                               dim3(kThreads), l.smem, cuda::current_stream(), args);
      return 0;
    });
  });
  return result;
}

}  // namespace varlen
