"""What made a result: the versions of the pieces that decide the numbers, and the commit."""

from __future__ import annotations

import platform
import shutil
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version

from tuneforge.core.paths import repo_root

PACKAGES = ("torch", "transformers", "peft", "accelerate", "llama-cpp-python", "dvc", "evidently", "numpy", "pandas")


def commit() -> str:
    """HEAD's commit, with '+dirty' when tracked files differ from it ('' outside git)."""
    run = lambda *args: subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True)  # noqa: E731
    if shutil.which("git") is None:  # a machine without git (a container image): DVC runs there with core.no_scm
        return ""
    head = run("rev-parse", "HEAD")
    if head.returncode:
        return ""
    # Only code and settings count: DVC rewrites dvc.lock and the metrics files while the pipeline runs.
    dirty = run("status", "--porcelain", "--untracked-files=no", "--", "src", "notebooks", "params.yaml", "dvc.yaml").stdout
    return head.stdout.strip() + ("+dirty" if dirty.strip() else "")


@cache
def environment() -> dict[str, str]:
    """{"python": ..., <package>: <version>, ..., "commit": ...}; recorded in every metrics file."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["commit"] = commit()
    return out
