"""MaskedRNN: a drop-in for nn.RNN / nn.GRU / nn.LSTM over variable-length batches."""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._checks import check_lengths
from .ops import CELLS, NUM_GATES, rnn_layer

_TORCH_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


class MaskedRNN(nn.Module):
    r"""Multi-layer RNN, GRU or LSTM over a padded batch of variable-length sequences.

    Constructor arguments, parameter names, shapes and initialisation are those of
    ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` (``cell`` picks which), so state dicts load
    both ways. ``module(x, lengths)`` returns what
    ``pad_packed_sequence(nn_module(pack_padded_sequence(x, lengths, enforce_sorted=False)))``
    returns, values and gradients, without packing or sorting.

    Args:
        input_size: features I of the input.
        hidden_size: features H of the hidden state.
        cell: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``.
        num_layers, bias, batch_first, dropout, bidirectional, device, dtype: as in nn.LSTM.

    Forward ``(input, lengths=None, hx=None)``:
        input: ``(B, T, I)`` if batch_first else ``(T, B, I)``; ``(T, I)`` unbatched;
            or a ``PackedSequence`` (then the output is one too, with the same
            ``batch_sizes`` and indices).
        lengths: ``(B,)`` integer tensor or list, on the CPU or the input's device,
            any order, each in ``[0, T]``. ``None`` means every sequence is T long.
            Length 0 is allowed: zero output, ``h_n = h0``.
        hx: ``h0`` of shape ``(num_layers * D, B, H)`` (``D = 2`` if bidirectional),
            or ``(h0, c0)`` for LSTM; zeros if None.

    Returns ``(output, h_n)``, or ``(output, (h_n, c_n))`` for LSTM. output is
    ``(B, T, D*H)`` if batch_first else ``(T, B, D*H)``, exactly zero past each
    length; ``h_n``/``c_n`` are ``(num_layers * D, B, H)``, each sequence's state at
    its own last valid step (for the reverse direction: after step 0).
    Padded input positions are never read and get gradient exactly 0.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        cell: str = "lstm",
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if proj_size != 0:
            raise NotImplementedError(
                f"proj_size={proj_size}: LSTM projections are not implemented by MaskedRNN; "
                "use proj_size=0"
            )
        self.cell = cell
        self.mode = {v: k for k, v in _TORCH_MODES.items()}[cell]
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0
        factory = {"device": device, "dtype": dtype}
        gate_size = NUM_GATES[cell] * hidden_size
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names: List[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * num_directions
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                for prefix, shape in shapes:
                    self.register_parameter(prefix + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(prefix + suffix)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as nn.* does."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        """Parameters per (layer, direction), in nn.*'s order."""
        per = 4 if self.bias else 2
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[k:k + per]] for k in range(0, len(names), per)]

    def flatten_parameters(self) -> None:
        """No-op, for code written for nn.*: the kernels use the parameters as they are."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, cell={self.cell!r}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_torch(cls, module: nn.RNNBase) -> "MaskedRNN":
        """A MaskedRNN with the configuration and a copy of the weights of an
        ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``."""
        if not isinstance(module, nn.RNNBase) or module.mode not in _TORCH_MODES:
            raise TypeError(f"module must be an nn.LSTM, nn.GRU or nn.RNN, got {type(module).__name__}")
        if getattr(module, "proj_size", 0):
            raise NotImplementedError(f"proj_size={module.proj_size} is not supported by MaskedRNN")
        p = next(module.parameters())
        new = cls(module.input_size, module.hidden_size, cell=_TORCH_MODES[module.mode],
                  num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  dropout=module.dropout, bidirectional=module.bidirectional, device=p.device,
                  dtype=p.dtype)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    def to_torch(self) -> nn.RNNBase:
        """The equivalent ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with a copy of the weights."""
        p = next(self.parameters())
        kw = dict(num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                  dropout=self.dropout, bidirectional=self.bidirectional, device=p.device,
                  dtype=p.dtype)
        if self.cell == "lstm":
            m = nn.LSTM(self.input_size, self.hidden_size, **kw)
        elif self.cell == "gru":
            m = nn.GRU(self.input_size, self.hidden_size, **kw)
        else:
            m = nn.RNN(self.input_size, self.hidden_size, nonlinearity=self.cell[4:], **kw)
        m.load_state_dict(self.state_dict())
        return m.train(self.training)

    # --------------------------------------------------------------- forward
    def forward(self, input, lengths: Optional[Union[Tensor, Sequence[int]]] = None, hx=None):
        return self._forward(input, lengths, hx, layer=rnn_layer)

    def _forward(self, input, lengths, hx, layer):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, lengths, hx, layer)
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(
                f"input must be 3-D ({'B, T, I' if self.batch_first else 'T, B, I'}) or 2-D "
                f"(T, I) unbatched, got shape {tuple(input.shape)}"
            )
        unbatched = input.dim() == 2
        if unbatched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        output, h_n, c_n = self._run(x, lengths, hx, layer, unbatched)
        if unbatched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if self.cell == "lstm" else h_n)

    def _forward_packed(self, packed: PackedSequence, lengths, hx, layer):
        if lengths is not None:
            raise ValueError("lengths must be None when input is a PackedSequence "
                             "(the lengths come from its batch_sizes)")
        padded, lens = pad_packed_sequence(packed)  # (T, B, I), original batch order
        output, h_n, c_n = self._run(padded, lens, hx, layer, unbatched=False)
        order = packed.sorted_indices
        if order is not None:
            output, lens = output.index_select(1, order), lens.index_select(0, order.cpu())
        data = pack_padded_sequence(output, lens, enforce_sorted=True).data
        out = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        return out, ((h_n, c_n) if self.cell == "lstm" else h_n)

    def _run(self, x: Tensor, lengths, hx, layer, unbatched: bool):
        """x: (T, B, I). Returns output (T, B, D*H), h_n, c_n (L*D, B, H)."""
        T, B, I = x.shape
        if I != self.input_size:
            raise ValueError(f"input.size(-1) must be equal to input_size={self.input_size}, got {I}")
        p = self.weight_ih_l0
        autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
        if x.dtype != p.dtype and not autocast:
            raise TypeError(f"input must have the parameters' dtype {p.dtype}, got {x.dtype}")
        if x.device != p.device:
            raise ValueError(f"input must be on the parameters' device {p.device}, got {x.device}")
        lengths = check_lengths(lengths, T, B, x.device)
        h0, c0 = self._check_hx(hx, x, unbatched, autocast)
        D = 2 if self.bidirectional else 1
        per = 4 if self.bias else 2
        names = self._flat_weights_names
        h_n, c_n = [], []
        for lay in range(self.num_layers):
            outs = []
            for d in range(D):
                k = lay * D + d
                w = [getattr(self, n) for n in names[k * per:(k + 1) * per]]
                w_ih, w_hh, b_ih, b_hh = (w + [None, None])[:4]
                out, h, c = layer(x, lengths, h0[k], c0[k] if c0 is not None else None,
                                  w_ih, w_hh, b_ih, b_hh, self.cell, d == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if D == 1 else torch.cat(outs, 2)
            if self.dropout > 0 and self.training and lay < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        return x, torch.stack(h_n), (torch.stack(c_n) if self.cell == "lstm" else None)

    def _check_hx(self, hx, x: Tensor, unbatched: bool, autocast: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        B = x.shape[1]
        LD = self.num_layers * (2 if self.bidirectional else 1)
        shape = (LD, self.hidden_size) if unbatched else (LD, B, self.hidden_size)
        lstm = self.cell == "lstm"
        if hx is None:
            zeros = x.new_zeros(LD, B, self.hidden_size)
            return zeros, (zeros if lstm else None)
        if lstm:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("hx for an LSTM must be a tuple (h_0, c_0)")
            states = [("hx[0] (h_0)", hx[0]), ("hx[1] (c_0)", hx[1])]
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"hx must be a Tensor for cell {self.cell!r}, got {type(hx).__name__}")
            states = [("hx", hx)]
        out = []
        for name, s in states:
            if not isinstance(s, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(s).__name__}")
            if tuple(s.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (num_layers * num_directions, "
                                 f"{'' if unbatched else 'B, '}hidden_size), got {tuple(s.shape)}")
            if s.dtype != x.dtype and not (autocast and s.is_floating_point()):
                raise TypeError(f"{name} must have the input's dtype {x.dtype}, got {s.dtype}")
            if s.device != x.device:
                raise ValueError(f"{name} must be on the input's device {x.device}, got {s.device}")
            out.append(s.unsqueeze(1) if unbatched else s)
        return out[0], (out[1] if lstm else None)


class _FixedCell(MaskedRNN):
    _cell = ""

    def __init__(self, input_size: int, hidden_size: int, **kwargs):
        cell = kwargs.pop("cell", self._cell)
        if cell != self._cell:
            raise ValueError(f"{type(self).__name__} has cell {self._cell!r}, got cell={cell!r}")
        super().__init__(input_size, hidden_size, cell=self._cell, **kwargs)


class MaskedLSTM(_FixedCell):
    """``MaskedRNN(..., cell="lstm")``: a drop-in for nn.LSTM with ``lengths``."""

    _cell = "lstm"


class MaskedGRU(_FixedCell):
    """``MaskedRNN(..., cell="gru")``: a drop-in for nn.GRU with ``lengths``."""

    _cell = "gru"
