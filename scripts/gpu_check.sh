#!/usr/bin/env bash
# One GPU session's checks: environment, the CUDA tests in order of value, then the benchmark, the tables last.
# Everything prints as it runs and is written to OUT_DIR as it finishes (each test group's log, the benchmark
# tables after every row), so a run cut short keeps what it measured.
#   bash scripts/gpu_check.sh OUT_DIR [--quick]    # <= 6 min by construction: 3 tests, T=8192 attention (gate bias
#                                                  #   per key, per block, detached) and whole-step rows
#   bash scripts/gpu_check.sh OUT_DIR --tests      # <= 9 min: every listed CUDA test (the full run, first half)
#   bash scripts/gpu_check.sh OUT_DIR --bench      # <= 9 min: the full benchmark (the full run, second half)
#   bash scripts/gpu_check.sh OUT_DIR --dry-run    # CPU: every step at tiny shapes, CUDA's autocast policy emulated
# Extra arguments after the mode go to bench_attention.py.
#
# By construction (issue 30): every step runs under `timeout` with a limit that covers its cold compiles (a cold
# FlexAttention forward+backward compile plus the torch import takes about 40-70 s; each whole model compiles on
# its own). The tests of a group share one process, so one torch import and inductor's caches serve them all;
# pytest -v prints each result as it comes, so a group cut by its limit still shows which passed. Limits:
#   quick: 120 s tests + 140 s attention + 100 s steps = 360 s;
#   tests: 120 + 300 + 150 s = 570 s;  bench: 330 s attention + 200 s steps = 530 s;  plus start-up (about 20 s).
# A group cut by its limit reads TIMEOUT (exit 124), never passed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == --* ]]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [--quick | --tests | --bench | --dry-run] [bench_attention.py options]" >&2
  exit 2
fi
OUT=$1; shift
MODE=quick
case "${1:-}" in --quick) shift ;; --tests) MODE=tests; shift ;; --bench) MODE=bench; shift ;; --dry-run) MODE=dry; shift ;; esac
PY=${PYTHON:-python3}  # the GPU image guarantees python3, not python
mkdir -p "$OUT/tests"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

N=tests/test_asca.py
# In order of value: does the model as it trains on a GPU compute the reference function? Is it causal? Does
# the start-up check pass a correct install? Then the rest.
GROUP1="$N::test_cuda_compiled_whole_model_flex_matches_reference_forward_backward[fixed] $N::test_cuda_flex_model_is_causal tests/test_gpu_path.py::test_cuda_start_up_check_on_the_compiled_flex_path"
GROUP2="$N::test_cuda_compiled_whole_model_flex_matches_reference_forward_backward[adaptive] $N::test_cuda_start_up_check_matches_what_inductor_compiles $N::test_cuda_flex_matches_reference_forward_backward[1024-128] $N::test_cuda_flex_matches_reference_forward_backward[4096-128] $N::test_cuda_compiled_training_run[novel_model.py-fixed] $N::test_compiled_training_does_not_recompile_as_the_schedule_moves[cuda]"
GROUP3="$N::test_cuda_flex_short_sequences_match_reference[1] $N::test_cuda_flex_short_sequences_match_reference[37] $N::test_cuda_flex_short_sequences_match_reference[100] tests/test_decoding.py::test_cuda_compiled_decoding_equals_the_full_forward"
DRY_TESTS="tests/test_gpu_path.py tests/test_mixed_precision.py tests/test_kernels.py::test_bf16_inputs_to_an_fp32_module_run_and_match"
GATE=(--seq 8192 --sparsity 0.75 --gate_grad)  # the gate bias's gradient: per key (default), per block, detached
case $MODE in
  quick) GROUPS_=("$GROUP1"); LIMITS=(120); ATTN_S=140; STEP_S=100
         ATTN=("${GATE[@]}" --warmup 3 --iters 10); STEP=(--step_seq 8192 --budgets fixed --warmup 3 --iters 10) ;;
  tests) GROUPS_=("$GROUP1" "$GROUP2" "$GROUP3"); LIMITS=(120 300 150); ATTN_S=0; STEP_S=0 ;;
  bench) GROUPS_=(); LIMITS=(); ATTN_S=330; STEP_S=200
         ATTN=(--seq 8192 4096 16384 1024 --sparsity 0.75 0.9 0.5 --gate_grad --warmup 3 --iters 10)
         STEP=(--step_seq 8192 1024 --warmup 3 --iters 10) ;;
  dry)   GROUPS_=("$DRY_TESTS"); LIMITS=(400); ATTN_S=200; STEP_S=150
         # CUDA's autocast policy emulated, compiled (aot_eager) at four lengths: a dtype crash or a recompile limit
         # of the kind a GPU would meet shows here. Attention rows on the gather path (the CUDA start-up check's
         # reference), the whole steps on the reference path (CPU runs never compile the gather path).
         DRY=(--quick --dtype bfloat16 --cuda_policy --compile --backend aot_eager)
         ATTN=("${DRY[@]}" --cpu_impl gather --gate_grad --seq 128 256 512 1024 --sparsity 0.3 0.75 --profile 256)
         STEP=("${DRY[@]}" --step_seq 256 --budgets fixed adaptive) ;;
esac

stamp "environment ($MODE)" | tee "$OUT/env.txt"
{ "$PY" -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; date -u; } 2>&1 | tee -a "$OUT/env.txt"
if [ $MODE != dry ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device (the CPU rehearsal is --dry-run)" | tee -a "$OUT/env.txt"; exit 1; }
fi

tests_rc=0
if [ ${#GROUPS_[@]} -gt 0 ]; then
  # every CUDA test must at least collect (a renamed test would otherwise silently drop out of the lists above)
  "$PY" -m pytest -q -p no:cacheprovider --collect-only -m cuda > "$OUT/tests/collect.log" 2>&1
  tests_rc=$?
  stamp "CUDA tests collect: exit $tests_rc ($(grep -c '::' "$OUT/tests/collect.log") listed)" | tee "$OUT/tests.log"
fi
for i in "${!GROUPS_[@]}"; do
  limit=${LIMITS[$i]}
  log="$OUT/tests/group$((i + 1)).log"
  # shellcheck disable=SC2086  # a group is a space-separated list of test ids
  timeout --signal=TERM --kill-after=5 "$limit" "$PY" -m pytest -v -p no:cacheprovider -rA ${GROUPS_[$i]} > "$log" 2>&1
  rc=$?
  case $rc in 0) word=passed ;; 124|137) word="TIMEOUT after ${limit}s" ;; 5) word="not collected" ;; *) word="FAILED (exit $rc)" ;; esac
  [ $rc -eq 0 ] || tests_rc=1
  stamp "test group $((i + 1)) (limit ${limit}s): $word: $(grep -cE ' PASSED' "$log") passed, $(grep -cE ' FAILED' "$log") failed, $(grep -cE ' SKIPPED' "$log") skipped" | tee -a "$OUT/tests.log"
  grep -E "::.* (PASSED|FAILED|SKIPPED|ERROR)" "$log" | sed 's/^/    /' | tee -a "$OUT/tests.log"
  [ $rc -eq 0 ] || tail -5 "$log" | sed 's/^/    /' | tee -a "$OUT/tests.log"
done

bench_rc=0
bench() {  # bench NAME LIMIT ARGS...: one bench_attention.py call under its own limit, tables in $OUT/NAME
  local name=$1 limit=$2; shift 2
  stamp "benchmark $name (limit ${limit}s): $*" | tee "$OUT/bench_$name.log"
  timeout --signal=TERM --kill-after=5 "$limit" "$PY" bench_attention.py --only "$name" "$@" --out "$OUT/$name" 2>&1 | tee -a "$OUT/bench_$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && stamp "benchmark $name cut at ${limit}s: $OUT/$name/bench.md holds the rows it finished" | tee -a "$OUT/bench_$name.log"
  [ "$rc" -eq 0 ] || bench_rc=1
}
[ "$ATTN_S" -gt 0 ] && bench attention "$ATTN_S" "${ATTN[@]}" "$@"
[ "$STEP_S" -gt 0 ] && bench steps "$STEP_S" "${STEP[@]}" "$@"

echo
for f in "$OUT/attention/bench.md" "$OUT/steps/bench.md"; do [ -f "$f" ] && { echo "== $f"; cat "$f"; echo; }; done
stamp "done ($MODE): tests exit $tests_rc; benchmark exit $bench_rc; files in $OUT" | tee -a "$OUT/tests.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
