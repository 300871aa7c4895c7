"""Forward+backward time (and, on a GPU, peak extra memory) of masked_cross_entropy
against the idioms users write today, in one run:

  idiom   (F.cross_entropy(reduction="none") * mask).sum() / mask.sum()
  ignore  F.cross_entropy(ignore_index=-100) with -100 at padded targets

Lengths uniform in [1, T]. Writes benchmarks/results/losses_<device>.{json,csv}.
"""
import argparse
import csv
import json
import os

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from bench_rnn import commit, device_name
from varlen_kernels import masked_cross_entropy

HERE = os.path.dirname(os.path.abspath(__file__))


def case(tokens, C, dtype, device, T=256, seed=0):
    torch.manual_seed(seed)
    B = max(1, tokens // T)
    logits = torch.randn(B, T, C, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, C, (B, T), device=device)
    lengths = torch.randint(1, T + 1, (B,), device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    ignore_target = target.masked_fill(~mask, -100)

    def ours():
        masked_cross_entropy(logits, target, lengths).backward()

    def idiom():
        per = F.cross_entropy(logits.view(-1, C), target.view(-1), reduction="none")
        ((per * mask.view(-1)).sum() / mask.sum()).backward()

    def ignore():
        F.cross_entropy(logits.view(-1, C), ignore_target.view(-1), ignore_index=-100).backward()

    return B, T, mask, {"masked": ours, "idiom": idiom, "ignore": ignore}


def measure(fn, device, min_run_time):
    fn()
    extra = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    t = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3, extra


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="*")
    ap.add_argument("--C", type=int, nargs="*")
    ap.add_argument("--dtypes", default=None)
    ap.add_argument("--min-run-time", type=float, default=0.5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    gpu = args.device == "cuda"
    tokens = args.tokens or [8192, 65536]
    Cs = args.C or ([1024, 32768, 131072] if gpu else [1024, 32768])
    dtypes = (args.dtypes or ("float32,bfloat16" if gpu else "float32")).split(",")
    meta = {"device": device_name(args.device), "torch": torch.__version__, "commit": commit()}
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    rows = []
    for dtype_name in dtypes:
        for n in tokens:
            for C in Cs:
                if not gpu and n * C > 2**30:  # keep CPU runs within memory and minutes
                    continue
                B, T, mask, fns = case(n, C, getattr(torch, dtype_name), args.device)
                row = dict(dtype=dtype_name, tokens=B * T, C=C,
                           valid_fraction=round(mask.float().mean().item(), 3))
                res = {k: measure(f, args.device, args.min_run_time) for k, f in fns.items()}
                for k, (ms, mem) in res.items():
                    row[f"{k}_ms"] = round(ms, 3)
                    if mem is not None:
                        row[f"{k}_extra_MiB"] = round(mem, 1)
                for k in ("idiom", "ignore"):
                    row[f"speedup_vs_{k}"] = round(res[k][0] / res["masked"][0], 2)
                    if res[k][1] is not None:
                        row[f"memory_ratio_vs_{k}"] = round(res[k][1] / max(res["masked"][1], 1e-9), 2)
                rows.append(row)
                print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                del fns
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"losses_{args.device}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {stem}.json and {stem}.csv")


if __name__ == "__main__":
    main()
