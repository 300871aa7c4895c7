"""Masked losses: averages over valid time steps only.

Shapes, with ``batch_first=True`` (the default): inputs ``(B, T, ...)``; with
``batch_first=False``: ``(T, B, ...)``. Valid steps come from ``lengths`` (B,)
(step t of sequence b is valid iff t < lengths[b]) or from a boolean ``mask``
of the inputs' two leading dims, for masks that are not prefixes.

Every loss is exactly 0, with zero gradients, when no step is valid (never
NaN), and never reads padding: NaN/Inf or garbage there changes nothing and
gets gradient 0. The mean's divisor is computed on the device (no host sync).
"""
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_lengths

_REDUCTIONS = ("mean", "sum", "none")


def _valid_mask(x: Tensor, lengths, mask, batch_first: bool, name: str) -> Tensor:
    """Boolean (lead0, lead1) mask of valid steps, in x's layout."""
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims ({'B, T' if batch_first else 'T, B'}, ...), "
                         f"got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:2])
    B, T = (lead[0], lead[1]) if batch_first else (lead[1], lead[0])
    if (lengths is None) == (mask is None):
        raise ValueError("give exactly one of lengths and mask")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask must have shape {lead} ({name}'s leading dims), got {tuple(mask.shape)}")
        return mask.to(x.device)
    on_host = isinstance(lengths, (list, tuple)) or (isinstance(lengths, Tensor) and lengths.device.type == "cpu")
    lengths = check_lengths(lengths, T, B, x.device)
    if not on_host:  # checked on the device, without a host sync (CPU lengths were checked eagerly)
        torch._assert_async(((lengths >= 0) & (lengths <= T)).all(),
                            f"lengths must be in [0, T] with T={T} (the time dimension)")
    steps = torch.arange(T, device=x.device)
    valid = steps.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    return valid if batch_first else valid.t()


def _autocast(x: Tensor) -> bool:
    return x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_token: Tensor, count: Tensor, reduction: str, out_dtype) -> Tensor:
    if reduction == "none":
        return per_token.to(out_dtype)
    total = per_token.sum()
    if reduction == "sum":
        return total.to(out_dtype)
    return (total / count.clamp_min(1)).to(out_dtype)


def masked_cross_entropy(logits: Tensor, target: Tensor, lengths=None, *, mask: Optional[Tensor] = None,
                         batch_first: bool = True, reduction: str = "mean",
                         label_smoothing: float = 0.0) -> Tensor:
    """Cross entropy over the valid tokens, in one fused pass (no log-softmax kept).

    logits: (B, T, C) if batch_first else (T, B, C); target: (B, T) / (T, B)
    integer class indices (anything in padding); lengths: (B,) or mask: (B, T) /
    (T, B) bool. reduction "mean" (per valid token), "sum", or "none" (per-token
    losses of the leading shape, zero in padding). label_smoothing as in
    F.cross_entropy. An out-of-range target at a valid step is an error.
    """
    _check_reduction(reduction)
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be 3-D ({'B, T, C' if batch_first else 'T, B, C'}), "
                         f"got shape {tuple(getattr(logits, 'shape', ()))}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer Tensor of class indices, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"target must have shape {tuple(logits.shape[:2])} (logits' leading dims), "
                         f"got {tuple(target.shape)}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    valid = _valid_mask(logits, lengths, mask, batch_first, "logits")
    if _autocast(logits):
        logits = logits.float()  # losses in float32 under autocast, as PyTorch's
    C = logits.shape[2]
    loss, _ = torch.ops.varlen_kernels.cross_entropy_forward.default(
        logits.reshape(-1, C), target.reshape(-1).to(torch.long), valid.reshape(-1),
        float(label_smoothing))
    return _reduce(loss.view(valid.shape), valid.sum(), reduction, logits.dtype)


def _elementwise(name, kind, pred, target, lengths, mask, batch_first, reduction, pos_weight=None):
    _check_reduction(reduction)
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name} and target must be Tensors")
    if not pred.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {pred.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of {name} {tuple(pred.shape)}, got {tuple(target.shape)}")
    valid = _valid_mask(pred, lengths, mask, batch_first, name)
    if _autocast(pred):
        pred = pred.float()  # losses in float32 under autocast, as PyTorch's
    target = target.to(pred.dtype)
    F = pred[0, 0].numel() if pred.dim() > 2 else 1
    pw = None
    if pos_weight is not None:
        if pos_weight.requires_grad:
            raise NotImplementedError("gradients w.r.t. pos_weight are not implemented: "
                                      "pass a pos_weight that does not require grad")
        pw = torch.broadcast_to(pos_weight.to(pred), pred.shape[2:] or (1,)).reshape(F)
    out = torch.ops.varlen_kernels.elementwise_loss_forward.default(
        pred.reshape(-1, F), target.reshape(-1, F), valid.reshape(-1), pw, kind, reduction != "none")
    if reduction == "none":
        return out.view(pred.shape).to(pred.dtype)
    return _reduce(out, valid.sum() * F, reduction, pred.dtype)


def masked_mse(pred: Tensor, target: Tensor, lengths=None, *, mask: Optional[Tensor] = None,
               batch_first: bool = True, reduction: str = "mean") -> Tensor:
    """Squared error over valid steps, one fused op. pred, target: (B, T, *) if
    batch_first else (T, B, *); "mean" averages over valid elements (valid steps x
    trailing features); "none" returns the elementwise loss, zero in padding."""
    return _elementwise("pred", "mse", pred, target, lengths, mask, batch_first, reduction)


def masked_bce_with_logits(logits: Tensor, target: Tensor, lengths=None, *, mask: Optional[Tensor] = None,
                           batch_first: bool = True, reduction: str = "mean",
                           pos_weight: Optional[Tensor] = None) -> Tensor:
    """Binary cross entropy with logits over valid steps, one fused op; shapes and
    reductions as :func:`masked_mse`; pos_weight broadcast over the trailing dims as
    in F.binary_cross_entropy_with_logits (no gradient w.r.t. pos_weight)."""
    return _elementwise("logits", "bce_with_logits", logits, target, lengths, mask, batch_first,
                        reduction, pos_weight)
