// The persistent CUDA kernels of rnn_forward / rnn_backward and their
// bidirectional forms (rnn_persistent.cu): one cooperative launch runs all
// time steps of a layer direction, or of both directions of a layer.
//
// Each CTA owns a slice of `units` hidden units and keeps the matching slice of
// W_hh in shared memory for the whole sequence (forward: the rows of its units
// for every gate; backward: the columns of its units). The batch is ordered by
// length on the device (longest first), so the sequences still running at step
// t are a prefix of that order: each step works on that prefix only, in tiles
// of rows, and stops at the longest length. The recurrent state (h, c; in the
// backward the dh/dc carry) stays in the math type in global memory, in length
// order, and the CTAs synchronize once per step. Lengths are never read on the
// host.
//
// How they synchronize (the LSTM and GRU kernels; the projection LSTM's take
// the grid form only):
//  - grid form: the CTAs own all hidden units between them and step every
//    running row (or, with VARLEN_KERNELS_PERSISTENT_GROUPS, as row groups
//    that each own all units and step a share of the rows, as clusters do);
//    a grid.sync() a step (a cooperative launch, one CTA per SM at most);
//  - cluster form (sm_90 and later, where the weight slices fit in a thread
//    block cluster of at most 8 CTAs, or 16 where the device schedules
//    such clusters): each cluster owns all hidden units
//    and steps its own share of the rows (tiles of rows dealt to the clusters
//    in turn), synchronizing with the hardware cluster barrier only, up to
//    the longest length among its rows. Several clusters run side by side
//    (as many as there are row tiles, as can be resident), so each CTA reads
//    only its cluster's rows of h each step, where in the grid form every
//    CTA reads all of them (its group's, with row groups).
//
// The workspaces and results are the per-step path's, element for element in
// layout: gates (T*B, GS*H) and states (T*B, S*H) in the packed token layout of
// token_plan.h (the CPU kernels' layout), rows past the valid tokens zero;
// either path's backward consumes either path's forward.
//
// The recurrent product: float64 with fma on CUDA cores; float32 likewise in
// IEEE precision, or on tensor cores in TF32 where torch allows TF32 for CUDA
// matmuls (as the per-step path's at::mm does); half and bfloat16 on tensor
// cores (mma.sync, float accumulation), with W_hh and the product's row operand
// (h, or the backward's dgh) in the storage type (TF32-rounded for float32),
// as in the per-step path's GEMMs. The product itself, the
// state and the backward's carry stay float (the per-step path rounds its
// GEMMs' outputs to the storage type), so the paths differ in half/bfloat16
// by that rounding; both are held to the same error bound by the tests.
//
// Both directions of a bidirectional layer run in one launch when they fit
// together (each direction its own group of CTAs, one grid barrier per step
// for both), else one launch each.
//
// Which path runs: VARLEN_KERNELS_RNN_PATH = "auto" (default: persistent when
// its shared memory and grid fit the device, per-step otherwise), "persistent"
// (an error when it does not fit) or "per_step". VARLEN_KERNELS_PERSISTENT_SYNC
// = "auto" (default: the cluster form where it fits, else the grid form),
// "grid" or "cluster" (an error when it does not fit) chooses the form.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../cell_math.h"
#include "../rnn_bidirectional.h"
#include "settings.h"
#include "token_plan.h"

namespace varlen {

enum class RnnPath { Auto, Persistent, PerStep };
RnnPath rnn_path_setting();  // reads VARLEN_KERNELS_RNN_PATH, checks its value
// VARLEN_KERNELS_PERSISTENT_UNITS=n (benchmarks, tests): at least n hidden
// units per CTA of the persistent kernels, so fewer CTAs than they take by
// default (one per SM, with the fewest units that fit); 0 when unset or "auto".
int64_t persistent_units_setting();  // checks the value
enum class PersistentSync { Auto, Grid, Cluster };
PersistentSync persistent_sync_setting();  // reads VARLEN_KERNELS_PERSISTENT_SYNC, checks it
// VARLEN_KERNELS_PERSISTENT_STAGE_KIB=n (benchmarks, tests): the most shared
// memory, n KiB, that the staged operand rows may take (the tensor-core
// kernels' slots together; a tile's whole reduction where that fits, else
// chunks; 0: always chunks of at most 64 columns); in bytes, the default
// kWholeStageBytes when unset or "auto".
int64_t persistent_stage_setting();  // checks the value
// VARLEN_KERNELS_PERSISTENT_EXCHANGE = "auto" (default: the cluster form of the
// tensor-core kernels passes h, or the backward's dgh, between its CTAs
// through distributed shared memory where the buffers fit, else through global
// memory), "global" (always global memory) or "dsmem" (an error where the
// persistent launch taken cannot: another form or kernel, or no room).
// Through distributed shared memory, the CTAs' stores complete on an mbarrier
// of the CTA they store into, which waits for them, where every CTA's
// columns are whole 16-byte pieces (hidden sizes and units a CTA of a
// multiple of 8 half/bfloat16 or 4 float values); else, or with
// "dsmem_barrier" (as "dsmem", otherwise), a cluster barrier ends each step.
enum class PersistentExchange { Auto, Global, Dsmem, DsmemBarrier };
PersistentExchange persistent_exchange_setting();  // checks the value
// VARLEN_KERNELS_PERSISTENT_SLOTS=n (benchmarks, tests): at most n slots (1 to
// 4) of the tensor-core kernels' staging pipeline (1: each chunk staged
// between two barriers, no load overlapping a product); 1 when unset or
// "auto" (kDefaultSlots: on an H200, one slot was as fast as four at every
// shape measured and 1.3x to 1.75x faster where the operand is staged).
int64_t persistent_slots_setting();  // checks the value
// VARLEN_KERNELS_PERSISTENT_MAX_MMAC=n: on the auto path, the persistent
// kernels take a layer whose step's recurrent product (B rows by G*H columns
// by H, times the directions of the launch) has at most n million
// multiply-adds (0 to 9999), the per-step path one past it; unset or "auto":
// -1, for the measured bounds (kMostStepMacs...).
int64_t persistent_max_mmac_setting();  // checks the value
// VARLEN_KERNELS_PERSISTENT_COPY: how the tensor-core kernels stage their
// operand rows. "bulk": a bulk copy a row (cp.async.bulk, completing on an
// mbarrier) where it can run (sm_90, half and bfloat16, one slot, rows
// 16-byte aligned, chunks of whole 16 bytes; else as "async"); "async":
// 16-byte asynchronous copies (cp.async); unset or "auto": "bulk". On an
// H200 (bfloat16 LSTM, T = 512) bulk copies were 1.05x and 1.06x faster at
// B = 64, H = 1024 (two runs), 1.02x at B = 8, H = 1024, the same elsewhere.
enum class PersistentCopy { Auto, Async, Bulk };
PersistentCopy persistent_copy_setting();  // checks the value
// VARLEN_KERNELS_PERSISTENT_GROUPS=n: the grid form's CTAs of a direction as
// up to n row groups (1 to 16) instead of one: each group's CTAs own all
// hidden units between them (n times the units a CTA) and step the 16-row
// tiles of the length order dealt to them in turn, so a CTA stages about 1/n
// of the running rows a step; fewer groups where the weight slices of n
// groups' CTAs do not fit on the kernel one group takes (tensor cores or CUDA
// cores) or the batch has fewer tiles (the tensor-core kernels' 16 rows, the
// CUDA-core kernels' tile). Unset or "auto" (0): on the tensor-core kernels,
// 2 for the backward and 1 for the forward from kAutoGroupRows rows of the
// batch, else 1. On an H200 (bfloat16 LSTM, H = 1024, B = 64, T = 512) 2 groups
// took the backward kernel from 9.77 to 7.88 ms and the forward from 4.94 to
// 5.31 (two runs), and the fwd+bwd from 16.5 to 15.0 ms: the backward stages
// B x 4H values a CTA a step, the forward B x H.
// The projection LSTM's kernels take one group.
constexpr int64_t kAutoGroupRows = 32;
int64_t persistent_groups_setting();  // checks the value

// The settings above, each read and checked once for a choice of launch.
struct PersistentSettings {
  RnnPath path;
  PersistentSync sync;
  PersistentExchange exchange;
  int64_t min_units;    // persistent_units_setting()
  int64_t stage_limit;  // persistent_stage_setting(), bytes
  int slots;            // persistent_slots_setting()
  int64_t max_mmac;     // persistent_max_mmac_setting(), -1: the measured bounds
  PersistentCopy copy;  // persistent_copy_setting()
  int64_t groups;       // persistent_groups_setting(): the grid form's most row groups
};
PersistentSettings persistent_settings();

// One direction's operands of the persistent forward. gx: (T*B, G*H) input
// projection in the storage type, packed (token_plan.h), rows of any stride
// (a bidirectional layer's directions are column blocks of one); h0, c0: (B, H) (c0
// for LSTM only); bias / b_hn: gate_biases() (undefined when there are none).
struct PersistentForward {
  at::Tensor gx, h0, c0, w_hh, bias, b_hn;
  bool reverse;
};

// Forward of one direction, or of both directions of a layer in one launch
// (a group of CTAs each), or nullopt when the persistent path is not taken
// (setting; it does not fit; two directions that do not fit one launch).
// Returns, per direction, (output, h_n, c_n, gates, states) as rnn_forward
// does.
std::optional<std::vector<RnnForwardResult>> rnn_forward_persistent(
    Cell cell, const std::vector<PersistentForward>& dirs, const TokenPlan& plan);

// One direction's operands of the persistent backward. dy: (T, B, H),
// storage type; grad_h_n / grad_c_n: (B, H) (grad_c_n unused unless LSTM);
// dgx: where the input side's pre-activation gradients go, a zero (T*B, G*H)
// block with rows of any stride (a column block of both directions' one), or
// undefined for a fresh one.
struct PersistentBackward {
  at::Tensor dy, grad_h_n, grad_c_n, w_hh, gates, states;
  bool reverse;
  at::Tensor dgx = {};
};

// (dgx, dgh, grad_h0, grad_c0): the pre-activation gradients (T*B, G*H),
// input and hidden side (the same tensor unless GRU), packed, rows past the
// valid tokens zero,
// and the gradients of h0 and c0 in the math type.
using PersistentBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Backward recurrence of one or two directions, or nullopt, as above.
std::optional<std::vector<PersistentBackwardResult>> rnn_backward_persistent(
    Cell cell, const std::vector<PersistentBackward>& dirs, const TokenPlan& plan);

// The LSTM with a projection (rnn_persistent_proj.cu): one or both directions
// a launch, as above, with two grid barriers a step. gx: (T*B, 4H) input
// projection, packed, rows of any stride; h0: (B, P); c0: (B, H); w_hh:
// (4H, P); w_hr: (P, H); bias: gate_biases() or undefined.
struct ProjPersistentForward {
  at::Tensor gx, h0, c0, w_hh, w_hr, bias;
  bool reverse;
};

// Per direction (output, h_n, c_n, gates, states) as the per-step path gives
// them, or nullopt when the persistent path is not taken (setting; it does not
// fit; two directions that do not fit one launch).
std::optional<std::vector<RnnForwardResult>> rnn_forward_proj_persistent(
    const std::vector<ProjPersistentForward>& dirs, const TokenPlan& plan);

// dy: (T, B, P), storage type; grad_h_n: (B, P); grad_c_n: (B, H); gates,
// states: the forward's workspaces; dgx: a zero (T*B, 4H) block with rows of
// any stride for the pre-activation gradients, or undefined for a fresh one.
struct ProjPersistentBackward {
  at::Tensor dy, grad_h_n, grad_c_n, w_hh, w_hr, gates, states;
  bool reverse;
  at::Tensor dgx = {};
};

// (dgx, dh_tok, grad_h0, grad_c0): the pre-activation gradients (T*B, 4H) and
// the gradient reaching each token's h (T*B, P), packed, rows past the valid
// tokens zero; the gradients of h0 and c0 in the math type.
using ProjPersistentBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Per direction, or nullopt, as above.
std::optional<std::vector<ProjPersistentBackwardResult>> rnn_backward_proj_persistent(
    const std::vector<ProjPersistentBackward>& dirs, const TokenPlan& plan);

}  // namespace varlen
