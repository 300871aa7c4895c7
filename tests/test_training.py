"""Truncated BPTT, autocast, DDP and compiled training steps."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import requires_cuda, sample_inputs, states_of
from varlen_kernels import (MaskedGRU, MaskedLSTM, MaskedRNN, detach_state, masked_cross_entropy,
                            masked_mse, tbptt_chunks)
from varlen_kernels.distributed import ddp_mean


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_tbptt_forward_equals_unchunked(cell, batch_first, k):
    ref, x, lengths, hx = sample_inputs(cell, T=11, B=5, num_layers=2, batch_first=batch_first,
                                        requires_grad=False)
    m = MaskedRNN.from_torch(ref)
    y_full, h_full = m(x, lengths, hx)
    state, outs = hx, []
    for chunk in tbptt_chunks(x, lengths, k, batch_first=batch_first):
        assert (chunk.lengths <= k).all() and (chunk.lengths >= 0).all()
        out, state = m(chunk.input, chunk.lengths, state)
        outs.append(out)
        state = detach_state(state)
    y = torch.cat(outs, 1 if batch_first else 0)
    torch.testing.assert_close(y, y_full, rtol=1e-12, atol=1e-12)
    for a, b in zip(states_of(cell, state), states_of(cell, h_full)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_tbptt_gradients_equal_truncated_reference():
    """Each window's gradients equal those of the reference loop run on that window
    from the detached carried state."""
    from varlen_kernels import masked_rnn_reference
    ref, x, lengths, hx = sample_inputs("lstm", T=9, B=4, requires_grad=False)
    m = MaskedRNN.from_torch(ref)
    state = state_ref = hx
    for chunk in tbptt_chunks(x, lengths, 4):
        out, new_state = m(chunk.input, chunk.lengths, state)
        out_ref, new_ref = masked_rnn_reference(m, chunk.input, chunk.lengths, state_ref)
        g = torch.autograd.grad(out.square().sum() + new_state[1].sum(), list(m.parameters()))
        g_ref = torch.autograd.grad(out_ref.square().sum() + new_ref[1].sum(), list(m.parameters()))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        state, state_ref = detach_state(new_state), detach_state(new_ref)


def test_tbptt_bad_input():
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        list(tbptt_chunks(torch.zeros(3, 2, 1), [1, 2], 0))
    with pytest.raises(ValueError, match=r"lengths\[1\] = 5"):
        list(tbptt_chunks(torch.zeros(3, 2, 1), [1, 5], 2))


def test_cpu_autocast_bfloat16():
    torch.manual_seed(0)
    m = MaskedLSTM(8, 16, num_layers=2, batch_first=True)
    head = torch.nn.Linear(16, 5)
    x = torch.randn(4, 6, 8)
    lengths = torch.tensor([6, 2, 0, 4])
    target = torch.randint(0, 5, (4, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = m(x, lengths)
        logits = head(y)
        loss = masked_cross_entropy(logits, target, lengths, batch_first=True)
    assert y.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
    y32, _ = m(x, lengths)
    assert (y.float() - y32).abs().max() < 0.05
    assert (y[1, 2:] == 0).all()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast(dtype):
    torch.manual_seed(0)
    m = MaskedGRU(8, 16, batch_first=True).cuda()
    x = torch.randn(4, 6, 8, device="cuda")
    lengths = torch.tensor([6, 2, 0, 4], device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y, h = m(x, lengths)
        loss = masked_mse(y, torch.zeros_like(y), lengths, batch_first=True)
    assert y.dtype == dtype and loss.dtype == torch.float32
    loss.backward()


def test_compile_full_training_step():
    torch.manual_seed(0)
    m = MaskedGRU(4, 8, num_layers=2, batch_first=True)
    head = torch.nn.Linear(8, 3)
    x = torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 1, 3])
    target = torch.randint(0, 3, (3, 5))
    params = list(m.parameters()) + list(head.parameters())

    def step(x, lengths, target):
        y, _ = m(x, lengths)
        loss = masked_cross_entropy(head(y), target, lengths, batch_first=True)
        loss.backward()
        return loss.detach()

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        for p in params:
            p.grad = None
        loss = fn(x, lengths, target)
        grads.append((loss, [p.grad.clone() for p in params]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
    # The forward + loss is one graph with no break.
    torch.compile(lambda x, l, t: masked_cross_entropy(head(m(x, l)[0]), t, l, batch_first=True),
                  fullgraph=True, backend="aot_eager")(x, lengths, target).backward()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, batches, state, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = MaskedLSTM(3, 4, batch_first=True)
    m.load_state_dict(state)
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    x, lengths, target = batches[rank]
    y, _ = ddp(x, lengths)
    local = masked_mse(y, target, lengths, reduction="sum", batch_first=True)
    loss = ddp_mean(local, lengths.sum() * y.shape[-1])
    loss.backward()
    out[rank] = [p.grad.clone() for p in m.parameters()]
    dist.destroy_process_group()


def test_ddp_uneven_lengths_match_single_process():
    torch.manual_seed(0)
    m = MaskedLSTM(3, 4, batch_first=True)
    # Rank 0 holds long sequences, rank 1 short ones (and an empty one).
    batches = []
    for lengths in (torch.tensor([7, 6, 7]), torch.tensor([1, 0, 2])):
        x = torch.randn(3, 7, 3)
        batches.append((x, lengths, torch.randn(3, 7, 4)))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), batches, m.state_dict(), out), nprocs=2)
        ddp_grads = out[0]
        assert all(torch.equal(a, b) for a, b in zip(out[0], out[1]))
    x = torch.cat([b[0] for b in batches])
    lengths = torch.cat([b[1] for b in batches])
    target = torch.cat([b[2] for b in batches])
    y, _ = m(x, lengths)
    masked_mse(y, target, lengths, batch_first=True).backward()
    for g, p in zip(ddp_grads, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
