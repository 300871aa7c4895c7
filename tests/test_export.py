"""Deployment: torch.export with dynamic batch and time dims, export save/load and
AOTInductor, for a model holding each module and each loss, on the CPU."""
import pytest
import torch
from torch import nn
from torch.export import Dim

from varlen_kernels import (MaskedGRU, MaskedLSTM, MaskedRNN, masked_bce_with_logits,
                            masked_cross_entropy, masked_mse)

pytestmark = pytest.mark.cpu_only

C = 5


class Model(nn.Module):
    """Every module and every loss: returns the three losses and the outputs."""

    def __init__(self, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        kw = dict(batch_first=batch_first, dtype=torch.float64)
        self.lstm = MaskedLSTM(3, 4, 2, bidirectional=True, **kw)
        self.gru = MaskedGRU(8, 4, **kw)
        self.rnn = MaskedRNN(4, 4, nonlinearity="relu", **kw)
        self.tanh = MaskedRNN(4, 3, **kw)
        self.proj = MaskedLSTM(3, 5, proj_size=3, **kw)
        self.head = nn.Linear(3, C, dtype=torch.float64)
        self.register_buffer("weight", torch.linspace(0.5, 1.5, C, dtype=torch.float64))

    def forward(self, x, lengths, target):
        y, (h, c) = self.lstm(x, lengths)
        y, h = self.gru(y, lengths)
        y, _ = self.rnn(y, lengths, h)
        y, _ = self.tanh(y, lengths)
        y, _ = self.proj(y, lengths)
        logits = self.head(y)
        bf = self.batch_first
        ce = masked_cross_entropy(logits, target, lengths, weight=self.weight, label_smoothing=0.1,
                                  batch_first=bf)
        mse = masked_mse(y, torch.zeros_like(y), lengths, batch_first=bf)
        bce = masked_bce_with_logits(logits, torch.sigmoid(logits.detach()), lengths, batch_first=bf)
        return ce, mse, bce, logits


def inputs(T, B, batch_first=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[-1] = 0
    shape = (B, T) if batch_first else (T, B)
    x = torch.randn(*shape, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, C, shape, generator=g)
    valid = torch.arange(T)[:, None] < lengths[None, :]
    if batch_first:
        valid = valid.t()
    x[~valid] = float("nan")  # padding is never read, exported or not
    target[~valid] = -1
    return x, lengths, target


def export(model, batch_first=False):
    T, B = Dim("T", min=2, max=64), Dim("B", min=2, max=64)
    seq = {0: B, 1: T} if batch_first else {0: T, 1: B}
    return torch.export.export(model, inputs(6, 3, batch_first),
                               dynamic_shapes=(seq, {0: B}, seq))


def check_same(outs, expected):
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_first", [False, True])
def test_export_dynamic_batch_and_time(batch_first, tmp_path):
    torch.manual_seed(0)
    model = Model(batch_first).eval()
    ep = export(model, batch_first)
    path = tmp_path / "model.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path).module()
    for T, B, seed in ((6, 3, 0), (11, 7, 1), (2, 2, 2)):  # other batch and time sizes than traced
        args = inputs(T, B, batch_first, seed)
        expected = model(*args)
        check_same(ep.module()(*args), expected)
        check_same(loaded(*args), expected)


def test_aot_inductor_package(tmp_path):
    """AOTInductor: a compiled .pt2 package, loaded and run without Python model code."""
    torch.manual_seed(0)
    model = Model().eval()
    path = torch._inductor.aoti_compile_and_package(export(model), package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for T, B, seed in ((6, 3, 0), (9, 5, 1)):
        args = inputs(T, B, seed=seed)
        check_same(runner(*args), model(*args))


def test_to_torch_is_the_escape_hatch():
    """Tools that need stock modules take to_torch()'s nn.LSTM / nn.GRU / nn.RNN, with the
    same weights: on a packed batch it gives MaskedRNN's values."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4])
    for m in (MaskedLSTM(3, 4, 2, bidirectional=True), MaskedGRU(3, 4), MaskedRNN(3, 4, nonlinearity="relu")):
        m = m.double()
        ref = m.to_torch()
        assert type(ref) in (nn.LSTM, nn.GRU, nn.RNN)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, _ = nn.utils.rnn.pad_packed_sequence(ref(packed)[0], total_length=5)
        torch.testing.assert_close(y, m(x, lengths)[0], rtol=1e-10, atol=1e-12)
