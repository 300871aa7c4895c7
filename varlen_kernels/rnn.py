"""MaskedRNN: a drop-in for nn.RNN / nn.GRU / nn.LSTM over variable-length batches."""
import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._checks import check_lengths, layout_hint
from .ops import CELLS, NUM_GATES, rnn_bidirectional_layer, rnn_layer

_TORCH_MODES = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}


_FORWARD_DOC = """
    Forward ``(input, lengths=None, hx=None)``, with ``D = 2`` if bidirectional:
        input: ``(T, B, I)``, or ``(B, T, I)`` if batch_first; ``(T, I)``
            unbatched; or a ``PackedSequence`` (then the output is one too, with
            the same ``batch_sizes`` and indices).
        lengths: ``(B,)`` valid steps per sequence, each in ``[0, T]``, any
            order: a tensor of any integer dtype on any device, a NumPy array, or
            a list/tuple of ints (NumPy integers too); an int for unbatched
            input. ``None``: every sequence is T long. Length 0 is allowed: zero
            output, ``h_n = h0``.
        hx: ``h_0`` of shape ``(num_layers * D, B, H)``, or ``(h_0, c_0)`` for
            an LSTM; zeros if None.

    As in nn.*, the state may come second: ``m(x, h0)``, ``lstm(x, (h0, c0))``,
    ``m(packed, hx)``. The second argument is taken as hx when it is a float
    tensor of 2 or more dims or a tuple of tensors, or when input is a
    PackedSequence; lengths are 1-D integers.

    Returns ``(output, h_n)``, or ``(output, (h_n, c_n))`` for an LSTM. output is
    ``(T, B, D*H)`` (``(B, T, D*H)`` if batch_first), exactly zero past each
    length; ``h_n``/``c_n`` are ``(num_layers * D, B, H)``, each sequence's state
    at its own last valid step (for the reverse direction: after step 0).
    Padded input positions are never read and get gradient exactly 0.
"""

_DROPOUT_WARNING = ("dropout option adds dropout after all but last recurrent layer, so non-zero "
                    "dropout expects num_layers greater than 1, but got dropout={} and num_layers={}")


def _is_state(value) -> bool:
    """Whether a second positional argument is a recurrent state rather than lengths:
    a float tensor of 2+ dims, or a tuple/list of tensors (not 0-d integers)."""
    if isinstance(value, Tensor):
        return (value.is_floating_point() or value.is_complex()) and value.dim() >= 2
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, Tensor) for v in value):
        return not all(v.dim() == 0 and not v.is_floating_point() for v in value)
    return False


def _lengths_and_hx(input, lengths, hx):
    """Sorts the arguments after input into (lengths, hx), as nn.* users write them."""
    if lengths is None:
        return None, hx
    packed = isinstance(input, PackedSequence)
    if _is_state(lengths):
        if hx is not None:
            raise ValueError(
                "hx is given twice: the second argument is a state (a float Tensor or a tuple of "
                "Tensors, taken as hx) and hx= is given too; pass lengths second or by keyword")
        return None, lengths
    if packed:
        raise ValueError("lengths must be None when input is a PackedSequence (the lengths come "
                         "from its batch_sizes); after a PackedSequence, the second argument is hx")
    return lengths, hx


class MaskedRNN(nn.Module):
    __doc__ = r"""Multi-layer Elman RNN (tanh or ReLU), or LSTM/GRU with ``cell=``, over a
    padded batch of variable-length sequences.

    A drop-in for ``torch.nn.RNN``: the same positional and keyword arguments in the
    same order, the same parameter names, shapes and initialisation (state dicts
    load both ways). ``module(x, lengths)`` returns what
    ``pad_packed_sequence(nn_module(pack_padded_sequence(x, lengths, enforce_sorted=False)))``
    returns, values and gradients, without packing or sorting. :class:`MaskedLSTM`
    and :class:`MaskedGRU` are the drop-ins for ``nn.LSTM`` and ``nn.GRU``.

    Args:
        input_size: features I of the input.
        hidden_size: features H of the hidden state.
        num_layers: stacked layers (default 1).
        nonlinearity: ``"tanh"`` or ``"relu"``, as in nn.RNN; None (the default)
            means ``"tanh"``, or whatever ``cell`` says.
        bias: whether the layers have ``bias_ih``/``bias_hh`` (default True).
        batch_first: input and output ``(B, T, *)`` instead of ``(T, B, *)``
            (default False); the states stay ``(num_layers * D, B, H)``.
        dropout: dropout on the outputs of every layer but the last, in training.
        bidirectional: a reverse direction per layer, starting at each
            sequence's own last valid step.
        device, dtype: of the parameters.
        cell: keyword only: ``"rnn_tanh"``, ``"rnn_relu"``, ``"lstm"`` or
            ``"gru"`` (default: the Elman cell of ``nonlinearity``). A
            ``nonlinearity`` that contradicts ``cell`` is an error.
        proj_size: keyword only, LSTM only: as nn.LSTM's ``proj_size``.
""" + _FORWARD_DOC

    _cell: Optional[str] = None  # fixed by MaskedLSTM and MaskedGRU

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: Optional[str] = None,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        cell: Optional[str] = None,
        proj_size: int = 0,
    ):
        """Arguments as nn.RNN's, plus ``cell`` and ``proj_size`` by keyword: see the class docstring."""
        super().__init__()
        if nonlinearity is not None and nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        if cell is None:
            cell = "rnn_" + (nonlinearity or "tanh")
        elif cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        elif nonlinearity is not None and cell != "rnn_" + nonlinearity:
            raise ValueError(
                f"nonlinearity={nonlinearity!r} contradicts cell={cell!r}"
                + (": nonlinearity is for the Elman RNN only" if not cell.startswith("rnn_")
                   else f"; use cell='rnn_{nonlinearity}' or leave one of them out"))
        if proj_size and cell != "lstm":
            raise ValueError(f"proj_size is only supported for an LSTM, got cell={cell!r}")
        self._build(input_size, hidden_size, cell, num_layers, bias, batch_first, dropout,
                    bidirectional, proj_size, device, dtype)

    def _build(self, input_size, hidden_size, cell, num_layers, bias, batch_first, dropout,
               bidirectional, proj_size, device, dtype) -> None:
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("bias", bias), ("batch_first", batch_first),
                            ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1) or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(_DROPOUT_WARNING.format(dropout, num_layers), stacklevel=3)
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(f"proj_size must be an int >= 0, got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size}, got {proj_size}")
        self.cell = cell
        self.mode = {v: k for k, v in _TORCH_MODES.items()}[cell]
        if cell.startswith("rnn_"):
            self.nonlinearity = cell[4:]
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        gate_size = NUM_GATES[cell] * hidden_size
        state_size = proj_size or hidden_size
        num_directions = 2 if bidirectional else 1
        self._flat_weights_names: List[str] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else state_size * num_directions
            for direction in range(num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, state_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
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
        per = self._per_direction
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[k:k + per]] for k in range(0, len(names), per)]

    @property
    def _per_direction(self) -> int:
        return (4 if self.bias else 2) + (1 if self.proj_size else 0)

    def flatten_parameters(self) -> None:
        """No-op, for code written for nn.*: the kernels use the parameters as they are."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self._cell is None:
            if self.cell == "rnn_relu":
                s += ", nonlinearity='relu'"
            elif not self.cell.startswith("rnn_"):
                s += f", cell={self.cell!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        return s

    # ------------------------------------------------------------ conversion
    @classmethod
    def from_torch(cls, module: nn.RNNBase) -> "MaskedRNN":
        """A MaskedRNN with the configuration and a copy of the weights of an
        ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``."""
        if not isinstance(module, nn.RNNBase) or module.mode not in _TORCH_MODES:
            raise TypeError(f"module must be an nn.LSTM, nn.GRU or nn.RNN, got {type(module).__name__}")
        cell = _TORCH_MODES[module.mode]
        if cls._cell is not None and cell != cls._cell:
            raise ValueError(f"{cls.__name__} has cell {cls._cell!r}, got cell={cell!r} "
                             f"(from an nn.{type(module).__name__})")
        p = next(module.parameters())
        kw = dict(num_layers=module.num_layers, bias=module.bias, batch_first=module.batch_first,
                  dropout=module.dropout, bidirectional=module.bidirectional, device=p.device,
                  dtype=p.dtype)
        if cls._cell is None:
            kw["cell"] = cell
        if getattr(module, "proj_size", 0):
            kw["proj_size"] = module.proj_size
        with warnings.catch_warnings():  # nn.* already warned about dropout with one layer
            warnings.filterwarnings("ignore", message="dropout option adds dropout")
            new = cls(module.input_size, module.hidden_size, **kw)
        new.load_state_dict(module.state_dict())
        return new.train(module.training)

    def to_torch(self) -> nn.RNNBase:
        """The equivalent ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with a copy of the weights."""
        p = next(self.parameters())
        kw = dict(num_layers=self.num_layers, bias=self.bias, batch_first=self.batch_first,
                  dropout=self.dropout, bidirectional=self.bidirectional, device=p.device,
                  dtype=p.dtype)
        if self.cell == "lstm":
            m = nn.LSTM(self.input_size, self.hidden_size, proj_size=self.proj_size, **kw)
        elif self.cell == "gru":
            m = nn.GRU(self.input_size, self.hidden_size, **kw)
        else:
            m = nn.RNN(self.input_size, self.hidden_size, nonlinearity=self.cell[4:], **kw)
        m.load_state_dict(self.state_dict())
        return m.train(self.training)

    # --------------------------------------------------------------- forward
    def forward(self, input, lengths=None, hx=None):
        """``(output, h_n)``, or ``(output, (h_n, c_n))`` for an LSTM; ``hx`` is ``h_0`` or
        ``(h_0, c_0)``, each ``(num_layers * D, B, H)``. ``m(x, lengths)``, ``m(x, lengths, hx)``,
        ``m(x, hx)`` and ``m(packed, hx)`` all work; see the class docstring."""
        return self._forward(input, lengths, hx, layer=rnn_layer, both=rnn_bidirectional_layer)

    def _forward(self, input, lengths, hx, layer, both=None):
        lengths, hx = _lengths_and_hx(input, lengths, hx)
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, layer, both)
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
        layout = "" if unbatched else layout_hint("input", input.shape, self.batch_first, "I")
        output, h_n, c_n = self._run(x, lengths, hx, layer, unbatched, layout, both)
        if unbatched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, ((h_n, c_n) if self.cell == "lstm" else h_n)

    def _forward_packed(self, packed: PackedSequence, hx, layer, both=None):
        padded, lens = pad_packed_sequence(packed)  # (T, B, I), original batch order
        output, h_n, c_n = self._run(padded, lens, hx, layer, unbatched=False, both=both)
        order = packed.sorted_indices
        if order is not None:
            output, lens = output.index_select(1, order), lens.index_select(0, order.cpu())
        data = pack_padded_sequence(output, lens, enforce_sorted=True).data
        out = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        return out, ((h_n, c_n) if self.cell == "lstm" else h_n)

    def _run(self, x: Tensor, lengths, hx, layer, unbatched: bool, layout: str = "", both=None):
        """x: (T, B, I). Returns output (T, B, D*H), h_n, c_n (L*D, B, H).
        layer runs one direction of a layer (ops.rnn_layer's contract); both, if
        given, both directions of a bidirectional layer (ops.rnn_bidirectional_layer's)."""
        T, B, I = x.shape
        if I != self.input_size:
            raise ValueError(f"input.size(-1) must be equal to input_size={self.input_size}, got {I}")
        p = self.weight_ih_l0
        autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
        if x.dtype != p.dtype and not autocast:
            raise TypeError(f"input must have the parameters' dtype {p.dtype}, got {x.dtype}")
        if x.device != p.device:
            raise ValueError(f"input must be on the parameters' device {p.device}, got {x.device}")
        lengths = check_lengths(lengths, T, B, x.device, unbatched=unbatched, layout=layout,
                                keep_host=True)
        h0, c0 = self._check_hx(hx, x, unbatched, autocast)
        D = 2 if self.bidirectional else 1
        per = self._per_direction
        names = self._flat_weights_names
        h_n, c_n = [], []
        for lay in range(self.num_layers):
            if D == 2 and both is not None:
                k = 2 * lay
                w = [getattr(self, n) for n in names[k * per:(k + 2) * per]]
                x, h, c = both(x, lengths, h0[k:k + 2], c0[k:k + 2] if c0 is not None else None,
                               w, self.bias, self.cell)
                h_n.extend(h.unbind(0))
                c_n.extend(c.unbind(0) if c is not None else (None, None))
                if self.dropout > 0 and self.training and lay < self.num_layers - 1:
                    x = F.dropout(x, self.dropout, training=True)
                continue
            outs = []
            for d in range(D):
                k = lay * D + d
                w = [getattr(self, n) for n in names[k * per:(k + 1) * per]]
                w_hr = w.pop() if self.proj_size else None
                w_ih, w_hh, b_ih, b_hh = (w + [None, None])[:4]
                extra = () if w_hr is None else (w_hr,)
                out, h, c = layer(x, lengths, h0[k], c0[k] if c0 is not None else None,
                                  w_ih, w_hh, b_ih, b_hh, self.cell, d == 1, *extra)
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
        h_size = self.proj_size or self.hidden_size
        h_shape = (LD, h_size) if unbatched else (LD, B, h_size)
        lstm = self.cell == "lstm"
        if hx is None:
            zeros = x.new_zeros(LD, B, self.hidden_size)
            return x.new_zeros(LD, B, h_size), (zeros if lstm else None)
        if lstm:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("hx for an LSTM must be a tuple (h_0, c_0)")
            states = [("hx[0] (h_0)", hx[0]), ("hx[1] (c_0)", hx[1])]
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"hx must be a Tensor for cell {self.cell!r}, got {type(hx).__name__}")
            states = [("hx", hx)]
        out = []
        for k, (name, s) in enumerate(states):
            if not isinstance(s, Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(s).__name__}")
            want = h_shape if k == 0 else shape
            if tuple(s.shape) != want:
                size = "proj_size" if (k == 0 and self.proj_size) else "hidden_size"
                raise ValueError(f"{name} must have shape {want} (num_layers * num_directions, "
                                 f"{'' if unbatched else 'B, '}{size}), got {tuple(s.shape)}")
            if s.dtype != x.dtype and not (autocast and s.is_floating_point()):
                raise TypeError(f"{name} must have the input's dtype {x.dtype}, got {s.dtype}")
            if s.device != x.device:
                raise ValueError(f"{name} must be on the input's device {x.device}, got {s.device}")
            out.append(s.unsqueeze(1) if unbatched else s)
        return out[0], (out[1] if lstm else None)


class MaskedLSTM(MaskedRNN):
    __doc__ = r"""Multi-layer LSTM over a padded batch of variable-length sequences: a drop-in
    for ``torch.nn.LSTM`` that also takes ``lengths``.

    The same positional and keyword arguments as ``nn.LSTM``, in the same order,
    and the same parameter names, shapes and initialisation (state dicts load both
    ways). ``module(x, lengths)`` returns what ``nn.LSTM`` returns on
    ``pack_padded_sequence(x, lengths, enforce_sorted=False)``, padded back,
    values and gradients, without packing or sorting.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
        bidirectional, device, dtype: as in nn.LSTM (see :class:`MaskedRNN`).
        proj_size: as in nn.LSTM: ``h = W_hr (o * tanh(c))`` with P = proj_size
            features (h_0, h_n and the output have P; c has hidden_size).
            Parameters ``weight_hr_l{k}``.
""" + _FORWARD_DOC

    _cell = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ):
        """Arguments as nn.LSTM's: see the class docstring."""
        nn.Module.__init__(self)
        self._build(input_size, hidden_size, "lstm", num_layers, bias, batch_first, dropout,
                    bidirectional, proj_size, device, dtype)

    def forward(self, input, lengths=None, hx=None):
        """``(output, (h_n, c_n))``; ``hx`` is ``(h_0, c_0)``, each ``(num_layers * D, B, H)``.
        ``lstm(x, lengths)``, ``lstm(x, lengths, (h0, c0))``, ``lstm(x, (h0, c0))`` and
        ``lstm(packed, (h0, c0))`` all work; see the class docstring."""
        return self._forward(input, lengths, hx, layer=rnn_layer, both=rnn_bidirectional_layer)


class MaskedGRU(MaskedRNN):
    __doc__ = r"""Multi-layer GRU over a padded batch of variable-length sequences: a drop-in
    for ``torch.nn.GRU`` that also takes ``lengths``.

    The same positional and keyword arguments as ``nn.GRU``, in the same order,
    and the same parameter names, shapes and initialisation (state dicts load both
    ways). ``module(x, lengths)`` returns what ``nn.GRU`` returns on
    ``pack_padded_sequence(x, lengths, enforce_sorted=False)``, padded back,
    values and gradients, without packing or sorting.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
        bidirectional, device, dtype: as in nn.GRU (see :class:`MaskedRNN`).
""" + _FORWARD_DOC

    _cell = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ):
        """Arguments as nn.GRU's: see the class docstring."""
        nn.Module.__init__(self)
        self._build(input_size, hidden_size, "gru", num_layers, bias, batch_first, dropout,
                    bidirectional, 0, device, dtype)

    def forward(self, input, lengths=None, hx=None):
        """``(output, h_n)``; ``hx`` is ``h_0``, ``(num_layers * D, B, H)``. ``gru(x, lengths)``,
        ``gru(x, lengths, h0)``, ``gru(x, h0)`` and ``gru(packed, h0)`` all work; see the
        class docstring."""
        return self._forward(input, lengths, hx, layer=rnn_layer, both=rnn_bidirectional_layer)
