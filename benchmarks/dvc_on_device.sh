#!/usr/bin/env bash
# The whole pipeline through `dvc repro` with a Llama-3.2-1B-shaped random base on a GPU machine (benchmarks/README.md,
# "The whole pipeline through dvc repro"). Run from a copy of this repository, with tuneforge's dependencies
# importable (installed, or on PYTHONPATH):
#     benchmarks/dvc_on_device.sh OUT_DIR [gpu_runs.py pipeline options, e.g. --tasks address_json --set K=V]
# Writes OUT_DIR/dvc_repro.log (each line stamped with seconds since the start) and OUT_DIR/pipeline.json
# (each stage's seconds, every metrics JSON, the GGUF sizes). The base is built once, in $BASE (default ~/llama1b).
# The weights are random, so no quality gate stops the run (--gates-off).
set -euo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# Packages installed with `pip install --target DIR` keep their Jupyter data (nbconvert's HTML templates) in
# DIR/share/jupyter, where Jupyter only looks when JUPYTER_PATH names it.
IFS=: read -ra dirs <<< "$PYTHONPATH"
for dir in "${dirs[@]}"; do
    [ -d "$dir/share/jupyter" ] && export JUPYTER_PATH="$dir/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
done
if ! command -v python >/dev/null; then  # dvc.yaml's commands call `python`; some images have only python3
    mkdir -p ~/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > ~/bin/python && chmod +x ~/bin/python
    export PATH=~/bin:$PATH
fi
base=${BASE:-$HOME/llama1b}
if [ ! -f "$base/config.json" ]; then
    start=$(date +%s)
    python3 scripts/make_random_model.py llama "$base" --shape llama-3.2-1b --dtype bfloat16 --device cuda
    echo "base built in $(( $(date +%s) - start )) s"
fi
python3 benchmarks/gpu_runs.py pipeline --work "${WORK:-$HOME/tuneforge-pipeline}" --base "$base" --profile gpu \
    --gates-off --log "$out/dvc_repro.log" --out "$out/pipeline.json" "$@"
