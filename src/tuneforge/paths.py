"""Where each stage reads and writes, relative to the repository root."""

from __future__ import annotations

import os
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


def processed_dir(task: str) -> Path:
    return repo_root() / "data" / "processed" / task


def quarantine_file(task: str) -> Path:
    return repo_root() / "data" / "quarantine" / f"{task}.jsonl"


def production_file(task: str) -> Path:
    return repo_root() / "data" / "production" / f"{task}.jsonl"


def reports_dir(task: str) -> Path:
    return repo_root() / "reports" / task


def models_dir(task: str) -> Path:
    return repo_root() / "models" / task


def base_model_dir() -> Path:
    return repo_root() / "models" / "base"


def predictions_file(task: str) -> Path:
    return repo_root() / "data" / "predictions" / f"{task}.jsonl"
