"""Check that a fresh clone reproduces the committed metrics: clone, set up, `dvc repro`, `dvc metrics diff`.

    python scripts/check_reproduction.py                 # HEAD, in a new temporary folder
    python scripts/check_reproduction.py --rev main --workdir /tmp/clone-a

Run it before committing results (and never `dvc commit -f` over outputs of other code). It fails when any
quality metric differs from the committed one by more than --tolerance; times, speeds, memory and the
environment record are listed but not judged (they depend on the machine and its load).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Numbers that measure the machine, not the model: reported, never judged.
MACHINE_DEPENDENT = re.compile(r"second|latency|tok_s|memory|bandwidth|wall|environment|_ms\b|p95")


def run(args: list[str], cwd: Path) -> float:
    """Run a command (an argument list: nothing passes through a shell) in cwd; its wall time in minutes."""
    print(f"$ {shlex.join(args)}", flush=True)
    started = time.time()
    subprocess.run(args, cwd=cwd, check=True)
    return (time.time() - started) / 60


def in_venv(clone: Path, *args: str) -> list[str]:
    """A command run with the clone's .venv first on PATH (what `. .venv/bin/activate` does)."""
    return ["env", f"PATH={clone / '.venv' / 'bin'}:{os.environ['PATH']}", f"VIRTUAL_ENV={clone / '.venv'}",
            "HF_HUB_OFFLINE=1", *args]


def judged_differences(diff: dict, tolerance: float) -> tuple[list[str], list[str]]:
    """(quality metrics beyond tolerance, machine-dependent changes) from `dvc metrics diff --json`."""
    bad, machine = [], []
    for path, metrics in sorted(diff.items()):
        for key, change in sorted(metrics.items()):
            old, new = change.get("old"), change.get("new")
            line = f"{path}: {key}: {old} -> {new}"
            if MACHINE_DEPENDENT.search(key):
                machine.append(line)
            elif not (isinstance(old, (int, float)) and isinstance(new, (int, float))) or abs(new - old) > tolerance:
                bad.append(line)
    return bad, machine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the commit to check (default HEAD)")
    parser.add_argument("--workdir", type=Path, help="where to clone (default: a new temporary folder)")
    parser.add_argument("--tolerance", type=float, default=0.005)
    args = parser.parse_args(argv)

    source = Path(__file__).resolve().parents[1]
    clone = args.workdir or Path(tempfile.mkdtemp(prefix="tuneforge-repro-"))
    started = time.time()
    run(["git", "clone", "-q", "--", str(source), str(clone)], cwd=source)
    run(["git", "-C", str(clone), "checkout", "-q", args.rev, "--"], cwd=source)
    setup_minutes = run(["bash", "scripts/setup.sh"], cwd=clone)
    repro_minutes = run(in_venv(clone, "dvc", "repro"), cwd=clone)
    out = subprocess.run(in_venv(clone, "dvc", "metrics", "diff", "--json", "HEAD"), cwd=clone,
                         check=True, capture_output=True, text=True).stdout
    bad, machine = judged_differences(json.loads(out or "{}"), args.tolerance)
    print(f"\nfresh clone {clone} at {args.rev}: set-up + dvc repro took {(time.time() - started) / 60:.1f} min "
          f"(set-up {setup_minutes:.1f}, dvc repro {repro_minutes:.1f})")
    print(f"{len(machine)} machine-dependent numbers changed (not judged)")
    if bad:
        print(f"{len(bad)} quality metrics differ from the committed ones by more than {args.tolerance}:")
        print("\n".join(f"  {line}" for line in bad))
        return 1
    print(f"every quality metric matches the committed one within {args.tolerance}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
