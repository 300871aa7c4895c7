// The length plan of a CUDA recurrence and the packed token layout it defines,
// the CPU kernels' layout too (csrc/cpu/masked_rnn_cpu.cpp): the batch ordered
// by length, longest first (stable in the batch index), so the sequences still
// running at step t are the prefix [0, bs[t]) of that order; token (t, i) of
// the i-th longest sequence is row off[t] + i of a (T*B, C) matrix, and the
// N = off[T] valid tokens are its first N rows. Everything stays on the
// device: the plan is a few small ATen ops, never read on the host.
//
// The GEMMs over tokens (the input projection and the weight and input
// gradients; the fused linear cross entropy's too) take their row count from
// the device where they can: bfloat16 on sm_90 / sm_100, through
// at::_grouped_mm with one group whose end is the count (a CUTLASS kernel that
// sizes its tiles from device memory, no host sync), so only the valid rows
// are computed. Elsewhere at::mm runs over all rows; rows past the count are
// then zero in every operand, so they add nothing. Setting:
// VARLEN_KERNELS_TOKEN_GEMM = "auto" (default), "all_rows" (at::mm always) or
// "valid_rows". The fused linear cross entropy takes its valid rows alone only
// with "valid_rows": on an H200 (16k tokens, half of them valid, H = 1024,
// V = 128k, bfloat16, fwd+bwd) that took 95.9 ms, all rows 63.1 ms.
//
// Lengths may also live in host memory (a CPU tensor next to a GPU input, as
// pack_padded_sequence wants them): then the plan is made on the host, checked
// there, and copied to the device in one asynchronous copy; N is then known on
// the host, so the GEMMs over tokens run as at::mm over exactly the N valid
// rows, in every dtype, and the per-step loops stop at the longest length.
// Such lengths cannot be captured in a CUDA graph (the graph would replay the
// lengths of its capture): that is refused.
#pragma once

#include <ATen/ATen.h>

namespace varlen {

struct TokenPlan {
  at::Tensor lengths;     // (B,) int64, contiguous
  at::Tensor sorted_len;  // (B,) int64: lengths, longest first
  at::Tensor perm;        // (B,) int64: batch index of the i-th longest sequence
  at::Tensor rank;        // (B,) int64: position of sequence b in that order
  at::Tensor off;         // (T+1,) int64: off[t] = tokens of the steps before t; off[T] = N
  at::Tensor count;       // (1,) int32: N, as _grouped_mm's group offsets
  int64_t T = 0, B = 0;
  int64_t host_count = -1;  // N where the lengths were in host memory, else -1
  int64_t host_steps = -1;  // the longest length, likewise

  // The steps a per-step loop visits: [0, steps()), the others have no running
  // sequence (their outputs are zero): the longest length where it is known on
  // the host, else T.
  int64_t steps() const { return host_steps >= 0 ? host_steps : T; }
};

// lengths: (B,) int64, values in [0, T], on `device` (the kernels assert the
// values; out-of-range ones never make these ops read or write out of bounds)
// or in host memory (checked on the host, a clear error). The plan's tensors
// are on `device`.
TokenPlan make_token_plan(const at::Tensor& lengths, int64_t T, const at::Device& device);

// x (T, B, C) -> (T*B, C) in the packed layout; rows past N are zero.
at::Tensor pack_tokens(const at::Tensor& x, const TokenPlan& p);

// packed (T*B, C) -> (T, B, C): the valid tokens, exact zeros at padded steps.
at::Tensor unpack_tokens(const at::Tensor& packed, const TokenPlan& p);

// count: (1,) int32 on the device, the number of leading rows that count
// (TokenPlan::count for the packed tokens).
// a (R, K) times w (K, M): (R, M), rows past the count unspecified.
at::Tensor tokens_times(const at::Tensor& a, const at::Tensor& w, const at::Tensor& count);

// d (R, M) and x (R, K), rows past the count zero in both: d^T x over the
// rows before the count, (M, K).
at::Tensor tokens_outer(const at::Tensor& d, const at::Tensor& x, const at::Tensor& count);

// The same over the plan's tokens: at::mm over exactly the N valid rows where
// N is known on the host (TokenPlan::host_count), else as above with the
// plan's count.
at::Tensor tokens_times(const at::Tensor& a, const at::Tensor& w, const TokenPlan& p);
at::Tensor tokens_outer(const at::Tensor& d, const at::Tensor& x, const TokenPlan& p);

// Whether tokens_times / tokens_outer of these operands take only the valid
// tokens (one grouped GEMM) rather than all rows.
bool token_gemm_valid_only(std::initializer_list<const at::Tensor*> operands);
// The same where VARLEN_KERNELS_TOKEN_GEMM=valid_rows asks for it (the fused
// linear cross entropy's choice, above).
bool token_gemm_valid_rows_asked(std::initializer_list<const at::Tensor*> operands);

}  // namespace varlen
