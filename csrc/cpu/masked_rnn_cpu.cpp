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
//     fused cell update from cell_math.h. The GEMM's left operand is the states
//     workspace itself (its h_prev columns, written by the step before), and
//     the recurrent state kept between steps is in the math type (float for
//     half / bfloat16). Rows past the active prefix are not touched, so each
//     one keeps its final state (forward direction) or its initial state until
//     its own last step comes (reverse direction). Each valid step is written
//     straight into the padded output; the padded steps are then set to zero.
//     float32, bfloat16 and half run the per-step products on a kernel of our
//     own with W_hh packed once per call (see "the per-step products" below);
//     float64 through ATen.
// The workspaces are (T*B, *), the shapes of every backend's; the valid
// tokens are their first N rows, packed (make_workspace).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cell_math.h"
#include "../rnn_args.h"
#include "../rnn_bidirectional.h"
#include "cpu_capability.h"
#include "mkl_gemm.h"
#include "panel_gemm.h"
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

// A (T*B, cols) workspace, the shape of every backend's (rnn_args.h): the
// valid tokens are its first N rows, packed; the rows past N are zero (so
// the op's outputs are deterministic) and never read.
// Zeroed by memset (all-zero bytes are 0 in every floating dtype), split
// between threads: ATen's fill of half / bfloat16 runs element by element.
Tensor make_workspace(const Plan& p, int64_t cols, const at::TensorOptions& opts) {
  Tensor w = at::empty({p.T * p.B, cols}, opts);
  const int64_t row_bytes = cols * int64_t(w.element_size());
  char* tail = static_cast<char*>(w.data_ptr()) + p.N * row_bytes;
  at::parallel_for(0, p.T * p.B - p.N, 64, [&](int64_t r0, int64_t r1) {
    std::memset(tail + r0 * row_bytes, 0, size_t((r1 - r0) * row_bytes));
  });
  return w;
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

// Row ranges of the length order, one per thread: contiguous, each with about
// the same number of valid steps (rows are longest first, so the first range
// has fewer rows). Only rows with length > 0; at most `threads` ranges.
std::vector<std::pair<int64_t, int64_t>> split_rows(const Plan& p, int64_t threads) {
  const int64_t rows = p.T > 0 ? p.bs[0] : 0;  // rows with length > 0
  std::vector<std::pair<int64_t, int64_t>> out;
  if (rows == 0) return out;
  // len of the i-th row of the order = #{t : bs[t] > i}
  std::vector<int64_t> len(rows, 0);
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t i = 0; i < p.bs[t]; ++i) ++len[i];
  const int64_t parts = std::max<int64_t>(1, std::min(threads, rows));
  int64_t begin = 0, done = 0;
  for (int64_t q = 0; q < parts; ++q) {
    const int64_t target = (p.N * (q + 1) + parts - 1) / parts;
    int64_t end = begin;
    // at least one row each, and one left for each range still to come
    while (end < rows - (parts - 1 - q) && (end == begin || done + len[end] <= target))
      done += len[end++];
    if (q == parts - 1) end = rows;
    out.emplace_back(begin, end);
    begin = end;
  }
  return out;
}

// Whether the recurrence splits the batch rows between threads (each thread
// runs its rows through every step, single-threaded products, no
// synchronisation between steps) rather than sharing each step's product
// (MKL's threads) and cell update (rows in parallel): VARLEN_KERNELS_CPU_SPLIT
// = "rows" or "steps"; "auto" (default): rows.
bool split_by_rows(int64_t threads) {
  const char* v = std::getenv("VARLEN_KERNELS_CPU_SPLIT");
  const std::string s = v ? v : "";
  TORCH_CHECK(s.empty() || s == "auto" || s == "rows" || s == "steps",
              "VARLEN_KERNELS_CPU_SPLIT must be 'auto', 'rows' or 'steps', got '", s, "'");
  if (threads < 2 || at::in_parallel_region()) return false;
  return s != "steps";
}

// Whether a step's products, run from here, are shared between threads.
bool shared_steps() { return at::get_num_threads() > 1 && !at::in_parallel_region(); }

// f(r0, r1) for each range, one per thread, each with single-threaded MKL.
template <typename F>
void over_row_ranges(const std::vector<std::pair<int64_t, int64_t>>& ranges, const MklGemm* mkl,
                     F&& f) {
  const at::ThreadLocalState state;
  at::parallel_for(0, int64_t(ranges.size()), 1, [&](int64_t q0, int64_t q1) {
    const at::ThreadLocalStateGuard guard(state);
    MklSequential one(mkl);
    for (int64_t q = q0; q < q1; ++q) f(ranges[q].first, ranges[q].second);
  });
}

// The cell kernels and the panel GEMM in the build for this CPU.
template <typename S, Cell K>
void forward_rows(const FwdStep<S>& a, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  VK_CALL_FOR_CPU(forward_rows<S, K>(a, r0, r1, j0, j1));
}
template <typename S, Cell K>
void backward_rows(const BwdStep<S>& a, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  VK_CALL_FOR_CPU(backward_rows<S, K>(a, r0, r1, j0, j1));
}
template <typename A_t>
void panel_gemm(int64_t m, int64_t n, int64_t k, const A_t* A, int64_t lda, const float* b,
                float beta, float* C, int64_t ldc) {
  VK_CALL_FOR_CPU(panel_gemm<A_t>(m, n, k, A, lda, b, beta, C, ldc));
}

// out (m, n) in the math type = a @ b, a and b in the storage type: at::mm_out,
// or a product rounded to the storage type and widened (half / bfloat16).
void mm_into(Tensor out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (out.scalar_type() == a.scalar_type()) {
    if (accumulate) out.addmm_(a, b);
    else at::mm_out(out, a, b);
  } else if (accumulate) {
    out.add_(at::mm(a, b));
  } else {
    out.copy_(at::mm(a, b));
  }
}

// ----------------------------------------------------- the per-step products
// The recurrent products, h_prev @ W_hh^T (forward) and dgates @ W_hh
// (backward), run per step in one of two arrangements (StepPlan::rows):
//  * Rows split (two or more threads, VARLEN_KERNELS_CPU_SPLIT=rows, the
//    default): the batch rows are split between the threads (contiguous
//    ranges of the length order, balanced by valid steps), and each thread
//    runs its rows through every step on its own: per step, the product of its
//    active rows, then their cell update while the product is in cache.
//    (Fusing the cell update into the panel kernel's output tiles instead,
//    the product for 32 units of every gate then their update while in L1,
//    was measured no faster: forward alone, 2 threads, float32, LSTM 0.996x
//    at B=64 H=256 and 1.003x at B=8 H=128, GRU 0.89x and 0.94x.)
//    Sequences do not depend on each other, so the threads never wait for
//    each other.
//  * Shared steps (one thread, inside a parallel region such as a direction
//    of a bidirectional layer, or VARLEN_KERNELS_CPU_SPLIT=steps): every step
//    multiplies all its active rows at once, then runs the cell update in
//    parallel over rows.
// Measured at 2 threads (AVX-512 EPYC, T=100, float32, fwd+bwd, median of 5
// interleaved repeats): the row split 1.05-1.11x faster than the shared steps
// at B=64 (H=128, 256; LSTM and GRU) and 1.15-1.26x at B=8 (both with MKL
// products).
//
// The products themselves (StepPlan::products), chosen once per call from
// VARLEN_KERNELS_CPU_GEMM (mkl_gemm.h), the storage type and the arrangement:
//  * Panel: W_hh packed once per call into float32 panels (PackedOperand) for
//    panel_gemm.h's kernel, one thread per product; half and bfloat16 products
//    are computed and kept in float32. float32, bfloat16 and half, except
//    bfloat16 / half products shared between threads (unless
//    VARLEN_KERNELS_CPU_GEMM=panel). Against MKL's packed
//    GEMM, both on the row split (same machine, fwd+bwd, 2 threads, lengths
//    uniform in [1, T]): LSTM 1.14x faster at B=64 H=256, 1.45x at B=8
//    H=128, 1.25-1.65x at H=512-1024; forward alone, one thread, 8 rows: 74-82
//    vs 61-62 GFLOP/s.
//  * Mkl: MKL's cblas_sgemm_compute on a W_hh packed once per call (float32
//    products shared between threads, on MKL's threads), or
//    cblas_gemm_bf16bf16f32; both where VARLEN_KERNELS_CPU_GEMM=mkl. bfloat16
//    goes to MKL only when asked for: cblas_gemm_bf16bf16f32 (torch exports no
//    packed form of it) measured slower here than torch's bfloat16 mm
//    (single-threaded, T=100, B=64, H=256 LSTM, AVX-512 EPYC, best of 4:
//    forward 47 vs 38 ms, backward 60 vs 49 ms).
//  * Aten: one at::mm per step (float64, VARLEN_KERNELS_CPU_GEMM=aten, and
//    by default bfloat16 / half products shared between threads, on ATen's
//    threads).
enum class Products { Aten, Panel, Mkl };
struct StepPlan {
  bool rows = false;
  Products products = Products::Aten;
  const MklGemm* mkl = nullptr;  // set for Products::Mkl
};

template <typename scalar_t>
StepPlan choose_step_plan() {
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
  constexpr bool is_bf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool is_half = std::is_same_v<scalar_t, c10::Half>;
  const GemmChoice choice = gemm_choice();  // both settings checked for every dtype
  StepPlan plan;
  plan.rows = split_by_rows(at::get_num_threads());
  const bool shared = !plan.rows && shared_steps();
  if (!(is_float || is_bf16 || is_half) || choice == GemmChoice::Aten) return plan;
  if ((is_float || is_bf16) &&
      (choice == GemmChoice::Mkl || (choice == GemmChoice::Auto && shared && is_float))) {
    const MklGemm* m = mkl_gemm();
    if (m != nullptr && is_bf16 && m->gemm_bf16bf16f32 == nullptr) m = nullptr;
    TORCH_CHECK(m != nullptr || choice != GemmChoice::Mkl,
                "VARLEN_KERNELS_CPU_GEMM=mkl, but this torch build does not export MKL's ",
                is_float ? "packed sgemm" : "cblas_gemm_bf16bf16f32");
    if (m != nullptr) {
      plan.products = Products::Mkl;
      plan.mkl = m;
      return plan;
    }
  }
  if (is_float || !shared || choice == GemmChoice::Panel) plan.products = Products::Panel;
  return plan;
}

// The right operand of C (m, n) = A (m, k) @ op(B) + beta C, for a GEMM whose
// left operand changes at every step: op(B) is the row-major src (n, k)
// transposed (trans) or src (k, n) as is, for plan.products Panel or Mkl.
// Panel: packed once per call into float panels (panel_gemm.h), or for
// bfloat16 on a CPU with AVX512-BF16 into bfloat16 pairs for its dot-product
// kernel (kernels_avx512_bf16.cpp), or where the CPU also has AMX for the AMX
// kernel (kernels_amx_bf16.cpp). Mkl: float32
// is packed by MKL for up to max_m rows (on the same threads as the
// products); bfloat16 is used in place (torch exports no bf16 pack), so src
// must then outlive this object.
template <typename scalar_t>
class PackedOperand {
 public:
  PackedOperand(const StepPlan& plan, int64_t max_m, const scalar_t* src, int64_t ld, bool trans,
                int64_t k, int64_t n)
      : mkl_(plan.mkl), src_(src), ld_(ld), trans_(trans), k_(k), n_(n) {
    TORCH_INTERNAL_ASSERT(plan.products != Products::Aten);
    if (plan.products == Products::Panel) {
      mkl_ = nullptr;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (cpu_has_avx512_bf16()) {
          pairs_ = at::empty({panel_pair_elems(k, n)}, at::kBFloat16);
          pack_panels_pairs(src, ld, trans, k, n, pairs_.data_ptr<c10::BFloat16>());
          amx_ = cpu_has_amx_bf16();
          return;
        }
      }
      panels_ = at::empty({panel_floats(k, n)}, at::kFloat);
      pack_panels(src, ld, trans, k, n, panels_.data_ptr<float>());
      return;
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      const size_t bytes = mkl_->sgemm_pack_get_size(kMklBMatrix, int(max_m), int(n), int(k));
      // MKL asks for several MiB whatever the matrix: one buffer is kept per
      // thread and reused by the next call, rather than mapped (and its pages
      // faulted in) afresh at every call. An operand packed while the
      // thread's buffer is held by another (the projection LSTM packs W_hh
      // and W_hr) gets a buffer of its own.
      ThreadBuffer& tb = thread_buffer();
      const int64_t floats = int64_t(bytes / sizeof(float)) + 16;
      Tensor* buffer = &own_;
      if (!tb.held) {
        tb.held = holds_thread_buffer_ = true;
        buffer = &tb.buffer;
      }
      if (!buffer->defined() || buffer->numel() < floats) *buffer = at::empty({floats}, at::kFloat);
      packed_ = buffer->data_ptr<float>();
      mkl_->sgemm_pack(kMklRowMajor, kMklBMatrix, trans ? kMklTrans : kMklNoTrans, int(max_m),
                       int(n), int(k), 1.f, src, int(ld), packed_);
    }
  }

  ~PackedOperand() {
    if (holds_thread_buffer_) thread_buffer().held = false;
  }
  PackedOperand(const PackedOperand&) = delete;
  PackedOperand& operator=(const PackedOperand&) = delete;

  // C (m, n), row stride ldc, = A (m, k), row stride lda, @ op(B) + beta C:
  // the panel kernel on this thread, or MKL on its threads.
  void run(int64_t m, const scalar_t* A, int64_t lda, float beta, float* C, int64_t ldc) const {
    if (m <= 0) return;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (pairs_.defined()) {
        const c10::BFloat16* pairs = pairs_.const_data_ptr<c10::BFloat16>();
        if (amx_) return amx_bf16::panel_gemm(m, n_, k_, A, lda, pairs, beta, C, ldc);
        return avx512_bf16::panel_gemm(m, n_, k_, A, lda, pairs, beta, C, ldc);
      }
    }
    if (panels_.defined()) {
      panel_gemm<scalar_t>(m, n_, k_, A, lda, panels_.const_data_ptr<float>(), beta, C, ldc);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      mkl_->sgemm_compute(kMklRowMajor, kMklNoTrans, kMklPacked, int(m), int(n_), int(k_), A,
                          int(lda), packed_, int(n_), beta, C, int(ldc));
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      mkl_->gemm_bf16bf16f32(kMklRowMajor, kMklNoTrans, trans_ ? kMklTrans : kMklNoTrans, int(m),
                             int(n_), int(k_), 1.f, reinterpret_cast<const uint16_t*>(A), int(lda),
                             reinterpret_cast<const uint16_t*>(src_), int(ld_), beta, C, int(ldc));
    } else {
      TORCH_INTERNAL_ASSERT(false, "half products run on the panel kernel only");
    }
  }

 private:
  const MklGemm* mkl_;        // MKL runs the products, or null (the panel kernel)
  const scalar_t* src_;
  int64_t ld_;
  bool trans_;
  int64_t k_, n_;
  Tensor panels_;             // the panel kernel's packed form
  Tensor pairs_;              // bfloat16 on AVX512-BF16: the dot-product or AMX kernel's packed form
  bool amx_ = false;          // pairs_ multiplied on AMX's tiles
  float* packed_ = nullptr;   // float: MKL's packed form, in the thread's buffer or own_
  Tensor own_;
  bool holds_thread_buffer_ = false;

  struct ThreadBuffer {
    Tensor buffer;
    bool held = false;
  };
  static ThreadBuffer& thread_buffer() {
    thread_local ThreadBuffer tb;
    return tb;
  }
};

// The storage types PackedOperand takes (float64 runs on ATen: exact tests).
template <typename scalar_t>
constexpr bool has_packed_path() {
  return std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
         std::is_same_v<scalar_t, c10::Half>;
}

// Runs body(t, n, r0, r1, parallel_cells) for every step: over the rows
// [r0, min(n, r1)) of each thread's range where the rows are split, else over
// the step's n rows at once (the cell updates then in parallel over rows).
template <typename F>
void over_steps_and_rows(const Plan& p, const StepPlan& plan, bool reverse, bool backward_pass,
                         F&& body) {
  if (plan.rows && plan.products != Products::Aten) {
    over_row_ranges(split_rows(p, at::get_num_threads()), plan.mkl, [&](int64_t r0, int64_t r1) {
      for_each_step(p, reverse, backward_pass, [&](int64_t t, int64_t n) {
        if (std::min(n, r1) > r0) body(t, n, r0, r1, false);
      });
    });
  } else {
    for_each_step(p, reverse, backward_pass,
                  [&](int64_t t, int64_t n) { body(t, n, int64_t(0), n, true); });
  }
}

// The cell update of rows [r0, r1): on this thread, or in parallel over rows.
template <typename F>
void cell_rows(bool parallel, int64_t r0, int64_t r1, int64_t H, F&& f) {
  if (!parallel) return f(r0, r1);
  at::parallel_for(r0, r1, grain_rows(H), f);
}

// A right operand packed for plan.products, or none where ATen runs the
// products (always for float64).
template <typename scalar_t>
std::optional<PackedOperand<scalar_t>> pack_for(const StepPlan& plan, int64_t max_m,
                                                const scalar_t* src, int64_t ld, bool trans,
                                                int64_t k, int64_t n) {
  if constexpr (has_packed_path<scalar_t>()) {
    if (plan.products != Products::Aten)
      return std::optional<PackedOperand<scalar_t>>(std::in_place, plan, max_m, src, ld, trans,
                                                    k, n);
  }
  return std::nullopt;
}

// C (m, n) = A @ op(B) + beta C through `op` where it is packed (returns
// true), else false: the caller runs ATen's product.
template <typename scalar_t, typename acc_t>
bool packed_product(const std::optional<PackedOperand<scalar_t>>& op, int64_t m,
                    const scalar_t* A, int64_t lda, float beta, acc_t* C, int64_t ldc) {
  if constexpr (has_packed_path<scalar_t>()) {
    if (op) {
      op->run(m, A, lda, beta, C, ldc);
      return true;
    }
  }
  return false;
}

// Before the first step: each row's h_prev at its first step is h0, written to
// that step's rows of `states` (every later step gets it from the step before).
// Forward, every sequence starts at t = 0; reverse, at its own last step.
template <typename scalar_t>
void place_h0(const Plan& p, bool reverse, const Tensor& h0_sorted, scalar_t* states,
              int64_t ld) {
  const int64_t H = h0_sorted.size(1);
  const scalar_t* h0 = h0_sorted.const_data_ptr<scalar_t>();
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t first = reverse ? (t + 1 < p.T ? p.bs[t + 1] : 0) : (t == 0 ? 0 : p.bs[t]);
    for (int64_t i = first; i < p.bs[t]; ++i)
      std::copy_n(h0 + i * H, H, states + (p.off[t] + i) * ld);
  }
}

// ------------------------------------------------------------------ forward
// input (T, B, I); h0, c0 (B, H); w_ih (G*H, I); w_hh (G*H, H).
// Per step t with n = bs[t] active rows: gh = h_prev @ W_hh^T, where h_prev is
// the states workspace's first H columns of this step's rows (written by the
// step before, or h0), then the cell update, which writes h' into the next
// step's rows of states, into h / c (the math-type state) and into the output.
template <typename scalar_t, Cell K>
std::vector<Tensor> forward_impl(const Plan& p, const RnnSizes& s, const Tensor& input,
                                 const Tensor& h0, const c10::optional<Tensor>& c0,
                                 const Tensor& w_ih, const Tensor& w_hh,
                                 const c10::optional<Tensor>& b_ih,
                                 const c10::optional<Tensor>& b_hh, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S = num_states(K);
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, N = p.N;
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(c10::CppTypeToScalarType<acc_t>::value);

  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  // Input projection for every valid token.
  const auto proj = input_projection(xp, w_ih, b_ih, b_hh, K, H);
  const Tensor &gx = proj.first, &b_hn = proj.second;

  const Tensor h0s = to_sorted(p, h0).contiguous();
  Tensor h = h0s.to(acc_opts.dtype()).contiguous();  // (B, H) math-type state
  Tensor c = K == Cell::LSTM ? to_sorted(p, *c0).to(acc_opts.dtype()).contiguous() : Tensor();
  // The pointwise kernel writes each valid step straight into the padded output.
  Tensor output = at::empty({T, B, H}, opts);
  Tensor gates = make_workspace(p, GS * H, opts);
  Tensor states = make_workspace(p, S * H, opts);
  scalar_t* ws = states.data_ptr<scalar_t>();
  place_h0<scalar_t>(p, reverse, h0s, ws, S * H);

  const FwdStep<scalar_t> common{gx.const_data_ptr<scalar_t>(), nullptr, G * H, H, 0,
                                 b_hn.defined() ? b_hn.const_data_ptr<scalar_t>() : nullptr,
                                 h.data_ptr<acc_t>(), K == Cell::LSTM ? c.data_ptr<acc_t>() : nullptr,
                                 nullptr, 0, S * H, output.data_ptr<scalar_t>(), p.perm.data(), H,
                                 gates.data_ptr<scalar_t>(), ws, H};
  // This step's pointers into the workspaces.
  auto step_at = [&](int64_t t, int64_t n) {
    FwdStep<scalar_t> a = common;
    const int64_t o = p.off[t], tn = reverse ? t - 1 : t + 1;
    a.gx += o * G * H;
    a.h_next = (tn >= 0 && tn < T) ? ws + p.off[tn] * S * H : nullptr;
    a.n_next = a.h_next ? std::min(n, p.bs[tn]) : 0;
    a.y += t * B * H;
    a.gates += o * GS * H;
    a.states += o * S * H;
    return a;
  };

  const StepPlan plan = choose_step_plan<scalar_t>();
  const auto w = pack_for<scalar_t>(plan, B, w_hh.const_data_ptr<scalar_t>(), H, /*trans=*/true,
                                    H, G * H);
  const Tensor w_hh_t = w_hh.t();
  Tensor gh = at::empty({B, G * H}, acc_opts);  // this step's h_prev @ W_hh^T
  over_steps_and_rows(p, plan, reverse, /*backward_pass=*/false,
                      [&](int64_t t, int64_t n, int64_t r0, int64_t r1, bool parallel) {
    const int64_t o = p.off[t], m = std::min(n, r1) - r0;  // rows [r0, r0 + m) of step t
    if (!packed_product(w, m, ws + (o + r0) * S * H, S * H, 0.f,
                        gh.data_ptr<acc_t>() + r0 * G * H, G * H))
      mm_into(gh.narrow(0, r0, m), states.narrow(0, o + r0, m).narrow(1, 0, H), w_hh_t, false);
    FwdStep<scalar_t> a = step_at(t, n);
    a.gh = gh.const_data_ptr<acc_t>();
    cell_rows(parallel, r0, r0 + m, H, [&](int64_t i0, int64_t i1) {
      forward_rows<scalar_t, K>(a, i0, i1, 0, H);
    });
  });

  scatter_padded<scalar_t>(p, static_cast<const scalar_t*>(nullptr), output);
  Tensor h_n = from_sorted(p, h.to(opts.dtype()));
  Tensor c_n = K == Cell::LSTM ? from_sorted(p, c.to(opts.dtype())) : at::empty({0}, opts);
  return {output, h_n, c_n, gates, states};
}

// ----------------------------------------------------------------- backward
// Per step t, in the opposite order to the forward, with n active rows: the
// cell's backward turns dh (gradient w.r.t. h', math type) and dc into the
// pre-activation gradients dgx / dgh (storage type, rows of step t), then
// dh_prev = dgh @ W_hh (+ GRU's direct part) for the n rows.
template <typename scalar_t, Cell K>
std::vector<Tensor> backward_impl(const Plan& p, const RnnSizes& s, const Tensor& grad_output,
                                  const Tensor& grad_h_n, const Tensor& grad_c_n,
                                  const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                  const Tensor& gates, const Tensor& states, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t G = num_gates(K), GS = num_saved_gates(K), S = num_states(K);
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, N = p.N;
  const auto opts = input.options();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;

  Tensor dh = to_sorted(p, grad_h_n).to(acc).contiguous();
  Tensor dc = K == Cell::LSTM ? to_sorted(p, grad_c_n).to(acc).contiguous() : Tensor();
  // Gradients w.r.t. the pre-activations, input side and hidden side. They
  // differ only for GRU's n gate (the hidden side is scaled by r).
  Tensor dgx = at::empty({N, G * H}, opts);
  Tensor dgh = K == Cell::GRU ? at::empty({N, G * H}, opts) : dgx;

  acc_t* dhp = dh.data_ptr<acc_t>();
  const int64_t dy_s0 = grad_output.stride(0), dy_s1 = grad_output.stride(1);
  const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
  scalar_t* dghp = dgh.data_ptr<scalar_t>();
  const BwdStep<scalar_t> common{gates.const_data_ptr<scalar_t>(), states.const_data_ptr<scalar_t>(),
                                 dy, p.perm.data(), dy_s1, dhp,
                                 K == Cell::LSTM ? dc.data_ptr<acc_t>() : nullptr,
                                 dgx.data_ptr<scalar_t>(), dghp, H};
  auto step_at = [&](int64_t t) {
    BwdStep<scalar_t> a = common;
    const int64_t o = p.off[t];
    a.gates += o * GS * H;
    a.states += o * S * H;
    a.dy += t * dy_s0;
    a.dgx += o * G * H;
    a.dgh += o * G * H;
    return a;
  };
  // GRU: the cell's backward leaves the direct part of dh_prev in dh, the
  // product adds to it; otherwise the product overwrites dh.
  const bool accumulate = K == Cell::GRU;

  const StepPlan plan = choose_step_plan<scalar_t>();
  const auto w = pack_for<scalar_t>(plan, B, w_hh.const_data_ptr<scalar_t>(), H, /*trans=*/false,
                                    G * H, H);
  over_steps_and_rows(p, plan, reverse, /*backward_pass=*/true,
                      [&](int64_t t, int64_t n, int64_t r0, int64_t r1, bool parallel) {
    const int64_t o = p.off[t], m = std::min(n, r1) - r0;  // rows [r0, r0 + m) of step t
    const BwdStep<scalar_t> a = step_at(t);
    cell_rows(parallel, r0, r0 + m, H, [&](int64_t i0, int64_t i1) {
      backward_rows<scalar_t, K>(a, i0, i1, 0, H);
    });
    // Gradient reaching the previous hidden state through W_hh.
    if (!packed_product(w, m, dghp + (o + r0) * G * H, G * H, accumulate ? 1.f : 0.f,
                        dhp + r0 * H, H))
      mm_into(dh.narrow(0, r0, m), dgh.narrow(0, o + r0, m), w_hh, accumulate);
  });

  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  const Tensor h_prev = states.narrow(0, 0, N).narrow(1, 0, H);
  Tensor grad_w_ih = at::mm(dgx.t(), xp);
  Tensor grad_w_hh = at::mm(dgh.t(), h_prev);
  Tensor grad_b_ih = dgx.sum(0);
  Tensor grad_b_hh = K == Cell::GRU ? dgh.sum(0) : grad_b_ih.clone();
  Tensor grad_input = at::empty({T, B, I}, opts);
  Tensor dxp = at::mm(dgx, w_ih);
  scatter_padded<scalar_t>(p, dxp.const_data_ptr<scalar_t>(), grad_input);
  Tensor grad_h0 = from_sorted(p, dh.to(opts.dtype()));
  Tensor grad_c0 = K == Cell::LSTM ? from_sorted(p, dc.to(opts.dtype())) : at::empty({0}, opts);
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}


// ------------------------------------------------- LSTM with a projection
// nn.LSTM's proj_size: the cell computes r = o * tanh(c) (H features) and the
// state is h = w_hr r (P features), so W_hh is (4H, P). Same plan as above;
// per step and row: the product h_prev @ W_hh^T, the cell update, which writes
// r (storage type) into a scratch block, the product r @ W_hr^T, then h to the
// padded output. Workspace rows: gates (4H) as without projection; states
// [r (H) | c_prev (H) | h_prev (P)]. Both products of a step run as the plain
// LSTM's (StepPlan): with the rows split between the threads, or each step's
// rows at once; through PackedOperand (W_hh and W_hr packed once per call) or
// ATen.

template <typename scalar_t>
std::vector<Tensor> forward_proj(const Plan& p, const ProjSizes& s, const Tensor& input,
                                 const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                 const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                 const c10::optional<Tensor>& b_hh, const Tensor& w_hr,
                                 bool reverse) {
  constexpr Cell K = Cell::LSTM;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P, N = p.N;
  const auto opts = input.options();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  const Tensor gx = input_projection(xp, w_ih, b_ih, b_hh, K, H).first;

  Tensor h = to_sorted(p, h0).contiguous();             // (B, P), storage type
  Tensor c = to_sorted(p, c0).to(acc).contiguous();     // (B, H), math type
  Tensor gh = at::empty({B, 4 * H}, opts.dtype(acc));   // h_prev @ W_hh^T
  Tensor r = at::empty({B, H}, opts.dtype(acc));        // the cell's r, math type
  Tensor r_st = at::empty({B, H}, opts);                // r, storage type: W_hr's operand
  Tensor hp = at::empty({B, P}, opts.dtype(acc));       // r @ W_hr^T
  Tensor y_scratch = at::empty({B, H}, opts);  // the kernel's padded write, unused
  Tensor st_scratch = at::empty({B, 2 * H}, opts);
  Tensor output = at::zeros({T, B, P}, opts);
  Tensor gates = make_workspace(p, 4 * H, opts);
  Tensor states = make_workspace(p, 2 * H + P, opts);
  const Tensor w_hh_t = w_hh.t(), w_hr_t = w_hr.t();
  scalar_t* out = output.data_ptr<scalar_t>();
  scalar_t* hs = h.data_ptr<scalar_t>();
  scalar_t* ws = states.data_ptr<scalar_t>();
  const scalar_t* rs = r_st.const_data_ptr<scalar_t>();
  const scalar_t* sts = st_scratch.const_data_ptr<scalar_t>();
  const acc_t* hpp = hp.const_data_ptr<acc_t>();
  const int64_t SW = 2 * H + P;  // a states row

  const StepPlan plan = choose_step_plan<scalar_t>();
  const auto w = pack_for<scalar_t>(plan, B, w_hh.const_data_ptr<scalar_t>(), P, /*trans=*/true,
                                    P, 4 * H);
  const auto wr = pack_for<scalar_t>(plan, B, w_hr.const_data_ptr<scalar_t>(), H,
                                     /*trans=*/true, H, P);
  over_steps_and_rows(p, plan, reverse, /*backward_pass=*/false,
                      [&](int64_t t, int64_t n, int64_t r0, int64_t r1, bool parallel) {
    const int64_t o = p.off[t], m = std::min(n, r1) - r0;
    // h_prev saved, then gh = h_prev @ W_hh^T
    for (int64_t i = r0; i < r0 + m; ++i) std::copy_n(hs + i * P, P, ws + (o + i) * SW + 2 * H);
    if (!packed_product(w, m, hs + r0 * P, P, 0.f, gh.data_ptr<acc_t>() + r0 * 4 * H, 4 * H))
      mm_into(gh.narrow(0, r0, m), h.narrow(0, r0, m), w_hh_t, false);
    const FwdStep<scalar_t> step{gx.const_data_ptr<scalar_t>() + o * 4 * H,
                                 gh.const_data_ptr<acc_t>(), 4 * H, H, 0, nullptr,
                                 r.data_ptr<acc_t>(), c.data_ptr<acc_t>(),
                                 r_st.data_ptr<scalar_t>(), n, H,
                                 y_scratch.data_ptr<scalar_t>(), p.perm.data(), H,
                                 gates.data_ptr<scalar_t>() + o * 4 * H,
                                 st_scratch.data_ptr<scalar_t>(), H};
    cell_rows(parallel, r0, r0 + m, H, [&](int64_t a, int64_t b) {
      forward_rows<scalar_t, K>(step, a, b, 0, H);
    });
    // states [r | c_prev], then h = r @ W_hr^T to the state and the output
    for (int64_t i = r0; i < r0 + m; ++i) {
      std::copy_n(rs + i * H, H, ws + (o + i) * SW);
      std::copy_n(sts + i * 2 * H + H, H, ws + (o + i) * SW + H);
    }
    if (!packed_product(wr, m, rs + r0 * H, H, 0.f, hp.data_ptr<acc_t>() + r0 * P, P))
      mm_into(hp.narrow(0, r0, m), r_st.narrow(0, r0, m), w_hr_t, false);
    for (int64_t i = r0; i < r0 + m; ++i) {
      scalar_t* hi = hs + i * P;
      for (int64_t j = 0; j < P; ++j) hi[j] = scalar_t(hpp[i * P + j]);
      std::copy_n(hi, P, out + (t * B + p.perm[i]) * P);
    }
  });
  return {output, from_sorted(p, h), from_sorted(p, c.to(opts.dtype())), gates, states};
}

template <typename scalar_t>
std::vector<Tensor> backward_proj(const Plan& p, const ProjSizes& s, const Tensor& grad_output,
                                  const Tensor& grad_h_n, const Tensor& grad_c_n,
                                  const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                  const Tensor& w_hr, const Tensor& gates, const Tensor& states,
                                  bool reverse) {
  constexpr Cell K = Cell::LSTM;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = s.T, B = s.B, I = s.I, H = s.H, P = s.P, N = p.N;
  const auto opts = input.options();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  check_workspace_shapes(gates, states, T, B, 4 * H, 2 * H + P);
  Tensor dh = to_sorted(p, grad_h_n).to(acc).contiguous();  // (B, P): d h' from later steps
  Tensor dc = to_sorted(p, grad_c_n).to(acc).contiguous();
  Tensor dh_all = at::empty({N, P}, opts);          // d h' in total, per valid token
  Tensor dr = at::empty({B, H}, opts.dtype(acc));
  Tensor zeros = at::zeros({B, H}, opts);           // grad_output already folded into dh_all
  Tensor st_scratch = at::empty({B, 2 * H}, opts);
  Tensor dgx = at::empty({N, 4 * H}, opts);
  const scalar_t* dy = grad_output.const_data_ptr<scalar_t>();
  const int64_t dy_s0 = grad_output.stride(0), dy_s1 = grad_output.stride(1);
  const scalar_t* ws = states.const_data_ptr<scalar_t>();
  scalar_t* sts = st_scratch.data_ptr<scalar_t>();
  scalar_t* dha = dh_all.data_ptr<scalar_t>();
  acc_t* dhp = dh.data_ptr<acc_t>();
  const int64_t SW = 2 * H + P;

  const StepPlan plan = choose_step_plan<scalar_t>();
  const auto w = pack_for<scalar_t>(plan, B, w_hh.const_data_ptr<scalar_t>(), P,
                                    /*trans=*/false, 4 * H, P);
  const auto wr = pack_for<scalar_t>(plan, B, w_hr.const_data_ptr<scalar_t>(), H,
                                     /*trans=*/false, P, H);
  over_steps_and_rows(p, plan, reverse, /*backward_pass=*/true,
                      [&](int64_t t, int64_t n, int64_t r0, int64_t r1, bool parallel) {
    const int64_t o = p.off[t], m = std::min(n, r1) - r0;
    // d h' in total (from later steps and from this step's output), then
    // dr = dh' @ W_hr, then the cell's backward with dr as the gradient of r
    for (int64_t i = r0; i < r0 + m; ++i) {
      const scalar_t* g = dy + t * dy_s0 + p.perm[i] * dy_s1;
      for (int64_t j = 0; j < P; ++j) dha[(o + i) * P + j] = scalar_t(dhp[i * P + j] + acc_t(g[j]));
      std::copy_n(ws + (o + i) * SW, 2 * H, sts + i * 2 * H);
    }
    if (!packed_product(wr, m, dha + (o + r0) * P, P, 0.f, dr.data_ptr<acc_t>() + r0 * H, H))
      mm_into(dr.narrow(0, r0, m), dh_all.narrow(0, o + r0, m), w_hr, false);
    const BwdStep<scalar_t> step{gates.const_data_ptr<scalar_t>() + o * 4 * H,
                                 st_scratch.const_data_ptr<scalar_t>(),
                                 zeros.const_data_ptr<scalar_t>(), p.perm.data(), H,
                                 dr.data_ptr<acc_t>(), dc.data_ptr<acc_t>(),
                                 dgx.data_ptr<scalar_t>() + o * 4 * H, nullptr, H};
    cell_rows(parallel, r0, r0 + m, H, [&](int64_t a, int64_t b) {
      backward_rows<scalar_t, K>(step, a, b, 0, H);
    });
    // d h_prev = dgates @ W_hh
    if (!packed_product(w, m, dgx.const_data_ptr<scalar_t>() + (o + r0) * 4 * H, 4 * H, 0.f,
                        dh.data_ptr<acc_t>() + r0 * P, P))
      mm_into(dh.narrow(0, r0, m), dgx.narrow(0, o + r0, m), w_hh, false);
  });

  Tensor xp = at::empty({N, I}, opts);
  gather_packed<scalar_t>(p, input, xp.data_ptr<scalar_t>());
  Tensor grad_w_ih = at::mm(dgx.t(), xp);
  const Tensor valid = states.narrow(0, 0, N);
  Tensor grad_w_hh = at::mm(dgx.t(), valid.narrow(1, 2 * H, P));
  Tensor grad_w_hr = at::mm(dh_all.t(), valid.narrow(1, 0, H));
  Tensor grad_b = dgx.sum(0);
  Tensor grad_input = at::empty({T, B, I}, opts);
  Tensor dxp = at::mm(dgx, w_ih);
  scatter_padded<scalar_t>(p, dxp.const_data_ptr<scalar_t>(), grad_input);
  return {grad_input, from_sorted(p, dh.to(opts.dtype())), from_sorted(p, dc.to(opts.dtype())),
          grad_w_ih, grad_w_hh, grad_b, grad_b.clone(), grad_w_hr};
}

// One direction's checked sizes: with a projection (proj) or without.
struct Checked {
  bool proj = false;
  RnnSizes s{};
  ProjSizes ps{};
  int64_t T() const { return proj ? ps.T : s.T; }
};

Checked check_forward(const Tensor& input, const Tensor& lengths, const Tensor& h0,
                      const c10::optional<Tensor>& c0, const DirectionWeights& w,
                      const std::string& cell) {
  Checked c;
  c.proj = w.w_hr.has_value();
  if (c.proj)
    c.ps = check_proj_forward_args(input, lengths, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh,
                                   *w.w_hr, cell);
  else
    c.s = check_rnn_forward_args(input, lengths, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, cell);
  return c;
}

// One direction of a checked call, on the plan of its lengths.
RnnForwardResult run_forward(const Checked& c, const Plan& p, const Tensor& input,
                             const Tensor& h0, const c10::optional<Tensor>& c0,
                             const DirectionWeights& w, bool reverse) {
  const Tensor x = input.stride(2) == 1 ? input : input.contiguous();
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "rnn_forward",
                                  [&] {
    if (c.proj) {
      out = forward_proj<scalar_t>(p, c.ps, x, h0, *c0, w.w_ih.contiguous(), w.w_hh.contiguous(),
                                   w.b_ih, w.b_hh, w.w_hr->contiguous(), reverse);
    } else {
      out = dispatch_cell(c.s.cell, [&](auto k) {
        return forward_impl<scalar_t, decltype(k)::value>(p, c.s, x, h0, c0, w.w_ih.contiguous(),
                                                          w.w_hh.contiguous(), w.b_ih, w.b_hh,
                                                          reverse);
      });
    }
  });
  return {out[0], out[1], out[2], out[3], out[4]};
}

Checked check_backward(const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
                       const Tensor& input, const Tensor& lengths, const DirectionWeights& w,
                       const Tensor& gates, const Tensor& states, const std::string& cell) {
  Checked c;
  c.proj = w.w_hr.has_value();
  if (c.proj)
    c.ps = check_proj_backward_args(grad_output, grad_h_n, grad_c_n, input, lengths, w.w_ih,
                                    w.w_hh, *w.w_hr, gates, states, cell);
  else
    c.s = check_rnn_backward_args(grad_output, grad_h_n, grad_c_n, input, lengths, w.w_ih, w.w_hh,
                                  gates, states, cell);
  return c;
}

void check_workspace_rows(const Checked& c, const Tensor& gates, const Tensor& states) {
  if (c.proj) return;  // backward_proj checks its own
  check_workspace_shapes(gates, states, c.s.T, c.s.B, c.s.GS * c.s.H, c.s.S * c.s.H);
}

RnnBackwardResult run_backward(const Checked& c, const Plan& p, const Tensor& grad_output,
                               const Tensor& grad_h_n, const Tensor& grad_c_n,
                               const Tensor& input, const DirectionWeights& w,
                               const Tensor& gates, const Tensor& states, bool reverse) {
  const Tensor x = input.stride(2) == 1 ? input : input.contiguous();
  const auto dt = input.scalar_type();
  std::vector<Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "rnn_backward", [&] {
    if (c.proj) {
      out = backward_proj<scalar_t>(p, c.ps, grad_output.to(dt).contiguous(), grad_h_n.to(dt),
                                    grad_c_n.to(dt), x, w.w_ih.contiguous(), w.w_hh.contiguous(),
                                    w.w_hr->contiguous(), gates.contiguous(), states.contiguous(),
                                    reverse);
    } else {
      const Tensor go = grad_output.stride(2) == 1 ? grad_output : grad_output.contiguous();
      out = dispatch_cell(c.s.cell, [&](auto k) {
        return backward_impl<scalar_t, decltype(k)::value>(
            p, c.s, go.to(dt), grad_h_n.to(dt), grad_c_n.to(dt), x, w.w_ih.contiguous(),
            w.w_hh.contiguous(), gates, states, reverse);
      });
      out.push_back(at::empty({0}, input.options()));
    }
  });
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
}

RnnForwardResult rnn_forward_cpu(const Tensor& input, const Tensor& lengths, const Tensor& h0,
                                 const c10::optional<Tensor>& c0, const Tensor& w_ih,
                                 const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                 const c10::optional<Tensor>& b_hh, c10::string_view cell,
                                 bool reverse, const c10::optional<Tensor>& w_hr) {
  const DirectionWeights w{w_ih, w_hh, b_ih, b_hh, w_hr};
  const Checked c = check_forward(input, lengths, h0, c0, w, std::string(cell));
  return run_forward(c, make_plan(lengths, c.T()), input, h0, c0, w, reverse);
}

RnnBackwardResult rnn_backward_cpu(const Tensor& grad_output, const Tensor& grad_h_n,
                                   const Tensor& grad_c_n, const Tensor& input,
                                   const Tensor& lengths, const Tensor& w_ih, const Tensor& w_hh,
                                   const Tensor& gates, const Tensor& states,
                                   c10::string_view cell, bool reverse,
                                   const c10::optional<Tensor>& w_hr) {
  const DirectionWeights w{w_ih, w_hh, c10::nullopt, c10::nullopt, w_hr};
  const Checked c = check_backward(grad_output, grad_h_n, grad_c_n, input, lengths, w, gates,
                                   states, std::string(cell));
  const Plan p = make_plan(lengths, c.T());
  check_workspace_rows(c, gates, states);
  return run_backward(c, p, grad_output, grad_h_n, grad_c_n, input, w, gates, states, reverse);
}

// ------------------------------------------------------- both directions
// Whether the two directions of a layer run concurrently, a thread each (its
// products and cell updates single-threaded): with two or three threads, and
// a step's product of at most 2^15 outputs (B rows x G*H gate columns).
// Otherwise they run one after the other, each on all threads (the batch rows
// split between them). Measured at 2 threads (AVX-512 EPYC, T=100, float32,
// fwd+bwd), concurrent against one after the other: 1.28-1.44x at B=8
// (H=128, 256; LSTM and GRU), 1.14x for GRU at B=64 H=128 (24576 outputs),
// 0.99x for LSTM there (32768), 1.01x and 0.90x for GRU and LSTM at B=64
// H=256. The one-thread-each split was measured on 2-thread machines only.
bool directions_concurrently(int64_t B, int64_t gate_cols) {
  const int threads = at::get_num_threads();
  return threads >= 2 && threads < 4 && !at::in_parallel_region() &&
         B * gate_cols <= (int64_t(1) << 15);
}

// f(0) and f(1), concurrently or one after the other. The worker thread gets
// the caller's thread-local state (grad mode, the dispatch keys excluded below
// autograd, ...): at::parallel_for does not carry it, and the directions call
// ATen ops.
template <typename F>
void for_both_directions(bool concurrently, F&& f) {
  if (concurrently) {
    const at::ThreadLocalState state;
    at::parallel_for(0, 2, 1, [&](int64_t d0, int64_t d1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t d = d0; d < d1; ++d) f(d);
    });
  } else {
    f(0);
    f(1);
  }
}

BidirectionalForwardResult rnn_bidirectional_forward_cpu(const Tensor& input, const Tensor& lengths,
                                               const Tensor& h0, const c10::optional<Tensor>& c0,
                                               at::TensorList weights, bool has_biases,
                                               c10::string_view cell_name) {
  const std::string cell(cell_name);
  const auto w = split_directions(weights, has_biases, cell);
  std::array<Checked, 2> c;
  for (int64_t d = 0; d < 2; ++d)
    c[d] = check_forward(input, lengths, direction_of(h0, d, "h0"), direction_of(c0, d, "c0"),
                         w[d], cell);
  const Plan p = make_plan(lengths, c[0].T());
  std::array<RnnForwardResult, 2> r;
  // w_hh is (G*H, *): its rows are the columns of a step's product
  for_both_directions(directions_concurrently(p.B, w[0].w_hh.size(0)), [&](int64_t d) {
    r[d] = run_forward(c[d], p, input, h0.select(0, d), direction_of(c0, d, "c0"), w[d], d == 1);
  });
  return join_forward(r[0], r[1], cell == "lstm");
}

BidirectionalBackwardResult rnn_bidirectional_backward_cpu(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& input, const Tensor& lengths, at::TensorList weights, bool has_biases,
    at::TensorList workspaces, c10::string_view cell_name) {
  const std::string cell(cell_name);
  const bool lstm = cell == "lstm";
  const auto w = split_directions(weights, has_biases, cell);
  const auto g = split_backward_args(grad_output, grad_h_n, grad_c_n, workspaces, w, lstm);
  std::array<Checked, 2> c;
  for (int64_t d = 0; d < 2; ++d)
    c[d] = check_backward(g[d].grad_output, g[d].grad_h_n, g[d].grad_c_n, input, lengths, w[d],
                          g[d].gates, g[d].states, cell);
  const Plan p = make_plan(lengths, c[0].T());
  for (int64_t d = 0; d < 2; ++d) check_workspace_rows(c[d], g[d].gates, g[d].states);
  std::array<RnnBackwardResult, 2> r;
  for_both_directions(directions_concurrently(p.B, w[0].w_hh.size(0)), [&](int64_t d) {
    r[d] = run_backward(c[d], p, g[d].grad_output, g[d].grad_h_n, g[d].grad_c_n, input, w[d],
                        g[d].gates, g[d].states, d == 1);
  });
  return join_backward(r[0], r[1], lstm, has_biases, c[0].proj);
}

}  // namespace
}  // namespace varlen

TORCH_LIBRARY_IMPL(varlen_kernels, CPU, m) {
  m.impl("rnn_forward", &varlen::rnn_forward_cpu);
  m.impl("rnn_backward", &varlen::rnn_backward_cpu);
  m.impl("rnn_bidirectional_forward", &varlen::rnn_bidirectional_forward_cpu);
  m.impl("rnn_bidirectional_backward", &varlen::rnn_bidirectional_backward_cpu);
}
