"""MaskedRNN and the rnn ops against nn.* + pack_padded_sequence, the reference
loop, gradcheck and opcheck."""
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from conftest import (CELLS, TOL, ShapesCreated, check_against_packed, gradcheck, layer_args,
                      make_torch_rnn, run_packed, sample_inputs, states_of)
from varlen_kernels import MaskedGRU, MaskedLSTM, MaskedRNN, masked_rnn_reference, ops
from varlen_kernels.reference import rnn_layer_reference

# Every test runs on each backend (conftest.py: cpu, the CUDA code emulated, cuda).
pytestmark = pytest.mark.usefixtures("device")
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first",
                         list(itertools.product([1, 2, 3], [False, True], [False, True])))
def test_matches_packed_float64(cell, num_layers, bidirectional, batch_first, device):
    check_against_packed(cell, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, device=device, seed=num_layers)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_packed_float32(cell, bidirectional, device):
    check_against_packed(cell, num_layers=2, bidirectional=bidirectional, dtype=torch.float32,
                         device=device, seed=3)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_packed_vector_width(cell, dtype):
    """H = 19: whole SIMD vectors plus a scalar tail in the CPU pointwise kernels."""
    check_against_packed(cell, num_layers=2, bidirectional=True, dtype=dtype, H=19, seed=7)


@pytest.mark.parametrize("cell", CELLS)
def test_matches_packed_no_bias(cell):
    check_against_packed(cell, num_layers=2, bidirectional=True, bias=False, seed=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cell=st.sampled_from(CELLS), T=st.integers(1, 9), B=st.integers(1, 6),
       num_layers=st.integers(1, 2), bidirectional=st.booleans(), batch_first=st.booleans(),
       seed=st.integers(0, 10_000))
def test_matches_packed_hypothesis(cell, T, B, num_layers, bidirectional, batch_first, seed):
    check_against_packed(cell, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, seed=seed, T=T, B=B)


@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_loop(cell):
    ref, x, lengths, hx = sample_inputs(cell, num_layers=2, bidirectional=True)
    m = MaskedRNN.from_torch(ref)
    y, h = m(x, lengths, hx)
    y_ref, h_ref = masked_rnn_reference(m, x, lengths, hx)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-11)
    for a, b in zip(states_of(cell, h), states_of(cell, h_ref)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    gy = torch.randn_like(y)
    g1 = torch.autograd.grad((y * gy).sum() + h_ref[0].sum() * 0, [x, *m.parameters()],
                             allow_unused=True)
    y_ref2, _ = masked_rnn_reference(m, x, lengths, hx)
    g2 = torch.autograd.grad((y_ref2 * gy).sum(), [x, *m.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", CELLS)
def test_lengths_none_is_plain_torch(cell):
    torch.manual_seed(0)
    ref = make_torch_rnn(cell, 3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    m = MaskedRNN.from_torch(ref)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y, h = m(x)
    y2, h2 = ref(x)
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-11)
    for a, b in zip(states_of(cell, h), states_of(cell, h2)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("cell", CELLS)
def test_unbatched_input(cell):
    torch.manual_seed(0)
    ref = make_torch_rnn(cell, 3, 4, dtype=torch.float64)
    m = MaskedRNN.from_torch(ref)
    x = torch.randn(5, 3, dtype=torch.float64)
    y, h = m(x)
    y2, h2 = ref(x)
    assert y.shape == y2.shape
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-11)
    for a, b in zip(states_of(cell, h), states_of(cell, h2)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    y3, _ = m(x, torch.tensor([3]))
    torch.testing.assert_close(y3[:3], y2[:3], rtol=1e-9, atol=1e-11)
    assert (y3[3:] == 0).all()


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_op(cell):
    torch.manual_seed(0)
    T, B, I, H = 4, 3, 2, 3
    G = ops.NUM_GATES[cell]
    dd = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(T, B, I, **dd)
    lengths = torch.tensor([4, 0, 2])
    h0 = torch.randn(B, H, **dd)
    c0 = torch.randn(B, H, **dd) if cell == "lstm" else None
    w = [torch.randn(G * H, I, **dd), torch.randn(G * H, H, **dd), torch.randn(G * H, **dd),
         torch.randn(G * H, **dd)]
    for reverse in (False, True):
        def f(x, h0, c0, *w):
            out, h, c = ops.rnn_layer(x, lengths, h0, c0, *w, cell, reverse)
            return (out, h) if c is None else (out, h, c)
        assert gradcheck(f, (x, h0, c0, *w))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_backward_gets_no_zero_gradients_for_workspaces(bidirectional, device):
    """The (T*B, *) workspaces are outputs of the forward op that nothing
    differentiates: autograd must not build zero gradients of their size for
    the backward (a fill of the largest tensors of the call), and the
    gradients are right without them."""
    T, B, H = 7, 5, 6
    ref, x, lengths, hx = sample_inputs("lstm", T=T, B=B, H=H, bidirectional=bidirectional,
                                        device=device, with_zero=False)
    m = MaskedRNN.from_torch(ref)
    y, _ = m(x, lengths.to(device), hx)
    with ShapesCreated() as created:
        g = torch.autograd.grad(y.sum(), [x, *hx, *m.parameters()])
    for width in (4 * H, 2 * H):  # gates, states
        assert (T * B, width) not in created.shapes
    ref_out, _, _ = run_packed(ref, x, lengths, hx, False)  # no length 0: every row kept
    want = torch.autograd.grad(ref_out.sum(), [x, *hx, *ref.parameters()])
    for a, b in zip(g, want):
        torch.testing.assert_close(torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-9,
                                   atol=1e-11)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_opcheck_forward(cell, requires_grad, reverse):
    args = layer_args(cell, "cpu", requires_grad) + [cell, reverse]
    torch.library.opcheck(torch.ops.varlen_kernels.rnn_forward.default, args)


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_backward(cell):
    args = layer_args(cell, "cpu", False)
    x, lengths, h0, c0, w_ih, w_hh = args[:6]
    out, h_n, c_n, gates, states = torch.ops.varlen_kernels.rnn_forward(*args, cell, False)
    torch.library.opcheck(
        torch.ops.varlen_kernels.rnn_backward.default,
        [torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, lengths, w_ih,
         w_hh, gates, states, cell, False])


@pytest.mark.parametrize("cell", CELLS)
def test_layer_matches_reference_with_inf_padding(cell):
    """Inf/NaN in padding of the input never reaches values or gradients."""
    args = layer_args(cell, "cpu", True)
    x = args[0].detach().clone()
    x[2:, 2] = float("inf")
    x[:, 1] = float("nan")
    x.requires_grad_()
    args[0] = x
    out, h, c = ops.rnn_layer(*args, cell, True)
    out_r, h_r, c_r = rnn_layer_reference(*args, cell, True)
    torch.testing.assert_close(out, out_r, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(h, h_r, rtol=1e-9, atol=1e-11)
    gx, = torch.autograd.grad(out.sum() + h.sum(), [x])
    gx_r, = torch.autograd.grad(out_r.sum() + h_r.sum(), [x])
    torch.testing.assert_close(gx, gx_r, rtol=1e-9, atol=1e-11)
    assert (gx[2:, 2] == 0).all() and (gx[:, 1] == 0).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence_drop_in(cell, enforce_sorted):
    ref, x, lengths, hx = sample_inputs(cell, num_layers=2, bidirectional=True, with_zero=False)
    x = torch.nan_to_num(x.detach(), nan=0.0).requires_grad_()
    if enforce_sorted:
        lengths, order = lengths.sort(descending=True)
        x = x[:, order].detach().requires_grad_()
    m = MaskedRNN.from_torch(ref)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    y, h = m(packed, hx=hx)
    y2, h2 = ref(packed, hx)
    assert isinstance(y, torch.nn.utils.rnn.PackedSequence)
    assert torch.equal(y.batch_sizes, y2.batch_sizes)
    for a, b in [(y.sorted_indices, y2.sorted_indices), (y.unsorted_indices, y2.unsorted_indices)]:
        assert (a is None and b is None) or torch.equal(a, b)
    torch.testing.assert_close(y.data, y2.data, rtol=1e-9, atol=1e-11)
    for a, b in zip(states_of(cell, h), states_of(cell, h2)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    g1, = torch.autograd.grad(y.data.sum() + states_of(cell, h)[0].sum(), [x], retain_graph=True)
    g2, = torch.autograd.grad(y2.data.sum() + states_of(cell, h2)[0].sum(), [x])
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)


@pytest.mark.cpu_only
@pytest.mark.parametrize("cell", CELLS)
def test_state_dict_both_ways(cell):
    ref = make_torch_rnn(cell, 3, 4, num_layers=2, bidirectional=True)
    m = MaskedRNN(3, 4, cell=cell, num_layers=2, bidirectional=True)
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert all(a.shape == b.shape for a, b in zip(m.parameters(), ref.parameters()))
    m.load_state_dict(ref.state_dict())
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    m2 = MaskedRNN(3, 4, cell=cell, num_layers=2, bidirectional=True)
    ref.load_state_dict(m2.state_dict())
    back = m2.to_torch()
    assert type(back) is type(ref)
    for a, b in zip(back.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.cpu_only
def test_init_matches_torch_distribution():
    m = MaskedLSTM(8, 16, num_layers=2, bias=True)
    bound = 1 / 16 ** 0.5
    for p in m.parameters():
        assert p.abs().max() <= bound and p.abs().max() > bound * 0.5
    assert isinstance(MaskedGRU(2, 3), MaskedRNN) and MaskedGRU(2, 3).cell == "gru"


def test_lengths_forms_agree():
    ref, x, lengths, hx = sample_inputs("gru", with_zero=True)
    m = MaskedRNN.from_torch(ref)
    y1, _ = m(x, lengths, hx)
    y2, _ = m(x, lengths.tolist(), hx)
    y3, _ = m(x, lengths.to(torch.int32), hx)
    assert torch.equal(y1, y2) and torch.equal(y1, y3)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dropout_between_layers(cell):
    ref, x, lengths, hx = sample_inputs(cell, num_layers=3, with_zero=True)
    m = MaskedRNN.from_torch(ref)
    m.dropout = 0.5
    m.eval()
    y_eval, _ = m(x, lengths, hx)
    m.train()
    torch.manual_seed(1)
    y_train, _ = m(x, lengths, hx)
    torch.manual_seed(1)
    y_ref, _ = masked_rnn_reference(m, x, lengths, hx)
    assert not torch.allclose(y_train, y_eval)
    torch.testing.assert_close(y_train, y_ref, rtol=1e-9, atol=1e-11)
    pad = torch.arange(x.shape[0])[:, None] >= lengths[None, :]
    assert (y_train[pad] == 0).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bfloat16_error_close_to_torch(cell):
    """bf16 error vs a float64 oracle stays within 2x that of the same loop run by
    PyTorch in bf16 (plus a small floor for ties)."""
    ref, x, lengths, hx = sample_inputs(cell, T=12, B=6, I=8, H=16, with_zero=True,
                                        requires_grad=False)
    m64 = MaskedRNN.from_torch(ref)
    y64, _ = m64(x, lengths, hx)
    m16 = MaskedRNN.from_torch(ref).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    hx16 = tuple(h.to(torch.bfloat16) for h in hx) if cell == "lstm" else hx.to(torch.bfloat16)
    y16, _ = m16(x16, lengths, hx16)
    y16_ref, _ = masked_rnn_reference(m16, x16, lengths, hx16)
    err = (y16.double() - y64).abs().max()
    err_ref = (y16_ref.double() - y64).abs().max()
    assert err <= 2 * err_ref + 1e-3, (err, err_ref)


def test_compile_fullgraph_matches_eager():
    """Forward + loss compiled with fullgraph=True (no graph break); AOTAutograd
    traces the backward through the registered backward op."""
    ref, x, lengths, hx = sample_inputs("lstm", num_layers=2, bidirectional=True, batch_first=True,
                                        dtype=torch.float32)
    m = MaskedRNN.from_torch(ref)

    def step(x, lengths, h0, c0):
        y, (h, c) = m(x, lengths, (h0, c0))
        return y.square().sum() + h.sum() + c.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        loss = fn(x, lengths, *hx)
        results.append((loss, torch.autograd.grad(loss, [x, *hx, *m.parameters()])))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.cpu_only
def test_portable_cpu_kernels_match(tmp_path):
    """The portable (non-AVX2) build of the pointwise kernels gives the same results."""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_rnn import check_against_packed\n"
        "for cell in ['lstm', 'gru', 'rnn_tanh', 'rnn_relu']:\n"
        "    for dtype in (torch.float64, torch.float32):\n"
        "        check_against_packed(cell, num_layers=2, bidirectional=True, dtype=dtype, H=11)\n"
        "print('ok')\n")
    env = dict(__import__("os").environ, VARLEN_KERNELS_CPU_CAPABILITY="default")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_opcheck_forward_strided_input():
    """batch_first hands the op a transposed (non-contiguous) input."""
    args = layer_args("gru", "cpu", True)
    args[0] = args[0].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not args[0].is_contiguous()
    torch.library.opcheck(torch.ops.varlen_kernels.rnn_forward.default, args + ["gru", False])
