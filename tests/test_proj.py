"""LSTM with projections (nn.LSTM's proj_size) against nn.LSTM + pack_padded_sequence:
values and every gradient in float64, NaN in padding; the op's gradcheck and opcheck.
On every backend (the device fixture: CPU kernels, the CUDA kernels' code emulated, cuda)."""
import itertools

import pytest
import torch
from torch import nn

from conftest import gradcheck, run_packed, sample_lengths
from varlen_kernels import MaskedLSTM, MaskedRNN, masked_rnn_reference, ops
from varlen_kernels.reference import rnn_layer_reference

F64 = dict(rtol=1e-9, atol=1e-11)


def proj_inputs(num_layers, bidirectional, batch_first, T=7, B=5, I=4, H=6, P=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional,
                  proj_size=P, dtype=torch.float64, device=device)
    lengths = sample_lengths(T, B, g)
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    x[torch.arange(T)[:, None] >= lengths[None, :]] = float("nan")
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    LD = num_layers * (2 if bidirectional else 1)
    h0 = torch.randn(LD, B, P, generator=g, dtype=torch.float64).to(device).requires_grad_()
    c0 = torch.randn(LD, B, H, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return ref, x.to(device).requires_grad_(), lengths, (h0, c0)


@pytest.mark.parametrize("num_layers,bidirectional,batch_first",
                         list(itertools.product([1, 2], [False, True], [False, True])))
def test_proj_matches_packed(num_layers, bidirectional, batch_first, device):
    ref, x, lengths, hx = proj_inputs(num_layers, bidirectional, batch_first, seed=num_layers, device=device)
    m = MaskedLSTM.from_torch(ref)
    assert m.proj_size == 3 and [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    y, (h, c) = m(x, lengths, hx)
    g = torch.Generator().manual_seed(9)
    gy, gh, gc = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(device) for t in (y, h, c))
    loss = (y * gy).sum() + (h * gh).sum() + (c * gc).sum()
    grads = torch.autograd.grad(loss, [x, *hx, *m.parameters()])

    x2 = x.detach().clone().requires_grad_()
    hx2 = tuple(s.detach().clone().requires_grad_() for s in hx)
    y2, (h2, c2), keep = run_packed(ref, x2, lengths, hx2, batch_first)
    bdim = 0 if batch_first else 1
    keep = keep.to(device)
    loss2 = (y2 * gy.index_select(bdim, keep)).sum() + (h2 * gh[:, keep]).sum() + (c2 * gc[:, keep]).sum()
    grads2 = torch.autograd.grad(loss2, [x2, *hx2, *ref.parameters()])

    torch.testing.assert_close(y.index_select(bdim, keep), y2, **F64)
    torch.testing.assert_close(h[:, keep], h2, **F64)
    torch.testing.assert_close(c[:, keep], c2, **F64)
    zero = torch.nonzero(lengths == 0).flatten().to(device)
    assert torch.equal(h[:, zero], hx[0].detach()[:, zero]) and (y.index_select(bdim, zero) == 0).all()
    pad = torch.arange(x.shape[1 if batch_first else 0])[:, None] >= lengths[None, :]
    pad = (pad.t() if batch_first else pad).to(device)
    assert (y[pad] == 0).all() and (grads[0][pad] == 0).all()
    torch.testing.assert_close(grads[0], grads2[0], **F64)
    for k, (a, b, gs) in enumerate(zip(grads[1:3], grads2[1:3], (gh, gc))):
        expected = b.clone()
        expected[:, zero] = gs[:, zero]  # empty sequences: h_n = h0, c_n = c0
        torch.testing.assert_close(a, expected, **F64)
    for (name, _), a, b in zip(m.named_parameters(), grads[3:], grads2[3:]):
        torch.testing.assert_close(a, b, **F64, msg=lambda s: f"{name}: {s}")


def test_proj_reference_and_unbatched(device):
    ref, x, lengths, hx = proj_inputs(2, True, False, device=device)
    m = MaskedLSTM.from_torch(ref)
    y, (h, c) = m(x, lengths, hx)
    y_r, (h_r, c_r) = masked_rnn_reference(m, x, lengths, hx)
    for a, b in ((y, y_r), (h, h_r), (c, c_r)):
        torch.testing.assert_close(a, b, **F64)
    u = torch.nan_to_num(x.detach()[:, 0])
    yu, (hu, cu) = m(u)
    yu2, (hu2, cu2) = ref(u)
    for a, b in ((yu, yu2), (hu, hu2), (cu, cu2)):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.cpu_only
def test_proj_constructor_state_dict_and_conversion():
    m = MaskedLSTM(5, 7, 2, True, False, 0.0, True, 3)  # nn.LSTM's positional order
    ref = nn.LSTM(5, 7, 2, True, False, 0.0, True, 3)
    assert [(n, p.shape) for n, p in m.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    m.load_state_dict(ref.state_dict())
    ref.load_state_dict(m.state_dict())
    back = m.to_torch()
    assert type(back) is nn.LSTM and back.proj_size == 3
    assert MaskedRNN(5, 7, cell="lstm", proj_size=3).proj_size == 3
    assert "proj_size=3" in repr(m)
    with pytest.raises(ValueError, match="proj_size must be smaller than hidden_size=7, got 7"):
        MaskedLSTM(5, 7, proj_size=7)
    with pytest.raises(ValueError, match=r"hx\[0\] \(h_0\) must have shape \(1, 2, 3\).*proj_size"):
        MaskedLSTM(5, 7, proj_size=3)(torch.randn(4, 2, 5), [4, 1], (torch.zeros(1, 2, 7), torch.zeros(1, 2, 7)))


def _op_args(requires_grad, device="cpu"):
    torch.manual_seed(0)
    T, B, I, H, P = 4, 3, 2, 3, 2
    dd = dict(dtype=torch.float64, requires_grad=requires_grad, device=device)
    return [torch.randn(T, B, I, **dd), torch.tensor([4, 0, 2], device=device), torch.randn(B, P, **dd),
            torch.randn(B, H, **dd), torch.randn(4 * H, I, **dd), torch.randn(4 * H, P, **dd),
            torch.randn(4 * H, **dd), torch.randn(4 * H, **dd)], torch.randn(P, H, **dd)


@pytest.mark.parametrize("reverse", [False, True])
def test_proj_op_gradcheck_opcheck_and_reference(reverse, device):
    args, w_hr = _op_args(True, device)

    def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return ops.rnn_layer(x, args[1], h0, c0, w_ih, w_hh, b_ih, b_hh, "lstm", reverse, w_hr)

    inputs = (args[0], *args[2:], w_hr)
    assert gradcheck(f, inputs)
    out = f(*inputs)
    ref = rnn_layer_reference(*args, "lstm", reverse, w_hr)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **F64)
    op = torch.ops.varlen_kernels.rnn_forward.default
    torch.library.opcheck(op, (*args, "lstm", reverse, w_hr))
    det = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    o, h, c, gates, states = op(*det, "lstm", reverse, w_hr.detach())
    torch.library.opcheck(torch.ops.varlen_kernels.rnn_backward.default,
                          (torch.randn_like(o), torch.randn_like(h), torch.randn_like(c), det[0], det[1],
                           det[4], det[5], gates, states, "lstm", reverse, w_hr.detach()))


@pytest.mark.parametrize("P", [0, 3])
def test_proj_op_needs_proj_size_below_hidden_size(P, device):
    """The op checks 1 <= P < H (nn.LSTM's proj_size < hidden_size) before any
    kernel runs: P = 0 has no features, P = H (3 here) is not a projection."""
    args, _ = _op_args(False, device)
    dd = dict(dtype=torch.float64, device=device)
    args[2], args[5] = torch.randn(3, P, **dd), torch.randn(12, P, **dd)  # h0 (B, P), w_hh (4H, P)
    with pytest.raises(RuntimeError, match=r"w_hr \(P, H\) must have 1 <= P < H \(nn.LSTM's "
                                           rf"proj_size < hidden_size\), got shape \[{P}, 3\]"):
        torch.ops.varlen_kernels.rnn_forward(*args, "lstm", False, torch.randn(P, 3, **dd))
