// Persistent CUDA kernels for rnn_forward / rnn_backward: see rnn_persistent.h.
//
// Two kernels of each direction: the recurrent product with fma on CUDA cores
// (below: float64, float32 in IEEE precision, and the fallback of the others)
// and on tensor cores (further below: half and bfloat16 with mma.sync
// 16x8x16, float32 in TF32 with 16x8x8 where torch allows TF32; float accumulation).
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
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "../cell_math.h"
#include "../rnn_args.h"
#include "rnn_persistent.cuh"
#include "rnn_point.cuh"

namespace varlen {

int64_t number_setting(const char* variable, int64_t fallback, int64_t lo, int64_t hi,
                       const char* what) {
  const char* v = std::getenv(variable);
  const std::string s = v ? v : "";
  if (s.empty() || s == "auto") return fallback;
  int64_t n = -1;
  if (s.size() <= 4 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    n = std::stoll(s);
  TORCH_CHECK(n >= lo && n <= hi, variable, " must be 'auto' or a whole number of ", what,
              " in [", lo, ", ", hi, "], got '", s, "'");
  return n;
}

RnnPath rnn_path_setting() {
  return choice_setting<RnnPath>("VARLEN_KERNELS_RNN_PATH", {{"auto", RnnPath::Auto},
                                                             {"persistent", RnnPath::Persistent},
                                                             {"per_step", RnnPath::PerStep}});
}

int64_t persistent_units_setting() {
  return number_setting("VARLEN_KERNELS_PERSISTENT_UNITS", 0, kMinUnits, kMaxUnits,
                        "hidden units per CTA");
}

PersistentSync persistent_sync_setting() {
  return choice_setting<PersistentSync>(
      "VARLEN_KERNELS_PERSISTENT_SYNC",
      {{"auto", PersistentSync::Auto}, {"grid", PersistentSync::Grid},
       {"cluster", PersistentSync::Cluster}});
}

int64_t persistent_stage_setting() {
  return number_setting("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", kWholeStageBytes / 1024, 0, 1024,
                        "KiB") * 1024;
}

PersistentExchange persistent_exchange_setting() {
  return choice_setting<PersistentExchange>(
      "VARLEN_KERNELS_PERSISTENT_EXCHANGE",
      {{"auto", PersistentExchange::Auto}, {"global", PersistentExchange::Global},
       {"dsmem", PersistentExchange::Dsmem},
       {"dsmem_barrier", PersistentExchange::DsmemBarrier}});
}

int64_t persistent_slots_setting() {
  return number_setting("VARLEN_KERNELS_PERSISTENT_SLOTS", kDefaultSlots, 1, kSlots, "slots");
}

int64_t persistent_max_mmac_setting() {
  return number_setting("VARLEN_KERNELS_PERSISTENT_MAX_MMAC", -1, 0, 9999,
                        "million multiply-adds a step");
}

PersistentCopy persistent_copy_setting() {
  return choice_setting<PersistentCopy>("VARLEN_KERNELS_PERSISTENT_COPY",
                                        {{"auto", PersistentCopy::Auto},
                                         {"async", PersistentCopy::Async},
                                         {"bulk", PersistentCopy::Bulk}});
}

int64_t persistent_groups_setting() {
  return number_setting("VARLEN_KERNELS_PERSISTENT_GROUPS", 0, 1, 16,
                        "row groups of the grid form");
}

PersistentSettings persistent_settings() {
  return {rnn_path_setting(), persistent_sync_setting(), persistent_exchange_setting(),
          persistent_units_setting(), persistent_stage_setting(),
          int(persistent_slots_setting()), persistent_max_mmac_setting(),
          persistent_copy_setting(), persistent_groups_setting()};
}

namespace {

// The tensor-core kernels load what the cell reads (the forward's gate inputs,
// h_prev and c; the backward's saved gates, state, dy, carry and dc) for a
// thread's first kEarly (row, unit) items of a tile before the tile's product.
constexpr int kEarly = 2;

// load(r, u) for the thread's first kEarly items of a tile of `rows` rows
// (below; `walk`: TileWalk(Hs)).
template <typename Load, typename Item>
__device__ __forceinline__ void load_early(const TileWalk& walk, int rows, int64_t j0, int64_t H,
                                           Load load, Item (&early)[kEarly]) {
  int r = walk.r0, u = walk.c0;
#pragma unroll
  for (int e = 0; e < kEarly; ++e) {
    if (r < rows && j0 + u < H) early[e] = load(r, u);
    walk.advance(r, u);
  }
}

// The (row r, unit u) items of a tile's cell, r < rows, u < Hs, dealt to the
// threads in turn (item r * Hs + u to thread (r * Hs + u) % kThreads:
// `walk`, TileWalk(Hs), so that no item takes a division; made at each call,
// as a walk kept across the kernel's steps cost registers and spills), units
// past H skipped: load(r, u) (what the cell reads) for a
// thread's first kEarly items, then product() (every thread calls it), then
// cell(r, u, load(r, u)) for every item, the first kEarly with what was loaded
// before the product; or, with use_ready, with what load_early() gave in
// `ready`, earlier (the kernels load the first tile's of a step before the
// barrier that ends the step before it).
template <typename Load, typename Product, typename CellFn, typename Item>
__device__ __forceinline__ void cell_items(const TileWalk& walk, int rows, int64_t j0, int64_t H,
                                           Load load, Product product, CellFn cell,
                                           const Item (&ready)[kEarly], bool use_ready) {
  Item early[kEarly];
  if (use_ready) {
#pragma unroll
    for (int e = 0; e < kEarly; ++e) early[e] = ready[e];
  } else {
    load_early(walk, rows, j0, H, load, early);
  }
  product();
  int r = walk.r0, u = walk.c0;
#pragma unroll
  for (int e = 0; e < kEarly; ++e) {
    if (r < rows && j0 + u < H) cell(r, u, early[e]);
    walk.advance(r, u);
  }
  for (; r < rows; walk.advance(r, u))
    if (j0 + u < H) cell(r, u, load(r, u));
}

// The state a cell reads of row i, unit j = j0 + u (at = i * H + j): with
// the exchange (xr > 0) the CTA's own, in shared memory (own[lr * Hs + u] for
// its buffer row lr, the second xr * Hs further), else a[at] and, LSTM,
// b[at] in global memory. Shared and global memory on separate branches, so
// that the compiler knows each access's memory.
template <Cell K>
__device__ __forceinline__ void read_state(int64_t xr, const float* own, int64_t lr, int Hs, int u,
                                           const float* a, const float* b, int64_t at,
                                           float& first, float& second) {
  if (xr > 0) {
    const float* const o = own + lr * Hs + u;
    first = o[0];
    if constexpr (K == Cell::LSTM) second = o[xr * Hs];
  } else {
    first = a[at];
    if constexpr (K == Cell::LSTM) second = b[at];
  }
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
                              // (nullptr with the exchange, Launch::xrows > 0, as cbuf)
  scalar_t* hop;              // (2, B, H) the same in the storage type, the tensor-core
                              // product's operand (half, bfloat16; nullptr otherwise)
  acc_t* cbuf;                // (B, H) LSTM's c, length order
  scalar_t* y;                // (T, B, H) output, zero-initialized
  scalar_t* gates;            // (T*B, GS*H) workspace, packed, zero-initialized
  scalar_t* states;           // (T*B, S*H) workspace, packed, zero-initialized
  scalar_t* h_n;              // (B, H)
  scalar_t* c_n;              // (B, H) LSTM only
  int64_t T, B, H, gx_ld;
  int units;                  // Hs, hidden units per CTA
  bool reverse;
  int tile_mt;                // the tensor-core kernel's most_mt (TcGeometry), 0: its own
  int64_t stage_limit;        // Launch::stage_limit
  int slots;                  // Launch::slots
  int bulk;                   // Launch::bulk
  int64_t xrows;              // Launch::xrows: > 0, h through the cluster's shared memory
  bool xasync;                // Launch::xasync: its stores completing on mbarriers
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
  if (p.hbuf == nullptr)  // the exchange: no state in global memory
    return {t, count_running(p.off, t), p.off[t], nullptr, nullptr};
  return {t, count_running(p.off, t), p.off[t],
          p.hbuf + (p.reverse ? ((t + 1) & 1) : (t & 1)) * BH,
          p.hbuf + (p.reverse ? (t & 1) : ((t + 1) & 1)) * BH};
}

// The CTA's units [j0, j0 + Hs) of its group's rows (tiles of rb rows): h0
// into both buffers, c0.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void load_initial_state(const FwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs,
                                   RowGroup rows, int64_t rb) {
  const int64_t H = p.H, B = p.B;
  for (int64_t idx = threadIdx.x; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H || !rows.owns(i, rb)) continue;
    const int64_t b = p.perm[i];
    const acc_t h = acc_t(p.h0[b * H + jj]);
    p.hbuf[i * H + jj] = h;
    p.hbuf[(B + i) * H + jj] = h;
    if (p.hop != nullptr) p.hop[i * H + jj] = p.hop[(B + i) * H + jj] = p.h0[b * H + jj];
    if constexpr (K == Cell::LSTM) p.cbuf[i * H + jj] = acc_t(p.c0[b * H + jj]);
  }
}

// h_n and c_n of the CTA's units of its group's rows, after the last step.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void store_final_state(const FwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs,
                                  RowGroup rows, int64_t rb) {
  const int64_t H = p.H, B = p.B;
  for (int64_t idx = threadIdx.x; idx < B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H || !rows.owns(i, rb)) continue;
    const int64_t b = p.perm[i], buf = p.reverse ? 0 : (p.sorted_len[i] & 1);
    p.h_n[b * H + jj] = scalar_t(p.hbuf[(buf * B + i) * H + jj]);
    if constexpr (K == Cell::LSTM) p.c_n[b * H + jj] = scalar_t(p.cbuf[i * H + jj]);
  }
}

// The gate inputs of row i (length order), unit j of step s (gate_inputs()).
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ GateInputs<acc_t, K> cell_inputs(const FwdParams<scalar_t, acc_t>& p,
                                                            const FwdStep<acc_t>& s, int64_t i,
                                                            int64_t j) {
  return gate_inputs<scalar_t, acc_t, K>(p.gx + (s.row0 + i) * p.gx_ld + j, p.bias, j, p.H);
}

// Row i, unit j of step s, given its gate inputs, the hidden side of its
// gates, h_prev and (LSTM) the cell state c, updated in place: writes the
// output and the workspaces, returns h.
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ acc_t forward_cell(const FwdParams<scalar_t, acc_t>& p,
                                              const FwdStep<acc_t>& s, int64_t i, int64_t j,
                                              const GateInputs<acc_t, K>& xin,
                                              const acc_t (&hid)[num_gates(K)], acc_t h_prev,
                                              acc_t* c) {
  constexpr int GS = num_saved_gates(K), S = num_states(K);
  const int64_t H = p.H, row = s.row0 + i;
  const acc_t h = forward_point<scalar_t, acc_t, K>(xin, p.b_hn, j, H, hid, h_prev, c,
                                                    p.gates + row * GS * H + j,
                                                    p.states + row * S * H + j);
  p.y[(s.t * p.B + p.perm[i]) * H + j] = scalar_t(h);
  return h;
}
// The same with the state in global memory (hbuf, cbuf).
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ void forward_cell(const FwdParams<scalar_t, acc_t>& p,
                                             const FwdStep<acc_t>& s, int64_t i, int64_t j,
                                             const GateInputs<acc_t, K>& xin,
                                             const acc_t (&hid)[num_gates(K)]) {
  const int64_t H = p.H;
  s.hout[i * H + j] = forward_cell<scalar_t, acc_t, K>(
      p, s, i, j, xin, hid, s.hin[i * H + j], K == Cell::LSTM ? p.cbuf + i * H + j : nullptr);
}

template <typename scalar_t, typename acc_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1) persistent_forward_kernel(Directions<FwdParams<scalar_t, acc_t>> L) {
  constexpr int G = num_gates(K);
  int64_t j0;
  RowGroup grp;
  const FwdParams<scalar_t, acc_t> p = cta_place(L, j0, grp);
  const int64_t H = p.H, B = p.B, T = p.T;
  const int Hs = p.units, tid = threadIdx.x;
  const int u = tid % Hs, rg = tid / Hs, RG = kThreads / Hs, RB = RG * kRows, RBp = RB + 1;
  const int chunk = int(fma_chunk(H, RB, sizeof(acc_t), p.stage_limit));  // staged at a time
  const int64_t j = j0 + u, GHs = int64_t(G) * Hs;
  const bool owns = rg < RG && j < H;  // computes (row, unit j) pairs
  VK_DYNAMIC_SHARED(unsigned char, smem);
  // w[k * GHs + u * G + g] = W_hh[g*H + j0+u, k]: a unit's gates side by side,
  // at fixed offsets from one address in the product.
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);
  acc_t* hs = reinterpret_cast<acc_t*>(smem + align16(GHs * H * sizeof(scalar_t)));  // [kk * RBp + r]

  for (int64_t idx = tid; idx < GHs * H; idx += kThreads) {
    const int64_t k = idx % H, gu = idx / H, g = gu / Hs, uu = gu % Hs, jj = j0 + uu;
    w[k * GHs + uu * G + g] = jj < H ? p.w_hh[(g * H + jj) * H + k] : scalar_t(0);
  }
  load_initial_state<scalar_t, acc_t, K>(p, j0, Hs, grp, RB);
  const int64_t maxlen = group_steps(L, p.sorted_len, B, T, grp.first(RB));
  step_barrier(L);  // every unit's h0 is in place (and W is, after the tile's barrier)

  for (int64_t step = 0; step < maxlen; ++step) {
    const FwdStep<acc_t> s = forward_step(p, step, maxlen);
    for (int64_t row0 = grp.first(RB); row0 < s.nrun; row0 += grp.stride(RB)) {
      // Rows of this tile that run; a thread whose first row does not skips
      // the product (the rows it would read past `rows` are never staged).
      const int rows = s.nrun - row0 < RB ? int(s.nrun - row0) : RB;
      const bool active = owns && rg < rows;
      acc_t acc[kRows][G];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int g = 0; g < G; ++g) acc[r][g] = acc_t(0);
      for (int64_t k0 = 0; k0 < H; k0 += chunk) {
        __syncthreads();  // the previous chunk (and tile) is consumed
        const acc_t* const hrow = s.hin + row0 * H + k0;
        const int64_t kleft = H - k0;
        for_tile_elements(rows, chunk, [&](int r, int kk) {
          hs[kk * RBp + r] = kk < kleft ? hrow[r * H + kk] : acc_t(0);
        });
        __syncthreads();
        if (active) {
          const int kn = H - k0 < chunk ? int(H - k0) : chunk;
          const scalar_t* wk = w + k0 * GHs + u * G;
          const acc_t* hk = hs + rg;
          for (int kk = 0; kk < kn; ++kk, wk += GHs, hk += RBp) {
            acc_t wv[G];
#pragma unroll
            for (int g = 0; g < G; ++g) wv[g] = acc_t(wk[g]);
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
              if (r * RG + rg >= rows) break;
              const acc_t hv = hk[r * RG];
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
        if (i < s.nrun)
          forward_cell<scalar_t, acc_t, K>(p, s, i, j, cell_inputs<scalar_t, acc_t, K>(p, s, i, j),
                                           acc[r]);
      }
    }
    step_barrier(L);  // h_t complete before any CTA reads it
  }
  store_final_state<scalar_t, acc_t, K>(p, j0, Hs, grp, RB);
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
  acc_t* dcbuf;               // (B, H) length order: LSTM's d c' (both nullptr with the exchange)
  scalar_t* dgx;              // (T*B, G*H) packed, zero-initialized, row stride dgx_ld
  scalar_t* dgh;              // likewise (row stride dgh_ld); aliases dgx unless GRU
  acc_t* grad_h0;             // (B, H)
  acc_t* grad_c0;             // (B, H) LSTM only
  int64_t T, B, H, G;          // G: gate blocks of H
  int64_t dgx_ld, dgh_ld;
  int units;
  bool reverse;
  int tile_mt;                // the tensor-core kernel's most_mt (TcGeometry), 0: its own
  int64_t stage_limit;        // Launch::stage_limit
  int slots;                  // Launch::slots
  int bulk;                   // Launch::bulk
  int64_t xrows;              // Launch::xrows: > 0, dgh through the cluster's shared memory
  bool xasync;                // Launch::xasync: its stores completing on mbarriers
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
  s.nrun = last ? 0 : count_running(p.off, s.t);
  s.nprev = step > 0 ? count_running(p.off, s.tp) : 0;
  s.n = s.nrun > s.nprev ? s.nrun : s.nprev;
  s.row0 = last ? 0 : p.off[s.t];
  s.dg_prev = p.dgh + (step > 0 ? p.off[s.tp] : 0) * p.dgh_ld;
  return s;
}

// The CTA's units of its group's rows: the carry starts as grad_h_n, dc as
// grad_c_n. Ends with a barrier: other threads of the CTA read these rows in
// the steps.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void load_initial_carry(const BwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs,
                                   RowGroup rows, int64_t rb) {
  const int64_t H = p.H;
  for (int64_t idx = threadIdx.x; idx < p.B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H || !rows.owns(i, rb)) continue;
    const int64_t b = p.perm[i];
    p.carry[i * H + jj] = p.grad_h_n[b * H + jj];
    if constexpr (K == Cell::LSTM) p.dcbuf[i * H + jj] = p.grad_c_n[b * H + jj];
  }
  __syncthreads();
}

// grad_h0 and grad_c0 of the CTA's units of its group's rows, after the last
// step.
template <typename scalar_t, typename acc_t, Cell K>
__device__ void store_initial_grads(const BwdParams<scalar_t, acc_t>& p, int64_t j0, int Hs,
                                    RowGroup rows, int64_t rb) {
  const int64_t H = p.H;
  for (int64_t idx = threadIdx.x; idx < p.B * Hs; idx += kThreads) {
    const int64_t i = idx / Hs, jj = j0 + idx % Hs;
    if (jj >= H || !rows.owns(i, rb)) continue;
    const int64_t b = p.perm[i];
    p.grad_h0[b * H + jj] = p.carry[i * H + jj];
    if constexpr (K == Cell::LSTM) p.grad_c0[b * H + jj] = p.dcbuf[i * H + jj];
  }
}

// What row i (< s.nrun), unit j of step s reads of the forward's workspaces
// and of dy, loaded apart so that a kernel can issue the loads early.
template <typename acc_t, Cell K>
struct BwdInputs {
  SavedStep<acc_t, K> saved;
  acc_t dy;
};
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ BwdInputs<acc_t, K> cell_inputs(const BwdParams<scalar_t, acc_t>& p,
                                                           const BwdStep<scalar_t>& s, int64_t i,
                                                           int64_t j) {
  constexpr int GS = num_saved_gates(K), S = num_states(K);
  const int64_t H = p.H, row = s.row0 + i;
  return {saved_step<scalar_t, acc_t, K>(p.gates + row * GS * H + j, p.states + row * S * H + j, H),
          acc_t(p.dy[(s.t * p.B + p.perm[i]) * H + j])};
}

// Row i (< s.n), unit j of step s, given prod = (dgh at tp W_hh)[i, j] (zero
// for a row that did not run at tp) and, for a row running at t, its inputs:
// carry (d h' not passing through W_hh) and (LSTM) dc updated in place; the
// pre-activation gradients to gx (input side) and gh (hidden side; the same
// place unless GRU), G blocks of H.
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ void backward_cell(const BwdStep<scalar_t>& s, int64_t i, int64_t H,
                                              acc_t prod, const BwdInputs<acc_t, K>& in,
                                              acc_t* carry, acc_t* dc, scalar_t* gx,
                                              scalar_t* gh) {
  if (i < s.nrun)
    *carry = backward_point<scalar_t, acc_t, K>(in.saved, H, *carry + prod + in.dy, dc, gx, gh);
  else
    *carry += prod;  // finished: this is d h0
}
// The same with the carry in global memory.
template <typename scalar_t, typename acc_t, Cell K>
__device__ __forceinline__ void backward_cell(const BwdParams<scalar_t, acc_t>& p,
                                              const BwdStep<scalar_t>& s, int64_t i, int64_t j,
                                              acc_t prod, const BwdInputs<acc_t, K>& in) {
  const int64_t H = p.H, row = s.row0 + i;
  backward_cell<scalar_t, acc_t, K>(s, i, H, prod, in, p.carry + i * H + j,
                                    K == Cell::LSTM ? p.dcbuf + i * H + j : nullptr,
                                    p.dgx + row * p.dgx_ld + j, p.dgh + row * p.dgh_ld + j);
}
template <typename scalar_t, typename acc_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1) persistent_backward_kernel(Directions<BwdParams<scalar_t, acc_t>> L) {
  int64_t j0;
  RowGroup grp;
  const BwdParams<scalar_t, acc_t> p = cta_place(L, j0, grp);
  const int64_t H = p.H, B = p.B, T = p.T, GH = int64_t(p.G) * H;
  const int Hs = p.units, tid = threadIdx.x;
  const int u = tid % Hs, rg = tid / Hs, RG = kThreads / Hs, RB = RG * kRows, RBp = RB + 1;
  const int chunk = int(fma_chunk(GH, RB, sizeof(acc_t), p.stage_limit));  // staged at a time
  const int64_t j = j0 + u;
  const bool owns = rg < RG && j < H;
  VK_DYNAMIC_SHARED(unsigned char, smem);
  scalar_t* w = reinterpret_cast<scalar_t*>(smem);  // w[m * Hs + u] = W_hh[m, j0+u]
  acc_t* ds = reinterpret_cast<acc_t*>(smem + align16(GH * Hs * sizeof(scalar_t)));

  for (int64_t idx = tid; idx < GH * Hs; idx += kThreads) {
    const int64_t m = idx / Hs, jj = j0 + idx % Hs;
    w[idx] = jj < H ? p.w_hh[m * H + jj] : scalar_t(0);
  }
  load_initial_carry<scalar_t, acc_t, K>(p, j0, Hs, grp, RB);
  const int64_t maxlen = group_steps(L, p.sorted_len, B, T, grp.first(RB));

  for (int64_t step = 0; step <= maxlen; ++step) {
    const BwdStep<scalar_t> s = backward_step(p, step, maxlen);
    for (int64_t row0 = grp.first(RB); row0 < s.n; row0 += grp.stride(RB)) {
      acc_t acc[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r] = acc_t(0);
      // Rows of this tile with a product (those that ran at the previous step);
      // a thread whose first row has none skips it.
      const int rows = row0 < s.nprev ? (s.nprev - row0 < RB ? int(s.nprev - row0) : RB) : 0;
      if (rows > 0) {  // the same for the whole block
        for (int64_t m0 = 0; m0 < GH; m0 += chunk) {
          __syncthreads();
          const scalar_t* const drow = s.dg_prev + row0 * p.dgh_ld + m0;
          const int64_t mleft = GH - m0, ld = p.dgh_ld;
          for_tile_elements(rows, chunk, [&](int r, int kk) {
            ds[kk * RBp + r] = kk < mleft ? acc_t(drow[r * ld + kk]) : acc_t(0);
          });
          __syncthreads();
          if (owns && rg < rows) {
            const int kn = GH - m0 < chunk ? int(GH - m0) : chunk;
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
        if (i < s.n)
          backward_cell<scalar_t, acc_t, K>(
              p, s, i, j, acc[r],
              i < s.nrun ? cell_inputs<scalar_t, acc_t, K>(p, s, i, j) : BwdInputs<acc_t, K>{});
      }
    }
    step_barrier(L);  // this step's dgh complete before any CTA reads it
  }
  store_initial_grads<scalar_t, acc_t, K>(p, j0, Hs, grp, RB);
}


template <typename scalar_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_forward_tc_kernel(Directions<FwdParams<scalar_t, float>> L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync in bfloat16 needs sm_80; the host launches it on sm_80 and later only
#else
  constexpr int G = num_gates(K);
  int64_t j0;
  RowGroup grp;
  const FwdParams<scalar_t, float> p = cta_place(L, j0, grp);
  const int64_t H = p.H, B = p.B, T = p.T, xr = p.xrows;
  const int Hs = p.units, tid = threadIdx.x;
  const TcGeometry g(G * Hs, H, sizeof(scalar_t), p.tile_mt, p.stage_limit, p.slots);
  VK_DYNAMIC_SHARED(unsigned char, smem);
  // ws[n * ldw + k] = W_hh[gate * H + j0 + u, k] for column n = gate * Hs + u;
  // as: the slots of the staging (StageRing); with the exchange (xr > 0), its
  // two buffers (g.chunk == g.kp) instead, and
  // own the float h, then c, of the CTA's units: own[lr * Hs + u] for buffer row lr.
  const int64_t xbytes = xr > 0 ? g.exchange_bytes(xr) : g.a_bytes();
  const auto pc = g.pieces<scalar_t>(smem, xbytes);
  scalar_t *const ws = pc.ws, *const as = pc.as;
  float *const cs = pc.cs, *const partial = pc.partial;
  float* const own = reinterpret_cast<float*>(smem + g.fixed_bytes() + xbytes);
  unsigned bulk_phase = 0;  // the staging's bulk copies (StageRing::bulk_start)
  uint64_t* const bulk_bar = StageRing<scalar_t>::bulk_start(p.bulk != 0 && xr == 0, g, as);
  for (int64_t idx = tid; idx < g.np * g.kp; idx += kThreads) {
    const int64_t n = idx / g.kp, k = idx % g.kp, gate = n / Hs, jj = j0 + n % Hs;
    ws[n * g.ldw + k] =
        (n < g.n && jj < H && k < H) ? tc_operand(p.w_hh[(gate * H + jj) * H + k]) : scalar_t(0);
  }
  if (xr > 0) {
    // Both buffers start as h0 (a row that starts later, in the reverse
    // direction, reads it from either), zero past H and past B.
    for (int64_t idx = tid; idx < xr * g.lda; idx += kThreads) {
      const int64_t lr = idx / g.lda, k = idx % g.lda, i = row_of_buffer(grp, lr, g.rbt);
      const scalar_t v = i < B && k < H ? tc_operand(p.h0[p.perm[i] * H + k]) : scalar_t(0);
      as[idx] = v;
      as[xr * g.lda + idx] = v;
    }
    for_own_state(grp, xr, Hs, j0, g.rbt, [&](int64_t idx, int64_t i, int64_t jj) {
      const bool in = i < B && jj < H;
      own[idx] = in ? float(p.h0[p.perm[i] * H + jj]) : 0.f;
      if constexpr (K == Cell::LSTM) own[xr * Hs + idx] = in ? float(p.c0[p.perm[i] * H + jj]) : 0.f;
    });
  } else {
    load_initial_state<scalar_t, float, K>(p, j0, Hs, grp, g.rbt);
  }
  const int64_t maxlen = group_steps(L, p.sorted_len, B, T, grp.first(g.rbt));
  const int own_cols = int(H - j0 < Hs ? (H - j0 > 0 ? H - j0 : 0) : Hs);
  const AsyncExchange xs(xr > 0 && p.xasync, as, xr, g, 1, H, own_cols, maxlen);
  // (the running buffer rows of step s, for the exchange's arming)
  auto xrows_of = [&](int64_t step) {
    return buffer_rows_running(grp, forward_step(p, step, maxlen).nrun, g.rbt);
  };
  if (xs.on()) {
    __syncthreads();  // the buffers' padding written (above) before the mbarriers there
    xs.start(maxlen > 1 ? xrows_of(0) : 0, maxlen > 2 ? xrows_of(1) : 0);
  }
  // Every unit's h0 is in place (and W is, after the tile's barrier); with
  // the exchange, every CTA's buffers (and mbarriers) are, before any other
  // CTA writes there.
  step_barrier(L);

  // (row r of a tile, unit u) items of the cell, idx = r * Hs + u, dealt to
  // the threads in turn. What the cell reads (gate inputs, h_prev, c) is
  // loaded for a thread's first kEarly items before the product, its latency
  // hidden behind it; for a step's first tile, before the barrier that ends
  // the step before (`ready`), its latency hidden behind that step's end.
  // The state is this CTA's own (its units): written by this thread, in the
  // cell of the same item at the step before, where the row ran then; else
  // h0 and c0, written before the first barrier (read_state()).
  struct Item {
    GateInputs<float, K> xin{};
    float h = 0.f, c = 0.f;
  };
  // Item (r, u) of step s's tile at row row0 (lr0: its first buffer row).
  auto load_item = [&](const FwdStep<float>& s, int64_t row0, int64_t lr0, int r, int u) {
    const int64_t i = row0 + r, j = j0 + u;
    Item it;
    it.xin = cell_inputs<scalar_t, float, K>(p, s, i, j);
    read_state<K>(xr, own, lr0 + r, Hs, u, s.hin, p.cbuf, i * H + j, it.h, it.c);
    return it;
  };
  Item ready[kEarly];
  bool have_ready = false;
  FwdStep<float> s{};
  if (maxlen > 0) s = forward_step(p, 0, maxlen);
  // With the exchange, the buffer rows of this step's running rows (what the
  // CTA sends at its end), the next step's of the step before: worked out
  // before the step's wait, off the path from the other CTAs' values to this
  // CTA's.
  int xrows = xr > 0 && maxlen > 0 ? buffer_rows_running(grp, s.nrun, g.rbt) : 0;
  for (int64_t step = 0; step < maxlen; ++step) {
    // The next step's rows (their loads issued here, used at this step's end).
    const FwdStep<float> next = forward_step(p, step + 1 < maxlen ? step + 1 : step, maxlen);
    const int xrows_next = xr > 0 ? buffer_rows_running(grp, next.nrun, g.rbt) : 0;
    if (xs.on() && step > 0)  // the other CTAs' h_{t-1} in this step's buffer
      xs.wait(step, xrows_next);
    scalar_t* const xcur = as + (step & 1) * xr * g.lda;
    scalar_t* const xnext = as + ((step + 1) & 1) * xr * g.lda;
    // Without the exchange, h_{t-1} of the running rows is staged from global
    // memory: half and bfloat16 from its copy in the storage type (half the
    // bytes of hbuf's), float32 from hbuf.
    const scalar_t* hsrc = nullptr;  // (hop is null with the exchange)
    if constexpr (std::is_same_v<scalar_t, float>) hsrc = s.hin;
    else if (xr == 0) hsrc = p.hop + (s.hin - p.hbuf);
    const StageRing<scalar_t> ring(g, as, hsrc, H, H, grp.first(g.rbt), grp.stride(g.rbt),
                                   s.nrun, bulk_bar, &bulk_phase);
    if (xr == 0) ring.start();
    int64_t tile = 0;  // the group's tile
    for (int64_t row0 = grp.first(g.rbt); row0 < s.nrun; row0 += grp.stride(g.rbt), ++tile) {
      const int rows = s.nrun - row0 < g.rbt ? int(s.nrun - row0) : g.rbt;
      const int64_t lr0 = tile * g.rbt;
      auto load = [&](int r, int u) { return load_item(s, row0, lr0, r, u); };
      auto cell = [&](int r, int u, const Item& it) {
        const int64_t i = row0 + r, j = j0 + u;
        float hid[G];
#pragma unroll
        for (int gate = 0; gate < G; ++gate) hid[gate] = cs[r * g.ldc + gate * Hs + u];
        float c = it.c;
        const float h = forward_cell<scalar_t, float, K>(p, s, i, j, it.xin, hid, it.h,
                                                         K == Cell::LSTM ? &c : nullptr);
        if (xr > 0) {
          float* const hc = own + (lr0 + r) * Hs + u;
          *hc = h;
          if constexpr (K == Cell::LSTM) hc[xr * Hs] = c;
          xnext[(lr0 + r) * g.lda + j] = scalar_t(h);
        } else {
          s.hout[i * H + j] = h;
          if constexpr (!std::is_same_v<scalar_t, float>)
            p.hop[(s.hout - p.hbuf) + i * H + j] = scalar_t(h);
          if constexpr (K == Cell::LSTM) p.cbuf[i * H + j] = c;
        }
      };
      cell_items(TileWalk(Hs), rows, j0, H, load, [&] {
        tc_product(g, rows, ws, tile_operand(ring, tile, xr > 0 ? xcur + lr0 * g.lda : nullptr),
                   cs, partial);
      }, cell, ready, tile == 0 && have_ready);
    }
    // The next step's first tile: its items' loads, before the barrier.
    const int64_t first = grp.first(g.rbt);
    have_ready = step + 1 < maxlen && first < next.nrun;
    if (have_ready) {
      const int rows = next.nrun - first < g.rbt ? int(next.nrun - first) : g.rbt;
      load_early(TileWalk(Hs), rows, j0, H,
                 [&](int r, int u) { return load_item(next, first, 0, r, u); }, ready);
    }
    if (xr > 0 && step + 1 < maxlen) {  // (no step reads the last one's)
      __syncthreads();  // this CTA's h_t complete in its next buffer
      share_columns<1>(xnext, g.lda, xrows, j0, own_cols, 0,
                       [](scalar_t v) { return tc_operand(v); },
                       xs.on() ? xs.bar(step + 1) : nullptr);
    }
    if (!xs.on()) step_barrier(L);
    s = next;
    xrows = xrows_next;
  }
  if (xs.on()) step_barrier(L);  // (AsyncExchange: every CTA's stores have completed)
  if (xr > 0) {
    for_own_state(grp, xr, Hs, j0, g.rbt, [&](int64_t idx, int64_t i, int64_t jj) {
      if (i >= B || jj >= H) return;
      const int64_t b = p.perm[i];
      p.h_n[b * H + jj] = scalar_t(own[idx]);
      if constexpr (K == Cell::LSTM) p.c_n[b * H + jj] = scalar_t(own[xr * Hs + idx]);
    });
  } else {
    store_final_state<scalar_t, float, K>(p, j0, Hs, grp, g.rbt);
  }
#endif
}

template <typename scalar_t, Cell K>
__global__ void __launch_bounds__(kThreads, 1)
    persistent_backward_tc_kernel(Directions<BwdParams<scalar_t, float>> L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int G = num_gates(K);
  int64_t j0;
  RowGroup grp;
  const BwdParams<scalar_t, float> p = cta_place(L, j0, grp);
  const int64_t H = p.H, B = p.B, T = p.T, GH = int64_t(G) * H, xr = p.xrows;
  const int Hs = p.units, tid = threadIdx.x;
  const TcGeometry g(Hs, GH, sizeof(scalar_t), p.tile_mt, p.stage_limit, p.slots);
  VK_DYNAMIC_SHARED(unsigned char, smem);
  // ws[n * ldw + m] = W_hh[m, j0 + n]; as: the slots of the staging
  // (StageRing); with the exchange (xr > 0), its two buffers of dgh rows
  // instead, and own the float carry, then dc, of the CTA's
  // units: own[lr * Hs + u] for buffer row lr.
  const int64_t xbytes = xr > 0 ? g.exchange_bytes(xr) : g.a_bytes();
  const auto pc = g.pieces<scalar_t>(smem, xbytes);
  scalar_t *const ws = pc.ws, *const as = pc.as;
  float *const cs = pc.cs, *const partial = pc.partial;
  float* const own = reinterpret_cast<float*>(smem + g.fixed_bytes() + xbytes);
  unsigned bulk_phase = 0;  // the staging's bulk copies (StageRing::bulk_start)
  uint64_t* const bulk_bar = StageRing<scalar_t>::bulk_start(p.bulk != 0 && xr == 0, g, as);
  for (int64_t idx = tid; idx < g.np * g.kp; idx += kThreads) {  // n fastest: coalesced reads
    const int64_t n = idx % g.np, m = idx / g.np, jj = j0 + n;
    ws[n * g.ldw + m] = (n < Hs && jj < H && m < GH) ? tc_operand(p.w_hh[m * H + jj]) : scalar_t(0);
  }
  if (xr > 0) {
    // Zero past G*H (and rows never written, past B); the rows that run are
    // written at each step before the next reads them.
    for (int64_t idx = tid; idx < 2 * xr * g.lda; idx += kThreads) as[idx] = scalar_t(0);
    for_own_state(grp, xr, Hs, j0, g.rbt, [&](int64_t idx, int64_t i, int64_t jj) {
      const bool in = i < B && jj < H;
      own[idx] = in ? p.grad_h_n[p.perm[i] * H + jj] : 0.f;
      if constexpr (K == Cell::LSTM) own[xr * Hs + idx] = in ? p.grad_c_n[p.perm[i] * H + jj] : 0.f;
    });
  } else {
    load_initial_carry<scalar_t, float, K>(p, j0, Hs, grp, g.rbt);
  }
  const int64_t maxlen = group_steps(L, p.sorted_len, B, T, grp.first(g.rbt));
  // Steps 0 .. maxlen (one past the last handles the rows that finish there).
  const int own_cols = int(H - j0 < Hs ? (H - j0 > 0 ? H - j0 : 0) : Hs);
  const AsyncExchange xs(xr > 0 && p.xasync, as, xr, g, G, H, own_cols, maxlen + 1);
  if (xs.on()) {
    __syncthreads();  // the buffers' padding zeroed (above) before the mbarriers there
    auto xrows_of = [&](int64_t step) {
      return buffer_rows_running(grp, backward_step(p, step, maxlen).nrun, g.rbt);
    };
    xs.start(maxlen > 0 ? xrows_of(0) : 0, maxlen > 1 ? xrows_of(1) : 0);
  }
  // every CTA's buffers zeroed (and its mbarriers set) before any other CTA writes there
  if (xr > 0) step_barrier(L);

  // What the cell reads (saved gates, state and dy of a row running at t;
  // the carry and dc of the CTA's own units) of a thread's first kEarly items
  // (row r of a tile, unit u; idx = r * Hs + u), loaded before the product;
  // for a step's first tile, before the barrier that ends the step before
  // (`ready`). The carry and dc are written by this thread, in the cell of
  // the same item at the step before, where the row was touched then; else
  // grad_h_n and grad_c_n, written before the first barrier.
  struct Item {
    BwdInputs<float, K> in{};
    float carry = 0.f, dc = 0.f;
  };
  // Item (r, u) of step s's tile at row row0 (lr0: its first buffer row).
  auto load_item = [&](const BwdStep<scalar_t>& s, int64_t row0, int64_t lr0, int r, int u) {
    const int64_t i = row0 + r, j = j0 + u;
    Item it;
    if (i < s.nrun) it.in = cell_inputs<scalar_t, float, K>(p, s, i, j);
    read_state<K>(xr, own, lr0 + r, Hs, u, p.carry, p.dcbuf, i * H + j, it.carry, it.dc);
    return it;
  };
  Item ready[kEarly];
  bool have_ready = false;
  BwdStep<scalar_t> s = backward_step(p, 0, maxlen);
  // With the exchange, the buffer rows of this step's running rows (as the
  // forward's: before the step's wait).
  int xrows = xr > 0 ? buffer_rows_running(grp, s.nrun, g.rbt) : 0;
  for (int64_t step = 0; step <= maxlen; ++step) {
    // The next step's rows (their loads issued here, used at this step's end).
    const BwdStep<scalar_t> next = backward_step(p, step < maxlen ? step + 1 : step, maxlen);
    const int xrows_next = xr > 0 ? buffer_rows_running(grp, next.nrun, g.rbt) : 0;
    if (xs.on() && step > 0)  // the other CTAs' dgh at tp in this step's buffer
      xs.wait(step, xrows_next);
    scalar_t* const xcur = as + (step & 1) * xr * g.lda;
    scalar_t* const xnext = as + ((step + 1) & 1) * xr * g.lda;
    // Without the exchange, dgh at tp of the rows that ran then is staged from
    // global memory: the tiles with a product come first.
    const StageRing<scalar_t> ring(g, as, s.dg_prev, p.dgh_ld, GH, grp.first(g.rbt),
                                   grp.stride(g.rbt), s.nprev, bulk_bar, &bulk_phase);
    if (xr == 0) ring.start();
    int64_t tile = 0;  // the group's tile
    for (int64_t row0 = grp.first(g.rbt); row0 < s.n; row0 += grp.stride(g.rbt), ++tile) {
      const int rows = s.n - row0 < g.rbt ? int(s.n - row0) : g.rbt;
      const int with_prev =
          row0 < s.nprev ? (s.nprev - row0 < g.rbt ? int(s.nprev - row0) : g.rbt) : 0;
      const int64_t lr0 = tile * g.rbt;
      auto load = [&](int r, int u) { return load_item(s, row0, lr0, r, u); };
      auto cell = [&](int r, int u, const Item& it) {
        const int64_t i = row0 + r, j = j0 + u, row = s.row0 + i;
        const float prod = r < with_prev ? cs[r * g.ldc + u] : 0.f;
        float carry = it.carry, dc = it.dc;
        float* const dcp = K == Cell::LSTM ? &dc : nullptr;
        if (xr > 0) {
          // The hidden side's gradients into the next exchange buffer, then
          // from there to dgh (of which dgx is the same tensor unless GRU).
          scalar_t* const gh = xnext + (lr0 + r) * g.lda + j;
          if constexpr (K == Cell::GRU)
            backward_cell<scalar_t, float, K>(s, i, H, prod, it.in, &carry, dcp,
                                              p.dgx + row * p.dgx_ld + j, gh);
          else
            backward_cell<scalar_t, float, K>(s, i, H, prod, it.in, &carry, dcp, gh, gh);
          float* const own_carry = own + (lr0 + r) * Hs + u;
          own_carry[0] = carry;
          if constexpr (K == Cell::LSTM) own_carry[xr * Hs] = dc;
          if (i < s.nrun) {
#pragma unroll
            for (int k = 0; k < G; ++k) p.dgh[row * p.dgh_ld + k * H + j] = gh[k * H];
          }
        } else {
          backward_cell<scalar_t, float, K>(s, i, H, prod, it.in, &carry, dcp,
                                            p.dgx + row * p.dgx_ld + j,
                                            p.dgh + row * p.dgh_ld + j);
          p.carry[i * H + j] = carry;
          if constexpr (K == Cell::LSTM) p.dcbuf[i * H + j] = dc;
        }
      };
      cell_items(TileWalk(Hs), rows, j0, H, load, [&] {
        if (with_prev > 0) {  // block-uniform
          tc_product(g, with_prev, ws,
                     tile_operand(ring, tile, xr > 0 ? xcur + lr0 * g.lda : nullptr), cs,
                     partial);
        }
      }, cell, ready, tile == 0 && have_ready);
    }
    // The next step's first tile: its items' loads, before the barrier.
    const int64_t first = grp.first(g.rbt);
    have_ready = step < maxlen && first < next.n;
    if (have_ready) {
      const int rows = next.n - first < g.rbt ? int(next.n - first) : g.rbt;
      load_early(TileWalk(Hs), rows, j0, H,
                 [&](int r, int u) { return load_item(next, first, 0, r, u); }, ready);
    }
    if (xr > 0 && (step < maxlen || !xs.on())) {  // (AsyncExchange: none after the last)
      __syncthreads();  // this CTA's dgh at t complete in its next buffer
      share_columns<G>(xnext, g.lda, xrows, j0, own_cols, H,
                       [](scalar_t v) { return tc_operand(v); },
                       xs.on() ? xs.bar(step + 1) : nullptr);
    }
    if (!xs.on() || step == maxlen) step_barrier(L);  // (AsyncExchange: the stores completed)
    s = next;
    xrows = xrows_next;
  }
  if (xr > 0) {
    for_own_state(grp, xr, Hs, j0, g.rbt, [&](int64_t idx, int64_t i, int64_t jj) {
      if (i >= B || jj >= H) return;
      const int64_t b = p.perm[i];
      p.grad_h0[b * H + jj] = own[idx];
      if constexpr (K == Cell::LSTM) p.grad_c0[b * H + jj] = own[xr * Hs + idx];
    });
  } else {
    store_initial_grads<scalar_t, float, K>(p, j0, Hs, grp, g.rbt);
  }
#endif
}

// The most multiply-adds of a step's recurrent product (B * G*H * H, times
// the launch's directions) for which the auto path takes the persistent
// kernels; past it, the per-step path (a GEMM over all rows a step, on every
// SM), which was faster there. From fwd+bwd timings of both paths on an H200
// (132 SMs; LSTM, T = 512, B 8/64/256, H 256/1024): in bfloat16 (tensor
// cores) the persistent kernels were faster up to B = 64 at H = 1024 (268 M,
// 1.18x), the per-step path at B = 256 (1074 M, 2.4x), crossing at about
// 350 M by interpolation in B; in float32 IEEE (CUDA cores) faster up to B =
// 64 at H = 256 (16.8 M, 1.06x), the per-step path from 33.5 M (B = 8, H =
// 1024, 1.37x) and at 67 M (B = 256, H = 256, 1.31x), crossing at about 23 M.
// TF32 (tensor cores at half bfloat16's rate, twice its bytes): half the
// bfloat16 bound, not measured against the per-step path. float64 takes the
// CUDA cores' bound.
constexpr int64_t kMostStepMacsTc16 = 350'000'000;
constexpr int64_t kMostStepMacsTf32 = kMostStepMacsTc16 / 2;
constexpr int64_t kMostStepMacsFma = 24'000'000;

// The launch of a plain cell's kernels: the cluster form where it fits (and
// the setting allows), else the grid form (choose_launch); none (units = 0:
// the per-step path) on the auto path past the bound above. Forward: G*units
// product columns over H; backward: units columns over G*H.
template <typename scalar_t, typename Kernel>
Launch choose(Kernel tc_kernel, Kernel fma_kernel, bool forward, const char* which, int dirs,
              int64_t B, int64_t H, int G, at::ScalarType dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  const int elem = sizeof(scalar_t);
  const int64_t K = forward ? H : int64_t(G) * H;  // the product's reduction
  const PersistentSettings set = persistent_settings();
  if (set.path == RnnPath::Auto) {
    const bool tc = tensor_cores_allowed<scalar_t>();
    const int64_t most = set.max_mmac >= 0 ? set.max_mmac * 1'000'000
                         : !tc                ? kMostStepMacsFma
                         : elem == 4          ? kMostStepMacsTf32
                                              : kMostStepMacsTc16;
    // (in double: B * G*H * H can pass 2^63)
    if (double(dirs) * double(B) * double(G * H) * double(H) > double(most)) return Launch{};
  }
  // Each tile's whole reduction staged at once where it takes at most `limit`
  // bytes (the setting's) and the device's shared memory holds it with the
  // rest, else in chunks as large as that allows (stage(units): the bytes).
  const int64_t limit = set.stage_limit;
  auto geometry = [&](int units, int64_t stage = 0, int most_mt = 0, int slots = 0) {
    if (slots == 0) slots = set.slots;
    return forward ? TcGeometry(G * units, H, elem, most_mt, stage, slots)
                   : TcGeometry(units, K, elem, most_mt, stage, slots);
  };
  constexpr int64_t kWhole = int64_t(1) << 40;  // a stage limit that stages A whole
  // What the device's shared memory leaves for the staged operand beside
  // `fixed` bytes (align128 of the tile's operand may add up to 127 bytes).
  auto room = [&](int64_t fixed) {
    return std::max<int64_t>(0, std::min<int64_t>(limit, int64_t(cuda::max_dynamic_smem()) - fixed - 128));
  };
  // The tensor-core kernels' staging pipeline (StageRing) has up to set.slots
  // slots. In the grid form (a CTA an SM) they take up to the limit; in the cluster
  // form they share at most the bytes of one whole tile, so that they never
  // leave fewer clusters resident than a tile staged at once would.
  auto tc_stage = [&](int units, int most_mt = 0, bool cluster = false) {
    const int64_t r = room(geometry(units, 0, most_mt).fixed_bytes());
    return cluster ? std::min(r, geometry(units, kWhole, most_mt, 1).a_bytes()) : r;
  };
  auto fma_stage = [&](int units) {
    return room(int64_t(align16(size_t(G) * units * H * sizeof(scalar_t))));
  };
  auto tc_smem_of = [&](int units, bool cluster) -> int64_t {
    const TcGeometry g = geometry(units, tc_stage(units, 0, cluster));
    return g.fits() ? g.smem() : -1;
  };
  auto tc_smem = [&](int units) { return tc_smem_of(units, false); };
  auto tc_cluster_smem = [&](int units) { return tc_smem_of(units, true); };
  auto fma_smem = [&](int units) -> int64_t {
    return int64_t(smem_bytes<scalar_t, acc_t>(G, units, H, K, fma_stage(units)));
  };
  // The launch's staging, and its shared memory for the geometry its kernel
  // takes (the cluster form's tensor-core tiles may have fewer rows than the
  // plan's): as the plan, bounded by the plan's shared memory (whose residency
  // was checked); the smallest chunks never take more than the plan.
  auto with_staging = [&](Launch l) {
    if (l.units == 0) return l;
    if (l.kernel_tc) {
      // The grid form's tiles have at most B rows: so sized, the staging's
      // slots hold more columns (the products are the same: they cover the
      // running rows' 16-row tiles either way).
      // With row groups, tiles of 16 rows: dealt to the groups in turn, they
      // give each group its share of the running rows within 16 at every step
      // (the grid barrier waits for the group with the most).
      if (!l.cluster)
        l.tile_mt = l.groups > 1 ? 1 : int(std::clamp<int64_t>((B + 15) / 16, 1, geometry(l.units).mt));
      const TcGeometry fixed = geometry(l.units, 0, l.tile_mt);
      // (a multiple of 128: the staged operand's align128 never takes it past)
      const int64_t planned = (int64_t(l.smem) - fixed.fixed_bytes()) / 128 * 128;
      l.stage_limit =
          std::max<int64_t>(0, std::min(tc_stage(l.units, l.tile_mt, l.cluster), planned));
      l.slots = set.slots;
      // (sm_90 exactly, and code compiled for it: the build's sm_90a code has
      // them; a later device would run the sm_80 PTX, which does not)
      l.bulk = set.copy != PersistentCopy::Async && elem != 4 && cuda::compute_major() == 9 &&
               cuda::has_sm90_code(tc_kernel);
      l.smem = size_t(geometry(l.units, l.stage_limit, l.tile_mt).smem());
    } else {
      l.stage_limit = fma_stage(l.units);
      l.smem = size_t(fma_smem(l.units));
    }
    return l;
  };
  auto sizes = [&] { return c10::str("hidden_size ", H, ", ", G, " gate(s), dtype ", dtype); };
  // The cluster form's exchange through distributed shared memory (tensor-core
  // kernels; rnn_persistent.cuh): A whole, two buffers of the group's rows, the
  // state of the CTA's units (LSTM: two float arrays, else one). Taken where it
  // fits the device and leaves as many of the launch's clusters resident at
  // once as staging does.
  const PersistentExchange exchange = set.exchange;
  auto with_exchange = [&](Launch l) {
    if (l.units == 0 || exchange == PersistentExchange::Global) return l;
    bool fits = l.cluster && l.kernel_tc;
    int64_t xrows = 0, bytes = 0;
    if (fits) {
      const TcGeometry whole = geometry(l.units, kWhole, l.tile_mt);
      xrows = ((B + whole.rbt - 1) / whole.rbt + l.groups - 1) / l.groups * whole.rbt;
      bytes = whole.fixed_bytes() + whole.exchange_bytes(xrows) +
              int64_t(align128(int64_t(G == 4 ? 2 : 1) * xrows * l.units * 4));
      fits = size_t(bytes) <= cuda::max_dynamic_smem() &&
             (size_t(bytes) <= l.smem ||
              cuda::max_active_clusters(tc_kernel, kThreads, size_t(bytes), l.ctas) >=
                  std::min(l.groups * dirs,
                           cuda::max_active_clusters(tc_kernel, kThreads, l.smem, l.ctas)));
    }
    // Two directions that cannot: one launch each, where each may (as below).
    const bool forced = exchange == PersistentExchange::Dsmem ||
                        exchange == PersistentExchange::DsmemBarrier;
    if (!fits && forced && dirs > 1) return Launch{};
    TORCH_CHECK(fits || !forced, "VARLEN_KERNELS_PERSISTENT_EXCHANGE=",
                exchange == PersistentExchange::Dsmem ? "dsmem" : "dsmem_barrier", ": the ", which,
                " kernel cannot pass its ",
                "rows through distributed shared memory for ", sizes(), " and a batch of ", B,
                l.cluster && l.kernel_tc
                    ? c10::str(" (its buffers, ", bytes, " bytes of shared memory a CTA, do not fit)")
                    : std::string(" (only the cluster form on tensor cores does)"),
                "; use 'auto' to fall back to global memory");
    if (!fits) return l;
    // (buffer_rows_running's 32-bit arithmetic: the buffers hold a group's
    // share of the batch, which therefore has fewer than 2^31 rows)
    TORCH_INTERNAL_ASSERT(B <= INT32_MAX);
    l.xrows = xrows;
    // (every CTA's columns, and the backward's blocks of H, in 16-byte pieces)
    const int64_t per16 = 16 / elem;
    l.xasync = exchange != PersistentExchange::DsmemBarrier && H % per16 == 0 &&
               l.units % per16 == 0;
    // (an mbarrier phase counts at most 2^20 - 1 bytes: a buffer's are fewer)
    TORCH_INTERNAL_ASSERT(!l.xasync || xrows * int64_t(G) * H * elem < (int64_t(1) << 20));
    l.stage_limit = kWhole;
    l.smem = size_t(bytes);
    return l;
  };
  const Launch c = choose_cluster_launch<scalar_t>(
      set, tc_kernel, fma_kernel, dirs, B * H, B, H, tc_cluster_smem, fma_smem,
      [&](int units, int64_t clusters) { return cluster_tc_tile(geometry(units), B, clusters); },
      [&](int units, int64_t) { return std::pair<int64_t, int>(tile_rows(units), 0); });
  // The cluster form, unless it is on CUDA cores where the grid form has the
  // tensor cores, for both directions or for one (then a launch each): both
  // fit only near the shared-memory limit; not when the cluster form is forced.
  auto tc_grid_fits = [&](int d) {
    return plan_launch(tc_kernel, H, d, tc_smem, set.min_units).units > 0;
  };
  if (c.units > 0 &&
      (c.kernel_tc || !tensor_cores_allowed<scalar_t>() ||
       set.sync == PersistentSync::Cluster ||
       (!tc_grid_fits(dirs) && (dirs == 1 || !tc_grid_fits(1)))))
    return with_exchange(with_staging(c));
  TORCH_CHECK(c.units > 0 || set.sync != PersistentSync::Cluster ||
                  set.path == RnnPath::PerStep || B * H == 0,
              "VARLEN_KERNELS_PERSISTENT_SYNC=cluster: the ", which,
              " kernel's cluster form does not fit this device for ", sizes(),
              " (it needs sm_90 or later, and the weight slices of a cluster of at most ",
              cuda::max_cluster_blocks() > 0 ? cuda::max_cluster_blocks() : 16,
              " CTAs that the device can schedule in their shared memory); use 'auto' to fall ",
              "back to the grid form");
  // The grid form: one group's launch (or none), else, with the setting's
  // row groups, the most groups up to it whose CTAs fit on the same kernel as
  // one group's (tensor cores or CUDA cores: more units a CTA can leave only
  // the CUDA-core kernel fitting, which is not what the groups are for) and
  // whose tiles (16 rows on tensor cores, tile_rows on CUDA cores) give every
  // group rows of the batch.
  const Launch one = choose_launch<scalar_t>(set, tc_kernel, fma_kernel, which, dirs, B * H,
                                             sizes, tc_smem, fma_smem, H);
  if (one.units == 0) return one;
  // Unset or "auto": the backward as 2 groups on tensor cores from
  // kAutoGroupRows rows of the batch, else one.
  const int64_t most_groups =
      set.groups > 0 ? set.groups : !forward && one.kernel_tc && B >= kAutoGroupRows ? 2 : 1;
  for (int64_t groups = most_groups; groups > 1; --groups) {
    const Launch l = choose_launch<scalar_t>(set, tc_kernel, fma_kernel, which, dirs, B * H, sizes,
                                             tc_smem, fma_smem, H, groups);
    const int64_t rows = l.kernel_tc ? 16 : l.units > 0 ? tile_rows(l.units) : 1;
    if (l.units > 0 && l.kernel_tc == one.kernel_tc && (B + rows - 1) / rows >= groups)
      return with_exchange(with_staging(l));
  }
  return with_exchange(with_staging(one));
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
      const Tensor &sorted_len = plan.sorted_len, &perm = plan.perm, &off = plan.off;
      std::vector<Tensor> keep;  // contiguous operands, alive until the launch is queued
      result.emplace();
      const bool launched = launch_directions(tc_kernel, fma_kernel, l, dirs.size(),
                                              "persistent forward", [&](size_t d) {
        const PersistentForward& in = dirs[d];
        const Tensor w = in.w_hh.contiguous(), h0c = in.h0.contiguous();
        const Tensor gx = in.gx.stride(1) == 1 ? in.gx : in.gx.contiguous();
        const Tensor c0c = K == Cell::LSTM ? in.c0.contiguous() : Tensor();
        keep.insert(keep.end(), {w, h0c, gx, c0c});
        // The state in global memory, but with the exchange (which keeps it in
        // shared memory); the tensor-core kernel's operand rows where it
        // stages them from global memory in a storage type other than float.
        const bool global_state = l.xrows == 0;
        const bool with_hop = l.kernel_tc && global_state && !std::is_same_v<scalar_t, float>;
        Tensor hbuf = global_state ? at::empty({2, B, H}, opts.dtype(acc_type)) : Tensor();
        Tensor hop = with_hop ? at::empty({2, B, H}, opts) : Tensor();
        Tensor cbuf = K == Cell::LSTM && global_state ? at::empty({B, H}, opts.dtype(acc_type))
                                                      : Tensor();
        keep.insert(keep.end(), {hbuf, hop, cbuf});
        Tensor output = at::zeros({T, B, H}, opts);
        Tensor gates = at::zeros({T * B, GS * H}, opts);
        Tensor states = at::zeros({T * B, S * H}, opts);
        Tensor h_n = at::empty({B, H}, opts);
        Tensor c_n = K == Cell::LSTM ? at::empty({B, H}, opts) : at::empty({0}, opts);
        const FwdParams<scalar_t, acc_t> params{
            sorted_len.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(),
            off.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(),
            gx.const_data_ptr<scalar_t>(),
            in.bias.defined() ? in.bias.const_data_ptr<acc_t>() : nullptr,
            in.b_hn.defined() ? in.b_hn.const_data_ptr<acc_t>() : nullptr,
            h0c.const_data_ptr<scalar_t>(),
            K == Cell::LSTM ? c0c.const_data_ptr<scalar_t>() : nullptr,
            hbuf.defined() ? hbuf.data_ptr<acc_t>() : nullptr,
            with_hop ? hop.data_ptr<scalar_t>() : nullptr,
            cbuf.defined() ? cbuf.data_ptr<acc_t>() : nullptr,
            output.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), states.data_ptr<scalar_t>(),
            h_n.data_ptr<scalar_t>(), K == Cell::LSTM ? c_n.data_ptr<scalar_t>() : nullptr,
            T, B, H, gx.stride(0), l.units, in.reverse, l.tile_mt, l.stage_limit, l.slots, l.bulk, l.xrows,
            l.xasync};
        result->emplace_back(output, h_n, c_n, gates, states);
        return params;
      });
      if (!launched) result.reset();  // refused at run time: another path
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
      const Tensor &sorted_len = plan.sorted_len, &perm = plan.perm, &off = plan.off;
      std::vector<Tensor> keep;  // operands and scratch, alive until the launch is queued
      result.emplace();
      const bool launched = launch_directions(tc_kernel, fma_kernel, l, dirs.size(),
                                              "persistent backward", [&](size_t d) {
        const PersistentBackward& in = dirs[d];
        const Tensor w = in.w_hh.contiguous(), gs = in.gates.contiguous();
        const Tensor st = in.states.contiguous(), dy = in.dy.contiguous();
        const Tensor ghn = in.grad_h_n.to(acc_type).contiguous();
        const Tensor gcn = K == Cell::LSTM ? in.grad_c_n.to(acc_type).contiguous() : Tensor();
        // The carry in global memory, but with the exchange (shared memory).
        const bool global_state = l.xrows == 0;
        Tensor carry = global_state ? at::empty({B, H}, opts.dtype(acc_type)) : Tensor();
        Tensor dcbuf = K == Cell::LSTM && global_state ? at::empty({B, H}, opts.dtype(acc_type))
                                                       : Tensor();
        keep.insert(keep.end(), {w, gs, st, dy, ghn, gcn, carry, dcbuf});
        Tensor dgx = in.dgx.defined() ? in.dgx : at::zeros({T * B, G * H}, opts);
        Tensor dgh = K == Cell::GRU ? at::zeros({T * B, G * H}, opts) : dgx;
        TORCH_INTERNAL_ASSERT(dgx.stride(1) == 1 && dgx.size(0) == T * B && dgx.size(1) == G * H);
        Tensor grad_h0 = at::empty({B, H}, opts.dtype(acc_type));
        Tensor grad_c0 = K == Cell::LSTM ? at::empty({B, H}, opts.dtype(acc_type)) : Tensor();
        const BwdParams<scalar_t, acc_t> params{
            sorted_len.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(),
            off.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(),
            gs.const_data_ptr<scalar_t>(),
            st.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
            ghn.const_data_ptr<acc_t>(), K == Cell::LSTM ? gcn.const_data_ptr<acc_t>() : nullptr,
            carry.defined() ? carry.data_ptr<acc_t>() : nullptr,
            dcbuf.defined() ? dcbuf.data_ptr<acc_t>() : nullptr,
            dgx.data_ptr<scalar_t>(), dgh.data_ptr<scalar_t>(), grad_h0.data_ptr<acc_t>(),
            K == Cell::LSTM ? grad_c0.data_ptr<acc_t>() : nullptr, T, B, H, G, dgx.stride(0),
            dgh.stride(0), l.units, in.reverse, l.tile_mt, l.stage_limit, l.slots, l.bulk, l.xrows,
            l.xasync};
        result->emplace_back(dgx, dgh, grad_h0, grad_c0);
        return params;
      });
      if (!launched) result.reset();  // refused at run time: another path
      return 0;
    });
  });
  return result;
}

}  // namespace varlen
