#!/usr/bin/env bash
# One GPU session's checks in one call: environment, the CUDA tests in order of value, then the benchmark.
# Everything prints as it runs and is written to OUT_DIR as it finishes (each test's log and result, the
# benchmark tables after every row), so a run cut short keeps what it measured.
#   bash scripts/gpu_check.sh OUT_DIR             # full:  <= 8 min by construction (below)
#   bash scripts/gpu_check.sh OUT_DIR --quick     # quick: <= 4 min by construction
#   bash scripts/gpu_check.sh OUT_DIR --dry-run   # CPU:   every step at tiny shapes, bf16 autocast, about a minute
# Extra arguments after the mode go to bench_attention.py.
#
# By construction: every test runs alone under `timeout` (TEST_S seconds each), and the benchmark under its own
# (BENCH_S): quick = 3 tests x 45 s + 75 s = 210 s; full = 9 tests x 30 s + 3 x 20 s + 150 s = 480 s; plus start-up.
# A test cut by its timeout is reported as TIMEOUT (exit 124), never as passed. Compiles: each test compiles its
# own model once for training and once for eval at most (tests/test_novel.py asserts this for the training run);
# the benchmark compiles each sequence length afresh (torch._dynamo.reset), 3 variants with --gate_grad
# (the default gate bias per key position, per block, detached).
# The first lines to read: test 1 (the compiled whole model against the reference, forward and backward), and
# the T=8192 attention and step rows (benchmarked first).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == --* ]]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [--quick | --dry-run] [bench_attention.py options]" >&2; exit 2
fi
OUT=$1; shift
MODE=full
case "${1:-}" in --quick) MODE=quick; shift ;; --dry-run) MODE=dry; shift ;; esac
mkdir -p "$OUT/tests"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

N=tests/test_novel.py
# In order of value: does the model as it trains on a GPU compute the reference function? Is it causal? Does
# the start-up guard agree with inductor? Then the rest.
QUICK_TESTS=("$N::test_cuda_compiled_whole_model_flex_matches_reference_forward_backward[fixed]"
             "$N::test_cuda_flex_model_is_causal"
             "tests/test_gpu_ready.py::test_cuda_start_up_check_on_the_compiled_flex_path")
FULL_TESTS=("${QUICK_TESTS[@]}"
            "$N::test_cuda_compiled_whole_model_flex_matches_reference_forward_backward[adaptive]"
            "$N::test_cuda_start_up_check_matches_what_inductor_compiles"
            "$N::test_cuda_flex_matches_reference_forward_backward[1024-128]"
            "$N::test_cuda_flex_matches_reference_forward_backward[4096-128]"
            "$N::test_cuda_compiled_training_run[novel_model.py-fixed]"
            "$N::test_compiled_training_does_not_recompile_as_the_schedule_moves[cuda]")
SHORT_TESTS=("$N::test_cuda_flex_short_sequences_match_reference[1]"
             "$N::test_cuda_flex_short_sequences_match_reference[37]"
             "$N::test_cuda_flex_short_sequences_match_reference[100]")
case $MODE in
  quick) TESTS=("${QUICK_TESTS[@]}"); SHORT=(); TEST_S=45; BENCH_S=75
         BENCH=(--seq 8192 --sparsity 0.75 --step_seq 8192 --budgets fixed --warmup 3 --iters 10) ;;
  full)  TESTS=("${FULL_TESTS[@]}"); SHORT=("${SHORT_TESTS[@]}"); TEST_S=30; BENCH_S=150
         BENCH=(--seq 8192 4096 16384 1024 --sparsity 0.75 0.9 0.5 --step_seq 8192 1024 --gate_grad --warmup 3 --iters 10) ;;
  dry)   TESTS=("tests/test_gpu_ready.py" "tests/test_kernels.py::test_bf16_inputs_to_an_fp32_module_run_and_match")
         SHORT=(); TEST_S=120; BENCH_S=150
         BENCH=(--quick --dtype bfloat16 --compile --backend aot_eager --gate_grad --seq 128 256 512 1024 --sparsity 0.3 0.75 --step_seq 256
                --budgets fixed adaptive --profile 256) ;;
esac

stamp "environment ($MODE)" | tee "$OUT/env.txt"
{ python -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; date -u; } 2>&1 | tee -a "$OUT/env.txt"
if [ $MODE != dry ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device (the CPU rehearsal is --dry-run)" | tee -a "$OUT/env.txt"; exit 1; }
fi

# every CUDA test must at least collect (a renamed test would otherwise silently drop out of the list above)
python -m pytest -q -p no:cacheprovider --collect-only -m cuda > "$OUT/tests/collect.log" 2>&1
collect_rc=$?
stamp "CUDA tests collect: exit $collect_rc ($(grep -c '::' "$OUT/tests/collect.log") listed)" | tee "$OUT/tests.log"
tests_rc=$collect_rc
i=0
for t in "${TESTS[@]}" "${SHORT[@]}"; do
  i=$((i + 1))
  limit=$TEST_S
  for s in "${SHORT[@]}"; do [ "$s" = "$t" ] && limit=20; done
  log="$OUT/tests/$(printf %02d $i).log"
  timeout --signal=TERM --kill-after=5 "$limit" python -m pytest -q -p no:cacheprovider -rA "$t" > "$log" 2>&1
  rc=$?
  case $rc in 0) word=passed ;; 124|137) word="TIMEOUT after ${limit}s" ;; 5) word="not collected" ;; *) word="FAILED (exit $rc)" ;; esac
  [ $rc -eq 0 ] || tests_rc=1
  stamp "test $i: $word: $t" | tee -a "$OUT/tests.log"
  [ $rc -eq 0 ] || tail -5 "$log" | sed 's/^/    /' | tee -a "$OUT/tests.log"
done

stamp "benchmark (limit ${BENCH_S}s): ${BENCH[*]} $*" | tee "$OUT/bench.log"
timeout --signal=TERM --kill-after=5 "$BENCH_S" python bench_attention.py "${BENCH[@]}" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
[ "$bench_rc" -eq 124 ] && stamp "benchmark cut at ${BENCH_S}s: $OUT/bench.md holds the rows it finished" | tee -a "$OUT/bench.log"
stamp "done ($MODE): tests exit $tests_rc; benchmark exit $bench_rc; files in $OUT" | tee -a "$OUT/tests.log"
exit $(( tests_rc != 0 || bench_rc != 0 ))
