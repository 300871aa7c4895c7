"""The benchmark scripts run (on tiny sizes), record what they measure, and survive failures."""
import argparse
import csv
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench(monkeypatch):
    """Loads a benchmark script as a module; sys.path and torch's threads are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    threads = torch.get_num_threads()
    yield load
    torch.set_num_threads(threads)


def run_script(args, cwd=ROOT, timeout=120):
    """Runs python with args in a subprocess; the quick runs pass --threads 1, since
    2 threads on a machine whose other core is busy make every call wait (100x)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read(out, stem):
    with open(out / f"{stem}.json") as f:
        data = json.load(f)
    with open(out / f"{stem}.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(data["rows"])
    return data


def check_timed(row, names):
    for name in names:
        assert row[f"{name}_ms"] > 0 and row[f"{name}_min_ms"] > 0, name
        assert row[f"{name}_min_ms"] <= row[f"{name}_ms"]
        assert row[f"{name}_spread"] >= 1
        assert f"{name}_error" not in row
    assert row["isa"] and row["threads"] >= 1


# ------------------------------------------------------------------ --quick
def test_bench_rnn_quick(tmp_path):
    r = run_script(["benchmarks/bench_rnn.py", "--quick", "--threads", "1", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    data = read(tmp_path, "rnn_cpu")
    assert data["meta"]["isa"] == torch.backends.cpu.get_cpu_capability()
    assert data["meta"]["threads"] == 1 and data["meta"]["quick"] is True
    rows = data["rows"]
    assert [(r["cell"], r["T"], r["B"], r["H"]) for r in rows] == [("lstm", 8, 4, 16), ("gru", 8, 4, 16)]
    names = ["masked", "packed", "padded", "reference", "compiled"]  # compiled runs on the CPU too
    for row in rows:
        check_timed(row, names)
        for name in names[1:]:
            assert row[f"speedup_vs_{name}"] > 0
        assert row["masked_tok_per_s"] > 0 and row["masked_gflop_per_s"] > 0


def test_bench_losses_quick(tmp_path):
    r = run_script(["benchmarks/bench_losses.py", "--quick", "--threads", "1", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read(tmp_path, "losses_cpu")["rows"]
    assert [(r["tokens"], r["C"]) for r in rows] == [(64, 10), (64, 1000)]
    for row in rows:
        check_timed(row, ["masked", "idiom", "ignore"])
        assert row["speedup_vs_idiom"] > 0 and row["speedup_vs_ignore"] > 0


def test_bench_linear_ce_quick(tmp_path):
    r = run_script(["benchmarks/bench_linear_ce.py", "--quick", "--threads", "1", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "linear_ce_cpu.json") as f:
        row, = json.load(f)["rows"]
    for name in ("fused", "idiom", "ignore", "masked"):
        assert f"{name}_error" not in row, row[f"{name}_error"]
        assert 0 < row[f"{name}_min_ms"] <= row[f"{name}_ms"] and row[f"{name}_extra_MiB"] >= 0
    assert row["speedup_vs_idiom"] > 0 and row["memory_ratio_vs_idiom"] > 0


def test_profile_losses_quick(tmp_path):
    """The loss profile of gpu_check.sh's profile stage, on a CPU at a tiny size:
    both methods timed three ways, with torch.profiler's table."""
    out = tmp_path / "profile_losses.txt"
    r = run_script(["benchmarks/profile_losses.py", "--device", "cpu", "--tokens", "64",
                    "--C", "10", "--T", "16", "--calls", "2", "--out", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    text = out.read_text()
    for name in ("masked", "idiom"):
        assert re.search(rf"== {name} float32 tokens=64 C=10: [0-9.]+ ms a call synchronized, "
                         r"[0-9.]+ ms back to back, [0-9.]+ ms of host time", text), text
    assert "varlen_kernels::masked_cross_entropy_forward" in text


def test_default_out_is_a_new_run_folder(bench):
    rnn = bench("bench_rnn")
    out = pathlib.Path(rnn.default_out("cpu"))
    assert out.parent == BENCH / "results" / "runs" and out.name.endswith("_cpu")
    assert "*" in (out.parent / ".gitignore").read_text().split()  # runs stay out of git
    assert rnn.parse_args([]).out is None and load("bench_losses").parse_args([]).out is None


# --------------------------------------------------------------- bench_rnn
def test_compiled_baseline_compiles_the_step_and_matches(bench):
    rnn = bench("bench_rnn")
    for cell in ["lstm", "gru"]:
        ref, masked, x, lengths = rnn.make_case(cell, T=6, B=3, H=5, dtype=torch.float64, device="cpu")
        fns = rnn.forwards(ref, masked, x, lengths, "cpu", compile_backend="eager")
        assert set(fns) == set(rnn.BASELINES)
        valid = (torch.arange(6)[:, None] < lengths[None, :])[..., None]
        expected = fns["masked"]()
        for name, fn in fns.items():  # every baseline computes the same outputs at valid steps
            torch.testing.assert_close(torch.where(valid, fn(), 0), torch.where(valid, expected, 0),
                                       msg=f"{cell} {name}")
        for fn in rnn.runners(ref, masked, x, lengths, "cpu", ["compiled"], "eager").values():
            fn()  # forward and backward


def test_bench_rnn_quick_bidirectional(tmp_path):
    """Two threads: the CPU runs the two directions concurrently."""
    r = run_script(["benchmarks/bench_rnn.py", "--quick", "--bidirectional", "--threads", "2",
                    "--cells", "lstm", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read(tmp_path, "rnn_cpu")["rows"]
    assert [(r["cell"], r["bidirectional"]) for r in rows] == [("lstm", True)]
    names = ["masked", "split", "packed", "padded", "reference"]
    check_timed(rows[0], names)
    assert "compiled_ms" not in rows[0] and rows[0]["speedup_vs_split"] > 0


def test_bench_rnn_quick_proj_size(tmp_path):
    """LSTMs with a projection for every method but compiled (its loop has none);
    a cell other than an LSTM is refused."""
    r = run_script(["benchmarks/bench_rnn.py", "--quick", "--proj-size", "8", "--cells", "lstm",
                    "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    rows = read(tmp_path, "rnn_cpu")["rows"]
    assert [(r["cell"], r["proj_size"]) for r in rows] == [("lstm", 8)]
    check_timed(rows[0], ["masked", "packed", "padded", "reference"])
    assert "compiled_ms" not in rows[0]
    bad = run_script(["benchmarks/bench_rnn.py", "--quick", "--proj-size", "8", "--out", str(tmp_path)])
    assert bad.returncode != 0 and "--proj-size" in bad.stderr


def test_proj_size_baselines_compute_the_same(bench):
    rnn = bench("bench_rnn")
    ref, masked, x, lengths = rnn.make_case("lstm", T=6, B=3, H=5, dtype=torch.float64,
                                            device="cpu", proj_size=3)
    fns = rnn.forwards(ref, masked, x, lengths, "cpu", ["masked", "packed", "padded", "reference"])
    valid = (torch.arange(6)[:, None] < lengths[None, :])[..., None]
    expected = fns["masked"]()
    assert expected.shape == (6, 3, 3)
    for name, fn in fns.items():  # one direction: padded agrees within each length too
        torch.testing.assert_close(torch.where(valid, fn(), 0), torch.where(valid, expected, 0),
                                   msg=name)


def test_bidirectional_baselines_compute_the_same(bench):
    rnn = bench("bench_rnn")
    ref, masked, x, lengths = rnn.make_case("gru", T=6, B=3, H=5, dtype=torch.float64,
                                            device="cpu", bidirectional=True)
    fns = rnn.forwards(ref, masked, x, lengths, "cpu", ["masked", "split", "packed", "reference"])
    valid = (torch.arange(6)[:, None] < lengths[None, :])[..., None]
    expected = fns["masked"]()
    assert expected.shape == (6, 3, 10)
    for name, fn in fns.items():
        torch.testing.assert_close(torch.where(valid, fn(), 0), torch.where(valid, expected, 0),
                                   msg=name)


def test_setting_baselines_run_forward_and_backward_under_their_setting(bench, monkeypatch):
    """per_step, all_rows, units_N and the others are MaskedRNN under an environment
    setting (a+b: under each of theirs): it holds for the backward too (run after
    the forward returns), and is restored."""
    rnn = bench("bench_rnn")
    ref, masked, x, lengths = rnn.make_case("gru", T=4, B=3, H=5, dtype=torch.float64,
                                            device="cpu")
    seen = []

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            seen.append(("forward", os.environ.get(var)))
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", os.environ.get(var)))
            return g

    monkeypatch.setattr(masked, "forward", lambda x, lengths: (Record.apply(x * 2),))
    assert rnn.setting_of("units_8") == [("VARLEN_KERNELS_PERSISTENT_UNITS", "8")]
    assert rnn.setting_of("stage_16") == [("VARLEN_KERNELS_PERSISTENT_STAGE_KIB", "16")]
    assert rnn.setting_of("persistent+row_groups") == [("VARLEN_KERNELS_RNN_PATH", "persistent"),
                                                       ("VARLEN_KERNELS_PERSISTENT_GROUPS", "2")]
    for bad in ("masked", "units_", "persistent+masked", "per_step+persistent", "bulk+", "+bulk"):
        assert rnn.setting_of(bad) is None, bad
    for name in [*rnn.SETTINGS, "units_8", "stage_0", "row_groups+four_slots"]:
        for var, value in rnn.setting_of(name):
            monkeypatch.delenv(var, raising=False)
            seen.clear()
            rnn.runners(ref, masked, x.requires_grad_(), lengths, "cpu", [name])[name]()
            assert seen == [("forward", value), ("backward", value)], (name, var)
            assert var not in os.environ


def test_units_and_stages_add_a_baseline_per_value_on_gpus_only(bench):
    rnn = bench("bench_rnn")
    args = rnn.parse_args(["--device", "cuda", "--baselines", "masked,padded", "--units", "4,16",
                           "--stages", "0,16"])
    assert args.baselines == ["masked", "padded", "units_4", "units_16", "stage_0", "stage_16"]
    assert "units_8" in rnn.parse_args(["--device", "cuda", "--baselines", "masked,units_8"]).baselines
    assert rnn.parse_args(["--device", "cuda", "--baselines", "masked,persistent+row_groups"]
                          ).baselines == ["masked", "persistent+row_groups"]
    for bad in (["--device", "cpu", "--units", "4"], ["--device", "cuda", "--units", "4,x"],
                ["--device", "cuda", "--baselines", "units_"], ["--device", "cpu", "--stages", "16"],
                ["--device", "cuda", "--baselines", "masked+row_groups"],
                ["--device", "cuda", "--stages", "-1"]):
        with pytest.raises(SystemExit):
            rnn.parse_args(bad)


def test_quick_selects_compiled_and_backend_on_cpu(bench):
    rnn = bench("bench_rnn")
    args = rnn.parse_args(["--quick", "--device", "cpu"])
    assert "compiled" in args.baselines and args.compile_backend == "aot_eager"
    args = rnn.parse_args(["--device", "cpu", "--baselines", "masked,compiled", "--compile-backend", "eager"])
    assert args.baselines == ["masked", "compiled"] and args.compile_backend == "eager"
    assert "compiled" not in rnn.parse_args(["--device", "cpu"]).baselines


def test_gpu_compares_float32_at_equal_precision_twice(bench):
    rnn = bench("bench_rnn")
    assert rnn.parse_args(["--device", "cuda"]).dtypes == ["float32", "tf32", "bfloat16"]
    with pytest.raises(SystemExit):
        rnn.parse_args(["--device", "cpu", "--dtypes", "tf32"])


def test_measure_is_round_robin(bench):
    rnn = bench("bench_rnn")
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times, errors = rnn.measure(fns, repeats=3, min_run_time=1e-4, warmup=0, log=lambda *a: None)
    assert errors == {} and all(len(ms) == 3 for ms in times.values())
    blocks = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert blocks == list("abc") * 3


def test_failing_baseline_is_recorded(bench, tmp_path, capsys):
    rnn = bench("bench_rnn")
    real = rnn.runners

    def runners(*a, **kw):
        fns = real(*a, **kw)
        fns["padded"] = lambda: (_ for _ in ()).throw(ValueError("boom"))  # not a RuntimeError
        return fns

    rnn.runners = runners
    rows = rnn.main(["--quick", "--cells", "lstm", "--baselines", "masked,padded", "--out", str(tmp_path)]).rows
    assert "padded: failed (ValueError: boom)" in capsys.readouterr().out
    row = read(tmp_path, "rnn_cpu")["rows"][0]
    assert row == rows[0] and row["padded_error"] == "ValueError: boom" and "padded_ms" not in row
    check_timed(row, ["masked"])


def test_failing_case_is_recorded_and_rows_are_written_as_they_come(bench, tmp_path):
    rnn = bench("bench_rnn")
    real = rnn.make_case

    def make_case(cell, *a, **kw):
        if cell == "gru":
            raise TypeError("bad case")
        if cell == "rnn_tanh":
            raise KeyboardInterrupt  # a killed run: what was measured before is on disk
        return real(cell, *a, **kw)

    rnn.make_case = make_case
    with pytest.raises(KeyboardInterrupt):
        rnn.main(["--quick", "--cells", "lstm,gru,rnn_tanh", "--baselines", "masked", "--out", str(tmp_path)])
    lstm, gru = read(tmp_path, "rnn_cpu")["rows"]
    check_timed(lstm, ["masked"])
    assert gru["cell"] == "gru" and gru["error"] == "TypeError: bad case"


# ------------------------------------------------------------ bench_losses
def test_bench_losses_loads_from_anywhere(tmp_path):
    # bench_losses imports bench_rnn: that must not depend on the working directory
    code = (f"import importlib.util as u; s = u.spec_from_file_location('bl', {str(BENCH / 'bench_losses.py')!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(*m.parse_args(['--quick']).C, sep=',')")
    r = run_script(["-c", code], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split()[-1] == "10,1000", r.stdout + r.stderr


def test_loss_gradients_are_cleared_between_calls(bench):
    losses = bench("bench_losses")
    *_, fns, logits = losses.case(64, 10, torch.float64, "cpu", T=16)
    for name, fn in fns.items():
        fn()
        once = logits.grad.clone()
        fn()
        torch.testing.assert_close(logits.grad, once, msg=name)  # not accumulated


def test_loss_cases_are_sized_to_free_memory(bench):
    losses = bench("bench_losses")
    gpu_free = 79 * 2**30  # an 80 GB GPU
    assert set(losses.plan(256, 256, 131072, torch.float32, gpu_free, 0.8)) == {"masked", "idiom", "ignore"}
    assert set(losses.plan(256, 256, 131072, torch.bfloat16, gpu_free, 0.8)) == {"idiom", "ignore"}
    assert losses.plan(256, 256, 32768, torch.float32, gpu_free, 0.8) == {}
    assert losses.free_memory_bytes("cpu") > 0


def test_loss_cases_over_memory_are_skipped(bench, tmp_path, capsys):
    losses = bench("bench_losses")
    losses.free_memory_bytes = lambda device: 64 * 10 * 4 * 3  # room for masked at C=10 only
    rows = losses.main(["--quick", "--out", str(tmp_path)]).rows
    assert "idiom: skipped (needs" in capsys.readouterr().out
    small, large = read(tmp_path, "losses_cpu")["rows"]
    check_timed(small, ["masked"])
    assert "idiom_ms" not in small and small["idiom_skipped"].startswith("needs")
    assert all(f"{k}_skipped" in large and f"{k}_ms" not in large for k in ["masked", "idiom", "ignore"])
    assert rows == [small, large]


def test_loss_out_of_memory_is_caught(bench, tmp_path):
    losses = bench("bench_losses")
    real = losses.case

    def case(tokens, C, *a, **kw):
        B, T, mask, fns, logits = real(tokens, C, *a, **kw)
        if C == 10:
            fns["idiom"] = lambda: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory"))
        else:
            raise torch.OutOfMemoryError("out of memory in the case")
        return B, T, mask, fns, logits

    losses.case = case
    losses.main(["--quick", "--out", str(tmp_path)])
    first, second = read(tmp_path, "losses_cpu")["rows"]
    check_timed(first, ["masked", "ignore"])
    assert first["idiom_error"] == "OutOfMemoryError: out of memory" and "speedup_vs_idiom" not in first
    assert second["error"] == "OutOfMemoryError: out of memory in the case"


# ------------------------------------------------------------- gpu_check.sh
def test_gpu_check_writes_committed_results_explicitly(bench, tmp_path):
    """Every benchmark command of gpu_check.sh (as its dry run writes them) parses, on
    the GPU, at full size, with its results under benchmarks/results."""
    commands = tmp_path / "commands"
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "build", "tests", "tests_other", "sanitizer",
                        "ptxas", "bench", "bench_gru", "profile", "ncu", "units"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "DRY_RUN": str(commands), "PYTHON": "python3"})
    assert r.returncode == 0, r.stdout + r.stderr
    found = set()
    for line in commands.read_text().splitlines():
        words = shlex.split(line)
        path = next((w for w in words if w.startswith("benchmarks/")), None)
        if path is None or not pathlib.Path(path).name.startswith("bench_"):
            continue
        args = words[words.index(path) + 1:]
        parsed = bench(pathlib.Path(path).stem).parse_args(args)
        assert parsed.device == "cuda" and not parsed.quick
        assert parsed.out and (ROOT / parsed.out).resolve().is_relative_to((BENCH / "results").resolve())
        assert (ROOT / path).exists()
        found.add(path)
    assert found == {"benchmarks/bench_rnn.py", "benchmarks/bench_losses.py", "benchmarks/bench_linear_ce.py"}
    assert "benchmarks/profile_rnn.py" in commands.read_text()
    assert "benchmarks/profile_losses.py --out benchmarks/results/profile_losses.txt" in commands.read_text()
    # The ncu stage profiles the persistent kernels of profile_rnn.py's --ncu run, then
    # the forward kernel at B = 8, H = 256 once more with per-instruction counts,
    # then the grid form's two kernels at H = 1024 so, exported under benchmarks/results.
    ncu = [shlex.split(line) for line in commands.read_text().splitlines() if line.startswith("ncu ")]
    assert len(ncu) == 3 and all("--profile-from-start" in c for c in ncu)
    profile = bench("profile_rnn")

    def shapes_of(command):
        args = command[command.index("benchmarks/profile_rnn.py") + 1:]
        assert "--ncu" in args
        return [profile.shape(a) for a in args[args.index("--shapes") + 1:]]

    assert shapes_of(ncu[0]) == [("lstm", 512, 8, 256), ("lstm", 512, 64, 1024)]
    source = ncu[1]
    assert shapes_of(source) == [("lstm", 512, 8, 256)]
    assert "SourceCounters" in source and source[source.index("--launch-count") + 1] == "1"
    assert source[source.index("-o") + 1] == "benchmarks/results/ncu_source_fwd"
    grid = ncu[2]
    assert shapes_of(grid) == [("lstm", 128, 64, 1024)]
    assert "SourceCounters" in grid and grid[grid.index("--launch-count") + 1] == "2"
    assert grid[grid.index("-o") + 1] == "benchmarks/results/ncu_source_grid"
    for bad in ("lstm,512,64", "lstm,512,x,1024"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"a shape is cell,T,B,H, got"):
            profile.shape(bad)


@pytest.mark.emulation
def test_sanitizer_workload_calls_every_op(bench):
    """What compute-sanitizer (GPU) and ThreadSanitizer (make test) check is the
    CUDA code of every op: the workload calls each of testing.OPS."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from varlen_kernels.testing import OPS

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "varlen_kernels":
                seen.add(func._opname)
            return func(*args, **(kwargs or {}))

    workload = bench("sanitizer_workload")
    with Record():
        workload.main(["--device", "cpu", "--emulate"])
    assert seen >= set(OPS), set(OPS) - seen


def test_sanitizer_workload_runs():
    """The compute-sanitizer workload of gpu_check.sh, as a script, on the CPU
    kernels (on the CUDA kernels' code executed on the CPU: the test above, and
    make test's ThreadSanitizer run of the script)."""
    r = run_script(["benchmarks/sanitizer_workload.py", "--device", "cpu"])
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# ------------------------------------------------------------- plot_rnn.py
def test_plot_rnn_tables_and_plots_committed_results(bench, tmp_path, capsys):
    """The table has a row per case with each method's time and the speedups; the
    plot is written (on the committed CPU results and the GPU run's)."""
    plot = bench("plot_rnn")
    runs = [BENCH / "results" / "rnn_cpu.json",
            BENCH / "results" / "gpu_2026-11-27_h200" / "rnn_lstm.json"]
    png, md = tmp_path / "rnn.png", tmp_path / "rnn.md"
    plot.main([str(p) for p in runs] + ["--png", str(png), "--md", str(md)])
    out = capsys.readouterr().out
    assert out.strip() == md.read_text().strip()
    gpu = json.loads(runs[1].read_text())
    first = gpu["rows"][0]
    line = next(l for l in out.splitlines() if l.startswith(f"| {plot.case_name(first)} |"))
    assert f"| {first['masked_ms']:.2f} |" in line and f"| {first['speedup_vs_padded']:.2f} |" in line
    assert sum(l.startswith("| lstm") for l in out.splitlines()) >= len(gpu["rows"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_sass_report_finds_innermost_loops_and_counts_their_units(bench):
    """sass_report.py's reading of nvdisasm's output (no nvcc here): the loops are
    backward branches; only the innermost ones holding the unit count, each as
    (instructions of its body, units in it); another kernel's loops are not read."""
    sass = load("sass_report")
    text = "\n".join([
        ".text._Z5otherv:",
        "        /*0000*/                   FFMA R1, R2, R3, R1 ;",
        ".L_x_9:",
        "        /*0010*/                   BRA `(.L_x_9) ;",
        ".text._Z6targetv:",
        "        /*0000*/                   MOV R1, RZ ;",
        ".L_x_1:",                                     # outer loop
        "        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;",
        ".L_x_2:",                                     # inner loop: 2 FFMA in 5 instructions
        "        /*0020*/                   LDS R4, [R5] ;",
        "        /*0030*/                   FFMA R1, R4, R4, R1 ;",
        "        /*0040*/              @!P0 FFMA R1, R4, R3, R1 ;",
        "        /*0050*/                   ISETP.NE.AND P1, PT, R2, RZ, PT ;",
        "        /*0060*/               @P1 BRA `(.L_x_2) ;",
        "        /*0070*/                   LDGSTS.E.BYPASS.128 [R6], desc[UR4][R8.64] ;",
        "        /*0080*/               @P2 BRA `(.L_x_1) ;",
        "        /*0090*/                   BRA `(.L_x_3) ;",  # a forward branch: no loop
        ".L_x_3:",
        "        /*00a0*/                   EXIT ;",
    ])
    ins, labels = sass.kernel_instructions(text, "_Z6targetv")
    assert len(ins) == 11 and labels == {".L_x_1": 1, ".L_x_2": 2, ".L_x_3": 10}
    assert sass.opcode("@!P0 FFMA R1, R4, R3, R1") == "FFMA"
    assert sass.innermost_loops(ins, labels, "FFMA") == [(5, 2)]
    # the LDGSTS is in the outer loop only, which holds another loop: not innermost
    assert sass.innermost_loops(ins, labels, "LDGSTS") == []
    assert sass.innermost_loops(ins, labels, "DFMA") == []
