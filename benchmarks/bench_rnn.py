"""Forward+backward time of MaskedRNN against what a user would run instead.

Baselines, side by side in one run, same weights, lengths uniform in [1, T]:
  masked    MaskedRNN (on a GPU: its default CUDA path, the persistent kernels
            where they fit and a step's product is within the bound that the
            auto path takes them to, else the per-step path)
  per_step  MaskedRNN on the per-step CUDA path (VARLEN_KERNELS_RNN_PATH=per_step;
            GPU only)
  aten_gemm MaskedRNN whose per-step path makes its GEMMs as ATen ops
            (at::mm_out; VARLEN_KERNELS_STEP_GEMM=aten; GPU only), where masked
            calls the same cuBLAS GEMM directly: the host time of the ATen op
            (it differs from masked only where masked takes the per-step path)
  persistent  MaskedRNN on its persistent kernels wherever they fit, past the
            auto path's bound too (VARLEN_KERNELS_RNN_PATH=persistent; GPU only)
  all_rows  MaskedRNN with its GEMMs over tokens on all T*B rows
            (VARLEN_KERNELS_TOKEN_GEMM=all_rows; GPU only): what the grouped
            GEMMs over the valid tokens save (bfloat16 on sm_90 / sm_100; the
            same path elsewhere)
  host_lengths  MaskedRNN given its lengths on the CPU, as pack_padded_sequence
            wants them (GPU only): the length plan made on the host, the GEMMs
            over tokens over exactly the valid ones in every dtype
  packed    nn.LSTM/GRU on pack_padded_sequence (pack and unpack included)
  padded    nn.LSTM/GRU on the whole padded batch (does all the padded work)
  reference varlen_kernels.masked_rnn_reference, the pure-PyTorch masked loop
            (default on the CPU)
  compiled  the same masked loop with its per-step body torch.compile'd
            (default on the GPU; on the CPU with --quick or --baselines;
            one direction only)
  split     with --bidirectional: MaskedRNN with each direction of a layer as
            an op of its own (rnn_forward), one after the other, where masked
            runs both in one op (rnn_bidirectional_forward)
  grid_sync MaskedRNN with its persistent kernels in the grid form, a grid.sync()
            a step over all CTAs (VARLEN_KERNELS_PERSISTENT_SYNC=grid; GPU
            only), where masked takes the cluster form wherever it fits
  global_exchange
            MaskedRNN whose persistent kernels in the cluster form pass h (and
            the backward's dgh) between their CTAs through global memory
            (VARLEN_KERNELS_PERSISTENT_EXCHANGE=global; GPU only), where masked
            passes them through the cluster's distributed shared memory
            wherever its buffers fit
  dsmem_barrier
            MaskedRNN whose cluster form passes them through distributed
            shared memory with plain stores and a cluster barrier a step
            (VARLEN_KERNELS_PERSISTENT_EXCHANGE=dsmem_barrier; GPU only), where
            masked's stores complete on an mbarrier of the CTA they store into
            and no barrier ends a step, wherever the columns are whole 16-byte
            pieces
  four_slots  MaskedRNN whose tensor-core persistent kernels pipeline the
            staging of their operand rows from global memory through up to 4
            slots of asynchronous copies (VARLEN_KERNELS_PERSISTENT_SLOTS=4;
            GPU only), where masked stages one chunk at a time, between two
            barriers
  bulk      MaskedRNN whose tensor-core persistent kernels stage their operand
            rows with one bulk copy a row (cp.async.bulk on an mbarrier;
            VARLEN_KERNELS_PERSISTENT_COPY=bulk; GPU only), as masked does
            where they can
  async_copy
            MaskedRNN whose tensor-core persistent kernels stage their operand
            rows with 16-byte asynchronous copies (cp.async;
            VARLEN_KERNELS_PERSISTENT_COPY=async; GPU only)
  row_groups
            MaskedRNN whose persistent kernels' grid form runs as 2 row groups
            of CTAs, each owning every hidden unit (twice the units a CTA) and
            stepping every other 16-row tile of the running rows
            (VARLEN_KERNELS_PERSISTENT_GROUPS=2; GPU only), where masked runs
            the backward's tensor-core kernels as 2 from 32 rows of the batch,
            everything else as one
  one_group MaskedRNN whose persistent kernels' grid form runs as one group,
            each CTA stepping every running row
            (VARLEN_KERNELS_PERSISTENT_GROUPS=1; GPU only)
  (grid_sync, global_exchange, four_slots, bulk, async_copy, row_groups, one_group, units_N and
  stage_N change the persistent kernels: they differ from masked only where it
  takes them)
  a+b       the settings of several of the baselines from per_step to stage_N
            at once (persistent+row_groups: the persistent kernels past the auto
            path's bound, as 2 row groups; GPU only)
  units_N   with --units N,...: MaskedRNN whose persistent kernels give each
            CTA at least N hidden units, so fewer CTAs than their default of
            one per SM (VARLEN_KERNELS_PERSISTENT_UNITS=N; GPU only): how the
            time of a step depends on the number of CTAs that synchronize
  stage_N   with --stages N,...: MaskedRNN whose persistent kernels stage a
            tile's whole reduction at once only where it takes at most N KiB
            of shared memory, else in chunks, one round trip each
            (VARLEN_KERNELS_PERSISTENT_STAGE_KIB=N; 0: always in chunks; GPU
            only)
With --proj-size P the cells are LSTMs with nn.LSTM's proj_size = P, for every
method (compiled dropped: its loop has no projection).

The methods are interleaved: each repeat times every method once (the median of
a blocked_autorange), round-robin, so a slow phase of a noisy machine hits all of
them. Per method a row gives the median over the repeats (name_ms), the fastest
repeat (name_min_ms) and the spread (slowest / fastest repeat, name_spread); the
speedups are ratios of the medians (speedup_vs_name), of the fastest repeats
(speedup_vs_name_of_min), and the lowest and highest ratio of one repeat's two
timings (speedup_vs_name_lo / _hi). A method or a case that fails is reported as
`name: failed (Type: message)`, recorded in the row (name_error / error), and the
run goes on.

masked_gflop_per_s is the rate of the recurrence's GEMM work on the valid tokens
(forward + backward, recurrence_flops) at the median time (_max: at the fastest
repeat); the run's meta holds the machine's large-GEMM rate on the same threads
(gemm_gflop_per_s, the best of a few n x n float32 torch.mm, n = 2048 on the CPU;
gemm_gflop_per_s_by_dtype the same in each dtype of the run, and each row's
gemm_gflop_per_s the one of its dtype) to compare it with, and the load average
before and after the run. ceiling_vs_name is the baseline's median time over
the time of that GEMM work at that rate: the
largest speedup over the baseline that any method doing the valid tokens' GEMMs
(forward and backward) could reach on the machine.

On a GPU, fp32 is compared at equal precision, twice: dtype "float32" runs IEEE
float32 for every method (cuDNN's RNNs and CUDA matmuls switched from their
TF32 default), dtype "tf32" float32 tensors with TF32 allowed for every method
(cuDNN's RNNs and CUDA matmuls, hence MaskedRNN's tensor-core kernels too).
Each GPU row also has MaskedRNN's
forward alone per time step (masked_fwd_us_per_step) and the peak memory of one
forward+backward per method (name_peak_mib).

Results go to a new run folder, benchmarks/results/runs/<timestamp>_<device>/, as
rnn_<device>.{json,csv}, rewritten after every case. The committed results in
benchmarks/results/ are refreshed only on purpose, with `--out benchmarks/results`.

  python benchmarks/bench_rnn.py --quick       # seconds: tiny sizes, every baseline
  python benchmarks/bench_rnn.py               # the CPU figures (minutes): T=100,
                                               # B in {64, 8}, H in {256, 128}
  python benchmarks/bench_rnn.py --device cuda --out benchmarks/results
"""
import argparse
import contextlib
import csv
import importlib.util
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.benchmark import Timer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if importlib.util.find_spec("varlen_kernels") is None:
    sys.path.insert(0, ROOT)  # a checkout that is neither installed nor on PYTHONPATH

import varlen_kernels  # noqa: E402
from varlen_kernels import MaskedRNN, masked_rnn_reference  # noqa: E402
from varlen_kernels.reference import _cell_step  # noqa: E402

BASELINES = ("masked", "per_step", "aten_gemm", "persistent", "all_rows", "grid_sync", "global_exchange",
             "dsmem_barrier", "four_slots", "bulk", "async_copy", "row_groups", "one_group", "host_lengths", "split", "packed", "padded", "reference", "compiled")
# Baselines that are MaskedRNN under a setting (CUDA paths): (variable, value),
# set around the forward and the backward.
SETTINGS = {"per_step": ("VARLEN_KERNELS_RNN_PATH", "per_step"),
            "persistent": ("VARLEN_KERNELS_RNN_PATH", "persistent"),
            "aten_gemm": ("VARLEN_KERNELS_STEP_GEMM", "aten"),
            "all_rows": ("VARLEN_KERNELS_TOKEN_GEMM", "all_rows"),
            "grid_sync": ("VARLEN_KERNELS_PERSISTENT_SYNC", "grid"),
            "global_exchange": ("VARLEN_KERNELS_PERSISTENT_EXCHANGE", "global"),
            "dsmem_barrier": ("VARLEN_KERNELS_PERSISTENT_EXCHANGE", "dsmem_barrier"),
            "four_slots": ("VARLEN_KERNELS_PERSISTENT_SLOTS", "4"),
            "bulk": ("VARLEN_KERNELS_PERSISTENT_COPY", "bulk"),
            "async_copy": ("VARLEN_KERNELS_PERSISTENT_COPY", "async"),
            "row_groups": ("VARLEN_KERNELS_PERSISTENT_GROUPS", "2"),
            "one_group": ("VARLEN_KERNELS_PERSISTENT_GROUPS", "1")}
UNITS = re.compile(r"units_([0-9]+)")
STAGES = re.compile(r"stage_([0-9]+)")


def setting_of(name):
    """The settings [(variable, value), ...] of a baseline that is MaskedRNN under
    settings, else None: a name of SETTINGS, units_N or stage_N, or several of
    them joined by '+', all at once (persistent+row_groups: the persistent
    kernels past the auto path's bound, as 2 row groups), no variable twice."""
    if "+" in name:
        each = [setting_of(part) for part in name.split("+")]
        if any(e is None or len(e) != 1 for e in each):
            return None
        pairs = [e[0] for e in each]
        return pairs if len({var for var, _ in pairs}) == len(pairs) else None
    if name in SETTINGS:
        return [SETTINGS[name]]
    m = UNITS.fullmatch(name)
    if m:
        return [("VARLEN_KERNELS_PERSISTENT_UNITS", m.group(1))]
    m = STAGES.fullmatch(name)
    return [("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", m.group(1))] if m else None


def gpu_only(name):
    """Baselines that only differ from masked on a GPU."""
    return name == "host_lengths" or setting_of(name) is not None


def known(name):
    return name in BASELINES or setting_of(name) is not None


GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# ------------------------------------------------------------------ run info
def commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def cpu_isa():
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:
        return "unknown"


# Settings that cap the instruction set of PyTorch's kernels, oneDNN, MKL and
# varlen_kernels' CPU kernels (an AVX-512 machine run as an AVX2 one).
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
            "MKL_ENABLE_INSTRUCTIONS", "VARLEN_KERNELS_CPU_CAPABILITY")


def cpu_has(flag):
    """Whether /proc/cpuinfo lists the flag (None where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        pass
    return None


def run_info(device):
    """What a figure depends on: device, ISA PyTorch dispatches to (and any cap
    set on it), threads, versions, load."""
    return {"device": device_name(device), "isa": cpu_isa(), "threads": torch.get_num_threads(),
            "isa_caps": {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)},
            "cpu_has_avx512f": cpu_has("avx512f"),
            "torch": torch.__version__, "commit": commit(), "varlen_kernels": varlen_kernels.__version__,
            "python": sys.version.split()[0], "load_before": load_average()}


def load_average():
    """1-minute load average of the machine (None where the OS does not say)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def torch_dtype(dtype_name):
    return torch.float32 if dtype_name == "tf32" else getattr(torch, dtype_name)


def gemm_rate(device, n, dtype=torch.float32, repeats=5):
    """The machine's large-GEMM rate in GFLOP/s: best of `repeats` n x n x n
    torch.mm in dtype (MKL or oneDNN on the CPU), on the current threads."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return float(f"{2 * n ** 3 / best / 1e9:.4g}")


def device_tag(device):
    return re.sub(r"[^A-Za-z0-9]+", "", device)


def default_out(device):
    """A fresh run folder, so a run never overwrites the committed results."""
    runs = os.path.join(RESULTS, "runs")
    os.makedirs(runs, exist_ok=True)
    ignore = os.path.join(runs, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("# local benchmark runs; committed results live one folder up\n*\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(runs, f"{stamp}_{device_tag(device)}")


def describe(exc):
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:300]}" if msg else type(exc).__name__


def release_memory(device):
    if device.startswith("cuda") and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        torch.cuda.empty_cache()


class Results:
    """Rows written to <out>/<stem>.json and .csv after every add(), so whatever
    was measured before a crash or a kill is on disk."""

    def __init__(self, out, stem, meta):
        os.makedirs(out, exist_ok=True)
        self.out, self.stem, self.meta, self.rows = out, os.path.join(out, stem), meta, []

    def add(self, row):
        self.rows.append(row)
        self.write()

    def write(self):
        _replace(self.stem + ".json", json.dumps({"meta": self.meta, "rows": self.rows}, indent=1) + "\n")
        keys = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        _replace(self.stem + ".csv", buf.getvalue())


def _replace(path, text):
    with open(path + ".tmp", "w", newline="") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- measuring
def measure(fns, repeats, min_run_time, warmup=2, log=print):
    """Times every fn `repeats` times, round-robin (repeat r times each method once),
    each time the median of a blocked_autorange, in ms. Returns ({name: [ms, ...]},
    {name: "Type: message"}): a method that raises (in warm-up or in any repeat) is
    dropped with its error, and the others go on."""
    live, errors = dict(fns), {}

    def fail(name, exc):
        errors[name] = describe(exc)
        live.pop(name, None)
        log(f"  {name}: failed ({errors[name]})")

    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):  # (and compilation)
                fn()
        except Exception as e:
            fail(name, e)
    times = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            try:
                timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
                times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
            except Exception as e:
                fail(name, e)
    return {name: ms for name, ms in times.items() if name in live}, errors


def add_times(row, times):
    """name_ms (median over the repeats), name_min_ms, name_spread (max / min)."""
    for name, ms in times.items():
        row[f"{name}_ms"] = round(statistics.median(ms), 3)
        row[f"{name}_min_ms"] = round(min(ms), 3)
        row[f"{name}_spread"] = round(max(ms) / min(ms), 3)


def add_speedups(row, times, ours="masked"):
    """speedup_vs_name: ratio of the medians; _of_min: of the fastest repeats; _lo / _hi:
    the lowest / highest ratio within one repeat (the two were timed back to back)."""
    for name, ms in times.items():
        if name == ours:
            continue
        row[f"speedup_vs_{name}"] = round(row[f"{name}_ms"] / row[f"{ours}_ms"], 2)
        row[f"speedup_vs_{name}_of_min"] = round(row[f"{name}_min_ms"] / row[f"{ours}_min_ms"], 2)
        per_repeat = [theirs / mine for theirs, mine in zip(ms, times[ours])]
        row[f"speedup_vs_{name}_lo"] = round(min(per_repeat), 2)
        row[f"speedup_vs_{name}_hi"] = round(max(per_repeat), 2)


# -------------------------------------------------------------------- cases
def make_case(cell, T, B, H, dtype, device, seed=0, bidirectional=False, proj_size=0):
    torch.manual_seed(seed)
    kw = dict(proj_size=proj_size) if proj_size else {}  # LSTM only
    nn_cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
    ref = nn_cls(H, H, device=device, dtype=dtype, bidirectional=bidirectional, **kw)
    masked = MaskedRNN.from_torch(ref)
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    return ref, masked, x, lengths


def masked_cell_step(cell, x_t, m, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step of the masked loop (the reference's body): what the compiled baseline compiles."""
    zero = torch.zeros((), dtype=x_t.dtype, device=x_t.device)
    h_new, c_new = _cell_step(cell, torch.where(m, x_t, zero), h, c, w_ih, w_hh, b_ih, b_hh)
    c = torch.where(m, c_new, c) if c is not None else None
    return torch.where(m, h_new, h), c, torch.where(m, h_new, zero)


def compiled_loop(masked, x, lengths_dev, backend="inductor"):
    """What a user would write with torch.compile: the masked loop in Python, its
    per-step body compiled once (compiling all T unrolled steps would take minutes
    per shape)."""
    # A fresh cache per case: the cases' shapes would otherwise pile up recompiles
    # of masked_cell_step until dynamo's limit, past which it runs eager silently.
    torch._dynamo.reset()
    step = torch.compile(masked_cell_step, dynamic=False, backend=backend)
    cell, weights, T = masked.cell, masked.all_weights[0], x.shape[0]

    def run_compiled():
        valid = torch.arange(T, device=x.device).unsqueeze(1) < lengths_dev
        h = x.new_zeros(x.shape[1], masked.hidden_size)
        c = h if cell == "lstm" else None
        ys = []
        for t in range(T):
            h, c, y = step(cell, x[t], valid[t].unsqueeze(1), h, c, *weights)
            ys.append(y)
        return torch.stack(ys)

    return run_compiled


def forwards(ref, masked, x, lengths, device, baselines=BASELINES, compile_backend="inductor"):
    """{name: fn() -> output (T, B, H)} for the requested baselines."""
    T = x.shape[0]
    lengths_dev = lengths.to(device)

    def run_masked():
        return masked(x, lengths_dev)[0]

    def run_host_lengths():
        return masked(x, lengths.cpu())[0]

    def run_packed():
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        y, _ = ref(packed)
        return pad_packed_sequence(y, total_length=T)[0]

    def run_padded():
        return ref(x)[0]

    def run_reference():
        return masked_rnn_reference(masked, x, lengths_dev)[0]

    def run_split():  # each direction its own rnn_forward op
        return masked._forward(x, lengths_dev, None, layer=varlen_kernels.ops.rnn_layer)[0]

    fns = {"masked": run_masked, "host_lengths": run_host_lengths, "split": run_split,
           "packed": run_packed, "padded": run_padded, "reference": run_reference}
    out = {}
    for name in baselines:
        if name == "compiled":
            out[name] = compiled_loop(masked, x, lengths_dev, compile_backend)
        elif setting_of(name):
            out[name] = with_setting(name, run_masked)
        else:
            out[name] = fns[name]
    return out


@contextlib.contextmanager
def setting(name):
    """The environment of a baseline under settings (nothing for the others)."""
    pairs = setting_of(name) or []
    old = {var: os.environ.get(var) for var, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        yield
    finally:
        for var, value in old.items():
            os.environ.pop(var)
            if value is not None:
                os.environ[var] = value


def with_setting(name, fn):
    def run():
        with setting(name):
            return fn()
    return run


def runners(ref, masked, x, lengths, device, baselines=BASELINES, compile_backend="inductor"):
    """{name: fn()} running forward and backward of each baseline (the backward of
    a baseline under a setting under that setting too)."""
    def fwd_bwd(name, forward):
        return with_setting(name, lambda: forward().sum().backward())

    return {name: fwd_bwd(name, f) for name, f in
            forwards(ref, masked, x, lengths, device, baselines, compile_backend).items()}


def recurrence_flops(cell, valid_tokens, I, H, P=0):
    """Forward + backward (~3x the forward) GEMM flops of the recurrence over the
    valid tokens; P > 0: an LSTM with a projection (state of P features, W_hr)."""
    if P:
        return 3 * 2 * valid_tokens * (GATES[cell] * H * (I + P) + H * P)
    return 3 * 2 * valid_tokens * GATES[cell] * H * (I + H)


def run_case(args, cell, dtype_name, T, B, H, baselines, log=print):
    bidirectional = getattr(args, "bidirectional", False)
    proj = getattr(args, "proj_size", 0)
    dtype = torch_dtype(dtype_name)
    ref, masked, x, lengths = make_case(cell, T, B, H, dtype, args.device,
                                        bidirectional=bidirectional, proj_size=proj)
    valid = int(lengths.sum())
    row = {"valid_fraction": round(valid / (T * B), 3)}
    fns = runners(ref, masked, x, lengths, args.device, baselines, args.compile_backend)
    times, errors = measure(fns, args.repeats, args.min_run_time, log=log)
    add_times(row, times)
    for name in times:
        row[f"{name}_tok_per_s"] = round(valid / (row[f"{name}_ms"] * 1e-3))
    if "masked" in times:
        add_speedups(row, times)
        flops = recurrence_flops(cell, valid, H, H, proj) * (2 if bidirectional else 1)
        row["masked_gflop_per_s"] = float(f"{flops / (row['masked_ms'] * 1e6):.3g}")
        row["masked_gflop_per_s_max"] = float(f"{flops / (row['masked_min_ms'] * 1e6):.3g}")
        # the large-GEMM rate in the case's dtype (float32 where not measured)
        gemm = getattr(args, "gemm_rates", {}).get(dtype_name) or getattr(args, "gemm_gflop_per_s", None)
        if gemm:
            row["gemm_gflop_per_s"] = gemm
            row["masked_fraction_of_gemm_rate"] = round(row["masked_gflop_per_s"] / gemm, 3)
            # The most any method doing the valid tokens' GEMM work at the
            # large-GEMM rate could be faster than each baseline.
            floor_ms = flops / (gemm * 1e6)
            for name in times:
                if name != "masked":
                    row[f"ceiling_vs_{name}"] = round(row[f"{name}_ms"] / floor_ms, 2)
    if args.device.startswith("cuda") and "masked" in times:
        fwd = forwards(ref, masked, x, lengths, args.device, ["masked"])["masked"]
        with torch.no_grad():
            ms, _ = measure({"fwd": fwd}, args.repeats, args.min_run_time, log=log)
        if ms:
            row["masked_fwd_us_per_step"] = round(statistics.median(ms["fwd"]) * 1e3 / int(lengths.max()), 2)
        for name, fn in fns.items():
            if name in times:
                row[f"{name}_peak_mib"] = peak_mib(fn, args.device)
    for name, err in errors.items():
        row[f"{name}_error"] = err
    return row


def summary(row, meta):
    """One readable line per case: our time, the ratios (median [lo-hi]), the rate."""
    head = (f"== {row['cell']}{' bidirectional' if row.get('bidirectional') else ''}"
            f"{' proj_size=' + str(row['proj_size']) if row.get('proj_size') else ''} "
            f"{row['dtype']} T={row['T']} B={row['B']} H={row['H']}")
    if "masked_ms" not in row:
        return f"{head}: masked not timed"
    parts = [f"masked {row['masked_ms']} ms (min {row['masked_min_ms']}, spread {row['masked_spread']})"]
    for name in meta.get("baselines") or BASELINES:
        if f"speedup_vs_{name}" in row:
            part = (f"x{row[f'speedup_vs_{name}']} vs {name} "
                    f"[{row[f'speedup_vs_{name}_lo']}-{row[f'speedup_vs_{name}_hi']}]")
            if f"ceiling_vs_{name}" in row:
                part += f" (ceiling x{row[f'ceiling_vs_{name}']})"
            parts.append(part)
    rate = f"{row['masked_gflop_per_s']} GFLOP/s (max {row['masked_gflop_per_s_max']})"
    if "masked_fraction_of_gemm_rate" in row:
        rate += (f" = {row['masked_fraction_of_gemm_rate']} of the large-GEMM rate "
                 f"{row['gemm_gflop_per_s']} ({row['dtype']})")
    return f"{head}: " + ", ".join(parts) + f"; {rate}; isa={meta['isa']} threads={meta['threads']}"


class float32_precision:
    """On a GPU, fp32 precision for every method: TF32 for dtype "tf32", else IEEE."""

    def __init__(self, device, dtype_name):
        self.on = device.startswith("cuda")
        self.precision = "tf32" if dtype_name == "tf32" else "ieee"

    def __enter__(self):
        if self.on:
            self.old = (torch.backends.cudnn.rnn.fp32_precision,
                        torch.backends.cuda.matmul.fp32_precision)
            torch.backends.cudnn.rnn.fp32_precision = self.precision
            torch.backends.cuda.matmul.fp32_precision = self.precision

    def __exit__(self, *exc):
        if self.on:
            (torch.backends.cudnn.rnn.fp32_precision,
             torch.backends.cuda.matmul.fp32_precision) = self.old


def peak_mib(fn, device):
    """Peak memory allocated during one call of fn (beyond what was allocated before)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)


# --------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (T=8, B=4, H=16), short timings, every baseline (compiled with "
                         "aot_eager): checks that the harness works, in seconds")
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--proj-size", type=int, default=0,
                    help="LSTM with a projection of this size (nn.LSTM's proj_size; drops compiled)")
    ap.add_argument("--bidirectional", action="store_true",
                    help="bidirectional layers (adds the split baseline, drops compiled)")
    ap.add_argument("--T", type=int, nargs="*")
    ap.add_argument("--B", type=int, nargs="*")
    ap.add_argument("--H", type=int, nargs="*")
    ap.add_argument("--dtypes", default=None, help="comma list, e.g. float32,bfloat16")
    ap.add_argument("--baselines", default=None,
                    help=f"comma list out of {','.join(BASELINES)} (default: all but compiled on "
                         "the CPU, all but reference on the GPU, all with --quick)")
    ap.add_argument("--skip", default="", help="comma list of baselines to skip")
    ap.add_argument("--units", default="",
                    help="comma list of N: adds a baseline units_N each, the persistent kernels with "
                         "at least N hidden units a CTA (GPU only)")
    ap.add_argument("--stages", default="",
                    help="comma list of N: adds a baseline stage_N each, the persistent kernels staging "
                         "a tile's whole reduction at once only where it takes at most N KiB (GPU only)")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend of the compiled baseline (default inductor, "
                         "aot_eager with --quick)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: as torch starts, recorded either way)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats per method (default 3)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds of blocked_autorange per repeat")
    ap.add_argument("--out", default=None,
                    help="results folder (default: a new benchmarks/results/runs/<timestamp>_<device>/; "
                         "`--out benchmarks/results` refreshes the committed results)")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if args.quick:
        sizes, dtypes, min_run_time = ([8], [4], [16]), "float32", 0.01
        baselines = list(BASELINES)
    else:
        sizes = ([512], [8, 64, 256], [256, 1024]) if gpu else ([100], [64, 8], [256, 128])
        dtypes, min_run_time = ("float32,tf32,bfloat16" if gpu else "float32"), (0.5 if gpu else 1.0)
        baselines = [b for b in BASELINES if b != ("reference" if gpu else "compiled")]
    if not gpu:
        baselines = [b for b in baselines if not gpu_only(b)]
    # split is for two directions; compiled_loop runs one
    baselines = [b for b in baselines if b != ("compiled" if args.bidirectional else "split")]
    if args.proj_size:
        if args.proj_size < 0 or set(args.cells.split(",")) != {"lstm"}:
            ap.error(f"--proj-size must be positive and with --cells lstm, got "
                     f"{args.proj_size} and --cells {args.cells}")
        baselines = [b for b in baselines if b != "compiled"]  # its loop has no projection
    args.T, args.B, args.H = args.T or sizes[0], args.B or sizes[1], args.H or sizes[2]
    args.dtypes = (args.dtypes or dtypes).split(",")
    if "tf32" in args.dtypes and not gpu:
        ap.error("dtype tf32 (float32 with TF32 matmuls) is for CUDA devices")
    args.min_run_time = args.min_run_time or min_run_time
    args.compile_backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    if args.baselines:
        baselines = [b for b in args.baselines.split(",") if b]
    for option, prefix, what in (("units", "units", "CTA sizes"), ("stages", "stage", "staging")):
        given = getattr(args, option)
        values = [u for u in given.split(",") if u]
        if values and not gpu:
            ap.error(f"--{option} (the persistent CUDA kernels' {what}) is for CUDA devices")
        if any(not u.isdigit() for u in values):
            ap.error(f"--{option} must be a comma list of whole numbers, got {given!r}")
        baselines += [f"{prefix}_{u}" for u in values if f"{prefix}_{u}" not in baselines]
    skip = set(filter(None, args.skip.split(",")))
    unknown = [b for b in baselines + sorted(skip) if not known(b)]
    if unknown:
        ap.error(f"unknown baselines {unknown}; choose from {','.join(BASELINES)}, units_N and "
                 "stage_N, or settings joined by '+' (persistent+row_groups)")
    args.baselines = [b for b in baselines if b not in skip]
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = run_info(args.device)
    gemm_n = 256 if args.quick else 2048
    args.gemm_rates = {}
    for dtype_name in args.dtypes:  # each case is compared with its dtype's rate
        with float32_precision(args.device, dtype_name):
            args.gemm_rates[dtype_name] = gemm_rate(args.device, gemm_n, torch_dtype(dtype_name))
    args.gemm_gflop_per_s = args.gemm_rates.get("float32") or gemm_rate(args.device, gemm_n)
    if args.device.startswith("cuda"):  # equal precision, per case (float32_precision)
        meta["float32"] = "float32: ieee for every method; tf32: tf32 for every method"
    meta.update(quick=args.quick, repeats=args.repeats, min_run_time=args.min_run_time,
                baselines=args.baselines, compile_backend=args.compile_backend,
                gemm_gflop_per_s=args.gemm_gflop_per_s, gemm_gflop_per_s_by_dtype=args.gemm_rates)
    print(" ".join(f"{k}={v}" for k, v in meta.items()), flush=True)
    results = Results(args.out or default_out(args.device), f"rnn_{device_tag(args.device)}", meta)
    failures = 0
    for cell in args.cells.split(","):
        for dtype_name in args.dtypes:
            for T in args.T:
                for B in args.B:
                    for H in args.H:
                        row = dict(cell=cell, dtype=dtype_name, T=T, B=B, H=H,
                                   bidirectional=args.bidirectional, proj_size=args.proj_size)
                        try:
                            with float32_precision(args.device, dtype_name):
                                row.update(run_case(args, cell, dtype_name, T, B, H,
                                                    args.baselines))
                        except Exception as e:
                            row["error"] = describe(e)
                            print(f"  case failed ({row['error']})", flush=True)
                        release_memory(args.device)
                        row.update(isa=meta["isa"], threads=meta["threads"])
                        failures += sum(k == "error" or k.endswith("_error") for k in row)
                        results.add(row)
                        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                        print(summary(row, meta), flush=True)
    meta["load_after"] = load_average()
    meta["gemm_gflop_per_s_after"] = gemm_rate(args.device, 256 if args.quick else 2048)
    results.write()
    print(f"load_after={meta['load_after']} gemm_gflop_per_s_after={meta['gemm_gflop_per_s_after']}")
    print(f"wrote {results.stem}.json and {results.stem}.csv"
          + (f" ({failures} failures recorded)" if failures else ""))
    return results


if __name__ == "__main__":
    main()
