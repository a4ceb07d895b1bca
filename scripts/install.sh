#!/usr/bin/env bash
# Install finetune into the current Python environment.
#   bash scripts/install.sh          # the toolkit
#   bash scripts/install.sh gguf     # the toolkit and llama.cpp's converter and runtime (export.gguf)
#   bash scripts/install.sh dev      # the toolkit, llama.cpp's tools and the test tools
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

# llama.cpp's runtime (llama-cpp-python, in the gguf extra and so in dev) compiles llama.cpp on install: about 7
# minutes on 2 cores. Its wheel is built once (for x86-64, for any AVX2 CPU rather than this one alone) and kept in
# ~/.cache/finetune/wheels, and llama.cpp's LoRA converter is taken from the same source archive (finetune.gguf).
find_links=()
if [[ "$extras" == *dev* || "$extras" == *gguf* ]]; then
  cache="$HOME/.cache/finetune"
  version=$(sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
  converter="$cache/llama-cpp-python-$version/convert_lora_to_gguf.py"
  if ! ls "$cache/wheels/llama_cpp_python-$version-"*.whl >/dev/null 2>&1 || [[ ! -f "$converter" ]]; then
    sdist=$(mktemp -d)
    "$py" -m pip download --no-deps --no-binary :all: -q "llama-cpp-python==$version" -d "$sdist"
    mkdir -p "$(dirname "$converter")"
    tar -xzf "$sdist"/llama_cpp_python-*.tar.gz -O --wildcards '*/vendor/llama.cpp/convert_lora_to_gguf.py' > "$converter"
    if ! ls "$cache/wheels/llama_cpp_python-$version-"*.whl >/dev/null 2>&1; then
      echo "[install] building llama.cpp's runtime (llama-cpp-python $version) once: about 7 minutes on 2 cores"
      cmake_args="-DLLAVA_BUILD=OFF"  # no multimodal (mtmd) library: finetune runs text models
      if [[ "$(uname -m)" == x86_64 ]]; then
        cmake_args+=" -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
      fi
      CMAKE_ARGS="$cmake_args ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$py" -m pip wheel --no-deps "$sdist"/llama_cpp_python-*.tar.gz -w "$cache/wheels"
    fi
    rm -rf "$sdist"
  fi
  find_links=(--find-links "$cache/wheels")
fi
# The test suite renders Ollama templates with Go's own text/template (Debian's golang-go).
if [[ "$extras" == *dev* ]] && ! command -v go >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    echo "[install] Go (Debian's golang-go), for the tests of the Ollama templates"
    apt-get install -y -q golang-go >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q golang-go >/dev/null; }
  else
    echo "[install] no Go: install it (e.g. apt-get install golang-go) for the tests of the Ollama templates"
  fi
fi
"$py" -m pip install "${find_links[@]}" -e ".${extras:+[$extras]}"
