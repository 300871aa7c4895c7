"""Fused linear + masked cross entropy against what users write today, forward +
backward, time and peak extra memory:

  fused   masked_linear_cross_entropy(hidden, weight, target, lengths, bias=bias)
  fused_valid_rows  the same with VARLEN_KERNELS_TOKEN_GEMM=valid_rows (GPU only): on
          sm_90 / sm_100 in bfloat16 (the default dtype there) the valid tokens are
          ordered first and the GEMMs take them alone, where fused runs every row
          through them (on an H200 valid_rows was 1.5x slower: 95.9 against 63.1 ms)
  idiom   logits = F.linear(hidden, weight, bias); the masked mean of
          F.cross_entropy(reduction="none") (all B*T logits, padding included)
  ignore  F.linear + F.cross_entropy(ignore_index=-100)
  masked  F.linear + varlen_kernels.masked_cross_entropy (fused loss, full logits)

Each method runs in a fresh process: its peak extra memory is the peak resident
set (CPU: ru_maxrss) or the peak allocated memory (GPU) of its first call minus
what was held before it; then it is timed (median and min over --repeats calls).
Lengths uniform in [1, T]. Writes linear_ce_<device>.{json,csv} to a new run
folder under benchmarks/results/runs/ (or --out).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("fused", "fused_valid_rows", "idiom", "ignore", "masked")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_method(cfg):
    """In a fresh process: {extra_MiB, ms, min_ms} of one method."""
    import torch
    import torch.nn.functional as F
    from varlen_kernels import masked_cross_entropy, masked_linear_cross_entropy

    torch.set_num_threads(cfg["threads"])
    dev, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    B, T, H, V = cfg["B"], cfg["T"], cfg["H"], cfg["V"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, T + 1, (B,), generator=g).to(dev)
    hidden = torch.randn(T, B, H, generator=g).to(dev, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dev, dtype).requires_grad_()
    bias = torch.zeros(V, device=dev, dtype=dtype, requires_grad=True)
    target = torch.randint(0, V, (T, B), generator=g).to(dev)
    valid = torch.arange(T, device=dev)[:, None] < lengths[None, :]
    ignore_target = target.masked_fill(~valid, -100)

    def fused():
        masked_linear_cross_entropy(hidden, weight, target, lengths, bias=bias).backward()

    def idiom():
        logits = F.linear(hidden, weight, bias).view(-1, V)
        per = F.cross_entropy(logits, target.view(-1), reduction="none")
        ((per * valid.view(-1)).sum() / valid.sum()).backward()

    def ignore():
        logits = F.linear(hidden, weight, bias).view(-1, V)
        F.cross_entropy(logits, ignore_target.view(-1), ignore_index=-100).backward()

    def masked():
        masked_cross_entropy(F.linear(hidden, weight, bias), target, lengths, batch_first=False).backward()

    if cfg["method"] == "fused_valid_rows":
        os.environ["VARLEN_KERNELS_TOKEN_GEMM"] = "valid_rows"
    fn = {"fused": fused, "fused_valid_rows": fused, "idiom": idiom, "ignore": ignore,
          "masked": masked}[cfg["method"]]

    def call():
        for t in (hidden, weight, bias):
            t.grad = None
        fn()

    gpu = dev.startswith("cuda")
    if gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    call()
    if gpu:
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(cfg["repeats"]):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if gpu:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"extra_MiB": round(extra / 2**20, 1), "ms": round(times[len(times) // 2], 2),
            "min_ms": round(times[0], 2), "valid_fraction": round(valid.float().mean().item(), 3)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    ap.add_argument("--B", type=int, default=None)
    ap.add_argument("--T", type=int, default=None)
    ap.add_argument("--H", type=int, default=None)
    ap.add_argument("--V", type=int, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default=None,
                    help="comma list (default: all; fused_valid_rows on a GPU only)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._child:
        print(json.dumps(run_method(json.loads(args._child))))
        return 0
    import torch  # only the parent's information needs it here

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    # Defaults: B*T = 16384 tokens, about half valid; GPU H=1024, V=131072, bf16.
    B = args.B or (4 if args.quick else 64)
    T = args.T or (8 if args.quick else 256)
    H = args.H or (16 if args.quick else (1024 if gpu else 256))
    V = args.V or (300 if args.quick else (131072 if gpu else 32000))
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    repeats = args.repeats or (2 if args.quick else 3)
    threads = args.threads or torch.get_num_threads()
    from bench_rnn import default_out, run_info  # noqa: E402
    out = args.out or default_out(device)
    os.makedirs(out, exist_ok=True)
    meta = run_info(device)
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    row = dict(B=B, T=T, tokens=B * T, H=H, V=V, dtype=dtype, threads=threads)
    methods = args.methods or ",".join(m for m in METHODS if gpu or m != "fused_valid_rows")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    for method in methods.split(","):
        cfg = dict(method=method, device=device, dtype=dtype, B=B, T=T, H=H, V=V, repeats=repeats,
                   threads=threads)
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(cfg)],
                           capture_output=True, text=True, env=env, cwd=HERE)
        if r.returncode != 0:
            row[f"{method}_error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
            print(f"  {method}: failed ({row[f'{method}_error']})", flush=True)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        row["valid_fraction"] = res.pop("valid_fraction")
        for k, v in res.items():
            row[f"{method}_{k}"] = v
        print(f"  {method}: {res}", flush=True)
    for other in METHODS[1:]:
        if "fused_ms" in row and f"{other}_ms" in row:
            row[f"speedup_vs_{other}"] = round(row[f"{other}_ms"] / row["fused_ms"], 2)
            row[f"memory_ratio_vs_{other}"] = round(row[f"{other}_extra_MiB"] / max(row["fused_extra_MiB"], 0.1), 1)
    print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    stem = os.path.join(out, f"linear_ce_{device.split(':')[0]}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": [row]}, f, indent=1)
    with open(stem + ".csv", "w") as f:
        f.write(",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")
    print(f"wrote {stem}.json and {stem}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
