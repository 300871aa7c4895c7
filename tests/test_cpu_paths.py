"""The CPU kernels' ways of computing the per-step products with W_hh
(csrc/cpu/masked_rnn_cpu.cpp): W_hh packed once per call for the panel kernel
(csrc/cpu/panel_gemm.h, float32, the default) or for MKL's packed GEMM
(float32; bfloat16 through MKL's bf16 GEMM when asked for), and the ATen path
(float64, half, bfloat16 by default, and VARLEN_KERNELS_CPU_GEMM=aten); and the
packed path's two ways of sharing threads (VARLEN_KERNELS_CPU_SPLIT: the batch
rows split between threads, or each step shared). Each is checked against nn.*
on packed sequences, and the paths against each other."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import CELLS, check_against_packed, run_packed, sample_inputs, states_of
from varlen_kernels import MaskedRNN

pytestmark = pytest.mark.cpu_only


@pytest.fixture
def gemm(monkeypatch):
    """Sets VARLEN_KERNELS_CPU_GEMM for the test (read by the kernels at each call)."""
    def set_path(name):
        monkeypatch.setenv("VARLEN_KERNELS_CPU_GEMM", name)
    return set_path


@pytest.fixture
def threads():
    """Sets torch's thread count for the test, restored afterwards."""
    old = torch.get_num_threads()

    def set_threads(n):
        torch.set_num_threads(n)
    yield set_threads
    torch.set_num_threads(old)


# Small, with a scalar tail (H=20: 4 units past a 16-float vector), and larger
# (B=32, H=72: per-step products that MKL may share between threads).
SHAPES = [dict(T=7, B=5, H=20), dict(T=16, B=32, H=72)]


@pytest.fixture
def split(monkeypatch):
    """Sets VARLEN_KERNELS_CPU_SPLIT for the test."""
    def set_split(name):
        monkeypatch.setenv("VARLEN_KERNELS_CPU_SPLIT", name)
    return set_split


def _skip_without_mkl(path):
    if path == "mkl" and not torch.backends.mkl.is_available():
        pytest.skip("torch is built without MKL")


@pytest.mark.parametrize("path", ["panel", "mkl"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{T}B{B}H{H}".format(**s))
@pytest.mark.parametrize("nthreads,how", [(1, "auto"), (2, "rows"), (2, "steps")])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_paths_match_packed(path, cell, shape, nthreads, how, bidirectional, gemm, threads,
                                   split):
    """float32 through the panel kernel, or MKL's packed GEMM (required, so a
    silent fallback fails): values and gradients as nn.* on packed sequences,
    lengths 0, 1 and T, NaN in the padding; on one thread, and on two with the
    rows split between them or each step shared (bidirectional layers run a
    direction on each thread). The shapes give products with a column tail
    (G*H and H not multiples of the 32-column panel) and, at B=32, more rows
    than one register block of the panel kernel holds."""
    _skip_without_mkl(path)
    gemm(path)
    threads(nthreads)
    split(how)
    check_against_packed(cell, bidirectional=bidirectional, num_layers=2, dtype=torch.float32,
                         **shape)


LOW_AND_FULL = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype,path", [(torch.bfloat16, "panel"), (torch.bfloat16, "aten"),
                                        (torch.float16, "panel")])
@pytest.mark.parametrize("how", ["rows", "steps"])
def test_proj_lstm_low_precision_error_close_to_torch(dtype, path, how, gemm, threads, split):
    """LSTMs with a projection in bfloat16 / half (float32 state, both products
    on the panel kernel or ATen): errors vs float64 within 2x of nn.LSTM's own
    in the same dtype, as without a projection."""
    gemm(path)
    threads(2)
    split(how)
    (e_y, e_g), (t_y, t_g) = _low_precision_errors("lstm", dtype, T=40, B=6, H=21, proj_size=11)
    assert e_y <= 2 * t_y + 1e-3, (e_y, t_y)
    assert e_g <= 2 * t_g + 1e-2, (e_g, t_g)


@pytest.mark.parametrize("path", ["panel", "mkl", "aten"])
@pytest.mark.parametrize("nthreads,how", [(1, "auto"), (2, "rows"), (2, "steps")])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_proj_lstm_paths_match_packed(path, nthreads, how, bidirectional, gemm, threads, split):
    """LSTMs with a projection, float32, on each way of running the per-step
    products (W_hh and W_hr through the panel kernel, MKL or ATen; the rows
    split between threads or each step shared): values and gradients as
    nn.LSTM(proj_size) on packed sequences. H=20, P=13: column tails and odd
    reduction lengths in all four products; B=19: several row blocks."""
    _skip_without_mkl(path)
    gemm(path)
    threads(nthreads)
    split(how)
    check_against_packed("lstm", bidirectional=bidirectional, num_layers=2, dtype=torch.float32,
                         T=9, B=19, H=20, proj_size=13)


@pytest.mark.parametrize("dtype", LOW_AND_FULL, ids=str)
def test_split_setting_is_checked(dtype, split):
    """A bad value is an error whatever the dtype (not only where it is used)."""
    split("columns")
    ref, x, lengths, hx = sample_inputs("lstm", dtype=torch.float64, requires_grad=False)
    ref, x, hx = ref.to(dtype), x.to(dtype), tuple(h.to(dtype) for h in hx)
    with pytest.raises(RuntimeError, match="VARLEN_KERNELS_CPU_SPLIT must be 'auto', 'rows' or "
                                           "'steps', got 'columns'"):
        MaskedRNN.from_torch(ref)(x, lengths, hx)


@pytest.mark.parametrize("cell", CELLS)
def test_aten_path_matches_packed(cell, gemm):
    gemm("aten")
    check_against_packed(cell, bidirectional=True, num_layers=2, dtype=torch.float32,
                         **SHAPES[1])


def _run(cell, dtype, shape, seed=0):
    """Output, states and gradients of one bidirectional 2-layer MaskedRNN."""
    ref, x, lengths, hx = sample_inputs(cell, num_layers=2, bidirectional=True, dtype=dtype,
                                        seed=seed, **shape)
    m = MaskedRNN.from_torch(ref)
    y, h = m(x, lengths, hx)
    hs = states_of(cell, h)
    loss = (y.nan_to_num() * torch.linspace(-1, 1, y.numel(), dtype=dtype).view(y.shape)).sum()
    loss = loss + sum(s.square().sum() for s in hs)
    grads = torch.autograd.grad(loss, [x, *states_of(cell, hx), *m.parameters()])
    return [y, *hs, *grads]


@pytest.mark.parametrize("path", ["panel", "mkl"])
@pytest.mark.parametrize("cell", CELLS)
def test_packed_and_aten_paths_agree(path, cell, gemm, threads):
    """The same float32 problem through a packed path and ATen's: equal to
    float32 rounding."""
    _skip_without_mkl(path)
    threads(2)
    results = {}
    for p in (path, "aten"):
        gemm(p)
        results[p] = _run(cell, torch.float32, SHAPES[1])
    for a, b in zip(results[path], results["aten"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW_AND_FULL, ids=str)
def test_gemm_choice_is_checked(dtype, gemm):
    gemm("blas")
    ref, x, lengths, hx = sample_inputs("gru", dtype=torch.float64, requires_grad=False)
    ref, x, hx = ref.to(dtype), x.to(dtype), hx.to(dtype)
    with pytest.raises(RuntimeError, match="VARLEN_KERNELS_CPU_GEMM must be auto, aten, mkl or panel, "
                                           "got 'blas'"):
        MaskedRNN.from_torch(ref)(x, lengths, hx)


def test_float64_ignores_mkl_choice(gemm):
    """float64 has no MKL path (torch exports no packed dgemm): it runs ATen's,
    exact as ever, whatever the choice."""
    gemm("mkl")
    check_against_packed("lstm", bidirectional=True, dtype=torch.float64, T=6, B=5, H=20)


def _low_precision_errors(cell, dtype, T, B, H, seed=0, proj_size=0):
    """Max abs error vs float64 of (output, grad of the weights) for MaskedRNN in
    dtype (bfloat16, half) and for nn.* in dtype on packed sequences (PyTorch's own)."""
    ref, x, lengths, hx = sample_inputs(cell, T=T, B=B, I=H, H=H, seed=seed, with_zero=True,
                                        proj_size=proj_size)
    gy = torch.randn(T, B, proj_size or H, generator=torch.Generator().manual_seed(seed + 7),
                     dtype=torch.float64)
    keep = torch.nonzero(lengths > 0).flatten()

    def grads_of(y, params, kd=None):
        g = gy if kd is None else gy.index_select(1, kd)
        return torch.autograd.grad((y.double() * g).sum(), params)

    m64 = MaskedRNN.from_torch(ref)
    y64, _ = m64(x, lengths, hx)
    g64 = grads_of(y64, list(m64.parameters()))

    def cast(t):
        return t.detach().to(dtype).requires_grad_()

    m16 = MaskedRNN.from_torch(ref).to(dtype)
    x16 = cast(x)
    hx16 = tuple(cast(h) for h in hx) if cell == "lstm" else cast(hx)
    y16, _ = m16(x16, lengths, hx16)
    g16 = grads_of(y16, list(m16.parameters()))

    ref16 = MaskedRNN.from_torch(ref).to_torch().to(dtype)
    yt, _, kd = run_packed(ref16, cast(x), lengths, tuple(cast(h) for h in hx) if cell == "lstm"
                           else cast(hx), False)
    gt = grads_of(yt, list(ref16.parameters()), kd)

    def err(y, g, kd=None):
        yy = y64 if kd is None else y64.index_select(1, kd)
        return ((y.double() - yy).abs().max().item(),
                max((a.double() - b).abs().max().item() for a, b in zip(g, g64)))
    return err(y16, g16), err(yt, gt, kd)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype,path", [(torch.bfloat16, "panel"), (torch.bfloat16, "mkl"),
                                        (torch.bfloat16, "aten"), (torch.float16, "panel"),
                                        (torch.float16, "aten")])
@pytest.mark.parametrize("nthreads,how", [(2, "rows"), (2, "steps")])
def test_low_precision_float_state_error_close_to_torch(cell, dtype, path, nthreads, how, gemm,
                                                       threads, split):
    """bfloat16 and half with float32 recurrent state, over enough steps for
    rounding to pile up: output and weight-gradient errors vs float64 within 2x
    those of nn.* run in the same dtype on packed sequences (plus a small floor
    for ties); the rows split between threads and each step shared (half and
    bfloat16 products shared between threads go to ATen, unless MKL is asked
    for)."""
    _skip_without_mkl(path)
    gemm(path)
    threads(nthreads)
    split(how)
    for H in (32, 21):  # 21: odd reduction lengths and column tails in both products
        (e_y, e_g), (t_y, t_g) = _low_precision_errors(cell, dtype, T=40, B=6, H=H)
        assert e_y <= 2 * t_y + 1e-3, (H, e_y, t_y)
        assert e_g <= 2 * t_g + 1e-2, (H, e_g, t_g)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B,H", [(11, 21), (11, 40), (37, 72)])
@pytest.mark.parametrize("nthreads", [1, 2])
def test_bfloat16_products_exact_before_rounding(cell, B, H, nthreads, threads):
    """bfloat16 per-step products (on AMX's tiles or AVX512-BF16's dot products
    where the CPU has them, else widened to float32) are the exact products
    summed in float32: one step from h0 with W_ih and the biases zero (so the
    input projection adds nothing) gives the float64 result of the same
    bfloat16 operands rounded once to bfloat16, within half a unit in the last
    place (plus float32's own error). H=21: an odd reduction length and a
    column tail; B=11: a row block of 8 and a remainder; B=37, H=72: AMX's
    blocks of 32 rows and a remainder (one thread), row tiles of 16 and a
    part (two), and a reduction of 2 tiles and a part."""
    threads(nthreads)
    torch.manual_seed(0)
    m = MaskedRNN(H, H, cell=cell).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "weight_ih" in name or "bias" in name:
                p.zero_()
    x = torch.randn(1, B, H).bfloat16()
    h0 = torch.randn(1, B, H).bfloat16()
    hx = (h0, torch.randn(1, B, H).bfloat16()) if cell == "lstm" else h0
    lengths = torch.ones(B, dtype=torch.long)
    y, _ = m(x, lengths, hx)
    m64 = MaskedRNN(H, H, cell=cell, dtype=torch.float64)
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    y64, _ = m64(x.double(), lengths, tuple(h.double() for h in hx) if cell == "lstm" else hx.double())
    ulp = 2.0 ** torch.floor(torch.log2(y64.abs().clamp_min(2.0 ** -120))) * 2.0 ** -7
    # float32's own error: its sums of the products in any order, and the cell
    # (derivatives at most 1 + |c0|) in float32
    terms = h0[0].double().abs() @ m64.weight_hh_l0.detach().abs().t()
    c0 = hx[1][0].double().abs() if cell == "lstm" else torch.zeros(B, 1, dtype=torch.float64)
    f32 = 2.0 ** -22 * (terms.amax(1, keepdim=True) + 1) * (1 + c0.amax(1, keepdim=True))
    assert ((y[0].double() - y64[0]).abs() <= 0.5 * ulp[0] + f32).all()


def _bf16_subnormal_probe():
    """One RNN step in bfloat16 from an h0 of bfloat16 subnormals, W_hh of ones:
    AVX512-BF16's dot products take subnormal inputs as zero (output 0), the
    widened float32 kernel does not (output about H * 1e-39)."""
    H, B = 32, 3
    m = MaskedRNN(H, H, cell="rnn_tanh", bias=False).to(torch.bfloat16)
    with torch.no_grad():
        m.weight_ih_l0.zero_()
        m.weight_hh_l0.fill_(1.0)
    h0 = torch.full((1, B, H), 1e-39).bfloat16()
    y, _ = m(torch.zeros(1, B, H).bfloat16(), torch.ones(B, dtype=torch.long), h0)
    return y


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_has_avx512_bf16():
    return "avx512_bf16" in _cpu_flags() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def _cpu_has_amx_bf16():
    return _cpu_has_avx512_bf16() and {"amx_tile", "amx_bf16"} <= _cpu_flags()


def _amx_tile_state_granted():
    """Whether Linux has granted this process AMX's tile data (arch_prctl
    ARCH_GET_XCOMP_PERM, bit 18 of the permitted XSAVE features)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    features = ctypes.c_uint64(0)
    sys_arch_prctl, arch_get_xcomp_perm = 158, 0x1022
    if libc.syscall(sys_arch_prctl, arch_get_xcomp_perm, ctypes.byref(features)) != 0:
        return False
    return bool(features.value >> 18 & 1)


def test_bfloat16_kernel_choice():
    """varlen_kernels._C.cpu_bfloat16_kernel() names the kernel this CPU's
    flags call for: AMX where it has AMX-BF16 and Linux grants the tile state
    (asked for by the extension on first use), else AVX512-BF16's dot
    products, else the widened float32 kernel."""
    from varlen_kernels import _C
    kernel = _C.cpu_bfloat16_kernel()
    if _cpu_has_amx_bf16() and platform.machine() == "x86_64" and _amx_tile_state_granted():
        expected = "amx"
    elif _cpu_has_avx512_bf16():
        expected = "avx512_bf16"
    else:
        expected = "widened"
    assert kernel == expected


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="needs a CPU with AVX512-BF16")
def test_avx512_bf16_kernel_runs_where_the_cpu_has_it(gemm):
    """The dispatch: on this CPU bfloat16 products run on the dot-product kernel,
    or on AMX's where the CPU has it (both take subnormal inputs as zero: the
    probe gives 0); capped at AVX2 the widened kernel runs instead (checked in
    test_cpu_capability_builds_match)."""
    gemm("panel")
    assert (_bf16_subnormal_probe() == 0).all()


@pytest.mark.parametrize("cap", ["avx512", "avx2", "default", "AVX2"])
def test_cpu_capability_builds_match(cap, tmp_path):
    """The AVX2 and portable builds of the cell kernels and of the panel kernel
    (the AVX-512 ones are the default where the CPU has them) on the panel and
    ATen paths; B=19 gives the panel kernel several row blocks and a remainder.
    bfloat16 products there run on the widened panel kernel, never on
    AVX512-BF16's dot products; capped at AVX-512, on AVX512-BF16's dot
    products where the CPU has them (never on AMX)."""
    if cap == "avx512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("needs a CPU with AVX-512")
    expected = "avx512_bf16" if cap == "avx512" and _cpu_has_avx512_bf16() else "widened"
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys, torch\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_rnn import check_against_packed\n"
        "for gemm in ('panel', 'aten'):\n"
        "    os.environ['VARLEN_KERNELS_CPU_GEMM'] = gemm\n"
        "    for cell in ['lstm', 'gru', 'rnn_tanh', 'rnn_relu']:\n"
        "        check_against_packed(cell, bidirectional=True, dtype=torch.float32, H=20)\n"
        "        check_against_packed(cell, dtype=torch.float32, T=9, B=19, H=36)\n"
        # bfloat16 on the kernel the cap allows (widened, or AVX512-BF16 dot products)
        "import test_cpu_paths as t\n"
        "os.environ['VARLEN_KERNELS_CPU_GEMM'] = 'panel'\n"
        "for cell in ['lstm', 'gru']:\n"
        "    t.test_bfloat16_products_exact_before_rounding(cell, 11, 21, 2, torch.set_num_threads)\n"
        "    t.test_bfloat16_products_exact_before_rounding(cell, 37, 72, 1, torch.set_num_threads)\n"
        "    (e_y, e_g), (t_y, t_g) = t._low_precision_errors(cell, torch.bfloat16, T=40, B=6, H=21)\n"
        "    assert e_y <= 2 * t_y + 1e-3 and e_g <= 2 * t_g + 1e-2, (e_y, t_y, e_g, t_g)\n"
        "from varlen_kernels import _C\n"
        f"assert _C.cpu_bfloat16_kernel() == {expected!r}, _C.cpu_bfloat16_kernel()\n"
        # the widened kernel keeps subnormal inputs, the dot products take them as zero
        f"assert bool((t._bf16_subnormal_probe() > 0).all()) == {expected == 'widened'}\n"
        "print('ok')\n")
    env = dict(os.environ, VARLEN_KERNELS_CPU_CAPABILITY=cap)
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("path", ["panel", "mkl"])
@pytest.mark.parametrize("pattern", ["all_T", "all_1", "one_long", "all_0", "B1"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_path_edge_lengths(path, pattern, bidirectional, gemm, threads):
    """Length patterns (all equal, one long sequence among empty ones, nothing to
    run, a single sequence) for the split of the rows between threads: the
    panel and MKL paths, on 2 threads, give the ATen path's values and
    gradients."""
    _skip_without_mkl(path)
    threads(2)
    T, B, H = 12, 6, 96
    lengths = {"all_T": [T] * B, "all_1": [1] * B, "one_long": [0, 0, T, 0, 1, 0],
               "all_0": [0] * B, "B1": [T]}[pattern]
    B = len(lengths)
    results = {}
    for p in (path, "aten"):
        gemm(p)
        torch.manual_seed(0)
        m = MaskedRNN(H, H, cell="lstm", bidirectional=bidirectional)
        x = torch.randn(T, B, H, requires_grad=True)
        y, (h, c) = m(x, torch.tensor(lengths))
        loss = (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum() + h.sum() + c.square().sum()
        results[p] = [y, h, c, *torch.autograd.grad(loss, [x, *m.parameters()])]
    for a, b in zip(results[path], results["aten"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_capability_setting_is_checked(tmp_path):
    """A value of VARLEN_KERNELS_CPU_CAPABILITY other than amx, avx512, avx2 or
    default (any case) is an error naming the variable, not ignored; the same
    from varlen_kernels._C.cpu_bfloat16_kernel()."""
    script = tmp_path / "run.py"
    script.write_text(
        "import torch\n"
        "from varlen_kernels import MaskedLSTM\n"
        "try:\n"
        "    MaskedLSTM(4, 5)(torch.randn(3, 2, 4), torch.tensor([3, 1]))\n"
        "except RuntimeError as e:\n"
        "    print(str(e).splitlines()[0])\n"
        "from varlen_kernels import _C\n"
        "try:\n"
        "    _C.cpu_bfloat16_kernel()\n"
        "except RuntimeError as e:\n"
        "    print(str(e).splitlines()[0])\n")
    env = dict(os.environ, VARLEN_KERNELS_CPU_CAPABILITY="sse9")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    message = "VARLEN_KERNELS_CPU_CAPABILITY must be amx, avx512, avx2 or default, got 'sse9'"
    assert r.stdout.count(message) == 2, r.stdout
