"""Gradients of gradients (create_graph=True): the recurrent layers, the losses
and the fused linear cross entropy against what PyTorch's own modules and
functions give for the same second-order objective, float64, NaN in padding;
gradgradcheck; and the first-order gradients unchanged by create_graph."""
import pytest
import torch
import torch.nn.functional as F

from conftest import (CELLS, SANITIZER_PASS, gradgradcheck, layer_args, run_packed, sample_inputs,
                      states_of)
from varlen_kernels import (MaskedRNN, masked_bce_with_logits, masked_cross_entropy,
                            masked_linear_cross_entropy, masked_mse)
from varlen_kernels import _double_backward

TOL = dict(rtol=1e-9, atol=1e-11)

# The CUDA code these tests run on the emulated backends is the forward ops',
# which the sanitizer pass runs through the other tests; what is new here is
# PyTorch ops. So that pass leaves them out.
pytestmark = pytest.mark.skipif(SANITIZER_PASS, reason="runs no CUDA code of its own: the "
                                "forward ops' kernels run in the sanitizer pass's other tests")


def second_order(fn, inputs, seed=0):
    """fn(*inputs) -> outputs; a random weighted sum of them; its gradients
    (create_graph=True); then the gradients of a random weighted sum of those
    plus their squares. Returns (first-order gradients, second-order ones)."""
    g = torch.Generator().manual_seed(seed)
    outs = fn(*inputs)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum()
               for o in outs)
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    obj = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype).to(d.device)).sum()
              + d.pow(2).sum() for d in first)
    second = torch.autograd.grad(obj, inputs)
    return [d.detach() for d in first], second


def fresh(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_matches_packed(cell, bidirectional, device):
    """Two layers; every input and parameter; against nn.* + pack_padded_sequence,
    which differentiates its own backward (PyTorch's CPU RNNs are built of
    differentiable ops)."""
    ref, x, lengths, hx = sample_inputs(cell, T=5, B=4, I=3, H=3, num_layers=2,
                                        bidirectional=bidirectional, with_zero=False, device=device)
    ref = ref.cpu()
    m = MaskedRNN.from_torch(ref).to(device)
    h0s = states_of(cell, hx)

    def ours(x, *rest):
        h0 = rest[:len(h0s)]
        y, h = m(x, lengths.to(device), tuple(h0) if cell == "lstm" else h0[0])
        return [y, *states_of(cell, h)]

    def packed(x, *rest):
        h0 = rest[:len(h0s)]
        y, hs, _ = run_packed(ref, x, lengths, tuple(h0) if cell == "lstm" else h0[0], False)
        return [y, *hs]

    first, second = second_order(ours, fresh([x, *h0s]) + list(m.parameters()))
    first2, second2 = second_order(packed, fresh([x.cpu(), *(h.cpu() for h in h0s)])
                                   + list(ref.parameters()))
    for a, b in zip(first + list(second), first2 + list(second2)):
        torch.testing.assert_close(a.cpu(), b, **TOL)


def test_rnn_projection_matches_packed(device):
    ref, x, lengths, hx = sample_inputs("lstm", T=5, B=4, I=3, H=4, proj_size=2,
                                        bidirectional=True, with_zero=False, device=device)
    ref = ref.cpu()
    m = MaskedRNN.from_torch(ref).to(device)
    first, second = second_order(
        lambda x, h, c, *_: [m(x, lengths.to(device), (h, c))[0]], fresh([x, *hx]) + list(m.parameters()))
    first2, second2 = second_order(
        lambda x, h, c, *_: [run_packed(ref, x, lengths, (h, c), False)[0]],
        fresh([x.cpu(), *(h.cpu() for h in hx)]) + list(ref.parameters()))
    for a, b in zip(first + list(second), first2 + list(second2)):
        torch.testing.assert_close(a.cpu(), b, **TOL)


@pytest.mark.parametrize("cell", CELLS)
def test_rnn_first_order_unchanged_by_create_graph(cell, device):
    """The gradients with create_graph=True (through the reference) equal the
    kernels' (without it), including sequences of length 0, whose h_n is h0."""
    _, x, lengths, hx = sample_inputs(cell, T=5, B=4, I=3, H=3, bidirectional=True, device=device)
    m = MaskedRNN(3, 3, cell=cell, bidirectional=True, dtype=torch.float64).to(device)
    inputs = [x, *states_of(cell, hx), *m.parameters()]

    def grads(create_graph):
        y, h = m(x, lengths.to(device), hx)
        loss = (y.nan_to_num() * y.nan_to_num()).sum() + sum(s.sum() for s in states_of(cell, h))
        return torch.autograd.grad(loss, inputs, create_graph=create_graph)

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_gradgradcheck(cell, device):
    """One layer op, lengths with 0, 1 and T: second derivatives against finite
    differences of the first."""
    from varlen_kernels.ops import rnn_layer
    x, lengths, h0, c0, *w = layer_args(cell, device, False, T=3, H=2, lengths=(3, 0, 1))
    inputs = [t.requires_grad_() for t in [x, h0, *w]]

    def f(x, h0, w_ih, w_hh, b_ih, b_hh):
        out, h_n, c_n = rnn_layer(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, True)
        return (out, h_n) + ((c_n,) if c_n is not None else ())

    assert gradgradcheck(f, inputs)


# ---------------------------------------------------------------------- losses
T, B, C = 4, 3, 5


def loss_case(device, trailing=(C,), seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([4, 0, 2])
    mask = torch.arange(T)[:, None] < lengths[None]
    x = torch.randn(T, B, *trailing, generator=g, dtype=torch.float64)
    x[~mask] = float("nan")
    return x.to(device), lengths.to(device), mask.to(device), g


def padded_zero(x, mask):
    return torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - 2)), x, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_pytorch(reduction, label_smoothing, weighted, device):
    """masked_cross_entropy (class weights, label smoothing, ignore_index)
    against F.cross_entropy on the tokens that count; NaN in padding."""
    x, lengths, mask, g = loss_case(device)
    target = torch.randint(0, C, (T, B), generator=g).to(device)
    target[0, 0] = 2  # ignored
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device) if weighted else None
    counts = mask & (target != 2)
    scale = torch.arange(1.0, T * B + 1, dtype=torch.float64, device=device).view(T, B)

    def ours(x):
        loss = masked_cross_entropy(x, target, lengths, reduction=reduction,
                                    label_smoothing=label_smoothing, weight=weight, ignore_index=2)
        return [loss * scale if reduction == "none" else loss]

    def idiom(x):
        per = F.cross_entropy(padded_zero(x, mask).reshape(-1, C),
                              torch.where(counts, target, 0).reshape(-1), weight=weight,
                              reduction="none", label_smoothing=label_smoothing).view(T, B)
        per = torch.where(counts, per, 0)
        if reduction == "none":
            return [per * scale]
        if reduction == "sum":
            return [per.sum()]
        den = weight[torch.where(counts, target, 0)] if weighted else torch.ones_like(per)
        return [per.sum() / torch.where(counts, den, 0).sum()]

    first, second = second_order(ours, fresh([x]))
    first2, second2 = second_order(idiom, fresh([x]))
    for a, b in zip(first + list(second), first2 + list(second2)):
        assert (a[~mask] == 0).all()
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", ["mse", "bce", "bce_pos_weight"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_elementwise_losses_match_pytorch(kind, reduction, device):
    """masked_mse and masked_bce_with_logits: second derivatives w.r.t. the
    prediction and the target, mixed ones included."""
    x, lengths, mask, g = loss_case(device)
    y = torch.rand(T, B, C, generator=g, dtype=torch.float64).to(device)
    y[~mask] = float("nan")
    pos_weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device)
    pw = pos_weight if kind == "bce_pos_weight" else None
    scale = torch.arange(1.0, T * B * C + 1, dtype=torch.float64, device=device).view(T, B, C)

    def reduce(per):
        if reduction == "none":
            return [per * scale]
        return [per.sum() / (mask.sum() * C) if reduction == "mean" else per.sum()]

    def ours(x, y):
        if kind == "mse":
            loss = masked_mse(x, y, lengths, reduction=reduction)
        else:
            loss = masked_bce_with_logits(x, y, lengths, reduction=reduction, pos_weight=pw)
        return [loss * scale] if reduction == "none" else [loss]

    def idiom(x, y):
        xs, ys = padded_zero(x, mask), padded_zero(y, mask)
        per = (xs - ys) ** 2 if kind == "mse" else F.binary_cross_entropy_with_logits(
            xs, ys, reduction="none", pos_weight=pw)
        return reduce(padded_zero(per, mask))

    first, second = second_order(ours, fresh([x, y]))
    first2, second2 = second_order(idiom, fresh([x, y]))
    for a, b in zip(first + list(second), first2 + list(second2)):
        assert (a[~mask] == 0).all()
        torch.testing.assert_close(a, b, **TOL)


def test_losses_gradgradcheck(device):
    x, lengths, mask, g = loss_case(device)
    x = padded_zero(x, mask).requires_grad_()  # finite everywhere: finite differences
    target = torch.randint(0, C, (T, B), generator=g).to(device)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(device)
    y = torch.rand(T, B, C, generator=g, dtype=torch.float64).to(device).requires_grad_()
    assert gradgradcheck(
        lambda x: masked_cross_entropy(x, target, lengths, weight=weight, label_smoothing=0.2), [x])
    assert gradgradcheck(
        lambda x, y: masked_bce_with_logits(x, y, lengths, reduction="sum",
                                            pos_weight=weight), [x, y])
    assert gradgradcheck(lambda x, y: masked_mse(x, y, lengths), [x, y])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_matches_pytorch(reduction, device):
    """masked_linear_cross_entropy against F.linear + F.cross_entropy: hidden,
    weight and bias."""
    H, V = 3, 6
    hidden, lengths, mask, g = loss_case(device, trailing=(H,))
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(device)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(device)
    target = torch.randint(0, V, (T, B), generator=g).to(device)
    scale = torch.arange(1.0, T * B + 1, dtype=torch.float64, device=device).view(T, B)

    def ours(h, w, b):
        loss = masked_linear_cross_entropy(h, w, target, lengths, bias=b, reduction=reduction,
                                           label_smoothing=0.1)
        return [loss * scale if reduction == "none" else loss]

    def idiom(h, w, b):
        per = F.cross_entropy(F.linear(padded_zero(h, mask), w, b).view(-1, V), target.view(-1),
                              reduction="none", label_smoothing=0.1).view(T, B)
        per = torch.where(mask, per, 0)
        if reduction == "none":
            return [per * scale]
        return [per.sum() / mask.sum() if reduction == "mean" else per.sum()]

    first, second = second_order(ours, fresh([hidden, weight, bias]))
    first2, second2 = second_order(idiom, fresh([hidden, weight, bias]))
    for a, b in zip(first + list(second), first2 + list(second2)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.cpu_only
def test_first_order_backward_never_takes_the_reference(monkeypatch):
    """Plain backward, eager and compiled (AOTAutograd traces the backward
    without create_graph), runs the kernels' backward ops, never the paths that
    differentiate again."""
    def refuse(*args, **kw):
        raise AssertionError("a first-order backward took the double-backward path")
    for name in ("rnn_layer_grads", "rnn_bidirectional_grads", "linear_cross_entropy_grads"):
        monkeypatch.setattr(_double_backward, name, refuse)
    m = MaskedRNN(3, 4, cell="lstm", bidirectional=True, num_layers=2, dtype=torch.float64)
    head = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    target = torch.randint(0, 5, (6, 3))

    def step(x):
        y, _ = m(x, lengths)
        return masked_linear_cross_entropy(y, head, target, lengths)

    step(x).backward()
    torch.compile(step, backend="aot_eager", fullgraph=True)(x).backward()


def test_tied_and_shared_inputs_count_once(device):
    """Inputs that depend on each other or are one tensor twice, and hooks: the
    gradients with create_graph=True equal the kernels' (first order) and the
    reference module's (second order, varlen_kernels.reference, PyTorch ops)."""
    from varlen_kernels.ops import rnn_layer
    from varlen_kernels.reference import masked_rnn_reference
    dd = dict(dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, generator=g, dtype=torch.float64).to(device)
    lengths = torch.tensor([5, 3], device=device)
    m = MaskedRNN(3, 3, cell="gru", bidirectional=True, **dd)
    m.weight_hh_l0_reverse = m.weight_hh_l0  # the directions' recurrent weights tied
    m.bias_ih_l0.register_hook(lambda grad: 2 * grad)
    w = [m.weight_hh_l0, m.bias_ih_l0]

    def run(module_call):
        y, _ = module_call()
        first = torch.autograd.grad((y ** 2).sum(), w, create_graph=True)
        return [d.detach() for d in first], torch.autograd.grad(sum(d.pow(2).sum() for d in first), w)

    plain = torch.autograd.grad((m(x, lengths)[0] ** 2).sum(), w)
    first, second = run(lambda: m(x, lengths))
    first_ref, second_ref = run(lambda: masked_rnn_reference(m, x, lengths))
    for a, b, c in zip(first, plain, first_ref):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(a, c, **TOL)
    for a, b in zip(second, second_ref):
        torch.testing.assert_close(a, b, **TOL)
    # h0 and c0 one tensor
    s = torch.randn(2, 4, **dd, requires_grad=True)
    w_ih, w_hh = torch.randn(16, 3, **dd), torch.randn(16, 4, **dd)
    grads = [torch.autograd.grad((rnn_layer(x, lengths, s, s, w_ih, w_hh, None, None, "lstm",
                                            False)[0] ** 2).sum(), [s], create_graph=cg)[0]
             for cg in (False, True)]
    torch.testing.assert_close(grads[1], grads[0], **TOL)


def test_linear_cross_entropy_tied_to_the_embedding(device):
    """The output layer's weight is the embedding whose rows are the hidden
    states: first and second order as F.linear + F.cross_entropy's."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 3, generator=g, dtype=torch.float64).to(device)
    tokens = torch.randint(0, 7, (4, 2), generator=g).to(device)
    target = torch.randint(0, 7, (4, 2), generator=g).to(device)
    lengths = torch.tensor([4, 2], device=device)
    mask = torch.arange(4, device=device)[:, None] < lengths[None]

    def ours(e):
        return [masked_linear_cross_entropy(torch.tanh(e[tokens]), e, target, lengths)]

    def idiom(e):
        per = F.cross_entropy(F.linear(torch.tanh(e[tokens]), e).view(-1, 7), target.view(-1),
                              reduction="none").view(4, 2)
        return [torch.where(mask, per, 0).sum() / mask.sum()]

    first, second = second_order(ours, fresh([emb]))
    first2, second2 = second_order(idiom, fresh([emb]))
    for a, b in zip(first + list(second), first2 + list(second2)):
        torch.testing.assert_close(a, b, **TOL)
