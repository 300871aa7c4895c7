"""Truncated backpropagation through time over padded variable-length batches."""
from typing import Iterator, NamedTuple, Optional, Union

from torch import Tensor

from ._checks import check_lengths, layout_hint


class Chunk(NamedTuple):
    """One window of k steps: ``input`` (B, k', ...) if batch_first else (k', B, ...),
    with k' = min(k, T - start); ``lengths`` (B,) int64, the valid steps of each
    sequence inside the window (0 for sequences that ended before it), on the
    input's device, or on the CPU where the lengths were given there (the
    recurrent modules then size their GEMMs on the host)."""
    start: int
    input: Tensor
    lengths: Tensor


def tbptt_chunks(input: Tensor, lengths, k: int, *, batch_first: bool = False) -> Iterator[Chunk]:
    """Splits a padded batch into windows of ``k`` steps with per-window lengths.

    input: (T, B, ...) or (B, T, ...) with batch_first; lengths: (B,). Run the
    recurrent module on each window with the state carried over, detached::

        state = None
        for chunk in tbptt_chunks(x, lengths, k=32, batch_first=True):
            out, state = lstm(chunk.input, chunk.lengths, state)
            loss = masked_cross_entropy(head(out), y[:, chunk.start:chunk.start + out.shape[1]],
                                        chunk.lengths, batch_first=True)
            loss.backward()
            state = detach_state(state)

    A sequence that ends inside a window stops there and its state stays frozen;
    in later windows its chunk length is 0, so the state passes through unchanged.
    For unidirectional layers the forward values equal those of one unchunked
    run; a bidirectional layer's reverse direction starts again in each window,
    so its values differ from the unchunked run's.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not isinstance(input, Tensor) or input.dim() < 2:
        raise ValueError(f"input must be a Tensor with at least 2 dims, got {getattr(input, 'shape', type(input))}")
    tdim = 1 if batch_first else 0
    T, B = input.shape[tdim], input.shape[1 - tdim]
    lengths = check_lengths(lengths, T, B, input.device, keep_host=True,
                            layout=layout_hint("input", input.shape, batch_first, "..."))
    for start in range(0, T, k):
        width = min(k, T - start)
        yield Chunk(start, input.narrow(tdim, start, width), (lengths - start).clamp(0, width))


State = Union[Tensor, tuple]


def detach_state(state: Optional[State]) -> Optional[State]:
    """The recurrent state (h_n, or (h_n, c_n)) cut from the graph, for the next window."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return tuple(s.detach() for s in state)
