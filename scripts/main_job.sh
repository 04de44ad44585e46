#!/usr/bin/env bash
# The README's main job, from a fresh clone and a bare Python 3: set up, prepare the bundled enwik8
# excerpt, train ASCA on 2 CPU cores (600 iterations, about 6 minutes), draw the plots, print a sample.
# Re-running it is safe: a finished run is shown again, an interrupted one resumes.
#   bash scripts/main_job.sh                       # everything
#   bash scripts/main_job.sh --max_iters=100       # extra --key=value go to the training command
# OUT_DIR=out/x picks another run directory; ASCA_SKIP_SETUP=1 skips scripts/setup.sh (tests use both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-out/excerpt_cpu_novel}
[ "${ASCA_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
"$PY" prepare_dataset.py --bundled --out_dir data/excerpt
TRAIN=("$PY" novel_model.py config/train_excerpt_cpu_novel.py --out_dir="$OUT" --max_iters=600 --eval_interval=150 "$@")
if [ -f "$OUT/final.json" ]; then
  echo "main job: $OUT is already trained ($OUT/final.json); delete $OUT to train again"
elif [ -f "$OUT/ckpt.pt" ]; then
  "${TRAIN[@]}" --init_from=resume
else
  "${TRAIN[@]}"
fi
"$PY" extraction.py "$OUT" --chars --length 256 --offset 0
echo "--- a sample from $OUT/ckpt.pt:"
"$PY" sample.py --out_dir="$OUT" --start="The history of " --num_bytes=300 --temperature=0.8
echo
"$PY" - "$OUT" <<'PY'
import json, sys
f = json.load(open(f"{sys.argv[1]}/final.json"))
print(f"main job: test {f['test_bpc']:.3f} bits per byte (untrained: 8.0; gzip 2.9) after {f['iters']} iterations, "
      f"measured sparsity {f.get('sparsity', 0):.2f}; plots in {sys.argv[1]}/plots/")
PY
