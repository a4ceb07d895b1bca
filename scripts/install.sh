#!/usr/bin/env bash
# Install finetune into the current Python environment.
#   bash scripts/install.sh          # the toolkit
#   bash scripts/install.sh dev      # the toolkit and the test tools
# Where no NVIDIA GPU is present, PyTorch's CPU build is installed first: an unpinned `torch` would pull
# several GB of CUDA libraries that a CPU cannot use. With a GPU, pip installs the CUDA build from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"

if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] NVIDIA GPU found: PyTorch (CUDA build) comes from PyPI with the rest"
  else
    echo "[install] no NVIDIA GPU: installing PyTorch's CPU build"
    # A CPU wheel provided locally (pip's --find-links), else PyTorch's own CPU index.
    if ! "$py" -m pip install --no-index --no-deps "torch>=2.4" 2>/dev/null; then
      "$py" -m pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
    fi
    # torch's own requirements, pinned to the build just installed so pip cannot swap it for a CUDA one.
    "$py" -m pip install "torch==$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  fi
fi
"$py" -m pip install -e ".${extras:+[$extras]}"
