"""Records on disk: JSONL written atomically and read back, and the text normalisation used to compare inputs."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

# Invisible characters that split a word without showing: zero-width space, non-joiner, joiner, word joiner, BOM.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))


def folded(text: str) -> str:
    """text as a reader sees it: NFKC (composed and decomposed accents, fullwidth letters, ligatures become one
    form), zero-width characters removed, case folded, whitespace collapsed. Punctuation stays."""
    return " ".join(unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).casefold().split())


def normalise(text: str) -> str:
    """folded, and punctuation to spaces: "I'm home." == "i m home" == "Ｉ'm ho\u200bme."."""
    return " ".join(re.sub(r"[^\w\s]", " ", folded(text)).split())


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
