#!/usr/bin/env bash
# The checks a GPU session runs on the device machine, in stages:
#   bash benchmarks/gpu_check.sh                   # build tests bench tests_other sanitizer profile
#   bash benchmarks/gpu_check.sh build tests       # the stages named, in that order
# A device call runs 10 minutes at most and a session has little device time,
# so each stage does only what needs the GPU (CI runs the rest on the CPU), and
# each has a time cap (seconds; CAP_<stage>=N overrides it) after which it is
# stopped and the next one starts:
#   build      skipped where varlen_kernels._C already imports with CUDA (a build
#              for this python and torch, carried); else the extension for
#              sm_90a with MAX_JOBS=16, without the emulation modules (the GPU
#              stages do not use them; VARLEN_KERNELS_EMULATION=1 builds them)
#   tests      the CUDA tests of tests/test_cuda.py: backend "cuda" only
#              (VK_EMU_ORDERS empty), not the tests marked emulation
#   tests_other  the same selection (ids naming cuda) in the other test files;
#              a process of its own, so a CUDA error in one cannot fail the other
#   sanitizer  compute-sanitizer memcheck, then racecheck, on a small fwd+bwd
#   ptxas      registers and spills of the persistent kernels
#   bench      bench_rnn at the issue's shapes (T=512, B 8/64/256, H 256/1024)
#              for LSTM in bfloat16 and IEEE float32 against packed and padded
#              cuDNN, the grid form of our persistent kernels, their cluster form
#              passing rows through global memory (global_exchange) and
#              through distributed shared memory with a cluster barrier a
#              step (dsmem_barrier), our
#              per-step path, our per-step path's GEMMs as ATen ops
#              (aten_gemm; the default calls cuBLAS directly), our
#              persistent kernels staging by 16-byte copies
#              (async_copy; the default stages by bulk copies where they run),
#              their grid form as one row group and as 2 (one_group,
#              row_groups; the default runs the tensor-core backward as 2
#              from 32 rows), our
#              persistent kernels wherever they fit, past the auto path's
#              bound (persistent), and so as 2 row groups
#              (persistent+row_groups);
#              (bench_rnn: this alone); bench_linear_ce; bench_losses
#              (bench_losses: these two alone; both under bench's caps, CAP_bench)
#   bench_gru  GRU (bfloat16, IEEE float32) and the LSTM with TF32 on both sides,
#              against persistent, per_step, packed and padded
#   profile    torch.profiler's kernel table of one MaskedRNN fwd+bwd per shape (and its
#              wall time), the persistent kernels' at B=256 H=1024 (past the
#              auto path's bound), and profile_losses.py (masked_cross_entropy's
#              host and device time)
#   ncu        (only when named) Nsight Compute on the persistent kernels of one
#              fwd+bwd (bfloat16 LSTM, T=512) at B=8 H=256 (cluster form) and
#              B=64 H=1024 (grid form): throughput, memory, warp stalls, to
#              ncu_persistent.txt; then the forward kernel at B=8 H=256 with
#              per-instruction counts (instructions executed and stall samples of
#              each SASS instruction, with its source line): ncu_source_fwd.ncu-rep
#              and its source page, ncu_source_fwd.csv; then the same of the grid
#              form's forward and backward kernels at B=64 H=1024 (T=128):
#              ncu_source_grid.ncu-rep and ncu_source_grid.csv
#   units      (only when named) bench_rnn, bfloat16 LSTM, T=512, B 8/64, H 256/1024,
#              with the persistent kernels at 4, 8, 16 and 32 units a CTA as well
#              as their default, to benchmarks/results/cta_sweep/
# Each stage prints its seconds. Results (and logs) go to benchmarks/results/
# and, where $OUT is set, as one archive $OUT/gpu_results.tgz after every stage
# (the device tool brings back at most 8 files). PYTHON defaults to python3.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=benchmarks/results
mkdir -p "$RES"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests bench tests_other sanitizer profile)
status=0
log() { echo "== $*"; }
# cap STAGE CMD...: CMD under the stage's time cap (SIGINT first, so pytest and
# the benchmarks still write what they have).
declare -A CAP=([build]=300 [tests]=120 [tests_other]=90 [sanitizer]=150 [ptxas]=120
                [bench]=240 [bench_gru]=200 [profile]=35 [ncu]=150 [units]=300)
# BUDGET=N (seconds) ends the whole run by then: a cap never reaches past it.
# DRY_RUN=FILE writes each capped command to FILE instead of running it (the
# tests check the benchmarks' arguments so).
END=$(( $(date +%s) + ${BUDGET:-1000000} ))
cap() {
  local s=$1; shift
  local v="CAP_$s"
  local limit=${!v:-${CAP[$s]}} left=$(( END - $(date +%s) - 20 ))
  [ $left -lt $limit ] && limit=$left
  if [ $limit -lt 5 ]; then echo "== $s: skipped, the budget is spent"; return 124; fi
  if [ -n "${DRY_RUN:-}" ]; then echo "$*" >> "$DRY_RUN"; return 0; fi
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "== $s: stopped at its cap of $limit s"
  return $rc
}
# A filter of what a stage prints: finding nothing is no failure (the command's
# own status counts).
show() { grep "$@" || true; }
# The log of a stage (none in a dry run).
logfile() { if [ -n "${DRY_RUN:-}" ]; then echo /dev/null; else echo "$RES/$1"; fi; }
PYTEST_TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")

stage_build() {
  [ -n "${DRY_RUN:-}" ] && return
  if $PY -c "import varlen_kernels as v; assert v._C.WITH_CUDA" 2>/dev/null; then
    echo "varlen_kernels._C imports with CUDA: not rebuilt"
  else
    VARLEN_KERNELS_EMULATION=${VARLEN_KERNELS_EMULATION:-0} cap build $PY setup.py build_ext --inplace \
      > "$(logfile gpu_build.log)" 2>&1 || { tail -40 "$RES/gpu_build.log"; status=1; }
  fi
  $PY -c "import varlen_kernels as v, torch; assert v._C.WITH_CUDA, 'built without CUDA'
print(torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" || exit 1
}

gpu_tests() {  # STAGE LOG PYTEST-ARGS...
  local s=$1 out=$2; shift 2
  VK_EMU_ORDERS= cap "$s" $PY -m pytest "$@" -rs -m "not emulation" $PYTEST_TIMEOUT 2>&1 \
    | tee "$(logfile $out)" | show -v "^\.*$\|^[.sFE]*\s*\[" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
stage_tests() { gpu_tests tests gpu_tests.log tests/test_cuda.py; }
stage_tests_other() { gpu_tests tests_other gpu_tests_other.log tests -k cuda \
  --ignore tests/test_cuda.py --ignore tests/test_emulation.py; }

stage_sanitizer() {
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 cap sanitizer compute-sanitizer --tool $tool $PY benchmarks/sanitizer_workload.py --device cuda \
      > "$(logfile sanitizer_$tool.log)" 2>&1
    [ -n "${DRY_RUN:-}" ] && continue
    tail -3 "$RES/sanitizer_$tool.log"
    grep -q "ERROR SUMMARY: 0 errors\|RACECHECK SUMMARY: 0 hazards" "$RES/sanitizer_$tool.log" || status=1
  done
}

stage_ptxas() {
  cap ptxas $PY benchmarks/ptxas_report.py --out "$RES/ptxas_persistent.txt" 2>&1 | tail -40 || status=1
}

bench() {  # STAGE NAME BENCH-ARGS...
  local s=$1 name=$2; shift 2
  cap "$s" $PY benchmarks/bench_rnn.py --device cuda --out "$RES/$name" "$@" 2>&1 | tee "$(logfile $name.log)" \
    | show "^=\|failed\|  [a-z_]*:" | tail -40
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
stage_bench() { stage_bench_rnn; stage_bench_losses; }
stage_bench_rnn() {
  bench bench bench_rnn_cuda --cells lstm --dtypes bfloat16,float32 --repeats 2 --min-run-time 0.3 \
    --baselines masked,persistent,async_copy,one_group,row_groups,persistent+row_groups,global_exchange,dsmem_barrier,grid_sync,per_step,aten_gemm,packed,padded
}
stage_bench_losses() {
  CAP_bench=35 cap bench $PY benchmarks/bench_linear_ce.py --device cuda --out "$RES" 2>&1 \
    | tee "$(logfile bench_linear_ce_cuda.log)" | tail -6 || status=1
  CAP_bench=35 cap bench $PY benchmarks/bench_losses.py --device cuda --out "$RES" 2>&1 \
    | tee "$(logfile bench_losses_cuda.log)" | tail -6 || status=1
}
stage_bench_gru() {
  bench bench_gru bench_rnn_cuda_gru --cells gru --dtypes bfloat16,float32 --repeats 2 --min-run-time 0.3 \
    --baselines masked,persistent,per_step,packed,padded
  CAP_bench_gru=100 bench bench_gru bench_rnn_cuda_tf32 --cells lstm --dtypes tf32 --repeats 2 \
    --min-run-time 0.3 --baselines masked,persistent,per_step,packed,padded
}

stage_profile() {
  cap profile $PY benchmarks/profile_rnn.py --out "$RES/profile_rnn.txt" 2>&1 | show "^==" || status=1
  # Past the bound (B = 256, H = 1024) the persistent kernels took 41 ms against the
  # per-step path's 22 to 29: their kernels there.
  CAP_profile=20 VARLEN_KERNELS_RNN_PATH=persistent cap profile $PY benchmarks/profile_rnn.py \
    --out "$RES/profile_rnn_persistent_b256.txt" --shapes lstm,512,256,1024 2>&1 | show "^==" \
    || status=1
  # The cross entropy's fixed ~0.5 ms at 1k classes: host or device, and where.
  CAP_profile=30 cap profile $PY benchmarks/profile_losses.py --out "$RES/profile_losses.txt" \
    2>&1 | show "^==" || status=1
}

stage_ncu() {
  cap ncu ncu --profile-from-start off --kernel-name regex:persistent \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section LaunchStats --section Occupancy \
    $PY benchmarks/profile_rnn.py --ncu --shapes lstm,512,8,256 lstm,512,64,1024 \
    > "$(logfile ncu_persistent.txt)" 2>&1 || status=1
  [ -n "${DRY_RUN:-}" ] || grep -c "persistent_" "$RES/ncu_persistent.txt" || true
  CAP_ncu=90 cap ncu ncu --profile-from-start off --kernel-name regex:persistent_forward_tc \
    --launch-count 1 --section SourceCounters --section WarpStateStats --import-source yes -f \
    -o "$RES/ncu_source_fwd" $PY benchmarks/profile_rnn.py --ncu --shapes lstm,512,8,256 \
    > "$(logfile ncu_source.log)" 2>&1 || status=1
  # The grid form (H = 1024): its backward took 4x its forward's time, with
  # 0.37 instructions issued a cycle a scheduler; where they go, by instruction.
  CAP_ncu=120 cap ncu ncu --profile-from-start off --kernel-name regex:persistent_.*_tc \
    --launch-count 2 --section SourceCounters --section WarpStateStats --import-source yes -f \
    -o "$RES/ncu_source_grid" $PY benchmarks/profile_rnn.py --ncu --shapes lstm,128,64,1024 \
    >> "$(logfile ncu_source.log)" 2>&1 || status=1
  [ -n "${DRY_RUN:-}" ] && return
  local r
  for r in fwd grid; do
    ncu --import "$RES/ncu_source_$r.ncu-rep" --page source --print-source cuda,sass --csv \
      > "$RES/ncu_source_$r.csv" 2>> "$RES/ncu_source.log" || status=1
    wc -l "$RES/ncu_source_$r.csv"
  done
}

stage_units() {
  bench units cta_sweep --cells lstm --dtypes bfloat16 --T 512 --B 8 64 --H 256 1024 \
    --baselines masked,grid_sync,padded --units 4,8,16,32 --repeats 2
}

for s in "${stages[@]}"; do
  [ "$(type -t "stage_$s")" = function ] || {
    echo "unknown stage '$s': choose from build tests tests_other sanitizer ptxas bench bench_rnn bench_losses bench_gru profile ncu units" >&2
    exit 2; }
done
for s in "${stages[@]}"; do
  log "$s"
  start=$(date +%s)
  "stage_$s"
  echo "== $s: $(( $(date +%s) - start )) s"
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_results.tgz" "$RES" 2>/dev/null; fi
done
[ -n "${OUT:-}" ] && echo "== results in \$OUT/gpu_results.tgz"
exit $status
