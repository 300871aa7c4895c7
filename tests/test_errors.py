"""Bad input gets a clear error that names the argument, the expected and the received."""
import pytest
import torch

from conftest import layer_args
from varlen_kernels import MaskedGRU, MaskedLSTM, MaskedRNN, ops


@pytest.fixture
def lstm():
    return MaskedLSTM(3, 4, num_layers=2).double()


def x(T=5, B=2, I=3):
    return torch.randn(T, B, I, dtype=torch.float64)


@pytest.mark.parametrize("lengths,exc,match", [
    (torch.tensor([6, 2]), ValueError, r"lengths must be in \[0, T\] with T=5.*lengths\[0\] = 6"),
    (torch.tensor([3, -1]), ValueError, r"lengths\[1\] = -1"),
    (torch.tensor([3.0, 2.0]), TypeError, "integer dtype, got torch.float32"),
    (torch.tensor([True, False]), TypeError, "integer dtype, got torch.bool"),
    (torch.tensor([3, 2, 1]), ValueError, r"one entry per sequence \(B=2\), got shape \(3,\)"),
    (torch.tensor([[3, 2]]), ValueError, r"1-D .*got shape \(1, 2\)"),
    ([3, 2.5], TypeError, "lengths must hold ints"),
    ("3", TypeError, "lengths must be a 1-D integer Tensor"),
])
def test_bad_lengths(lstm, lengths, exc, match):
    with pytest.raises(exc, match=match):
        lstm(x(), lengths)


def test_op_rejects_out_of_range_lengths():
    w = [torch.randn(1, 2), torch.randn(1, 1)]  # rnn_tanh, H = 1
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 9 is out of range.*T = 3"):
        ops.rnn_layer(torch.randn(3, 2, 2), torch.tensor([1, 9]), torch.zeros(2, 1), None,
                      *w, None, None, "rnn_tanh", False)
    with pytest.raises(RuntimeError, match="cell must be one of"):
        ops.rnn_layer(torch.randn(3, 2, 2), torch.tensor([1, 2]), torch.zeros(2, 1), None,
                      *w, None, None, "lstmm", False)
    with pytest.raises(RuntimeError, match=r"h0 must have shape \(B, H\) = \[2, 1\], got \[3, 1\]"):
        ops.rnn_layer(torch.randn(3, 2, 2), torch.tensor([1, 2]), torch.zeros(3, 1), None,
                      *w, None, None, "rnn_tanh", False)


def test_bad_input_rank_and_size(lstm):
    with pytest.raises(ValueError, match=r"input must be 3-D \(T, B, I\).*got shape \(2, 5, 3, 1\)"):
        lstm(torch.randn(2, 5, 3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="input_size=3, got 7"):
        lstm(x(I=7), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="dtype torch.float64, got torch.float32"):
        lstm(x().float(), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="Tensor or a PackedSequence"):
        lstm([1, 2, 3])


def test_bad_hx(lstm):
    h = torch.zeros(2, 2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"tuple \(h_0, c_0\)"):
        lstm(x(), [1, 2], h)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\) must have shape \(2, 2, 4\).*got \(1, 2, 4\)"):
        lstm(x(), [1, 2], (h, h[:1]))
    with pytest.raises(TypeError, match=r"hx\[0\] \(h_0\) must have the input's dtype torch.float64, got torch.float32"):
        lstm(x(), [1, 2], (h.float(), h))
    gru = MaskedGRU(3, 4).double()
    with pytest.raises(ValueError, match=r"hx must have shape \(1, 2, 4\)"):
        gru(x(), [1, 2], torch.zeros(1, 3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="hx must be a Tensor for cell 'gru'"):
        gru(x(), [1, 2], (h, h))


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="cell must be one of"):
        MaskedRNN(3, 4, cell="transformer")
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        MaskedRNN(3, 0)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\], got 1.5"):
        MaskedRNN(3, 4, dropout=1.5)
    with pytest.raises(ValueError, match="proj_size must be smaller than hidden_size=4, got 4"):
        MaskedLSTM(3, 4, proj_size=4)
    with pytest.raises(ValueError, match="proj_size is only supported for an LSTM"):
        MaskedRNN(3, 4, cell="gru", proj_size=2)
    with pytest.raises(TypeError, match="nn.LSTM, nn.GRU or nn.RNN, got Linear"):
        MaskedRNN.from_torch(torch.nn.Linear(2, 2))


def test_packed_with_lengths_is_an_error(lstm):
    p = torch.nn.utils.rnn.pack_padded_sequence(x(), [5, 2])
    with pytest.raises(ValueError, match="lengths must be None when input is a PackedSequence"):
        lstm(p, torch.tensor([5, 2]))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_lengths_on_other_gpu(lstm):
    lstm = lstm.cuda(0)
    with pytest.raises(ValueError, match="lengths is on cuda:1 but input is on cuda:0"):
        lstm(x().cuda(0), torch.tensor([1, 2], device="cuda:1"))


def test_fixed_cell_classes():
    assert isinstance(MaskedLSTM.from_torch(torch.nn.LSTM(2, 3)), MaskedLSTM)
    with pytest.raises(ValueError, match="MaskedLSTM has cell 'lstm', got cell='gru'"):
        MaskedLSTM.from_torch(torch.nn.GRU(2, 3))


def test_double_backward_through_a_backward_op_is_refused():
    """The recurrent layers' backward ops are not differentiable: called
    directly, differentiating their results is an error naming the op (the
    forward ops' backward differentiates again: test_double_backward.py)."""
    args = layer_args("lstm", "cpu", False)
    x, lengths, h0, c0, w_ih, w_hh = args[:6]
    out, h_n, c_n, gates, states = torch.ops.varlen_kernels.rnn_forward.default(*args, "lstm", False)
    grad_y = torch.randn_like(out).requires_grad_()
    grads = torch.ops.varlen_kernels.rnn_backward.default(
        grad_y, torch.zeros_like(h_n), torch.zeros_like(c_n), x, lengths, w_ih, w_hh, gates,
        states, "lstm", False)
    with pytest.raises(NotImplementedError, match="double backward .*::rnn_backward is not supported"):
        grads[0].sum().backward()
