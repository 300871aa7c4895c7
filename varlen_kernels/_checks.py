"""Input checks shared by the modules and the losses."""
import operator

import torch
from torch import Tensor

try:
    import numpy as np
except ImportError:  # NumPy is optional
    np = None

_LENGTHS_FORMS = "a 1-D integer Tensor, a NumPy array or a list of ints"


def _is_bool(v) -> bool:
    return isinstance(v, bool) or (np is not None and isinstance(v, np.bool_)) or (
        isinstance(v, Tensor) and v.dtype == torch.bool)


def lengths_tensor(lengths) -> Tensor:
    """``lengths`` in any accepted form as an integer tensor, on its own device,
    not yet checked against the input: a tensor of any integer dtype, a NumPy
    array or integer scalar, a list or tuple of ints (NumPy integers and 0-d
    integer tensors included), or an int (unbatched input: a 0-d result)."""
    if isinstance(lengths, Tensor):
        t = lengths
    elif np is not None and isinstance(lengths, (np.ndarray, np.generic)):
        if not (np.issubdtype(lengths.dtype, np.integer)):
            raise TypeError(f"lengths must have an integer dtype, got NumPy {lengths.dtype}")
        t = torch.tensor(np.asarray(lengths))
    elif isinstance(lengths, (list, tuple)):
        values = []
        for v in lengths:
            try:
                if _is_bool(v):
                    raise TypeError
                values.append(operator.index(v))
            except TypeError:
                raise TypeError(f"lengths must hold ints, got {lengths!r}") from None
        t = torch.tensor(values, dtype=torch.long)
    elif isinstance(lengths, int) and not isinstance(lengths, bool):
        t = torch.tensor(lengths, dtype=torch.long)
    else:
        raise TypeError(f"lengths must be {_LENGTHS_FORMS}, got {type(lengths).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"lengths must have an integer dtype, got {t.dtype}")
    return t


def lengths_on_host(lengths) -> bool:
    """Whether ``lengths`` (any accepted form) live in host memory."""
    return not isinstance(lengths, Tensor) or lengths.device.type == "cpu"


def check_lengths(lengths, T: int, B: int, device: torch.device, *, unbatched: bool = False,
                  layout: str = "", keep_host: bool = False) -> Tensor:
    """lengths (any form of :func:`lengths_tensor`, B values in [0, T]) as an
    int64 tensor on ``device``, or with ``keep_host`` on the CPU where they are
    in host memory already (the CUDA RNN ops take them there and make their
    length plan on the host; not while compiling, where they go to ``device``).

    ``None`` means every sequence is T long. An int (or 0-d tensor) only for
    unbatched input. ``layout`` says how the caller read B and T from its input
    (added to the error when the count does not match). Values are checked
    eagerly when the lengths live on the CPU (no host sync); on a GPU the
    kernels check them.
    """
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    t = lengths_tensor(lengths)
    if t.dim() == 0:
        if not unbatched:
            raise ValueError(f"lengths must be 1-D with one entry per sequence (B={B}), got the "
                             f"scalar {lengths!r}: a single int is for unbatched input only")
        t = t.reshape(1)
    if t.dim() != 1 or t.shape[0] != B:
        hint = f"; {layout}" if layout and t.dim() == 1 else ""
        raise ValueError(f"lengths must be 1-D with one entry per sequence (B={B}), "
                         f"got shape {tuple(t.shape)}{hint}")
    if t.device.type == device.type == "cuda" and t.device != device:
        raise ValueError(f"lengths is on {t.device} but input is on {device}")
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and B > 0:
        t = t.to(torch.long)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > T:
            bad = int(torch.nonzero((t < 0) | (t > T))[0, 0])
            raise ValueError(f"lengths must be in [0, T] with T={T} (the input's time "
                             f"dimension), got lengths[{bad}] = {int(t[bad])}")
    if keep_host and t.device.type == "cpu" and not torch.compiler.is_compiling():
        # a copy of the caller's tensor (saved for backward: theirs may change)
        return t.to(torch.long, copy=True)
    return t.to(device=device, dtype=torch.long, non_blocking=True)


def layout_hint(name: str, shape, batch_first: bool, trailing: str) -> str:
    """How B and T were read from an input, and the switch that reads them the
    other way: for the error when the lengths count does not match."""
    if batch_first:
        return (f"{name} {tuple(shape)} is read as batch-major (B, T, {trailing}) since "
                f"batch_first=True; pass batch_first=False for time-major (T, B, {trailing}) input")
    return (f"{name} {tuple(shape)} is read as time-major (T, B, {trailing}) since "
            f"batch_first=False (the default, as in nn.*); pass batch_first=True for "
            f"batch-major (B, T, {trailing}) input")
