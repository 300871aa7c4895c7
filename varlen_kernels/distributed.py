"""Helpers for masked losses under data parallelism (DDP)."""
import torch
import torch.distributed as dist
from torch import Tensor


def global_valid_count(local_count: Tensor) -> Tensor:
    """Sum of the valid-token counts of all ranks (an all-reduce, no host sync).

    local_count: a scalar tensor, e.g. ``lengths.sum()`` or ``mask.sum()``.
    Without an initialized process group, returns it unchanged.
    """
    count = local_count.detach().to(torch.float64).clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    return count


def ddp_mean(local_sum: Tensor, local_count: Tensor) -> Tensor:
    """The per-token mean over the whole global batch, written so that DDP's
    gradient averaging gives exactly the gradient of one process on the whole batch.

    local_sum: this rank's summed loss (``reduction="sum"``); local_count: its
    number of valid tokens (or elements). DDP divides the summed gradients by the
    world size, so the local term is scaled by it:
    ``local_sum * world_size / global_count``. Zero (not NaN) when no rank has a
    valid token.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = global_valid_count(local_count).clamp_min(1)
    return local_sum * world / total.to(local_sum.dtype)
