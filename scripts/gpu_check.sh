#!/usr/bin/env bash
# One GPU session's checks: environment, the CUDA tests in order of value, then the benchmark, the tables last.
#   bash scripts/gpu_check.sh OUT_DIR [--quick]    # one 10-minute device call by construction: 3 tests, the T=8192
#                                                  #   attention row (its gate variants after it), the T=8192 steps
#   bash scripts/gpu_check.sh OUT_DIR --tests N    # N = 1..4: the listed CUDA tests, a group per call (<= 8 min)
#   bash scripts/gpu_check.sh OUT_DIR --bench      # the full benchmark (<= 9 min)
#   bash scripts/gpu_check.sh OUT_DIR --dry-run    # CPU: every step at tiny shapes, CUDA's autocast policy emulated
# Extra arguments after the mode go to bench_attention.py.
#
# OUT_DIR holds exactly two files, rewritten after every step, so a call cut at any point brings back everything
# that finished (a device call returns at most 8 files): summary.md (the environment, each test's verdict, the
# tables so far) and gpu_check.tar.gz (every log and json). The steps write into a scratch folder beside them.
#
# Limits, each covering its step's cold compiles (a cold FlexAttention forward+backward compile plus the torch import
# takes about 40-70 s, each whole model compiles on its own; the tests of a group share one process, so one import and
# inductor's caches serve them all, and pytest -v prints each result as it comes). A step cut by its limit reads
# TIMEOUT (exit 124), never passed. Sums (start-up, about 20 s, aside): they live in LIMITS below, and
# tests/test_gpu_dry_run.py checks each mode against its device-call cap.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bash scripts/gpu_check.sh OUT_DIR [--quick | --tests N | --bench | --dry-run] [bench_attention.py options]"
if [ $# -lt 1 ] || [[ "$1" == --* ]]; then
  echo "$usage" >&2
  exit 2
fi
OUT=$1; shift
MODE=quick
GROUP=0
case "${1:-}" in
  --quick) shift ;;
  --tests) MODE=tests; GROUP=${2:-}; shift; [ $# -gt 0 ] && shift
           case "$GROUP" in 1|2|3|4) ;; *) echo "--tests takes a group number, 1 to 4; $usage" >&2; exit 2 ;; esac ;;
  --bench) MODE=bench; shift ;;
  --dry-run) MODE=dry; shift ;;
esac
PY=${PYTHON:-python3}  # the GPU image guarantees python3, not python
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$WORK/tests"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

N=tests/test_asca.py
# In order of value: does the model as it trains on a GPU compute the reference function? Is it causal? Does
# the start-up check pass a correct install (at the first test's shapes: inductor's cache serves it)? Then the rest.
GROUP1="$N::test_cuda_compiled_whole_model_flex_matches_reference_forward_backward[fixed] $N::test_cuda_flex_model_is_causal tests/test_gpu_path.py::test_cuda_start_up_check_on_the_compiled_flex_path"
GROUP2="$N::test_cuda_compiled_whole_model_flex_matches_reference_forward_backward[adaptive] $N::test_cuda_start_up_check_matches_what_inductor_compiles $N::test_cuda_flex_matches_reference_forward_backward[1024-128] $N::test_cuda_flex_matches_reference_forward_backward[4096-128]"
GROUP3="$N::test_cuda_compiled_training_run[novel_model.py-fixed] $N::test_compiled_training_does_not_recompile_as_the_schedule_moves[cuda]"
GROUP4="$N::test_cuda_flex_short_sequences_match_reference[1] $N::test_cuda_flex_short_sequences_match_reference[37] $N::test_cuda_flex_short_sequences_match_reference[100] tests/test_decoding.py::test_cuda_compiled_decoding_equals_the_full_forward"
DRY_TESTS="tests/test_gpu_path.py tests/test_mixed_precision.py tests/test_kernels.py::test_bf16_inputs_to_an_fp32_module_run_and_match"
GATE=(--seq 8192 --sparsity 0.75 --gate_grad)  # the main row (gate bias per key), then per block and detached
# LIMITS: seconds per step (tests, attention, steps); 0 = the step does not run
case $MODE in
  quick) TESTS="$GROUP1"; LIMITS=(210 170 170)
         ATTN=("${GATE[@]}" --warmup 3 --iters 10); STEP=(--step_seq 8192 --budgets fixed --warmup 3 --iters 10) ;;
  tests) eval "TESTS=\$GROUP$GROUP"; LIMITS=(480 0 0) ;;
  bench) TESTS=""; LIMITS=(0 330 200)
         ATTN=(--seq 8192 4096 16384 1024 --sparsity 0.75 0.9 0.5 --gate_grad --warmup 3 --iters 10)
         STEP=(--step_seq 8192 1024 --warmup 3 --iters 10) ;;
  dry)   TESTS="$DRY_TESTS"; LIMITS=(120 60 50)
         # CUDA's autocast policy emulated, compiled (aot_eager) at four lengths: a dtype crash or a recompile limit
         # of the kind a GPU would meet shows here. Attention rows on the gather path (the CUDA start-up check's
         # reference), the whole steps on the reference path (CPU runs never compile the gather path).
         DRY=(--quick --dtype bfloat16 --cuda_policy --compile --backend aot_eager)
         ATTN=("${DRY[@]}" --cpu_impl gather --gate_grad --seq 128 256 512 1024 --sparsity 0.3 0.75 --profile 256)
         STEP=("${DRY[@]}" --step_seq 256 --budgets fixed adaptive) ;;
esac
if [ "${GPU_CHECK_LIMITS:-}" = print ]; then  # for the test of the limits: print them and stop
  echo "${LIMITS[*]}"
  exit 0
fi

pack() {  # OUT_DIR's two files from what the steps wrote so far, each replaced whole
  {
    echo "# gpu_check ($MODE$([ "$MODE" = tests ] && echo " $GROUP")), $(date -u +'%F %T') UTC"
    echo
    echo '```'
    cat "$WORK/env.txt" 2>/dev/null
    grep -v " PASSED" "$WORK/tests.log" 2>/dev/null  # each passed test is in the archive's tests/tests.log
    for f in "$WORK"/bench_attention.log "$WORK"/bench_steps.log; do
      [ -f "$f" ] && grep -E "^\[gpu_check|^(attention|step) T=|failed|Error" "$f"
    done
    cat "$WORK/done.txt" 2>/dev/null
    echo '```'
    for f in "$WORK/attention/bench.md" "$WORK/steps/bench.md"; do [ -f "$f" ] && { echo; echo "## $(basename "$(dirname "$f")")"; echo; cat "$f"; }; done
  } > "$WORK/summary.md.new"
  tar -czf "$WORK/gpu_check.tar.gz.new" -C "$WORK" --exclude='*.new' . 2>/dev/null
  mv -f "$WORK/summary.md.new" "$OUT/summary.md"
  mv -f "$WORK/gpu_check.tar.gz.new" "$OUT/gpu_check.tar.gz"
}

stamp "environment ($MODE)" | tee "$WORK/env.txt"
{ "$PY" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; date -u; } 2>&1 | tee -a "$WORK/env.txt"
if [ $MODE != dry ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device (the CPU rehearsal is --dry-run)" | tee -a "$WORK/env.txt"; pack; exit 1; }
fi
pack

tests_rc=0
if [ -n "$TESTS" ]; then
  limit=${LIMITS[0]}
  log="$WORK/tests/tests.log"
  # shellcheck disable=SC2086  # a group is a space-separated list of test ids
  timeout --signal=TERM --kill-after=5 "$limit" "$PY" -m pytest -v -p no:cacheprovider -rA $TESTS > "$log" 2>&1
  rc=$?
  case $rc in 0) word=passed ;; 124|137) word="TIMEOUT after ${limit}s" ;; 4|5) word="not collected (a renamed test?)" ;; *) word="FAILED (exit $rc)" ;; esac
  [ $rc -eq 0 ] || tests_rc=1
  stamp "tests (limit ${limit}s): $word: $(grep -cE ' PASSED' "$log") passed, $(grep -cE ' FAILED' "$log") failed, $(grep -cE ' SKIPPED' "$log") skipped" | tee -a "$WORK/tests.log"
  grep -E "::.* (PASSED|FAILED|SKIPPED|ERROR)" "$log" | sed 's/^/    /' | tee -a "$WORK/tests.log"
  [ $rc -eq 0 ] || grep -E "^E |Error" "$log" | head -20 | sed 's/^/    /' | tee -a "$WORK/tests.log"
  pack
fi

bench_rc=0
bench() {  # bench NAME LIMIT ARGS...: one bench_attention.py call under its own limit, tables in $WORK/NAME
  local name=$1 limit=$2; shift 2
  stamp "benchmark $name (limit ${limit}s): $*" | tee "$WORK/bench_$name.log"
  timeout --signal=TERM --kill-after=5 "$limit" "$PY" bench_attention.py --only "$name" "$@" --out "$WORK/$name" 2>&1 | tee -a "$WORK/bench_$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && stamp "benchmark $name cut at ${limit}s: its table holds the rows it finished" | tee -a "$WORK/bench_$name.log"
  [ "$rc" -eq 0 ] || bench_rc=1
  pack
}
[ "${LIMITS[1]}" -gt 0 ] && bench attention "${LIMITS[1]}" "${ATTN[@]}" "$@"
[ "${LIMITS[2]}" -gt 0 ] && bench steps "${LIMITS[2]}" "${STEP[@]}" "$@"

stamp "done ($MODE): tests exit $tests_rc; benchmark exit $bench_rc" | tee "$WORK/done.txt"
pack
echo
cat "$OUT/summary.md"
stamp "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$WORK"
exit $(( tests_rc != 0 || bench_rc != 0 ))
