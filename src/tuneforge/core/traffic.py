"""Production traffic logs: one JSON line per request, appended whole or not at all, read back robustly."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path


def append_request(path: Path, record: dict) -> None:
    """Append one whole line, or raise and leave the file as it was.

    The line goes out on an O_APPEND descriptor under an exclusive lock (writers in other processes wait for it);
    write() may take only part of it (a full disk, a file size limit), so the rest is written in a loop, and on a
    failure the file is cut back to its size before the line: no torn line is ever left for the next one to glue on.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"timestamp": time.time(), **record}, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(line):
                n = os.write(fd, line[written:])
                if n == 0:
                    raise OSError(f"{path}: write() took none of the request's log line")
                written += n
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)  # releases the lock


def read_traffic(path: Path) -> tuple[list[dict], list[str]]:
    """(requests, problems): a line that is not a JSON object with an 'input' string is skipped and named."""
    rows, problems = [], []
    if not path.exists():
        return rows, [f"{path}: no traffic logged yet"]
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # not UTF-8, not JSON, or a number too long for int()
            problems.append(f"{path}:{number}: not a JSON line")
            continue
        except RecursionError:
            problems.append(f"{path}:{number}: nested too deeply to read")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("input"), str):
            problems.append(f"{path}:{number}: needs a string field 'input'")
            continue
        rows.append(row)
    return rows, problems
