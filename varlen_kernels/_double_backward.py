"""Gradients that can be differentiated again (``create_graph=True``).

The kernels' backward ops are not differentiable themselves. A backward that
runs with grad mode on (``torch.autograd.grad(..., create_graph=True)``,
``.backward(create_graph=True)``) takes these instead (ops.py):

- the recurrent layers: the gradients of the readable reference
  (reference.py: a loop over time in PyTorch ops, with the same masking),
  recomputed from the layer's inputs as a graph; so the first-order gradients
  have the kernels' values (to rounding) and every higher order follows, at the
  speed of a loop of PyTorch ops;
- the losses' backward ops (cross entropy, mse, bce with logits): their own
  derivatives in PyTorch ops, so the first-order gradients still come from the
  kernels;
- the fused linear cross entropy: the gradients of the unfused formula, which
  holds the logits of every token at once.

Half and bfloat16 are computed in float32, as the kernels compute them.
"""
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import rnn_layer_reference


def _math(t: Optional[Tensor]) -> Optional[Tensor]:
    """t in its math type: float32 for half and bfloat16 (a differentiable cast)."""
    return t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def grads_through(tensors: Sequence[Optional[Tensor]], needs: Sequence[bool],
                  run: Callable[[List[Optional[Tensor]]], Sequence[Optional[Tensor]]],
                  grads: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """The gradients w.r.t. `tensors` (those whose `needs` is true, else None) of
    run(tensors in their math type)'s outputs, given the outputs' incoming
    `grads` (None: zero), as a graph that can be differentiated again.

    The gradients are taken w.r.t. aliases of the tensors (views made here),
    not the tensors themselves: those may depend on each other (an output
    layer tied to the embedding whose rows are the hidden states), be the same
    tensor twice (tied directions, h0 passed as c0) or carry hooks; autograd
    then follows each path out of the op once, from the gradients returned
    here, as for the kernels' gradients. The reference runs outside autocast,
    in the math type, as the kernels compute."""
    result: List[Optional[Tensor]] = [None] * len(tensors)
    wanted = [i for i, t in enumerate(tensors) if t is not None and needs[i]]
    if not wanted:
        return result
    device = next(t for t in tensors if t is not None).device.type
    with torch.enable_grad(), torch.autocast(device, enabled=False):
        alias = [None if t is None else t.view_as(t) for t in tensors]
        outs = run([_math(t) for t in alias])
    pairs = [(o, g) for o, g in zip(outs, grads)
             if o is not None and g is not None and o.requires_grad]
    got = (torch.autograd.grad([o for o, _ in pairs], [alias[i] for i in wanted],
                               [g.to(o.dtype) for o, g in pairs], create_graph=True,
                               allow_unused=True)
           if pairs else [None] * len(wanted))
    for i, g in zip(wanted, got):
        result[i] = torch.zeros_like(tensors[i]) if g is None else g
    return result


# ------------------------------------------------------------- recurrent layers
def rnn_layer_grads(needs, input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, cell, reverse,
                    grad_output, grad_h_n, grad_c_n):
    """rnn_forward's gradients through the reference, for the op's inputs
    (input, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh[, w_hr]); needs: their
    needs_input_grad."""
    tensors = [input, h0, c0 if cell == "lstm" else None, w_ih, w_hh, b_ih, b_hh, w_hr]
    need = [needs[0], needs[2], needs[3], needs[4], needs[5], needs[6], needs[7],
            len(needs) > 10 and needs[10]]

    def run(t):
        return rnn_layer_reference(t[0], lengths, t[1], t[2], t[3], t[4], t[5], t[6], cell,
                                   reverse, t[7])

    gi, gh0, gc0, gwih, gwhh, gbih, gbhh, gwhr = grads_through(
        tensors, need, run, (grad_output, grad_h_n, grad_c_n))
    grads = (gi, None, gh0, gc0, gwih, gwhh, gbih, gbhh, None, None)
    return grads + (gwhr,) * (len(needs) - 10)


def rnn_bidirectional_grads(input, lengths, h0, c0, weights, has_biases, proj, cell,
                            grad_output, grad_h_n, grad_c_n):
    """rnn_bidirectional_forward's gradients through the reference: (input,
    h0, c0, [each weight]), each None where it needs none."""
    lstm = cell == "lstm"
    per = len(weights) // 2
    tensors = [input, h0, c0 if lstm else None, *weights]

    def run(t):
        x, h, c, ws = t[0], t[1], t[2], t[3:]
        outs = []
        for d in range(2):
            w = ws[d * per:(d + 1) * per]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            outs.append(rnn_layer_reference(x, lengths, h[d], c[d] if lstm else None, w[0], w[1],
                                            b_ih, b_hh, cell, d == 1, w[-1] if proj else None))
        return (torch.cat([outs[0][0], outs[1][0]], -1), torch.stack([outs[0][1], outs[1][1]]),
                torch.stack([outs[0][2], outs[1][2]]) if lstm else None)

    grads = grads_through(tensors, [t is not None and t.requires_grad for t in tensors], run,
                          (grad_output, grad_h_n, grad_c_n))
    return grads[0], grads[1], grads[2], grads[3:]


# ---------------------------------------------------------------------- losses
def _ce_backward_setup(ctx, inputs, output):
    grad_loss, logits, target, mask, lse, label_smoothing = inputs[:6]
    weight = inputs[6] if len(inputs) > 6 else None
    ctx.save_for_backward(grad_loss, logits, target, mask, weight)
    ctx.eps = float(label_smoothing)


def _ce_backward_backward(ctx, v):
    """cross_entropy_backward's derivatives (op_schemas.h): with p the softmax
    of a counted row, s its grad_loss, grad = s (a p - b), a = (1 - eps) w[t]
    + eps W / C and b = (1 - eps) w[t] onehot + eps w / C; so for v, the
    gradient of grad's, d/d logits = s a p (v - <v, p>) and d/ds = a <v, p> -
    <v, b>. lse is the logits' own (its dependence is in p's derivative)."""
    grad_loss, logits, target, mask, weight = ctx.saved_tensors
    none = (None,) * 5
    if v is None:
        return (None, None) + none
    acc = _acc(logits.dtype)
    rows = mask.unsqueeze(1)
    x = torch.where(rows, logits.to(acc), 0)  # rows that do not count are never read
    p = torch.softmax(x, 1)
    C = x.shape[1]
    t = torch.where(mask, target, 0).unsqueeze(1)
    eps = ctx.eps
    vv = v.to(acc)
    vp = (vv * p).sum(1)
    if weight is None:
        a = torch.ones((), dtype=acc, device=x.device)
        vb = (1 - eps) * vv.gather(1, t).squeeze(1) + eps / C * vv.sum(1)
    else:
        w = weight.to(acc)
        wt = w[t.squeeze(1)]
        a = (1 - eps) * wt + eps * w.sum() / C
        vb = (1 - eps) * wt * vv.gather(1, t).squeeze(1) + eps / C * (vv * w).sum(1)
    s = grad_loss.to(acc)
    g_logits = torch.where(rows, (s * a).unsqueeze(1) * p * (vv - vp.unsqueeze(1)), 0)
    g_s = torch.where(mask, a * vp - vb, 0)
    return (g_s.to(grad_loss.dtype), g_logits.to(logits.dtype)) + none


def _elem_backward_setup(ctx, inputs, output):
    grad, input, target, mask, pos_weight, kind, reduce_rows = inputs
    ctx.save_for_backward(grad, input, target, mask, pos_weight)
    ctx.kind, ctx.reduce_rows = kind, reduce_rows


def _elem_backward_backward(ctx, v_input, v_target):
    """elementwise_loss_backward's derivatives (loss_math.h): grad_input = g
    dx, grad_target = g dy, whose derivatives w.r.t. x and y are the loss's
    second derivatives."""
    grad, x0, y0, mask, pos_weight = ctx.saved_tensors
    none = (None,) * 4
    if v_input is None and v_target is None:
        return (None, None) + none
    acc = _acc(x0.dtype)
    rows = mask.unsqueeze(1)
    x = torch.where(rows, x0.to(acc), 0)  # rows that do not count are never read
    y = torch.where(rows, y0.to(acc), 0)
    vi = torch.zeros_like(x) if v_input is None else v_input.to(acc)
    vt = torch.zeros_like(x) if v_target is None else v_target.to(acc)
    g = grad.to(acc)
    g = g.unsqueeze(1) if ctx.reduce_rows else g
    if ctx.kind == "mse":
        d = x - y
        dx, dy = 2 * d, -2 * d
        hxx, hxy, hyy = 2.0, -2.0, 2.0
    else:  # bce_with_logits, pos_weight p: w = 1 + (p - 1) y
        p = torch.ones((), dtype=acc, device=x.device) if pos_weight is None else pos_weight.to(acc)
        w = 1 + (p - 1) * y
        s_neg = torch.sigmoid(-x)
        dx = (1 - y) - w * s_neg
        dy = -x + (p - 1) * F.softplus(-x)
        hxx = w * s_neg * torch.sigmoid(x)
        hxy = -1 - (p - 1) * s_neg
        hyy = 0.0
    g_x = torch.where(rows, g * (vi * hxx + vt * hxy), 0)
    g_y = torch.where(rows, g * (vi * hxy + vt * hyy), 0)
    g_g = torch.where(rows, vi * dx + vt * dy, 0)
    if ctx.reduce_rows:
        g_g = g_g.sum(1)
    return (g_g.to(grad.dtype), g_x.to(x0.dtype), g_y.to(y0.dtype)) + none


def register_loss_double_backward():
    torch.library.register_autograd("varlen_kernels::cross_entropy_backward",
                                    _ce_backward_backward, setup_context=_ce_backward_setup)
    torch.library.register_autograd("varlen_kernels::elementwise_loss_backward",
                                    _elem_backward_backward, setup_context=_elem_backward_setup)


# ---------------------------------------------------- fused linear cross entropy
def linear_cross_entropy_grads(needs, hidden, weight, bias, target, mask, label_smoothing,
                               reduction, grad_loss):
    """linear_cross_entropy_forward's gradients (hidden, weight, bias) through
    the unfused formula: F.linear, then F.cross_entropy on the rows that count."""
    def run(t):
        h, w, b = t
        rows = mask.unsqueeze(1)
        logits = F.linear(torch.where(rows, h, 0), w, b)  # rows that do not count are never read
        per = F.cross_entropy(logits, torch.where(mask, target, 0), reduction="none",
                              label_smoothing=label_smoothing)
        per = torch.where(mask, per, 0)
        if reduction == "none":
            return (per,)
        total = per.sum()
        return (total / mask.sum().clamp_min(1) if reduction == "mean" else total,)

    return grads_through([hidden, weight, bias], [needs[0], needs[1], needs[2]], run, (grad_loss,))
