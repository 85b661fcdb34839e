"""Production traffic logs: one JSON line per request, appended atomically, read back robustly."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def append_request(path: Path, record: dict) -> None:
    """One write() of a whole line on an O_APPEND descriptor: concurrent writers never interleave,
    and a crash leaves either the whole line or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"timestamp": time.time(), **record}, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_traffic(path: Path) -> tuple[list[dict], list[str]]:
    """(requests, problems): a line that is not a JSON object with an 'input' string is skipped and named."""
    rows, problems = [], []
    if not path.exists():
        return rows, [f"{path}: no traffic logged yet"]
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problems.append(f"{path}:{number}: not a JSON line")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            problems.append(f"{path}:{number}: needs a string field 'input'")
            continue
        rows.append(row)
    return rows, problems
