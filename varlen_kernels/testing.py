"""Testing helpers: run the CUDA kernels' code on the CPU.

    from varlen_kernels.testing import emulate_cuda
    with emulate_cuda(order="reverse"):
        y, h = MaskedGRU(4, 8)(x, lengths)   # CPU tensors, CUDA kernels' code

Inside ``emulate_cuda()`` every varlen_kernels op called on CPU tensors runs
the code of csrc/cuda (compiled by g++ with csrc/emulation/cuda_on_cpu.h) in
place of the CPU kernels: the same schemas, fake kernels and autograd, so
``torch.library.opcheck`` and ``torch.compile`` see the same ops. The threads
of each block run as fibers in the given order ("forward", "reverse" or a
seeded "random" one), so a kernel that misses a barrier gives different
results in different orders; a barrier or warp intrinsic that not every
thread reaches, an out-of-range launch or a failed ``CUDA_KERNEL_ASSERT``
raises RuntimeError.

When the process runs with AddressSanitizer preloaded, the ASan-instrumented
build of the same code is used:

    ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0 \\
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \\
    python -m pytest tests -k emulated

and with ThreadSanitizer preloaded, the TSan-instrumented one, which reports
every pair of accesses by two threads to one address, one a write, that no
barrier (__syncthreads, grid.sync(), __syncwarp), atomic or launch boundary
orders: a data race, whatever order the threads ran in (what compute-sanitizer's
racecheck finds on a GPU, for global memory as well as shared):

    TSAN_OPTIONS=exitcode=66 OMP_NUM_THREADS=1 \\
    LD_PRELOAD="$(gcc -print-file-name=libtsan.so)" \\
    python benchmarks/sanitizer_workload.py --device cpu --emulate

With ``VK_EMU_SANITIZER=asan`` (or ``tsan``) set, loading the emulation fails unless
that sanitizer's runtime is loaded, so a missing library cannot silently run
the uninstrumented build (``make test`` sets it).
"""
import contextlib
import importlib
import os
import warnings

import torch

from ._build_info import source_hash

ORDERS = ("forward", "reverse", "random")
# Every op of csrc/op_schemas.h.
OPS = ("rnn_forward", "rnn_backward", "rnn_bidirectional_forward", "rnn_bidirectional_backward",
       "cross_entropy_forward", "cross_entropy_backward", "masked_cross_entropy_forward",
       "elementwise_loss_forward", "elementwise_loss_backward", "masked_elementwise_loss_forward",
       "linear_cross_entropy_forward",
       "linear_cross_entropy_backward")

_HOW = ("It is built with the extension from a source checkout: `make build` (or "
        "`pip install --no-build-isolation -e .`) at the repository root; "
        "VARLEN_KERNELS_EMULATION=0 must not be set.")
# (order, seed) of each open emulate_cuda(), innermost last; the outermost
# one puts the kernels in place, process-wide.
_orders = []
_module = None


def _sanitizer_loaded():
    """"asan" or "tsan" when that sanitizer's runtime is loaded in this process, else ""."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return ""
    return "asan" if "libasan" in maps else "tsan" if "libtsan" in maps else ""


def emulation_module():
    """The loaded emulation build (``_C_emu``, or ``_C_emu_asan`` / ``_C_emu_tsan`` when
    AddressSanitizer / ThreadSanitizer is loaded in this process); raises RuntimeError
    saying how to build it."""
    global _module
    if _module is not None:
        return _module
    sanitizer = _sanitizer_loaded()
    wanted = os.environ.get("VK_EMU_SANITIZER", "")
    if wanted not in ("", "asan", "tsan"):
        raise RuntimeError(f"VK_EMU_SANITIZER must be 'asan', 'tsan' or unset, got {wanted!r}")
    if wanted and wanted != sanitizer:
        raise RuntimeError(f"VK_EMU_SANITIZER={wanted} asks for the {wanted.upper()} build, but "
                           f"{'no sanitizer' if not sanitizer else sanitizer.upper()} runtime is "
                           f"loaded in this process: preload lib{wanted}.so (LD_PRELOAD, see "
                           f"varlen_kernels.testing's docstring); gcc -print-file-name=lib{wanted}.so "
                           f"must name an existing file")
    name = f"_C_emu_{sanitizer}" if sanitizer else "_C_emu"
    try:
        module = importlib.import_module(f"varlen_kernels.{name}")
    except ImportError as e:
        raise RuntimeError(f"the CPU execution of the CUDA code (varlen_kernels.{name}) is not "
                           f"built or cannot be loaded ({e}). {_HOW}") from e
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "csrc")) and module.SOURCE_HASH != source_hash(root):
        raise RuntimeError(f"varlen_kernels.{name} is stale: it was built from other sources "
                           f"than those in {os.path.join(root, 'csrc')}. Rebuild it. {_HOW}")
    _module = module
    return module


def emulation_active() -> bool:
    """Whether an ``emulate_cuda()`` block is open."""
    return bool(_orders)


@contextlib.contextmanager
def emulate_cuda(order: str = "forward", seed: int = 0):
    """Runs the varlen_kernels ops on CPU tensors through the CUDA kernels' code.

    order: "forward", "reverse" or "random" (seeded by ``seed``): the order in
    which the threads of a block run between barriers.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    module = emulation_module()
    outer = _orders[-1] if _orders else (0, 0)
    lib = None
    if not _orders:  # an inner block only changes the order
        lib = torch.library.Library("varlen_kernels", "IMPL")
        with warnings.catch_warnings():
            # The dispatcher warns that these override the CPU kernels: that is the point.
            warnings.simplefilter("ignore")
            for op in OPS:
                lib.impl(op, getattr(torch.ops.varlen_kernels_emu, op).default, "CPU")
    _orders.append((ORDERS.index(order), int(seed)))
    module.set_thread_order(*_orders[-1])
    try:
        yield
    finally:
        _orders.pop()
        if lib is not None:
            lib._destroy()
        module.set_thread_order(*outer)


def selftest(x, name: str, blocks: int, threads: int):
    """Runs one of the executor's own test kernels (csrc/emulation/selftest.cpp)."""
    emulation_module()
    return torch.ops.varlen_kernels_emu.selftest(x, name, blocks, threads)


@contextlib.contextmanager
def env_setting(name: str, value: str):
    """Sets the environment variable `name` (a VARLEN_KERNELS_* setting) to `value`
    for the block, then restores it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@contextlib.contextmanager
def emulated_device(*, sm_count=None, runtime_sm_count=None, max_cluster_blocks=None,
                    max_grid_blocks=None, max_shared_per_block=None, max_shared_per_sm=None,
                    lengths_in_host_memory=None):
    """Changes limits of the emulated device for a while: ``sm_count`` bounds
    cooperative grids (the persistent RNN kernels spread the hidden units over
    the SMs: fewer SMs, more units per CTA, fewer rows per tile);
    ``runtime_sm_count`` makes cooperative launches get fewer SMs at run time
    than the occupancy queries see (as under MPS), so that a grid they allowed
    is refused at launch;
    ``max_cluster_blocks`` (1 to 16, the default) bounds thread block clusters
    likewise (the cluster form of those kernels: fewer CTAs in a cluster, more
    units per CTA, fewer rows per tile, so more clusters);
    ``max_grid_blocks`` caps grid-stride launches, so that a small test makes
    their loops go round; ``max_shared_per_block`` (bytes) is the most dynamic
    shared memory a block may have, ``max_shared_per_sm`` (bytes) what the
    blocks resident on an SM share (large: the blocks an SM holds are bounded by
    its threads only). ``lengths_in_host_memory=True`` makes the
    emulated ops take their lengths as a GPU op takes lengths on the CPU (the
    plan and the token count made on the host); by default they take them as
    lengths in device memory."""
    module = emulation_module()
    new = {k: v for k, v in (("sm_count", sm_count), ("runtime_sm_count", runtime_sm_count),
                             ("max_cluster_blocks", max_cluster_blocks),
                             ("max_grid_blocks", max_grid_blocks),
                             ("max_shared_per_block", max_shared_per_block),
                             ("max_shared_per_sm", max_shared_per_sm),
                             ("lengths_in_host_memory", lengths_in_host_memory))
           if v is not None}
    old = {k: module.set_limit(k, int(v)) for k, v in new.items()}
    try:
        yield
    finally:
        for k, v in old.items():
            module.set_limit(k, v)
