"""Where each stage reads and writes, relative to the repository root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def repo_root() -> Path:
    """The folder holding dvc.yaml, searched upward from the working directory.

    Notebooks opened in Jupyter run inside notebooks/, papermill runs at the root:
    both resolve to the same files.
    """
    if env := os.environ.get("TUNEFORGE_ROOT"):
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    raise FileNotFoundError(f"no dvc.yaml in {here} or any folder above it: run from inside the tuneforge repository")


# `accelerate config` files (train.accelerate_config), relative to the root: the training stages' DVC dependency.
ACCELERATE_CONFIGS = "accelerate"


def processed_dir(task: str) -> Path:
    return repo_root() / "data" / "processed" / task


def quarantine_file(task: str) -> Path:
    return repo_root() / "data" / "quarantine" / f"{task}.jsonl"


def production_dir(task: str) -> Path:
    """A task's live traffic: the folder of its request log (the drift stages depend on data/production)."""
    return repo_root() / "data" / "production" / task


def production_file(task: str) -> Path:
    """The request log `tuneforge serve` appends to."""
    return production_dir(task) / "requests.jsonl"


def reports_dir(task: str) -> Path:
    return repo_root() / "reports" / task


def models_dir(task: str) -> Path:
    return repo_root() / "models" / task


def adapter_dir(task: str) -> Path:
    """The task's LoRA adapter (peft's folder), written by the train stage."""
    return models_dir(task) / "adapter"


def classical_dir(task: str) -> Path:
    """The output kind's classical model (skops) and the router between it and the fine-tune (core/router.py),
    written by the evaluation stage."""
    return models_dir(task) / "classical"


def checkpoint_dir(task: str) -> Path:
    """The train stage's last checkpoint, what a killed run resumes from."""
    return models_dir(task) / "checkpoints" / "last"


def merged_dir(task: str) -> Path:
    """The base with the task's adapter merged in (safetensors), the GGUF converter's input."""
    return models_dir(task) / "merged"


def gguf_dir(task: str) -> Path:
    return models_dir(task) / "gguf"


def gguf_file(folder: Path, quantization: str) -> Path:
    """A model's GGUF of one type ("f16", "Q8_0", ...) in folder: one naming for every GGUF the pipeline writes."""
    return folder / f"model-{quantization}.gguf"


def task_gguf_file(task: str, quantization: str) -> Path:
    """The task's merged model as GGUF of one type (the export stage)."""
    return gguf_file(gguf_dir(task), quantization)


def adapter_gguf_file(task: str) -> Path:
    """The task's LoRA adapter as GGUF, beside its merged files: what `tuneforge serve` loads over the base GGUF."""
    return gguf_dir(task) / "adapter-f16.gguf"


def base_gguf_file(quantization: str) -> Path:
    return gguf_file(base_gguf_dir(), quantization)


def base_model_dir() -> Path:
    return repo_root() / "models" / "base"


def base_gguf_dir() -> Path:
    """The base model as GGUF (the base_gguf stage): what every task's GGUF adapter runs over."""
    return repo_root() / "models" / "base_gguf"


def predictions_file(task: str) -> Path:
    return repo_root() / "data" / "predictions" / f"{task}.jsonl"


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml: what its command runs and the metrics record it writes (tests/test_layout.py checks
    dvc.yaml against PIPELINE, and scripts/stage_deps.py generates each stage's code deps from it)."""

    name: str
    title: str  # what the index calls its report
    notebook: str | None = None  # a per-task stage: `python -m tuneforge.report.notebook <notebook> --task <task>`
    module: str | None = None  # a stage run once: `python -m <module>`
    metrics: str | None = None  # metrics/<task>/<metrics>.json

    @property
    def command(self) -> str:
        if self.notebook:
            return f"python -m tuneforge.report.notebook {self.notebook} --task ${{key}}"
        return f"python -m {self.module}"


# The pipeline, in order: the one list of its stages.
PIPELINE = (
    Stage("base_model", "Base model", module="tuneforge.stages.base_model"),
    Stage("base_gguf", "Base GGUF", module="tuneforge.stages.base_gguf"),
    Stage("prepare", "Prepare", notebook="00_prepare"),
    Stage("audit", "Data audit", notebook="01_data_audit", metrics="audit"),
    Stage("train", "Training", notebook="02_train", metrics="train"),
    Stage("evaluate", "Evaluation", notebook="03_evaluate", metrics="eval"),
    Stage("export", "GGUF export", notebook="04_export_gguf", metrics="export"),
    Stage("drift", "Drift", notebook="05_drift_report", metrics="drift"),
    Stage("index", "Index", module="tuneforge.report.index"),
)
STAGE_METRICS = tuple(s.metrics for s in PIPELINE if s.metrics)  # metrics/<task>/<name>.json, in pipeline order


def metrics_dir(task: str) -> Path:
    """Every stage's numbers for a task, in git (`dvc metrics show`); the index stage depends on metrics/."""
    return repo_root() / "metrics" / task


def metrics_file(task: str, name: str) -> Path:
    """A stage's metrics record; name is one of STAGE_METRICS."""
    if name not in STAGE_METRICS:
        raise ValueError(f"unknown metrics record {name!r}; known: {STAGE_METRICS}")
    return metrics_dir(task) / f"{name}.json"


def train_history_file(task: str) -> Path:
    """Loss against step, the CSV `dvc plots show` draws."""
    return metrics_dir(task) / "train_history.csv"
