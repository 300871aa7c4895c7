#!/usr/bin/env bash
# The checks a GPU session runs on the device machine, in stages:
#   bash benchmarks/gpu_check.sh                   # build tests sanitizer ptxas bench
#   bash benchmarks/gpu_check.sh build tests       # the stages named, in that order
# A device call runs 10 minutes at most and a session has little device time,
# so each stage does only what needs the GPU (CI runs the rest on the CPU):
#   build      the extension for sm_90a (and its emulation modules, which some
#              CUDA tests use), with MAX_JOBS=16
#   tests      the CUDA tests: backends "cuda" only (VK_EMU_ORDERS empty), not
#              the tests marked emulation, only those whose id names cuda
#   sanitizer  compute-sanitizer memcheck and racecheck on a small fwd+bwd
#   ptxas      registers and spills of the persistent kernels
#   bench      bench_rnn at the issue's shapes (T=512, B 8/64/256, H 256/1024)
#              for LSTM in bfloat16 and IEEE float32 against packed and padded
#              cuDNN and MaskedRNN on all rows; bench_linear_ce; bench_losses
#   units      (only when named) bench_rnn, bfloat16 LSTM, T=512, B 8/64, H 256/1024,
#              with the persistent kernels at 4, 8, 16 and 32 units a CTA as well
#              as their default (fewer CTAs synchronizing each step), to
#              benchmarks/results/cta_sweep/
# Each stage prints its seconds. Results (and logs) go to benchmarks/results/
# and, where $OUT is set, as one archive $OUT/gpu_results.tgz (the device
# tool brings back at most 8 files). PYTHON defaults to python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=benchmarks/results
mkdir -p "$RES"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitizer ptxas bench)
status=0
log() { echo "== $*"; }

stage_build() {
  $PY -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -20 || status=1
  $PY -c "import varlen_kernels as v, torch; assert v._C.WITH_CUDA, 'built without CUDA'; print(torch.cuda.get_device_name())" || exit 1
}

stage_tests() {
  VK_EMU_ORDERS= $PY -m pytest tests -p no:cacheprovider -q -rs -m "not emulation" -k cuda 2>&1 \
    | tee "$RES/gpu_tests.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

stage_sanitizer() {
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool $PY benchmarks/sanitizer_workload.py --device cuda \
      > "$RES/sanitizer_$tool.log" 2>&1
    tail -3 "$RES/sanitizer_$tool.log"
    grep -q "ERROR SUMMARY: 0 errors\|RACECHECK SUMMARY: 0 hazards" "$RES/sanitizer_$tool.log" || status=1
  done
}

stage_ptxas() {
  $PY benchmarks/ptxas_report.py --out "$RES/ptxas_persistent.txt" 2>&1 | tail -40 || status=1
}

stage_bench() {
  $PY benchmarks/bench_rnn.py --device cuda --out "$RES" --cells lstm --dtypes bfloat16,float32 --baselines masked,grid_sync,all_rows,host_lengths,packed,padded 2>&1 | tee "$RES/bench_rnn_cuda.log" | tail -30 || status=1
  $PY benchmarks/bench_linear_ce.py --device cuda --out "$RES" 2>&1 | tee "$RES/bench_linear_ce_cuda.log" | tail -10 || status=1
  $PY benchmarks/bench_losses.py --device cuda --out "$RES" 2>&1 | tee "$RES/bench_losses_cuda.log" | tail -20 || status=1
}

stage_units() {
  $PY benchmarks/bench_rnn.py --device cuda --out "$RES/cta_sweep" --cells lstm --dtypes bfloat16 --T 512 --B 8 64 --H 256 1024 --baselines masked,grid_sync,padded --units 4,8,16,32 --repeats 2 2>&1 | tee "$RES/bench_units_cuda.log" | tail -12 || status=1
}

for s in "${stages[@]}"; do
  case "$s" in
    build|tests|sanitizer|ptxas|bench|units) ;;
    *) echo "unknown stage '$s': choose from build tests sanitizer ptxas bench units" >&2; exit 2 ;;
  esac
  log "$s"
  start=$(date +%s)
  "stage_$s"
  echo "== $s: $(( $(date +%s) - start )) s"
done
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" "$RES" && echo "== results in \$OUT/gpu_results.tgz"; fi
exit $status
