#!/usr/bin/env bash
# Put llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/) in vendor/,
# taken from the sdist of the same llama-cpp-python version that runs the GGUF files, so converter
# and runtime always match. vendor/ is git-ignored: this code is fetched, never committed.
# Idempotent: does nothing when vendor/ already holds this version's converter.
set -euo pipefail
cd "$(dirname "$0")/.."
V="${LLAMA_CPP_VERSION:-0.3.36}"
DEST=vendor/llama.cpp-converter
STAMP="$DEST/.version"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$V" ] && [ -f "$DEST/convert_hf_to_gguf.py" ]; then
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
CACHE="${TUNEFORGE_CACHE:-$HOME/.cache/tuneforge}/sdist"
SDIST="$CACHE/llama_cpp_python-$V.tar.gz"
if [ ! -f "$SDIST" ]; then
  # Into a temporary folder first, so an interrupted download never leaves a truncated sdist in the cache.
  python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$V" -d "$TMP/download"
  mkdir -p "$CACHE"
  mv "$TMP/download/llama_cpp_python-$V.tar.gz" "$SDIST"
fi

SRC="llama_cpp_python-$V/vendor/llama.cpp"
# conversion/ only exists in newer llama.cpp (the converter was split into a package); older sdists lack it.
MEMBERS=("$SRC/convert_hf_to_gguf.py" "$SRC/gguf-py" "$SRC/LICENSE")
MEMBERS+=("$SRC/convert_lora_to_gguf.py")  # task adapters -> GGUF, served over one base model
if tar tzf "$SDIST" | grep "^$SRC/conversion/" >/dev/null; then  # not grep -q: tar's SIGPIPE fails pipefail
  MEMBERS+=("$SRC/conversion")
fi
tar xzf "$SDIST" -C "$TMP" "${MEMBERS[@]}"
rm -rf "$DEST"
mkdir -p vendor
mv "$TMP/$SRC" "$DEST"
echo "$V" > "$STAMP"
echo "GGUF converter from llama-cpp-python $V in $DEST"
