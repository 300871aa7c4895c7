"""Shared factories, oracles and the device fixture of the test suite.

The `device` fixture runs a test on every backend there is:
  cpu                 the C++ CPU kernels
  emulated-<order>    the CUDA kernels' code, executed on the CPU (CPU tensors,
                      inside varlen_kernels.testing.emulate_cuda), in each thread
                      order of VK_EMU_ORDERS (default "forward"; "random" uses
                      the seed VK_EMU_SEED, default 0)
  cuda                the CUDA kernels on a GPU, where there is one
The test receives the torch device to put its tensors on ("cpu" for the first
two). `-k emulated` selects the emulated runs. Tests marked `cpu_only` (they
exercise no CUDA kernel) skip the emulated runs. The `gpu` fixture is the same
without the plain CPU backend: for checks of the CUDA kernels only.
"""
import contextlib
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.utils._python_dispatch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import varlen_kernels  # noqa: F401  (loads the ops)
from varlen_kernels import MaskedRNN
from varlen_kernels.ops import NUM_GATES
from varlen_kernels.testing import emulate_cuda, emulated_device, emulation_active

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
TORCH_CLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}
HAS_CUDA = torch.cuda.is_available()
EMU_ORDERS = [o for o in os.environ.get("VK_EMU_ORDERS", "forward").split(",") if o]
EMU_SEED = int(os.environ.get("VK_EMU_SEED", "0"))
GPU_BACKENDS = [f"emulated-{o}" for o in EMU_ORDERS] + (["cuda"] if HAS_CUDA else [])
BACKENDS = ["cpu"] + GPU_BACKENDS
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# make test's second pass over the emulated tests, under AddressSanitizer in a
# random thread order (or ThreadSanitizer): VK_EMU_SANITIZER is set.
SANITIZER_PASS = bool(os.environ.get("VK_EMU_SANITIZER"))
# A test that runs a sanitizer of its own in a child process, whatever pass it
# is in: the first pass ran it.
own_sanitizer = pytest.mark.skipif(SANITIZER_PASS, reason="runs its own sanitizer in a child "
                                   "process: the first pass ran it")
# A case that differs from another case of its test, which the sanitizer pass
# runs, in sizes, types or host-side choices only (the same kernel code, with
# the same paths through it): the first pass ran it.
first_pass_only = pytest.mark.skipif(SANITIZER_PASS, reason="the sanitizer pass runs another "
                                     "case of this test through the same kernel code")


def gradcheck(fn, inputs, **kw):
    """torch.autograd.gradcheck: every entry of the Jacobians, numerical against
    analytical. In the sanitizer pass on the emulated backends, whose first pass
    checked every entry of the same kernels' Jacobians, its fast mode instead
    (a random projection of both, u^T J v, from a few runs of the kernels rather
    than one or two per input element): that pass looks for what the thread
    order and the sanitizer change, not for the gradient's formula again."""
    if SANITIZER_PASS and emulation_active():
        kw.setdefault("fast_mode", True)
    return torch.autograd.gradcheck(fn, inputs, **kw)


def gradgradcheck(fn, inputs, **kw):
    """torch.autograd.gradgradcheck, in its fast mode where gradcheck (above) takes it."""
    if SANITIZER_PASS and emulation_active():
        kw.setdefault("fast_mode", True)
    return torch.autograd.gradgradcheck(fn, inputs, **kw)


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only: exercises no CUDA kernel; skipped when emulated")
    config.addinivalue_line("markers", "emulation: runs CUDA code on the CPU (`-m emulation` "
                                       "selects them, as the AddressSanitizer run does)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(str(params.get(k, "")).startswith("emulated-") for k in ("device", "gpu")):
            item.add_marker(pytest.mark.emulation)


@contextlib.contextmanager
def backend(name):
    """Yields the torch device of a backend, with the emulation on where it applies."""
    if name.startswith("emulated-"):
        with emulate_cuda(order=name.split("-", 1)[1], seed=EMU_SEED):
            yield "cpu"
    else:
        yield name


def _backend_fixture(request):
    if request.param.startswith("emulated-") and request.node.get_closest_marker("cpu_only"):
        pytest.skip("exercises no CUDA kernel")
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    with backend(request.param) as device:
        yield device


device = pytest.fixture(params=BACKENDS)(_backend_fixture)
gpu = pytest.fixture(params=GPU_BACKENDS or ["cuda"])(_backend_fixture)


def make_torch_rnn(cell, input_size, hidden_size, **kw):
    if cell.startswith("rnn_"):
        kw["nonlinearity"] = cell[4:]
    return TORCH_CLS[cell](input_size, hidden_size, **kw)


def sample_lengths(T, B, generator=None, with_zero=True):
    """Unsorted lengths that always include 1 and T, and 0 where allowed."""
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[0] = T
    if B > 1:
        lengths[1] = 1
    if with_zero and B > 2:
        lengths[2] = 0
    return lengths[torch.randperm(B, generator=generator)]


def sample_inputs(cell, *, T=7, B=5, I=4, H=6, num_layers=1, bidirectional=False,
                  batch_first=False, bias=True, device="cpu", dtype=torch.float64,
                  with_zero=True, seed=0, requires_grad=True, proj_size=0):
    """(torch module, x, lengths, hx): x is padded with NaN past each length.
    proj_size: an LSTM with nn.LSTM's projection (h0 then has proj_size features)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    kw = dict(proj_size=proj_size) if proj_size else {}
    ref = make_torch_rnn(cell, I, H, num_layers=num_layers, bidirectional=bidirectional,
                         batch_first=batch_first, bias=bias, dtype=dtype, device=device, **kw)
    lengths = sample_lengths(T, B, g, with_zero)
    x = torch.randn(T, B, I, generator=g, dtype=dtype)
    x[torch.arange(T)[:, None] >= lengths[None, :]] = float("nan")
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    LD = num_layers * (2 if bidirectional else 1)
    h0 = torch.randn(LD, B, proj_size or H, generator=g, dtype=dtype)
    hx = (h0, torch.randn(LD, B, H, generator=g, dtype=dtype)) if cell == "lstm" else h0
    to = dict(device=device)
    x = x.to(**to).requires_grad_(requires_grad)
    hx = tuple(h.to(**to).requires_grad_(requires_grad) for h in hx) if cell == "lstm" \
        else hx.to(**to).requires_grad_(requires_grad)
    return ref, x, lengths, hx


def states_of(cell, h):
    return list(h) if cell == "lstm" else [h]


def layer_args(cell, device, requires_grad, T=4, B=3, I=2, H=3, lengths=(4, 0, 2), seed=0):
    """The tensor arguments of one layer direction's op (rnn_forward, ops.rnn_layer):
    x, lengths, h0, c0 (None but for "lstm"), w_ih, w_hh, b_ih, b_hh; float64."""
    torch.manual_seed(seed)
    G = NUM_GATES[cell]
    dd = dict(dtype=torch.float64, device=device, requires_grad=requires_grad)
    return [torch.randn(T, B, I, **dd), torch.tensor(lengths, device=device),
            torch.randn(B, H, **dd), torch.randn(B, H, **dd) if cell == "lstm" else None,
            torch.randn(G * H, I, **dd), torch.randn(G * H, H, **dd), torch.randn(G * H, **dd),
            torch.randn(G * H, **dd)]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fails_in_child_process(code, match):
    """Runs `code` after `import torch, varlen_kernels as vk` in a child Python (then
    synchronizes the GPU) and checks that it fails with output matching `match`. A
    device-side assert ends the CUDA context of the process that meets it, every
    later CUDA call failing, so a test that triggers one on a GPU does it in a child."""
    script = ("import torch, varlen_kernels as vk\n" + textwrap.dedent(code)
              + "\nif torch.cuda.is_available(): torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    out = r.stdout + r.stderr  # the device-side assert's message may go to either
    assert r.returncode != 0 and re.search(match, out), out[-2000:]


@contextlib.contextmanager
def ieee_fp32():
    """cuDNN RNNs run float32 in TF32 by default (torch.backends.cudnn.rnn.fp32_precision):
    references run in IEEE float32, the precision the kernels are held to."""
    rnn = torch.backends.cudnn.rnn
    old = rnn.fp32_precision
    rnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        rnn.fp32_precision = old


def run_packed(ref, x, lengths, hx, batch_first):
    """nn.* + pack_padded_sequence + pad_packed_sequence on the sequences with
    length > 0 (nn.* refuses length 0). Returns output, [states], kept index."""
    keep = torch.nonzero(lengths > 0).flatten()
    bdim = 0 if batch_first else 1
    T = x.shape[1 if batch_first else 0]
    xs = x.index_select(bdim, keep.to(x.device))
    hs = [h.index_select(1, keep.to(h.device)) for h in (hx if isinstance(hx, tuple) else (hx,))]
    packed = pack_padded_sequence(xs, lengths[keep], batch_first=batch_first, enforce_sorted=False)
    with ieee_fp32():
        y, h = ref(packed, tuple(hs) if isinstance(hx, tuple) else hs[0])
    y, _ = pad_packed_sequence(y, batch_first=batch_first, total_length=T)
    return y, (list(h) if isinstance(h, tuple) else [h]), keep


TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def check_against_packed(cell, *, num_layers=1, bidirectional=False, batch_first=False,
                         dtype=torch.float64, seed=0, bias=True, device="cpu", T=7, B=5, H=6,
                         proj_size=0, host_lengths=False):
    """The module against nn.* + pack_padded_sequence: values and every gradient,
    NaN in the padding. The module gets its lengths on the input's device, or
    with host_lengths in host memory (on the emulated backends: the emulated
    ops take them as a GPU op takes CPU lengths)."""
    ref, x, lengths, hx = sample_inputs(cell, num_layers=num_layers, bidirectional=bidirectional,
                                        batch_first=batch_first, dtype=dtype, seed=seed, bias=bias,
                                        device=device, T=T, B=B, H=H, proj_size=proj_size)
    m = MaskedRNN.from_torch(ref)
    with lengths_in_host_memory(host_lengths):
        y, h = m(x, lengths if host_lengths else lengths.to(device), hx)
    hs = states_of(cell, h)
    g = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(y.shape, generator=g, dtype=dtype).to(device)
    ghs = [torch.randn(s.shape, generator=g, dtype=dtype).to(device) for s in hs]
    h0s = states_of(cell, hx)
    loss = (y * gy).sum() + sum((s * gs).sum() for s, gs in zip(hs, ghs))
    with lengths_in_host_memory(host_lengths):
        grads = torch.autograd.grad(loss, [x, *h0s, *m.parameters()])

    x2 = x.detach().clone().requires_grad_()
    h0s2 = [s.detach().clone().requires_grad_() for s in h0s]
    y2, hs2, keep = run_packed(ref, x2, lengths, tuple(h0s2) if cell == "lstm" else h0s2[0],
                               batch_first)
    bdim = 0 if batch_first else 1
    kd = keep.to(device)
    loss2 = (y2 * gy.index_select(bdim, kd)).sum() + sum(
        (s * gs.index_select(1, kd)).sum() for s, gs in zip(hs2, ghs))
    with ieee_fp32():  # cuDNN's backward reads the setting when it runs
        grads2 = torch.autograd.grad(loss2, [x2, *h0s2, *ref.parameters()])

    tol = TOL[dtype]
    zero = torch.nonzero(lengths == 0).flatten().to(device)
    torch.testing.assert_close(y.index_select(bdim, kd), y2, **tol)
    assert (y.index_select(bdim, zero) == 0).all()
    for s, s2, s0 in zip(hs, hs2, h0s):
        torch.testing.assert_close(s.index_select(1, kd), s2, **tol)
        assert torch.equal(s.index_select(1, zero), s0.detach().index_select(1, zero))
    # Padding: output exactly zero, input gradient exactly zero.
    T = x.shape[1 if batch_first else 0]
    pad = (torch.arange(T)[:, None] >= lengths[None, :]).to(device)
    if batch_first:
        pad = pad.t()
    assert (y[pad] == 0).all()
    assert (grads[0][pad] == 0).all()
    torch.testing.assert_close(grads[0], grads2[0], **tol)
    for gs, g0, g0_2 in zip(ghs, grads[1:1 + len(h0s)], grads2[1:1 + len(h0s)]):
        expected = g0_2.clone()
        expected[:, zero] = gs[:, zero]  # h_n = h0 for empty sequences
        torch.testing.assert_close(g0, expected, **tol)
    for (name, _), gp, gp2 in zip(m.named_parameters(), grads[1 + len(h0s):],
                                  grads2[1 + len(h0s):]):
        torch.testing.assert_close(gp, gp2, **tol, msg=lambda s: f"{name}: {s}")


def lengths_in_host_memory(on: bool = True):
    """On the emulated backends, makes the emulated ops take their lengths as a
    GPU op takes lengths in host memory (a CPU tensor: the plan made on the
    host); nothing elsewhere (on a GPU the caller passes CPU lengths)."""
    if on and emulation_active():
        return emulated_device(lengths_in_host_memory=True)
    return contextlib.nullcontext()


@contextlib.contextmanager
def grouped_mm_as_on_gpu(backend_device="cpu"):
    """aten::_grouped_mm on CPU tensors as loose as the GPU kernel (a CUTLASS
    grouped GEMM that sizes its tiles from the offsets on the device): the rows
    of a 2-D x 3-D product past the group's end are left unwritten, and a 2-D x
    2-D product over an empty group is not defined; here both are NaN, so a
    caller that reads them fails its checks. One group, as our ops use it.
    Counts its calls in .calls. Does nothing on a real GPU (backend "cuda")."""
    state = type("GroupedMM", (), {"calls": 0})()
    if backend_device != "cpu":
        yield state
        return

    def grouped_mm(a, b, offs=None, bias=None, out_dtype=None):
        assert offs is not None and offs.numel() == 1 and bias is None
        state.calls += 1
        end = int(offs[0])
        if b.dim() == 3:  # (R, K) x (1, K, M): rows [0, end) of the result
            out = torch.full((a.shape[0], b.shape[2]), float("nan"), dtype=a.dtype)
            out[:end] = (a[:end].double() @ b[0].double()).to(a.dtype)
            return out
        if end == 0:  # (M, R) x (R, K) over no row
            return torch.full((1, a.shape[0], b.shape[1]), float("nan"), dtype=a.dtype)
        return (a[:, :end].double() @ b[:end].double()).to(a.dtype).unsqueeze(0)

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        lib.impl("_grouped_mm", grouped_mm, "CPU")
    try:
        yield state
    finally:
        lib._destroy()


class ShapesCreated(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, shape) of every tensor the ops run under it return: the
    backward of an op must not be handed materialized zero gradients for its
    non-differentiable outputs (autograd does that unless told not to)."""

    def __init__(self):
        super().__init__()
        self.created = set()

    @property
    def shapes(self):
        return {shape for _, shape in self.created}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.created.add((str(func), tuple(t.shape)))
        return out
