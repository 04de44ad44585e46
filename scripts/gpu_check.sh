#!/usr/bin/env bash
# One GPU run: the CUDA tests (flex vs reference forward/backward, causality on the flex path,
# compiled training of both models), then the benchmark table (printed last).
#   bash scripts/gpu_check.sh            # full table; not yet timed (compiles ~4 attention + 4 whole-model graphs)
#   bash scripts/gpu_check.sh --seq 4096 8192 --step_seq 1024   # a shorter run if device time is short
#   bash scripts/gpu_check.sh --quick    # smoke run
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
python -m pytest -m cuda -q -p no:cacheprovider
tests_rc=$?
python bench_attention.py "$@"
bench_rc=$?
echo "cuda tests exit code: $tests_rc; benchmark exit code: $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
