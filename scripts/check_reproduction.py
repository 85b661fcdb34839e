"""Check that a fresh clone reproduces the committed metrics, on this machine or any other: clone, set up,
`dvc repro`, then every committed number against the clone's.

    python scripts/check_reproduction.py                 # HEAD, in a new temporary folder
    python scripts/check_reproduction.py --rev main --workdir /tmp/clone-a
    python scripts/check_reproduction.py --compare /elsewhere/metrics   # metrics a run on another machine wrote

Each quality metric is "equal", "within its interval" (the committed 95% bootstrap interval, `<name>_ci`, holds the
reproduced value) or "outside its interval"; one without an interval that differs is listed as "differs (no
interval)". Each decision (a gate's verdict, the served GGUF file, the retrain verdict) is "same" or "differs".
Exit status 1 only when a metric is outside its interval or a decision differs. Times, speeds, memory and the
environment record are not judged (they depend on the machine and its load). Run it before committing results,
and never `dvc commit -f` over outputs of other code.
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


# Metrics that are decisions, not measurements: any difference is one a user would see (a gate, the served file).
DECISIONS = ("gate_passed", "served_quantization", "retrain")


def add_metrics(tree: dict[str, dict], path: str, rows: dict) -> None:
    """Flatten one metrics JSON into tree[path]: its top-level keys (numbers, decisions, intervals)."""
    tree[path] = {k: v for k, v in rows.items() if not isinstance(v, dict)}


def verdicts(committed: dict[str, dict], reproduced: dict[str, dict]) -> dict[str, list[str]]:
    """{verdict: lines} for every committed number and decision, as the module docstring describes."""
    found: dict[str, list[str]] = {k: [] for k in ("equal", "within its interval", "differs (no interval)",
                                                   "outside its interval", "decision same", "decision differs")}
    for path, old_metrics in sorted(committed.items()):
        new_metrics = reproduced.get(path, {})
        for key, old in sorted(old_metrics.items()):
            new = new_metrics.get(key)
            line = f"{path}: {key}: {old} -> {new}"
            if key in DECISIONS:
                found["decision same" if new == old else "decision differs"].append(line)
            elif key.endswith("_ci") or MACHINE_DEPENDENT.search(key) or isinstance(old, bool) \
                    or not isinstance(old, (int, float)):
                continue
            elif new == old:
                found["equal"].append(line)
            elif isinstance(old_metrics.get(f"{key}_ci"), list) and isinstance(new, (int, float)):
                low, high = old_metrics[f"{key}_ci"]
                found["within its interval" if low <= new <= high else "outside its interval"].append(
                    f"{line} (committed interval {low:.4g} to {high:.4g})")
            else:
                found["differs (no interval)"].append(line)
    return found


def read_metrics(clone: Path, rev: str | None, folder: Path | None = None) -> dict[str, dict]:
    """Every metrics/<task>/*.json: committed at rev (git), or in the clone's working tree (rev None), or in
    folder (another machine's metrics/ folder), keyed by its path in the repository."""
    tree: dict[str, dict] = {}
    if rev is None:
        folder = folder or clone / "metrics"
        for path in sorted(folder.glob("*/*.json")):
            add_metrics(tree, f"metrics/{path.relative_to(folder).as_posix()}", json.loads(path.read_text()))
        return tree
    names = subprocess.run(["git", "-C", str(clone), "ls-tree", "-r", "--name-only", rev, "--", "metrics"],
                           check=True, capture_output=True, text=True).stdout.split()
    for name in (n for n in names if n.endswith(".json")):
        text = subprocess.run(["git", "-C", str(clone), "show", f"{rev}:{name}"], check=True, capture_output=True,
                              text=True).stdout
        add_metrics(tree, name, json.loads(text))
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="the commit to check (default HEAD)")
    parser.add_argument("--workdir", type=Path, help="where to clone (default: a new temporary folder)")
    parser.add_argument("--compare", type=Path, metavar="METRICS_DIR",
                        help="no clone: judge a metrics/ folder made elsewhere against the metrics committed at --rev")
    args = parser.parse_args(argv)

    source = Path(__file__).resolve().parents[1]
    if args.compare:
        return report(verdicts(read_metrics(source, args.rev), read_metrics(source, None, args.compare)))
    clone = args.workdir or Path(tempfile.mkdtemp(prefix="tuneforge-repro-"))
    started = time.time()
    run(["git", "clone", "-q", "--", str(source), str(clone)], cwd=source)
    run(["git", "-C", str(clone), "checkout", "-q", args.rev, "--"], cwd=source)
    setup_minutes = run(["bash", "scripts/setup.sh"], cwd=clone)
    repro_minutes = run(in_venv(clone, "dvc", "repro"), cwd=clone)
    found = verdicts(read_metrics(clone, "HEAD"), read_metrics(clone, None))
    print(f"\nfresh clone {clone} at {args.rev}: set-up + dvc repro took {(time.time() - started) / 60:.1f} min "
          f"(set-up {setup_minutes:.1f}, dvc repro {repro_minutes:.1f})")
    return report(found)


def report(found: dict[str, list[str]]) -> int:
    """Print the count of each verdict and the lines worth reading; the exit status the module docstring gives."""
    for verdict, lines in found.items():
        print(f"{len(lines):4d} {verdict}")
    for verdict in ("differs (no interval)", "outside its interval", "decision differs"):
        print("".join(f"  {verdict}: {line}\n" for line in found[verdict]), end="")
    return 1 if found["outside its interval"] or found["decision differs"] else 0


if __name__ == "__main__":
    sys.exit(main())
