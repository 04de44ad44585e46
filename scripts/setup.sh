#!/usr/bin/env bash
# Install what the code and tests need. torch first: a CPU-only machine gets torch 2.13.0 (on this
# project's machines a CPU build from local disk); a machine with an NVIDIA driver gets PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install --quiet "torch>=2.5"
  else
    pip install --quiet torch==2.13.0
  fi
fi
pip install --quiet -r requirements.txt
python -c "import torch, numpy, requests, tqdm, matplotlib, pytest; print('ready: torch', torch.__version__, '| CUDA' if torch.cuda.is_available() else '| CPU only')"
