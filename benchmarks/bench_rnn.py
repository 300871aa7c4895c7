"""Forward+backward time of MaskedRNN against what a user would run instead.

Baselines, side by side in one run, same weights, lengths uniform in [1, T]:
  packed    nn.LSTM/GRU on pack_padded_sequence (pack and unpack included)
  padded    nn.LSTM/GRU on the whole padded batch (does all the padded work)
  reference (CPU) varlen_kernels.masked_rnn_reference, the pure-PyTorch masked loop
  compiled  (GPU) the same masked loop with its per-step body torch.compile'd

Writes benchmarks/results/rnn_<device>.{json,csv} with the device name, torch
version and git commit. Run with `make bench`, or
`python benchmarks/bench_rnn.py --device cuda` on a GPU machine.
"""
import argparse
import csv
import json
import os
import platform
import subprocess
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.benchmark import Timer

import varlen_kernels
from varlen_kernels import MaskedRNN, masked_rnn_reference
from varlen_kernels.reference import _cell_step

HERE = os.path.dirname(os.path.abspath(__file__))


def commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                       text=True).strip()
    except Exception:
        return "unknown"


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def make_case(cell, T, B, H, dtype, device, seed=0):
    torch.manual_seed(seed)
    nn_cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    ref = nn_cls(H, H, device=device, dtype=dtype)
    masked = MaskedRNN.from_torch(ref)
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    return ref, masked, x, lengths


def runners(ref, masked, x, lengths, device):
    T = x.shape[0]
    lengths_dev = lengths.to(device)

    def fwd_bwd(out):
        out.sum().backward()

    def masked_step():
        y, _ = masked(x, lengths_dev)
        fwd_bwd(y)

    def packed_step():
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, _ = ref(packed)
        y, _ = pad_packed_sequence(y, total_length=T)
        fwd_bwd(y)

    def padded_step():
        y, _ = ref(x)
        fwd_bwd(y)

    def reference_step():
        y, _ = masked_rnn_reference(masked, x, lengths_dev)
        fwd_bwd(y)

    out = {"masked": masked_step, "packed": packed_step, "padded": padded_step,
           "reference": reference_step}
    if device == "cuda":
        # What a user would write with torch.compile: the masked loop in Python,
        # its per-step body compiled once (compiling all T unrolled steps would
        # take minutes per shape).
        cell = masked.cell
        weights = masked.all_weights[0]
        step = torch.compile(masked_step, dynamic=False)

        def compiled_step():
            valid = torch.arange(T, device=device).unsqueeze(1) < lengths_dev
            h = x.new_zeros(x.shape[1], masked.hidden_size)
            c = h if cell == "lstm" else None
            ys = []
            for t in range(T):
                h, c, y = step(cell, x[t], valid[t].unsqueeze(1), h, c, *weights)
                ys.append(y)
            fwd_bwd(torch.stack(ys))

        out["compiled"] = compiled_step
        del out["reference"]  # the compiled loop stands for it on the GPU
    return out


def masked_step(cell, x_t, m, h, c, w_ih, w_hh, b_ih, b_hh):
    zero = torch.zeros((), dtype=x_t.dtype, device=x_t.device)
    h_new, c_new = _cell_step(cell, torch.where(m, x_t, zero), h, c, w_ih, w_hh, b_ih, b_hh)
    c = torch.where(m, c_new, c) if c is not None else None
    return torch.where(m, h_new, h), c, torch.where(m, h_new, zero)


def median_ms(fn, min_run_time):
    fn()  # warm-up (and compilation)
    fn()
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = m.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--T", type=int, nargs="*")
    ap.add_argument("--B", type=int, nargs="*")
    ap.add_argument("--H", type=int, nargs="*")
    ap.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    ap.add_argument("--skip", default="", help="comma list of baselines to skip")
    ap.add_argument("--min-run-time", type=float, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    gpu = args.device == "cuda"
    Ts = args.T or ([512] if gpu else [100])
    Bs = args.B or ([8, 64, 256] if gpu else [64])
    Hs = args.H or ([256, 1024] if gpu else [256])
    dtypes = (args.dtypes or ("float32,bfloat16" if gpu else "float32")).split(",")
    min_run_time = args.min_run_time or (1.0 if gpu else 2.0)
    skip = set(filter(None, args.skip.split(",")))

    meta = {"device": device_name(args.device), "torch": torch.__version__, "commit": commit(),
            "varlen_kernels": varlen_kernels.__version__, "python": sys.version.split()[0]}
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    rows = []
    for cell in args.cells.split(","):
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for T in Ts:
                for B in Bs:
                    for H in Hs:
                        ref, masked, x, lengths = make_case(cell, T, B, H, dtype, args.device)
                        valid = int(lengths.sum())
                        times = {}
                        for name, fn in runners(ref, masked, x, lengths, args.device).items():
                            if name in skip:
                                continue
                            try:
                                times[name] = median_ms(fn, min_run_time)
                            except (RuntimeError, NotImplementedError) as e:  # e.g. no bf16 kernel
                                print(f"  {name}: not measured ({type(e).__name__}: {str(e)[:120]})")
                        row = dict(cell=cell, dtype=dtype_name, T=T, B=B, H=H,
                                   valid_fraction=round(valid / (T * B), 3))
                        for name, ms in times.items():
                            row[f"{name}_ms"] = round(ms, 3)
                            row[f"{name}_tok_per_s"] = round(valid / (ms * 1e-3))
                        for name, ms in times.items():
                            if name != "masked" and "masked" in times:
                                row[f"speedup_vs_{name}"] = round(ms / times["masked"], 2)
                        rows.append(row)
                        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"rnn_{args.device}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {stem}.json and {stem}.csv")


if __name__ == "__main__":
    main()
