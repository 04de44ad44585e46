#!/usr/bin/env bash
# One GPU session's checks, in one call: environment, the CUDA tests, the benchmark table (printed last).
# Everything prints as it runs and is also written to OUT_DIR (created), so a run cut short keeps its logs.
#   bash scripts/gpu_check.sh OUT_DIR            # full: CUDA tests + attention T=1k/4k/8k/16k x 0.5/0.75/0.9
#                                                #   + whole steps at T=1024 and 8192 (budget: <= 8 min on an H200)
#   bash scripts/gpu_check.sh OUT_DIR --quick    # CUDA tests + one T=8192 row of each table (budget: < 3 min)
# Extra arguments after --quick or OUT_DIR go to bench_attention.py (e.g. --gate_grad --profile 8192).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == --* ]]; then
  echo "usage: bash scripts/gpu_check.sh OUT_DIR [--quick] [bench_attention.py options]" >&2; exit 2
fi
OUT=$1; shift
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }
stamp "environment" | tee "$OUT/env.txt"
{ python -c "import torch, platform; print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null; date -u; } 2>&1 | tee -a "$OUT/env.txt"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device" | tee -a "$OUT/env.txt"; exit 1; }

stamp "CUDA tests" | tee "$OUT/cuda_tests.log"
python -m pytest -m cuda -q -p no:cacheprovider -rA --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee -a "$OUT/cuda_tests.log"
tests_rc=${PIPESTATUS[0]}
stamp "CUDA tests exit code $tests_rc" | tee -a "$OUT/cuda_tests.log"

if [ $QUICK = 1 ]; then
  BENCH=(--seq 8192 --sparsity 0.75 --step_seq 8192 --warmup 3 --iters 10)
else
  BENCH=(--gate_grad)
fi
stamp "benchmark ${BENCH[*]} $*" | tee "$OUT/bench.log"
python bench_attention.py "${BENCH[@]}" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
stamp "done: cuda tests exit code $tests_rc; benchmark exit code $bench_rc; files in $OUT"
exit $(( tests_rc != 0 || bench_rc != 0 ))
