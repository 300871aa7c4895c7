"""Build of varlen_kernels._C.

The C++ CPU sources are always built. The CUDA sources (csrc/cuda/*.cu) are
built too whenever torch is a CUDA build and a CUDA toolkit is found
(CUDA_HOME, default /usr/local/cuda), with or without a GPU present.
VARLEN_KERNELS_CPU_ONLY=1 forces a CPU-only build.
"""
import glob
import os
import runpy

ROOT = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # read when cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a;8.0+PTX")  # Hopper + portable PTX
os.environ.setdefault("MAX_JOBS", "2")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

# `_C` carries this hash so that importing a stale build is caught.
source_hash = runpy.run_path(os.path.join(ROOT, "varlen_kernels", "_build_info.py"))["source_hash"]


def want_cuda():
    if os.environ.get("VARLEN_KERNELS_CPU_ONLY", "0") not in ("", "0"):
        return False
    cuda_home = os.environ["CUDA_HOME"]
    return torch.version.cuda is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


def cuda_wheel_includes():
    """Headers of the CUDA wheels (cusparse.h and friends) that torch's headers include."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += glob.glob(os.path.join(base, "cu*", "include"))
    return dirs


cpp_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
with_cuda = want_cuda() and len(cuda_sources) > 0
defines = [
    f'-DVK_SOURCE_HASH="{source_hash(ROOT)}"',
    f'-DVK_TORCH_VERSION="{torch.__version__}"',
] + (["-DVK_WITH_CUDA"] if with_cuda else [])
cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno"] + defines
nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"] + defines

if with_cuda:
    ext = CUDAExtension(
        "varlen_kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + cuda_wheel_includes(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        py_limited_api=False,
    )
else:
    ext = CppExtension(
        "varlen_kernels._C",
        cpp_sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
