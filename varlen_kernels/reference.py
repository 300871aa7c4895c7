"""Pure-PyTorch reference: the readable spec of the masked recurrence.

A plain loop over time with a per-sequence validity mask. It is the test oracle
for the fused kernels and a benchmark baseline. Semantics, per sequence b of
length L_b:

* forward direction: steps 0 .. L_b-1 from h0; reverse direction: steps
  L_b-1 .. 0 from h0 (each sequence starts at its own last valid step);
* output[t, b] = h at step t for t < L_b, exactly 0 for t >= L_b;
* h_n[b] (and c_n[b]) = the state after the last step processed; h0 if L_b = 0;
* padded input is never used: it is replaced by 0 before any arithmetic, so
  NaN or Inf there changes no value and no gradient.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _cell_step(cell: str, x_t: Tensor, h: Tensor, c: Optional[Tensor], w_ih, w_hh, b_ih, b_hh,
               w_hr=None):
    gx = F.linear(x_t, w_ih, b_ih)
    gh = F.linear(h, w_hh, b_hh)
    if cell == "lstm":
        i, f, g, o = (gx + gh).chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return (h_new if w_hr is None else F.linear(h_new, w_hr)), c_new
    if cell == "gru":
        xr, xz, xn = gx.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h, None
    if cell == "rnn_tanh":
        return torch.tanh(gx + gh), None
    if cell == "rnn_relu":
        return torch.relu(gx + gh), None
    raise ValueError(f"cell must be one of 'lstm', 'gru', 'rnn_tanh', 'rnn_relu', got {cell!r}")


def rnn_layer_reference(
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
    """Same contract as :func:`varlen_kernels.ops.rnn_layer`, as a masked loop.

    input: (T, B, I); lengths: (B,); h0, c0: (B, H). Returns output (T, B, H),
    h_n (B, H), c_n (B, H) or None.
    """
    T = input.shape[0]
    valid = torch.arange(T, device=input.device).unsqueeze(1) < lengths.to(input.device)  # (T, B)
    h, c = h0, c0
    outputs = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        m = valid[t].unsqueeze(1)  # (B, 1)
        x_t = torch.where(m, input[t], torch.zeros((), dtype=input.dtype, device=input.device))
        h_new, c_new = _cell_step(cell, x_t, h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
        h = torch.where(m, h_new, h)
        if c is not None:
            c = torch.where(m, c_new, c)
        outputs[t] = torch.where(m, h_new, torch.zeros_like(h_new))
    if T == 0:
        return input.new_zeros(0, input.shape[1], w_hh.shape[1]), h, c
    return torch.stack(outputs), h, c


def masked_rnn_reference(module, input, lengths=None, hx=None):
    """Runs a :class:`varlen_kernels.MaskedRNN` with the reference layer in place of
    the fused kernel: same arguments and results as ``module(input, lengths, hx)``."""
    return module._forward(input, lengths, hx, layer=rnn_layer_reference)
