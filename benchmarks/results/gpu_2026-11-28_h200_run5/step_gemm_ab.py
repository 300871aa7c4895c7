# One-off: the per-step path's outputs and gradients with VARLEN_KERNELS_STEP_GEMM
# blas against aten, bitwise, in each dtype and TF32 setting.
import os, torch
from varlen_kernels import MaskedRNN
os.environ["VARLEN_KERNELS_RNN_PATH"] = "per_step"
for cell in ("lstm", "gru"):
    for dtype, prec in ((torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "ieee"),
                        (torch.float32, "tf32"), (torch.float64, "ieee")):
        torch.backends.cuda.matmul.fp32_precision = prec
        torch.manual_seed(0)
        ref = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(64, 256, num_layers=2, bidirectional=True)
        m = MaskedRNN.from_torch(ref).cuda().to(dtype)
        x = torch.randn(50, 32, 64, device="cuda", dtype=dtype)
        lengths = torch.randint(0, 51, (32,), device="cuda")
        res = {}
        for g in ("blas", "aten"):
            os.environ["VARLEN_KERNELS_STEP_GEMM"] = g
            xx = x.clone().requires_grad_()
            y, _ = m(xx, lengths)
            grads = torch.autograd.grad(y.float().square().sum(), [xx, *m.parameters()])
            res[g] = [y, *grads]
        diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(res["blas"], res["aten"]))
        print(f"== step gemm blas vs aten {cell} {dtype} {prec}: max abs diff {diff:.3g}", flush=True)
