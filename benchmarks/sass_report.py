"""Instructions of the persistent RNN kernels' innermost loops, from their SASS.

What a kernel's steady state issues, per unit of work, is visible without a GPU:
this compiles csrc/cuda/rnn_persistent.cu alone for sm_90a (as ptxas_report.py
does, into a cubin), disassembles it with nvdisasm and, for each kernel named
below, finds the innermost loops (those containing no other loop) that hold
the instructions of interest and reports their length per unit of work:

  LDGSTS   the tensor-core kernels' staging: one 16-byte cp.async
  HMMA     their product: one tensor-core instruction (mma.sync m16n8k16, or m16n8k8 in TF32)
  FFMA     the CUDA-core kernels' product: one fused multiply-add (DFMA in float64)

  python benchmarks/sass_report.py
  python benchmarks/sass_report.py --out benchmarks/results/sass_persistent.txt

A loop's instructions per unit is a static count of its body over the units
in it (an unrolled loop holds several); how often each loop runs, and what each
instruction costs, only a GPU measures.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import ptxas_report  # noqa: E402

SOURCE = os.path.join(ptxas_report.ROOT, "csrc", "cuda", "rnn_persistent.cu")
# (label, mangled-name fragment, unit): the kernels of the benchmarks' dtypes.
KERNELS = [
    ("forward  tensor bfloat16 LSTM", "persistent_forward_tc_kernelIN3c108BFloat16ELNS_4CellE0E", "LDGSTS"),
    ("backward tensor bfloat16 LSTM", "persistent_backward_tc_kernelIN3c108BFloat16ELNS_4CellE0E", "LDGSTS"),
    ("backward tensor float(TF32) LSTM", "persistent_backward_tc_kernelIfLNS_4CellE0E", "LDGSTS"),
    ("forward  tensor bfloat16 LSTM", "persistent_forward_tc_kernelIN3c108BFloat16ELNS_4CellE0E", "HMMA"),
    ("backward tensor float(TF32) LSTM", "persistent_backward_tc_kernelIfLNS_4CellE0E", "HMMA"),
    ("forward  fma    float LSTM", "persistent_forward_kernelIffLNS_4CellE0E", "FFMA"),
    ("forward  fma    float GRU", "persistent_forward_kernelIffLNS_4CellE1E", "FFMA"),
    ("backward fma    float LSTM", "persistent_backward_kernelIffLNS_4CellE0E", "FFMA"),
    ("forward  fma    double LSTM", "persistent_forward_kernelIddLNS_4CellE0E", "DFMA"),
]


def nvdisasm_path():
    """nvdisasm of the CUDA toolkit, else the one Triton's wheel carries."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [os.path.join(home, "bin", "nvdisasm"), shutil.which("nvdisasm")]
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "nvdisasm"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.exists(c):
            return c
    sys.exit("nvdisasm not found (CUDA_HOME/bin, PATH or Triton's wheel)")


def disassemble(arch):
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        r = subprocess.run(ptxas_report.compile_command(SOURCE, cubin, arch, phase="-cubin"),
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"nvcc failed:\n{r.stderr[-4000:]}")
        r = subprocess.run([nvdisasm_path(), "-c", cubin], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"nvdisasm failed:\n{r.stderr[-2000:]}")
        return r.stdout


def kernel_instructions(text, fragment):
    """The instructions of the kernel whose section names `fragment`, and the
    index of each label among them."""
    ins, labels, inside = [], {}, False
    for line in text.splitlines():
        if line.startswith(".text."):
            if inside:
                break
            inside = fragment in line
            continue
        if not inside:
            continue
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1).strip())
    return ins, labels


def opcode(instruction):
    words = instruction.split()
    op = words[1] if words[0].startswith("@") else words[0]
    return op.split(".")[0]


def innermost_loops(ins, labels, unit):
    """(instructions, units) of each innermost loop holding `unit`: a loop is
    a backward branch and its target."""
    loops = []
    for i, t in enumerate(ins):
        m = re.search(r"BRA.*`\((\.L_x_\d+)\)", t)
        if m and labels.get(m.group(1), len(ins)) <= i:
            loops.append((labels[m.group(1)], i))
    inner = [(a, b) for a, b in loops
             if not any(c >= a and d <= b and (c, d) != (a, b) for c, d in loops)]
    out = []
    for a, b in sorted(set(inner)):
        counts = collections.Counter(opcode(t) for t in ins[a:b + 1])
        if counts[unit]:
            out.append((b - a + 1, counts[unit]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args()
    text = disassemble(args.arch)
    lines = [f"# innermost loops of the persistent kernels, {args.arch}: instructions / units "
             f"(per unit); units: LDGSTS = one 16-byte copy, HMMA = one tensor-core instruction, "
             f"FFMA/DFMA = one fused multiply-add",
             "# kernel                            unit    loops"]
    missing = []
    for label, fragment, unit in KERNELS:
        ins, labels = kernel_instructions(text, fragment)
        if not ins:
            missing.append(label)
            continue
        loops = innermost_loops(ins, labels, unit)
        desc = ", ".join(f"{n}/{u} ({n / u:.2f})" for n, u in loops) or "none"
        lines.append(f"{label:35s} {unit:7s} {desc}")
    if missing:
        lines.append("# not found: " + ", ".join(missing))
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
