"""Fused linear + masked cross entropy: the output layer of a language model
and its loss in one op, without ever holding the logits of every token.

    loss = masked_linear_cross_entropy(hidden, head.weight, target, lengths, bias=head.bias)

equals ``masked_cross_entropy(F.linear(hidden, weight, bias), target, lengths)``,
values and gradients, with extra memory O(chunk * V + V * H) instead of
O(tokens * V). The tokens are processed a chunk at a time (about 64 MiB of
logits, or H tokens where that is more): a GEMM for the chunk's logits, the fused cross-entropy kernel, and
for a "mean"/"sum" loss under autograd the gradients at once from the same
logits (the backward then only scales them); for reduction "none" the
backward recomputes each chunk's logits. On the CPU only the valid tokens go
through the GEMMs; on a GPU all rows do (no host sync), padded ones as zeros.
"""
import contextlib
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .losses import _autocast, _check_class_target, _check_reduction, _valid_mask


def masked_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, lengths=None, *,
                                bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                                batch_first: bool = False, reduction: str = "mean",
                                label_smoothing: float = 0.0, ignore_index: Optional[int] = -100,
                                chunk_size: Optional[int] = None) -> Tensor:
    """Cross entropy of ``hidden @ weight.T + bias`` over the valid tokens, fused.

    hidden: (T, B, H), or (B, T, H) with batch_first; weight: (V, H) as in
    nn.Linear (may be tied to an embedding); bias: (V,) or None; target: (T, B) /
    (B, T) class indices (anything in padding); lengths: (B,) or mask: (T, B) /
    (B, T) bool. reduction "mean" (per valid token; 0 with zero gradients when
    there is none), "sum", or "none" (per-token losses, zero in padding).
    label_smoothing and ignore_index as in F.cross_entropy (targets equal to
    ignore_index count nowhere, on top of lengths/mask). chunk_size: tokens per chunk
    (default: about 64 MiB of logits, or H tokens where that is more, so that
    the chunk's GEMMs outweigh its pass over the weight gradient's
    accumulator). Under autocast the GEMMs run in the
    autocast dtype and the logsumexp in float32.
    """
    _check_reduction(reduction)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D ({'B, T, H' if batch_first else 'T, B, H'}), "
                         f"got shape {tuple(hidden.shape)}")
    H = hidden.shape[2]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, {H}) (V classes, hidden's last dim), "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _check_class_target(target, tuple(hidden.shape[:2]), "hidden", label_smoothing, ignore_index)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    valid = _valid_mask(hidden, lengths, mask, batch_first, "hidden")
    if ignore_index is not None:
        valid = valid & (target != ignore_index)
    out_dtype = hidden.dtype
    if _autocast(hidden):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        out_dtype = torch.float32
    elif weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(f"weight and bias must have hidden's dtype {hidden.dtype}, got "
                        f"{weight.dtype} and {None if bias is None else bias.dtype}")
    needs_grad = any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    compute_grad = reduction != "none" and torch.is_grad_enabled() and needs_grad
    # The op's own GEMMs and kernels run as called: no autocast casts inside it.
    autocast_off = torch.autocast(hidden.device.type, enabled=False) if _autocast(hidden) \
        else contextlib.nullcontext()
    with autocast_off:
        loss, _, _, _, _ = torch.ops.varlen_kernels.linear_cross_entropy_forward.default(
            hidden.reshape(-1, H), weight, bias, target.reshape(-1).to(torch.long),
            valid.reshape(-1), float(label_smoothing), reduction, compute_grad, chunk_size or 0)
    if reduction == "none":
        loss = loss.view(valid.shape)
    return loss.to(out_dtype)


class MaskedLinearCrossEntropy(nn.Module):
    """An output layer and its masked cross entropy, fused: ``nn.Linear(in_features,
    num_classes, bias)`` followed by :func:`masked_cross_entropy`, without the logits.

    ``weight`` (num_classes, in_features) and ``bias`` (num_classes,) are those of
    nn.Linear (same names, shapes and initialization), so the weight can be tied to
    an embedding: ``head.weight = embedding.weight``.
    forward(hidden, target, lengths=None, *, mask=None, batch_first=False,
    reduction="mean", label_smoothing=0.0, ignore_index=-100): see
    :func:`masked_linear_cross_entropy`.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_classes, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: Tensor, target: Tensor, lengths=None, *, mask: Optional[Tensor] = None,
                batch_first: bool = False, reduction: str = "mean", label_smoothing: float = 0.0,
                ignore_index: Optional[int] = -100) -> Tensor:
        return masked_linear_cross_entropy(hidden, self.weight, target, lengths, bias=self.bias,
                                           mask=mask, batch_first=batch_first, reduction=reduction,
                                           label_smoothing=label_smoothing, ignore_index=ignore_index)

    def extra_repr(self):
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}"
