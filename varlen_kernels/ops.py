"""Python side of the custom ops: thin wrappers, fake kernels and autograd.

Schemas live in csrc/op_schemas.h; kernels in csrc/cpu and csrc/cuda.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _double_backward


CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
# Gate blocks (of H columns) in the weights, per cell.
NUM_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# Widths (in blocks of H) of the rnn_forward workspaces, per cell.
_SAVED_GATES = {"lstm": 4, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}
_STATES = {"lstm": 2, "gru": 1, "rnn_tanh": 1, "rnn_relu": 1}


def rnn_layer(
    input: Tensor,
    lengths: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    cell: str,
    reverse: bool,
    w_hr: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One direction of one masked recurrent layer (differentiable).

    input: (T, B, I); lengths: (B,) int64, each in [0, T], on input's device or
    on the CPU (for a CUDA input the length plan is then made on the host and
    the GEMMs over tokens cover exactly the valid ones; not capturable in a
    CUDA graph);
    h0, c0: (B, H) (c0 only for "lstm"); w_ih: (G*H, I); w_hh: (G*H, H);
    b_ih, b_hh: (G*H,) or None. reverse runs each sequence from its own last
    valid step back to step 0.

    Returns output (T, B, H), zero past each length; h_n (B, H) and c_n (B, H)
    (None unless "lstm"): each sequence's state after its last valid step.

    w_hr: (P, H) LSTM projection (nn.LSTM's proj_size): then h0, h_n
    and output have P features and w_hh is (4H, P).
    """
    device = input.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = (
            None if t is None else t.to(dtype)
            for t in (input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    if w_hr is None:  # the schema's default: no projection
        out, h_n, c_n, _, _ = torch.ops.varlen_kernels.rnn_forward.default(
            input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, reverse)
    else:
        out, h_n, c_n, _, _ = torch.ops.varlen_kernels.rnn_forward.default(
            input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, reverse, w_hr)
    return out, h_n, (c_n if cell == "lstm" else None)


def rnn_bidirectional_layer(
    input: Tensor,
    lengths: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    weights: List[Tensor],
    has_biases: bool,
    cell: str,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Both directions of one masked bidirectional layer (differentiable): what
    :func:`rnn_layer` returns for each, with the outputs side by side, in one op
    (the directions run concurrently where the backend can).

    input: (T, B, I); lengths as for :func:`rnn_layer`; h0: (2, B, H), c0:
    (2, B, H) (only for "lstm"); weights: the forward direction's w_ih, w_hh,
    then b_ih, b_hh if has_biases, then w_hr for an LSTM with a projection;
    then the same for the reverse direction (nn.*'s parameter order).

    Returns output (T, B, 2H), zero past each length; h_n (2, B, H) and c_n
    (2, B, H) (None unless "lstm"). With w_hr (P, H), h0, h_n and each half
    of the output have P features.
    """
    device = input.device.type
    weights = list(weights)
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        input, h0, c0 = (None if t is None else t.to(dtype) for t in (input, h0, c0))
        weights = [w.to(dtype) for w in weights]
    out, h_n, c_n, *_ = torch.ops.varlen_kernels.rnn_bidirectional_forward.default(
        input, lengths, h0, c0, weights, has_biases, cell)
    return out, h_n, (c_n if cell == "lstm" else None)


def _workspace_rows(input: Tensor) -> Tuple:
    """Leading dims of a direction's rnn_forward workspaces: (T*B,) on every
    backend (csrc/rnn_args.h, check_workspace_shapes)."""
    T, B, _ = input.shape
    return (T * B,)


@torch.library.register_fake("varlen_kernels::rnn_forward")
def _rnn_forward_fake(input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, reverse, w_hr=None):
    torch._check(cell in CELLS, lambda: f"cell must be one of {CELLS}, got {cell!r}")
    T, B, _ = input.shape
    H = w_hh.shape[1]
    rows = _workspace_rows(input)
    if w_hr is not None:  # LSTM with a projection: h has P = w_hr.shape[0] features
        P, Hc = w_hr.shape
        return (input.new_empty(T, B, P), input.new_empty(B, P), input.new_empty(B, Hc),
                input.new_empty(*rows, 4 * Hc), input.new_empty(*rows, 2 * Hc + P))
    return (
        input.new_empty(T, B, H),
        input.new_empty(B, H),
        input.new_empty(B, H) if cell == "lstm" else input.new_empty(0),
        input.new_empty(*rows, _SAVED_GATES[cell] * H),
        input.new_empty(*rows, _STATES[cell] * H),
    )


@torch.library.register_fake("varlen_kernels::rnn_backward")
def _rnn_backward_fake(grad_output, grad_h_n, grad_c_n, input, lengths, w_ih, w_hh, gates,
                       states, cell, reverse, w_hr=None):
    G, H = w_hh.shape
    if w_hr is not None:
        return (input.new_empty(input.shape), input.new_empty(grad_h_n.shape),
                input.new_empty(grad_c_n.shape), w_ih.new_empty(w_ih.shape),
                w_hh.new_empty(w_hh.shape), input.new_empty(G), input.new_empty(G),
                w_hr.new_empty(w_hr.shape))
    return (
        input.new_empty(input.shape),  # the kernels return contiguous gradients
        input.new_empty(input.shape[1], H),
        input.new_empty(input.shape[1], H) if cell == "lstm" else input.new_empty(0),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        input.new_empty(G),
        input.new_empty(G),
        input.new_empty(0),
    )


def _rnn_setup_context(ctx, inputs, output):
    input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, reverse = inputs[:10]
    w_hr = inputs[10] if len(inputs) > 10 else None
    _, _, _, gates, states = output
    ctx.save_for_backward(input, lengths, w_ih, w_hh, gates, states, w_hr, h0, c0, b_ih, b_hh)
    ctx.cell, ctx.reverse, ctx.has_bias = cell, reverse, b_ih is not None
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(gates, states)
    ctx.set_materialize_grads(False)  # no zero gradients for the workspaces (T*B rows)


def _rnn_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_states):
    input, lengths, w_ih, w_hh, gates, states, w_hr, h0, c0, b_ih, b_hh = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: gradients to differentiate again
        return _double_backward.rnn_layer_grads(
            ctx.needs_input_grad, input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ctx.cell,
            ctx.reverse, grad_output, grad_h_n, grad_c_n)
    T, B, _ = input.shape
    H = w_hh.shape[1] if w_hr is None else w_hr.shape[1]  # cell features
    P = w_hh.shape[1]                                     # state (output) features
    lstm = ctx.cell == "lstm"
    if grad_output is None:
        grad_output = input.new_zeros(T, B, P)
    if grad_h_n is None:
        grad_h_n = input.new_zeros(B, P)
    if grad_c_n is None or not lstm:
        grad_c_n = input.new_zeros(B, H) if lstm else input.new_zeros(0)
    extra = () if w_hr is None else (w_hr,)
    gi, gh0, gc0, gwih, gwhh, gbih, gbhh, gwhr = torch.ops.varlen_kernels.rnn_backward.default(
        grad_output, grad_h_n, grad_c_n, input, lengths, w_ih, w_hh, gates, states, ctx.cell,
        ctx.reverse, *extra,
    )
    bias = (gbih, gbhh) if ctx.has_bias else (None, None)
    grads = (gi, None, gh0, gc0 if lstm else None, gwih, gwhh, *bias, None, None)
    return grads + ((gwhr if w_hr is not None else None),) * (ctx.n_inputs - 10)


torch.library.register_autograd(
    "varlen_kernels::rnn_forward", _rnn_backward, setup_context=_rnn_setup_context
)


def _bidirectional_sizes(weights, has_biases):
    """(H, P, proj) of rnn_bidirectional_forward's weights: cell features, state
    features, whether each direction ends with a projection w_hr."""
    per = len(weights) // 2
    proj = per == (4 if has_biases else 2) + 1
    if proj:
        P, H = weights[per - 1].shape
        return H, P, True
    H = weights[1].shape[1]
    return H, H, False


@torch.library.register_fake("varlen_kernels::rnn_bidirectional_forward")
def _rnn_bidirectional_forward_fake(input, lengths, h0, c0, weights, has_biases, cell):
    torch._check(cell in CELLS, lambda: f"cell must be one of {CELLS}, got {cell!r}")
    T, B, _ = input.shape
    H, P, proj = _bidirectional_sizes(weights, has_biases)
    rows = _workspace_rows(input)
    gates = 4 * H if proj else _SAVED_GATES[cell] * H
    states = 2 * H + P if proj else _STATES[cell] * H
    return (input.new_empty(T, B, 2 * P), input.new_empty(2, B, P),
            input.new_empty(2, B, H) if cell == "lstm" else input.new_empty(0),
            *(input.new_empty(*rows, width) for _ in range(2) for width in (gates, states)))


@torch.library.register_fake("varlen_kernels::rnn_bidirectional_backward")
def _rnn_bidirectional_backward_fake(grad_output, grad_h_n, grad_c_n, input, lengths, weights,
                                     has_biases, workspaces, cell):
    return (input.new_empty(input.shape), input.new_empty(grad_h_n.shape),
            input.new_empty(grad_c_n.shape), [w.new_empty(w.shape) for w in weights])


def _rnn_bidirectional_setup_context(ctx, inputs, output):
    input, lengths, h0, c0, weights, has_biases, cell = inputs
    workspaces = output[3:]
    ctx.save_for_backward(input, lengths, h0, c0, *workspaces, *weights)
    ctx.cell, ctx.has_biases = cell, has_biases
    ctx.mark_non_differentiable(*workspaces)
    ctx.set_materialize_grads(False)  # no zero gradients for the workspaces


def _rnn_bidirectional_backward(ctx, grad_output, grad_h_n, grad_c_n, *_grad_workspaces):
    input, lengths, h0, c0, *saved = ctx.saved_tensors
    workspaces, weights = saved[:4], saved[4:]
    T, B, _ = input.shape
    H, P, proj = _bidirectional_sizes(weights, ctx.has_biases)
    lstm = ctx.cell == "lstm"
    if torch.is_grad_enabled():  # create_graph=True: gradients to differentiate again
        gi, gh0, gc0, gw = _double_backward.rnn_bidirectional_grads(
            input, lengths, h0, c0, weights, ctx.has_biases, proj, ctx.cell, grad_output,
            grad_h_n, grad_c_n)
        return gi, None, gh0, gc0, gw, None, None
    if grad_output is None:
        grad_output = input.new_zeros(T, B, 2 * P)
    if grad_h_n is None:
        grad_h_n = input.new_zeros(2, B, P)
    if grad_c_n is None or not lstm:
        grad_c_n = input.new_zeros(2, B, H) if lstm else input.new_zeros(0)
    gi, gh0, gc0, gw = torch.ops.varlen_kernels.rnn_bidirectional_backward.default(
        grad_output, grad_h_n, grad_c_n, input, lengths, weights, ctx.has_biases, list(workspaces),
        ctx.cell)
    return gi, None, gh0, (gc0 if lstm else None), list(gw), None, None


torch.library.register_autograd(
    "varlen_kernels::rnn_bidirectional_forward", _rnn_bidirectional_backward,
    setup_context=_rnn_bidirectional_setup_context
)


# ------------------------------------------------------------ cross entropy
@torch.library.register_fake("varlen_kernels::cross_entropy_forward")
def _ce_forward_fake(logits, target, mask, label_smoothing, weight=None):
    acc = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    R = logits.shape[0]
    return logits.new_empty(R, dtype=acc), logits.new_empty(R, dtype=acc)


@torch.library.register_fake("varlen_kernels::cross_entropy_backward")
def _ce_backward_fake(grad_loss, logits, target, mask, lse, label_smoothing, weight=None):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, target, mask, label_smoothing = inputs[:4]
    weight = inputs[4] if len(inputs) > 4 else None
    ctx.save_for_backward(logits, target, mask, output[1], weight)
    ctx.label_smoothing = label_smoothing
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _ce_backward(ctx, grad_loss, _grad_lse):
    logits, target, mask, lse, weight = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None
    grad = torch.ops.varlen_kernels.cross_entropy_backward.default(
        grad_loss, logits, target, mask, lse, ctx.label_smoothing, weight)
    return grad, None, None, None, None


torch.library.register_autograd(
    "varlen_kernels::cross_entropy_forward", _ce_backward, setup_context=_ce_setup_context
)


@torch.library.register_fake("varlen_kernels::masked_cross_entropy_forward")
def _mce_forward_fake(logits, target, mask, lengths, batch_first, ignore_index, label_smoothing,
                      weight, reduction):
    acc = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    R = logits.shape[0]
    return (logits.new_empty(R, dtype=acc), logits.new_empty(R, dtype=acc),
            logits.new_empty(R, dtype=torch.bool), logits.new_empty((), dtype=acc),
            logits.new_empty((), dtype=acc))


# masked_cross_entropy_forward's autograd is in C++ (csrc/ops.cpp): at small class
# counts a call's time is host time, and this Python layer was about half of it.


# -------------------------------------------------------- elementwise losses
@torch.library.register_fake("varlen_kernels::elementwise_loss_forward")
def _elem_forward_fake(input, target, mask, pos_weight, kind, reduce_rows):
    acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    shape = input.shape[:1] if reduce_rows else input.shape
    return input.new_empty(shape, dtype=acc)


@torch.library.register_fake("varlen_kernels::elementwise_loss_backward")
def _elem_backward_fake(grad, input, target, mask, pos_weight, kind, reduce_rows):
    return input.new_empty(input.shape), input.new_empty(input.shape)


def _elem_setup_context(ctx, inputs, output):
    input, target, mask, pos_weight, kind, reduce_rows = inputs
    ctx.save_for_backward(input, target, mask, pos_weight)
    ctx.kind, ctx.reduce_rows = kind, reduce_rows


def _elem_backward(ctx, grad):
    input, target, mask, pos_weight = ctx.saved_tensors
    gi, gt = torch.ops.varlen_kernels.elementwise_loss_backward.default(
        grad, input, target, mask, pos_weight, ctx.kind, ctx.reduce_rows)
    return gi, gt, None, None, None, None


torch.library.register_autograd(
    "varlen_kernels::elementwise_loss_forward", _elem_backward, setup_context=_elem_setup_context
)


@torch.library.register_fake("varlen_kernels::masked_elementwise_loss_forward")
def _melem_forward_fake(input, target, mask, lengths, batch_first, pos_weight, kind, reduction):
    acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    shape = input.shape if reduction == "none" else input.shape[:1]
    return (input.new_empty(shape, dtype=acc), input.new_empty(input.shape[:1], dtype=torch.bool),
            input.new_empty((), dtype=acc), input.new_empty((), dtype=acc))


# masked_elementwise_loss_forward's autograd is in C++ too (csrc/ops.cpp).


# ------------------------------------------------- fused linear cross entropy
def _acc(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("varlen_kernels::linear_cross_entropy_forward")
def _lce_forward_fake(hidden, weight, bias, target, mask, label_smoothing, reduction, compute_grad,
                      chunk):
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc(hidden.dtype)
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=acc)
    if not compute_grad:
        return (loss, hidden.new_empty(N, dtype=acc), hidden.new_empty(0), hidden.new_empty(0),
                hidden.new_empty(0))
    return (loss, hidden.new_empty(N, dtype=acc), hidden.new_empty(N, H), weight.new_empty(V, H),
            weight.new_empty(V) if bias is not None else hidden.new_empty(0))


@torch.library.register_fake("varlen_kernels::linear_cross_entropy_backward")
def _lce_backward_fake(grad_loss, hidden, weight, bias, target, mask, lse, label_smoothing, chunk):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty(weight.shape[0]) if bias is not None else hidden.new_empty(0))


def _lce_setup_context(ctx, inputs, output):
    hidden, weight, bias, target, mask, label_smoothing, reduction, compute_grad, chunk = inputs
    _, lse, gh, gw, gb = output
    ctx.save_for_backward(hidden, weight, bias, target, mask, lse, gh, gw, gb)
    ctx.label_smoothing, ctx.reduction, ctx.compute_grad, ctx.chunk = (
        label_smoothing, reduction, compute_grad, chunk)
    ctx.mark_non_differentiable(lse, gh, gw, gb)
    ctx.set_materialize_grads(False)  # no zero (V, H) gradient for gw


def _lce_backward(ctx, grad_loss, _lse, _gh, _gw, _gb):
    hidden, weight, bias, target, mask, lse, gh, gw, gb = ctx.saved_tensors
    none = (None,) * 6
    if grad_loss is None:
        return (None, None, None) + none
    if torch.is_grad_enabled():  # create_graph=True: gradients to differentiate again
        return tuple(_double_backward.linear_cross_entropy_grads(
            ctx.needs_input_grad, hidden, weight, bias, target, mask, ctx.label_smoothing,
            ctx.reduction, grad_loss)) + none
    if ctx.compute_grad:  # gradients of the reduced loss, computed with the forward
        g = grad_loss.to(gh.dtype)
        return (g * gh, g.to(gw.dtype) * gw, g.to(gb.dtype) * gb if bias is not None else None) + none
    if ctx.reduction == "none":
        per_token = grad_loss
    else:
        per_token = grad_loss.expand(hidden.shape[0])
        if ctx.reduction == "mean":
            per_token = per_token / mask.sum().clamp_min(1)
    gh, gw, gb = torch.ops.varlen_kernels.linear_cross_entropy_backward.default(
        per_token.to(lse.dtype).contiguous(), hidden, weight, bias, target, mask, lse,
        ctx.label_smoothing, ctx.chunk)
    return (gh, gw, gb if bias is not None else None) + none


torch.library.register_autograd(
    "varlen_kernels::linear_cross_entropy_forward", _lce_backward, setup_context=_lce_setup_context
)


# ----------------------------------------------------------- double backward
# The backward ops of the recurrent layers and of the fused linear cross
# entropy are not differentiable themselves: their forward ops' backward
# takes the gradients of _double_backward when grad mode is on
# (create_graph=True). The losses' backward ops have derivatives of their own.
# Say so where someone differentiates through one of the others when calling
# it directly, rather than returning silently incomplete second-order
# gradients.
def _refuse_double_backward(name):
    def backward(ctx, *grads):
        raise NotImplementedError(
            f"double backward (gradients of gradients) through varlen_kernels::{name} is not "
            "supported: differentiate the forward op (its backward with create_graph=True)")
    return backward


for _name in ("rnn_backward", "rnn_bidirectional_backward", "linear_cross_entropy_backward"):
    torch.library.register_autograd(f"varlen_kernels::{_name}", _refuse_double_backward(_name))
_double_backward.register_loss_double_backward()


# ------------------------------------------------------------------ autocast
# Under torch.autocast the recurrence runs in the autocast dtype (its GEMMs are
# where the time goes; gate math and recurrent state stay in float inside the
# CUDA kernels), see rnn_layer; the cross entropy runs in float32, as PyTorch's
# autocast policy does for its own losses. Integer tensors are left alone.
for _device in ("cuda", "cpu"):
    for _op in ("cross_entropy_forward", "masked_cross_entropy_forward", "elementwise_loss_forward",
                "masked_elementwise_loss_forward"):
        torch.library.register_autocast(f"varlen_kernels::{_op}", _device, torch.float32)
