"""The CPU execution of CUDA code checks itself: the executor's test kernels
(csrc/emulation/selftest.cpp) in every thread order, and what it must refuse."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import own_sanitizer
from varlen_kernels import testing
from varlen_kernels.testing import ORDERS, emulate_cuda, emulated_device, emulation_module, selftest

pytestmark = pytest.mark.emulation
BLOCKS, THREADS = 3, 64


def x_for(seed=0, n=BLOCKS * THREADS):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def block_sums(x, threads=THREADS):
    return x.double().view(-1, threads).sum(1).repeat_interleave(threads)


def run(name, order, seed=0, blocks=BLOCKS, threads=THREADS, x=None):
    x = x_for(seed, blocks * threads) if x is None else x
    with emulate_cuda(order=order, seed=seed):
        return x, selftest(x, name, blocks, threads)


@pytest.mark.parametrize("order", ORDERS)
def test_block_reduction_every_thread_sees_the_sum(order):
    x, out = run("reduce", order)
    torch.testing.assert_close(out[:, 0].double(), block_sums(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 1].double(), 2 * block_sums(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_missing_barrier_is_caught(skip):
    """Each of the three barriers of the reduction, removed, changes some thread's
    result in the forward or the reverse order (so the suite's orders catch it)."""
    wrong = []
    for order in ("forward", "reverse"):
        x, out = run(f"reduce{skip}", order)
        expected = torch.stack([block_sums(x), 2 * block_sums(x)], 1)
        wrong.append(not torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5))
    assert any(wrong), f"removing barrier {skip} went unnoticed in forward and reverse order"


def expected_warp(x):
    """What CUDA gives for warp_kernel, lane by lane."""
    out = torch.zeros(x.numel(), 10, dtype=torch.float64)
    xd = x.double()
    for i in range(x.numel()):
        base, lane = i - i % 32, i % 32

        def at(src):
            return xd[base + src]
        g8 = lane // 8 * 8
        out[i, 0] = at((lane + 3) % 32)
        out[i, 1] = at(lane - 1) if lane >= 1 else at(lane)
        out[i, 2] = at(lane + 2) if lane + 2 < 32 else at(lane)
        out[i, 3] = at(lane ^ 5)
        out[i, 4] = at(g8 + 1)
        out[i, 5] = at(lane + 4) if lane + 4 < g8 + 8 else at(lane)
        bits = sum(1 << k for k in range(32) if xd[base + k] > 0)
        out[i, 6] = bits & 0xFFFF
        out[i, 7] = bits >> 16
        out[i, 8] = float(bool((xd[base:base + 32] > 1).any()))
        out[i, 9] = float(bool((xd[base:base + 32] > -1).all()))
        if lane % 2 == 0:
            out[i, 0] += 1000 * at(lane ^ 2)
    return out


@pytest.mark.parametrize("order", ORDERS)
def test_warp_intrinsics(order):
    x, out = run("warp", order, seed=3)
    torch.testing.assert_close(out.double(), expected_warp(x), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("order", ORDERS)
def test_atomics(order):
    x, out = run("atomics", order, seed=1)
    n = BLOCKS * THREADS
    torch.testing.assert_close(out[0].double(), x.double().sum(), rtol=1e-5, atol=1e-4)
    assert out[1].item() == n - 1  # atomicMax of the thread index
    assert out[2:2 + BLOCKS].tolist() == [1.0] * BLOCKS  # one CAS winner per block
    assert out[2 + BLOCKS].item() == BLOCKS
    assert out[3 + BLOCKS].item() == n  # shared-memory atomicAdd, summed over blocks


@pytest.mark.parametrize("order", ORDERS)
def test_cooperative_grid_sync(order):
    x, out = run("grid_sync", order, seed=2)
    torch.testing.assert_close(out.double(), x.double().sum().expand(out.shape), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("order", ORDERS)
def test_spin_wait_on_another_block_yields(order):
    x, out = run("spin", order, seed=4)
    expected = x + 1
    expected[THREADS - 1] = x[THREADS - 1]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("order", ORDERS)
def test_cluster_sync(order):
    """A launch in clusters of 4 blocks: each thread gets the sum over its cluster,
    whose blocks wrote their sums before the cluster.sync()."""
    counts = emulation_module().launch_counts
    before = counts()
    x, out = run("cluster_sync", order, seed=5, blocks=8)
    expected = x.double().view(-1, 4 * THREADS).sum(1).repeat_interleave(4 * THREADS)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    after = counts()
    assert after[3] == before[3] + 1 and after[1] == before[1]
    assert after[4:6] == (8, 4)


def test_cluster_launch_is_checked():
    """A cluster divides grid.x and has at most max_cluster_blocks blocks (16, the
    most sm_90 has, unless changed)."""
    with pytest.raises(RuntimeError, match=r"invalid cluster: 3 blocks per cluster with grid.x = 8 "
                                           r"\(a cluster has 1 to 16 blocks and divides grid.x"):
        run("cluster_3", "forward", blocks=8)
    x, out = run("cluster_16", "forward", blocks=16)
    torch.testing.assert_close(out.double(), x.double().sum().expand(out.shape), rtol=1e-5,
                               atol=1e-4)
    with emulated_device(max_cluster_blocks=8):
        with pytest.raises(RuntimeError, match=r"invalid cluster: 16 blocks per cluster with "
                                               r"grid.x = 16 \(a cluster has 1 to 8 blocks"):
            run("cluster_16", "forward", blocks=16)


def test_grid_sync_needs_a_cooperative_launch():
    with pytest.raises(RuntimeError, match=r"grid.sync\(\) needs a cooperative launch"):
        run("grid_sync_noncooperative", "forward")


def test_cooperative_launch_beyond_residency_is_refused():
    with emulated_device(sm_count=2):  # 2 SMs x 32 blocks of 64 threads can be resident
        run("grid_sync", "forward", blocks=64)
        with pytest.raises(RuntimeError, match=r"too many blocks in cooperative launch \(65 blocks, at most 64"):
            run("grid_sync", "forward", blocks=65)


@pytest.mark.parametrize("order", ORDERS)
def test_dynamic_shared_memory_is_poisoned_then_shared(order):
    x, out = run("dynamic", order, seed=5)
    assert torch.isnan(out[:, 0]).all()  # garbage before the first write
    mirror = x.view(BLOCKS, THREADS).flip(1).reshape(-1)
    torch.testing.assert_close(out[:, 1], mirror)


def async_expected(x, threads=THREADS):
    """What async_copy_kernel's threads read: their block's x in groups of 4, of
    which the odd groups copied their first 2 values only (zeros after them)."""
    t = torch.arange(x.numel()) % threads
    own = torch.where(((t // 4) % 2 == 1) & (t % 4 >= 2), torch.zeros_like(x), x)
    ahead = own.view(-1, threads).roll(-4, 1).reshape(-1)
    return torch.stack([own, ahead], 1)


@pytest.mark.parametrize("order", ORDERS)
def test_async_copies_complete_at_the_wait_with_zero_fill(order):
    x, out = run("async_copy", order, seed=6)
    torch.testing.assert_close(out, async_expected(x))
    # Waiting for the older group only: the copy, not the empty group after it.
    x, out = run("async_older", order, seed=6)
    expected = async_expected(x)
    expected[:, 0] = torch.where(torch.arange(x.numel()) % 4 == 0, expected[:, 0], 0.0)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("order", ORDERS)
def test_async_copy_read_before_its_wait_reads_garbage(order):
    """Each copying thread reads its own copy before waiting for it."""
    _, out = run("async_read_early", order, seed=6)
    assert torch.isnan(out[torch.arange(out.shape[0]) % 4 == 0, 0]).all()


def test_async_copy_read_by_another_thread_without_a_barrier_is_caught():
    """A copy is visible to the other threads after the issuer's wait and a
    barrier: without the barrier, some thread order reads garbage."""
    wrong = []
    for order in ("forward", "reverse"):
        x, out = run("async_race", order, seed=6)
        wrong.append(bool(torch.isnan(out).any()))
    assert any(wrong)


@pytest.mark.parametrize("name, message", [
    ("async_exit", r"block \(0, 0, 0\) thread \(0, 0, 0\): the thread exited with 1 asynchronous "
                   r"copies to shared memory that it did not wait for"),
    ("async_source_changed", r"the source of an asynchronous copy changed before the copy completed"),
    ("async_misaligned", r"an asynchronous copy of 16 bytes needs source and destination aligned"),
])
def test_async_copy_misuse_is_an_error(name, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, "forward", seed=6)


@pytest.mark.parametrize("order", ORDERS)
def test_bulk_copies_complete_on_their_mbarrier(order):
    """Two phases of an mbarrier, each completing the bulk copies of a block's
    values (the second from a source twice the first); some thread orders
    reach the wait before the arrival that expects the bytes."""
    before = emulation_module().launch_counts()[6]
    x, out = run("bulk_copy", order, seed=7)
    torch.testing.assert_close(out[:, 0], x)
    torch.testing.assert_close(out[:, 1], 2 * x)
    assert emulation_module().launch_counts()[6] - before == 2 * x.numel() // 4


@pytest.mark.parametrize("order", ORDERS)
def test_bulk_copy_read_before_its_phase_completes_reads_garbage(order):
    """Each copying thread reads its own copy before waiting for the phase
    (garbage), then after it."""
    x, out = run("bulk_read_early", order, seed=7)
    assert torch.isnan(out[torch.arange(out.shape[0]) % 4 == 0, 1]).all()
    torch.testing.assert_close(out[:, 0], x)


@pytest.mark.parametrize("name, message", [
    ("bulk_bytes", r"livelock: every runnable thread spins in a wait that nothing ends"),
    ("bulk_excess", r"an mbarrier phase that expects 240 bytes has bulk copies and st.async "
                    r"stores of 256 bytes: on a GPU it would complete before some of them"),
    ("bulk_unwaited", r"block \(0, 0, 0\) ended with 16 bulk copies or stores to shared memory "
                      r"that nothing "
                      r"waited for"),
    ("bulk_source_changed", r"the source of a bulk copy changed before the copy completed"),
    ("bulk_overwrite", r"on an mbarrier whose bytes were overwritten since its init"),
    ("bulk_store_in_flight", r"a store or a copy wrote into the destination of a bulk copy or "
                             r"st.async before it completed"),
])
def test_bulk_copy_misuse_is_an_error(name, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, "forward", seed=7)


def previous_block(x, blocks=8, cluster=4):
    """x with each block's values replaced by those of the block before it in
    its cluster (the last block's for the first)."""
    v = x.view(blocks // cluster, cluster, -1)
    return torch.roll(v, 1, dims=1).reshape(-1)


@pytest.mark.parametrize("order", ORDERS)
def test_stores_into_another_block_complete_on_its_mbarrier(order):
    """st.async: each block of a cluster of 4 stores its values into the next
    block's shared memory, completing on that block's mbarrier, in two phases
    (x, then 2x); each block reads the values of the block before it. Some
    thread orders store before the destination's threads reach the wait."""
    before = emulation_module().launch_counts()[7]
    x, out = run("dsmem_store", order, seed=8, blocks=8)
    torch.testing.assert_close(out[:, 0], previous_block(x))
    torch.testing.assert_close(out[:, 1], previous_block(2 * x))
    assert emulation_module().launch_counts()[7] - before == 2 * x.numel() // 4


@pytest.mark.parametrize("order", ORDERS)
def test_store_into_another_block_read_before_its_phase_completes_reads_garbage(order):
    x, out = run("dsmem_read_early", order, seed=8, blocks=8)
    assert torch.isnan(out[:, 1]).all()
    torch.testing.assert_close(out[:, 0], previous_block(x))


@pytest.mark.parametrize("name, message", [
    ("dsmem_bytes", r"livelock: every runnable thread spins in a wait that nothing ends"),
    ("dsmem_unwaited", r"ended with 16 bulk copies or stores to shared memory that nothing waited "
                       r"for"),
    ("dsmem_store_in_flight", r"a store or a copy wrote into the destination of a bulk copy or "
                              r"st.async before it completed"),
    ("dsmem_misaligned", r"st.async stores 4, 8 or 16 bytes to an address aligned to them"),
    ("dsmem_excess", rf"an mbarrier phase that expects {4 * THREADS - 16} bytes has bulk copies and "
                     rf"st.async stores of {4 * THREADS} bytes: on a GPU it would complete before"),
])
def test_store_into_another_block_misuse_is_an_error(name, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, "forward", seed=8, blocks=8)


def test_device_assert_names_block_thread_and_condition():
    x = x_for().abs()
    x[THREADS + 5] = -1
    with pytest.raises(RuntimeError, match=r"block \(1, 0, 0\) thread \(5, 0, 0\): device-side assert "
                                           r"failed: x\[i\] >= 0.f && \"x must be non-negative\""):
        run("assert", "random", x=x)
    run("assert", "forward", x=x.abs())  # the executor is usable after a failed launch


def test_barrier_reached_by_part_of_the_block_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match=r"__syncthreads\(\) reached by 32 of the 64 threads"):
        run("divergent_barrier", "forward")


@pytest.mark.parametrize("order", ORDERS)
def test_shuffle_reading_an_exited_lane_is_an_error(order):
    with pytest.raises(RuntimeError, match=r"__shfl_down_sync: lane 0 reads lane 1, which has exited"):
        run("divergent_warp", order)


@pytest.mark.parametrize("order", ORDERS)
def test_divergent_barrier_is_an_error(order):
    """Threads at two different __syncthreads() calls would release each other."""
    with pytest.raises(RuntimeError, match=r"wait at different __syncthreads\(\).*selftest.cpp:\d+.*"
                                           r"selftest.cpp:\d+ \(a divergent barrier\)"):
        run("two_barriers", order)


@pytest.mark.parametrize("order", ORDERS)
def test_lane_arguments_and_partial_warps(order):
    """Lane arguments use their low 5 bits, as in PTX; a 48-thread block has a
    16-lane last warp whose __activemask() names those 16 lanes."""
    x, out = run("lane_args", order, blocks=2, threads=48)
    for i in range(x.numel()):
        t = i % 48
        base = i - t % 32
        n = 32 if t < 32 else 16
        assert out[i, 0] == x[base + ((t % 32) ^ 1)]
        assert out[i, 1] == x[base + 2]
        assert out[i, 2] == n


def test_spin_on_another_block_without_cooperative_launch_is_reported():
    """Blocks of a plain launch run one after another: a wait for another block
    is reported (livelock), never a hang."""
    with pytest.raises(RuntimeError, match=r"livelock: .*non-cooperative launch"):
        run("spin_noncooperative", "forward", blocks=2, threads=32)


def test_launch_configuration_is_checked():
    with pytest.raises(RuntimeError, match=r"2048 threads per block, at most 1024"):
        run("reduce", "forward", blocks=1, threads=2048)


def test_ops_route_to_the_cuda_code_only_inside_the_context():
    from varlen_kernels.ops import rnn_layer
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    args = (torch.tensor([3, 1]), torch.zeros(2, 3, dtype=torch.float64), None,
            torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64), None, None,
            "rnn_tanh", False)
    # The emulator counts the kernel launches: only the CUDA code launches any.
    launches = lambda: testing.emulation_module().launch_counts()[0]  # noqa: E731

    def runs_cuda_code():
        before = launches()
        ws = torch.ops.varlen_kernels.rnn_forward(x, *args)[3]
        assert ws.shape == (3 * 2, 3)  # (T*B, GS*H) on every backend
        return launches() > before

    assert not runs_cuda_code()
    with emulate_cuda():
        assert testing.emulation_active()
        assert runs_cuda_code()
        with emulate_cuda(order="reverse"):
            assert runs_cuda_code()
        assert runs_cuda_code()
    assert not testing.emulation_active() and not runs_cuda_code()
    torch.testing.assert_close(rnn_layer(x, *args)[0], rnn_layer(x, *args)[0])


def test_bad_order_is_refused():
    with pytest.raises(ValueError, match=r"order must be one of \('forward', 'reverse', 'random'\), got 'sideways'"):
        with emulate_cuda(order="sideways"):
            pass


def test_bare_shared_does_not_compile(tmp_path):
    """A `__shared__` array would be per fiber on the CPU: the emulation build refuses it."""
    from torch.utils.cpp_extension import include_paths
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "k.cpp"
    src.write_text('#include "emulation/cuda_on_cpu.h"\n'
                   "__global__ void k(float* x) { __shared__ float s[32]; s[0] = x[0]; }\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-I", os.path.join(root, "csrc")]
    cmd += [f"-I{p}" for p in include_paths()] + [str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0 and "declare with VK_SHARED" in r.stderr, r.stderr[-2000:]


def test_missing_build_says_how_to_build(monkeypatch):
    import importlib
    monkeypatch.setattr(testing, "_module", None)

    def fail(name):
        raise ImportError(f"No module named {name!r}")
    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(RuntimeError, match=r"is not built or cannot be loaded .*make build"):
        with emulate_cuda():
            pass


@pytest.mark.parametrize("wanted", ["asan", "tsan"])
def test_required_sanitizer_that_is_not_loaded_is_an_error(monkeypatch, wanted):
    """make test sets VK_EMU_SANITIZER for its sanitizer passes: a preload that
    failed (a missing library) must not run the uninstrumented build instead."""
    monkeypatch.setattr(testing, "_module", None)
    monkeypatch.setattr(testing, "_sanitizer_loaded", lambda: "")
    monkeypatch.setenv("VK_EMU_SANITIZER", wanted)
    with pytest.raises(RuntimeError, match=rf"VK_EMU_SANITIZER={wanted} .*no sanitizer runtime "
                                           rf"is loaded.*lib{wanted}\.so"):
        testing.emulation_module()
    monkeypatch.setenv("VK_EMU_SANITIZER", "msan")
    with pytest.raises(RuntimeError, match="VK_EMU_SANITIZER must be 'asan', 'tsan' or unset, "
                                           "got 'msan'"):
        testing.emulation_module()


def asan_env():
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    cxx = subprocess.run(["gcc", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(asan) or not os.path.exists(asan):
        pytest.skip("libasan not found")
    return dict(os.environ, LD_PRELOAD=f"{asan} {cxx}", ASAN_OPTIONS="detect_leaks=0:detect_odr_violation=0",
                VK_EMU_SANITIZER="asan")


@own_sanitizer
def test_runs_under_address_sanitizer_when_preloaded():
    """In a process with libasan preloaded, the ASan-instrumented build runs the
    kernels (CI runs the emulated tests that way; this checks the mechanism)."""
    code = ("import torch, varlen_kernels as vk\n"
            "from varlen_kernels.testing import emulate_cuda, emulation_module\n"
            "with emulate_cuda(order='random'):\n"
            "    m = vk.MaskedLSTM(3, 4, bidirectional=True).double()\n"
            "    y, _ = m(torch.randn(5, 2, 3, dtype=torch.float64), torch.tensor([5, 2]))\n"
            "    y.sum().backward()\n"
            "print('asan', emulation_module().ASAN)\n")
    r = subprocess.run([sys.executable, "-c", code], env=asan_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "asan 1" in r.stdout, (r.stdout + r.stderr)[-3000:]


@own_sanitizer
def test_address_sanitizer_sees_a_shared_memory_overflow():
    code = ("import torch\n"
            "from varlen_kernels.testing import emulate_cuda, selftest\n"
            "with emulate_cuda():\n"
            "    selftest(torch.zeros(64), 'shared_overflow', 1, 64)\n")
    r = subprocess.run([sys.executable, "-c", code], env=asan_env(), capture_output=True, text=True)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, (r.stdout + r.stderr)[-3000:]
    assert "shared_overflow_kernel" in r.stderr


def tsan_env():
    tsan = subprocess.run(["gcc", "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(tsan) or not os.path.exists(tsan):
        pytest.skip("libtsan not found")
    # Every report counts: of the same lines again (in another order), and of a
    # later kernel whose buffers reuse an address.
    return dict(os.environ, LD_PRELOAD=tsan, TSAN_OPTIONS="exitcode=66:suppress_equal_stacks=0:suppress_equal_addresses=0",
                OMP_NUM_THREADS="1", VK_EMU_SANITIZER="tsan")


# Self-test kernels without a race, and those with one, with the function
# ThreadSanitizer must name: a barrier of the block reduction removed (shared
# memory), blocks reading sums before the grid.sync() that is missing (global
# memory, one cooperative launch), blocks storing to one address (global
# memory, blocks run one after another), lanes reading what lane 0 wrote
# without the __syncwarp between, blocks of a cluster reading sums before the
# cluster.sync() that is missing, and blocks reading another cluster's sums
# (which no cluster.sync() orders).
RACE_FREE = ["reduce", "warp", "atomics", "grid_sync", "dynamic", "spin", "warp_handoff",
             "cluster_sync"]
RACES = {"reduce1": "block_sum", "reduce2": "block_sum", "reduce3": "block_sum",
         "grid_race": "grid_kernel", "blocks_store": "blocks_store_kernel",
         "warp_handoff_race": "warp_handoff_kernel", "cluster_race": "cluster_kernel",
         "cross_cluster_race": "cluster_kernel"}


@own_sanitizer
def test_thread_sanitizer_reports_each_race_and_nothing_else():
    """Under ThreadSanitizer (the _C_emu_tsan build) two threads' accesses to one
    address, one a write, with no barrier, atomic or launch boundary between, are
    a reported data race in whatever order the threads ran; the race-free kernels,
    whose threads synchronize by every means the executor has, give no report.
    8 blocks: blocks run one after another in a plain launch, each on TSan fibers
    of its own."""
    blocks = 8
    code = ("import sys, torch\n"
            "from varlen_kernels.testing import emulate_cuda, emulation_module, selftest\n"
            "assert emulation_module().TSAN == 1\n"
            f"for name in {RACE_FREE + list(RACES)!r}:\n"
            "    for order in ('forward', 'reverse', 'random'):\n"
            "        print('== kernel', name, order, file=sys.stderr, flush=True)\n"
            "        with emulate_cuda(order=order, seed=3):\n"
            f"            selftest(torch.randn({blocks * THREADS}), name, {blocks}, {THREADS})\n"
            "print('== end', file=sys.stderr, flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code], env=tsan_env(), capture_output=True, text=True)
    assert "== end" in r.stderr, (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 66, f"exit status {r.returncode}: the races were not reported"
    reports = {}
    for part in r.stderr.split("== kernel ")[1:]:
        run, _, text = part.partition("\n")
        reports[run] = [line for line in text.splitlines() if line.startswith("SUMMARY: ThreadSanitizer")]
    for order in ORDERS:
        for name in RACE_FREE:
            assert reports[f"{name} {order}"] == [], f"{name} {order}: {reports[f'{name} {order}']}"
        for name, function in RACES.items():
            found = reports[f"{name} {order}"]
            assert len(found) >= 1 and all("data race" in s and f"in {function}" in s for s in found), \
                f"{name} {order}: {found}"


def _tensor_core_operand(v, kind):
    """v as the tensor cores read it: rounded to the 16-bit type, or float with
    the low 13 mantissa bits dropped (TF32)."""
    if kind == "tf32":
        return (v.float().view(torch.int32) & -8192).view(torch.float32).double()
    return v.to(torch.bfloat16 if kind == "bf16" else torch.float16).double()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["bf16", "f16", "tf32"])
def test_ldmatrix_and_mma_follow_the_ptx_lane_layouts(kind, order):
    """D = 0.5 + A W^T through ldmatrix.x4 and two mma.sync (mma.h), in 16 blocks
    of 2 warps: every lane's registers are where the PTX ISA puts them. With
    g = lane // 4 and t = lane % 4, register j of ldmatrix holds row g of matrix
    j at bytes 4t..4t+3, the matrices' rows given by lanes 8j..8j+7; D's
    registers 4h + i hold D[g + 8 (i // 2)][8h + 2t + i % 2]. ldmatrix.x2 of W's
    columns 8-15 alone (lanes 16-31 giving misaligned addresses, unread) gives
    the same two registers as x4's last two, and the same D."""
    k = 8 if kind == "tf32" else 16
    x, out = run(f"mma_{kind}", order, blocks=16, threads=32)
    a = _tensor_core_operand(x[:16 * k], kind).view(16, k)
    w = _tensor_core_operand(x[16 * k:32 * k], kind).view(16, k)
    d = 0.5 + a @ w.T
    lane = torch.arange(512) % 32
    g, t = lane // 4, lane % 4
    for h in range(2):
        for i in range(4):
            torch.testing.assert_close(out[:, 4 * h + i].double(),
                                       d[g + 8 * (i // 2), 8 * h + 2 * t + i % 2],
                                       rtol=1e-6, atol=1e-6)
    # The ldmatrix registers, as bytes, of A and of W as the kernel stored them
    # (16-bit types, or float): for A lane L gave row L % 16 from byte
    # 16 * (L // 16); for W row L % 8 + 8 * (L // 16) from byte 16 * (L // 8 % 2).
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "tf32": torch.float32}[kind]
    givers = {"A": (8, lambda L: (L % 16, 16 * (L // 16))),
              "W": (12, lambda L: (L % 8 + 8 * (L // 16), 16 * (L // 8 % 2)))}
    for name, (col, row_of) in givers.items():
        first = 0 if name == "A" else 16 * k
        row_bytes = x[first:first + 16 * k].to(dtype).view(16, k).contiguous().view(torch.uint8)
        regs = out[:, col:col + 4].contiguous().view(torch.uint8).view(512, 4, 4)
        for j in range(4):
            expected = []
            for L, tt in zip((8 * j + g).tolist(), t.tolist()):
                r, byte = row_of(L)
                expected.append(row_bytes[r, byte + 4 * tt:byte + 4 * tt + 4])
            assert torch.equal(regs[:, j], torch.stack(expected)), f"ldmatrix register {j} of {name}"
    bits = out.contiguous().view(torch.int32)
    assert torch.equal(bits[:, 16:20], bits[:, 4:8]), "D of W's columns 8-15 through ldmatrix.x2"
    assert torch.equal(bits[:, 20:22], bits[:, 14:16]), "ldmatrix.x2's registers of W's columns 8-15"


@pytest.mark.parametrize("name,message", [
    ("mma_bf16_misaligned", "ldmatrix needs 16-byte aligned row addresses"),
    ("mma_tf32_partial", r"a tensor-core instruction \(ldmatrix, mma\): lane 16 has exited"),
    ("mma_bf16_diverged", r"lanes 0 and 16 at different instructions \(ldmatrix.x4, mma.sync bf16\)"),
])
def test_tensor_core_misuse_is_an_error(name, message):
    with pytest.raises(RuntimeError, match=message):
        run(name, "forward", blocks=16, threads=32)


def test_tensor_cores_need_a_whole_warp():
    with pytest.raises(RuntimeError, match="needs a whole warp of 32 lanes; this one has 16"):
        run("mma_f16", "forward", blocks=32, threads=16)
