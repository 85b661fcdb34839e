#!/usr/bin/env bash
# Refresh requirements.lock (exact versions + hashes) from pyproject.toml's dependencies, for this project's
# machine kind (Linux x86_64, CPython 3.11, CPU torch). Versions already in the lock are kept unless you pass
# --upgrade (or --upgrade-package NAME); rerun the tests after any change. scripts/setup.sh installs from the lock.
# torch and llama-cpp-python are pinned in scripts/setup.sh instead: torch's wheel differs by machine (CPU/CUDA) and
# llama-cpp-python is built here from source (GGML_NATIVE=OFF), so neither has one hash that fits every machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q uv
# torch's CPU wheel (this machine's /opt/wheels) and the locally built llama-cpp-python wheel stand in for their
# PyPI releases while resolving, so the lock gets torch's real dependencies and none of the CUDA ones.
# The CPU torch build setup.sh installs on this machine kind (its local version keeps PyPI's CUDA build out).
echo "torch==${TORCH_LOCK_VERSION:-2.13.0+cpu}" > "${TMPDIR:-/tmp}/tuneforge-lock-constraints.txt"
python -m uv pip compile pyproject.toml --extra dev -c "${TMPDIR:-/tmp}/tuneforge-lock-constraints.txt" \
  --find-links /opt/wheels --find-links "${TUNEFORGE_WHEELS:-$HOME/.cache/tuneforge/wheels}" \
  --index-strategy unsafe-best-match --generate-hashes \
  --python-version 3.11.7 --python-platform x86_64-manylinux_2_28 \
  --no-emit-package torch --no-emit-package llama-cpp-python \
  -o requirements.lock "$@"
