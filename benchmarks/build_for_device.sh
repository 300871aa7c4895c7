#!/usr/bin/env bash
# Builds varlen_kernels._C for the lent GPU machine on this (CPU) machine, so that
# the device's time is not spent compiling: the same Python minor version and
# torch as there (default Python 3.12 and torch 2.11.0, what the device image
# has), sm_90a only, without the emulation modules. The module lands in
# varlen_kernels/ (ignored by git); a device call carries it:
#   carry: ["varlen_kernels/_C.cpython-312-x86_64-linux-gnu.so"]
# and gpu_check.sh's build stage then finds it importable and skips the build.
#   bash benchmarks/build_for_device.sh            # PY=python3.12 TORCH=2.11.0
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3.12}
TORCH=${TORCH:-2.11.0}
VENV=${VENV:-/tmp/vk_device_venv}
SRC=${SRC:-/tmp/vk_device_build}
if ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH')" 2>/dev/null; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH" numpy setuptools wheel ninja pybind11
fi
# A copy of the sources (the committed and the working tree's), so that this
# build's objects and generated header never mix with the local build's.
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
(cd "$SRC" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-2} \
  VARLEN_KERNELS_EMULATION=0 "$VENV/bin/python" setup.py build_ext --inplace > build.log 2>&1) \
  || { tail -30 "$SRC/build.log"; exit 1; }
SUFFIX=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
cp "$SRC/varlen_kernels/_C$SUFFIX" varlen_kernels/
(cd "$SRC" && "$VENV/bin/python" -c "import varlen_kernels as v; assert v._C.WITH_CUDA")
ls -la "varlen_kernels/_C$SUFFIX"
