#!/usr/bin/env bash
# The embedded CPU pipeline (default params.yaml) on another x86 host, for issue 27's cross-machine check
# (docs/reproduction_other_machines.md). Runs dvc.yaml's stage commands directly, without DVC, in a scratch copy of
# this repository: the base stages first, then each task's chain (prepare, audit, train, evaluate, export, drift) in
# its own process group, the tasks side by side, then the index. Each stage's seconds and exit status go to
# LOG_DIR/stages.tsv, its output to LOG_DIR/<stage>.log. Then compare with the committed metrics:
#     python scripts/check_reproduction.py --compare WORK/metrics
#
#     benchmarks/cpu_pipeline_other_host.sh WORK LOG_DIR [THREADS_PER_TASK]
#
# tuneforge's dependencies must be importable (installed, or on PYTHONPATH) and vendor/llama.cpp-converter present
# in this repository. CUDA is hidden (CUDA_VISIBLE_DEVICES=""): a GPU machine's CPU stands in for another CPU host.
# Torch's threads: all cores for the two base stages, THREADS_PER_TASK (default: cores / number of tasks) for each
# task's stages; llama.cpp's threads stay export.n_threads (params.yaml).
set -uo pipefail
work=$(mkdir -p "$1" && cd "$1" && pwd)
logs=$(mkdir -p "$2" && cd "$2" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
tasks=$(python3 -c "import yaml; print(' '.join(yaml.safe_load(open('$repo/params.yaml'))['tasks']))")
ntasks=$(wc -w <<< "$tasks")
threads=${3:-$(( $(nproc) / ntasks ))}

# The scratch copy: every file of the repository but vendor/ (linked), virtual environments and carried pieces.
(cd "$repo" && find . -type f -not -path './vendor/*' -not -path './.venv/*' -not -path './.tf-carry/*' \
    -not -path './.git/*' -not -path './.whl/*' -not -name '*.pyc' -print0) \
    | (cd "$repo" && xargs -0 cp --parents -t "$work")
ln -sfn "$(readlink -f "$repo/vendor")" "$work/vendor"
rm -f "$work"/metrics/*/*.json "$work"/metrics/*/*.csv  # the committed numbers: only what this run writes is compared

export CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TUNEFORGE_ROOT="$work"
export PYTHONPATH="$work/src${PYTHONPATH:+:$PYTHONPATH}"
IFS=: read -ra dirs <<< "$PYTHONPATH"
for dir in "${dirs[@]}"; do  # nbconvert's HTML templates, where `pip install --target` puts them
    [ -d "$dir/share/jupyter" ] && export JUPYTER_PATH="$dir/share/jupyter${JUPYTER_PATH:+:$JUPYTER_PATH}"
done
if ! command -v python >/dev/null; then  # the stage commands call `python`; some images have only python3
    mkdir -p ~/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > ~/bin/python && chmod +x ~/bin/python
    export PATH=~/bin:$PATH
fi
cd "$work"
{
    nproc; lscpu
    python -c "import torch; print('torch', torch.__version__, 'threads', torch.get_num_threads(), 'cuda', torch.cuda.is_available()); print(torch.__config__.show())"
    python - <<'EOF'
import importlib.metadata as md
for p in ("torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "gguf", "numpy", "scipy",
          "scikit-learn", "pandas", "sacrebleu", "rouge-score", "evidently", "llama_cpp_python", "llguidance",
          "papermill", "jsonschema", "nltk", "absl-py", "lxml", "portalocker"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "missing")
EOF
} > "$logs/machine.txt" 2>&1

stage() {  # stage NAME THREADS CMD...: one stage, timed
    local name=$1 n=$2; shift 2
    local start end rc
    start=$(date +%s.%N)
    OMP_NUM_THREADS=$n MKL_NUM_THREADS=$n "$@" > "$logs/$name.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    printf '%s\t%s\t%.1f\t%s\n' "$name" "$rc" "$(awk "BEGIN {print $end - $start}")" "$n" >> "$logs/stages.tsv"
    return $rc
}
printf 'stage\trc\tseconds\ttorch_threads\n' > "$logs/stages.tsv"
all=$(nproc)
stage base_model "$all" python -m tuneforge.stages.base_model || exit 1
stage base_gguf "$all" python -m tuneforge.stages.base_gguf || exit 1
for task in $tasks; do
    (
        for step in 00_prepare:prepare 01_data_audit:audit 02_train:train 03_evaluate:evaluate \
                    04_export_gguf:export 05_drift_report:drift; do
            stage "${step#*:}@$task" "$threads" python -m tuneforge.report.notebook "${step%:*}" --task "$task" || exit 1
        done
    ) &
done
wait
stage index "$all" python -m tuneforge.report.index
echo done >> "$logs/stages.tsv"
