"""Masked losses: averages over valid time steps only.

Shapes, as nn.* and MaskedRNN read them: with ``batch_first=False`` (the
default, time-major) inputs are ``(T, B, ...)``; with ``batch_first=True``
``(B, T, ...)``. Valid steps come from ``lengths`` (B,) (step t of sequence b
is valid iff t < lengths[b]) or from a boolean ``mask`` of the inputs' two
leading dims, for masks that are not prefixes.

Every loss is exactly 0, with zero gradients, when no step is valid (never
NaN), and never reads padding: NaN/Inf or garbage there changes nothing and
gets gradient 0. The mean's divisor is computed on the device (no host sync).
Each loss is one op (masked_cross_entropy_forward,
masked_elementwise_loss_forward) that also finds the counted tokens and
reduces them, so that a call is a few kernel launches.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_lengths, layout_hint, lengths_on_host

_REDUCTIONS = ("mean", "sum", "none")


def _check_mask(mask, lead, what: str) -> None:
    """mask: a bool Tensor of shape `lead` (`what` names those dims in the error)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != lead:
        raise ValueError(f"mask must have shape {lead} ({what}), got {tuple(mask.shape)}")


def _lengths_or_mask(x: Tensor, lengths, mask, batch_first: bool, name: str, trailing: str = "..."):
    """(lengths, None) with lengths (B,) int64 on x's device, checked where they
    are in host memory (on a GPU the kernels assert them), or (None, mask) with
    the bool (lead0, lead1) mask of valid steps: whichever the caller gave."""
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dims ({'B, T' if batch_first else 'T, B'}, ...), "
                         f"got shape {tuple(x.shape)}")
    if not isinstance(batch_first, bool):
        raise TypeError(f"batch_first must be a bool, got {type(batch_first).__name__}")
    lead = tuple(x.shape[:2])
    B, T = (lead[0], lead[1]) if batch_first else (lead[1], lead[0])
    if (lengths is None) == (mask is None):
        raise ValueError("give exactly one of lengths and mask")
    if mask is not None:
        _check_mask(mask, lead, f"{name}'s leading dims")
        return None, mask.to(x.device)
    return check_lengths(lengths, T, B, x.device,
                         layout=layout_hint(name, x.shape, batch_first, trailing)), None


def _valid_mask(x: Tensor, lengths, mask, batch_first: bool, name: str, trailing: str = "...") -> Tensor:
    """Boolean (lead0, lead1) mask of valid steps, in x's layout."""
    on_host = lengths_on_host(lengths)
    lengths, mask = _lengths_or_mask(x, lengths, mask, batch_first, name, trailing)
    if mask is not None:
        return mask
    T = x.shape[1] if batch_first else x.shape[0]
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


def _check_class_target(target, lead, lead_name, label_smoothing, ignore_index):
    """The checks every cross entropy makes of target, label_smoothing, ignore_index."""
    if not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dtype.is_complex \
            or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer Tensor of class indices, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if tuple(target.shape) != lead:
        raise ValueError(f"target must have shape {lead} ({lead_name}' leading dims), "
                         f"got {tuple(target.shape)}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")


def masked_cross_entropy(logits: Tensor, target: Tensor, lengths=None, *, mask: Optional[Tensor] = None,
                         batch_first: bool = False, reduction: str = "mean",
                         label_smoothing: float = 0.0, weight: Optional[Tensor] = None,
                         ignore_index: Optional[int] = -100) -> Tensor:
    """Cross entropy over the valid tokens, in one fused pass (no log-softmax kept).

    logits: ``(T, B, C)``, or ``(B, T, C)`` with ``batch_first=True``, with
    lengths ``(B,)`` (any integer form) or a bool mask of the leading dims; or
    ``(N, C)`` flattened tokens with an optional ``(N,)`` bool mask (no mask:
    every token). target: integer class indices of the leading shape (anything
    in padding). ``weight``, ``ignore_index``, ``label_smoothing`` and
    ``reduction`` as in ``F.cross_entropy``: targets equal to ``ignore_index``
    count nowhere, on top of the lengths/mask; ``"mean"`` divides by the number
    of counted tokens, or with ``weight`` by the summed weights of their targets;
    ``"none"`` returns per-token losses of the leading shape, zero where not
    counted. No counted token gives exactly 0 (not NaN). An out-of-range target
    at a counted token is an error. No gradient w.r.t. ``weight``.
    """
    _check_reduction(reduction)
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"logits must be 3-D ({'B, T, C' if batch_first else 'T, B, C'}) or 2-D "
                         f"(N, C), got shape {tuple(getattr(logits, 'shape', ()))}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    lead = tuple(logits.shape[:-1])
    _check_class_target(target, lead, "logits", label_smoothing, ignore_index)
    C = logits.shape[-1]
    rows_mask = rows_lengths = None  # neither: every token counts
    if logits.dim() == 2:
        if lengths is not None:
            raise ValueError("lengths is for 3-D logits (T, B, C) or (B, T, C); 2-D logits (N, C) "
                             "take mask= of shape (N,), or nothing (every token counts)")
        if mask is not None:
            _check_mask(mask, lead, "logits' leading dim")
            rows_mask = mask.to(logits.device)
    else:
        rows_lengths, rows_mask = _lengths_or_mask(logits, lengths, mask, batch_first, "logits", "C")
    target = target.to(device=logits.device, dtype=torch.long)
    if _autocast(logits):
        logits = logits.float()  # losses in float32 under autocast, as PyTorch's
    if weight is not None:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating point Tensor of shape (C,) = ({C},), got "
                            f"{getattr(weight, 'dtype', type(weight).__name__)}")
        if tuple(weight.shape) != (C,):
            raise ValueError(f"weight must have shape (C,) = ({C},), one per class, got {tuple(weight.shape)}")
        if weight.requires_grad:
            raise NotImplementedError("gradients w.r.t. weight are not implemented: "
                                      "pass a weight that does not require grad")
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    # One op: which tokens count (from the lengths, or the mask, less ignored
    # targets), their losses and their reduction, in two kernels on a GPU.
    loss, _, _, total, _ = torch.ops.varlen_kernels.masked_cross_entropy_forward.default(
        logits.reshape(-1, C), target.reshape(-1),
        None if rows_mask is None else rows_mask.reshape(-1), rows_lengths, bool(batch_first),
        ignore_index, float(label_smoothing), weight, reduction)
    if reduction == "none":
        return loss.view(lead).to(logits.dtype)
    return total.to(logits.dtype)


def _elementwise(name, kind, pred, target, lengths, mask, batch_first, reduction, pos_weight=None):
    _check_reduction(reduction)
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name} and target must be Tensors")
    if not pred.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {pred.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"target must have the shape of {name} {tuple(pred.shape)}, got {tuple(target.shape)}")
    rows_lengths, rows_mask = _lengths_or_mask(pred, lengths, mask, batch_first, name)
    if _autocast(pred):
        pred = pred.float()  # losses in float32 under autocast, as PyTorch's
    target = target.to(pred.dtype)
    R, F = pred.shape[0] * pred.shape[1], math.prod(pred.shape[2:])
    pw = None
    if pos_weight is not None:
        if pos_weight.requires_grad:
            raise NotImplementedError("gradients w.r.t. pos_weight are not implemented: "
                                      "pass a pos_weight that does not require grad")
        pw = torch.broadcast_to(pos_weight.to(pred), pred.shape[2:] or (1,)).reshape(F)
    # One op: which steps count (from the lengths or the mask), their losses and
    # their reduction, in two kernels on a GPU.
    loss, _, total, _ = torch.ops.varlen_kernels.masked_elementwise_loss_forward.default(
        pred.reshape(R, F), target.reshape(R, F),
        None if rows_mask is None else rows_mask.reshape(-1), rows_lengths, bool(batch_first), pw,
        kind, reduction)
    if reduction == "none":
        return loss.view(pred.shape).to(pred.dtype)
    return total.to(pred.dtype)


def masked_mse(pred: Tensor, target: Tensor, lengths=None, *, mask: Optional[Tensor] = None,
               batch_first: bool = False, reduction: str = "mean") -> Tensor:
    """Squared error over valid steps, one fused op. pred, target: (T, B, *), or
    (B, T, *) with batch_first=True; "mean" averages over valid elements (valid steps x
    trailing features); "none" returns the elementwise loss, zero in padding."""
    return _elementwise("pred", "mse", pred, target, lengths, mask, batch_first, reduction)


def masked_bce_with_logits(logits: Tensor, target: Tensor, lengths=None, *, mask: Optional[Tensor] = None,
                           batch_first: bool = False, reduction: str = "mean",
                           pos_weight: Optional[Tensor] = None) -> Tensor:
    """Binary cross entropy with logits over valid steps, one fused op; shapes and
    reductions as :func:`masked_mse`; pos_weight broadcast over the trailing dims as
    in F.binary_cross_entropy_with_logits (no gradient w.r.t. pos_weight)."""
    return _elementwise("logits", "bce_with_logits", logits, target, lengths, mask, batch_first,
                        reduction, pos_weight)
