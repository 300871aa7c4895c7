"""Where a masked_cross_entropy forward+backward spends its time, host and device,
against the idiom (F.cross_entropy(reduction="none") * mask, summed, over
mask.sum()), with the case of bench_losses.py (lengths uniform in [1, T]).

On the H200 our call took about 0.55 ms at C = 1024 whatever the token count
(8192 or 65536), where its kernels should take microseconds, and only 0.72 ms
at 32x the bytes (C = 32768): a cost outside the kernels. For each case and
method this prints:
  - the time a call takes, synchronized after each call (latency), and over
    calls issued back to back (throughput: host and device overlap);
  - the host time of issuing a call (no synchronization inside it);
  - torch.profiler's table of ops by host time, and the kernels' device time.

    python benchmarks/profile_losses.py --out benchmarks/results/profile_losses.txt
    python benchmarks/profile_losses.py --device cpu --tokens 256 --C 16   # the harness, on a CPU
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
from bench_losses import case  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(fn, device, calls):
    """(ms a call synchronized after each, ms a call back to back, host ms to issue one)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
        sync(device)
    latency = (time.perf_counter() - t0) / calls
    t0 = time.perf_counter()
    host = 0.0
    for _ in range(calls):
        t1 = time.perf_counter()
        fn()
        host += time.perf_counter() - t1
    sync(device)
    throughput = (time.perf_counter() - t0) / calls
    return 1e3 * latency, 1e3 * throughput, 1e3 * host / calls


def profile_one(fn, device, rows):
    """torch.profiler's tables of one call: ops by host time; kernels by device time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    text = prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows,
                                     max_name_column_width=60)
    if device.startswith("cuda"):
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        text += (f"\n{len(kernels)} kernels, {sum(e.device_time for e in kernels) / 1e3:.3f} ms "
                 "of device time\n")
        text += prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows,
                                          max_name_column_width=60)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--C", type=int, nargs="+", default=[1024])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--calls", type=int, default=20, help="calls per timing (default 20)")
    ap.add_argument("--rows", type=int, default=12, help="rows per table")
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    texts = []
    for n in args.tokens:
        for C in args.C:
            B, T, mask, fns, _ = case(n, C, dtype, args.device, T=min(args.T, n))
            for name in ("masked", "idiom"):
                fn = fns[name]
                for _ in range(3):
                    fn()  # warm-up
                latency, throughput, host = timings(fn, args.device, args.calls)
                head = (f"== {name} {args.dtype} tokens={B * T} C={C}: {latency:.3f} ms a call "
                        f"synchronized, {throughput:.3f} ms back to back, {host:.3f} ms of host "
                        "time to issue it")
                texts.append(head + "\n" + profile_one(fn, args.device, args.rows))
                print(texts[-1], flush=True)
    if args.out:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        with open(args.out, "w") as f:
            f.write(f"{device} torch {torch.__version__}\n\n" + "\n".join(texts))


if __name__ == "__main__":
    main()
