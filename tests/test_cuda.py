"""Checks of the CUDA kernels, run by the `gpu` fixture (conftest.py) on the CUDA
code executed on the CPU (every CI run) and on a GPU where there is one. Values
and gradients against nn.* + pack_padded_sequence for every configuration run
in test_rnn.py / test_losses.py on every backend."""
import contextlib
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import (CELLS, check_against_packed, fails_in_child_process, first_pass_only,
                      gradcheck, grouped_mm_as_on_gpu, layer_args, lengths_in_host_memory,
                      requires_cuda, run_packed, sample_inputs, states_of)
from varlen_kernels import (MaskedRNN, masked_bce_with_logits, masked_cross_entropy, masked_mse,
                            masked_rnn_reference, ops)
from varlen_kernels.testing import emulate_cuda, emulated_device, emulation_module, env_setting


@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck(cell, gpu):
    x, lengths, h0, c0, *w = layer_args(cell, gpu, True)
    for reverse in (False, True):
        def f(x, h0, c0, *w):
            out, h, c = ops.rnn_layer(x, lengths, h0, c0, *w, cell, reverse)
            return (out, h) if c is None else (out, h, c)
        assert gradcheck(f, (x, h0, c0, *w))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(cell, requires_grad, gpu):
    args = layer_args(cell, gpu, requires_grad)
    torch.library.opcheck(torch.ops.varlen_kernels.rnn_forward.default, args + [cell, True])
    if not requires_grad:
        out, h_n, c_n, gates, states = torch.ops.varlen_kernels.rnn_forward(*args, cell, False)
        x, lengths, _, _, w_ih, w_hh = args[:6]
        torch.library.opcheck(
            torch.ops.varlen_kernels.rnn_backward.default,
            [torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, lengths, w_ih,
             w_hh, gates, states, cell, False])


def _grads(m, x, lengths, hx, gy):
    y, _ = m(x, lengths.to(x.device), hx)  # lengths on the device: the plan made there
    grads = torch.autograd.grad((y * gy.to(y.dtype)).sum(), [x, *m.parameters()])
    return y, grads


# (T, B, H, emulated device limits, path, GPU only): the default shape on the
# default path; the tensor-core persistent kernels with several CTAs, row tiles
# and staged chunks (H = 36: rows staged 16 bytes a load, columns 36..47 of
# the padding one at a time; H = 9 bidirectional: the LSTM's backward stages
# rows of 36 columns of a 72-column block, its last copy of each row 8 bytes
# from the row, zeros after them; H = 64 on 8 SMs: 8 units a CTA, so the
# backward's product has output tiles of 8 columns, TcGeometry::tn; H = 16
# on 8 SMs: 2 units, so the forward's too), in the grid form and in the cluster form (clusters of 2,
# 4 and 3 CTAs, a cluster for each 16-row tile); the fma persistent kernels in
# half/bfloat16 (the tensor-core ones do not fit that shared memory; GRU's
# forward still does), in both forms; the per-step path; on a GPU (whose limits
# the test cannot change), more rows than a tile, in both forms.
# bidirectional=True (the last field) runs both directions in one launch.
LOW_PRECISION_CASES = [
    (12, 6, 16, {}, "auto", False),
    (9, 40, 64, {"sm_count": 2}, "persistent:grid", False),
    (9, 40, 64, {"sm_count": 4}, "persistent:grid", False, True),
    (9, 40, 50, {"sm_count": 3}, "persistent:grid", False),
    (9, 40, 96, {"sm_count": 3}, "persistent:grid", False),
    (9, 40, 64, {"sm_count": 8}, "persistent:grid", False),
    (9, 40, 16, {"sm_count": 8}, "persistent:grid", False),
    (9, 40, 36, {"sm_count": 2}, "persistent:grid", False),
    (9, 40, 9, {"sm_count": 2}, "persistent:grid", False, True),
    (9, 40, 64, {"sm_count": 2, "max_shared_per_block": 24576}, "persistent:grid", False),
    (9, 40, 64, {"max_cluster_blocks": 2}, "persistent:cluster", False),
    (9, 40, 64, {"max_cluster_blocks": 4}, "persistent:cluster", False, True),
    (9, 40, 50, {"max_cluster_blocks": 3}, "persistent:cluster", False),
    (9, 40, 64, {"max_cluster_blocks": 2, "max_shared_per_block": 24576}, "persistent:cluster",
     False),
    (9, 40, 50, {"sm_count": 3}, "per_step", False),
    (9, 300, 160, {}, "persistent:grid", True),
    (9, 300, 160, {}, "persistent:cluster", True),
]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,B,H,limits,path,gpu_only,bidirectional",
                         [case + (False,) * (7 - len(case)) for case in LOW_PRECISION_CASES])
def test_low_precision_values_and_gradients(cell, dtype, T, B, H, limits, path, gpu_only,
                                            bidirectional, gpu):
    """Output and every gradient, against a float64 oracle, within 2x the error of
    PyTorch's own same-precision path (the masked loop in that dtype, and cuDNN's
    packed path on a GPU), with a floor of a few ulps of the dtype."""
    if gpu_only and gpu != "cuda":
        pytest.skip("a GPU-sized case")
    with rnn_path(path), device_limits(gpu, **limits):
        check_low_precision(cell, dtype, T, B, H, gpu, bidirectional)


def check_low_precision(cell, dtype, T, B, H, gpu, bidirectional=False, proj_size=0):
    ref, x, lengths, hx = sample_inputs(cell, T=T, B=B, I=8, H=H, device=gpu,
                                        requires_grad=False, with_zero=True,
                                        bidirectional=bidirectional, proj_size=proj_size)
    x = torch.nan_to_num(x, nan=0.0)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(T, B, (2 if bidirectional else 1) * (proj_size or H), generator=g,
                     dtype=torch.float64).to(gpu)
    m64 = MaskedRNN.from_torch(ref)
    with rnn_path("auto"):  # the float64 oracle: whichever path fits
        y64, g64 = _grads(m64, x.requires_grad_(), lengths, hx, gy)
    low = lambda t: t.detach().to(dtype)  # noqa: E731
    x16 = low(x).requires_grad_()
    hx16 = tuple(map(low, hx)) if cell == "lstm" else low(hx)
    m16 = MaskedRNN.from_torch(ref).to(dtype)
    y16, g16 = _grads(m16, x16, lengths, hx16, gy)
    # PyTorch's same-precision error: the masked loop (reference.py) in `dtype`,
    # PyTorch's own arithmetic on this device.
    x16r = low(x).requires_grad_()
    y_ref, _ = masked_rnn_reference(m16, x16r, lengths, hx16)
    g_ref = torch.autograd.grad((y_ref * gy.to(dtype)).sum(), [x16r, *m16.parameters()])
    floor = torch.finfo(dtype).eps * 4
    names = ["output", "input"] + [n for n, _ in m16.named_parameters()]
    for name, ours, theirs, exact in zip(names, [y16, *g16], [y_ref, *g_ref], [y64, *g64]):
        scale = exact.abs().max().clamp_min(1.0)
        err = ((ours.double() - exact).abs().max() / scale).item()
        err_ref = ((theirs.double() - exact).abs().max() / scale).item()
        assert err <= 2 * max(err_ref, floor), f"{name}: error {err:.3g}, PyTorch's {err_ref:.3g}"
    if gpu == "cuda":  # and against cuDNN in the same precision
        # (nn.* refuses length 0: cuDNN's output has the rows of length > 0 alone)
        y_cudnn, _, keep = run_packed(ref.to(dtype), low(x), lengths, hx16, False)
        err = (y16.double() - y64).abs().max().item()
        err_cudnn = (y_cudnn.double() - y64.index_select(1, keep.to(gpu))).abs().max().item()
        assert err <= 2 * max(err_cudnn, floor), (err, err_cudnn)


@requires_cuda
@pytest.mark.parametrize("proj_size", [0, 3])
def test_cuda_graph_capture_fwd_bwd(proj_size):
    ref, x, lengths, hx = sample_inputs("lstm", num_layers=2, bidirectional=True, device="cuda",
                                        dtype=torch.float32, requires_grad=False,
                                        proj_size=proj_size)
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
    # New lengths and inputs in the same buffers: the replay follows them.
    new_len = torch.tensor([1, 7, 0, 3, 7], device="cuda")
    with torch.no_grad():
        static_len.copy_(new_len)
        static_x.copy_(torch.randn_like(static_x))
    for p in [static_x, *m.parameters()]:
        p.grad.zero_()
    g.replay()
    torch.cuda.synchronize()
    eager = MaskedRNN.from_torch(ref)
    x3 = static_x.detach().clone().requires_grad_()
    y, (h, c) = eager(x3, new_len)
    (y.square().sum() + h.sum()).backward()
    torch.testing.assert_close(static_x.grad, x3.grad)
    for a, b in zip(m.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


@requires_cuda
def test_lengths_out_of_range_on_device_fails_loudly():
    fails_in_child_process("""
        m = vk.MaskedGRU(2, 3).cuda()
        m(torch.randn(4, 2, 2, device='cuda'), torch.tensor([1, 9], device='cuda'))
        """, r"lengths must be in \[0, T\]")


def test_fails_in_child_process_needs_the_failure_and_its_message():
    """The helper of the tests that meet device-side asserts, on the CPU kernels."""
    bad_target = """
        vk.masked_cross_entropy(torch.randn(2, 3, 4), torch.tensor([[0, 9, 1], [1, 2, 3]]),
                                torch.tensor([3, 1]), batch_first=True)
        """
    fails_in_child_process(bad_target, r"outside the class range \[0, 4\)")
    with pytest.raises(AssertionError):  # fails, but not with that message
        fails_in_child_process(bad_target, r"lengths must be in")
    with pytest.raises(AssertionError):  # does not fail
        fails_in_child_process("vk.MaskedGRU(2, 3)(torch.randn(4, 2, 2), torch.tensor([1, 4]))", ".*")


@requires_cuda
def test_loss_lengths_out_of_range_on_device_fail_loudly():
    fails_in_child_process("""
        x = torch.randn(2, 4, 3, device='cuda')
        vk.masked_cross_entropy(x, torch.zeros(2, 4, dtype=torch.long, device='cuda'),
                                torch.tensor([1, 9], device='cuda'), batch_first=True)
        """, r"lengths must be in \[0, T\]")


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lengths_out_of_range_fail_the_device_assert(cell):
    """The op itself (no Python check in front) refuses a length > T in the kernel."""
    args = layer_args(cell, "cpu", False, lengths=(4, 9, 2))
    with emulate_cuda():
        with pytest.raises(RuntimeError, match=r"device-side assert failed: .*lengths must be in \[0, T\]"):
            torch.ops.varlen_kernels.rnn_forward(*args, cell, False)


@pytest.mark.emulation
@pytest.mark.parametrize("cell", CELLS)
def test_grid_stride_loops_go_round(cell):
    """With the grid capped at 2 blocks, every kernel's grid-stride loop covers
    more rows (or elements) than the grid has threads; results equal the CPU
    kernels'."""
    ref, x, lengths, hx = sample_inputs(cell, T=5, B=70, I=3, H=9, num_layers=1, bidirectional=True)
    m = MaskedRNN.from_torch(ref)
    logits = torch.randn(70, 5, 300, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 300, (70, 5))

    def run():
        y, h = m(x, lengths, hx)
        loss = masked_cross_entropy(y.transpose(0, 1).sum(-1, keepdim=True) * logits, target, lengths,
                                    batch_first=True)
        loss = loss + masked_mse(logits, logits.detach() * 0.5, lengths, batch_first=True)
        loss = loss + masked_bce_with_logits(logits, logits.detach().sigmoid(), mask=target > 100,
                                             batch_first=True, reduction="none").sum()
        return torch.autograd.grad(loss, [x, logits, *m.parameters()])

    expected = run()
    with emulate_cuda(order="random", seed=3), emulated_device(max_grid_blocks=2):
        got = run()
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@contextlib.contextmanager
def rnn_path(path):
    """Forces the CUDA RNN path: 'persistent', 'per_step' or 'auto'; with
    ':grid' or ':cluster' ('persistent:cluster'), the persistent kernels' form
    too (VARLEN_KERNELS_PERSISTENT_SYNC; 'auto' otherwise)."""
    path, _, sync = path.partition(":")
    with env_setting("VARLEN_KERNELS_RNN_PATH", path), \
            env_setting("VARLEN_KERNELS_PERSISTENT_SYNC", sync or "auto"):
        yield


@contextlib.contextmanager
def matmul_precision(precision):
    """torch's float32 precision for CUDA matmuls: 'ieee' or 'tf32'."""
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = old


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("sync", ["grid", "grid8", "grid_groups", "cluster", "per_step"])
def test_float32_follows_torchs_tf32_setting(cell, bidirectional, sync, gpu):
    """The float32 persistent kernels run IEEE fma unless torch allows TF32 for
    CUDA matmuls, then tensor cores in TF32. IEEE: output and every gradient
    within float32 tolerance of float64. TF32: within 2x the error of PyTorch's
    masked loop in half precision (TF32 keeps half's 10 mantissa bits, and only
    the recurrent product's operands are rounded), and far from IEEE's (TF32 did
    run). lstm_proj: proj_size 5 (both products of its kernels; the grid form
    only). Both forms of the persistent kernels: the grid form on 2 SMs a
    direction, and on 8 (8 units a CTA: the backward's tensor-core tiles have 8
    columns, TcGeometry::tn), and as 3 row groups on 6 SMs a direction (2 CTAs
    of 32 units a group, for the three 16-row tiles of B = 40); the cluster form
    in clusters of 2 CTAs. per_step: the per-step path's cuBLAS GEMMs (on a GPU
    only: under the emulation they are ATen's CPU GEMMs, which TF32 does not
    touch)."""
    if sync == "per_step" and gpu != "cuda":
        pytest.skip("the emulation's per-step GEMMs are ATen's on the CPU")
    if sync == "grid8" and gpu == "cuda":
        pytest.skip("a GPU's grid form gives these 64 units a CTA each: 'grid' has such tiles")
    if cell == "lstm_proj" and sync in ("cluster", "grid_groups"):
        pytest.skip("the projection LSTM's kernels have the grid form only, in one group")
    T, B, H = 9, 40, 64
    proj_size = 5 if cell == "lstm_proj" else 0
    cell = "lstm" if proj_size else cell
    ref, x, lengths, hx = sample_inputs(cell, T=T, B=B, I=8, H=H, device=gpu, proj_size=proj_size,
                                        requires_grad=False, bidirectional=bidirectional)
    x = torch.nan_to_num(x, nan=0.0)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(T, B, (2 if bidirectional else 1) * (proj_size or H), generator=g,
                     dtype=torch.float64).to(gpu)
    y64, g64 = _grads(MaskedRNN.from_torch(ref), x.clone().requires_grad_(), lengths, hx, gy)

    def run(dtype, runner=_grads):
        m = MaskedRNN.from_torch(ref).to(dtype)
        hxd = tuple(t.to(dtype) for t in hx) if cell == "lstm" else hx.to(dtype)
        xd = x.to(dtype).requires_grad_()
        if runner is _grads:
            return runner(m, xd, lengths, hxd, gy)
        y, _ = runner(m, xd, lengths, hxd)
        return y, torch.autograd.grad((y * gy.to(dtype)).sum(), [xd, *m.parameters()])

    def errors(result):
        y, grads = result
        return [((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item()
                for a, b in zip([y, *grads], [y64, *g64])]

    per_dir = {"grid": 2, "grid8": 8, "grid_groups": 6}.get(sync)
    limits = dict(sm_count=per_dir * (2 if bidirectional else 1)) if per_dir else \
        dict(max_cluster_blocks=2)
    path = "per_step" if sync == "per_step" else f"persistent:{sync[:4] if per_dir else sync}"
    with rnn_path(path), device_limits(gpu, **limits), \
            persistent_groups("3" if sync == "grid_groups" else "1"):
        with matmul_precision("ieee"):
            ieee = errors(run(torch.float32))
        with matmul_precision("tf32"):
            tf32 = errors(run(torch.float32))
    half = errors(run(torch.float16, masked_rnn_reference))
    floor = torch.finfo(torch.float16).eps * 4
    names = ["output", "input"] + [n for n, _ in ref.named_parameters()]
    for name, e_ieee, e_tf32, e_half in zip(names, ieee, tf32, half):
        assert e_ieee <= 1e-5, f"{name}: IEEE float32 error {e_ieee:.3g}"
        assert e_tf32 <= 2 * max(e_half, floor), f"{name}: TF32 {e_tf32:.3g}, half {e_half:.3g}"
    assert max(tf32) > 30 * max(ieee), (tf32, ieee)


def device_limits(gpu, **limits):
    """emulated_device(**limits) on the emulated backends; nothing on a GPU."""
    return contextlib.nullcontext() if gpu == "cuda" else emulated_device(**limits)


# Persistent kernels at shapes that make every part of them run: several CTAs
# (sm_count bounds the grid, so units per CTA = ceil(H / CTAs)), a last CTA
# with fewer units, threads with no unit, several row tiles of which the later
# ones finish early (B = 40 with lengths uniform in [1, T]) and H not a multiple
# of the staged chunk. (H, sm_count) -> units per CTA, CTAs, rows per tile:
#   (64, 2) -> 32, 2, 16;  (50, 3) -> 17, 3, 30;  (9, 132) -> 2, 5, 256
# The cluster form takes the same CTAs a cluster (max_cluster_blocks =
# min(sm_count, 8)), and a cluster for each row tile, each stepping its own
# rows to their own longest length: 3, 2 and 1 clusters a direction.
PERSISTENT_SHAPES = [(64, 2), (50, 3), (9, 132)]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("path", ["persistent:grid", "persistent:cluster", "per_step"])
@pytest.mark.parametrize("H,sm_count", PERSISTENT_SHAPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_persistent_and_per_step_paths_match_packed(cell, path, H, sm_count, bidirectional, gpu):
    """Both CUDA paths, forced, the persistent one in both forms, against nn.* +
    packed: values and every gradient, two layers, float64, NaN in the padding.
    Bidirectional layers run both directions in one launch, in the grid form
    each direction on as many CTAs as a unidirectional layer gets with half the
    SMs."""
    if path == "per_step" and H != 50:
        pytest.skip("the per-step path does not depend on the grid: one shape is enough")
    sms = sm_count * (2 if bidirectional else 1)
    limits = dict(sm_count=sms)
    if path == "persistent:cluster":
        limits = dict(max_cluster_blocks=min(sm_count, 8))
    with rnn_path(path), device_limits(gpu, **limits):
        check_against_packed(cell, num_layers=2, bidirectional=bidirectional, device=gpu, T=9,
                             B=40, H=H, seed=H)


# The projection LSTM's persistent kernels (rnn_persistent_proj.cu): CTA c owns
# units [c*Hs, (c+1)*Hs) and features [c*Ps, (c+1)*Ps). (H, P, sm_count, B) ->
# units per CTA, CTAs, features per CTA:
#   (24, 5, 3) -> 8, 3, 2 (the last CTA has one feature);
#   (50, 7, 4) -> 13, 4, 2 (a last CTA with fewer units, one feature);
#   (9, 2, 132) -> 2, 5, 1 (three CTAs with no feature).
# Lengths uniform in [1, T]: B = 40 makes several row tiles of the forward's
# cell product (32 or 16 rows on CUDA cores), B = 200 of every product
# (at most 128 rows), later tiles finishing early.
PROJ_SHAPES = [(24, 5, 3, 40), (50, 7, 4, 40), (9, 2, 132, 40), (24, 5, 3, 200)]


@pytest.mark.parametrize("path", ["persistent", "per_step"])
@pytest.mark.parametrize("H,P,sm_count,B", PROJ_SHAPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_projection_lstm_paths_match_packed(path, H, P, sm_count, B, bidirectional, gpu):
    """The LSTM with a projection on both CUDA paths, forced, against nn.LSTM +
    packed: values and every gradient, two layers, float64, NaN in the padding.
    Bidirectional layers get twice the SMs, so that each direction has the grid
    of a unidirectional layer (test_projection_lstm_launches counts the launches)."""
    if path == "per_step" and (H, B) != (24, 40):
        pytest.skip("the per-step path does not depend on the grid: one shape is enough")
    sms = sm_count * (2 if bidirectional else 1)
    with rnn_path(path), device_limits(gpu, sm_count=sms):
        check_against_packed("lstm", num_layers=2, bidirectional=bidirectional, device=gpu, T=9,
                             B=B, H=H, proj_size=P, seed=H + B)


# (B, emulated device limits, path): the tensor-core kernels, with one and
# with several row tiles (at most 128 rows); the fma kernels (the tensor-core
# ones do not fit 16 KiB of shared memory); the per-step path.
PROJ_LOW_PRECISION_CASES = [(40, {"sm_count": 3}, "persistent"),
                            (200, {"sm_count": 3}, "persistent"),
                            (40, {"sm_count": 3, "max_shared_per_block": 16384}, "persistent"),
                            (40, {"sm_count": 3}, "per_step")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,limits,path", PROJ_LOW_PRECISION_CASES)
def test_projection_lstm_low_precision(dtype, B, limits, path, gpu):
    """The projection LSTM in half and bfloat16: output and every gradient
    within 2x the error of PyTorch's own same-precision path, as the plain cells."""
    with rnn_path(path), device_limits(gpu, **limits):
        check_low_precision("lstm", dtype, 9, B, 24, gpu, proj_size=5)


@pytest.mark.emulation
@pytest.mark.parametrize("bidirectional,sm_count,path,launches,grid", [
    (False, 3, "persistent", 1, 3),  # 24 units: 8 a CTA
    (True, 6, "persistent", 1, 6),   # both directions in one launch, 3 CTAs each
    (True, 1, "persistent", 2, 1),   # not together on 1 SM: one launch each
    (False, 3, "per_step", 0, None),
])
def test_projection_lstm_launches(bidirectional, sm_count, path, launches, grid):
    """A projection LSTM layer on the persistent path: one cooperative launch
    forward and one backward (of `grid` CTAs), for both directions where they
    fit together; the same values and gradients as nn.LSTM + packed either way."""
    counts = emulation_module().launch_counts
    ref, x, lengths, hx = sample_inputs("lstm", T=6, B=9, I=4, H=24, proj_size=5,
                                        bidirectional=bidirectional)
    m = MaskedRNN.from_torch(ref)
    with rnn_path(path), emulate_cuda(), emulated_device(sm_count=sm_count):
        before = counts()[1]
        y, _ = m(x.requires_grad_(), lengths, hx)
        assert counts()[1] - before == launches
        if grid:
            assert counts()[2] == grid
        y.nan_to_num().sum().backward()
        assert counts()[1] - before == 2 * launches
        if grid:
            assert counts()[2] == grid
        check_against_packed("lstm", num_layers=1, bidirectional=bidirectional, device="cpu",
                             T=6, B=9, H=24, proj_size=5, seed=5)


@pytest.mark.emulation
def test_bidirectional_projection_layer_gemms_over_tokens():
    """A bidirectional projection LSTM layer on the persistent path runs one GEMM
    for both directions' input projection, and in the backward one for the
    input gradient of both plus the three weight gradients of each; the same
    values as nn.LSTM + packed."""
    ref, x, lengths, hx = sample_inputs("lstm", T=6, B=9, I=5, H=12, proj_size=4,
                                        bidirectional=True)
    m = MaskedRNN.from_torch(ref)
    x = x.requires_grad_()
    with rnn_path("persistent"), emulate_cuda(), emulated_device(sm_count=4):
        out = {}
        assert mm_calls(lambda: out.setdefault("y", m(x, lengths, hx)[0])) == 1
        assert mm_calls(lambda: out["y"].nan_to_num().sum().backward()) == 7
        check_against_packed("lstm", num_layers=1, bidirectional=True, device="cpu", T=6, B=9,
                             H=12, proj_size=4, seed=6)


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("sm_count,launches", [(4, 1), (1, 2)])
def test_bidirectional_layer_launches(cell, sm_count, launches, monkeypatch):
    """Both directions in one persistent launch where both fit (4 SMs: 2 CTAs a
    direction), one launch each where they do not (1 SM); the same values and
    gradients either way, and as nn.* + packed."""
    counts = emulation_module().launch_counts
    with rnn_path("persistent:grid"), emulate_cuda(), emulated_device(sm_count=sm_count):
        before = counts()[1]
        check_against_packed(cell, num_layers=1, bidirectional=True, device="cpu", T=6, B=9,
                             H=20, seed=3)
        # the forward's and the backward's launches; the last one's grid
        assert counts()[1] - before == 2 * launches
        assert counts()[2] == (2 * 2 if launches == 1 else 1)


def persistent_units(n):
    """VARLEN_KERNELS_PERSISTENT_UNITS: at least n hidden units a CTA ('auto': the default)."""
    return env_setting("VARLEN_KERNELS_PERSISTENT_UNITS", n)


@pytest.mark.emulation
@pytest.mark.parametrize("cell,proj_size,bidirectional,units,ctas", [
    ("gru", 0, False, "auto", 12),  # H=24 on 132 SMs: the fewest units, 2 a CTA
    ("lstm", 0, False, "5", 5),     # 5 units a CTA, the last one 4
    ("gru", 0, True, "8", 3),
    ("lstm", 5, False, "128", 1),   # at most H: one CTA owns every unit
    ("lstm", 5, True, "5", 5),
])
def test_persistent_units_setting_sizes_the_grid(cell, proj_size, bidirectional, units, ctas):
    """VARLEN_KERNELS_PERSISTENT_UNITS=n gives each CTA of a persistent launch
    at least n hidden units (at most H), so ceil(H / n) CTAs a direction, forward
    and backward (the benchmarks sweep it); the same values and every gradient
    as nn.* + packed."""
    counts = emulation_module().launch_counts
    with rnn_path("persistent:grid"), persistent_units(units), emulate_cuda():
        before = counts()[1]
        check_against_packed(cell, num_layers=1, bidirectional=bidirectional, device="cpu",
                             T=6, B=9, H=24, proj_size=proj_size, seed=7)
        assert counts()[1] - before == 2  # the forward's launch and the backward's
        assert counts()[2] == ctas * (2 if bidirectional else 1)


def persistent_groups(n):
    """VARLEN_KERNELS_PERSISTENT_GROUPS: the grid form's most row groups (unset or
    'auto': the tensor-core backward as 2 from 32 rows, everything else as 1)."""
    return env_setting("VARLEN_KERNELS_PERSISTENT_GROUPS", n)


def outputs_and_grads(m, cell, x, lengths, hx):
    """The module's output, final states and the gradients of a fixed weighting
    of them w.r.t. the input, the initial states and every parameter."""
    y, h = m(x, lengths, hx)
    out = [y, *states_of(cell, h)]
    h0s = list(states_of(cell, hx))
    grads = torch.autograd.grad(sum((o.float() * (i + 1)).sum() for i, o in enumerate(out)),
                                [x, *h0s, *m.parameters()])
    return [t.detach() for t in (*out, *grads)]


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("groups,taken", [pytest.param("2", 2, marks=first_pass_only), ("3", 3),
                                          pytest.param("16", 3, marks=first_pass_only)])
def test_grid_form_row_groups_on_cuda_cores(cell, bidirectional, groups, taken):
    """VARLEN_KERNELS_PERSISTENT_GROUPS=n runs the grid form's CTAs of a direction
    as n row groups, each owning every hidden unit (here one CTA of all 24 units,
    so 20-row tiles on CUDA cores; B = 45 makes three tiles, so at most three
    groups: 16 gives 3). Every group steps to the longest length of all, the
    third's rows (the shortest) finishing early, so all meet at every grid
    barrier. float64: the same bits as one group (a row's product and cell are
    the same arithmetic), and nn.* + packed's values and every gradient."""
    counts = emulation_module().launch_counts
    dirs = 2 if bidirectional else 1
    ref, x, lengths, hx = sample_inputs(cell, T=6, B=45, I=3, H=24, seed=5,
                                        bidirectional=bidirectional)
    m = MaskedRNN.from_torch(ref)
    with rnn_path("persistent:grid"), persistent_units("24"), emulate_cuda():
        with persistent_groups("1"):
            one = outputs_and_grads(m, cell, x, lengths, hx)
            assert counts()[2] == dirs  # the backward's grid: a CTA a direction
        with persistent_groups(groups):
            before = counts()[1]
            got = outputs_and_grads(m, cell, x, lengths, hx)
            assert counts()[1] - before == 2 and counts()[2] == dirs * taken
            for a, b in zip(got, one):
                assert torch.equal(a, b)
            check_against_packed(cell, bidirectional=bidirectional, device="cpu", T=6, B=45, H=24,
                                 seed=6)
            assert counts()[2] == dirs * taken


@pytest.mark.emulation
def test_grid_form_row_groups_keep_the_kernel_of_one_group():
    """Row groups never trade the tensor cores for the CUDA cores: on 2 SMs,
    H = 128, one group's forward is 2 CTAs of 64 units on tensor cores; 2 groups
    would need CTAs of 128 units, whose forward product has more output tiles
    than the tensor-core kernel takes, and only the CUDA-core kernel would fit.
    So the forward keeps one group (the same bits as without the setting),
    while the backward, whose 128-unit slices fit on tensor cores, takes 2
    groups; output and every gradient within 2x PyTorch's own error."""
    ref, x, lengths, hx = sample_inputs("lstm", T=5, B=40, I=8, H=128, requires_grad=False, seed=2)
    m = MaskedRNN.from_torch(ref).to(torch.bfloat16)
    x = torch.nan_to_num(x, nan=0.0).to(torch.bfloat16)
    hx = tuple(t.to(torch.bfloat16) for t in hx)
    with rnn_path("persistent:grid"), emulate_cuda(), emulated_device(sm_count=2):
        with persistent_groups("1"):
            one = m(x, lengths, hx)[0]
        with persistent_groups("2"):
            two = m(x, lengths, hx)[0]
            check_low_precision("lstm", torch.bfloat16, 5, 40, 128, "cpu")
    assert torch.equal(one, two)


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=first_pass_only)])
@pytest.mark.parametrize("bidirectional,groups,ctas", [
    # 8 SMs: 2 groups of 4 CTAs (8 units each) for one direction, of 2 CTAs (16
    # units) a direction for two; 3 groups of 2 CTAs (16 units), of 1 (32) for
    # two directions; 4 asked for, 3 taken: B = 40 has three 16-row tiles.
    (False, "2", (2, 4)), pytest.param(True, "2", (2, 2), marks=first_pass_only),
    (False, "3", (3, 2)), (True, "3", (3, 1)),
    pytest.param(False, "4", (3, 2), marks=first_pass_only),
])
def test_grid_form_row_groups_on_tensor_cores(cell, dtype, bidirectional, groups, ctas):
    """The grid form's tensor-core kernels as row groups (16-row tiles dealt to
    the groups in turn; H = 32 on 8 SMs, B = 40 with lengths spread, so later
    tiles finish early and a group runs out of rows before the others): output
    and every gradient within 2x PyTorch's own error, forward and backward
    launched in the groups' grid."""
    counts = emulation_module().launch_counts
    taken, per_group = ctas
    with rnn_path("persistent:grid"), persistent_groups(groups), emulate_cuda(), \
            emulated_device(sm_count=8):
        before = counts()[1]
        check_low_precision(cell, dtype, 9, 40, 32, "cpu", bidirectional)
        assert counts()[1] - before == 2  # the forward's launch and the backward's
        assert counts()[2] == (2 if bidirectional else 1) * taken * per_group


@pytest.mark.emulation
@pytest.mark.parametrize("dtype,B,backward_groups", [
    (torch.bfloat16, 40, "2"),  # tensor cores, at least 32 rows: the backward as 2 groups
    (torch.bfloat16, 31, "1"),  # two 16-row tiles, fewer than 32 rows: one
    (torch.float64, 40, "1"),   # CUDA cores: one
])
def test_grid_form_row_groups_by_default(dtype, B, backward_groups):
    """Unset (or 'auto'), VARLEN_KERNELS_PERSISTENT_GROUPS runs the grid form's
    tensor-core backward as 2 row groups from 32 rows of the batch, and one
    group for the forward, below 32 rows and on CUDA cores (H = 32 on 8 SMs,
    LSTM, 8 units a CTA: one group is 4 CTAs, two are 8): the forward's and the
    backward's grids, unset and 'auto' the same bits, the forward's output
    that of one group given explicitly, and the output and every gradient
    within 2x PyTorch's own error against nn.* + packed."""
    counts = emulation_module().launch_counts
    ref, x, lengths, hx = sample_inputs("lstm", T=5, B=B, I=8, H=32, requires_grad=False, seed=3)
    m = MaskedRNN.from_torch(ref).to(dtype)
    x = torch.nan_to_num(x, nan=0.0).to(dtype).requires_grad_()
    hx = tuple(t.to(dtype) for t in hx)

    def run():
        before = counts()[1]
        y, _ = m(x, lengths, hx)
        forward_grid = counts()[2]
        grads = torch.autograd.grad(y.float().sum(), [x, *m.parameters()])
        assert counts()[1] - before == 2  # the grids below are this run's
        return (forward_grid, counts()[2]), [y.detach(), *grads]

    with rnn_path("persistent:grid"), emulate_cuda(), emulated_device(sm_count=8), \
            persistent_units("8"):
        assert "VARLEN_KERNELS_PERSISTENT_GROUPS" not in os.environ
        unset = run()
        with persistent_groups("auto"):
            auto = run()
        with persistent_groups("1"):
            one = run()
        if dtype != torch.float64:
            check_low_precision("lstm", dtype, 5, B, 32, "cpu")
        else:
            check_against_packed("lstm", device="cpu", T=5, B=B, H=32, seed=3)
    assert unset[0] == auto[0] == (4, 8 if backward_groups == "2" else 4), unset[0]
    assert one[0] == (4, 4)
    assert torch.equal(unset[1][0], one[1][0])
    for a, b in zip(unset[1], auto[1]):
        assert torch.equal(a, b)


@pytest.mark.emulation
@pytest.mark.parametrize("cell,bidirectional,B,H,limits,units,ctas,groups", [
    # H=20 in a cluster of at most 8 CTAs (the portable size): 3 units each (the
    # last has 2), 7 CTAs; 170 rows a tile on CUDA cores: one cluster a direction.
    ("lstm", False, 9, 20, {}, "auto", 7, 1),
    ("gru", True, 9, 20, {}, "auto", 7, 1),
    # Clusters of 1 CTA owning all 20 units: 24-row tiles, a cluster each.
    ("lstm", False, 60, 20, dict(max_cluster_blocks=1), "auto", 1, 3),
    ("gru", True, 60, 20, dict(max_cluster_blocks=1), "auto", 1, 3),
    # ... at most the clusters that can be resident, shared by the directions:
    # 8 CTAs fit on the one SM, so 4 clusters a direction for the 9 tiles.
    ("lstm", True, 200, 20, dict(max_cluster_blocks=1, sm_count=1), "auto", 1, 4),
    # VARLEN_KERNELS_PERSISTENT_UNITS holds in the cluster form too.
    ("gru", False, 9, 20, {}, "5", 4, 1),
    # H=128 float64: 8 CTAs' slices (16 units, 68 KiB) exceed 48 KiB, 16 CTAs'
    # (8 units, 40 KiB) fit: a cluster beyond the portable size.
    ("lstm", True, 9, 128, dict(max_shared_per_block=49152), "auto", 16, 1),
])
def test_cluster_form_launches(cell, bidirectional, B, H, limits, units, ctas, groups):
    """The cluster form (the default where it fits): one launch forward and one
    backward for both directions, in clusters of ceil(H / units) CTAs, as many
    clusters a direction as row tiles, at most the resident ones; the same values
    and every gradient as nn.* + packed."""
    counts = emulation_module().launch_counts
    dirs = 2 if bidirectional else 1
    with rnn_path("persistent"), persistent_units(units), emulate_cuda(), \
            emulated_device(**limits):
        before = counts()
        check_against_packed(cell, num_layers=1, bidirectional=bidirectional, device="cpu",
                             T=6, B=B, H=H, seed=8)
        after = counts()
        assert after[3] - before[3] == 2 and after[1] == before[1]  # no cooperative launch
        assert after[4:6] == (dirs * groups * ctas, ctas)


@pytest.mark.emulation
@pytest.mark.parametrize("limits,groups", [({}, 4), (dict(sm_count=1), 1)])
def test_cluster_form_tensor_core_tiles(limits, groups):
    """The tensor-core kernels' tiles in the cluster form: 16 rows, a cluster each
    (4 for B = 60), where that many clusters can be resident, else as many rows a
    tile as give each resident cluster one (1 SM: one 7-CTA cluster, a 64-row
    tile), where the geometry alone would take 128-row tiles (8 warps, one
    16-column output tile), forward and backward alike."""
    counts = emulation_module().launch_counts
    ref, x, lengths, hx = sample_inputs("lstm", T=5, B=60, I=3, H=20, requires_grad=False)
    m = MaskedRNN.from_torch(ref).to(torch.bfloat16)
    x = torch.nan_to_num(x).to(torch.bfloat16).requires_grad_()
    hx = tuple(t.to(torch.bfloat16) for t in hx)
    with rnn_path("persistent"), emulate_cuda(), emulated_device(**limits):
        y, _ = m(x, lengths, hx)
        assert counts()[4:6] == (groups * 7, 7)
        y.float().sum().backward()
        assert counts()[4:6] == (groups * 7, 7)


@pytest.mark.emulation
def test_persistent_sync_setting_is_checked_and_cluster_form_that_does_not_fit_fails():
    """VARLEN_KERNELS_PERSISTENT_SYNC takes 'auto', 'grid' or 'cluster'; a forced
    cluster form that does not fit is an error naming the sizes, where 'auto'
    takes the grid form (same results)."""
    args = layer_args("gru", "cpu", False)
    with emulate_cuda(), env_setting("VARLEN_KERNELS_PERSISTENT_SYNC", "clusters"):
        with pytest.raises(RuntimeError, match="VARLEN_KERNELS_PERSISTENT_SYNC must be 'auto', "
                                               "'grid' or 'cluster', got 'clusters'"):
            torch.ops.varlen_kernels.rnn_forward(*args, "gru", False)
    ref, x, lengths, hx = sample_inputs("lstm", T=5, B=6, I=3, H=40)
    m = MaskedRNN.from_torch(ref)
    expected = m(x, lengths, hx)[0]
    counts = emulation_module().launch_counts
    # A cluster of 1 CTA: all 40 units, whose slice of W_hh (4 * 40 * 40 float64)
    # exceeds 36 KiB; the grid form's 2-unit slices on the 132 SMs fit.
    with emulate_cuda(), emulated_device(max_cluster_blocks=1, max_shared_per_block=36864):
        with rnn_path("persistent"):
            before = counts()
            torch.testing.assert_close(m(x, lengths, hx)[0], expected, rtol=1e-12, atol=1e-13)
            assert counts()[1] == before[1] + 1 and counts()[3] == before[3]
        with rnn_path("persistent:cluster"):
            with pytest.raises(RuntimeError, match=r"VARLEN_KERNELS_PERSISTENT_SYNC=cluster: the "
                                                   r"persistent forward kernel's cluster form does "
                                                   r"not fit this device for hidden_size 40, 4 "
                                                   r"gate\(s\), dtype Double"):
                m(x, lengths, hx)


@pytest.mark.emulation
@pytest.mark.parametrize("value", ["0", "1", "129", "-4", "8x", "1e2", " 8", "many"])
def test_persistent_units_setting_is_checked(value):
    args = layer_args("gru", "cpu", False)
    with emulate_cuda(), persistent_units(value):
        with pytest.raises(RuntimeError, match=r"VARLEN_KERNELS_PERSISTENT_UNITS must be 'auto' or "
                                               r"a whole number of hidden units per CTA in \[2, "
                                               rf"128\], got '{value}'"):
            torch.ops.varlen_kernels.rnn_forward(*args, "gru", False)


@pytest.mark.emulation
@pytest.mark.parametrize("variable,what,value", [
    *[("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", r"KiB in \[0, 1024\]", v)
      for v in ["-1", "1025", "16k", "1e2", " 8", "all"]],
    *[("VARLEN_KERNELS_PERSISTENT_SLOTS", r"slots in \[1, 4\]", v)
      for v in ["0", "5", "-1", "two", " 2"]],
    *[("VARLEN_KERNELS_PERSISTENT_MAX_MMAC", r"million multiply-adds a step in \[0, 9999\]", v)
      for v in ["-1", "10000", "1e3", "many", " 5"]],
    *[("VARLEN_KERNELS_PERSISTENT_GROUPS", r"row groups of the grid form in \[1, 16\]", v)
      for v in ["0", "17", "-2", "two", " 2"]],
])
def test_persistent_staging_settings_are_checked(variable, what, value):
    args = layer_args("lstm", "cpu", False)
    with emulate_cuda(), env_setting(variable, value):
        with pytest.raises(RuntimeError, match=rf"{variable} must be 'auto' or a whole number of "
                                               rf"{what}, got '{value}'"):
            torch.ops.varlen_kernels.rnn_forward(*args, "lstm", False)


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, "tf32", torch.float32])
def test_staging_whole_or_in_chunks_gives_the_same_bits(cell, dtype):
    """A tile's reduction staged at once, or in chunks, through 1 to 4 slots
    (the setting in KiB; StageRing): the product accumulates in the same order,
    so outputs and gradients are equal bit for bit. H = 72 on 3 SMs; the grid
    form's tensor-core kernels (bfloat16, and float32 in TF32, rounded in
    shared memory after the asynchronous copies). Forward tiles: 16 rows, 80
    columns; backward: 32 rows (the grid form's tiles hold at most the batch's
    rows), 288 columns (LSTM) or 224 (GRU). (slots, chunks a tile) of the
    LSTM's backward, by KiB, with at most 4 slots:
        auto: (4, 1);  48: bf16 (4, 2), TF32 (4, 4);  32: (4, 3), (3, 4)
        24: (4, 4), (2, 4);  16: (3, 5), (1, 3);  10: (2, 5), (1, 5)
        5, 4 and 0: (1, 5)
    The forward (2 tiles a step): whole in 3 or 4 slots from 16 KiB up; in 2
    chunks at 10 KiB in 4 slots (bf16) or 2 (TF32: the slots reused across
    tiles), at 5 KiB in 2 slots (bf16, the same) or 1 (TF32); whole in 1 slot
    at 4 KiB (bf16), else in 2 chunks. Float32 in IEEE: the CUDA-core kernels
    (5 chunks at 0 KiB). The cluster form stages within one whole tile's
    bytes; in TF32 it is left out, as its tiles' rows (so the split of their
    reductions between warps) follow the clusters that the shared memory
    leaves resident, which the setting changes there. The slots setting (at
    most 1 (its default), 2 or 3 slots) gives the same bits too, and so do
    bulk copies (VARLEN_KERNELS_PERSISTENT_COPY=bulk, and unset where they
    can: one slot, a bulk copy a row of each chunk whose columns all exist, on
    an mbarrier; half and bfloat16 only), which then run, against 16-byte
    asynchronous copies (=async)."""
    precision, paths = "ieee", ("persistent:grid", "persistent:cluster")
    if dtype == "tf32":
        dtype, precision, paths = torch.float32, "tf32", ("persistent:grid",)
    ref, x, lengths, hx = sample_inputs(cell, T=6, B=20, I=5, H=72, seed=4)
    m = MaskedRNN.from_torch(ref).to(dtype)
    x = torch.nan_to_num(x.detach(), nan=0.0).to(dtype).requires_grad_()
    hx = tuple(h.detach().to(dtype) for h in hx) if cell == "lstm" else hx.detach().to(dtype)
    runs = {}
    settings = [(kib, "4", "async") for kib in ("auto", "0", "4", "5", "10", "16", "24", "32", "48")]
    settings += [("auto", slots, "async") for slots in ("auto", "2", "3")]
    settings += [(kib, "auto", "bulk") for kib in ("auto", "0", "10", "32")]
    settings += [("auto", "auto", "auto")]
    bulk = {}
    for path in paths:
        for kib, slots, copy in settings:
            with rnn_path(path), emulate_cuda(), emulated_device(sm_count=3), \
                    env_setting("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", kib), \
                    env_setting("VARLEN_KERNELS_PERSISTENT_SLOTS", slots), \
                    env_setting("VARLEN_KERNELS_PERSISTENT_COPY", copy), \
                    env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", "global"), \
                    matmul_precision(precision):
                before = emulation_module().launch_counts()[6]
                y, h = m(x, lengths, hx)
                out = [y, *states_of(cell, h)]
                grads = torch.autograd.grad(sum((o.float() * (i + 1)).sum() for i, o in enumerate(out)),
                                            [x, *m.parameters()])
                bulk[path, kib, slots, copy] = emulation_module().launch_counts()[6] - before
            runs[path, kib, slots, copy] = [t.detach() for t in (*out, *grads)]
    for (path, kib, slots, copy), tensors in runs.items():
        for a, b in zip(tensors, runs[path, "auto", "4", "async"]):
            assert torch.equal(a, b), (path, kib, slots, copy)
        # bulk copies in half and bfloat16 (rows of 16-byte multiples: H = 72,
        # 4H = 288, 3H = 216) where asked for or by default, and only there
        assert (bulk[path, kib, slots, copy] > 0) == (copy != "async" and dtype != torch.float32), \
            (path, kib, slots, copy)


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_auto_path_takes_the_per_step_path_past_the_bound_of_a_steps_product(cell, bidirectional):
    """On the auto path the persistent kernels take a layer whose step's
    recurrent product (B * G*H * H multiply-adds, times 2 for a bidirectional
    launch) is within VARLEN_KERNELS_PERSISTENT_MAX_MMAC million, the per-step
    path one past it: here B = 9, H = 12 (LSTM 5184 multiply-adds a step, GRU
    3888) are within the default bound (24 M on CUDA cores: float64) and past
    a bound of 0. The persistent path launches a kernel for all steps, the
    per-step path kernels every step; VARLEN_KERNELS_RNN_PATH=persistent takes
    the persistent kernels past the bound too. The auto path gives the values
    and gradients of nn.* + packed, the other two the same as it."""
    T, B, H = 6, 9, 12
    ref, x, lengths, hx = sample_inputs(cell, T=T, B=B, I=5, H=H, bidirectional=bidirectional,
                                        seed=6)
    m = MaskedRNN.from_torch(ref)
    count = emulation_module().launch_counts
    runs, launches = {}, {}
    for name, path, bound in (("auto", "auto", "auto"), ("past_bound", "auto", "0"),
                              ("forced", "persistent", "0")):
        with rnn_path(path), env_setting("VARLEN_KERNELS_PERSISTENT_MAX_MMAC", bound), \
                emulate_cuda(), emulated_device(sm_count=4):
            xg = x.detach().requires_grad_()
            before = count()[0]
            y, h = m(xg, lengths, hx)
            out = [y, *states_of(cell, h)]
            grads = torch.autograd.grad(sum((o.nan_to_num() * (i + 1)).sum()
                                            for i, o in enumerate(out)), [xg, *m.parameters()])
            launches[name] = count()[0] - before
            if name == "auto":
                check_against_packed(cell, num_layers=1, bidirectional=bidirectional,
                                     device="cpu", T=T, B=B, H=H, seed=6)
        runs[name] = [t.detach() for t in (*out, *grads)]
    # The recurrence of each direction, fwd+bwd: at most 2 launches on the
    # persistent path, at least a kernel a step (to the longest length)
    # forward and backward on the per-step path; the rest (the length plan)
    # the same on both
    dirs, steps = 2 if bidirectional else 1, int(lengths.max())
    assert launches["past_bound"] - launches["auto"] >= 2 * (steps - 1) * dirs, launches
    assert launches["forced"] == launches["auto"], launches
    for name in ("past_bound", "forced"):
        for a, b in zip(runs[name], runs["auto"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, equal_nan=True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bulk_copies_stage_the_same_bits_as_16_byte_copies(cell, gpu):
    """The tensor-core kernels' staging by bulk copies on an mbarrier
    (VARLEN_KERNELS_PERSISTENT_COPY=bulk) gives the outputs and gradients of
    their 16-byte asynchronous copies (=async) bit for bit: bfloat16, grid
    form, H = 72 (the forward's rows of 72 columns with zeros to 80, the
    backward's of 4H or 3H), whole and in chunks (16 KiB); on a GPU too
    (sm_90)."""
    if gpu == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("bulk copies need sm_90")
    ref, x, lengths, hx = sample_inputs(cell, T=6, B=20, I=5, H=72, seed=9, device=gpu)
    m = MaskedRNN.from_torch(ref).to(torch.bfloat16)
    x = torch.nan_to_num(x.detach(), nan=0.0).to(torch.bfloat16).requires_grad_()
    hx = tuple(h.detach().to(torch.bfloat16) for h in hx) if cell == "lstm" \
        else hx.detach().to(torch.bfloat16)
    runs, issued = {}, {"async": 0, "bulk": 0}
    count = emulation_module().launch_counts if gpu != "cuda" else lambda: (0,) * 7
    for kib in ("auto", "16"):
        for copy in ("async", "bulk"):
            with rnn_path("persistent:grid"), device_limits(gpu, sm_count=3), \
                    env_setting("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", kib), \
                    env_setting("VARLEN_KERNELS_PERSISTENT_COPY", copy):
                before = count()[6]
                y, h = m(x, lengths, hx)
                out = [y, *states_of(cell, h)]
                grads = torch.autograd.grad(sum((o.float() * (i + 1)).sum() for i, o in enumerate(out)),
                                            [x, *m.parameters()])
                issued[copy] += count()[6] - before
            runs[kib, copy] = [t.detach() for t in (*out, *grads)]
    for kib in ("auto", "16"):
        for a, b in zip(runs[kib, "bulk"], runs[kib, "async"]):
            assert torch.equal(a, b), kib
    assert all(torch.isfinite(t.float()).all() for t in runs["auto", "bulk"])
    if gpu != "cuda":  # bulk copies ran, and only where asked for
        assert issued["bulk"] > 0 and issued["async"] == 0, issued


@pytest.mark.emulation
def test_staging_rows_of_more_copies_than_threads_give_the_same_bits():
    """StageRing's copies of a chunk's rows, dealt to the threads in turn: where
    a row takes more 16-byte copies than the CTA has threads, a thread's
    copies step along a row, not down the rows. The LSTM backward's 4H
    columns in TF32 at H = 264, staged whole through 2 slots (each 16 rows of
    1060 float columns beside the weight slice of 16 units: 264 copies a row),
    give the same bits as the same rows staged through 1 slot in 64-column
    chunks (4 KiB: 16 copies a row). Grid form, 16 units a CTA (17 CTAs), 5
    rows. (bfloat16 runs the same loop with 8 values a copy.)"""
    ref, x, lengths, hx = sample_inputs("lstm", T=3, B=5, I=3, H=264, seed=5)
    m = MaskedRNN.from_torch(ref).to(torch.float32)
    x = torch.nan_to_num(x.detach(), nan=0.0).float().requires_grad_()
    hx = tuple(h.detach().float() for h in hx)
    runs = {}
    for kib, slots in (("auto", "2"), ("4", "auto")):
        with rnn_path("persistent:grid"), emulate_cuda(), emulated_device(sm_count=40), \
                env_setting("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", kib), \
                env_setting("VARLEN_KERNELS_PERSISTENT_SLOTS", slots), persistent_units("16"), \
                matmul_precision("tf32"):
            y, (h, c) = m(x, lengths, hx)
            grads = torch.autograd.grad((y.sum() + 2 * h.sum() + 3 * c.sum()), [x, *m.parameters()])
        runs[kib] = [t.detach() for t in (y, h, c, *grads)]
    for a, b in zip(runs["4"], runs["auto"]):
        assert torch.equal(a, b)
    assert all(torch.isfinite(t).all() for t in runs["auto"])


@pytest.mark.emulation
@pytest.mark.parametrize("cell,H,bidirectional", [("lstm", 64, False), ("gru", 72, True),
                                                  ("rnn_tanh", 72, False), ("lstm", 72, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cluster_exchange_through_shared_memory_gives_the_same_bits(cell, H, bidirectional, dtype):
    """The cluster form's tensor-core kernels pass h (forward) and dgh (backward)
    between the CTAs of a cluster through distributed shared memory, keeping
    their units' state in shared memory, or through global memory: the same
    operands and sums, so outputs and gradients (h0 and c0 included) are equal
    bit for bit. float32: TF32. 70 rows, lengths spread over [0, T], on an
    emulated device whose SMs hold 8 CTAs each whatever their shared memory:
    on 1 SM a single cluster steps the forward's 2 or 3 tiles of rows; on 2
    SMs two clusters share them (bidirectional: one a direction, each
    stepping several tiles). H = 64: clusters of 8 CTAs of 8 units,
    16-byte pieces into the other CTAs, stores that complete on their
    mbarriers and no cluster barrier a step ('dsmem'), or plain stores and a
    cluster barrier a step ('dsmem_barrier'); H = 72: 9 units, one value at a
    time, always with the barrier."""
    T, B = 7, 70
    ref, x, lengths, hx = sample_inputs(cell, T=T, B=B, I=5, H=H, seed=5, bidirectional=bidirectional)
    lengths = torch.cat([torch.tensor([T, 0, 1]), torch.randint(0, T + 1, (B - 3,))])
    m = MaskedRNN.from_torch(ref).to(dtype)
    x = torch.nan_to_num(x.detach(), nan=0.0).to(dtype).requires_grad_()
    hx = [h.detach().to(dtype).requires_grad_() for h in states_of(cell, hx)]
    runs = {}
    precision = "tf32" if dtype == torch.float32 else "ieee"
    counts = emulation_module().launch_counts
    stores, syncs = {}, {}
    for sm_count in (1, 2):
        for exchange in ("dsmem", "dsmem_barrier", "global"):
            before = counts()
            with rnn_path("persistent:cluster"), emulate_cuda(), matmul_precision(precision), \
                    emulated_device(sm_count=sm_count, max_shared_per_sm=1 << 24), \
                    env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", exchange):
                y, h = m(x, lengths, tuple(hx) if cell == "lstm" else hx[0])
                out = [y, *states_of(cell, h)]
                grads = torch.autograd.grad(sum((o.float() * (i + 1)).sum() for i, o in enumerate(out)),
                                            [x, *hx, *m.parameters()])
            runs[sm_count, exchange] = [t.detach() for t in (*out, *grads)]
            stores[sm_count, exchange] = counts()[7] - before[7]
            syncs[sm_count, exchange] = counts()[8] - before[8]
    for sm_count in (1, 2):
        for exchange in ("dsmem", "dsmem_barrier"):
            for a, b in zip(runs[sm_count, exchange], runs[sm_count, "global"]):
                assert torch.equal(a, b), (sm_count, exchange)
        assert stores[sm_count, "dsmem_barrier"] == 0 and stores[sm_count, "global"] == 0
        if H == 64:  # a cluster barrier before and after the steps, none between them
            assert stores[sm_count, "dsmem"] > 0
            assert 0 < syncs[sm_count, "dsmem"] < syncs[sm_count, "dsmem_barrier"] / 2
        else:
            assert stores[sm_count, "dsmem"] == 0
            assert syncs[sm_count, "dsmem"] == syncs[sm_count, "dsmem_barrier"]


@requires_cuda
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cluster_exchange_on_a_gpu_gives_the_same_bits(cell):
    """On a GPU (sm_90), bfloat16 at the benchmarks' H = 256 (clusters of 8 CTAs
    of 32 units), 64 rows with lengths spread over [0, T]: the exchange's stores
    completing on mbarriers (the default there), the exchange with a cluster
    barrier a step, and global memory give the same outputs and gradients bit
    for bit (the emulated test above runs the same at smaller sizes)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread block clusters need sm_90")
    T, B = 9, 64
    ref, x, _, hx = sample_inputs(cell, T=T, B=B, I=16, H=256, seed=11, device="cuda")
    g = torch.Generator().manual_seed(11)
    lengths = torch.cat([torch.tensor([T, 0, 1]), torch.randint(0, T + 1, (B - 3,), generator=g)])
    m = MaskedRNN.from_torch(ref).to(torch.bfloat16)
    x = torch.nan_to_num(x.detach(), nan=0.0).to("cuda", torch.bfloat16).requires_grad_()
    hx = [h.detach().to(torch.bfloat16).requires_grad_() for h in states_of(cell, hx)]
    runs = {}
    for exchange in ("dsmem", "dsmem_barrier", "global"):
        with rnn_path("persistent:cluster"), env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", exchange):
            y, h = m(x, lengths.cuda(), tuple(hx) if cell == "lstm" else hx[0])
            out = [y, *states_of(cell, h)]
            grads = torch.autograd.grad(sum((o.float() * (i + 1)).sum() for i, o in enumerate(out)),
                                        [x, *hx, *m.parameters()])
        runs[exchange] = [t.detach() for t in (*out, *grads)]
    for exchange in ("dsmem_barrier", "global"):
        for a, b in zip(runs["dsmem"], runs[exchange]):
            assert torch.equal(a, b), exchange
    assert all(torch.isfinite(t.float()).all() for t in runs["dsmem"])


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cluster_exchange_runs_at_the_benchmarks_hidden_size_256(cell):
    """On the default emulated device (an H100's or H200's 132 SMs and 227 KiB of
    shared memory a block), bfloat16 at H = 256 (bench_rnn's shapes) takes the
    cluster form's exchange through distributed shared memory in the forward
    and in the backward: forced, it runs."""
    m = MaskedRNN(8, 256, cell=cell).to(torch.bfloat16)
    x = torch.randn(2, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    with rnn_path("persistent"), emulate_cuda(), \
            env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", "dsmem"):
        y, _ = m(x, torch.tensor([2, 1, 2, 0, 2, 1, 1, 2]))
        y.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.emulation
def test_persistent_exchange_setting_is_checked_and_forced_dsmem_that_cannot_run_fails():
    """VARLEN_KERNELS_PERSISTENT_EXCHANGE takes 'auto', 'global', 'dsmem' or 'dsmem_barrier'; a
    forced exchange through distributed shared memory is an error naming the
    sizes where the launch cannot take it: the grid form, the CUDA-core kernels
    (float64), or buffers that do not fit; 'auto' then runs (same values)."""
    args = layer_args("lstm", "cpu", False)
    with emulate_cuda(), env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", "shared"):
        with pytest.raises(RuntimeError, match="VARLEN_KERNELS_PERSISTENT_EXCHANGE must be 'auto', "
                                               "'global', 'dsmem' or 'dsmem_barrier', got 'shared'"):
            torch.ops.varlen_kernels.rnn_forward(*args, "lstm", False)
    with emulate_cuda(), env_setting("VARLEN_KERNELS_PERSISTENT_COPY", "tma"):
        with pytest.raises(RuntimeError, match="VARLEN_KERNELS_PERSISTENT_COPY must be 'auto', "
                                               "'async' or 'bulk', got 'tma'"):
            torch.ops.varlen_kernels.rnn_forward(*args, "lstm", False)
    ref, x, lengths, hx = sample_inputs("lstm", T=3, B=300, I=3, H=16)
    m = MaskedRNN.from_torch(ref)
    mb = MaskedRNN.from_torch(ref).to(torch.bfloat16)
    xb, hb = x.to(torch.bfloat16), tuple(h.to(torch.bfloat16) for h in hx)
    # bfloat16 in clusters of 8 CTAs of 2 units, on 1 SM: one cluster, tiles of
    # 128 rows, about 25 KB of shared memory a CTA staging them, over 50 KB
    # with the exchange buffers of its 3 tiles.
    cases = [("persistent:cluster", m, x, hx, {}, "only the cluster form on tensor cores does"),
             ("persistent:grid", mb, xb, hb, {}, "only the cluster form on tensor cores does"),
             ("persistent:cluster", mb, xb, hb, dict(sm_count=1, max_shared_per_block=30000),
              r"its buffers, \d+ bytes of shared memory a CTA, do not fit")]
    for path, model, inp, state, limits, why in cases:
        with rnn_path(path), emulate_cuda(), emulated_device(**limits):
            with env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", "dsmem"):
                with pytest.raises(RuntimeError, match=r"VARLEN_KERNELS_PERSISTENT_EXCHANGE=dsmem: "
                                                       r"the persistent forward kernel cannot pass "
                                                       r"its rows through distributed shared memory "
                                                       r"for hidden_size 16, 4 gate\(s\), dtype "
                                                       rf"\w+ and a batch of 300 \({why}\); use 'auto'"):
                    model(inp, lengths, state)
            auto = model(inp, lengths, state)[0]
            with env_setting("VARLEN_KERNELS_PERSISTENT_EXCHANGE", "global"):
                assert torch.equal(auto, model(inp, lengths, state)[0])


def packed_rows(lengths, T):
    """Row of each valid token (t, b) in the packed layout (csrc/cuda/token_plan.h),
    computed here from its definition: steps in order, each step's running
    sequences longest first (ties in batch order)."""
    order = sorted(range(len(lengths)), key=lambda b: (-int(lengths[b]), b))
    rows, r = {}, 0
    for t in range(T):
        for b in order:
            if lengths[b] > t:
                rows[t, b] = r
                r += 1
    return rows


def mm_calls(fn):
    """The aten::mm calls fn() makes (the profiler sees those made inside the ops)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_layer_gemms_over_tokens(cell):
    """A bidirectional layer on the persistent path runs one GEMM for both
    directions' input projection, and in the backward one for the input
    gradient of both plus the two weight gradients of each; the same values as
    nn.* + packed."""
    ref, x, lengths, hx = sample_inputs(cell, T=6, B=9, I=5, H=12, bidirectional=True)
    m = MaskedRNN.from_torch(ref)
    x = x.requires_grad_()
    with rnn_path("persistent"), emulate_cuda(), emulated_device(sm_count=4):
        out = {}
        assert mm_calls(lambda: out.setdefault("y", m(x, lengths, hx)[0])) == 1
        assert mm_calls(lambda: out["y"].nan_to_num().sum().backward()) == 5
        check_against_packed(cell, num_layers=1, bidirectional=True, device="cpu", T=6, B=9,
                             H=12, seed=4)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_paths_agree_on_workspaces(cell, reverse, gpu):
    """The persistent and per-step forwards give the same outputs and the same
    workspaces: the packed token layout (row of token (t, b) as packed_rows says;
    each row is that token's gates, as a lone step of the cell gives them),
    zero past the valid tokens; and each path's backward takes the other's
    workspaces."""
    T, B, H = 6, 7, 20
    lengths = (6, 0, 2, 1, 6, 3, 5)
    args = layer_args(cell, gpu, False, T=T, B=B, I=3, H=H, lengths=lengths)
    args[0][4:, 2] = float("nan")  # padding of the sequence of length 2
    with device_limits(gpu, sm_count=3):
        outs = {}
        for path in ("persistent", "per_step"):
            with rnn_path(path):
                outs[path] = torch.ops.varlen_kernels.rnn_forward(*args, cell, reverse)
        for a, b in zip(outs["persistent"], outs["per_step"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        out, h_n, c_n, gates, states = outs["per_step"]
        assert gates.shape[0] == T * B and states.shape[0] == T * B
        rows = packed_rows(lengths, T)
        n = sum(lengths)
        assert len(rows) == n and (gates[n:] == 0).all() and (states[n:] == 0).all()
        pad = torch.arange(T, device=gpu)[:, None] >= args[1][None, :]
        assert (out[pad] == 0).all()
        # Token (t, b)'s row holds that step's h_prev in its first H state
        # columns: h0 at the sequence's first step, else the output of the step before.
        x, _, h0, _, w_ih, w_hh = args[:6]
        for (t, b), r in rows.items():
            first = t == (lengths[b] - 1 if reverse else 0)
            h_prev = h0[b] if first else out[t + 1 if reverse else t - 1, b]
            torch.testing.assert_close(states[r, :H], h_prev, rtol=1e-12, atol=1e-13)
        grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(2),
                             dtype=t.dtype).to(gpu) for t in (out, h_n, c_n)]
        back = {}
        for fwd_path, bwd_path in [("persistent", "per_step"), ("per_step", "persistent")]:
            _, _, _, gates, states = outs[fwd_path]
            with rnn_path(bwd_path):
                back[bwd_path] = torch.ops.varlen_kernels.rnn_backward(
                    *grads, x, args[1], w_ih, w_hh, gates, states, cell, reverse)
        for a, b in zip(back["persistent"], back["per_step"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.emulation
@pytest.mark.parametrize("cell", CELLS + ["lstm_proj"])
@pytest.mark.parametrize("path", ["persistent", "per_step"])
def test_workspaces_are_the_cpu_kernels_layout(cell, path):
    """One workspace layout on every backend: the CUDA kernels' workspaces equal
    the CPU kernels' in their valid rows, both directions, and the backward of
    either takes the other's (lstm_proj: an LSTM with proj_size 5)."""
    T, B, H, P = 5, 6, 12, 5
    lengths = (5, 0, 2, 5, 1, 3)
    proj = cell == "lstm_proj"
    cell = "lstm" if proj else cell
    args = layer_args(cell, "cpu", False, T=T, B=B, I=4, H=H, lengths=lengths, seed=4)
    w_hr = []
    if proj:  # h0 and W_hh over P features, and W_hr
        args[2], args[5] = args[2][:, :P].clone(), args[5][:, :P].clone()
        w_hr = [torch.randn(P, H, dtype=torch.float64)]
    n = sum(lengths)
    g = torch.Generator().manual_seed(5)
    for reverse in (False, True):
        cpu = torch.ops.varlen_kernels.rnn_forward(*args, cell, reverse, *w_hr)
        grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in cpu[:3]]
        x, lens, _, _, w_ih, w_hh = args[:6]
        cpu_back = torch.ops.varlen_kernels.rnn_backward(*grads, x, lens, w_ih, w_hh, *cpu[3:],
                                                         cell, reverse, *w_hr)
        with rnn_path(path), emulate_cuda(), emulated_device(sm_count=2):
            emu = torch.ops.varlen_kernels.rnn_forward(*args, cell, reverse, *w_hr)
            emu_back = torch.ops.varlen_kernels.rnn_backward(*grads, x, lens, w_ih, w_hh,
                                                             *cpu[3:], cell, reverse, *w_hr)
        for a, b in zip(cpu[:3], emu[:3]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        for a, b in zip(cpu[3:], emu[3:]):
            assert (b[n:] == 0).all()
            torch.testing.assert_close(a[:n], b[:n], rtol=1e-12, atol=1e-13)
        cpu_from_emu = torch.ops.varlen_kernels.rnn_backward(*grads, x, lens, w_ih, w_hh,
                                                             *emu[3:], cell, reverse, *w_hr)
        for a, b, c in zip(cpu_back, emu_back, cpu_from_emu):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-13)


def token_gemm(setting):
    """Forces VARLEN_KERNELS_TOKEN_GEMM: 'auto', 'all_rows' or 'valid_rows'."""
    return env_setting("VARLEN_KERNELS_TOKEN_GEMM", setting)


def grouped_gemms(fn):
    """How many grouped GEMMs fn() runs, with _grouped_mm as loose as on a GPU
    (rows past the count unwritten: NaN here)."""
    with grouped_mm_as_on_gpu() as grouped:
        fn()
    return grouped.calls


@pytest.mark.emulation
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("setting,grouped", [("auto", True), ("valid_rows", True),
                                             ("all_rows", False)])
def test_bfloat16_token_gemms_over_valid_tokens(cell, bidirectional, setting, grouped):
    """bfloat16 with 16-byte aligned rows on sm_90 (the emulated device's): the
    input projection, the input gradient and both weight gradients are grouped
    GEMMs whose row count (the valid tokens) is read on the device (four per
    layer, six for both directions of a bidirectional one), by default as with
    'valid_rows'; 'all_rows' runs at::mm over every row instead. Both are within
    2x PyTorch's own bfloat16 error, values and every gradient, with zero-length
    sequences and padding, with the grouped GEMM's rows past the count NaN."""
    T, B, H = 7, 11, 16
    with token_gemm(setting), emulate_cuda(), emulated_device(sm_count=4):
        calls = grouped_gemms(lambda: check_low_precision(cell, torch.bfloat16, T, B, H, "cpu",
                                                          bidirectional))
    # check_low_precision runs our op in bfloat16 once, forward and backward; a
    # bidirectional layer projects its input for both directions at once and
    # takes the input gradient of both at once
    assert calls == ((6 if bidirectional else 4) if grouped else 0)


@pytest.mark.emulation
def test_token_gemms_need_bfloat16_and_aligned_rows():
    """float32, and bfloat16 rows that are not 16-byte multiples (H = 12), take
    at::mm over all rows: _grouped_mm's fast path is bfloat16-only and anything
    else would read the token count on the host."""
    for dtype, H in ((torch.float32, 16), (torch.bfloat16, 12)):
        with emulate_cuda(), emulated_device(sm_count=4):
            assert grouped_gemms(lambda: check_low_precision("gru", dtype, 5, 6, H, "cpu")) == 0


@pytest.mark.emulation
def test_token_gemm_setting_is_checked():
    x, lengths, h0, c0, *w = layer_args("gru", "cpu", False)
    with token_gemm("valid"), emulate_cuda():
        with pytest.raises(RuntimeError, match="VARLEN_KERNELS_TOKEN_GEMM must be 'auto', "
                                               "'all_rows' or 'valid_rows', got 'valid'"):
            torch.ops.varlen_kernels.rnn_forward(x, lengths, h0, c0, *w, "gru", False)


@pytest.mark.emulation
@pytest.mark.parametrize("cell,proj_size,sizes", [
    ("gru", 0, r"persistent forward kernel does not fit this device for hidden_size 40, "
               r"3 gate\(s\)"),
    ("lstm", 7, r"persistent projection forward kernel does not fit this device for "
                r"hidden_size 40, proj_size 7, dtype Double"),
])
def test_persistent_path_that_does_not_fit_falls_back_or_fails_when_forced(cell, proj_size, sizes):
    """Weight slices beyond the device's shared memory: 'auto' takes the per-step
    path (same results), 'persistent' is an error that names the sizes."""
    ref, x, lengths, hx = sample_inputs(cell, T=5, B=6, I=3, H=40, proj_size=proj_size)
    m = MaskedRNN.from_torch(ref)
    expected = m(x, lengths, hx)[0]
    with emulate_cuda(), emulated_device(max_shared_per_block=4096):
        with rnn_path("auto"):
            torch.testing.assert_close(m(x, lengths, hx)[0], expected, rtol=1e-12, atol=1e-13)
        with rnn_path("persistent"):
            with pytest.raises(RuntimeError, match=sizes):
                m(x, lengths, hx)


@pytest.mark.emulation
@pytest.mark.parametrize("cell,proj_size,which", [
    ("gru", 0, "persistent forward"), ("lstm", 5, "persistent projection forward")])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cooperative_launch_refused_at_run_time_falls_back(cell, proj_size, which, bidirectional):
    """A cooperative launch that the occupancy queries allowed but the device
    refuses at run time (fewer SMs than it reports, as under MPS): 'auto' takes
    the per-step path (the same values and every gradient as nn.* + packed, no
    cooperative launch), a forced persistent path is an error naming the kernel
    and the grid (two directions first try a launch each)."""
    counts = emulation_module().launch_counts
    with rnn_path("auto:grid"), emulate_cuda(), emulated_device(runtime_sm_count=1):
        before = counts()
        check_against_packed(cell, num_layers=1, bidirectional=bidirectional, device="cpu", T=6,
                             B=9, H=24, proj_size=proj_size, seed=9)
        assert counts()[1] == before[1] and counts()[0] > before[0]
    ref, x, lengths, hx = sample_inputs(cell, T=5, B=6, I=3, H=24, proj_size=proj_size,
                                        bidirectional=bidirectional)
    m = MaskedRNN.from_torch(ref)
    with rnn_path("persistent:grid"), emulate_cuda(), emulated_device(runtime_sm_count=1):
        with pytest.raises(RuntimeError, match=rf"VARLEN_KERNELS_RNN_PATH=persistent: the device "
                                               rf"refused the {which} kernel's launch of 12 CTAs "
                                               r"\(cooperative\) at run time"):
            m(x, lengths, hx)


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
@pytest.mark.parametrize("gemm", ["blas", "aten"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_per_step_gemms_direct_and_as_aten_ops(cell, gemm, bidirectional, gpu):
    """The per-step path's GEMMs made either way (VARLEN_KERNELS_STEP_GEMM: on a
    GPU 'blas' calls cuBLAS directly, 'aten' through at::mm_out / addmm_; under
    the emulation both are ATen's): float64 values and every gradient against
    nn.* + packed, two layers (the float64 backward accumulates into the carry,
    beta = 1); bfloat16 within 2x PyTorch's own error (the product in the
    storage type, added to the float carry by the next step's kernel);
    lstm_proj: proj_size 5 (four GEMMs a step)."""
    proj_size = 5 if cell == "lstm_proj" else 0
    cell = "lstm" if proj_size else cell
    with rnn_path("per_step"), env_setting("VARLEN_KERNELS_STEP_GEMM", gemm):
        check_against_packed(cell, num_layers=2, bidirectional=bidirectional, device=gpu, T=7,
                             B=9, H=12, proj_size=proj_size, seed=11)
        check_low_precision(cell, torch.bfloat16, 7, 9, 16, gpu, bidirectional,
                            proj_size=proj_size)


def per_step_blas_and_aten(cell, dtype, gpu, H=16):
    """The per-step path's output and every gradient, two bidirectional layers,
    zero lengths, with VARLEN_KERNELS_STEP_GEMM 'blas' and 'aten'."""
    proj_size = 5 if cell == "lstm_proj" else 0
    torch.manual_seed(0)
    ref = (torch.nn.GRU if cell == "gru" else torch.nn.LSTM)(
        6, H, num_layers=2, bidirectional=True, **({"proj_size": proj_size} if proj_size else {}))
    m = MaskedRNN.from_torch(ref).to(gpu, dtype)
    x = torch.randn(9, 7, 6, device=gpu, dtype=dtype)
    lengths = torch.tensor([9, 0, 3, 8, 1, 9, 5], device=gpu)
    results = {}
    with rnn_path("per_step"):
        for gemm in ("blas", "aten"):
            with env_setting("VARLEN_KERNELS_STEP_GEMM", gemm):
                xx = x.clone().requires_grad_()
                y, _ = m(xx, lengths)
                grads = torch.autograd.grad(y.double().square().sum(), [xx, *m.parameters()])
                results[gemm] = [y, *grads]
    return results["blas"], results["aten"]


@pytest.mark.parametrize("cell,H", [("lstm", 16), ("gru", 16), ("lstm_proj", 16), ("lstm", 80)])
@pytest.mark.parametrize("dtype,precision", [(torch.bfloat16, "ieee"), (torch.float16, "ieee"),
                                             (torch.float32, "ieee"), (torch.float32, "tf32"),
                                             (torch.float64, "ieee")])
def test_per_step_gemms_direct_equal_atens_bitwise(cell, H, dtype, precision, gpu):
    """The direct cuBLAS calls are the calls at::mm makes under torch's default
    settings, TF32 or not: the per-step path's output and every gradient are
    bitwise those of VARLEN_KERNELS_STEP_GEMM=aten (lstm_proj: proj_size 5, four
    GEMMs a step)."""
    with matmul_precision(precision):
        blas, aten = per_step_blas_and_aten(cell, dtype, gpu, H)
    for a, b in zip(blas, aten):
        assert torch.equal(a, b)


@contextlib.contextmanager
def cublas_setting(name):
    """A torch setting under which the per-step GEMMs are ATen's whatever
    VARLEN_KERNELS_STEP_GEMM says (at::mm then differs from the direct calls)."""
    matmul = torch.backends.cuda.matmul
    if name == "bf16_reduction_off":
        old = matmul.allow_bf16_reduced_precision_reduction
        matmul.allow_bf16_reduced_precision_reduction = False
        try:
            yield
        finally:
            matmul.allow_bf16_reduced_precision_reduction = old
    else:  # "cublaslt"
        old = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            yield
        finally:
            torch.backends.cuda.preferred_blas_library(old)


@pytest.mark.parametrize("setting", ["bf16_reduction_off", "cublaslt"])
def test_per_step_gemms_take_aten_under_other_torch_settings(setting, gpu):
    """Reduced-precision reductions disallowed, or cuBLASLt preferred: the direct
    calls give way to ATen's (bitwise the same as 'aten'), bfloat16 LSTM."""
    with cublas_setting(setting):
        blas, aten = per_step_blas_and_aten("lstm", torch.bfloat16, gpu)
    for a, b in zip(blas, aten):
        assert torch.equal(a, b)


@pytest.mark.emulation
def test_step_gemm_setting_is_checked():
    args = layer_args("gru", "cpu", False)
    with emulate_cuda(), rnn_path("per_step"), env_setting("VARLEN_KERNELS_STEP_GEMM", "cublas"):
        with pytest.raises(RuntimeError, match="VARLEN_KERNELS_STEP_GEMM must be 'blas' or "
                                               "'aten', got 'cublas'"):
            torch.ops.varlen_kernels.rnn_forward(*args, "gru", False)


@pytest.mark.emulation
def test_rnn_path_setting_is_checked():
    args = layer_args("gru", "cpu", False)
    with emulate_cuda(), rnn_path("fastest"):
        with pytest.raises(RuntimeError, match="VARLEN_KERNELS_RNN_PATH must be 'auto', "
                                               "'persistent' or 'per_step', got 'fastest'"):
            torch.ops.varlen_kernels.rnn_forward(*args, "gru", False)


def test_small_div_is_exact_with_the_gpus_reciprocal():
    """small_div (csrc/cuda/rnn_persistent.cuh), the persistent kernels' a / b for
    0 <= a < 2^20 (their walks over a tile's elements divide by its columns): the
    whole part of (a + 0.5) * rcp in float32 arithmetic, rcp being 1 / b to
    within 2 ulp on a GPU (__fdividef) and rounded under the CPU execution of
    CUDA. For every b up to 1024 and the a where an error would show (the
    multiples of b, and the numbers just below them), with reciprocals 2 float
    steps below and above the rounded 1 / b, and that one: the quotient is
    exact."""
    def steps(t, toward, n=2):
        for _ in range(n):
            t = torch.nextafter(t, torch.tensor(toward, dtype=t.dtype))
        return t

    for b in range(1, 1025):
        k = torch.arange(1, (1 << 20) // b + 1, dtype=torch.int64)
        a = torch.cat([k * b - 1, k * b])
        a = a[a < (1 << 20)]
        rounded = torch.tensor(1.0 / b, dtype=torch.float32)
        for rcp in (steps(rounded, 0.0), rounded, steps(rounded, 2.0)):
            quotient = ((a.to(torch.float32) + 0.5) * rcp).to(torch.int64)
            assert torch.equal(quotient, a // b), b


# ------------------------------------------------- lengths in host memory
# A GPU op given CPU lengths makes the length plan on the host (no host read
# of device memory) and runs its GEMMs over tokens over exactly the valid
# ones; the emulated ops do the same inside lengths_in_host_memory().


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("path", ["persistent", "per_step"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_in_host_memory_match_packed(cell, path, bidirectional, gpu):
    """Lengths on the CPU for the CUDA ops: values and every gradient as nn.* +
    packed, two layers, float64, NaN in the padding, on both paths (several
    CTAs, tiles that finish early)."""
    with rnn_path(path), device_limits(gpu, sm_count=3 * (2 if bidirectional else 1)):
        check_against_packed(cell, num_layers=2, bidirectional=bidirectional, device=gpu, T=9,
                             B=40, H=50, seed=7, host_lengths=True)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_in_host_memory_projection_lstm(bidirectional, gpu):
    check_against_packed("lstm", num_layers=2, bidirectional=bidirectional, device=gpu, T=6,
                         B=9, H=12, proj_size=5, seed=8, host_lengths=True)


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
@pytest.mark.parametrize("path", ["persistent", "per_step"])
@pytest.mark.parametrize("reverse", [False, True])
def test_host_and_device_plans_agree(cell, path, reverse, gpu):
    """The plan made on the host and the one made on the device give the same
    outputs, workspaces (the packed layout, zero past the valid tokens) and
    gradients, with zero-length sequences, ties in the lengths, and a last step
    that no sequence reaches (the per-step loops stop at the longest length
    where it is known on the host). lstm_proj: proj_size 5."""
    T, B, H, P = 6, 7, 20, 5
    lengths = (5, 0, 2, 1, 5, 2, 4)
    proj = cell == "lstm_proj"
    cell = "lstm" if proj else cell
    args = layer_args(cell, gpu, False, T=T, B=B, I=3, H=H, lengths=lengths)
    w_hr = []
    if proj:  # h0 and W_hh over P features, and W_hr
        args[2], args[5] = args[2][:, :P].clone(), args[5][:, :P].clone()
        w_hr = [torch.randn(P, H, dtype=torch.float64, device=gpu)]
    args[0][4:, 2] = float("nan")
    args[0][5:] = float("nan")
    grads = None
    results, launches = {}, {}
    count = emulation_module().launch_counts if gpu != "cuda" else lambda: (0,)
    with rnn_path(path), device_limits(gpu, sm_count=3):
        for where, lens in (("host", args[1].cpu()), ("device", args[1])):
            with lengths_in_host_memory(where == "host"):
                before = count()[0]
                fwd = torch.ops.varlen_kernels.rnn_forward(args[0], lens, *args[2:], cell, reverse,
                                                           *w_hr)
                launches[where] = count()[0] - before
                if grads is None:
                    g = torch.Generator().manual_seed(3)
                    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(gpu)
                             for t in fwd[:3]]
                x, _, _, _, w_ih, w_hh = args[:6]
                bwd = torch.ops.varlen_kernels.rnn_backward(*grads, x, lens, w_ih, w_hh, *fwd[3:],
                                                            cell, reverse, *w_hr)
            results[where] = (fwd, bwd)
    n = sum(lengths)
    host, device = results["host"], results["device"]
    for a, b in zip(host[0] + host[1], device[0] + device[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    out = host[0][0]
    assert (out[5:] == 0).all() and not out[:5].isnan().any()
    for ws in host[0][3:]:
        assert (ws[n:] == 0).all()
    assert not any(t.isnan().any() for t in host[1])
    if gpu != "cuda":
        # per step, one step that no sequence reaches is skipped: one step
        # kernel fewer (two with a projection: the step's and the commit's);
        # the persistent path launches one kernel either way
        fewer = (2 if proj else 1) if path == "per_step" else 0
        assert launches["device"] - launches["host"] == fewer


def mm_shapes(fn):
    """The input shapes of every aten::mm call fn() makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    return [tuple(tuple(s) for s in e.input_shapes[:2])
            for e in prof.events() if e.name == "aten::mm"]


@pytest.mark.emulation
@pytest.mark.parametrize("bidirectional", [False, True])
def test_lengths_in_host_memory_gemms_over_exactly_the_valid_tokens(bidirectional):
    """With the token count known on the host, the input projection, the input
    gradient and both weight gradients are at::mm over exactly the N valid
    token rows (float32 here, where the device count takes every row); the
    rows past N of the projections are unspecified (NaN under the emulation)
    and nothing reads them: the results are nn.* + packed's."""
    T, B, I, H = 6, 9, 5, 12
    ref, x, lengths, hx = sample_inputs("gru", T=T, B=B, I=I, H=H, bidirectional=bidirectional,
                                        dtype=torch.float32)
    N = int(lengths.sum())
    m = MaskedRNN.from_torch(ref)
    G = 3 * H * (2 if bidirectional else 1)
    with rnn_path("persistent"), emulate_cuda(), emulated_device(sm_count=4):
        for host in (True, False):
            rows = N if host else T * B
            out = {}
            with lengths_in_host_memory(host):
                fwd = mm_shapes(lambda: out.setdefault("y", m(x, lengths, hx)[0]))
                bwd = mm_shapes(lambda: out["y"].nan_to_num().sum().backward())
            assert fwd == [((rows, I), (I, G))]
            if bidirectional:  # one input gradient for both directions, weights each
                assert sorted(bwd) == sorted([((rows, G), (G, I))] +
                                             [((3 * H, rows), (rows, I))] * 2 +
                                             [((3 * H, rows), (rows, H))] * 2)
            else:
                assert sorted(bwd) == sorted([((rows, G), (G, I)), ((G, rows), (rows, I)),
                                              ((G, rows), (rows, H))])
        check_against_packed("gru", bidirectional=bidirectional, device="cpu", T=T, B=B, H=H,
                             dtype=torch.float32, seed=2, host_lengths=True)


@pytest.mark.parametrize("bad", [-1, 7])
def test_lengths_in_host_memory_out_of_range_is_a_clear_error(bad, gpu):
    """Checked on the host, before any launch: the index and the value."""
    x, lengths, *rest = layer_args("gru", gpu, False, T=6, B=3, lengths=(6, 2, 1))
    lengths = lengths.cpu()
    lengths[1] = bad
    with lengths_in_host_memory():
        with pytest.raises(RuntimeError, match=rf"lengths must be in \[0, T\] with T=6 \(the "
                                               rf"input's time dimension\), got lengths\[1\] = "
                                               rf"{bad}"):
            torch.ops.varlen_kernels.rnn_forward(x, lengths, *rest, "gru", False)


@requires_cuda
def test_lengths_in_host_memory_refused_in_cuda_graph_capture():
    """A graph would replay the lengths of its capture: a clear error, not a
    silently stale plan."""
    m = MaskedRNN(3, 4, cell="gru").cuda()
    x = torch.randn(5, 2, 3, device="cuda")
    lengths = torch.tensor([5, 2])
    m(x, lengths.cuda())  # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="lengths in host memory cannot be captured in a CUDA "
                                           "graph"):
        with torch.cuda.graph(g):
            m(x, lengths)


@pytest.mark.parametrize("host_lengths", [False, True])
def test_zero_length_batches(host_lengths, device):
    """B = 0, all lengths 0, and T = 0 on every backend, the lengths on the
    device or (host_lengths) in host memory."""
    m = MaskedRNN(3, 4, cell="lstm", bidirectional=True).double().to(device)
    for T, B, lengths in [(5, 0, []), (5, 3, [0, 0, 0]), (0, 2, [0, 0])]:
        x = torch.randn(T, B, 3, dtype=torch.float64, device=device, requires_grad=True)
        lengths = torch.tensor(lengths, dtype=torch.long, device="cpu" if host_lengths else device)
        with lengths_in_host_memory(host_lengths):
            y, (h, c) = m(x, lengths)
            assert y.shape == (T, B, 8) and (y == 0).all() and (h == 0).all() and (c == 0).all()
            gx, = torch.autograd.grad(y.sum() + h.sum() + c.sum(), [x])
        assert gx.shape == x.shape and (gx == 0).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bfloat16_no_valid_token_gives_zero_gradients(cell, gpu):
    """bfloat16 with 16-byte aligned rows, where the GEMMs over tokens take the
    valid tokens only: with none (every length 0) the weight and input
    gradients are exactly zero (the grouped reductions never run over no row)."""
    m = MaskedRNN(16, 16, cell=cell).to(torch.bfloat16).to(gpu)
    x = torch.randn(5, 3, 16, dtype=torch.bfloat16, device=gpu, requires_grad=True)
    h0 = torch.randn(1, 3, 16, dtype=torch.bfloat16, device=gpu, requires_grad=True)
    hx = (h0, torch.zeros_like(h0)) if cell == "lstm" else h0
    with grouped_mm_as_on_gpu(gpu) as grouped:
        y, h = m(x, torch.zeros(3, dtype=torch.long, device=gpu), hx)
        h_n = h[0] if cell == "lstm" else h
        grads = torch.autograd.grad(y.float().sum() + h_n.float().sum(),
                                    [x, h0, *m.parameters()])
    assert gpu == "cuda" or grouped.calls == 4
    assert (grads[0] == 0).all() and (grads[1] == 1).all()  # h_n = h0
    for name, g in zip([n for n, _ in m.named_parameters()], grads[2:]):
        assert (g == 0).all(), name


# --------------------------------------------------------------------- losses
@pytest.mark.parametrize("C", [2, 257, 32000, 131072])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch(C, dtype, gpu):
    torch.manual_seed(C)
    B, T = (4, 6) if C < 100_000 else (2, 3)
    lengths = torch.tensor([T, 0, 3, 1][:B], device=gpu)
    valid = torch.arange(T, device=gpu)[None] < lengths[:, None]
    logits = torch.randn(B, T, C, device=gpu, dtype=torch.float64) * 3
    target = torch.randint(0, C, (B, T), device=gpu)
    exact = F.cross_entropy(logits[valid], target[valid], label_smoothing=0.1)
    x = logits.to(dtype)
    x[~valid] = float("nan")
    target[~valid] = -3
    x.requires_grad_()
    out = masked_cross_entropy(x, target, lengths, label_smoothing=0.1, batch_first=True)
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


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_minus_inf_logits_in_valid_rows(label_smoothing, reduction, device):
    """-inf logits (masked-out classes) give what F.cross_entropy gives, never NaN
    from exp(-inf - -inf); also at the start of a row and in whole vectors."""
    C = 37
    logits = torch.randn(2, 3, C, dtype=torch.float64, device=device) * 2
    logits[0, 0, :9] = float("-inf")    # the first vectors of a row
    logits[0, 1, 20:] = float("-inf")
    logits[1, 0, ::2] = float("-inf")
    target = torch.tensor([[12, 3, 5], [1, 2, 0]], device=device)
    lengths = torch.tensor([3, 1], device=device)
    valid = torch.arange(3, device=device)[None] < lengths[:, None]
    x = logits.requires_grad_()
    out = masked_cross_entropy(x, target, lengths, reduction=reduction, label_smoothing=label_smoothing,
                               batch_first=True)
    xv = logits.detach()[valid].clone().requires_grad_()
    ref = F.cross_entropy(xv, target[valid], reduction=reduction, label_smoothing=label_smoothing)
    if reduction == "none":
        out = out[valid]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, equal_nan=False)
    if label_smoothing == 0.0:  # with smoothing the loss is inf, as in PyTorch
        assert torch.isfinite(out).all()
        g, = torch.autograd.grad(out.sum(), [x])
        g_ref, = torch.autograd.grad(ref.sum(), [xv])
        torch.testing.assert_close(g[valid], g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("C", [8, 13, 64])
def test_cross_entropy_unaligned_rows(offset, C, device):
    """Rows that start off a 16-byte boundary, and C not a multiple of the vector
    width, take the element-wise path for their tails; results are the same."""
    base = torch.randn(4 * 5 * C + offset, dtype=torch.float32, device=device)
    logits = base[offset:].view(4, 5, C).requires_grad_()
    target = torch.randint(0, C, (4, 5), device=device)
    lengths = torch.tensor([5, 2, 0, 4], device=device)
    valid = torch.arange(5, device=device)[None] < lengths[:, None]
    out = masked_cross_entropy(logits, target, lengths, label_smoothing=0.05, batch_first=True)
    xv = logits.detach()[valid].double().requires_grad_()
    ref = F.cross_entropy(xv, target[valid], label_smoothing=0.05)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    g, = torch.autograd.grad(out, [logits])
    g_ref, = torch.autograd.grad(ref, [xv])
    torch.testing.assert_close(g[valid].double(), g_ref, rtol=1e-4, atol=1e-6)
    assert (g[~valid] == 0).all()


def test_cross_entropy_opcheck_and_all_padding(gpu):
    x = torch.randn(6, 5, device=gpu, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 5, (6,), device=gpu)
    m = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=gpu)
    torch.library.opcheck(torch.ops.varlen_kernels.cross_entropy_forward.default, (x, t, m, 0.1))
    out = masked_cross_entropy(x.view(2, 3, 5), t.view(2, 3), torch.zeros(2, dtype=torch.long, device=gpu),
                               batch_first=True)
    assert out.item() == 0.0 and (torch.autograd.grad(out, [x])[0] == 0).all()


@pytest.mark.parametrize("kind", ["mse", "bce_with_logits"])
@pytest.mark.parametrize("reduce_rows", [False, True])
def test_elementwise_loss_opcheck(kind, reduce_rows, gpu):
    """Values against F.* on every backend are in test_losses.py."""
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(7, 5, generator=g, dtype=torch.float64).to(gpu).requires_grad_()
    target = torch.rand(7, 5, generator=g, dtype=torch.float64).to(gpu)
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1], dtype=torch.bool, device=gpu)
    torch.library.opcheck(torch.ops.varlen_kernels.elementwise_loss_forward.default,
                          (pred, target, mask, None, kind, reduce_rows))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_elementwise_loss_op_on_gpu(dtype, reduction, gpu):
    """masked_elementwise_loss_forward's CUDA kernels against its CPU kernels:
    lengths on the device, or a mask; losses, counted rows, total and scale;
    the gradients; opcheck (float64). Values in every backend against F.* are
    in test_losses.py."""
    g = torch.Generator().manual_seed(8)
    B, T, Fe = 5, 6, 3
    x = torch.randn(B * T, Fe, generator=g, dtype=torch.float64).to(dtype)
    y = torch.rand(B * T, Fe, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.tensor([6, 0, 2, 5, 1])
    mask = torch.rand(B * T, generator=g) > 0.4
    pw = (torch.rand(Fe, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    op = torch.ops.varlen_kernels.masked_elementwise_loss_forward.default
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for kind, p in (("mse", None), ("bce_with_logits", pw)):
        for m, ln in ((None, lengths), (mask, None)):
            outs, grads = [], []
            for dev in ("cpu", gpu):
                xi = x.to(dev).requires_grad_()
                o = op(xi, y.to(dev), None if m is None else m.to(dev), None if ln is None else ln.to(dev),
                       True, None if p is None else p.to(dev), kind, reduction)
                outs.append([t.cpu() for t in o])
                grads.append(torch.autograd.grad(o[2] + o[0].sum(), [xi])[0].cpu())
            for a, b in zip(outs[1], outs[0]):
                torch.testing.assert_close(a, b, **tol)
            torch.testing.assert_close(grads[1], grads[0], **tol)
    if dtype == torch.float64:
        torch.library.opcheck(op, (x.to(gpu).requires_grad_(), y.to(gpu), None, lengths.to(gpu), True,
                                   pw.to(gpu), "bce_with_logits", reduction))


def test_packed_reference_runs_cudnn_in_ieee_fp32():
    """The nn.* reference never runs in TF32 (cuDNN's default for float32 RNNs)."""
    seen = []

    class Probe(torch.nn.GRU):
        def forward(self, *args, **kwargs):
            seen.append(torch.backends.cudnn.rnn.fp32_precision)
            return super().forward(*args, **kwargs)

    before = torch.backends.cudnn.rnn.fp32_precision
    x = torch.randn(4, 2, 3)
    run_packed(Probe(3, 5), x, torch.tensor([4, 2]), torch.zeros(1, 2, 5), False)
    assert seen == ["ieee"] and torch.backends.cudnn.rnn.fp32_precision == before


@pytest.mark.parametrize("special", ["nan", "inf"])
@pytest.mark.parametrize("offset", [0, 1])
def test_cross_entropy_nan_and_inf_logits_in_valid_rows(special, offset, device):
    """A NaN logit at a valid step gives NaN, as in PyTorch. A +inf logit makes
    the logsumexp +inf: the loss is +inf (inf - NaN where the target's own logit
    is +inf), what the math gives; PyTorch's log_softmax gives NaN for the whole
    row. Same in the vector and the element-wise paths, on every backend."""
    C = 10
    base = torch.randn(2 * 4 * C + offset, dtype=torch.float32, device=device)
    logits = base[offset:].view(2, 4, C)
    for b, t, c in [(0, 0, 0), (0, 1, 9), (1, 0, 4)]:
        logits[b, t, c] = float(special)
    target = torch.tensor([[3, 3, 1, 0], [2, 5, 0, 0]], device=device)
    lengths = torch.tensor([4, 2], device=device)
    valid = torch.arange(4, device=device)[None] < lengths[:, None]
    out = masked_cross_entropy(logits, target, lengths, reduction="none", batch_first=True)
    ref = F.cross_entropy(logits[valid].double(), target[valid], reduction="none")
    if special == "inf":
        hit = logits[valid].gather(1, target[valid][:, None])[:, 0] == float("inf")
        ref = torch.where(torch.isnan(ref) & ~hit, float("inf"), ref)
    torch.testing.assert_close(out[valid].double(), ref, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_cross_entropy_backward_op_refuses_bad_targets(device):
    """The backward op checks targets too (it is callable on its own). On a GPU the
    check is a device-side assert, which ends the process's CUDA context: a child
    process meets it."""
    code = f"""
        logits = torch.randn(3, 4, dtype=torch.float64, device={device!r})
        target = torch.tensor([1, 7, 2], device={device!r})
        mask = torch.tensor([True, True, False], device={device!r})
        grad = torch.ones(3, dtype=torch.float64, device={device!r})
        torch.ops.varlen_kernels.cross_entropy_backward(grad, logits, target, mask, grad, 0.0)
        """
    match = r"outside the class range \[0, 4\)|target out of class range"
    if device == "cuda":
        fails_in_child_process(code, match)
        return
    with pytest.raises(RuntimeError, match=match):
        exec(textwrap.dedent(code), {"torch": torch})
