"""Input checks shared by the modules and the losses."""
import torch
from torch import Tensor


def check_lengths(lengths, T: int, B: int, device: torch.device) -> Tensor:
    """lengths (tensor or list of B ints in [0, T]) as an int64 tensor on ``device``.

    ``None`` means every sequence is T long. Values are checked eagerly when the
    lengths live on the CPU (no host sync); on a GPU the kernels check them.
    """
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
            raise TypeError(f"lengths must hold ints, got {lengths!r}")
        lengths = torch.tensor(lengths, dtype=torch.long)
    if not isinstance(lengths, Tensor):
        raise TypeError(f"lengths must be a 1-D integer Tensor or a list of ints, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"lengths must be 1-D with one entry per sequence (B={B}), "
                         f"got shape {tuple(lengths.shape)}")
    if lengths.device.type == device.type == "cuda" and lengths.device != device:
        raise ValueError(f"lengths is on {lengths.device} but input is on {device}")
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling() and B > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0 or hi > T:
            bad = int(torch.nonzero((lengths < 0) | (lengths > T))[0, 0])
            raise ValueError(f"lengths must be in [0, T] with T={T} (the input's time "
                             f"dimension), got lengths[{bad}] = {int(lengths[bad])}")
    return lengths.to(device=device, dtype=torch.long, non_blocking=True)
