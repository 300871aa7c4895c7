"""Calls written for nn.LSTM / nn.GRU / nn.RNN and F.cross_entropy work unchanged:
argument forms, lengths forms, constructors, one layout default, the
cross-entropy arguments F.cross_entropy users pass. Values and gradients in
float64 against the nn.* / F.* call they replace, padding holding NaN."""
import inspect
import pydoc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import CELLS, gradcheck, run_packed, sample_inputs, states_of
from varlen_kernels import (MaskedGRU, MaskedLSTM, MaskedRNN, masked_bce_with_logits,
                            masked_cross_entropy, masked_mse, tbptt_chunks)

F64 = dict(rtol=1e-9, atol=1e-11)


def grads_of(outputs, inputs, seed=0):
    """Gradients of a random linear function of outputs (a list of tensors)."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)


def assert_same(ours, theirs, inputs_ours, inputs_theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **F64)
    for a, b in zip(grads_of(ours, inputs_ours), grads_of(theirs, inputs_theirs)):
        torch.testing.assert_close(a, b, **F64)


# ------------------------------------------------------------ forward forms
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_packed_input_with_state_second(cell, device):
    """lstm(packed, (h0, c0)) / gru(packed, h0), the usual decoder call."""
    ref, x, lengths, hx = sample_inputs(cell, num_layers=2, bidirectional=True, with_zero=False)
    x = torch.nan_to_num(x.detach(), nan=0.0).requires_grad_()
    m = MaskedRNN.from_torch(ref)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    y, h = m(packed, hx)
    y2, h2 = ref(packed, hx)
    assert isinstance(y, nn.utils.rnn.PackedSequence)
    params = [x, *states_of(cell, hx), *m.parameters()]
    params2 = [x, *states_of(cell, hx), *ref.parameters()]
    assert_same([y.data, *states_of(cell, h)], [y2.data, *states_of(cell, h2)], params, params2)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_padded_input_with_state_second(cell, batch_first, device):
    """gru(x, h0) / lstm(x, (h0, c0)) on a full padded batch, as nn.* is called; and
    gru(x, lengths, h0), keywords, against nn.* on the packed batch (NaN in padding)."""
    ref, x, lengths, hx = sample_inputs(cell, num_layers=2, batch_first=batch_first, with_zero=False)
    m = MaskedRNN.from_torch(ref)
    full = torch.nan_to_num(x.detach(), nan=0.5).requires_grad_()
    y, h = m(full, hx)
    y2, h2 = ref(full, hx)
    params = [full, *states_of(cell, hx), *m.parameters()]
    params2 = [full, *states_of(cell, hx), *ref.parameters()]
    assert_same([y, *states_of(cell, h)], [y2, *states_of(cell, h2)], params, params2)

    y2, hs2, _ = run_packed(ref, x, lengths, hx, batch_first)
    for out, hn in (m(x, lengths, hx), m(x, lengths, hx=hx), m(x, hx=hx, lengths=lengths),
                    m(x, lengths=lengths.numpy(), hx=hx)):
        torch.testing.assert_close(out, y2, **F64)
        for a, b in zip(states_of(cell, hn), hs2):
            torch.testing.assert_close(a, b, **F64)
    out, hn = m(x, lengths, hx)
    ga = torch.autograd.grad(out.sum() + states_of(cell, hn)[0].sum(), [x, *m.parameters()])
    x2 = x.detach().requires_grad_()
    y3, hs3, _ = run_packed(ref, x2, lengths, hx, batch_first)
    gb = torch.autograd.grad(y3.sum() + hs3[0].sum(), [x2, *ref.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **F64)
    pad = torch.arange(x.shape[1 if batch_first else 0])[:, None] >= lengths[None, :]
    assert (ga[0][pad.t() if batch_first else pad] == 0).all()


def test_state_second_bad_combinations():
    gru = MaskedGRU(3, 4).double()
    lstm = MaskedLSTM(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    h0 = torch.zeros(1, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="hx is given twice"):
        gru(x, h0, h0)
    with pytest.raises(ValueError, match="hx is given twice"):
        lstm(x, (h0, h0), hx=(h0, h0))
    with pytest.raises(TypeError, match=r"hx for an LSTM must be a tuple \(h_0, c_0\)"):
        lstm(x, h0)
    with pytest.raises(TypeError, match="lengths must have an integer dtype, got torch.float64"):
        gru(x, torch.tensor([5.0, 2.0], dtype=torch.float64))  # 1-D: lengths, not a state
    packed = pack_padded_sequence(x, [5, 2])
    with pytest.raises(ValueError, match="lengths must be None when input is a PackedSequence.*hx"):
        gru(packed, [5, 2])


# ------------------------------------------------------------ lengths forms
LENGTH_FORMS = {
    "list": lambda l: l.tolist(),
    "tuple": lambda l: tuple(l.tolist()),
    "numpy int64": lambda l: l.numpy(),
    "numpy int32": lambda l: l.numpy().astype(np.int32),
    "numpy uint8": lambda l: l.numpy().astype(np.uint8),
    "list of numpy ints": lambda l: [np.int64(v) for v in l.tolist()],
    "list of numpy int16": lambda l: list(l.numpy().astype(np.int16)),
    "tensor int8": lambda l: l.to(torch.int8),
    "tensor uint8": lambda l: l.to(torch.uint8),
    "tensor int16": lambda l: l.to(torch.int16),
    "tensor int32": lambda l: l.to(torch.int32),
    "non-contiguous": lambda l: torch.stack([l, l], 1)[:, 0],
}


@pytest.mark.parametrize("form", list(LENGTH_FORMS))
def test_lengths_forms(form):
    ref, x, lengths, hx = sample_inputs("gru", with_zero=True)
    m = MaskedRNN.from_torch(ref)
    y1, h1 = m(x, lengths, hx)
    y2, h2 = m(x, LENGTH_FORMS[form](lengths), hx)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    logits = torch.randn(x.shape[0], x.shape[1], 4, dtype=torch.float64)
    target = torch.randint(0, 4, logits.shape[:2])
    assert torch.equal(masked_cross_entropy(logits, target, lengths),
                       masked_cross_entropy(logits, target, LENGTH_FORMS[form](lengths)))
    chunks = list(tbptt_chunks(x, LENGTH_FORMS[form](lengths), 3))
    assert [c.lengths.tolist() for c in chunks] == [c.lengths.tolist() for c in tbptt_chunks(x, lengths, 3)]


@pytest.mark.parametrize("form", [3, np.int64(3), np.int32(3), torch.tensor(3), [3], np.array([3])])
def test_unbatched_lengths_int(form):
    torch.manual_seed(0)
    m = MaskedLSTM(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    x[3:] = float("nan")
    y, (h, c) = m(x, form)
    y2, (h2, c2) = m.to_torch()(x[:3])
    torch.testing.assert_close(y[:3], y2, **F64)
    assert (y[3:] == 0).all()
    torch.testing.assert_close(h, h2, **F64)
    torch.testing.assert_close(c, c2, **F64)


def test_bad_lengths_forms():
    m = MaskedGRU(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="a single int is for unbatched input only"):
        m(x, 3)
    with pytest.raises(TypeError, match="lengths must have an integer dtype, got NumPy float64"):
        m(x, np.array([3.0, 2.0]))
    with pytest.raises(TypeError, match="lengths must hold ints"):
        m(x, [3, True])
    with pytest.raises(TypeError, match="lengths must hold ints"):
        m(x, [np.float32(3), 2])
    with pytest.raises(ValueError, match=r"lengths\[1\] = 9"):
        m(x, np.array([3, 9]))


# ------------------------------------------------------------- constructors
def _params(cls):
    return [p for p in inspect.signature(cls).parameters]


def test_signatures_follow_nn():
    assert _params(MaskedLSTM) == ["input_size", "hidden_size", "num_layers", "bias", "batch_first",
                                   "dropout", "bidirectional", "proj_size", "device", "dtype"]
    assert _params(MaskedGRU) == ["input_size", "hidden_size", "num_layers", "bias", "batch_first",
                                  "dropout", "bidirectional", "device", "dtype"]
    assert _params(MaskedRNN)[:10] == ["input_size", "hidden_size", "num_layers", "nonlinearity", "bias",
                                       "batch_first", "dropout", "bidirectional", "device", "dtype"]
    kw_only = [n for n, p in inspect.signature(MaskedRNN).parameters.items() if p.kind == p.KEYWORD_ONLY]
    assert kw_only == ["cell", "proj_size"]
    for cls in (MaskedRNN, MaskedLSTM, MaskedGRU):
        text = pydoc.render_doc(cls, renderer=pydoc.plaintext)  # what help(cls) shows
        assert f"{cls.__name__}(input_size: int, hidden_size: int, num_layers: int = 1" in text
        assert "lengths" in text and "drop-in" in text and "Initialize internal Module state" not in text
        kinds = [p.kind for p in inspect.signature(cls).parameters.values()]
        assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
        assert "hx" in (cls.forward.__doc__ or "")
        params = inspect.signature(cls.forward).parameters
        assert list(params) == ["self", "input", "lengths", "hx"]


@pytest.mark.parametrize("cls,nn_cls,extra", [
    (MaskedLSTM, nn.LSTM, ()), (MaskedGRU, nn.GRU, ()), (MaskedRNN, nn.RNN, ("relu",)),
])
def test_positional_arguments_as_nn(cls, nn_cls, extra):
    """Every positional argument lands where nn.* puts it: (I, H, num_layers[,
    nonlinearity], bias, batch_first, dropout, bidirectional)."""
    args = (5, 7, 2, *extra, False, True, 0.25, True)
    m, ref = cls(*args, dtype=torch.float64), nn_cls(*args, dtype=torch.float64)
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"):
        assert getattr(m, name) == getattr(ref, name), name
    assert m.mode == ref.mode
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    m.eval(), ref.eval()
    # values and gradients against nn.* on the packed batch, NaN in padding
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([4, 1, 3])
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)  # batch_first
    x[torch.arange(4)[None, :] >= lengths[:, None]] = float("nan")
    x.requires_grad_()
    hx = torch.zeros(4, 3, 7, dtype=torch.float64)
    hx = (hx, hx) if cls is MaskedLSTM else hx
    y, h = m(x, lengths)
    y2, hs2, _ = run_packed(ref, x, lengths, hx, True)
    torch.testing.assert_close(y, y2, **F64)
    for a, b in zip(states_of(m.cell, h), hs2):
        torch.testing.assert_close(a, b, **F64)
    ga = torch.autograd.grad(y.sum(), [x, *m.parameters()])
    gb = torch.autograd.grad(y2.sum(), [x, *ref.parameters()])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, **F64)


def test_masked_rnn_is_elman():
    """MaskedRNN(I, H) is nn.RNN(I, H): tanh; nonlinearity="relu" as nn.RNN; LSTM/GRU by cell=."""
    for kwargs, cell in (({}, "rnn_tanh"), ({"nonlinearity": "tanh"}, "rnn_tanh"),
                         ({"nonlinearity": "relu"}, "rnn_relu"), ({"cell": "lstm"}, "lstm"),
                         ({"cell": "gru"}, "gru"), ({"cell": "rnn_relu", "nonlinearity": "relu"}, "rnn_relu")):
        assert MaskedRNN(3, 4, **kwargs).cell == cell
    torch.manual_seed(0)
    ref = nn.RNN(3, 4, dtype=torch.float64)
    m = MaskedRNN(3, 4, dtype=torch.float64)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], ref(x)[0], **F64)
    assert MaskedRNN(3, 4, nonlinearity="relu").nonlinearity == "relu"
    assert type(MaskedRNN(3, 4).to_torch()) is nn.RNN
    assert "nonlinearity='relu'" in repr(MaskedRNN(3, 4, nonlinearity="relu"))
    assert repr(MaskedLSTM(3, 4, 2)) == "MaskedLSTM(3, 4, num_layers=2)"


def test_constructor_bad_combinations():
    with pytest.raises(ValueError, match="nonlinearity='relu' contradicts cell='lstm'"):
        MaskedRNN(3, 4, nonlinearity="relu", cell="lstm")
    with pytest.raises(ValueError, match="nonlinearity='tanh' contradicts cell='rnn_relu'"):
        MaskedRNN(3, 4, 1, "tanh", cell="rnn_relu")
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu', got 'gelu'"):
        MaskedRNN(3, 4, nonlinearity="gelu")
    with pytest.raises(ValueError, match="proj_size is only supported for an LSTM"):
        MaskedRNN(3, 4, proj_size=2)
    with pytest.raises(TypeError, match="bias must be a bool, got 0.5"):
        MaskedLSTM(3, 4, 1, 0.5)
    with pytest.raises(TypeError, match="batch_first must be a bool"):
        MaskedGRU(3, 4, 1, True, "yes")
    with pytest.raises(TypeError):
        MaskedLSTM(3, 4, cell="gru")  # not an nn.LSTM argument


def test_dropout_with_one_layer_warns_as_nn():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1") as ours:
        MaskedLSTM(3, 4, dropout=0.5)
    with pytest.warns(UserWarning) as theirs:
        nn.LSTM(3, 4, dropout=0.5)
    assert str(ours[0].message) == str(theirs[0].message)
    assert ours[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedGRU(3, 4, 2, dropout=0.5)
        MaskedRNN(3, 4, dropout=0.0)


# ----------------------------------------------------------- loss layouts
def test_losses_default_time_major_like_the_modules(device):
    """A time-major MaskedRNN output with T == B goes into the losses as it is."""
    torch.manual_seed(0)
    T = B = 4
    m = MaskedGRU(3, 5).double()
    x = torch.randn(T, B, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 1, 0, 2])
    y, _ = m(x, lengths)                      # (T, B, 5), time-major as nn.GRU's
    target = torch.randint(0, 5, (T, B))
    valid = torch.arange(T)[:, None] < lengths[None, :]
    torch.testing.assert_close(masked_cross_entropy(y, target, lengths),
                               F.cross_entropy(y[valid], target[valid]), **F64)
    torch.testing.assert_close(masked_mse(y, y.detach() * 0.5, lengths),
                               F.mse_loss(y[valid], y.detach()[valid] * 0.5), **F64)
    torch.testing.assert_close(masked_bce_with_logits(y, torch.sigmoid(y.detach()), lengths),
                               F.binary_cross_entropy_with_logits(y[valid], torch.sigmoid(y.detach()[valid])),
                               **F64)
    # batch_first=True reads (B, T, ...)
    torch.testing.assert_close(masked_cross_entropy(y.transpose(0, 1), target.t(), lengths, batch_first=True),
                               masked_cross_entropy(y, target, lengths), **F64)
    # gradients, with NaN in the padding of the logits
    logits = torch.where(valid[..., None], y.detach(), float("nan")).requires_grad_()
    yt = torch.rand(T, B, 5, dtype=torch.float64)
    for ours, theirs in ((lambda z: masked_cross_entropy(z, target, lengths, label_smoothing=0.1),
                          lambda z: F.cross_entropy(z, target[valid], label_smoothing=0.1)),
                         (lambda z: masked_mse(z, yt, lengths), lambda z: F.mse_loss(z, yt[valid])),
                         (lambda z: masked_bce_with_logits(z, yt, lengths),
                          lambda z: F.binary_cross_entropy_with_logits(z, yt[valid]))):
        zv = logits.detach()[valid].requires_grad_()
        a, b = ours(logits), theirs(zv)
        torch.testing.assert_close(a, b, **F64)
        ga, = torch.autograd.grad(a, [logits])
        gb, = torch.autograd.grad(b, [zv])
        torch.testing.assert_close(ga[valid], gb, **F64)
        assert (ga[~valid] == 0).all()


@pytest.mark.parametrize("fn,args", [
    (masked_cross_entropy, (torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.long))),
    (masked_mse, (torch.randn(3, 5, 2), torch.randn(3, 5, 2))),
    (masked_bce_with_logits, (torch.randn(3, 5), torch.rand(3, 5))),
])
def test_lengths_count_error_names_layout(fn, args):
    with pytest.raises(ValueError, match=r"B=5\), got shape \(3,\); .* read as time-major \(T, B, .*\) since "
                                         r"batch_first=False .*pass batch_first=True"):
        fn(*args, [5, 1, 0])
    with pytest.raises(ValueError, match=r"B=3\), got shape \(5,\); .* read as batch-major .*"
                                         r"pass batch_first=False"):
        fn(*args, [3, 1, 0, 2, 2], batch_first=True)


def test_module_and_tbptt_lengths_count_error_names_layout():
    with pytest.raises(ValueError, match=r"input \(5, 2, 3\) is read as time-major.*batch_first=True"):
        MaskedGRU(3, 4)(torch.randn(5, 2, 3), [5, 2, 1, 1, 1])
    with pytest.raises(ValueError, match=r"input \(5, 2, 3\) is read as batch-major.*batch_first=False"):
        MaskedGRU(3, 4, batch_first=True)(torch.randn(5, 2, 3), [2, 2])
    with pytest.raises(ValueError, match=r"read as time-major.*batch_first=True"):
        list(tbptt_chunks(torch.randn(5, 2, 3), [5, 2, 1, 1, 1], 2))


# ------------------------------------------------------------ cross entropy
def ce_case(T=5, B=4, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 0, 2, 4][:B])
    valid = torch.arange(T)[:, None] < lengths[None, :]  # (T, B)
    logits = torch.randn(T, B, C, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, C, (T, B), generator=g)
    target[0, 0] = target[1, 3] = -100                   # ignored at valid steps
    logits[~valid] = float("nan")
    target[~valid] = -7
    weight = torch.rand(C, generator=g, dtype=torch.float64) + 0.2
    return logits.requires_grad_(), target, lengths, valid, weight


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("use_weight", [False, True])
def test_cross_entropy_weight_and_ignore_index(reduction, label_smoothing, use_weight, device):
    logits, target, lengths, valid, weight = ce_case(seed=int(label_smoothing * 100) + use_weight)
    w = weight if use_weight else None
    out = masked_cross_entropy(logits, target, lengths, weight=w, reduction=reduction,
                               label_smoothing=label_smoothing)
    xv = logits.detach()[valid].clone().requires_grad_()
    ref = F.cross_entropy(xv, target[valid], weight=w, reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        counted = valid & (target != -100)
        torch.testing.assert_close(out[valid], ref, **F64)
        assert (out[~counted] == 0).all()
        gw = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        g, = torch.autograd.grad((out * gw).sum(), [logits])
        g_ref, = torch.autograd.grad((ref * gw[valid]).sum(), [xv])
    else:
        torch.testing.assert_close(out, ref, **F64)
        g, = torch.autograd.grad(out, [logits])
        g_ref, = torch.autograd.grad(ref, [xv])
    torch.testing.assert_close(g[valid], g_ref, **F64)
    assert (g[~valid] == 0).all() and (g[0, 0] == 0).all()


@pytest.mark.parametrize("use_weight", [False, True])
def test_cross_entropy_all_ignored_is_zero(use_weight, device):
    logits, target, lengths, valid, weight = ce_case()
    target = torch.full_like(target, 3)
    for reduction in ("mean", "sum"):
        out = masked_cross_entropy(logits, target, lengths, ignore_index=3, label_smoothing=0.1,
                                   weight=weight if use_weight else None, reduction=reduction)
        assert out.item() == 0.0
        assert (torch.autograd.grad(out, [logits])[0] == 0).all()
    # ignore_index=None: -100 is then a target like any other, out of range
    _, target, *_ = ce_case()
    with pytest.raises(RuntimeError, match="class range"):
        masked_cross_entropy(logits, target, lengths, ignore_index=None)


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("use_weight", [False, True])
def test_cross_entropy_flat_logits(use_mask, use_weight, device):
    """(N, C) logits with an optional (N,) mask: the form most code already has."""
    logits, target, lengths, valid, weight = ce_case(seed=3)
    C = logits.shape[-1]
    flat = torch.nan_to_num(logits.detach(), nan=1.0).reshape(-1, C).requires_grad_()
    t = target.reshape(-1).clone()
    mask = valid.reshape(-1) if use_mask else None
    if not use_mask:
        t[t == -7] = 2
    w = weight if use_weight else None
    out = masked_cross_entropy(flat, t, mask=mask, weight=w, label_smoothing=0.1)
    rows = mask if use_mask else torch.ones_like(t, dtype=torch.bool)
    xv = flat.detach()[rows].clone().requires_grad_()
    ref = F.cross_entropy(xv, t[rows], weight=w, label_smoothing=0.1)
    torch.testing.assert_close(out, ref, **F64)
    g, = torch.autograd.grad(out, [flat])
    g_ref, = torch.autograd.grad(ref, [xv])
    torch.testing.assert_close(g[rows], g_ref, **F64)
    assert (g[~rows] == 0).all()
    none = masked_cross_entropy(flat, t, mask=mask, weight=w, reduction="none")
    assert none.shape == t.shape


def test_cross_entropy_weight_gradcheck_and_opcheck(device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,), generator=g)
    m = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    for ls in (0.0, 0.3):
        assert gradcheck(
            lambda x: masked_cross_entropy(x, t, mask=m, weight=w, label_smoothing=ls, reduction="none"), (x,))
        assert gradcheck(lambda x: masked_cross_entropy(x, t, mask=m, weight=w, label_smoothing=ls),
                                        (x,))
    op = torch.ops.varlen_kernels.cross_entropy_forward.default
    torch.library.opcheck(op, (x, t, m, 0.2, w))
    torch.library.opcheck(op, (x.detach(), t, m, 0.2, w))
    loss, lse = op(x.detach(), t, m, 0.2, w)
    torch.library.opcheck(torch.ops.varlen_kernels.cross_entropy_backward.default,
                          (torch.randn_like(loss), x.detach(), t, m, lse, 0.2, w))


def test_cross_entropy_low_precision_weight(device):
    logits, target, lengths, valid, weight = ce_case(C=40)
    exact = F.cross_entropy(logits.detach()[valid], target[valid], weight=weight, label_smoothing=0.1)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.detach().to(dtype)
        ours = masked_cross_entropy(x, target, lengths, weight=weight, label_smoothing=0.1).double()
        theirs = F.cross_entropy(x[valid], target[valid], weight=weight.to(dtype), label_smoothing=0.1).double()
        assert (ours - exact).abs() <= 2 * (theirs - exact).abs() + 1e-4


def test_cross_entropy_bad_arguments():
    logits, target, lengths, valid, weight = ce_case()
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(7,\), one per class, got \(6,\)"):
        masked_cross_entropy(logits, target, lengths, weight=weight[:6])
    with pytest.raises(TypeError, match="weight must be a floating point Tensor"):
        masked_cross_entropy(logits, target, lengths, weight=torch.ones(7, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="gradients w.r.t. weight are not implemented"):
        masked_cross_entropy(logits, target, lengths, weight=weight.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"lengths is for 3-D logits .* 2-D logits \(N, C\) take mask="):
        masked_cross_entropy(logits.reshape(-1, 7), target.reshape(-1), lengths)
    with pytest.raises(ValueError, match=r"mask must have shape \(20,\)"):
        masked_cross_entropy(logits.reshape(-1, 7), target.reshape(-1), mask=valid)
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        masked_cross_entropy(logits, target, lengths, ignore_index=1.5)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(C,\)"):
        torch.ops.varlen_kernels.cross_entropy_forward(logits.detach().reshape(-1, 7), target.reshape(-1),
                                                       valid.reshape(-1), 0.0, weight[:3])
