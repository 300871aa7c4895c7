"""rnn_bidirectional_forward / rnn_bidirectional_backward: both directions of a
layer in one op, against two rnn_forward calls (values and gradients),
gradcheck, opcheck and bad input, on every backend; the CPU's concurrent and
sequential runs of the two directions agree."""
import pytest
import torch

from conftest import CELLS, gradcheck
import varlen_kernels.rnn
from varlen_kernels import MaskedRNN, ops

T, B, I, H, P = 5, 4, 3, 4, 2
LENGTHS = [5, 0, 2, 3]


def _samples(cell, requires_grad, device, has_biases=True, proj=False, seed=0):
    """(x, lengths, h0, c0, weights) of a bidirectional layer, float64."""
    g = torch.Generator().manual_seed(seed)
    dd = dict(dtype=torch.float64)
    G = ops.NUM_GATES[cell]
    S = P if proj else H

    def rnd(*shape):
        return torch.randn(*shape, generator=g, **dd).to(device).requires_grad_(requires_grad)

    x = rnd(T, B, I)
    lengths = torch.tensor(LENGTHS, device=device)
    h0 = rnd(2, B, S)
    c0 = rnd(2, B, H) if cell == "lstm" else None
    weights = []
    for _ in range(2):
        weights += [rnd(G * H, I), rnd(G * H, S)]
        if has_biases:
            weights += [rnd(G * H), rnd(G * H)]
        if proj:
            weights.append(rnd(P, H))
    return x, lengths, h0, c0, weights


def _two_calls(x, lengths, h0, c0, weights, has_biases, cell):
    """The same layer as two rnn_layer calls."""
    per = len(weights) // 2
    outs, hs, cs = [], [], []
    for d in range(2):
        w = weights[d * per:(d + 1) * per]
        w_hr = w.pop() if per in (3, 5) else None
        w_ih, w_hh, b_ih, b_hh = (w + [None, None])[:4]
        extra = () if w_hr is None else (w_hr,)
        out, h, c = ops.rnn_layer(x, lengths, h0[d], c0[d] if c0 is not None else None, w_ih,
                                  w_hh, b_ih, b_hh, cell, d == 1, *extra)
        outs.append(out)
        hs.append(h)
        cs.append(c)
    return torch.cat(outs, 2), torch.stack(hs), (torch.stack(cs) if cell == "lstm" else None)


CONFIGS = [(cell, True, False) for cell in CELLS] + [("gru", False, False), ("lstm", True, True),
                                                     ("lstm", False, True)]


@pytest.mark.parametrize("cell,has_biases,proj", CONFIGS)
def test_matches_two_directions(cell, has_biases, proj, device):
    """Values and every gradient equal those of two one-direction calls, NaN in
    the padding of the input included."""
    x, lengths, h0, c0, weights = _samples(cell, True, device, has_biases, proj)
    with torch.no_grad():
        x[2:, 2] = float("nan")  # padding of the sequence of length 2
    inputs = [x, h0] + ([c0] if c0 is not None else []) + weights
    results = []
    for run in (ops.rnn_bidirectional_layer, _two_calls):
        out, h, c = run(x, lengths, h0, c0, weights, has_biases, cell)
        g = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum()
                   for t in (out, h, c) if t is not None)
        results.append([out, h] + ([c] if c is not None else [])
                       + list(torch.autograd.grad(loss, inputs)))
    assert torch.isfinite(results[0][0]).all()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell, device):
    x, lengths, h0, c0, weights = _samples(cell, True, device)

    def f(x, h0, c0, *weights):
        out, h, c = ops.rnn_bidirectional_layer(x, lengths, h0, c0, list(weights), True, cell)
        return (out, h) if c is None else (out, h, c)

    assert gradcheck(f, (x, h0, c0, *weights))


def test_gradcheck_projection(device):
    x, lengths, h0, c0, weights = _samples("lstm", True, device, proj=True)

    def f(x, h0, c0, *weights):
        return ops.rnn_bidirectional_layer(x, lengths, h0, c0, list(weights), True, "lstm")

    assert gradcheck(f, (x, h0, c0, *weights))


@pytest.mark.parametrize("cell,has_biases,proj", CONFIGS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(cell, has_biases, proj, requires_grad, device):
    x, lengths, h0, c0, weights = _samples(cell, requires_grad, device, has_biases, proj)
    args = [x, lengths, h0, c0, weights, has_biases, cell]
    torch.library.opcheck(torch.ops.varlen_kernels.rnn_bidirectional_forward.default, args)
    if not requires_grad:
        out, h_n, c_n, *workspaces = torch.ops.varlen_kernels.rnn_bidirectional_forward(*args)
        torch.library.opcheck(
            torch.ops.varlen_kernels.rnn_bidirectional_backward.default,
            [torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, lengths,
             weights, has_biases, workspaces, cell])


def test_bad_input(device):
    x, lengths, h0, c0, weights = _samples("lstm", False, device)
    op = torch.ops.varlen_kernels.rnn_bidirectional_forward
    with pytest.raises(RuntimeError, match=r"weights must hold both directions' w_ih, w_hh, "
                                           r"b_ih, b_hh \(and w_hr with a projection\): 8 or 10 "
                                           r"tensors with has_biases=True and cell 'lstm', got 7"):
        op(x, lengths, h0, c0, weights[:7], True, "lstm")
    with pytest.raises(RuntimeError, match=r"weights must hold .* 4 tensors with "
                                           r"has_biases=False and cell 'gru', got 8"):
        gx, glen, gh0, _, gw = _samples("gru", False, device)
        op(gx, glen, gh0, None, gw, False, "gru")
    with pytest.raises(RuntimeError, match=r"h0 must be 3-D with one entry per direction "
                                           r"\(2, B, \*\), got shape \[4, 4\]"):
        op(x, lengths, h0[0], c0, weights, True, "lstm")
    with pytest.raises(RuntimeError, match=r"c0 must be 3-D with one entry per direction"):
        op(x, lengths, h0, c0[:1], weights, True, "lstm")
    with pytest.raises(RuntimeError, match=r"w_hh must have shape"):
        op(x, lengths, h0, c0, weights[:5] + [weights[5][:, :3]] + weights[6:], True, "lstm")
    with pytest.raises(RuntimeError, match=r"lengths must be 1-D with one entry per sequence"):
        op(x, lengths[:3], h0, c0, weights, True, "lstm")
    out, h_n, c_n, *workspaces = op(x, lengths, h0, c0, weights, True, "lstm")
    back = torch.ops.varlen_kernels.rnn_bidirectional_backward
    with pytest.raises(RuntimeError, match=r"grad_output must be \(T, B, 2P\) with P = 4, "
                                           r"got shape \[5, 4, 4\]"):
        back(out[..., :4], h_n, c_n, x, lengths, weights, True, workspaces, "lstm")
    with pytest.raises(RuntimeError, match=r"workspaces must be the unchanged \[gates, states\] "
                                           r"of both directions from rnn_bidirectional_forward "
                                           r"\(4 tensors\), got 2"):
        back(out, h_n, c_n, x, lengths, weights, True, workspaces[:2], "lstm")
    with pytest.raises(RuntimeError, match=r"states must have shape"):
        back(out, h_n, c_n, x, lengths, weights, True, workspaces[2:] + workspaces[:1]
             + [workspaces[1][:1]], "lstm")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_module_takes_the_bidirectional_op(cell, monkeypatch):
    """A bidirectional MaskedRNN runs each layer as one rnn_bidirectional_layer."""
    calls = []

    def counting(*args):
        calls.append(args[-1])
        return ops.rnn_bidirectional_layer(*args)

    monkeypatch.setattr(varlen_kernels.rnn, "rnn_bidirectional_layer", counting)
    m = MaskedRNN(3, 4, num_layers=2, bidirectional=True, cell=cell).double()
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    m(x, torch.tensor(LENGTHS))
    assert calls == [cell, cell]


@pytest.mark.parametrize("cell,has_biases,proj", [("lstm", True, False), ("gru", True, False),
                                                  ("lstm", True, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_concurrent_and_sequential_directions_agree(cell, has_biases, proj, dtype):
    """The CPU runs the directions on a thread each with 2 threads, one after the
    other with 1: the same results."""
    x, lengths, h0, c0, weights = _samples(cell, True, "cpu", has_biases, proj)
    x, h0 = x.detach().to(dtype).requires_grad_(), h0.detach().to(dtype).requires_grad_()
    c0 = c0.detach().to(dtype).requires_grad_() if c0 is not None else None
    weights = [w.detach().to(dtype).requires_grad_() for w in weights]
    inputs = [x, h0] + ([c0] if c0 is not None else []) + weights
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, h, c = ops.rnn_bidirectional_layer(x, lengths, h0, c0, weights, has_biases, cell)
            loss = out.sum() + h.sum() + (c.sum() if c is not None else 0)
            results.append([out, h] + list(torch.autograd.grad(loss, inputs)))
    finally:
        torch.set_num_threads(threads)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)
