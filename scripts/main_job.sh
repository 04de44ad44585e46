#!/usr/bin/env bash
# The README's main job, from a fresh clone and a bare Python 3: set up, prepare the bundled enwik8
# excerpt, train ASCA on 2 CPU cores (600 iterations; its time: docs/results/main_job.md), draw the plots, print
# a sample.
# Re-running it is safe: a finished run is shown again, an interrupted one resumes.
#   bash scripts/main_job.sh                       # everything
#   bash scripts/main_job.sh --max_iters=100       # extra --key=value go to the training command
# OUT_DIR=out/x picks another run directory; ASCA_SKIP_SETUP=1 skips scripts/setup.sh (tests use both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-out/excerpt_cpu_novel}
# Every step runs as a child this script waits for, and a signal to the script (kill PID, Ctrl-C, a closed
# terminal) is passed on to it as SIGTERM: the trainer checkpoints and stops, and no step outlives the script
# (an orphaned trainer would go on writing beside the next run's resume).
child=0
forward() { if [ "$child" -gt 0 ]; then kill -TERM "$child" 2>/dev/null || true; wait "$child" 2>/dev/null || true; fi; exit "$1"; }
trap 'forward 130' INT
trap 'forward 143' TERM
trap 'forward 129' HUP
step() { "$@" & child=$!; local rc=0; wait "$child" || rc=$?; child=0; return "$rc"; }
[ "${ASCA_SKIP_SETUP:-0}" = 1 ] || step bash scripts/setup.sh
step "$PY" prepare_dataset.py --bundled --out_dir data/excerpt
TRAIN=("$PY" novel_model.py config/train_excerpt_cpu_novel.py --out_dir="$OUT" --max_iters=600 --eval_interval=150 "$@")
if [ -f "$OUT/final.json" ]; then
  echo "main job: $OUT is already trained ($OUT/final.json); delete $OUT to train again"
elif [ -f "$OUT/ckpt.pt" ]; then
  step "${TRAIN[@]}" --init_from=resume
else
  step "${TRAIN[@]}"
fi
step "$PY" extraction.py "$OUT" --chars --length 256 --offset 0
echo "--- a sample from $OUT/ckpt.pt:"
step "$PY" sample.py --out_dir="$OUT" --start="The history of " --num_bytes=300 --temperature=0.8
echo
"$PY" - "$OUT" <<'PY'
import json, sys
f = json.load(open(f"{sys.argv[1]}/final.json"))
print(f"main job: test {f['test_bpc']:.3f} bits per byte (untrained: 8.0; gzip 2.9) after {f['iters']} iterations, "
      f"measured sparsity {f.get('sparsity', 0):.2f}; plots in {sys.argv[1]}/plots/")
PY
