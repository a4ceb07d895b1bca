#!/usr/bin/env bash
# Every GPU figure in one run (scripts/gpu_evidence.py says what it measures), on a machine that has PyTorch,
# transformers, peft and accelerate but not the rest: they come as wheels carried in .whl/ (ignored by git), made
# here with `bash scripts/gpu_evidence.sh --download` (python 3.12, x86-64; about 45 MB, bitsandbytes 43 of it).
#   bash scripts/gpu_evidence.sh --out DIR              # GPU: under 9 minutes on one H100/H200
#   bash scripts/gpu_evidence.sh --cpu-smoke --out DIR  # CPU: the same stages on the tiny model
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hydra-core==1.3.8
        omegaconf==2.3.1 liger-kernel==0.8.5 torch-optimi==0.3.3 peft==0.21.2)
if [[ "${1:-}" == --download ]]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  # omegaconf's parser runtime is published as a source archive only: built here into a pure-Python wheel
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
  du -sh .whl
  exit 0
fi
if [[ -d .whl ]] && ! python3 -c "import bitsandbytes, trl, hydra" 2>/dev/null; then
  echo "[gpu_evidence] installing the carried wheels into /tmp/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 scripts/gpu_evidence.py "$@"
