"""varlen_kernels: fused masked RNN/GRU/LSTM kernels for variable-length batches.

    from varlen_kernels import MaskedLSTM
    lstm = MaskedLSTM(input_size=32, hidden_size=64, batch_first=True)
    output, (h_n, c_n) = lstm(x, lengths)   # x: (B, T, 32), lengths: (B,)
"""
from ._load import load_extension

_C = load_extension()  # registers the ops before the Python registrations below

from . import ops  # noqa: E402
from .losses import masked_bce_with_logits, masked_cross_entropy, masked_mse  # noqa: E402
from .linear_cross_entropy import MaskedLinearCrossEntropy, masked_linear_cross_entropy  # noqa: E402
from .reference import masked_rnn_reference, rnn_layer_reference  # noqa: E402
from .rnn import MaskedGRU, MaskedLSTM, MaskedRNN  # noqa: E402
from .tbptt import Chunk, detach_state, tbptt_chunks  # noqa: E402
from . import distributed  # noqa: E402
from . import testing  # noqa: E402  (varlen_kernels.testing.emulate_cuda, ...)

__version__ = "0.1.0"
__all__ = [
    "MaskedRNN",
    "MaskedLSTM",
    "MaskedGRU",
    "masked_rnn_reference",
    "rnn_layer_reference",
    "masked_cross_entropy",
    "masked_mse",
    "masked_bce_with_logits",
    "masked_linear_cross_entropy",
    "MaskedLinearCrossEntropy",
    "tbptt_chunks",
    "detach_state",
    "Chunk",
    "distributed",
    "ops",
]
