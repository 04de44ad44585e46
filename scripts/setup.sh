#!/usr/bin/env bash
# Install what the code and tests need; idempotent, safe to re-run.
# torch: an installed torch is kept as it is, whatever its build (a GPU box's CUDA torch is never
# replaced: a reinstall without internet fails, and a different CUDA build may not match the driver).
# Tested: torch 2.11 (CUDA 13, the GPU image) and 2.13 (CPU); another version gets a warning, not a change.
# Without torch: a CPU-only machine gets torch==2.13.0 (here: a CPU build from local disk), a machine
# with an NVIDIA driver gets torch==2.11.0 from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: no torch; NVIDIA driver found: pip install torch==2.11.0 (the tested CUDA build)"
    "$PY" -m pip install --quiet torch==2.11.0
  else
    echo "setup: no torch; CPU-only machine: pip install torch==2.13.0"
    "$PY" -m pip install --quiet torch==2.13.0
  fi
fi
"$PY" - <<'PY'
import torch
v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if not (2, 11) <= v <= (2, 13):
    print(f"setup: warning: torch {torch.__version__} is outside the tested 2.11-2.13; kept as it is")
PY
# everything but torch (requirements.txt names torch for `pip install -r` users; pip must not touch it here)
grep -v -E '^\s*torch([<>=!~ ]|$)' requirements.txt > /tmp/asca-requirements.$$.txt
"$PY" -m pip install --quiet -r /tmp/asca-requirements.$$.txt
rm -f /tmp/asca-requirements.$$.txt
"$PY" -c "import torch, numpy, requests, tqdm, matplotlib, pytest, ruff; print('ready: torch', torch.__version__, '| CUDA' if torch.cuda.is_available() else '| CPU only')"
