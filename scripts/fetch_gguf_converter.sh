#!/usr/bin/env bash
# Put llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/) in vendor/,
# taken from the sdist of the same llama-cpp-python version that runs the GGUF files, so converter
# and runtime always match. vendor/ is git-ignored: this code is fetched, never committed.
# Also the vocabulary-only GGUFs of a few model families (vendor/llama.cpp-converter/models/): their real
# tokenizers, which scripts/make_random_model.py and tests/test_families.py build tiny models with, offline.
# Idempotent: does nothing when vendor/ already holds this version's converter and vocabularies.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pins.sh
. scripts/pins.sh
V="$LLAMA_CPP_VERSION"
SHA256="$LLAMA_CPP_SHA256"
DEST="${TUNEFORGE_VENDOR:-vendor}/llama.cpp-converter"
STAMP="$DEST/.version"
VOCABS=(llama-bpe llama-spm qwen2 phi-3)  # Llama 3, Llama 2 / Mistral, Qwen2, Phi-3

have_converter() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$V" ] && [ -f "$DEST/convert_hf_to_gguf.py" ] \
  && [ -f "$DEST/convert_lora_to_gguf.py" ]; }
have_vocabs() {
  local name
  for name in "${VOCABS[@]}"; do [ -f "$DEST/models/ggml-vocab-$name.gguf" ] || return 1; done
}
if have_converter && have_vocabs; then
  exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
CACHE="${TUNEFORGE_CACHE:-$HOME/.cache/tuneforge}/sdist"
SDIST="$CACHE/llama_cpp_python-$V.tar.gz"
if [ ! -f "$SDIST" ]; then
  # Into a temporary folder first, so an interrupted download never leaves a truncated sdist in the cache.
  python -m pip download -q --no-deps --no-binary :all: --require-hashes \
    -r <(echo "llama-cpp-python==$V --hash=sha256:$SHA256") -d "$TMP/download"
  mkdir -p "$CACHE"
  mv "$TMP/download/llama_cpp_python-$V.tar.gz" "$SDIST"
fi

# The cached sdist is checked too: a cache filled by an older script (or by hand) is not trusted unchecked.
echo "$SHA256  $SDIST" | sha256sum --check --quiet - || { echo "$SDIST: sha256 differs from the pinned one" >&2; exit 1; }

SRC="llama_cpp_python-$V/vendor/llama.cpp"
if ! have_converter; then
  # conversion/ only exists in newer llama.cpp (the converter was split into a package); older sdists lack it.
  MEMBERS=("$SRC/convert_hf_to_gguf.py" "$SRC/gguf-py" "$SRC/LICENSE")
  MEMBERS+=("$SRC/convert_lora_to_gguf.py")  # task adapters -> GGUF, served over one base model
  if tar tzf "$SDIST" | grep "^$SRC/conversion/" >/dev/null; then  # not grep -q: tar's SIGPIPE fails pipefail
    MEMBERS+=("$SRC/conversion")
  fi
  tar xzf "$SDIST" -C "$TMP" "${MEMBERS[@]}"
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  mv "$TMP/$SRC" "$DEST"
  echo "$V" > "$STAMP"
  echo "GGUF converter from llama-cpp-python $V in $DEST"
fi

VOCAB_MEMBERS=()
for name in "${VOCABS[@]}"; do VOCAB_MEMBERS+=("$SRC/models/ggml-vocab-$name.gguf"); done
tar xzf "$SDIST" -C "$TMP" "${VOCAB_MEMBERS[@]}"
mkdir -p "$DEST/models"
mv "$TMP/$SRC"/models/ggml-vocab-*.gguf "$DEST/models/"
echo "vocabulary GGUFs (${VOCABS[*]}) in $DEST/models"
