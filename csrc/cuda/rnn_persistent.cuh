// The parts of the persistent CUDA kernels (rnn_persistent.h) that the plain
// cells' kernels (rnn_persistent.cu) and the projection LSTM's
// (rnn_persistent_proj.cu) share: the length order's step counts, the
// directions of one launch, the recurrent product on tensor cores and on CUDA
// cores with a weight slice in shared memory, and the host's choice of a
// launch. Internal to those two sources.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "async_copy.h"
#include "launch.h"
#include "mma.h"
#include "rnn_persistent.h"

#ifndef VK_EMULATE_CUDA
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace varlen {
namespace {

using at::Tensor;
namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kRows = 2;    // rows per thread in a tile
constexpr int kChunk = 16;  // reduction columns staged in shared memory at a time (at least)
constexpr int kMinUnits = 2, kMaxUnits = 128;

// Rows of a tile of the fma kernels: kRows per row group of Hs threads.
constexpr int tile_rows(int units) { return (kThreads / units) * kRows; }

// a / b for 0 <= a < 2^20 and b >= 1 given as rcp_b = small_rcp(b): the
// whole part of (a + 0.5) * rcp_b, in float arithmetic, a few instructions
// where a 32-bit division by a number known only at run time takes about 20
// (the kernels divide by their units a CTA and their chunks' columns at every
// step). Exact: (a + 0.5) / b is at least 0.5 / b from a whole number, and the
// float result is within about 2.5 * 2^-23 of it relatively (the reciprocal's
// 2 ulp at most, __fdividef's bound for 1 <= b < 2^126, and the product's half
// ulp; a and b are exact in float), less than 0.5 / b while a + 0.5 < 0.39 *
// 2^22 (tests/test_cuda.py checks it with reciprocals 2 ulp off).
//   The reciprocal is made at each call, never held across a kernel's steps
// (an empty asm volatile keeps the compiler from hoisting it, and the walks
// made from it, out of the loop over the steps, where they would hold
// registers: the backward LSTM tensor-core kernel has 255). TileWalk takes
// it; StageRing::for_copies keeps its integer divisions, as with small_div
// there that kernel spilled (20 bytes, sm_90a).
__device__ __forceinline__ float small_rcp(int b) {
#ifdef __CUDA_ARCH__
  float r = __fdividef(1.f, float(b));
  asm volatile("" : "+f"(r));
  return r;
#else
  return 1.f / float(b);
#endif
}
__device__ __forceinline__ int small_div(int a, float rcp_b) {
  return int((float(a) + 0.5f) * rcp_b);
}

// The calling thread's elements of a tile of `cols` columns (element r * cols
// + c is thread (r * cols + c) % kThreads's): its first, (r0, c0), and the
// fixed steps from one to the next (advance()), so that a loop over them has
// no division. The constructor's two divisions (of kThreads and of the thread's
// index by cols) are small_div's.
struct TileWalk {
  int cols, dr, dc, r0, c0;
  __device__ explicit TileWalk(int cols_) : TileWalk(cols_, small_rcp(cols_)) {}
  __device__ TileWalk(int cols_, float rcp)
      : cols(cols_), dr(small_div(kThreads, rcp)), dc(kThreads - dr * cols_),
        r0(small_div(int(threadIdx.x), rcp)), c0(int(threadIdx.x) - r0 * cols_) {}
  __device__ __forceinline__ void advance(int& r, int& c) const {
    r += dr;
    c += dc;
    if (c >= cols) {  // (c, dc < cols: one wrap at most)
      c -= cols;
      ++r;
    }
  }
  // f(r, c) for each of the thread's elements in rows [0, rows).
  template <typename F>
  __device__ __forceinline__ void each(int rows, F f) const {
    for (int r = r0, c = c0; r < rows; advance(r, c)) f(r, c);
  }
};

// f(r, c) for each element of a rows x cols tile that is the calling
// thread's (TileWalk).
template <typename F>
__device__ __forceinline__ void for_tile_elements(int rows, int cols, F f) {
  TileWalk(cols).each(rows, f);
}

// Number of sequences with length > t (0 <= t < T): the tokens of step t in
// the plan's offsets off (token_plan.h); two independent loads, where a
// search of the lengths would be a chain of log2(B) dependent ones.
__device__ __forceinline__ int64_t count_running(const int64_t* off, int64_t t) {
  return off[t + 1] - off[t];
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
// same layer, sharing lengths). Each direction runs as `groups` groups of
// `ctas` CTAs; the CTAs of a group own all hidden units between them (CTA r
// of a group the units [r * units, (r + 1) * units)) and step the rows of
// that group (RowGroup): block (d * groups + group) * ctas + r.
//  - Grid form (cluster false): a grid.sync() a step (a cooperative launch),
//    one group per direction (all rows) by default, or several
//    (VARLEN_KERNELS_PERSISTENT_GROUPS). Every CTA steps through the same
//    steps (the longest length of all), so all meet at every barrier.
//  - Cluster form (cluster true, sm_90): each group is a thread block cluster
//    and synchronizes with cluster.sync() only, stepping to the longest length
//    of its own rows; groups never wait for each other.
template <typename Params>
struct Directions {
  Params d[2];
  int64_t ctas;          // CTAs per group
  int64_t groups = 1;    // groups per direction
  bool cluster = false;  // each group a cluster (else the grid, all groups)
};

// The rows of the length order a group steps: in tiles of rb rows (the
// kernel's tile), tile q belongs to group q % groups. The assignment is fixed
// for a row across steps, so its state is written and read by one group only;
// tiles alternate between the groups, so each has about its share of the
// running rows at every step (they are a prefix of the order).
struct RowGroup {
  int64_t group = 0, groups = 1;
  __device__ __forceinline__ bool owns(int64_t i, int64_t rb) const {
    return (i / rb) % groups == group;
  }
  __device__ __forceinline__ int64_t first(int64_t rb) const { return group * rb; }
  __device__ __forceinline__ int64_t stride(int64_t rb) const { return groups * rb; }
};

// This CTA's direction, its row group, and the first hidden unit of its slice.
template <typename Params>
__device__ __forceinline__ Params cta_place(const Directions<Params>& L, int64_t& j0,
                                            RowGroup& rows) {
  const int64_t per_direction = L.groups * L.ctas, b = int64_t(blockIdx.x);
  const bool second = b >= per_direction;
  const int64_t in_direction = b - (second ? per_direction : 0);
  const Params p = second ? L.d[1] : L.d[0];
  rows = RowGroup{in_direction / L.ctas, L.groups};
  j0 = (in_direction % L.ctas) * p.units;
  return p;
}

// The same for kernels launched in the grid form in one group only (the
// projection LSTM's: their launches come from choose_launch with one group).
template <typename Params>
__device__ __forceinline__ Params direction_of_cta(const Directions<Params>& L, int64_t& j0) {
  RowGroup rows;
  return cta_place(L, j0, rows);
}

// The barrier between steps: the group's (cluster form) or the grid's. A
// cluster's barrier orders global memory too: its arrive has release and its
// wait acquire semantics at cluster scope (the PTX memory model), so the h
// (or dgh) rows a CTA wrote before it are what the group's CTAs read after.
template <typename Params>
__device__ __forceinline__ void step_barrier(const Directions<Params>& L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if (L.cluster) __trap();  // clusters need sm_90; the host launches them there only
  cg::this_grid().sync();
#else
  if (L.cluster) cg::this_cluster().sync();
  else cg::this_grid().sync();
#endif
}

// The steps a CTA runs: in the cluster form the longest length among its
// group's rows, the first of which (in the length order, longest first) is
// `first_row` (0 when the group has no row): groups never wait for each
// other; in the grid form the longest of all, whatever its group, so that
// every CTA meets every grid barrier. Asserts that every length is in range,
// as longest().
template <typename Params>
__device__ __forceinline__ int64_t group_steps(const Directions<Params>& L,
                                               const int64_t* sorted_len, int64_t B, int64_t T,
                                               int64_t first_row) {
  const int64_t all = longest(sorted_len, B, T);
  if (!L.cluster) return all;
  if (first_row >= B) return 0;
  const int64_t l = sorted_len[first_row];
  return l < 0 ? 0 : (l > all ? all : l);
}

// The most shared memory the staged operand may take, by default
// (VARLEN_KERNELS_PERSISTENT_STAGE_KIB changes it): the tensor-core kernels'
// slots together (TcGeometry, StageRing), each holding a tile's whole
// reduction where they fit it, else equal chunks; the CUDA-core kernels' tile,
// whole where it fits, else chunks. Whole tiles, or few large chunks, mean few
// rounds of global loads a step (in 64-column chunks, H = 1024 took 16 a step,
// serialized). The launch's limit (Launch::stage_limit) is the least of this,
// what the device's shared memory leaves beside the weight slice, what the
// plan's shared memory leaves, and in the cluster form one whole tile's bytes
// (choose() in rnn_persistent.cu).
constexpr int64_t kWholeStageBytes = 192 * 1024;

// Columns of the reduction (length k) the fma kernels stage at a time for a
// tile of rb rows of acc bytes: all of them where that takes at most `limit`
// bytes (the launch's stage_limit), else as many multiples of kChunk as
// `limit` allows, at least kChunk.
__host__ __device__ constexpr int64_t fma_chunk(int64_t k, int rb, int acc, int64_t limit) {
  const int64_t most = limit / (int64_t(rb + 1) * acc) / kChunk * kChunk;
  if (most <= kChunk) return kChunk;
  return k <= most ? (k > 0 ? k : 1) : most;
}

// Shared memory: the W_hh slice (G * Hs * H storage-type values), then the
// staged operand tile (fma_chunk x (RB + 1) math-type values), for a product
// over k (forward H, backward G * H).
template <typename scalar_t, typename acc_t>
size_t smem_bytes(int G, int units, int64_t H, int64_t k, int64_t limit) {
  return align16(size_t(G) * units * H * sizeof(scalar_t)) +
         size_t(fma_chunk(k, tile_rows(units), sizeof(acc_t), limit)) * (tile_rows(units) + 1) *
             sizeof(acc_t);
}

// ------------------------------------------------------------------ tensor cores
// Half and bfloat16, and float32 where torch allows TF32 for CUDA matmuls:
// the recurrent product on tensor cores. Per CTA and step it is C = A B with A
// the running rows of h (forward, rounded to the storage type, as the GEMMs of
// the per-step path and cuDNN round it) or of the previous step's dgh
// (backward), and B the CTA's slice of W_hh, kept in shared memory for the
// whole launch. float32 keeps A and B in float, rounded to TF32 (10 mantissa
// bits, to nearest) as they are written to shared memory, as cuBLAS's TF32
// GEMMs round their operands. Per tile of rows, the 8 warps share the 16 x tn
// output tiles (at most 2 each; where there are fewer tiles than warps, each
// tile's reduction is split between several, tc_product), A is staged whole
// (where it takes at most the launch's stage_limit) or in equal chunks
// (TcGeometry), C goes through shared memory to the threads that apply the
// cell, one (row, unit) each. The state, the carry and C stay float. A row's
// sums depend on the rows of its tile at that step (how the split falls), not
// only on its own values: deterministic, but not the same bits alone as in a
// batch.
//
// Tc<scalar_t>: the reduction length of one tensor-core instruction (mma.h:
// 16x8x16 in half and bfloat16, 16x8x8 in TF32), and that instruction.
template <typename T>
struct Tc;
template <>
struct Tc<c10::Half> {
  static constexpr int k = 16;
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuda::mma_16x8<cuda::MmaKind::F16>(d, a, b0, b1);
  }
};
template <>
struct Tc<c10::BFloat16> {
  static constexpr int k = 16;
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuda::mma_16x8<cuda::MmaKind::BF16>(d, a, b0, b1);
  }
};
template <>
struct Tc<float> {
  static constexpr int k = 8;
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    cuda::mma_16x8<cuda::MmaKind::TF32>(d, a, b0, b1);
  }
};

// A value of the storage type as a tensor-core operand in shared memory.
template <typename scalar_t>
__device__ __forceinline__ scalar_t tc_operand(scalar_t v) {
  if constexpr (std::is_same_v<scalar_t, float>) return cuda::to_tf32(v);
  return v;
}

constexpr int kTcChunk = 64;  // columns of A staged at a time
constexpr int kWarps = kThreads / 32;
constexpr int64_t align128(int64_t n) { return (n + 127) / 128 * 128; }
__host__ __device__ constexpr int round16(int n) { return (n + 15) / 16 * 16; }

// Tile geometry for a product with n output columns and reduction length k,
// operands of elem bytes; at most most_mt 16-row tiles in a tile of rows when
// most_mt > 0 (else as many as keep the 8 warps busy); A staged in `slots`
// slots (the plain kernels' pipeline, StageRing; 1: staged synchronously), a
// tile's whole reduction in each where that takes at most stage_limit bytes
// (the launch's) for all of them, else in the fewest chunks that allows (at
// least kTcChunk columns where it allows fewer), of equal columns, a multiple
// of 16 (the last one shorter). Each shared-memory row is padded by 16 bytes:
// ldmatrix (mma.h) reads a matrix of 8 rows of 16 bytes at once, and a row
// stride of an odd number of 16 bytes puts them on different banks (a stride
// of 32 bytes would put rows 0 and 4 on the same). The strides stay multiples
// of 16 bytes, as ldmatrix requires. The output tiles are 16 rows by tn
// columns: 16, or 8 where the product has at most 8 columns (a slice of at
// most 8 units in the backward, of at most 2 in an LSTM's forward), which
// then takes neither shared memory for W's 8 zero columns nor their
// tensor-core instructions (tc_product: one mma a KK-step, W by ldmatrix.x2).
// (t * ceil(256 / d)) >> 8 == t / d for every 0 <= t < 16 and 1 <= d <= 1024.
constexpr bool small_div_ok() {
  for (int d = 1; d <= 1024; ++d)
    for (int t = 0; t < 16; ++t)
      if (((t * ((256 + d - 1) / d)) >> 8) != t / d) return false;
  return true;
}
static_assert(small_div_ok(), "TcGeometry::div_nt");

struct TcGeometry {
  int n, tn, np, nt, mt, rbt;  // columns; a tile's (8 or 16); padded to tn; column tiles;
                              // row tiles per tile; rows
  int64_t kp, ldw, lda, ldc;  // k padded to 16; leading dimensions of W, A, C in shared memory
  int64_t chunk;              // columns of A staged at a time: kp, or fewer (a multiple of 16)
  int elem;                 // bytes of an operand element
  int slots;                // A's slots (at most those asked for)
  int nt_magic;             // ceil(256 / nt): t / nt as (t * nt_magic) >> 8 (div_nt)
  int nch;                  // A's chunks: ceil(kp / chunk)
  __host__ __device__ TcGeometry(int n_, int64_t k, int elem_, int most_mt = 0,
                                 int64_t stage_limit = 0, int slots_ = 1)
      : n(n_), elem(elem_), slots(slots_) {
    tn = n <= 8 ? 8 : 16;
    np = (n + tn - 1) / tn * tn;
    nt = np / tn;
    mt = nt >= kWarps ? 1 : kWarps / nt;
    if (most_mt > 0 && most_mt < mt) mt = most_mt;
    rbt = 16 * mt;
    kp = (k + 15) / 16 * 16;
    ldw = kp + 16 / elem;
    // Columns that fit a slot (a slot's bytes, rbt * lda * elem, are a
    // multiple of 256: no alignment to add); as many slots as hold kTcChunk
    // columns each (or the whole reduction, where shorter), at most `slots`.
    auto fit = [&](int s) { return stage_limit / s / (int64_t(rbt) * elem) - 16 / elem; };
    const int64_t least = kp < kTcChunk ? kp : kTcChunk;
    while (slots > 1 && fit(slots) < least) --slots;
    const int64_t most = fit(slots);
    if (kp <= most) {
      chunk = kp;
    } else {
      const int64_t widest = most / 16 * 16 > kTcChunk ? most / 16 * 16 : kTcChunk;
      const int64_t chunks = (kp + widest - 1) / widest;
      chunk = ((kp + chunks - 1) / chunks + 15) / 16 * 16;  // at most widest
    }
    lda = chunk + 16 / elem;
    ldc = np + 4;
    nt_magic = (256 + nt - 1) / nt;
    nch = int((kp + chunk - 1) / chunk);
  }
  // t / nt and t % nt for 0 <= t < 16 (the output tiles a warp or a split
  // touches: below 2 * kWarps), without a division (exact there: small_div_ok).
  __host__ __device__ int div_nt(int t) const { return (t * nt_magic) >> 8; }
  __host__ __device__ int mod_nt(int t) const { return t - div_nt(t) * nt; }
  // At most two output tiles per warp.
  __host__ __device__ bool fits() const { return mt * nt <= 2 * kWarps; }
  __host__ __device__ int64_t w_bytes() const { return align128(np * ldw * elem); }
  __host__ __device__ int64_t slot_bytes() const { return align128(rbt * lda * elem); }
  __host__ __device__ int64_t a_bytes() const { return slots * slot_bytes(); }
  __host__ __device__ int64_t c_bytes() const { return int64_t(rbt) * ldc * 4; }
  // tc_product's split-K partial sums: a 16 x tn float tile a warp, where a tile
  // of rows can have fewer output tiles than warps (fewer column tiles).
  __host__ __device__ int64_t s_bytes() const { return nt < kWarps ? int64_t(kWarps) * 256 * 4 : 0; }
  // The plain kernels' shared memory: W, A, C, then the partial sums; all
  // but A's (the staged operand's) bytes, and all.
  __host__ __device__ int64_t fixed_bytes() const { return w_bytes() + align128(c_bytes()) + s_bytes(); }
  int64_t smem() const { return fixed_bytes() + a_bytes(); }
  // Where W, A, C and the partial sums are in the plain kernels' shared memory
  // `smem` (smem() bytes, in that order).
  template <typename scalar_t>
  struct Pieces {
    scalar_t *ws, *as;
    float *cs, *partial;
  };
  // a_size: the bytes of A's piece (a_bytes(), or the cluster form's
  // exchange buffers, exchange_bytes()).
  template <typename scalar_t>
  __host__ __device__ Pieces<scalar_t> pieces(unsigned char* smem, int64_t a_size) const {
    return {reinterpret_cast<scalar_t*>(smem), reinterpret_cast<scalar_t*>(smem + w_bytes()),
            reinterpret_cast<float*>(smem + w_bytes() + a_size),
            reinterpret_cast<float*>(smem + w_bytes() + a_size + align128(c_bytes()))};
  }
  template <typename scalar_t>
  __host__ __device__ Pieces<scalar_t> pieces(unsigned char* smem) const {
    return pieces<scalar_t>(smem, a_bytes());
  }
  // The cluster form's exchange through distributed shared memory (below):
  // two buffers of `xrows` rows of A, whole (chunk == kp), in A's place.
  __host__ __device__ int64_t exchange_bytes(int64_t xrows) const {
    return align128(2 * xrows * lda * elem);
  }
  // Where W[n, k] (n < np, k < kp; zero past n and k), A[r, kk] (r below
  // stage_rows(rows), kk < the chunk; zero past rows) and C[r, n] are in
  // shared memory: the form the projection LSTM's kernels stage them in.
  __host__ __device__ int64_t w_at(int64_t n_, int64_t k) const { return n_ * ldw + k; }
  __host__ __device__ int64_t a_at(int r, int kk) const { return r * lda + kk; }
  __host__ __device__ int64_t c_at(int r, int n_) const { return r * ldc + n_; }
  __host__ __device__ int stage_rows(int rows) const { return round16(rows); }
  __host__ __device__ int64_t w_cols() const { return np; }
  __host__ __device__ int64_t w_depth() const { return kp; }
};

// C (rows x g.np) += A (rows x kp) times the W slice w (col-major, g.ldw):
// the output tiles (16 x g.tn) with a row below `rows`; then C to shared
// memory cs.
// Block-uniform: every thread calls it. A's chunk c, columns [k0, k0 + kc)
// (g.chunk at a time), is at `operand(c, k0, kc)`, row stride g.lda, rows
// below round16(rows) (zero past `rows`: only whole 16-row tiles are
// multiplied); every thread calls it, and it returns once the chunk is in
// shared memory for all of them and all have finished with the previous
// chunk and tile (a barrier, at least; staged(), StageRing, or A kept in
// shared memory). The warps take up to 2 output
// tiles each; where there are fewer tiles than warps and `scratch` is given
// (TcGeometry::s_bytes()), each tile's reduction is split between
// kWarps / tiles warps instead (split-K: the KK-steps of the reduction dealt in
// turn, by their index, so the chunking does not change the sums), whose
// partial sums meet in scratch and are added in a fixed order.
// tc_product_tn: the same for TN = g.tn, tc_product (below) chooses.
template <int TN, typename scalar_t, typename Operand>
__device__ __forceinline__ void tc_product_tn(const TcGeometry& g, int rows, const scalar_t* ws,
                                              Operand operand, float* cs, float* scratch) {
  static_assert(TN == 8 || TN == 16, "output tiles of 8 or 16 columns");
  constexpr int NH = TN / 8;  // 8-column halves of an output tile (mma.h's n = 8)
  constexpr int KK = Tc<scalar_t>::k;
  constexpr int E = 16 / int(sizeof(scalar_t));  // elements in 16 bytes
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tiles = (rows + 15) / 16 * g.nt;  // output tiles with a row below `rows`
  // Split-K: S = kWarps / tiles warps a tile (a power of 2: 8, 4 or 2, where
  // there are 1 to 4 tiles), warp = slice * tiles + q: tile q, share slice.
  // No division (this runs every step): tiles <= 4 there.
  static_assert(kWarps == 8, "the split-K shares below assume 8 warps");
  const int S = scratch != nullptr && tiles > 0 && tiles <= kWarps / 2
                    ? (tiles == 1 ? 8 : tiles == 2 ? 4 : 2)
                    : 1;
  const int lgS = S == 8 ? 3 : S == 4 ? 2 : S == 2 ? 1 : 0;
  const int slice =  // warp / tiles (TcGeometry::div_nt's way)
      S > 1 ? (warp * (tiles == 1 ? 256 : tiles == 2 ? 128 : tiles == 3 ? 86 : 64)) >> 8 : 0;
  const int q = warp - slice * tiles;  // (read only where S > 1)
  // Two 16 x TN float accumulators, each NH 8-column halves in mma.h's layout.
  float acc[2][NH][4] = {};
  const int lda = int(g.lda), ldw = int(g.ldw);  // (32-bit offsets in shared memory)
  // The rows this lane gives ldmatrix (mma.h): of A's 16-row tile, and of
  // W's TN columns (both 8-column halves, or the one: ldmatrix.x2, which
  // reads the rows of lanes 0-15 only).
  const int a_lane = (lane % 16) * lda + lane / 16 * E;
  const int w_lane = (lane % 8 + (NH == 2 ? lane / 16 * 8 : 0)) * ldw + lane / 8 % 2 * E;
  // One KK-step of a 16 x TN tile: A's rows from a, W's from w (this lane's).
  auto mma = [&](float (&c)[NH][4], cuda::smem_row a_at, cuda::smem_row w_at) {
    uint32_t a[4];
    cuda::ldmatrix_x4(a, a_at);
    if constexpr (NH == 2) {
      uint32_t b[4];
      cuda::ldmatrix_x4(b, w_at);
      Tc<scalar_t>::mma(c[0], a, b[0], b[1]);
      Tc<scalar_t>::mma(c[1], a, b[2], b[3]);
    } else {
      uint32_t b[2];
      cuda::ldmatrix_x2(b, w_at);
      Tc<scalar_t>::mma(c[0], a, b[0], b[1]);
    }
  };
  // This lane's rows of output tile (mtile, ntile) at step kk of chunk k0.
  auto a_of = [&](const scalar_t* as, int mtile, int kk) {
    return cuda::smem_row_of(as + (mtile * 16 * lda + a_lane + kk));
  };
  auto w_of = [&](int ntile, int k0, int kk) {
    return cuda::smem_row_of(ws + (ntile * TN * ldw + w_lane + k0 + kk));
  };
  constexpr int kStepBytes = KK * int(sizeof(scalar_t));
  // A warp with one tile (every split-K warp) sums its KK-steps in two chains
  // of dependent products, not one: its n-th step of the reduction (counted
  // over the whole reduction, so the chunking does not change the sums) into
  // acc[n & 1], the two added at the end. The KK-steps kk, kk + step, ..
  // below kc, from rows advanced by fixed steps.
  const bool two_tiles = warp + kWarps < g.mt * g.nt && g.div_nt(warp + kWarps) * 16 < rows;
  auto chains = [&](const scalar_t* as, int mtile, int ntile, int k0, int kk, int step, int kc,
                    bool odd) {
    if (kk >= kc) return;
    cuda::smem_row a_at = a_of(as, mtile, kk), w_at = w_of(ntile, k0, kk);
    const cuda::smem_row a_end = a_at + (kc - kk) * int(sizeof(scalar_t));
    const int by = step / KK * kStepBytes;  // (step: a multiple of KK)
    auto next = [&](float (&c)[NH][4]) {
      mma(c, a_at, w_at);
      a_at += by;
      w_at += by;
    };
    if (odd) next(acc[1]);
    while (a_at + by < a_end) {
      next(acc[0]);
      next(acc[1]);
    }
    if (a_at < a_end) next(acc[0]);
  };
  int c = 0;
  const int kp = int(g.kp), chunk = int(g.chunk);  // (shared memory holds a row of W)
  for (int k0 = 0; k0 < kp; k0 += chunk, ++c) {
    const int kc = kp - k0 < chunk ? kp - k0 : chunk;
    const scalar_t* const as = operand(c, k0, kc);
    if (S > 1) {
      if (slice < S) {  // warp-uniform; the KK-steps i of the reduction with i % S == slice
        const int first = (k0 / KK) & (S - 1), kk = ((slice - first) & (S - 1)) * KK;
        chains(as, g.div_nt(q), g.mod_nt(q), k0, kk, S * KK, kc, ((k0 + kk) / KK >> lgS) & 1);
      }
      continue;
    }
    if (!two_tiles) {  // warp-uniform
      if (warp < g.mt * g.nt && g.div_nt(warp) * 16 < rows)
        chains(as, g.div_nt(warp), g.mod_nt(warp), k0, 0, KK, kc, (k0 / KK) & 1);
      continue;
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int t = warp + e * kWarps, mtile = g.div_nt(t), ntile = g.mod_nt(t);
      const cuda::smem_row a_at = a_of(as, mtile, 0), w_at = w_of(ntile, k0, 0);
      for (int kk = 0; kk < kc; kk += KK)
        mma(acc[e], a_at + kk * int(sizeof(scalar_t)), w_at + kk * int(sizeof(scalar_t)));
    }
  }
  if (S > 1 || !two_tiles) {
#pragma unroll
    for (int h = 0; h < NH; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[0][h][i] += acc[1][h][i];
  }
  // A 16 x TN accumulator to p (row stride ld floats, 8-byte aligned rows):
  // the lane's elements of rows lane / 4 and lane / 4 + 8 (mma.h).
  auto store = [&](float* p, int ld, const float (&v)[NH][4]) {
    float* const r0 = p + lane / 4 * ld + lane % 4 * 2;
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      *reinterpret_cast<float2*>(r0 + h * 8) = make_float2(v[h][0], v[h][1]);
      *reinterpret_cast<float2*>(r0 + 8 * ld + h * 8) = make_float2(v[h][2], v[h][3]);
    }
  };
  if (S > 1) {
    constexpr int kTile = 16 * TN;  // (a warp's scratch holds 256 floats: 16 x 16 at most)
    if (slice < S) store(scratch + warp * 256, TN, acc[0]);
    __syncthreads();
    for (int idx = threadIdx.x; idx < tiles * kTile; idx += kThreads) {
      const int t = idx / kTile, e = idx % kTile;
      float sum = 0.f;
      for (int sl = 0; sl < S; ++sl) sum += scratch[(sl * tiles + t) * 256 + e];
      cs[(g.div_nt(t) * 16 + e / TN) * g.ldc + g.mod_nt(t) * TN + e % TN] = sum;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int t = warp + e * kWarps, mtile = g.div_nt(t), ntile = g.mod_nt(t);
      if (t >= g.mt * g.nt || mtile * 16 >= rows) continue;
      store(cs + mtile * 16 * g.ldc + ntile * TN, int(g.ldc), acc[e]);
    }
  }
  __syncthreads();  // C complete for the cell threads
}
template <typename scalar_t, typename Operand>
__device__ __forceinline__ void tc_product(const TcGeometry& g, int rows, const scalar_t* ws,
                                           Operand operand, float* cs, float* scratch = nullptr) {
  if (g.tn == 8) tc_product_tn<8>(g, rows, ws, operand, cs, scratch);
  else tc_product_tn<16>(g, rows, ws, operand, cs, scratch);
}

// tc_product's operand staged synchronously: stage(k0, kc) (every thread
// calls it) fills as[r * lda + kk] for r < round16(rows), kk < kc, between two
// barriers.
template <typename scalar_t, typename Stage>
__device__ __forceinline__ auto staged(scalar_t* as, Stage stage) {
  return [=](int, int64_t k0, int kc) -> const scalar_t* {
    __syncthreads();  // the previous chunk (and tile) is consumed
    stage(k0, kc);
    __syncthreads();
    return as;
  };
}

// ------------------------------------------------------------------ staging pipeline
// The plain tensor-core kernels stage A from global memory (the forward's h,
// the backward's dgh; rows of the length order, row stride ld, columns below
// kmax, zero past them) through kSlots slots of A's piece (TcGeometry with
// slots = kSlots), asynchronously. The items of a step are the chunks of its
// product tiles in order: tile q has rows [first + q * stride, + g.rbt) below
// R, and chunk c of tile q is item e = q * nch + c, in slot e % kSlots.
// start() issues items 0 .. kSlots - 2; take(e) waits for the thread's
// copies of item e, then a barrier makes everyone's visible (and ends every
// thread's use of item e - 1), then it issues item e + kSlots - 1 into item
// e - 1's slot. So kSlots - 1 items are loading while item e is multiplied,
// and the next tile's first items load during this tile's cell. Where the
// shared memory holds fewer slots of kTcChunk columns (TcGeometry), g.slots
// instead; with one, take(e) stages item e between two barriers. Every
// thread calls start() and take(), in the same order. 16-byte asynchronous
// copies (async_copy.h) where the rows allow them (block-uniform), else
// loads and stores at issue, on the same schedule. float32: rounded to TF32
// in place by the thread that copied them, after its wait.
// With one slot and an mbarrier (`bar`: VARLEN_KERNELS_PERSISTENT_COPY auto or bulk,
// half and bfloat16 on sm_90), a chunk whose existing columns take whole
// 16 bytes a row is staged with one bulk copy a row (cp.async.bulk,
// completing on the mbarrier: thread 0 arrives expecting the chunk's bytes,
// thread r copies row r), the rows past `rows` and the columns past kmax
// zeroed by plain stores, in place of its 16-byte copies: a few instructions
// a row, not one copy's loop a 16 bytes. Every thread waits for
// the mbarrier's phase; *phase, kept by the kernel across steps, is the
// parity of the next one. The mbarrier lives in the 16 bytes that pad row 0
// of the slot, past its chunk's columns, which nothing else reads or writes.
constexpr int kSlots = 4;
// The default (VARLEN_KERNELS_PERSISTENT_SLOTS): one slot. On an H200 (bfloat16
// LSTM, T = 512) one slot was as fast as four where nothing is staged (the
// cluster form's exchange) and 1.3x to 1.75x faster where the operand is
// (H = 1024, the grid form): a tile's whole reduction, or a few large chunks,
// issued at once keeps more bytes in flight than the ring's smaller chunks,
// and takes fewer barriers.
constexpr int kDefaultSlots = 1;

template <typename scalar_t>
struct StageRing {
  const TcGeometry& g;
  scalar_t* const slots;
  const scalar_t* const src;
  const int64_t ld, kmax, first, stride, R;
  uint64_t* const bar;      // the mbarrier of bulk copies (bulk_start: one slot), or nullptr
  unsigned* const phase;    // its next phase's parity (with bar)
  int64_t items = 0;  // (chunks a tile: g.nch)
  bool vec = false;

  __device__ StageRing(const TcGeometry& g_, scalar_t* slots_, const scalar_t* src_, int64_t ld_,
                       int64_t kmax_, int64_t first_, int64_t stride_, int64_t R_,
                       uint64_t* bar_ = nullptr, unsigned* phase_ = nullptr)
      : g(g_), slots(slots_), src(src_), ld(ld_), kmax(kmax_), first(first_), stride(stride_),
        R(R_), bar(bar_), phase(phase_) {
    // (none without a source: the cluster form's exchange stages nothing)
    items = src != nullptr && R > first ? div(R - first + stride - 1, stride) * g.nch : 0;
    // (chunks start at multiples of 16 columns, so every copy is aligned)
    vec = ld % kVec == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  }
  static constexpr int kVec = 16 / int(sizeof(scalar_t));  // values a copy

  __device__ scalar_t* slot(int64_t e) const {
    if (g.slots == 1) return slots;
    return slots + (e - div(e, g.slots) * g.slots) * (g.slot_bytes() / int64_t(sizeof(scalar_t)));
  }
  // a / b (both positive) in 32-bit arithmetic where they fit, as they do
  // but for batches of billions of rows (this runs for every item).
  __device__ static int64_t div(int64_t a, int64_t b) {
    return (a | b) <= INT32_MAX ? int64_t(int(a) / int(b)) : a / b;
  }
  // Item e: the first row of its tile, the tile's rows, its columns.
  __device__ void place(int64_t e, int64_t& row0, int& rows, int64_t& k0, int& kc) const {
    const int64_t tile = g.nch == 1 ? e : div(e, g.nch);
    row0 = first + tile * stride;
    rows = R - row0 < g.rbt ? int(R - row0) : g.rbt;
    k0 = (e - tile * g.nch) * g.chunk;
    kc = g.kp - k0 < g.chunk ? int(g.kp - k0) : int(g.chunk);
  }
  // f(c, at, from) for each of the thread's copies of rows [0, rows) of an
  // item: columns [c, c + kVec) of its chunk of kc columns, at `at` (r *
  // g.lda + c) in its slot and from `from` (chunk + r * ld + c, chunk the
  // chunk's first column in global memory; not read here). Copy idx = r *
  // (kc / kVec) + c / kVec is the thread's where idx % kThreads == tid: from
  // copy to copy, r, c, at and from advance by fixed steps, so that the loop,
  // which runs for every 16 bytes staged, has no division or multiplication
  // (those are an item's) and one 64-bit addition.
  template <typename F>
  __device__ __forceinline__ void for_copies(int rows, int kc, const scalar_t* chunk, F f) const {
    const int kv = kc / kVec, lda = int(g.lda);
    const int dr = kThreads / kv, dc = (kThreads - dr * kv) * kVec;
    int r = int(threadIdx.x) / kv, c = (int(threadIdx.x) - r * kv) * kVec;
    if (r >= rows) return;
    int at = r * lda + c;
    const scalar_t* from = chunk + (r * ld + c);
    if (dc == 0) {
      // kv divides kThreads (chunks of 2^n * kVec columns, n <= 8: those of
      // kTcChunk, and whole rows of 256 or 1024 columns): every copy of the
      // thread is in column c, dr rows apart. A counted loop, unrolled, with
      // no wrap to test (sm_90a: 6.5 instructions a copy, against 20).
      const int n = (rows - r + dr - 1) / dr, at_step = dr * lda;
      const int64_t from_step = int64_t(dr) * ld;
#pragma unroll 4
      for (int q = 0; q < n; ++q) {
        f(c, at, from);
        at += at_step;
        from += from_step;
      }
      return;
    }
    const int at_step = dr * lda + dc, at_wrap = lda - kc;
    const int64_t from_step = dr * ld + dc, from_wrap = ld - kc;
    for (;;) {
      f(c, at, from);
      r += dr;
      c += dc;
      at += at_step;
      if (c >= kc) {  // (c, dc < kc: one wrap at most)
        c -= kc;
        ++r;
        at += at_wrap;
        from += from_wrap;  // (after the last copy, a value never read: 4 fewer instructions a copy)
      }
      if (r >= rows) break;
      from += from_step;
    }
  }
  // Zeros (plain 16-byte stores) in rows [rows, round16(rows)) of a slot's
  // chunk of kc columns, and in columns [have, kc) of rows [0, rows).
  __device__ void zero_fill(scalar_t* as, int rows, int kc, int have) const {
    const int lda = int(g.lda);
    auto zero = [&](int r, int c) {
      scalar_t* const at = as + r * lda + c;
#pragma unroll
      for (int v = 0; v < kVec; ++v) at[v] = scalar_t(0);
    };
    const int kv = kc / kVec, zv = (kc - have) / kVec;
    for_tile_elements(round16(rows) - rows, kv, [&](int q, int c) { zero(rows + q, c * kVec); });
    if (zv > 0) for_tile_elements(rows, zv, [&](int r, int c) { zero(r, have + c * kVec); });
  }
  // The mbarrier of bulk copies in a slot (row 0's padding), 8-byte aligned:
  // the slot and its rows are 16-byte aligned, the chunk a multiple of 16
  // columns.
  __device__ static uint64_t* bulk_barrier(const TcGeometry& g, scalar_t* slot) {
    return reinterpret_cast<uint64_t*>(slot + g.chunk);
  }
  // The mbarrier of a kernel's bulk copies where it takes them (`on`, one
  // slot, half or bfloat16), initialized by thread 0 (every thread calls
  // this, before a barrier that precedes the first take()); else nullptr.
  __device__ static uint64_t* bulk_start(bool on, const TcGeometry& g, scalar_t* slots) {
    if (!on || g.slots != 1 || std::is_same_v<scalar_t, float>) return nullptr;
    uint64_t* const bar = bulk_barrier(g, slots);
    if (threadIdx.x == 0) cuda::mbarrier_init(bar, 1);
    return bar;
  }
  // Issues item e; returns whether it went by bulk copies (block-uniform).
  __device__ bool issue(int64_t e) const {
    bool bulk = false;
    if (e < items) {
      int64_t row0, k0;
      int rows, kc;
      place(e, row0, rows, k0, kc);
      scalar_t* const as = slot(e);
      const scalar_t* const base = src + row0 * ld;  // a row that exists
      if (vec) {
        // Columns of the chunk that exist (kmax - k0 > 0: chunks start below
        // kmax); rows past `rows` and columns past kmax are zero-filled.
        const int64_t left = kmax - k0;
        const int have = left < kc ? int(left) : kc;
        const scalar_t* const chunk = base + k0;
        bulk = bar != nullptr && have % kVec == 0;
        if (bulk) {  // (have: whole 16 bytes, as a bulk copy's size must be)
          const unsigned row_bytes = unsigned(have) * unsigned(sizeof(scalar_t));
          const int lda = int(g.lda);
          if (threadIdx.x == 0) cuda::mbarrier_arrive_expect_tx(bar, unsigned(rows) * row_bytes);
          if (int(threadIdx.x) < rows) cuda::fence_proxy_async_global();
          for (int r = threadIdx.x; r < rows; r += kThreads)
            cuda::bulk_copy_async(as + r * lda, chunk + r * ld, row_bytes, bar);
          zero_fill(as, rows, kc, have);
        } else if (have == kc) {  // (block-uniform) the chunk's columns exist: whole rows
          for_copies(rows, kc, chunk, [&](int, int at, const scalar_t* from) {
            cuda::copy16_async(as + at, from, 16);
          });
          zero_fill(as, rows, kc, kc);
        } else {
          for_copies(rows, kc, chunk, [&](int c, int at, const scalar_t* from) {
            const int valid = have - c;
            const int bytes = valid <= 0 ? 0 : (valid >= kVec ? 16 : valid * int(sizeof(scalar_t)));
            cuda::copy16_async(as + at, bytes > 0 ? from : base, bytes);
          });
          zero_fill(as, rows, kc, kc);
        }
      } else {  // one value at a time, at issue
        for (int idx = threadIdx.x; idx < round16(rows) * kc; idx += kThreads) {
          const int r = idx / kc, c = idx % kc;
          const int64_t k = k0 + c;
          as[r * g.lda + c] = r < rows && k < kmax ? tc_operand(base[r * ld + k]) : scalar_t(0);
        }
      }
    }
    cuda::async_commit();  // (an empty group past the last item: take() counts groups)
    return bulk;
  }
  __device__ void start() const {
    for (int e = 0; e < g.slots - 1; ++e) issue(e);
  }
  __device__ const scalar_t* take(int64_t e) const {
    if (g.slots == 1) {
      // The previous item's plain and 16-byte stores into the slot, before
      // bulk copies write it (async_copy.h).
      if (bar != nullptr) cuda::fence_proxy_async_shared();
      __syncthreads();  // the previous item is consumed
      if (issue(e)) {
        cuda::mbarrier_wait(bar, *phase);  // the item's bulk copies are done
        *phase ^= 1u;
      }
    }
    cuda::async_wait_for(g.slots > 1 ? g.slots - 2 : 0);  // the thread's copies of item e are done
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (vec && e < items) {
        int64_t row0, k0;
        int rows, kc;
        place(e, row0, rows, k0, kc);
        scalar_t* const as = slot(e);
        for_copies(rows, kc, src, [&](int, int at, const scalar_t*) {
#pragma unroll
          for (int v = 0; v < kVec; ++v) as[at + v] = tc_operand(as[at + v]);
        });
      }
    }
    __syncthreads();
    if (g.slots > 1) issue(e + g.slots - 1);
    return slot(e);
  }
};

// tc_product's operand for the group's tile `tile` of a step in the plain
// tensor-core kernels: staged through the step's ring, or, with the exchange,
// already in shared memory at `resident` (the ring unused).
template <typename scalar_t>
__device__ __forceinline__ auto tile_operand(const StageRing<scalar_t>& ring, int64_t tile,
                                             const scalar_t* resident) {
  return [&ring, tile, resident](int c, int64_t, int) -> const scalar_t* {
    if (resident == nullptr) return ring.take(tile * ring.g.nch + c);
    __syncthreads();  // (the previous tile's C is consumed)
    return resident;
  };
}

// ------------------------------------------------------------------ exchange
// The cluster form of the tensor-core kernels can pass the product's row
// operand (the forward's h, the backward's dgh) from step to step through
// distributed shared memory instead of global memory (Params.xrows > 0, where
// it fits): each CTA keeps two exchange buffers of A for all rows of its
// group, whole, step s reading buffer s & 1 and filling the other. A CTA
// writes the values of its own units (columns) of the rows it steps into its
// own next buffer, then share_columns() copies them into every other CTA of
// the cluster: by stores that complete on an mbarrier of the destination,
// which waits for them (AsyncExchange, below), or, where the columns are not
// in whole 16-byte pieces (or VARLEN_KERNELS_PERSISTENT_EXCHANGE=
// dsmem_barrier), by plain stores before the step's cluster barrier, whose
// release and acquire order shared::cluster memory. No staging from global memory, and the
// state of the CTA's own units (h and c; the backward's carry and dc) stays
// in its shared memory. The group's rows, in the buffers: tile q of the
// length order (tiles of rb rows dealt to the groups in turn, RowGroup) at
// buffer row (q / groups) * rb, so the rows running at a step, a prefix of
// the order, are a prefix of the buffer's rows.
__device__ __forceinline__ int64_t row_of_buffer(const RowGroup& rows, int64_t lr, int64_t rb) {
  return ((lr / rb) * rows.groups + rows.group) * rb + lr % rb;
}

// f(idx, i, jj) for each element own[idx] of a CTA's own state with the
// exchange, idx = lr * Hs + u < xr * Hs: buffer row lr (row i of the length
// order, which may be past the batch) and unit jj = j0 + u (may be past H).
template <typename F>
__device__ __forceinline__ void for_own_state(const RowGroup& rows, int64_t xr, int Hs, int64_t j0,
                                              int64_t rb, F f) {
  for (int64_t idx = threadIdx.x; idx < xr * Hs; idx += kThreads)
    f(idx, row_of_buffer(rows, idx / Hs, rb), j0 + idx % Hs);
}

// The buffer rows of a group's rows that run at a step (rows [0, nrun) of
// the length order): a prefix of the buffer's rows. In 32-bit arithmetic (no
// 64-bit division's branches): with the exchange the batch has fewer than
// 2^31 rows (the buffers hold a group's share of them in shared memory; the
// host asserts it).
__device__ __forceinline__ int buffer_rows_running(const RowGroup& rows, int64_t nrun,
                                                   int64_t rb) {
  const int n = int(nrun), b = int(rb), groups = int(rows.groups), group = int(rows.group);
  const int q = n / b, rem = n - q * b;
  const int whole = q > group ? (q - 1 - group) / groups + 1 : 0;
  return whole * b + (rem > 0 && q % groups == group ? rem : 0);
}

// The exchange without a cluster barrier a step (Params.xasync: every CTA's
// columns in whole 16-byte pieces). The CTAs store their values into the
// others' next buffer with stores that complete on an mbarrier there
// (cuda::store16_async_to): buffer b's, in the 16 bytes that pad the
// buffer's row 0 (the same offset in every CTA; nothing else touches them).
// A phase of it is one step's filling of the buffer: one arrival, thread 0's,
// expecting the bytes of the other CTAs' columns of the group's running rows,
// and their stores. Step s >= 1 waits on buffer s & 1's phase (filled at step
// s - 1) before its product reads it; no CTA waits for the others otherwise.
//  - Every fill brings at least one row from every CTA to every other: each
//    CTA owns a unit below H (ctas = ceil(H / units)), and the group's first
//    row runs at every step before its longest length. The rest rests on it.
//  - A buffer is stored into at step s + 1 only after every CTA has read it at
//    step s: a CTA stores its values of step s + 1 only after it has every
//    CTA's of step s, which each CTA sends after its product of step s.
//  - Thread 0 arms a buffer's phase for the next step that fills it right
//    after its wait on the last phase (both, for steps 0 and 1, before the
//    cluster barrier that precedes the steps): before any CTA can store into
//    it, as those stores come after this CTA's values of the step between,
//    sent after the arming. So a phase never receives bytes before its
//    arming, and never another step's.
//  - A CTA ends after a cluster barrier (the kernels' step_barrier after the
//    last step): its own stores into the others have completed (each waited
//    for them before arriving).
// Steps 0 .. steps - 1 (the forward's longest length; the backward's one
// more); step s fills the next buffer where s + 1 < steps.
struct AsyncExchange {
  // this CTA's mbarriers (nullptr: not taken); two pointers, not an array a
  // step would index at run time (which would put it in local memory)
  uint64_t *bar0 = nullptr, *bar1 = nullptr;
  int64_t row_bytes = 0;  // bytes the other CTAs store into a buffer row
  int64_t steps = 0;
  // buffers: the two exchange buffers (xr rows of g.lda elements of T each).
  template <typename T>
  __device__ AsyncExchange(bool on, T* buffers, int64_t xr, const TcGeometry& g, int NB,
                           int64_t H, int64_t own_cols, int64_t steps_)
      : steps(steps_) {
    if (!on) return;
    CUDA_KERNEL_ASSERT(own_cols > 0 && "every CTA of the exchange owns a unit below H");
    bar0 = reinterpret_cast<uint64_t*>(buffers + g.kp);
    bar1 = reinterpret_cast<uint64_t*>(buffers + xr * g.lda + g.kp);
    row_bytes = int64_t(NB) * (H - own_cols) * int64_t(sizeof(T));
  }
  __device__ bool on() const { return bar0 != nullptr; }
  // Buffer b's (b & 1).
  __device__ uint64_t* bar(int64_t b) const { return (b & 1) ? bar1 : bar0; }
  // Thread 0 arms buffer b for step s (rows: the group's buffer rows running
  // then), where step s fills it.
  __device__ void arm(int64_t s, int64_t rows) const {
    if (threadIdx.x == 0 && s + 1 < steps)
      cuda::mbarrier_arrive_expect_tx(bar(s + 1), unsigned(rows * row_bytes));
  }
  // After a barrier that ends every write to the buffers' padding, before the
  // cluster barrier that precedes the steps: the mbarriers, armed for steps
  // 0 and 1 (rows0, rows1: their running buffer rows).
  __device__ void start(int64_t rows0, int64_t rows1) const {
    if (threadIdx.x == 0) {
      cuda::mbarrier_init(bar0, 1);
      cuda::mbarrier_init(bar1, 1);
    }
    arm(0, rows0);
    arm(1, rows1);
  }
  // Every thread, at the start of step s >= 1: buffer s & 1 holds every CTA's
  // values of step s - 1; then thread 0 arms it for step s + 1 (rows_next:
  // the running buffer rows of step s + 1, which the kernels work out before
  // the wait, so that no division follows it).
  __device__ void wait(int64_t s, int rows_next) const {
    cuda::mbarrier_wait_cluster(bar(s), unsigned((s - 1) >> 1) & 1u);
    arm(s + 1, rows_next);
  }
};

// Rows [0, rows) of an exchange buffer x (row stride ld): the columns
// [b * bstride + c0, b * bstride + c0 + nc) for b < NB, op(value) written in
// place and into the same place in every other CTA of the cluster, in pieces
// of 16 bytes where all of them align, else of one value. With `bar` (the
// mbarrier of x, AsyncExchange; all pieces must align), the other CTAs' by
// stores completing on theirs. Every thread calls it, after a barrier that
// completes the values. The thread's pieces are
// walked without a division a piece (TileWalk; the row of a (row, block) pair
// is a division by the constant NB).
template <int NB, typename T, typename Op>
__device__ __forceinline__ void share_columns(T* x, int64_t ld, int64_t rows, int64_t c0, int nc,
                                              int64_t bstride, Op op, uint64_t* bar = nullptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // clusters need sm_90; the host launches them there only
#else
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned ranks = cluster.num_blocks(), me = cluster.block_rank();
  constexpr int V = 16 / sizeof(T);
  struct alignas(16) Vec { T v[V]; };
  const bool vec = c0 % V == 0 && nc % V == 0 && bstride % V == 0 && ld % V == 0;
  const int per = vec ? nc / V : nc;  // pieces of a block of columns
  if (per <= 0) return;  // (a CTA with no unit below H)
  // (the host takes AsyncExchange only where they align)
  CUDA_KERNEL_ASSERT((bar == nullptr || vec) && "the exchange's stores need 16-byte pieces");
  // 32-bit counts (the rows are the cluster's, held in its shared memory).
  TileWalk(per).each(int(rows) * NB, [&](int rb, int c) {
    const int r = rb / NB, b = rb - r * NB;
    T* at = x + (r * int(ld) + int(b * bstride + c0) + (vec ? c * V : c));
    if (vec) {
      Vec v;
#ifdef VK_EMULATE_CUDA
      std::memcpy(&v, at, sizeof(Vec));
#else
      v = *reinterpret_cast<const Vec*>(at);
#endif
#pragma unroll
      for (int e = 0; e < V; ++e) v.v[e] = op(v.v[e]);
      uint32_t words[4];  // (the stores completing on mbarriers take 32-bit words)
      if (bar != nullptr) std::memcpy(words, &v, sizeof(Vec));
      // self first, then the others in turn (no division a rank)
      for (unsigned k = 0, rank = me; k < ranks; ++k, rank = rank + 1 == ranks ? 0 : rank + 1) {
        if (rank != me && bar != nullptr) {
          cuda::store16_async_to(at, words, bar, rank);
          continue;
        }
        T* dst = rank == me ? at : cluster.map_shared_rank(at, rank);
#ifdef VK_EMULATE_CUDA
        std::memcpy(dst, &v, sizeof(Vec));
#else
        *reinterpret_cast<Vec*>(dst) = v;
#endif
      }
    } else {
      const T v = op(*at);
      for (unsigned k = 0, rank = me; k < ranks; ++k, rank = rank + 1 == ranks ? 0 : rank + 1) {
        *(rank == me ? at : cluster.map_shared_rank(at, rank)) = v;
      }
    }
  });
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
  int64_t ctas = 0;  // CTAs per group
  size_t smem = 0;
  bool kernel_tc = false;  // the tensor-core kernel (else the fma one)
  int64_t groups = 1;      // groups per direction (Directions)
  bool cluster = false;    // the cluster form
  int tile_mt = 0;         // the tensor-core kernels' most_mt (TcGeometry), 0: theirs
  int64_t stage_limit = 0;   // a tile's whole reduction staged at once where it takes at most
                             // this many bytes of shared memory (0: in chunks)
  int slots = 1;             // the most slots of the tensor-core kernels' staging (TcGeometry)
  bool bulk = false;         // their staging by bulk copies (StageRing) where it can
  int64_t xrows = 0;         // the cluster form's exchange buffers' rows (0: none)
  bool xasync = false;       // and its stores completing on mbarriers (AsyncExchange)
  bool forced = false;       // VARLEN_KERNELS_RNN_PATH=persistent (a refused launch is an error)
};

// The fewest units per CTA (the most CTAs) whose W_hh slice fits in shared
// memory and whose grid, `dirs` directions of `groups` groups of CTAs, can be
// resident at once. At most one CTA per SM: every CTA reads all running rows
// of its group's h each step, so more CTAs mean more of that traffic, not
// more useful parallelism. At least min_units units (at most H).
// smem_for(units): the kernel's shared memory in bytes, or -1 when its tiles
// cannot have that many units.
template <typename Kernel, typename SmemFor>
Launch plan_launch(Kernel kernel, int64_t H, int dirs, SmemFor smem_for, int64_t min_units,
                   int64_t groups = 1) {
  Launch l;
  const int64_t most = std::min(cuda::sm_count(), cuda::cooperative_grid_limit(kernel, kThreads, 0)) /
                       (dirs * groups);
  if (most < 1 || H < 1) return l;
  int64_t units = std::max<int64_t>({kMinUnits, (H + most - 1) / most,
                                     std::min<int64_t>(min_units, H)});
  for (; units <= kMaxUnits; ++units) {
    const int64_t bytes = smem_for(int(units));
    if (bytes < 0 || size_t(bytes) > cuda::max_dynamic_smem()) return l;
    const size_t smem = size_t(bytes);
    const int64_t ctas = (H + units - 1) / units;
    if (ctas * dirs * groups <= cuda::cooperative_grid_limit(kernel, kThreads, smem)) {
      l.units = int(units);
      l.ctas = ctas;
      l.smem = smem;
      l.groups = groups;
      return l;
    }
  }
  return l;
}

// The persistent launch (grid form) of `dirs` directions of `groups` row
// groups each, or units = 0 to take another path: the tensor-core kernel where
// tensor_cores_allowed() and it fits, else the fma kernel. tc_smem(units) /
// fma_smem(units): the kernels' shared memory in bytes, or -1 when their tiles
// cannot have that many units; H: the hidden units the CTAs share; work: 0
// when there is nothing to step (either path then does nothing). The error (a
// forced persistent path that does not fit one direction of one group) names
// the sizes, sizes(); two directions that do not fit one launch are not an
// error (each runs in a launch of its own), nor are several groups that do not
// fit (the caller tries fewer).
template <typename scalar_t, typename Kernel, typename Sizes, typename TcSmem, typename FmaSmem>
Launch choose_launch(const PersistentSettings& set, Kernel tc_kernel, Kernel fma_kernel,
                     const char* which, int dirs, int64_t work, Sizes sizes, TcSmem tc_smem,
                     FmaSmem fma_smem, int64_t H, int64_t groups = 1) {
  const RnnPath path = set.path;
  if (path == RnnPath::PerStep || work == 0) return {};
  const int64_t min_units = set.min_units;
  Launch l;
  if (tensor_cores_allowed<scalar_t>()) {
    l = plan_launch(tc_kernel, H, dirs, tc_smem, min_units, groups);
    l.kernel_tc = l.units > 0;
    // Two directions that fit one launch only on CUDA cores: one tensor-core
    // launch each instead, where one direction fits.
    if (l.units == 0 && dirs > 1 &&
        plan_launch(tc_kernel, H, 1, tc_smem, min_units, groups).units > 0)
      return {};
  }
  if (l.units == 0) l = plan_launch(fma_kernel, H, dirs, fma_smem, min_units, groups);
  TORCH_CHECK(l.units > 0 || path == RnnPath::Auto || dirs > 1 || groups > 1,
              "VARLEN_KERNELS_RNN_PATH=persistent: the ", which,
              " kernel does not fit this device for ", sizes(),
              " (the weight slices exceed the shared memory of the CTAs that can be resident ",
              "at once, or the device has no cooperative launch); use 'auto' to fall back to ",
              "the per-step path");
  l.forced = path == RnnPath::Persistent;
  return l;
}

// The cluster form's launch for `dirs` directions (sm_90 and later): a cluster
// of ctas = ceil(H / units) CTAs per group, with the fewest units (the most
// CTAs, at most a portable cluster's worth, 8) whose weight slice fits in
// shared memory, else (a larger H) with up to 16 CTAs where the device can
// schedule such clusters; at least min_units. As many groups as there are
// row tiles of the B rows, at most the clusters that can be resident at once
// (shared by the directions; at least one each, as clusters never wait for
// each other, so they need not all be resident). rows_for(units, clusters)
// gives the rows of a tile and the tensor-core kernels' most_mt (0 for the
// fma kernels, whose tiles are fixed) for `clusters` resident clusters a
// direction. units = 0: no cluster fits.
template <typename Kernel, typename SmemFor, typename RowsFor>
Launch plan_cluster_launch(Kernel kernel, int64_t B, int64_t H, int dirs, SmemFor smem_for,
                           RowsFor rows_for, int64_t min_units) {
  Launch l;
  const int64_t limit = cuda::max_cluster_blocks();
  if (limit < 1 || H < 1) return l;
  int64_t units = 0, ctas = 0, bytes = -1, resident = 0;
  for (const int64_t most : {std::min(cuda::kPortableClusterBlocks, limit), limit}) {
    units = std::max<int64_t>({kMinUnits, (H + most - 1) / most, std::min<int64_t>(min_units, H)});
    if (units > kMaxUnits) continue;
    bytes = smem_for(int(units));
    if (bytes < 0 || size_t(bytes) > cuda::max_dynamic_smem()) continue;
    ctas = (H + units - 1) / units;
    resident = cuda::max_active_clusters(kernel, kThreads, size_t(bytes), ctas);
    if (resident >= 1) break;
  }
  if (resident < 1) return l;
  const int64_t per_direction = std::max<int64_t>(1, resident / dirs);
  const auto [rb, tile_mt] = rows_for(int(units), per_direction);
  l.units = int(units);
  l.ctas = ctas;
  l.smem = size_t(bytes);
  l.cluster = true;
  l.tile_mt = tile_mt;
  l.groups = std::clamp<int64_t>((B + rb - 1) / rb, 1, per_direction);
  return l;
}

// The tensor-core kernels' tile of rows in the cluster form, for `rows` rows
// and `clusters` resident clusters a direction: the fewest 16-row tiles that
// still give every row tile a cluster of its own (at most geometry g's, which
// keeps the 8 warps busy): smaller tiles mean more clusters on the step, and
// a tile with fewer output tiles than warps splits their reductions between
// the warps (tc_product), so its product is not slower by as much. (rows of a
// tile, most_mt).
inline std::pair<int64_t, int> cluster_tc_tile(const TcGeometry& g, int64_t rows,
                                               int64_t clusters) {
  const int64_t tiles16 = (rows + 15) / 16;
  const int mt = int(std::clamp<int64_t>((tiles16 + clusters - 1) / clusters, 1, g.mt));
  return {16 * int64_t(mt), mt};
}

// The cluster form of the persistent launch, as choose_launch chooses the grid
// form: the tensor-core kernel where tensor_cores_allowed() and it fits, else
// the fma one; units = 0 when neither fits (or the setting or the work says
// no). tc_rows / fma_rows: the kernels' rows_for (plan_cluster_launch).
template <typename scalar_t, typename Kernel, typename TcSmem, typename FmaSmem, typename TcRows,
          typename FmaRows>
Launch choose_cluster_launch(const PersistentSettings& set, Kernel tc_kernel, Kernel fma_kernel,
                             int dirs, int64_t work, int64_t B, int64_t H, TcSmem tc_smem,
                             FmaSmem fma_smem, TcRows tc_rows, FmaRows fma_rows) {
  if (set.path == RnnPath::PerStep || work == 0 || set.sync == PersistentSync::Grid) return {};
  const int64_t min_units = set.min_units;
  Launch l;
  if (tensor_cores_allowed<scalar_t>()) {
    l = plan_cluster_launch(tc_kernel, B, H, dirs, tc_smem, tc_rows, min_units);
    l.kernel_tc = l.units > 0;
  }
  if (l.units == 0) l = plan_cluster_launch(fma_kernel, B, H, dirs, fma_smem, fma_rows, min_units);
  l.forced = set.path == RnnPath::Persistent;
  return l;
}

// The launch of the kernel that `l` chose (tensor-core or fma; cooperative, or
// in clusters) for `dirs` directions; params(d) gives direction d's
// parameters. Returns false, having launched nothing, where the device
// refuses the grid or the clusters at run time although the occupancy queries
// allowed them (as where MPS gives the process fewer SMs than the device has):
// the caller then takes another path (two directions: a launch each; one:
// the per-step path), unless VARLEN_KERNELS_RNN_PATH=persistent forces this
// one, which is then an error naming `which` kernel.
template <typename Params, typename ParamsOf>
bool launch_directions(void (*tc_kernel)(Directions<Params>),
                       void (*fma_kernel)(Directions<Params>), const Launch& l, size_t dirs,
                       const char* which, ParamsOf params) {
  Directions<Params> args{};
  for (size_t d = 0; d < dirs; ++d) args.d[d] = params(d);
  args.ctas = l.ctas;
  args.groups = l.groups;
  args.cluster = l.cluster;
  const dim3 grid(unsigned(l.ctas * l.groups * int64_t(dirs)));
  const bool launched =
      l.cluster ? cuda::launch_cluster(l.kernel_tc ? tc_kernel : fma_kernel, grid,
                                       dim3(kThreads), l.ctas, l.smem, cuda::current_stream(),
                                       args)
                : cuda::launch_cooperative(l.kernel_tc ? tc_kernel : fma_kernel, grid,
                                           dim3(kThreads), l.smem, cuda::current_stream(), args);
  TORCH_CHECK(launched || dirs > 1 || !l.forced,
              "VARLEN_KERNELS_RNN_PATH=persistent: the device refused the ", which,
              " kernel's launch of ", grid.x, " CTAs",
              l.cluster ? c10::str(" in clusters of ", l.ctas) : std::string(" (cooperative)"),
              " at run time, although its occupancy queries allowed it (as where MPS gives the ",
              "process fewer SMs than the device has); use 'auto' to fall back to the per-step "
              "path");
  return launched;
}

}  // namespace
}  // namespace varlen
