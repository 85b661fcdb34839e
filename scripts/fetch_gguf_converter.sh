#!/usr/bin/env bash
# Put llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/) in vendor/,
# taken from the sdist of the same llama-cpp-python version that runs the GGUF files, so converter
# and runtime always match. vendor/ is git-ignored: this code is fetched, never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
V="${LLAMA_CPP_VERSION:-0.3.36}"
DEST=vendor/llama.cpp-converter
STAMP="$DEST/.version"
[ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$V" ] && exit 0

CACHE="${TUNEFORGE_CACHE:-$HOME/.cache/tuneforge}/sdist"
SDIST="$CACHE/llama_cpp_python-$V.tar.gz"
if [ ! -f "$SDIST" ]; then
  mkdir -p "$CACHE"
  python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$V" -d "$CACHE"
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
tar xzf "$SDIST" -C "$TMP" "llama_cpp_python-$V/vendor/llama.cpp/convert_hf_to_gguf.py" \
  "llama_cpp_python-$V/vendor/llama.cpp/conversion" "llama_cpp_python-$V/vendor/llama.cpp/gguf-py" \
  "llama_cpp_python-$V/vendor/llama.cpp/LICENSE"
rm -rf "$DEST"
mkdir -p vendor
mv "$TMP/llama_cpp_python-$V/vendor/llama.cpp" "$DEST"
echo "$V" > "$STAMP"
echo "GGUF converter from llama-cpp-python $V in $DEST"
