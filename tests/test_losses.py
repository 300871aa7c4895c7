"""Masked losses against torch.nn.functional on the valid tokens."""
import pytest
import torch
import torch.nn.functional as F

from conftest import gradcheck
from varlen_kernels import masked_bce_with_logits, masked_cross_entropy, masked_mse
from varlen_kernels.testing import emulation_active

# Every test runs on each backend (conftest.py: cpu, the CUDA code emulated, cuda).
pytestmark = pytest.mark.usefixtures("device")
F64 = dict(rtol=1e-10, atol=1e-12)


def make(B=3, T=5, C=10, dtype=torch.float64, seed=0, feature=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 1, 0, 3, 2][:B]) if B <= 5 else torch.randint(0, T + 1, (B,), generator=g)
    valid = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    logits = torch.randn(B, T, C, generator=g, dtype=dtype) * 3
    target = torch.randint(0, C, (B, T), generator=g)
    # Padding holds garbage: NaN/Inf logits and out-of-range targets.
    logits[~valid] = float("nan")
    logits[..., 0][~valid] = float("inf")  # through a view, so it lands in logits
    target[~valid] = -7
    return logits.requires_grad_(), target, lengths, valid


@pytest.mark.cpu_only
def test_padding_holds_nan_and_inf():
    """The factory's padding really holds the garbage the tests rely on."""
    logits, target, _, valid = make(C=4)
    pad = logits.detach()[~valid]
    assert torch.isinf(pad[:, 0]).all() and torch.isnan(pad[:, 1:]).all()
    assert (target[~valid] == -7).all()


@pytest.mark.parametrize("C", [2, 10, 257, 32000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(C, reduction, label_smoothing):
    logits, target, lengths, valid = make(C=C, seed=C)
    out = masked_cross_entropy(logits, target, lengths, reduction=reduction,
                               label_smoothing=label_smoothing, batch_first=True)
    x_valid = logits.detach()[valid].clone().requires_grad_()
    ref = F.cross_entropy(x_valid, target[valid], reduction="none" if reduction == "none" else reduction,
                          label_smoothing=label_smoothing)
    if reduction == "none":
        assert out.shape == valid.shape and (out[~valid] == 0).all()
        torch.testing.assert_close(out[valid], ref, **F64)
        w = torch.randn(out.shape, dtype=out.dtype)
        g, = torch.autograd.grad((out * w).sum(), [logits])
        g_ref, = torch.autograd.grad((ref * w[valid]).sum(), [x_valid])
    else:
        torch.testing.assert_close(out, ref, **F64)
        g, = torch.autograd.grad(out, [logits])
        g_ref, = torch.autograd.grad(ref, [x_valid])
    torch.testing.assert_close(g[valid], g_ref, **F64)
    assert (g[~valid] == 0).all()


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_entropy_layouts_and_mask(batch_first):
    logits, target, lengths, valid = make(seed=1)
    ref = masked_cross_entropy(logits, target, lengths, batch_first=True)
    if not batch_first:
        out = masked_cross_entropy(logits.transpose(0, 1), target.t(), lengths, batch_first=False)
        torch.testing.assert_close(out, ref, **F64)
    torch.testing.assert_close(masked_cross_entropy(logits, target, mask=valid), ref, **F64)
    # A mask that is not a prefix.
    m = torch.zeros_like(valid)
    m[0, 1] = m[0, 3] = m[1, 0] = True
    out = masked_cross_entropy(logits, target, mask=m)
    torch.testing.assert_close(out, F.cross_entropy(logits[m], target[m]), **F64)


def test_cross_entropy_all_padding_is_zero_not_nan():
    logits, target, _, _ = make()
    zero_lengths = torch.zeros(3, dtype=torch.long)
    for reduction in ("mean", "sum"):
        out = masked_cross_entropy(logits, target, zero_lengths, reduction=reduction, batch_first=True)
        assert out.item() == 0.0
        g, = torch.autograd.grad(out, [logits])
        assert (g == 0).all()


def test_cross_entropy_large_logits_and_low_precision():
    logits, target, lengths, valid = make(C=50, seed=2)
    big = (logits.detach() * 1e4 / 3).requires_grad_()
    out = masked_cross_entropy(big, target, lengths, batch_first=True)
    torch.testing.assert_close(out, F.cross_entropy(big.detach()[valid], target[valid]), **F64)
    for dtype in (torch.bfloat16, torch.float16):
        x = logits.detach().to(dtype)
        exact = F.cross_entropy(logits.detach()[valid], target[valid])
        ours = masked_cross_entropy(x, target, lengths, batch_first=True).double()
        theirs = F.cross_entropy(x[valid], target[valid]).double()
        assert (ours - exact).abs() <= 2 * (theirs - exact).abs() + 1e-3


def test_cross_entropy_out_of_range_target_at_valid_step():
    logits, target, lengths, _ = make(C=4)
    target[0, 2] = 4
    # The CPU kernel names the position; the CUDA kernels fail a device-side assert
    # (a RuntimeError naming block, thread and condition under the emulation).
    msg = (r"block \(2, 0, 0\) thread \(\d+, 0, 0\): device-side assert failed: .*target out of "
           r"class range at a valid position" if emulation_active() else
           r"target at valid position 2 \(flattened\) is 4, outside the class range \[0, 4\)")
    with pytest.raises(RuntimeError, match=msg):
        masked_cross_entropy(logits, target, lengths, batch_first=True)


def test_cross_entropy_gradcheck_and_opcheck():
    logits, target, lengths, valid = make(B=3, T=4, C=5)
    x = torch.nan_to_num(logits.detach(), nan=0.0, posinf=0.0).requires_grad_()
    for ls in (0.0, 0.2):
        assert gradcheck(
            lambda x: masked_cross_entropy(x, target, lengths, reduction="none", label_smoothing=ls,
                                           batch_first=True), (x,))
    rows = (x.reshape(-1, 5), target.reshape(-1), valid.reshape(-1), 0.1)
    torch.library.opcheck(torch.ops.varlen_kernels.cross_entropy_forward.default, rows)
    torch.library.opcheck(torch.ops.varlen_kernels.cross_entropy_forward.default,
                          (rows[0].detach(),) + rows[1:])
    loss, lse = torch.ops.varlen_kernels.cross_entropy_forward(*rows)
    torch.library.opcheck(torch.ops.varlen_kernels.cross_entropy_backward.default,
                          (torch.randn_like(loss), rows[0].detach(), rows[1], rows[2], lse, 0.1))


def test_cross_entropy_compiles_fullgraph():
    logits, target, lengths, _ = make(dtype=torch.float32)
    fn = torch.compile(lambda x, t, l: masked_cross_entropy(x, t, l, batch_first=True), fullgraph=True,
                       backend="aot_eager")
    a, b = fn(logits, target, lengths), masked_cross_entropy(logits, target, lengths, batch_first=True)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, [logits])[0], torch.autograd.grad(b, [logits])[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_masked_cross_entropy_op(batch_first):
    """masked_cross_entropy_forward (op_schemas.h) on its own: which rows count,
    from lengths in either layout, from a mask, or all rows, less the targets
    equal to ignore_index; the rows' losses and lse as cross_entropy_forward's;
    total and scale for each reduction, with and without class weights; the
    gradient of the mean (one value expanded to every row, read in place by
    cross_entropy_backward) against the rows' reference; opcheck."""
    logits, target, lengths, valid = make(C=6, seed=5)
    x = torch.nan_to_num(logits.detach(), nan=0.0, posinf=0.0)
    target = target.clone()
    target[0, 1] = -100  # ignored
    if not batch_first:
        x, target, valid = x.transpose(0, 1), target.t(), valid.t()
    R = valid.numel()
    rows, t, v = x.reshape(R, 6).contiguous(), target.reshape(R).contiguous(), valid.reshape(R)
    t_all = torch.where(v, t, torch.zeros_like(t))  # (every row counts: targets in range)
    op = torch.ops.varlen_kernels.masked_cross_entropy_forward.default
    w = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) + 0.5
    cases = {"lengths": (t, None, lengths), "mask": (t, v, None), "all": (t_all, None, None)}
    for weight in (None, w):
        for how, (tt, m, ln) in cases.items():
            counted = (v if how != "all" else torch.ones_like(v)) & (tt != -100)
            loss_ref, lse_ref = torch.ops.varlen_kernels.cross_entropy_forward(
                rows, tt, counted, 0.1, weight)
            div = counted.sum().double() if weight is None else \
                torch.where(counted, w[tt.clamp_min(0)], 0.0).sum()
            for reduction in ("none", "sum", "mean"):
                xr = rows.clone().requires_grad_()
                loss, lse, cnt, total, scale = op(xr, tt, m, ln, batch_first, -100, 0.1, weight,
                                                  reduction)
                assert torch.equal(cnt, counted), (how, reduction)
                torch.testing.assert_close(loss, loss_ref, **F64)
                torch.testing.assert_close(lse[counted], lse_ref[counted], **F64)
                mean = reduction == "mean"
                torch.testing.assert_close(total, loss_ref.sum() / div if mean else loss_ref.sum(),
                                           **F64)
                torch.testing.assert_close(scale, 1 / div if mean else torch.ones((), dtype=div.dtype),
                                           **F64)
                if mean:
                    g, = torch.autograd.grad(total, [xr])
                    xr2 = rows.clone().requires_grad_()
                    ref = torch.ops.varlen_kernels.cross_entropy_forward(xr2, tt, counted, 0.1,
                                                                         weight)[0].sum() / div
                    g_ref, = torch.autograd.grad(ref, [xr2])
                    torch.testing.assert_close(g, g_ref, **F64)
            args = (rows.clone().requires_grad_(), tt, m, ln, batch_first, -100, 0.1, weight, "mean")
            torch.library.opcheck(op, args)
    # No counted row: total 0, not NaN.
    none = op(rows, t, torch.zeros_like(v), None, batch_first, None, 0.0, None, "mean")
    assert none[3].item() == 0.0 and not none[2].any()


def test_masked_cross_entropy_op_bad_input():
    """What masked_cross_entropy_forward refuses, naming the argument; lengths out
    of [0, T] are an error on the CPU and a device-side assert in the CUDA code."""
    logits, target, lengths, valid = make(C=4)
    rows, t = torch.nan_to_num(logits.detach().reshape(15, 4), nan=0.0, posinf=0.0), target.reshape(15)
    op = torch.ops.varlen_kernels.masked_cross_entropy_forward
    with pytest.raises(RuntimeError, match="give a mask or lengths, not both"):
        op(rows, t, valid.reshape(15), lengths, True, None, 0.0, None, "mean")
    with pytest.raises(RuntimeError, match=r"lengths must be 1-D int64, got shape \[3\] and dtype Float"):
        op(rows, t, None, lengths.float(), True, None, 0.0, None, "mean")
    with pytest.raises(RuntimeError, match=r"logits' 15 rows must be B\*T for the 4 lengths \(B\)"):
        op(rows, t, None, torch.tensor([1, 1, 1, 1]), True, None, 0.0, None, "mean")
    with pytest.raises(RuntimeError, match="reduction must be 'none', 'sum' or 'mean', got 'avg'"):
        op(rows, t, None, lengths, True, None, 0.0, None, "avg")
    with pytest.raises(RuntimeError, match=r"mask must have shape \(R\) = \[15\], got \[14\]"):
        op(rows, t, valid.reshape(15)[:14], None, True, None, 0.0, None, "mean")
    msg = (r"device-side assert failed: .*lengths must be in \[0, T\]" if emulation_active() else
           r"lengths must be in \[0, T\] with T=5, got lengths\[1\] = 6")
    with pytest.raises(RuntimeError, match=msg):
        op(rows, t, None, torch.tensor([5, 6, 0]), True, None, 0.0, None, "mean")


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["mse", "bce_with_logits"])
def test_masked_elementwise_loss_op(batch_first, kind):
    """masked_elementwise_loss_forward (op_schemas.h) on its own: which rows
    count, from lengths in either layout, from a mask, or all rows; the losses
    as elementwise_loss_forward's; total and scale for each reduction ("none":
    0 and 1, no reduction made); the
    gradients of the total (and of the per-element losses) w.r.t. input and
    target against elementwise_loss_forward's; opcheck. Rows that do not count
    hold NaN and Inf, never read."""
    g = torch.Generator().manual_seed(11)
    B, T, Fe = 3, 5, 4
    lengths = torch.tensor([5, 0, 2])
    valid = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    x = torch.randn(B, T, Fe, generator=g, dtype=torch.float64)
    y = torch.rand(B, T, Fe, generator=g, dtype=torch.float64)
    x[~valid], y[~valid] = float("nan"), float("inf")
    if not batch_first:
        x, y, valid = x.transpose(0, 1), y.transpose(0, 1), valid.t()
    R = valid.numel()
    rows, yr, v = x.reshape(R, Fe).contiguous(), y.reshape(R, Fe).contiguous(), valid.reshape(R)
    pw = torch.rand(Fe, generator=g, dtype=torch.float64) + 0.5 if kind != "mse" else None
    clean_x, clean_y = torch.nan_to_num(rows, nan=0.3, posinf=0.7), torch.nan_to_num(yr, nan=0.3, posinf=0.7)
    op = torch.ops.varlen_kernels.masked_elementwise_loss_forward.default
    ref_op = torch.ops.varlen_kernels.elementwise_loss_forward.default
    cases = {"lengths": (rows, yr, None, lengths, v), "mask": (rows, yr, v, None, v),
             "all": (clean_x, clean_y, None, None, torch.ones_like(v))}
    for how, (xx, yy, m, ln, counted) in cases.items():
        for reduction in ("none", "sum", "mean"):
            xr, yq = xx.clone().requires_grad_(), yy.clone().requires_grad_()
            loss, cnt, total, scale = op(xr, yq, m, ln, batch_first, pw, kind, reduction)
            assert torch.equal(cnt, counted), (how, reduction)
            xr2, yq2 = xx.clone().requires_grad_(), yy.clone().requires_grad_()
            ref = ref_op(xr2, yq2, counted, pw, kind, reduction != "none")
            torch.testing.assert_close(loss, ref, **F64)
            div = counted.sum().double() * Fe
            ref_total = {"mean": ref.sum() / div, "sum": ref.sum(),
                         "none": torch.zeros((), dtype=torch.float64)}[reduction]
            torch.testing.assert_close(total, ref_total, **F64)
            torch.testing.assert_close(scale, 1 / div if reduction == "mean" else
                                       torch.ones((), dtype=torch.float64), **F64)
            weights = torch.linspace(-1, 1, loss.numel(), dtype=torch.float64).view(loss.shape)
            grads = torch.autograd.grad(total + (loss * weights).sum(), [xr, yq])
            grads_ref = torch.autograd.grad(ref_total + (ref * weights).sum(), [xr2, yq2])
            for a, b in zip(grads, grads_ref):
                torch.testing.assert_close(a, b, **F64)
                assert (a[~counted] == 0).all()
        args = (xx.clone().requires_grad_(), yy.clone().requires_grad_(), m, ln, batch_first, pw, kind,
                "mean")
        torch.library.opcheck(op, args)
    # No counted row, and rows of no feature: total 0, not NaN.
    none = op(rows, yr, torch.zeros_like(v), None, batch_first, pw, kind, "mean")
    assert none[2].item() == 0.0 and not none[1].any()
    for reduction in ("mean", "none"):
        empty = op(rows[:, :0], yr[:, :0], None, lengths, batch_first, None, kind, reduction)
        assert empty[2].item() == 0.0 and torch.equal(empty[1], v)
        assert empty[0].shape == ((R,) if reduction == "mean" else (R, 0))


def test_masked_elementwise_loss_op_bad_input():
    """What masked_elementwise_loss_forward refuses, naming the argument;
    lengths out of [0, T] are an error on the CPU and a device-side assert in
    the CUDA code."""
    x, y = torch.randn(15, 2, dtype=torch.float64), torch.rand(15, 2, dtype=torch.float64)
    lengths, mask = torch.tensor([5, 1, 0]), torch.ones(15, dtype=torch.bool)
    op = torch.ops.varlen_kernels.masked_elementwise_loss_forward
    with pytest.raises(RuntimeError, match="give a mask or lengths, not both"):
        op(x, y, mask, lengths, True, None, "mse", "mean")
    with pytest.raises(RuntimeError, match=r"lengths must be 1-D int64, got shape \[3\] and dtype Float"):
        op(x, y, None, lengths.float(), True, None, "mse", "mean")
    with pytest.raises(RuntimeError, match=r"input's 15 rows must be B\*T for the 4 lengths \(B\)"):
        op(x, y, None, torch.tensor([1, 1, 1, 1]), True, None, "mse", "mean")
    with pytest.raises(RuntimeError, match="reduction must be 'none', 'sum' or 'mean', got 'avg'"):
        op(x, y, None, lengths, True, None, "mse", "avg")
    with pytest.raises(RuntimeError, match="kind must be 'mse' or 'bce_with_logits', got 'l1'"):
        op(x, y, None, lengths, True, None, "l1", "mean")
    with pytest.raises(RuntimeError, match=r"mask must have shape \(R\) = \[15\], got \[14\]"):
        op(x, y, mask[:14], None, True, None, "mse", "mean")
    with pytest.raises(RuntimeError, match=r"target must have shape"):
        op(x, y[:, :1], None, lengths, True, None, "mse", "mean")
    with pytest.raises(RuntimeError, match="pos_weight is only for 'bce_with_logits'"):
        op(x, y, None, lengths, True, torch.ones(2, dtype=torch.float64), "mse", "mean")
    msg = (r"device-side assert failed: .*lengths must be in \[0, T\]" if emulation_active() else
           r"lengths must be in \[0, T\] with T=5, got lengths\[1\] = 6")
    with pytest.raises(RuntimeError, match=msg):
        op(x, y, None, torch.tensor([5, 6, 0]), True, None, "mse", "mean")


@pytest.mark.parametrize("loss_name", ["mse", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("feature", [(), (4,), (2, 3)])
def test_elementwise_losses_match_torch(loss_name, reduction, feature):
    g = torch.Generator().manual_seed(3)
    B, T = 3, 5
    lengths = torch.tensor([5, 0, 2])
    valid = torch.arange(T)[None, :] < lengths[:, None]
    pred = torch.randn((B, T) + feature, generator=g, dtype=torch.float64)
    target = torch.rand((B, T) + feature, generator=g, dtype=torch.float64)
    pred[~valid] = float("nan")
    target[~valid] = float("inf")
    pred.requires_grad_()
    pw = torch.rand(feature, generator=g, dtype=torch.float64) + 0.5 if loss_name == "bce" else None
    if loss_name == "mse":
        out = masked_mse(pred, target, lengths, reduction=reduction, batch_first=True)
        ref_fn = lambda p, t, r: F.mse_loss(p, t, reduction=r)  # noqa: E731
    else:
        out = masked_bce_with_logits(pred, target, lengths, reduction=reduction, pos_weight=pw,
                                     batch_first=True)
        ref_fn = lambda p, t, r: F.binary_cross_entropy_with_logits(p, t, reduction=r, pos_weight=pw)  # noqa: E731
    pv = pred.detach()[valid].clone().requires_grad_()
    ref = ref_fn(pv, target[valid], reduction)
    if reduction == "none":
        torch.testing.assert_close(out[valid], ref, **F64)
        assert (out[~valid] == 0).all()
        out, ref = out.sum(), ref.sum()
    else:
        torch.testing.assert_close(out, ref, **F64)
    g1, = torch.autograd.grad(out, [pred])
    g2, = torch.autograd.grad(ref, [pv])
    torch.testing.assert_close(g1[valid], g2, **F64)
    assert (g1[~valid] == 0).all()


def test_elementwise_all_padding_and_gradcheck():
    pred = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, 3, 4, dtype=torch.float64)
    for fn in (masked_mse, masked_bce_with_logits):
        out = fn(pred, target, torch.tensor([0, 0]), batch_first=True)
        assert out.item() == 0.0 and (torch.autograd.grad(out, [pred])[0] == 0).all()
        assert gradcheck(lambda p: fn(p, target, torch.tensor([3, 1]), batch_first=True),
                                        (pred,))


def test_loss_bad_input():
    logits, target, lengths, _ = make()
    with pytest.raises(TypeError, match="target must be an integer Tensor of class indices, got torch.float32"):
        masked_cross_entropy(logits, target.float(), lengths, batch_first=True)
    with pytest.raises(ValueError, match=r"target must have shape \(3, 5\).*got \(3, 4\)"):
        masked_cross_entropy(logits, target[:, :4], lengths, batch_first=True)
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T\] with T=5.*lengths\[0\] = 6"):
        masked_cross_entropy(logits, target, torch.tensor([6, 1, 0]), batch_first=True)
    with pytest.raises(ValueError, match="exactly one of lengths and mask"):
        masked_cross_entropy(logits, target)
    with pytest.raises(ValueError, match="reduction must be one of"):
        masked_cross_entropy(logits, target, lengths, reduction="avg", batch_first=True)
    with pytest.raises(ValueError, match=r"logits must be 3-D \(B, T, C\) or 2-D \(N, C\), got shape \(10,\)"):
        masked_cross_entropy(logits[0, 0], target, lengths, batch_first=True)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        masked_cross_entropy(logits, target, lengths, label_smoothing=1.5, batch_first=True)
    with pytest.raises(ValueError, match=r"target must have the shape of pred \(3, 5\), got \(3, 4\)"):
        masked_mse(torch.randn(3, 5), torch.randn(3, 4), lengths, batch_first=True)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 5\)"):
        masked_mse(torch.randn(3, 5), torch.randn(3, 5), mask=torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool Tensor"):
        masked_bce_with_logits(torch.randn(3, 5), torch.rand(3, 5), mask=torch.ones(3, 5))


@pytest.mark.parametrize("kind", ["mse", "bce_with_logits"])
@pytest.mark.parametrize("reduce_rows", [False, True])
def test_elementwise_op_opcheck_and_target_grad(kind, reduce_rows):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    pw = torch.rand(3, generator=g, dtype=torch.float64) + 0.5 if kind == "bce_with_logits" else None
    op = torch.ops.varlen_kernels.elementwise_loss_forward.default
    torch.library.opcheck(op, (x, y, m, pw, kind, reduce_rows))
    torch.library.opcheck(op, (x.detach(), y.detach(), m, pw, kind, reduce_rows))
    assert gradcheck(lambda x, y: op(x, y, m, pw, kind, reduce_rows), (x, y))
    out = op(x, y, m, pw, kind, reduce_rows)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    torch.library.opcheck(torch.ops.varlen_kernels.elementwise_loss_backward.default,
                          (grad, x.detach(), y.detach(), m, pw, kind, reduce_rows))


def test_mse_target_gradient_matches_torch():
    pred = torch.randn(2, 4, 3, dtype=torch.float64)
    target = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])
    valid = torch.arange(4)[None] < lengths[:, None]
    g, = torch.autograd.grad(masked_mse(pred, target, lengths, batch_first=True), [target])
    tv = target.detach()[valid].clone().requires_grad_()
    g_ref, = torch.autograd.grad(F.mse_loss(pred[valid], tv), [tv])
    torch.testing.assert_close(g[valid], g_ref, **F64)
    assert (g[~valid] == 0).all()


def test_pos_weight_with_grad_is_refused():
    with pytest.raises(NotImplementedError, match="gradients w.r.t. pos_weight are not implemented"):
        masked_bce_with_logits(torch.randn(2, 3, 4), torch.rand(2, 3, 4), [3, 1],
                               pos_weight=torch.ones(4, requires_grad=True), batch_first=True)
