"""Where MaskedRNN's forward+backward spends its GPU time: torch.profiler's table of
kernels (by total device time) for one fwd+bwd per shape, after a warm-up, with
the case of bench_rnn.py (lengths uniform in [1, T]), and the wall time of one
fwd+bwd synchronized (outside the profiler): where it exceeds the kernels' sum,
the GPU waited for the host. GPU only.

    python benchmarks/profile_rnn.py --out benchmarks/results/profile_rnn.txt

With --ncu it prints no table: each shape's fwd+bwd after its warm-up runs
between cudaProfilerStart and cudaProfilerStop, for Nsight Compute to profile
only those kernels (gpu_check.sh's ncu stage):

    ncu --profile-from-start off --kernel-name regex:persistent \
        python benchmarks/profile_rnn.py --ncu --shapes lstm,512,64,1024
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from bench_rnn import make_case  # noqa: E402

# (B = 256, H = 1024 is past the auto path's bound: the per-step path, whose
# wall time against its kernels' says how much of it the host's launches take)
SHAPES = [("lstm", 512, 8, 256), ("lstm", 512, 64, 256), ("lstm", 512, 64, 1024),
          ("lstm", 512, 256, 1024), ("gru", 512, 64, 256)]


def shape(text):
    """'cell,T,B,H' -> (cell, T, B, H)."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        raise argparse.ArgumentTypeError(f"a shape is cell,T,B,H, got {text!r}")
    return (parts[0], *map(int, parts[1:]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="also write the tables to this file")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rows", type=int, default=10, help="kernels per table")
    ap.add_argument("--shapes", nargs="+", type=shape, default=SHAPES,
                    help="cell,T,B,H each (default: %(default)s)")
    ap.add_argument("--ncu", action="store_true",
                    help="no table: the profiler range around each shape's fwd+bwd, for ncu")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("profile_rnn.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    texts = []
    for cell, T, B, H in args.shapes:
        _, masked, x, lengths = make_case(cell, T, B, H, dtype, "cuda")
        lengths_dev = lengths.to("cuda")  # the lengths on the device, as users have them

        def step():
            y, _ = masked(x, lengths_dev)
            y.float().sum().backward()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        if args.ncu:
            torch.cuda.profiler.start()
            step()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"== {cell} {args.dtype} T={T} B={B} H={H}: profiled", flush=True)
            del masked, x
            continue
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(e.device_time for e in kernels)
        head = (f"== {cell} {args.dtype} T={T} B={B} H={H} max_len={int(lengths.max())}: "
                f"{len(kernels)} kernels, {total_us / 1e3:.3f} ms of kernel time, "
                f"{wall_ms:.3f} ms wall")
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                          max_name_column_width=70)
        texts.append(head + "\n" + table)
        print(texts[-1], flush=True)
        del masked, x
        torch.cuda.empty_cache()
    if args.out and not args.ncu:
        with open(args.out, "w") as f:
            f.write(f"{torch.cuda.get_device_name()} torch {torch.__version__}\n\n" + "\n".join(texts))


if __name__ == "__main__":
    main()
