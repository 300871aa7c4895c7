"""Fused linear + masked cross entropy against F.linear + masked_cross_entropy and
F.cross_entropy(ignore_index), on every backend (conftest.py `device`)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ShapesCreated, fails_in_child_process, gradcheck, grouped_mm_as_on_gpu
from varlen_kernels import MaskedLinearCrossEntropy, masked_cross_entropy, masked_linear_cross_entropy

pytestmark = pytest.mark.usefixtures("device")
F64 = dict(rtol=1e-9, atol=1e-11)


def make(T=5, B=4, H=6, V=11, dtype=torch.float64, seed=0, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 1, 0, 3, 2, T, 4][:B])
    valid = torch.arange(T)[:, None] < lengths[None, :]  # (T, B), time-major
    hidden = torch.randn(T, B, H, generator=g, dtype=dtype)
    hidden[~valid] = float("nan")  # padding is never read
    target = torch.randint(0, V, (T, B), generator=g)
    target[~valid] = -5
    weight = torch.randn(V, H, generator=g, dtype=dtype) / H ** 0.5
    b = torch.randn(V, generator=g, dtype=dtype) if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (to(hidden).requires_grad_(), to(weight).requires_grad_(),
            None if b is None else to(b).requires_grad_(), to(target), to(lengths), to(valid))


def params(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("V,chunk", [(2, None), (1000, 3), (11, 4), (11, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_then_masked_cross_entropy(reduction, label_smoothing, V, chunk, bias, device):
    hidden, weight, b, target, lengths, valid = make(V=V, bias=bias, device=device)
    out = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b, reduction=reduction,
                                      label_smoothing=label_smoothing, chunk_size=chunk)
    # The reference on the valid rows only (padding holds NaN).
    x = hidden[valid]
    per = F.cross_entropy(F.linear(x, weight, b), target[valid], reduction="none",
                          label_smoothing=label_smoothing)
    if reduction == "none":
        assert out.shape == valid.shape and (out[~valid] == 0).all()
        torch.testing.assert_close(out[valid], per, **F64)
        w = torch.randn(out.shape, dtype=out.dtype, device=device)
        loss, ref = (out * w).sum(), (per * w[valid]).sum()
    else:
        ref = per.sum() if reduction == "sum" else per.mean()
        torch.testing.assert_close(out, ref, **F64)
        loss = out
    grads = torch.autograd.grad(loss, params(hidden, weight, b))
    grads_ref = torch.autograd.grad(ref, params(hidden, weight, b))
    torch.testing.assert_close(grads[0], grads_ref[0], **F64)  # the reference's is 0 in padding
    assert (grads[0][~valid] == 0).all()
    for a, r in zip(grads[1:], grads_ref[1:]):
        torch.testing.assert_close(a, r, **F64)


def test_matches_ignore_index_batch_first_and_mask(device):
    hidden, weight, b, target, lengths, valid = make(V=32000, T=3, B=3, H=4, device=device)
    hb, tb = hidden.transpose(0, 1), target.transpose(0, 1)  # (B, T, ...)
    out = masked_linear_cross_entropy(hb, weight, tb, lengths, bias=b, batch_first=True)
    out_mask = masked_linear_cross_entropy(hidden, weight, target, mask=valid, bias=b)
    ignore = torch.where(valid, target, -100).reshape(-1)
    safe = torch.where(valid.unsqueeze(-1), hidden, 0.0).reshape(-1, hidden.shape[-1])
    ref = F.cross_entropy(F.linear(safe, weight, b), ignore, ignore_index=-100)
    torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(out_mask, ref, **F64)
    g = torch.autograd.grad(out, [weight, b])
    g_ref = torch.autograd.grad(ref, [weight, b])
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, **F64)


def test_ignore_index_counts_nowhere(device):
    hidden, weight, b, target, lengths, valid = make(V=9, device=device)
    target = target.clone()
    target[0, 0] = -100  # a valid step whose target is ignored
    target[1, 0] = 7
    out = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b, label_smoothing=0.1)
    keep = valid & (target != -100)
    ref = F.cross_entropy(F.linear(hidden.detach()[keep], weight, b), target[keep], label_smoothing=0.1)
    torch.testing.assert_close(out, ref, **F64)
    out2 = masked_linear_cross_entropy(hidden, weight, target.masked_fill(target == -100, 3), lengths,
                                       bias=b, ignore_index=3, label_smoothing=0.1)
    keep2 = valid & (target.masked_fill(target == -100, 3) != 3)
    ref2 = F.cross_entropy(F.linear(hidden.detach()[keep2], weight, b),
                           target.masked_fill(target == -100, 3)[keep2], label_smoothing=0.1)
    torch.testing.assert_close(out2, ref2, **F64)


def test_matches_masked_cross_entropy_on_logits(device):
    hidden, weight, b, target, lengths, valid = make(V=7, device=device)
    out = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b, label_smoothing=0.1)
    logits = F.linear(torch.nan_to_num(hidden), weight, b)
    ref = masked_cross_entropy(logits, target, lengths, batch_first=False, label_smoothing=0.1)
    torch.testing.assert_close(out, ref, **F64)


def test_all_padding_is_zero_with_zero_gradients(device):
    hidden, weight, b, target, _, _ = make(device=device)
    lengths = torch.zeros(4, dtype=torch.long, device=device)
    for reduction in ("mean", "sum"):
        out = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b, reduction=reduction)
        assert out.item() == 0.0
        for g in torch.autograd.grad(out, params(hidden, weight, b)):
            assert (g == 0).all()


def test_no_grad_and_none_reduction_backward_recomputes(device):
    """Without autograd nothing but the loss is computed; "none" takes the
    recomputing backward; both agree with the fused-gradient path."""
    hidden, weight, b, target, lengths, valid = make(device=device)
    with torch.no_grad():
        a = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b, reduction="sum")
    out = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b, reduction="sum")
    per = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b, reduction="none")
    torch.testing.assert_close(a, out.detach(), **F64)
    g1 = torch.autograd.grad(out, params(hidden, weight, b))
    g2 = torch.autograd.grad(per.sum(), params(hidden, weight, b))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(torch.nan_to_num(x), torch.nan_to_num(y), **F64)


def test_backward_builds_no_zero_gradients(device):
    """The gradients computed with the forward (gh, gw, gb) are outputs nothing
    differentiates: autograd must not fill zero tensors of their sizes (gw is
    as large as the weight) for the backward."""
    hidden, weight, b, target, lengths, _ = make(V=1000, device=device)
    out = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b)
    with ShapesCreated() as created:
        torch.autograd.grad(out, params(hidden, weight, b))
    # any op that makes zeros or fills (aten.zeros, new_zeros, zero_, fill_, full, ...)
    zeros = {shape for op, shape in created.created
             if any(w in op for w in ("zero", "fill", "full"))}
    rows = hidden.numel() // hidden.shape[-1]  # the op sees hidden as (rows, H)
    assert not zeros & {(rows, hidden.shape[-1]), tuple(weight.shape), tuple(b.shape)}, zeros


def test_gradcheck_and_opcheck(device):
    torch.manual_seed(0)
    N, H, V = 5, 3, 4
    dd = dict(dtype=torch.float64, device=device)
    h = torch.randn(N, H, **dd, requires_grad=True)
    w = torch.randn(V, H, **dd, requires_grad=True)
    b = torch.randn(V, **dd, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    m = torch.tensor([1, 0, 1, 1, 0], dtype=torch.bool, device=device)
    op = torch.ops.varlen_kernels.linear_cross_entropy_forward.default
    for reduction in ("mean", "none"):
        def f(h, w, b):
            return op(h, w, b, t, m, 0.1, reduction, reduction != "none", 2)[0]
        assert gradcheck(f, (h, w, b))
        torch.library.opcheck(op, (h, w, b, t, m, 0.1, reduction, False, 2))
    torch.library.opcheck(op, (h.detach(), w.detach(), None, t, m, 0.0, "sum", True, 0))
    lse = op(h.detach(), w.detach(), b.detach(), t, m, 0.0, "none", False, 0)[1]
    torch.library.opcheck(torch.ops.varlen_kernels.linear_cross_entropy_backward.default,
                          (torch.randn(N, **dd), h.detach(), w.detach(), b.detach(), t, m, lse, 0.0, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_pytorchs_error(dtype, device):
    """Loss and gradients against float64, within 2x the error of F.linear +
    F.cross_entropy run in the same precision (with a floor of a few ulps)."""
    hidden, weight, b, target, lengths, valid = make(T=6, B=5, H=32, V=300, device=device)
    x64 = hidden.detach()[valid]
    exact = F.cross_entropy(F.linear(x64, weight, b), target[valid])
    g_exact = torch.autograd.grad(exact, [weight, b])
    low = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, b)]
    ours = masked_linear_cross_entropy(low[0], low[1], target, lengths, bias=low[2])
    g_ours = torch.autograd.grad(ours, low[1:])
    xl = low[0].detach()[valid].requires_grad_()
    wl, bl = (t.detach().requires_grad_() for t in low[1:])
    theirs = F.cross_entropy(F.linear(xl, wl, bl).float(), target[valid])
    g_theirs = torch.autograd.grad(theirs, [wl, bl])
    floor = 4 * torch.finfo(dtype).eps
    for o, t, e in [(ours, theirs, exact), *zip(g_ours, g_theirs, g_exact)]:
        scale = e.abs().max().clamp_min(1.0)
        err = ((o.double() - e).abs().max() / scale).item()
        err_ref = ((t.double() - e).abs().max() / scale).item()
        assert err <= 2 * max(err_ref, floor), (err, err_ref)


def test_autocast_runs_gemms_in_low_precision_with_float_loss(device):
    hidden, weight, b, target, lengths, valid = make(H=16, V=50, dtype=torch.float32, device=device)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b)
    assert out.dtype == torch.float32
    ref = F.cross_entropy(F.linear(hidden.detach()[valid], weight, b), target[valid])
    assert abs(out.item() - ref.item()) < 0.05 * max(1.0, abs(ref.item()))
    gw, = torch.autograd.grad(out, [weight])
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


def test_module_tied_weight_and_compile(device):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(13, 8, dtype=torch.float64)
    head = MaskedLinearCrossEntropy(8, 13, dtype=torch.float64)
    ref_linear = torch.nn.Linear(8, 13, dtype=torch.float64)
    assert head.weight.shape == ref_linear.weight.shape and head.bias.shape == ref_linear.bias.shape
    head.weight = emb.weight  # tied
    tokens = torch.randint(0, 13, (6, 3))
    lengths = torch.tensor([6, 2, 0])
    valid = torch.arange(6)[:, None] < lengths[None, :]

    def step(tokens, lengths):
        return head(emb(tokens), tokens.roll(-1, 0), lengths, label_smoothing=0.05)

    eager = step(tokens, lengths)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(tokens, lengths)
    ref = F.cross_entropy(F.linear(emb(tokens)[valid], emb.weight, head.bias),
                          tokens.roll(-1, 0)[valid], label_smoothing=0.05)
    torch.testing.assert_close(eager, ref, **F64)
    torch.testing.assert_close(compiled, ref, **F64)
    g, = torch.autograd.grad(eager, [emb.weight])
    g_ref, = torch.autograd.grad(ref, [emb.weight])
    torch.testing.assert_close(g, g_ref, **F64)


def test_bad_input(device):
    hidden, weight, b, target, lengths, _ = make(device=device)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 6\)"):
        masked_linear_cross_entropy(hidden, weight[:, :5], target, lengths)
    with pytest.raises(ValueError, match=r"bias must have shape \(11,\), got \(10,\)"):
        masked_linear_cross_entropy(hidden, weight, target, lengths, bias=b[:10])
    with pytest.raises(ValueError, match=r"target must have shape \(5, 4\)"):
        masked_linear_cross_entropy(hidden, weight, target[:3], lengths)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        masked_linear_cross_entropy(hidden, weight, target, lengths, reduction="avg")
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
        masked_linear_cross_entropy(hidden, weight, target, lengths, chunk_size=0)
    with pytest.raises(TypeError, match=r"weight and bias must have hidden's dtype"):
        masked_linear_cross_entropy(hidden, weight.float(), target, lengths)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T\]"):
        masked_linear_cross_entropy(hidden, weight, target, torch.tensor([9, 1, 0, 1]))
    bad = target.clone()
    bad[0, 0] = 11
    match = r"outside the class range|target out of class range"
    if device == "cuda":  # a device-side assert, which ends the CUDA context: in a child
        fails_in_child_process("""
            hidden, weight = torch.randn(5, 4, 6, device="cuda"), torch.randn(11, 6, device="cuda")
            target = torch.randint(0, 11, (5, 4), device="cuda")
            target[0, 0] = 11
            vk.masked_linear_cross_entropy(hidden, weight, target, torch.tensor([5, 1, 0, 3]))
            """, match)
        return
    with pytest.raises(RuntimeError, match=match):
        masked_linear_cross_entropy(hidden, weight, bad, lengths)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("setting", ["valid_rows", "auto", "all_rows"])
def test_bfloat16_gemms_over_valid_rows(bias, reduction, setting, device, monkeypatch):
    """bfloat16 with 16-byte aligned rows (H = 32, V = 304): with
    VARLEN_KERNELS_TOKEN_GEMM=valid_rows, on the GPU (and the emulated sm_90)
    the valid tokens are ordered first on the device and the GEMMs of each
    chunk take its valid rows alone (grouped GEMMs with a device-side count;
    chunks of 7 rows, so some are partly and some wholly past the count; the
    grouped GEMM's rows past the count NaN, as unwritten on a GPU). Loss and
    every gradient within 2x the error of F.linear + F.cross_entropy in
    bfloat16, label smoothing 0.1, zero gradient at padding (which holds NaN);
    'auto' (the default) and 'all_rows' run every row through at::mm, within
    the same bound."""
    from varlen_kernels.testing import emulation_active
    monkeypatch.setenv("VARLEN_KERNELS_TOKEN_GEMM", setting)
    hidden, weight, b, target, lengths, valid = make(T=6, B=5, H=32, V=304, bias=bias,
                                                     device=device)
    x64 = hidden.detach()[valid].requires_grad_()
    exact_per = F.cross_entropy(F.linear(x64, weight, b), target[valid], reduction="none",
                                label_smoothing=0.1)
    w = torch.rand(exact_per.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w = w.to(device)
    exact = exact_per.mean() if reduction == "mean" else (exact_per * w).sum()
    g_exact = torch.autograd.grad(exact, [x64, *params(None, weight, b)])
    low = [None if t is None else t.detach().to(torch.bfloat16).requires_grad_()
           for t in (hidden, weight, b)]
    with grouped_mm_as_on_gpu(device) as grouped:
        out = masked_linear_cross_entropy(low[0], low[1], target, lengths, bias=low[2],
                                          reduction=reduction, chunk_size=7, label_smoothing=0.1)
        ours = out if reduction == "mean" else (out[valid].double() * w).sum()
        g_ours = torch.autograd.grad(ours, params(*low))
    if emulation_active():
        assert (grouped.calls > 0) == (setting == "valid_rows"), grouped.calls
    assert (g_ours[0][~valid] == 0).all()
    xl = low[0].detach()[valid].requires_grad_()
    wl = [t.detach().requires_grad_() for t in low[1:] if t is not None]
    theirs_per = F.cross_entropy(F.linear(xl, *wl).float(), target[valid], reduction="none",
                                 label_smoothing=0.1)
    theirs = theirs_per.mean() if reduction == "mean" else (theirs_per.double() * w).sum()
    g_theirs = torch.autograd.grad(theirs, [xl, *wl])
    floor = 4 * torch.finfo(torch.bfloat16).eps
    pairs = [(ours, theirs, exact), (g_ours[0][valid], g_theirs[0], g_exact[0]),
             *zip(g_ours[1:], g_theirs[1:], g_exact[1:])]
    for o, t, e in pairs:
        scale = e.abs().max().clamp_min(1.0)
        err = ((o.double() - e).abs().max() / scale).item()
        err_ref = ((t.double() - e).abs().max() / scale).item()
        assert err <= 2 * max(err_ref, floor), (err, err_ref)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_all_padding_with_gemms_over_valid_rows(reduction, device, monkeypatch):
    """No valid token, bfloat16, 16-byte aligned rows, VARLEN_KERNELS_TOKEN_GEMM=
    valid_rows (grouped GEMMs over no row where they run): zero loss and
    exactly zero gradients."""
    monkeypatch.setenv("VARLEN_KERNELS_TOKEN_GEMM", "valid_rows")
    hidden, weight, _, target, _, _ = make(T=6, B=5, H=32, V=304, bias=False, device=device)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (hidden, weight)]
    lengths = torch.zeros(5, dtype=torch.long, device=device)
    with grouped_mm_as_on_gpu(device):
        out = masked_linear_cross_entropy(low[0], low[1], target, lengths, reduction=reduction,
                                          chunk_size=7)
        grads = torch.autograd.grad(out.sum(), low)
    assert (out == 0).all()
    for g in grads:
        assert (g == 0).all()
