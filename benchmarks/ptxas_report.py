"""Registers, spills and shared memory of the persistent RNN kernels, from ptxas.

Compiles csrc/cuda/rnn_persistent.cu and rnn_persistent_proj.cu (the
projection LSTM's, "LSTMP" below) alone with nvcc -Xptxas -v for one
architecture (no GPU needed) and writes one line per kernel instantiation:

  python benchmarks/ptxas_report.py                         # sm_90a, prints the table
  python benchmarks/ptxas_report.py --out benchmarks/results/ptxas_persistent.txt

A kernel that spills in a dtype the benchmarks run (float32, half, bfloat16)
makes the exit status 1; float64 (the tests' dtype) is reported but allowed.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # read when cpp_extension is imported

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCES = [os.path.join(ROOT, "csrc", "cuda", name)
           for name in ("rnn_persistent.cu", "rnn_persistent_proj.cu")]


def nvcc_path():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return os.path.join(home, "bin", "nvcc")


def include_dirs():
    includes = [os.path.join(ROOT, "csrc")] + cpp_extension.include_paths(device_type="cuda")
    try:  # the CUDA wheels' headers, which torch's CUDA headers include
        import nvidia
        for base in nvidia.__path__:
            for name in sorted(os.listdir(base)):
                inc = os.path.join(base, name, "include")
                if name.startswith("cu") and os.path.isdir(inc):
                    includes.append(inc)
    except ImportError:
        pass
    return includes


def compile_command(source, out, arch, *extra, phase="-c"):
    """nvcc compiling `source` alone for `arch` into `out` (an object, or with
    phase="-cubin" a cubin), with the extension's flags."""
    cmd = [nvcc_path(), phase, source, "-o", out, "-std=c++20", "-O3", "--expt-relaxed-constexpr",
           f"-gencode=arch=compute_{arch[3:]},code={arch}", "-DVK_WITH_CUDA",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *extra]
    return cmd + [f"-I{i}" for i in include_dirs()]


def run(arch):
    logs = []
    for source in SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run(compile_command(source, os.path.join(tmp, "k.o"), arch, "-Xptxas=-v"),
                               capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"nvcc failed on {source}:\n{r.stderr[-4000:]}")
        logs.append(r.stderr)
    return "\n".join(logs)


def demangle(names):
    filt = os.path.join(os.path.dirname(nvcc_path()), "cu++filt")
    if not os.path.exists(filt):
        filt = shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout
    return out.strip().split("\n")


def short(name):
    """persistent_forward_kernel<float, float, (varlen::Cell)0> -> forward float LSTM;
    proj_forward_kernel<float, float, ...TcProduct<float>> -> forward tensor float LSTMP."""
    m = re.search(r"proj_(forward|backward)_kernel<([^,]+), [^,]+, .*(Fma|Tc)Product<", name)
    if m:
        dtype = {"c10::Half": "half", "c10::BFloat16": "bfloat16"}.get(m.group(2), m.group(2))
        unit = "tensor" if m.group(3) == "Tc" else "fma"
        return f"{m.group(1):8s} {unit:6s} {dtype:9s} LSTMP"
    m = re.search(r"persistent_(forward|backward)(_tc)?_kernel<([^,]+), (?:[^,]+, )?"
                  r"\(varlen::Cell\)(\d)>", name)
    if not m:
        return name
    cells = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
    dtype = {"c10::Half": "half", "c10::BFloat16": "bfloat16"}.get(m.group(3), m.group(3))
    unit = "tensor" if m.group(2) else "fma"
    return f"{m.group(1):8s} {unit:6s} {dtype:9s} {cells[int(m.group(4))]}"


def parse(log):
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2)}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current.update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                           spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
            rows.append(current)
            current = None
    rows = [r for r in rows
            if "persistent_" in r["mangled"] or re.search(r"proj_(forward|backward)_kernel",
                                                          r["mangled"])]
    for r, name in zip(rows, demangle([r["mangled"] for r in rows])):
        r["name"] = short(name)
    return sorted(rows, key=lambda r: r["name"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    rows = parse(run(args.arch))
    if not rows:
        sys.exit("no persistent kernel found in ptxas' output")
    lines = [f"# ptxas -v, {args.arch}, nvcc {subprocess.run([nvcc_path(), '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1]}, torch {torch.__version__}",
             "# kernel                              registers  stack  spill_stores  spill_loads"]
    for r in rows:
        lines.append(f"{r['name']:37s} {r['registers']:9d} {r['stack']:6d} {r['spill_st']:13d} "
                     f"{r['spill_ld']:12d}")
    spills = [r["name"] for r in rows if r["spill_st"] or r["spill_ld"]]
    lines.append(f"# {len(rows)} kernels, {len(spills)} with spills" +
                 (": " + ", ".join(s.strip() for s in spills) if spills else ""))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if any("double" not in s for s in spills) else 0


if __name__ == "__main__":
    sys.exit(main())
