"""Records on disk: JSONL written atomically and read back, and the text normalisation used to compare inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed: "I'm home." == "i m home"."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write through a temporary file so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_metrics(path: Path, metrics: dict) -> None:
    """A stage's metrics JSON, with the versions and commit that made it (core.versions)."""
    from tuneforge.core.versions import environment

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**metrics, "environment": environment()}, indent=2) + "\n")
