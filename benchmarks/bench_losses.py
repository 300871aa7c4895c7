"""Forward+backward time (and, on a GPU, peak extra memory) of masked_cross_entropy
against the idioms users write today, in one run:

  idiom   (F.cross_entropy(reduction="none") * mask).sum() / mask.sum()
  ignore  F.cross_entropy(ignore_index=-100) with -100 at padded targets

Lengths uniform in [1, T]. Each call starts from logits.grad = None, as a training
step after zero_grad(set_to_none=True) does. The methods are timed round-robin
over --repeats (see bench_rnn.py): name_ms is the median, name_min_ms the fastest
repeat, name_spread slowest / fastest. A case (or a method) whose logits, gradient
and workspace would not fit in --mem-fraction of the free memory is skipped with
the reason printed and recorded; an error (out of memory included) is recorded
and the run goes on.

Writes losses_<device>.{json,csv} to a new run folder,
benchmarks/results/runs/<timestamp>_<device>/, after every case; the committed
results are refreshed only with `--out benchmarks/results`.
"""
import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench_rnn, however this file is run or loaded

from bench_rnn import (Results, add_times, default_out, describe, device_tag, measure,  # noqa: E402
                       release_memory, run_info)
from varlen_kernels import masked_cross_entropy  # noqa: E402

METHODS = ("masked", "idiom", "ignore")
# Tensors of the logits' size each method holds at its peak, the logits included:
# the gradient; F.cross_entropy also keeps the log-softmax and its gradient.
LOGITS_COPIES = {"masked": 2, "idiom": 4, "ignore": 4}
CPU_MAX_ELEMENTS = 2**30  # larger CPU cases take minutes per call


def case(tokens, C, dtype, device, T=256, seed=0):
    """B, T, mask, {method: fn running forward and backward}, logits."""
    torch.manual_seed(seed)
    B = max(1, tokens // T)
    logits = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, C, (B, T), device=device)
    lengths = torch.randint(1, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    ignore_target = target.masked_fill(~mask, -100)

    # logits.grad = None first: accumulating into the last call's gradient would
    # time an extra add and hold two gradients at once.
    def ours():
        logits.grad = None
        masked_cross_entropy(logits, target, lengths, batch_first=True).backward()

    def idiom():
        logits.grad = None
        per = F.cross_entropy(logits.view(-1, C), target.view(-1), reduction="none")
        ((per * mask.view(-1)).sum() / mask.sum()).backward()

    def ignore():
        logits.grad = None
        F.cross_entropy(logits.view(-1, C), ignore_target.view(-1), ignore_index=-100).backward()

    return B, T, mask, {"masked": ours, "idiom": idiom, "ignore": ignore}, logits


def free_memory_bytes(device):
    """Memory a new case can use: the GPU's free memory (cache emptied first), or
    MemAvailable of /proc/meminfo (free physical pages where that is missing)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan(B, T, C, dtype, free_bytes, fraction):
    """{method: reason} for the methods whose peak memory exceeds fraction * free_bytes."""
    logits = B * T * C * torch.empty((), dtype=dtype).element_size()
    budget = fraction * free_bytes
    gib = 2.0**30
    return {k: f"needs ~{n * logits / gib:.1f} GiB, over {fraction:g} of {free_bytes / gib:.1f} GiB free"
            for k, n in LOGITS_COPIES.items() if n * logits > budget}


def extra_memory_mib(fn, logits):
    """Peak memory one call allocates beyond the logits (the gradient included), in MiB."""
    logits.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(args, n, C, dtype_name, methods, log=print):
    dtype = getattr(torch, dtype_name)
    B, T, mask, fns, logits = case(n, C, dtype, args.device, T=args.T)
    fns = {k: f for k, f in fns.items() if k in methods}
    row = {"valid_fraction": round(mask.float().mean().item(), 3)}
    errors, extra = {}, {}
    if args.device.startswith("cuda"):
        for k, fn in list(fns.items()):
            try:
                fn()  # warm-up
                extra[k] = extra_memory_mib(fn, logits)
            except Exception as e:
                errors[k] = describe(e)
                del fns[k]
                log(f"  {k}: failed ({errors[k]})")
            logits.grad = None
            release_memory(args.device)
    times, more_errors = measure(fns, args.repeats, args.min_run_time, warmup=1, log=log)
    errors.update(more_errors)
    logits.grad = None
    add_times(row, times)
    for k in times:
        if k in extra:
            row[f"{k}_extra_MiB"] = round(extra[k], 1)
    if "masked" in times:
        for k in times:
            if k != "masked":
                row[f"speedup_vs_{k}"] = round(row[f"{k}_ms"] / row["masked_ms"], 2)
                if k in extra and "masked" in extra:
                    row[f"memory_ratio_vs_{k}"] = round(extra[k] / max(extra["masked"], 1e-9), 2)
    for k, err in errors.items():
        row[f"{k}_error"] = err
    return row


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (64 tokens, C in {10, 1000}), short timings: checks the harness in seconds")
    ap.add_argument("--tokens", type=int, nargs="*")
    ap.add_argument("--C", type=int, nargs="*")
    ap.add_argument("--T", type=int, default=None, help="sequence length (default 256, 16 with --quick)")
    ap.add_argument("--dtypes", default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: as torch starts, recorded either way)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per method (default 3)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds of blocked_autorange per repeat (default 0.5, 0.01 with --quick)")
    ap.add_argument("--mem-fraction", type=float, default=0.8,
                    help="skip what would need more than this fraction of the free memory")
    ap.add_argument("--out", default=None,
                    help="results folder (default: a new benchmarks/results/runs/<timestamp>_<device>/; "
                         "`--out benchmarks/results` refreshes the committed results)")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.quick:
        tokens, Cs, T, dtypes, min_run_time = [64], [10, 1000], 16, "float32", 0.01
    else:
        tokens, Cs, T = [8192, 65536], ([1024, 32768, 131072] if gpu else [1024, 32768]), 256
        dtypes, min_run_time = ("float32,bfloat16" if gpu else "float32"), 0.5
    args.tokens, args.C, args.T = args.tokens or tokens, args.C or Cs, args.T or T
    args.dtypes = (args.dtypes or dtypes).split(",")
    args.min_run_time = args.min_run_time or min_run_time
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device.startswith("cuda")
    meta = run_info(args.device)
    meta.update(quick=args.quick, repeats=args.repeats, min_run_time=args.min_run_time,
                mem_fraction=args.mem_fraction)
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    results = Results(args.out or default_out(args.device), f"losses_{device_tag(args.device)}", meta)
    failures = 0
    for dtype_name in args.dtypes:
        for n in args.tokens:
            for C in args.C:
                B = max(1, n // args.T)
                row = dict(dtype=dtype_name, tokens=B * args.T, C=C)
                try:
                    if not gpu and B * args.T * C > CPU_MAX_ELEMENTS:
                        reason = f"{B * args.T * C:.3g} logits, over the CPU's 2**30 (minutes per call)"
                        skipped = dict.fromkeys(METHODS, reason)
                    else:
                        skipped = plan(B, args.T, C, getattr(torch, dtype_name),
                                       free_memory_bytes(args.device), args.mem_fraction)
                    for k, reason in skipped.items():
                        print(f"  {k}: skipped ({reason})", flush=True)
                    methods = [k for k in METHODS if k not in skipped]
                    if methods:
                        row.update(run_case(args, n, C, dtype_name, methods))
                    row.update({f"{k}_skipped": reason for k, reason in skipped.items()})
                except Exception as e:  # out of memory included
                    row["error"] = describe(e)
                    print(f"  case failed ({row['error']})", flush=True)
                release_memory(args.device)
                row.update(isa=meta["isa"], threads=meta["threads"])
                failures += sum(k == "error" or k.endswith("_error") for k in row)
                results.add(row)
                print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"wrote {results.stem}.json and {results.stem}.csv"
          + (f" ({failures} failures recorded)" if failures else ""))
    return results


if __name__ == "__main__":
    main()
