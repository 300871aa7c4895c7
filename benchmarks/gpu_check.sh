#!/usr/bin/env bash
# Everything a GPU session runs, in one call on the device machine:
# build, the whole test suite with CUDA tests, compute-sanitizer memcheck and
# racecheck on a small fwd+bwd, and both benchmarks. Results (and logs) go to
# benchmarks/results/ and, if set, to $OUT.
#   bash benchmarks/gpu_check.sh            # PYTHON defaults to python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=benchmarks/results
mkdir -p "$RES"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
status=0
log() { echo "== $*"; }

log build
$PY -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -20 || status=1
$PY -c "import varlen_kernels as v, torch; assert v._C.WITH_CUDA, 'built without CUDA'; print(torch.cuda.get_device_name())" || exit 1

log tests
$PY -m pytest tests -p no:cacheprovider -q -rs 2>&1 | tee "$RES/gpu_tests.log" | tail -30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log compute-sanitizer
for tool in memcheck racecheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool $PY benchmarks/sanitizer_workload.py --device cuda \
    > "$RES/sanitizer_$tool.log" 2>&1
  tail -3 "$RES/sanitizer_$tool.log"
  grep -q "ERROR SUMMARY: 0 errors\|RACECHECK SUMMARY: 0 hazards" "$RES/sanitizer_$tool.log" || status=1
done

log "ptxas: registers and spills of the persistent kernels"
$PY benchmarks/ptxas_report.py --out "$RES/ptxas_persistent.txt" 2>&1 | tail -40 || status=1

log benchmarks
$PY benchmarks/bench_rnn.py --device cuda --out "$RES" 2>&1 | tee "$RES/bench_rnn_cuda.log" | tail -30 || status=1
$PY benchmarks/bench_losses.py --device cuda --out "$RES" 2>&1 | tee "$RES/bench_losses_cuda.log" | tail -20 || status=1
$PY benchmarks/bench_linear_ce.py --device cuda --out "$RES" 2>&1 | tee "$RES/bench_linear_ce_cuda.log" | tail -10 || status=1
if [ -n "${OUT:-}" ]; then cp -r "$RES" "$OUT/"; fi
exit $status
