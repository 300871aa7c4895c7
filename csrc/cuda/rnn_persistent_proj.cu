// Persistent CUDA kernels of the LSTM with a projection (nn.LSTM's proj_size
// P < H): one cooperative launch runs all time steps of a layer direction, or
// of both directions of a bidirectional layer (a group of CTAs each), as for
// the plain cells (rnn_persistent.h), with two grid-wide barriers a step where
// those have one, since the step holds two products that each need the
// other's whole result.
//
// CTA c (of its direction's group) owns hidden units [c*Hs, (c+1)*Hs) and projected features
// [c*Ps, (c+1)*Ps), and keeps in shared memory for the whole launch:
//   forward   W_hh's rows of its units (every gate; over P) and W_hr's rows of
//             its features (over H). A step: (a) the gates of its units for
//             the running rows, h_{t-1} W_hh^T, and the cell, which gives
//             r = o * tanh(c); barrier; (b) its features of h_t = r W_hr^T;
//             barrier.
//   backward  W_hh's columns of its features (over 4H) and W_hr's columns of
//             its units (over P). A step: (1) its features of d h'_t: the
//             carry, the output's gradient and the previous step's
//             pre-activation gradients times W_hh; barrier; (2) d r = d h'_t
//             W_hr for its units and the cell's backward, which gives this
//             step's pre-activation gradients; barrier.
// The running rows are a prefix of the length order and each product works
// on that prefix only, in tiles of rows; the launch stops at the longest
// length, lengths are never read on the host.
//
// Workspaces and results are the per-step path's (masked_rnn_cuda.cu), packed:
// gates (T*B, 4H), states (T*B, 2H + P) = [r | c_prev | h_prev], rows past the
// valid tokens zero; either path's backward takes either path's forward.
//
// The products: on tensor cores (tc_product, rnn_persistent.cuh) in half and
// bfloat16, and in float32 where torch allows TF32, with the row operand (h,
// r, the backward's pre-activation gradients and d h') rounded to the storage
// type (TF32 for float32), as the per-step path's GEMMs take them; else with
// fma on CUDA cores in the math type (fma_product, below). The states, r, d h'
// and the carries stay in the math type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>

#include "../cell_math.h"
#include "rnn_persistent.cuh"
#include "rnn_point.cuh"

namespace varlen {
namespace {

// ------------------------------------------------------------------ fma product
// C (rows x n) = A (rows x k) W^T on CUDA cores, W (n x k) in shared memory
// as ws[k * n + col] (a warp's threads read consecutive columns), A staged
// kChunk columns at a time as as[kk * (rbt + 1) + r] (read as a broadcast),
// C to shared memory as cs[r * n + col]. Thread tid computes columns
// tid % slots + q * slots (q < kFmaCols) of rows tid / slots + r * groups
// (r < kFmaRows); threads past groups * slots only stage.
constexpr int kFmaRows = 4, kFmaCols = 2, kFmaMaxGroups = 32;

struct FmaGeometry {
  int n, slots, groups, rbt;  // columns; column slots; row groups; rows of a tile
  int64_t k;                  // reduction length
  int w_elem, a_elem;         // bytes of W's and of A's / C's elements
  __host__ __device__ FmaGeometry(int n_, int64_t k_, int w_elem_, int a_elem_)
      : n(n_), k(k_), w_elem(w_elem_), a_elem(a_elem_) {
    slots = n < kThreads ? n : kThreads;
    groups = kThreads / slots < kFmaMaxGroups ? kThreads / slots : kFmaMaxGroups;
    rbt = groups * kFmaRows;
  }
  __host__ __device__ bool fits() const { return n >= 1 && n <= kFmaCols * kThreads; }
  __host__ __device__ int64_t w_bytes() const { return int64_t(align16(size_t(n) * k * w_elem)); }
  __host__ __device__ int64_t a_bytes() const {
    return int64_t(align16(size_t(kChunk) * (rbt + 1) * a_elem));
  }
  __host__ __device__ int64_t c_bytes() const { return int64_t(align16(size_t(rbt) * n * a_elem)); }
  __host__ __device__ int64_t w_at(int64_t col, int64_t kk) const { return kk * n + col; }
  __host__ __device__ int64_t a_at(int r, int kk) const { return int64_t(kk) * (rbt + 1) + r; }
  __host__ __device__ int64_t c_at(int r, int col) const { return int64_t(r) * n + col; }
  __host__ __device__ int stage_rows(int rows) const { return rows; }
  __host__ __device__ int64_t w_cols() const { return n; }
  __host__ __device__ int64_t w_depth() const { return k; }
};

// As tc_product: block-uniform; stage(k0, kc) fills A's columns [k0, k0 + kc)
// of the rows below `rows`; C's rows below `rows` are in cs on return.
template <typename scalar_t, typename acc_t, typename Stage>
__device__ __forceinline__ void fma_product(const FmaGeometry& g, int rows, const scalar_t* ws,
                                            acc_t* as, acc_t* cs, Stage stage) {
  const int tid = threadIdx.x, col0 = tid % g.slots, grp = tid / g.slots;
  const bool active = grp < g.groups;
  acc_t acc[kFmaRows][kFmaCols];
#pragma unroll
  for (int r = 0; r < kFmaRows; ++r)
#pragma unroll
    for (int q = 0; q < kFmaCols; ++q) acc[r][q] = acc_t(0);
  for (int64_t k0 = 0; k0 < g.k; k0 += kChunk) {
    const int kc = g.k - k0 < kChunk ? int(g.k - k0) : kChunk;
    __syncthreads();  // the previous chunk (and tile) is consumed
    stage(k0, kc);
    __syncthreads();
    if (!active) continue;
    for (int kk = 0; kk < kc; ++kk) {
      acc_t wv[kFmaCols];
#pragma unroll
      for (int q = 0; q < kFmaCols; ++q) {
        const int col = col0 + q * g.slots;
        wv[q] = col < g.n ? acc_t(ws[g.w_at(col, k0 + kk)]) : acc_t(0);
      }
#pragma unroll
      for (int r = 0; r < kFmaRows; ++r) {
        const int row = grp + r * g.groups;
        if (row >= rows) break;
        const acc_t a = as[g.a_at(row, kk)];
#pragma unroll
        for (int q = 0; q < kFmaCols; ++q) acc[r][q] += wv[q] * a;
      }
    }
  }
  if (active) {
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) {
      const int row = grp + r * g.groups;
      if (row >= rows) break;
#pragma unroll
      for (int q = 0; q < kFmaCols; ++q) {
        const int col = col0 + q * g.slots;
        if (col < g.n) cs[g.c_at(row, col)] = acc[r][q];
      }
    }
  }
  __syncthreads();  // C complete for the threads that use it
}

// The two ways of running the products, as one interface for the kernels:
// the geometry, the operand types in shared memory (A: op_t, C: c_t), how a
// value becomes an operand, and the product.
template <typename scalar_t, typename acc_t>
struct FmaProduct {
  using Geo = FmaGeometry;
  using op_t = acc_t;
  using c_t = acc_t;
  __host__ __device__ static Geo geo(int n, int64_t k) {
    return Geo(n, k, int(sizeof(scalar_t)), int(sizeof(acc_t)));
  }
  __device__ static op_t operand(acc_t v) { return v; }
  __device__ static scalar_t weight(scalar_t v) { return v; }
  template <typename Stage>
  __device__ static void product(const Geo& g, int rows, const scalar_t* ws, op_t* as, c_t* cs,
                                 Stage stage) {
    fma_product(g, rows, ws, as, cs, stage);
  }
};

template <typename scalar_t>
struct TcProduct {
  using Geo = TcGeometry;
  using op_t = scalar_t;
  using c_t = float;
  __host__ __device__ static Geo geo(int n, int64_t k) { return Geo(n, k, int(sizeof(scalar_t))); }
  __device__ static op_t operand(float v) { return tc_operand(scalar_t(v)); }
  __device__ static scalar_t weight(scalar_t v) { return tc_operand(v); }
  template <typename Stage>
  __device__ static void product(const Geo& g, int rows, const scalar_t* ws, op_t* as, c_t* cs,
                                 Stage stage) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // mma.sync in bfloat16 and TF32 needs sm_80; the host launches these on sm_80 and later only
#else
    tc_product(g, rows, ws, staged(as, stage), cs);
#endif
  }
};

// The tensor-core product where the type has one, else the CUDA-core one: a
// type, so that the host code never names a tensor-core kernel of a type
// without one (nvcc would want a definition of it).
template <typename scalar_t, typename acc_t>
using TcOrFmaProduct = std::conditional_t<kTensorCores<scalar_t>, TcProduct<scalar_t>,
                                          FmaProduct<scalar_t, acc_t>>;

// Shared memory of a kernel with two products (a, then b): both weight slices,
// one staging area and one C, each as large as the larger of the two needs.
// -1 where a product's tiles cannot have that many columns.
template <typename Prod>
int64_t two_product_smem(const typename Prod::Geo& a, const typename Prod::Geo& b) {
  if (!a.fits() || !b.fits()) return -1;
  return a.w_bytes() + b.w_bytes() + std::max(a.a_bytes(), b.a_bytes()) +
         std::max(a.c_bytes(), b.c_bytes());
}

// The pieces of that shared memory.
template <typename scalar_t, typename Prod>
struct TwoProductSmem {
  scalar_t *wa, *wb;
  typename Prod::op_t* as;
  typename Prod::c_t* cs;
  __device__ TwoProductSmem(unsigned char* smem, const typename Prod::Geo& a,
                            const typename Prod::Geo& b) {
    wa = reinterpret_cast<scalar_t*>(smem);
    wb = reinterpret_cast<scalar_t*>(smem + a.w_bytes());
    const int64_t staged = a.w_bytes() + b.w_bytes();
    as = reinterpret_cast<typename Prod::op_t*>(smem + staged);
    cs = reinterpret_cast<typename Prod::c_t*>(
        smem + staged + (a.a_bytes() > b.a_bytes() ? a.a_bytes() : b.a_bytes()));
  }
};

// Fills the weight slice ws of geometry g: element (col, kk) is value(col, kk)
// for col < cols and kk < depth, zero elsewhere (the padding of the tiles).
// Consecutive threads take consecutive kk, or with kColsFastest consecutive
// columns: whichever are adjacent in the weight's global memory.
template <typename Prod, bool kColsFastest, typename scalar_t, typename Value>
__device__ void load_weights(const typename Prod::Geo& g, scalar_t* ws, int64_t cols,
                             int64_t depth, Value value) {
  const int64_t wc = g.w_cols(), wd = g.w_depth();
  for (int64_t idx = threadIdx.x; idx < wc * wd; idx += kThreads) {
    const int64_t col = kColsFastest ? idx % wc : idx / wd;
    const int64_t kk = kColsFastest ? idx / wc : idx % wd;
    ws[g.w_at(col, kk)] = (col < cols && kk < depth) ? Prod::weight(value(col, kk)) : scalar_t(0);
  }
}

// C (rows x g.n) of rows [0, rows) whose A row r, column k is value(r, k),
// k < depth: the product, staging A through Prod::operand.
template <typename Prod, typename scalar_t, typename Value>
__device__ __forceinline__ void product_of_rows(const typename Prod::Geo& g, int rows,
                                                int64_t depth, const scalar_t* ws,
                                                typename Prod::op_t* as, typename Prod::c_t* cs,
                                                Value value) {
  using op_t = typename Prod::op_t;
  Prod::product(g, rows, ws, as, cs, [&](int64_t k0, int kc) {
    for_tile_elements(g.stage_rows(rows), kc, [&](int r, int kk) {
      const int64_t k = k0 + kk;
      as[g.a_at(r, kk)] = (r < rows && k < depth) ? Prod::operand(value(r, k)) : op_t(0);
    });
  });
}

// ------------------------------------------------------------------ forward
template <typename scalar_t, typename acc_t>
struct ProjFwdParams {
  const int64_t* sorted_len;  // (B,) lengths, longest first
  const int64_t* perm;        // (B,) batch index of each row of that order
  const int64_t* off;         // (T+1,) first token row of each step (token_plan.h)
  const scalar_t* w_hh;       // (4H, P)
  const scalar_t* w_hr;       // (P, H)
  const scalar_t* gx;         // (T*B, 4H) x W_ih^T, packed, row stride gx_ld
  const acc_t* bias;          // (4H,) folded biases or nullptr
  const scalar_t* h0;         // (B, P)
  const scalar_t* c0;         // (B, H)
  acc_t* hbuf;                // (2, B, P) h, length order, as the plain kernels' hbuf
  acc_t* cbuf;                // (B, H) c, length order
  acc_t* rbuf;                // (B, H) r of the step, length order
  scalar_t* y;                // (T, B, P) output, zero-initialized
  scalar_t* gates;            // (T*B, 4H) workspace, packed, zero-initialized
  scalar_t* states;           // (T*B, 2H + P) workspace, packed, zero-initialized
  scalar_t* h_n;              // (B, P)
  scalar_t* c_n;              // (B, H)
  int64_t T, B, H, P, gx_ld;
  int units, features;        // Hs, Ps: hidden units and projected features per CTA
  bool reverse;
};

template <typename scalar_t, typename acc_t, typename Prod>
__global__ void __launch_bounds__(kThreads, 1)
    proj_forward_kernel(Directions<ProjFwdParams<scalar_t, acc_t>> L) {
  int64_t j0;
  const ProjFwdParams<scalar_t, acc_t> p = direction_of_cta(L, j0);
  const int64_t H = p.H, P = p.P, B = p.B, SW = 2 * H + P, BP = B * P;
  const int Hs = p.units, Ps = p.features, tid = threadIdx.x;
  const int64_t p0 = j0 / Hs * Ps;  // the CTA's first feature
  const auto ga = Prod::geo(4 * Hs, P);  // (a): column gate * Hs + u of unit j0 + u, over P
  const auto gb = Prod::geo(Ps, H);      // (b): column v of feature p0 + v, over H
  VK_DYNAMIC_SHARED(unsigned char, smem);
  const TwoProductSmem<scalar_t, Prod> sm(smem, ga, gb);
  load_weights<Prod, false>(ga, sm.wa, ga.n, P, [&](int64_t col, int64_t k) {
    const int64_t jj = j0 + col % Hs;
    return jj < H ? p.w_hh[((col / Hs) * H + jj) * P + k] : scalar_t(0);
  });
  load_weights<Prod, false>(gb, sm.wb, gb.n, H, [&](int64_t col, int64_t k) {
    return p0 + col < P ? p.w_hr[(p0 + col) * H + k] : scalar_t(0);
  });
  for (int64_t idx = tid; idx < B * Ps; idx += kThreads) {
    const int64_t i = idx / Ps, f = p0 + idx % Ps;
    if (f >= P) continue;
    const acc_t h = acc_t(p.h0[p.perm[i] * P + f]);
    p.hbuf[i * P + f] = h;
    p.hbuf[BP + i * P + f] = h;
  }
  for (int64_t idx = tid; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, j = j0 + idx % Hs;
    if (j < H) p.cbuf[i * H + j] = acc_t(p.c0[p.perm[i] * H + j]);
  }
  const int64_t maxlen = longest(p.sorted_len, B, p.T);
  cg::this_grid().sync();  // every feature's h0 is in place

  for (int64_t step = 0; step < maxlen; ++step) {
    // Buffers as the plain kernels': forward step t reads t & 1, writes the
    // other; reverse step t reads (t + 1) & 1, writes t & 1.
    const int64_t t = p.reverse ? maxlen - 1 - step : step;
    const int64_t nrun = count_running(p.off, t), row0 = p.off[t];
    const acc_t* hin = p.hbuf + (p.reverse ? ((t + 1) & 1) : (t & 1)) * BP;
    acc_t* hout = p.hbuf + (p.reverse ? (t & 1) : ((t + 1) & 1)) * BP;
    // (a) the cell of the CTA's units
    for (int64_t tile = 0; tile < nrun; tile += ga.rbt) {
      const int rows = nrun - tile < ga.rbt ? int(nrun - tile) : ga.rbt;
      product_of_rows<Prod>(ga, rows, P, sm.wa, sm.as, sm.cs,
                            [&](int r, int64_t k) { return hin[(tile + r) * P + k]; });
      for (int idx = tid; idx < rows * Hs; idx += kThreads) {
        const int r = idx / Hs, u = idx % Hs;
        const int64_t j = j0 + u, i = tile + r, row = row0 + i;
        if (j >= H) continue;
        acc_t hid[4];
#pragma unroll
        for (int gate = 0; gate < 4; ++gate) hid[gate] = acc_t(sm.cs[ga.c_at(r, gate * Hs + u)]);
        // forward_point writes [h_prev, c_prev] of a plain LSTM; here the
        // first block is r, and h_prev (P wide) comes last, from (b).
        scalar_t* st = p.states + row * SW + j;
        const acc_t rv = forward_point<scalar_t, acc_t, Cell::LSTM>(
            p.gx + row * p.gx_ld + j, p.bias, nullptr, j, H, hid, acc_t(0), p.cbuf + i * H + j,
            p.gates + row * 4 * H + j, st);
        st[0] = scalar_t(rv);
        p.rbuf[i * H + j] = rv;
      }
    }
    cg::this_grid().sync();  // r of every unit in place
    // (b) the CTA's features of h_t = r W_hr^T (a CTA past the last feature
    // has none: with P < H some CTAs own units only)
    for (int64_t tile = 0; p0 < P && tile < nrun; tile += gb.rbt) {
      const int rows = nrun - tile < gb.rbt ? int(nrun - tile) : gb.rbt;
      product_of_rows<Prod>(gb, rows, H, sm.wb, sm.as, sm.cs,
                            [&](int r, int64_t k) { return p.rbuf[(tile + r) * H + k]; });
      for (int idx = tid; idx < rows * Ps; idx += kThreads) {
        const int r = idx / Ps, v = idx % Ps;
        const int64_t f = p0 + v, i = tile + r, row = row0 + i;
        if (f >= P) continue;
        const acc_t h = acc_t(sm.cs[gb.c_at(r, v)]);
        p.states[row * SW + 2 * H + f] = scalar_t(hin[i * P + f]);
        hout[i * P + f] = h;
        p.y[(t * B + p.perm[i]) * P + f] = scalar_t(h);
      }
    }
    cg::this_grid().sync();  // h_t complete before any CTA reads it
  }
  for (int64_t idx = tid; idx < B * Ps; idx += kThreads) {
    const int64_t i = idx / Ps, f = p0 + idx % Ps;
    if (f >= P) continue;
    const int64_t buf = p.reverse ? 0 : (p.sorted_len[i] & 1);
    p.h_n[p.perm[i] * P + f] = scalar_t(p.hbuf[buf * BP + i * P + f]);
  }
  for (int64_t idx = tid; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, j = j0 + idx % Hs;
    if (j < H) p.c_n[p.perm[i] * H + j] = scalar_t(p.cbuf[i * H + j]);
  }
}

// ------------------------------------------------------------------ backward
template <typename scalar_t, typename acc_t>
struct ProjBwdParams {
  const int64_t* sorted_len;  // (B,) lengths, longest first
  const int64_t* perm;        // (B,) batch index of each row of that order
  const int64_t* off;         // (T+1,) first token row of each step
  const scalar_t* w_hh;       // (4H, P)
  const scalar_t* w_hr;       // (P, H)
  const scalar_t* gates;      // (T*B, 4H) the forward's workspaces, packed
  const scalar_t* states;     // (T*B, 2H + P)
  const scalar_t* dy;         // (T, B, P) gradient of the output, padded
  const acc_t* grad_h_n;      // (B, P)
  const acc_t* grad_c_n;      // (B, H)
  acc_t* carry;               // (B, P) length order: d h' not yet given to a step
  acc_t* dhbuf;               // (B, P) length order: d h' of the running rows at the step
  acc_t* dcbuf;               // (B, H) length order: d c'
  scalar_t* dgx;              // (T*B, 4H) pre-activation gradients, packed, zero-initialized,
                              // row stride dgx_ld
  scalar_t* dh_tok;           // (T*B, P) d h' of each token, packed, zero-initialized
  acc_t* grad_h0;             // (B, P)
  acc_t* grad_c0;             // (B, H)
  int64_t T, B, H, P, dgx_ld;
  int units, features;
  bool reverse;
};

// Steps in the reverse of the forward's order, as the plain kernels' backward:
// at step t a running row gets d h'_t = carry + dy_t + dg_prev W_hh (dg_prev:
// its pre-activation gradients at the step processed before, none for a row
// that starts here, whose carry is grad_h_n); a row that ran at the previous
// step but not at this one has finished, and carry + dg_prev W_hh is its
// grad_h0. One step past the last handles the rows that finish there.
template <typename scalar_t, typename acc_t, typename Prod>
__global__ void __launch_bounds__(kThreads, 1)
    proj_backward_kernel(Directions<ProjBwdParams<scalar_t, acc_t>> L) {
  int64_t j0;
  const ProjBwdParams<scalar_t, acc_t> p = direction_of_cta(L, j0);
  const int64_t H = p.H, P = p.P, B = p.B, SW = 2 * H + p.P, GH = 4 * H, ld = p.dgx_ld;
  const int Hs = p.units, Ps = p.features, tid = threadIdx.x;
  const int64_t p0 = j0 / Hs * Ps;  // the CTA's first feature
  const auto g1 = Prod::geo(Ps, GH);  // (1): column v of feature p0 + v, over 4H
  const auto g2 = Prod::geo(Hs, P);   // (2): column u of unit j0 + u, over P
  VK_DYNAMIC_SHARED(unsigned char, smem);
  const TwoProductSmem<scalar_t, Prod> sm(smem, g1, g2);
  load_weights<Prod, true>(g1, sm.wa, g1.n, GH, [&](int64_t col, int64_t m) {
    return p0 + col < P ? p.w_hh[m * P + p0 + col] : scalar_t(0);
  });
  load_weights<Prod, true>(g2, sm.wb, g2.n, P, [&](int64_t col, int64_t k) {
    return j0 + col < H ? p.w_hr[k * H + j0 + col] : scalar_t(0);
  });
  for (int64_t idx = tid; idx < B * Ps; idx += kThreads) {
    const int64_t i = idx / Ps, f = p0 + idx % Ps;
    if (f < P) p.carry[i * P + f] = p.grad_h_n[p.perm[i] * P + f];
  }
  for (int64_t idx = tid; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, j = j0 + idx % Hs;
    if (j < H) p.dcbuf[i * H + j] = p.grad_c_n[p.perm[i] * H + j];
  }
  const int64_t maxlen = longest(p.sorted_len, B, p.T);
  __syncthreads();  // the carries are read by other threads of the CTA

  for (int64_t step = 0; step <= maxlen; ++step) {
    const bool last = step == maxlen;  // no step to run, only rows to finish
    const int64_t t = last ? -1 : (p.reverse ? step : maxlen - 1 - step);
    const int64_t tp = p.reverse ? step - 1 : maxlen - step;
    const int64_t nrun = last ? 0 : count_running(p.off, t);
    const int64_t nprev = step > 0 ? count_running(p.off, tp) : 0;
    const int64_t n = nrun > nprev ? nrun : nprev, row0 = last ? 0 : p.off[t];
    const scalar_t* dg_prev = p.dgx + (step > 0 ? p.off[tp] : 0) * ld;
    // (1) the CTA's features of d h' (none past the last feature)
    for (int64_t tile = 0; p0 < P && tile < n; tile += g1.rbt) {
      const int rows = n - tile < g1.rbt ? int(n - tile) : g1.rbt;
      const int with_prev =
          tile < nprev ? (nprev - tile < g1.rbt ? int(nprev - tile) : g1.rbt) : 0;
      if (with_prev > 0)  // block-uniform
        product_of_rows<Prod>(g1, with_prev, GH, sm.wa, sm.as, sm.cs, [&](int r, int64_t m) {
          return acc_t(dg_prev[(tile + r) * ld + m]);
        });
      for (int idx = tid; idx < rows * Ps; idx += kThreads) {
        const int r = idx / Ps, v = idx % Ps;
        const int64_t f = p0 + v, i = tile + r;
        if (f >= P) continue;
        const acc_t prod = r < with_prev ? acc_t(sm.cs[g1.c_at(r, v)]) : acc_t(0);
        acc_t* carry = p.carry + i * P + f;
        if (i < nrun) {
          const acc_t d = *carry + prod + acc_t(p.dy[(t * B + p.perm[i]) * P + f]);
          *carry = acc_t(0);
          p.dhbuf[i * P + f] = d;
          p.dh_tok[(row0 + i) * P + f] = scalar_t(d);
        } else {
          *carry += prod;  // finished: this is d h0
        }
      }
    }
    cg::this_grid().sync();  // d h' of every feature in place
    if (last) break;
    // (2) d r = d h' W_hr for the CTA's units, and the cell's backward
    for (int64_t tile = 0; tile < nrun; tile += g2.rbt) {
      const int rows = nrun - tile < g2.rbt ? int(nrun - tile) : g2.rbt;
      product_of_rows<Prod>(g2, rows, P, sm.wb, sm.as, sm.cs,
                            [&](int r, int64_t k) { return p.dhbuf[(tile + r) * P + k]; });
      for (int idx = tid; idx < rows * Hs; idx += kThreads) {
        const int r = idx / Hs, u = idx % Hs;
        const int64_t j = j0 + u, i = tile + r, row = row0 + i;
        if (j >= H) continue;
        scalar_t* g = p.dgx + row * ld + j;
        backward_point<scalar_t, acc_t, Cell::LSTM>(p.gates + row * GH + j,
                                                    p.states + row * SW + j, H,
                                                    acc_t(sm.cs[g2.c_at(r, u)]),
                                                    p.dcbuf + i * H + j, g, g);
      }
    }
    cg::this_grid().sync();  // this step's pre-activation gradients complete
  }
  for (int64_t idx = tid; idx < B * Ps; idx += kThreads) {
    const int64_t i = idx / Ps, f = p0 + idx % Ps;
    if (f < P) p.grad_h0[p.perm[i] * P + f] = p.carry[i * P + f];
  }
  for (int64_t idx = tid; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, j = j0 + idx % Hs;
    if (j < H) p.grad_c0[p.perm[i] * H + j] = p.dcbuf[i * H + j];
  }
}

// ------------------------------------------------------------------ host
// Features per CTA where `units` hidden units each make ceil(H / units) CTAs.
int64_t features_per_cta(int64_t H, int64_t P, int units) {
  const int64_t ctas = (H + units - 1) / units;
  return (P + ctas - 1) / ctas;
}

// The launch of `dirs` directions, or units = 0 (see choose_launch). forward:
// products (a) 4*units columns over P and (b) Ps over H; backward: (1) Ps
// columns over 4H and (2) units over P. On tensor cores a product's columns
// are padded to 8 (16 past 8, TcGeometry::tn), so the backward's W_hh slice
// takes 8 x 4H values however few features a CTA has: beyond H of about 2.5k
// (16-bit types) or 1.3k (TF32), with P = H/4, on 132 SMs of 227 KiB of
// shared memory the fma kernel runs instead.
template <typename scalar_t, typename Kernel>
Launch choose_proj(Kernel tc_kernel, Kernel fma_kernel, bool forward, int dirs, int64_t B,
                   int64_t H, int64_t P, at::ScalarType dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  TORCH_INTERNAL_ASSERT(P >= 1 && P < H);  // check_proj_args
  auto smem = [&](auto product) {
    using Prod = decltype(product);
    return [=](int units) -> int64_t {
      const int Ps = int(features_per_cta(H, P, units));
      return forward ? two_product_smem<Prod>(Prod::geo(4 * units, P), Prod::geo(Ps, H))
                     : two_product_smem<Prod>(Prod::geo(Ps, 4 * H), Prod::geo(units, P));
    };
  };
  auto fma_smem = smem(FmaProduct<scalar_t, acc_t>{});
  auto sizes = [&] { return c10::str("hidden_size ", H, ", proj_size ", P, ", dtype ", dtype); };
  const char* which = forward ? "persistent projection forward" : "persistent projection backward";
  const PersistentSettings set = persistent_settings();
  if constexpr (kTensorCores<scalar_t>)
    return choose_launch<scalar_t>(set, tc_kernel, fma_kernel, which, dirs, B * H, sizes,
                                   smem(TcProduct<scalar_t>{}), fma_smem, H);
  else
    return choose_launch<scalar_t>(set, tc_kernel, fma_kernel, which, dirs, B * H, sizes,
                                   fma_smem, fma_smem, H);
}

template <typename scalar_t, typename acc_t>
using ProjFwdKernel = void (*)(Directions<ProjFwdParams<scalar_t, acc_t>>);
template <typename scalar_t, typename acc_t>
using ProjBwdKernel = void (*)(Directions<ProjBwdParams<scalar_t, acc_t>>);

}  // namespace

std::optional<std::vector<RnnForwardResult>> rnn_forward_proj_persistent(
    const std::vector<ProjPersistentForward>& dirs, const TokenPlan& plan) {
  TORCH_INTERNAL_ASSERT(dirs.size() == 1 || dirs.size() == 2);
  const ProjPersistentForward& first = dirs[0];
  const int64_t T = plan.T, B = plan.B, H = first.w_hr.size(1), P = first.w_hr.size(0);
  const auto opts = first.gx.options();
  const auto acc_type = at::toOpMathType(first.gx.scalar_type());
  std::optional<std::vector<RnnForwardResult>> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.gx.scalar_type(),
                                  "rnn_forward_proj_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ProjFwdKernel<scalar_t, acc_t> fma_kernel =
        proj_forward_kernel<scalar_t, acc_t, FmaProduct<scalar_t, acc_t>>;
    ProjFwdKernel<scalar_t, acc_t> tc_kernel =
        proj_forward_kernel<scalar_t, acc_t, TcOrFmaProduct<scalar_t, acc_t>>;
    const Launch l = choose_proj<scalar_t>(tc_kernel, fma_kernel, true, int(dirs.size()), B, H,
                                           P, first.gx.scalar_type());
    if (l.units == 0) return;
    std::vector<Tensor> keep;  // operands and scratch, alive until the launch is queued
    result.emplace();
    const bool launched = launch_directions(tc_kernel, fma_kernel, l, dirs.size(),
                                            "persistent projection forward", [&](size_t d) {
      const ProjPersistentForward& in = dirs[d];
      const Tensor w_hh = in.w_hh.contiguous(), w_hr = in.w_hr.contiguous();
      const Tensor gx = in.gx.stride(1) == 1 ? in.gx : in.gx.contiguous();
      const Tensor h0 = in.h0.contiguous(), c0 = in.c0.contiguous();
      Tensor hbuf = at::empty({2, B, P}, opts.dtype(acc_type));
      Tensor cbuf = at::empty({B, H}, opts.dtype(acc_type));
      Tensor rbuf = at::empty({B, H}, opts.dtype(acc_type));
      keep.insert(keep.end(), {w_hh, w_hr, gx, h0, c0, hbuf, cbuf, rbuf});
      Tensor output = at::zeros({T, B, P}, opts);
      Tensor gates = at::zeros({T * B, 4 * H}, opts);
      Tensor states = at::zeros({T * B, 2 * H + P}, opts);
      Tensor h_n = at::empty({B, P}, opts), c_n = at::empty({B, H}, opts);
      const ProjFwdParams<scalar_t, acc_t> params{
          plan.sorted_len.const_data_ptr<int64_t>(), plan.perm.const_data_ptr<int64_t>(),
          plan.off.const_data_ptr<int64_t>(), w_hh.const_data_ptr<scalar_t>(),
          w_hr.const_data_ptr<scalar_t>(), gx.const_data_ptr<scalar_t>(),
          in.bias.defined() ? in.bias.const_data_ptr<acc_t>() : nullptr,
          h0.const_data_ptr<scalar_t>(), c0.const_data_ptr<scalar_t>(), hbuf.data_ptr<acc_t>(),
          cbuf.data_ptr<acc_t>(), rbuf.data_ptr<acc_t>(), output.data_ptr<scalar_t>(),
          gates.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
          c_n.data_ptr<scalar_t>(), T, B, H, P, gx.stride(0), l.units,
          int(features_per_cta(H, P, l.units)), in.reverse};
      result->emplace_back(output, h_n, c_n, gates, states);
      return params;
    });
    if (!launched) result.reset();  // refused at run time: another path
  });
  return result;
}

std::optional<std::vector<ProjPersistentBackwardResult>> rnn_backward_proj_persistent(
    const std::vector<ProjPersistentBackward>& dirs, const TokenPlan& plan) {
  TORCH_INTERNAL_ASSERT(dirs.size() == 1 || dirs.size() == 2);
  const ProjPersistentBackward& first = dirs[0];
  const int64_t T = plan.T, B = plan.B, H = first.w_hr.size(1), P = first.w_hr.size(0);
  const auto opts = first.dy.options();
  const auto acc_type = at::toOpMathType(first.dy.scalar_type());
  std::optional<std::vector<ProjPersistentBackwardResult>> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.dy.scalar_type(),
                                  "rnn_backward_proj_persistent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ProjBwdKernel<scalar_t, acc_t> fma_kernel =
        proj_backward_kernel<scalar_t, acc_t, FmaProduct<scalar_t, acc_t>>;
    ProjBwdKernel<scalar_t, acc_t> tc_kernel =
        proj_backward_kernel<scalar_t, acc_t, TcOrFmaProduct<scalar_t, acc_t>>;
    const Launch l = choose_proj<scalar_t>(tc_kernel, fma_kernel, false, int(dirs.size()), B, H,
                                           P, first.dy.scalar_type());
    if (l.units == 0) return;
    std::vector<Tensor> keep;  // operands and scratch, alive until the launch is queued
    result.emplace();
    const bool launched = launch_directions(tc_kernel, fma_kernel, l, dirs.size(),
                                            "persistent projection backward", [&](size_t d) {
      const ProjPersistentBackward& in = dirs[d];
      const Tensor w_hh = in.w_hh.contiguous(), w_hr = in.w_hr.contiguous();
      const Tensor gates = in.gates.contiguous(), states = in.states.contiguous();
      const Tensor dy = in.dy.contiguous();
      const Tensor ghn = in.grad_h_n.to(acc_type).contiguous();
      const Tensor gcn = in.grad_c_n.to(acc_type).contiguous();
      Tensor carry = at::empty({B, P}, opts.dtype(acc_type));
      Tensor dhbuf = at::empty({B, P}, opts.dtype(acc_type));
      Tensor dcbuf = at::empty({B, H}, opts.dtype(acc_type));
      keep.insert(keep.end(), {w_hh, w_hr, gates, states, dy, ghn, gcn, carry, dhbuf, dcbuf});
      Tensor dgx = in.dgx.defined() ? in.dgx : at::zeros({T * B, 4 * H}, opts);
      TORCH_INTERNAL_ASSERT(dgx.stride(1) == 1 && dgx.size(0) == T * B && dgx.size(1) == 4 * H);
      Tensor dh_tok = at::zeros({T * B, P}, opts);
      Tensor grad_h0 = at::empty({B, P}, opts.dtype(acc_type));
      Tensor grad_c0 = at::empty({B, H}, opts.dtype(acc_type));
      const ProjBwdParams<scalar_t, acc_t> params{
          plan.sorted_len.const_data_ptr<int64_t>(), plan.perm.const_data_ptr<int64_t>(),
          plan.off.const_data_ptr<int64_t>(), w_hh.const_data_ptr<scalar_t>(),
          w_hr.const_data_ptr<scalar_t>(), gates.const_data_ptr<scalar_t>(),
          states.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
          ghn.const_data_ptr<acc_t>(), gcn.const_data_ptr<acc_t>(), carry.data_ptr<acc_t>(),
          dhbuf.data_ptr<acc_t>(), dcbuf.data_ptr<acc_t>(), dgx.data_ptr<scalar_t>(),
          dh_tok.data_ptr<scalar_t>(), grad_h0.data_ptr<acc_t>(), grad_c0.data_ptr<acc_t>(), T,
          B, H, P, dgx.stride(0), l.units, int(features_per_cta(H, P, l.units)), in.reverse};
      result->emplace_back(dgx, dh_tok, grad_h0, grad_c0);
      return params;
    });
    if (!launched) result.reset();  // refused at run time: another path
  });
  return result;
}

}  // namespace varlen
