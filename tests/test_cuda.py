"""CUDA-only checks (skipped without a GPU). Values and gradients against cuDNN's
packed path run in test_rnn.py, parametrized over devices."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CELLS, requires_cuda, run_packed, sample_inputs
from varlen_kernels import MaskedRNN, masked_cross_entropy, ops

pytestmark = requires_cuda


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_cuda(cell):
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 2, 3
    G = ops.NUM_GATES[cell]
    dd = dict(dtype=torch.float64, device="cuda", requires_grad=True)
    lengths = torch.tensor([4, 0, 2], device="cuda")
    args = [torch.randn(T, B, I, **dd), torch.randn(B, H, **dd),
            torch.randn(B, H, **dd) if cell == "lstm" else None,
            torch.randn(G * H, I, **dd), torch.randn(G * H, H, **dd), torch.randn(G * H, **dd),
            torch.randn(G * H, **dd)]
    for reverse in (False, True):
        def f(x, h0, c0, *w):
            out, h, c = ops.rnn_layer(x, lengths, h0, c0, *w, cell, reverse)
            return (out, h) if c is None else (out, h, c)
        assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cuda(cell, requires_grad):
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 2, 3
    G = ops.NUM_GATES[cell]
    dd = dict(dtype=torch.float64, device="cuda", requires_grad=requires_grad)
    args = [torch.randn(T, B, I, **dd), torch.tensor([4, 0, 2], device="cuda"),
            torch.randn(B, H, **dd), torch.randn(B, H, **dd) if cell == "lstm" else None,
            torch.randn(G * H, I, **dd), torch.randn(G * H, H, **dd), torch.randn(G * H, **dd),
            torch.randn(G * H, **dd), cell, True]
    torch.library.opcheck(torch.ops.varlen_kernels.rnn_forward.default, args)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_vs_cudnn(cell, dtype):
    """Error against a float64 oracle within ~2x that of cuDNN's packed path in
    the same precision."""
    ref, x, lengths, hx = sample_inputs(cell, T=32, B=16, I=32, H=64, device="cuda",
                                        requires_grad=False, with_zero=False)
    x = torch.nan_to_num(x, nan=0.0)
    m64 = MaskedRNN.from_torch(ref)
    y64, _ = m64(x, lengths, hx)
    low = lambda t: t.to(dtype)  # noqa: E731
    hx_low = tuple(map(low, hx)) if cell == "lstm" else low(hx)
    y_ours, _ = MaskedRNN.from_torch(ref).to(dtype)(low(x), lengths, hx_low)
    y_cudnn, _, _ = run_packed(ref.to(dtype), low(x), lengths, hx_low, False)
    err = (y_ours.double() - y64).abs().max()
    err_cudnn = (y_cudnn.double() - y64).abs().max()
    assert err <= 2 * err_cudnn + 1e-3, (err.item(), err_cudnn.item())


def test_cuda_graph_capture_fwd_bwd():
    ref, x, lengths, hx = sample_inputs("lstm", num_layers=2, bidirectional=True, device="cuda",
                                        dtype=torch.float32, requires_grad=False)
    m = MaskedRNN.from_torch(ref)
    static_x = torch.nan_to_num(x, nan=0.0).requires_grad_()
    static_len = lengths.cuda()

    def step():
        y, (h, c) = m(static_x, static_len)
        (y.square().sum() + h.sum()).backward()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    for p in [static_x, *m.parameters()]:
        p.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    eager = MaskedRNN.from_torch(ref)
    x2 = static_x.detach().clone().requires_grad_()
    y, (h, c) = eager(x2, static_len)
    (y.square().sum() + h.sum()).backward()
    for p in [static_x, *m.parameters()]:
        p.grad.zero_()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_x.grad, x2.grad)
    for a, b in zip(m.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_lengths_out_of_range_on_device_fails_loudly():
    code = ("import torch, varlen_kernels as vk\n"
            "m = vk.MaskedGRU(2, 3).cuda()\n"
            "m(torch.randn(4, 2, 2, device='cuda'), torch.tensor([1, 9], device='cuda'))\n"
            "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out = r.stdout + r.stderr  # the device-side assert message may go to either
    assert r.returncode != 0 and "lengths must be in [0, T]" in out, out[-2000:]


@pytest.mark.parametrize("C", [2, 257, 32000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cross_entropy_cuda_matches_torch(C, dtype):
    torch.manual_seed(C)
    B, T = 4, 6
    lengths = torch.tensor([6, 0, 3, 1], device="cuda")
    valid = torch.arange(T, device="cuda")[None] < lengths[:, None]
    logits = (torch.randn(B, T, C, device="cuda", dtype=torch.float64) * 3)
    target = torch.randint(0, C, (B, T), device="cuda")
    exact = F.cross_entropy(logits[valid], target[valid], label_smoothing=0.1)
    x = logits.to(dtype)
    x[~valid] = float("nan")
    target[~valid] = -3
    x.requires_grad_()
    out = masked_cross_entropy(x, target, lengths, label_smoothing=0.1)
    xv = x.detach()[valid].clone().requires_grad_()
    theirs = F.cross_entropy(xv, target[valid], label_smoothing=0.1)
    if dtype == torch.float64:
        torch.testing.assert_close(out, theirs, rtol=1e-10, atol=1e-12)
    else:
        assert (out.double() - exact).abs() <= 2 * (theirs.double() - exact).abs() + 1e-4
    g, = torch.autograd.grad(out, [x])
    g_ref, = torch.autograd.grad(theirs, [xv])
    assert (g[~valid] == 0).all()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(g[valid].double(), g_ref.double(), **tol)


def test_cross_entropy_cuda_opcheck_and_all_padding():
    x = torch.randn(6, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,), device="cuda")
    m = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device="cuda")
    torch.library.opcheck(torch.ops.varlen_kernels.cross_entropy_forward.default, (x, t, m, 0.1))
    out = masked_cross_entropy(x.view(2, 3, 5), t.view(2, 3), torch.zeros(2, dtype=torch.long, device="cuda"))
    assert out.item() == 0.0 and (torch.autograd.grad(out, [x])[0] == 0).all()


@pytest.mark.parametrize("kind", ["mse", "bce_with_logits"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_elementwise_losses_cuda_match_cpu(kind, reduction):
    from varlen_kernels import masked_bce_with_logits, masked_mse
    fn = masked_mse if kind == "mse" else masked_bce_with_logits
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    target = torch.rand(3, 7, 5, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 0, 3])
    pred[1] = float("nan")
    outs = []
    for device in ("cpu", "cuda"):
        p = pred.to(device).requires_grad_()
        out = fn(p, target.to(device), lengths)
        grad, = torch.autograd.grad(out.sum(), [p])
        outs.append((out.cpu(), grad.cpu()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-10, atol=1e-12)
    torch.library.opcheck(torch.ops.varlen_kernels.elementwise_loss_forward.default,
                          (pred[0].cuda().requires_grad_(), target[0].cuda(),
                           torch.ones(7, dtype=torch.bool, device="cuda"), None, kind, reduction == "mean"))
