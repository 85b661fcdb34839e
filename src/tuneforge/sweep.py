"""`tuneforge sweep`: DVC experiments over the settings in params.yaml's `sweep` section, and a page comparing them.

    params.yaml sweep -> one `dvc exp run --queue -n <name>-<i> -S key=value ... <targets>` per combination
    -> `dvc exp run --run-all` (starts the queue's worker, waits for every queued experiment)
    -> `dvc exp show --json` -> reports/sweep.html: every run's settings and metrics, the best highlighted

Each experiment runs in DVC's temporary workspace, so the checkout is untouched; `dvc exp apply <best>`
brings the winner's params (and outputs) into it. Recipe trials recorded in benchmarks/recipe_trials.json
(short trainings on this CPU, see benchmarks/recipe_trials.py) are summarised on the same page.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.core.params import Params, SweepSpec, load_params
from tuneforge.core.paths import repo_root

REPORT = Path("reports") / "sweep.html"
TRIALS = Path("benchmarks") / "recipe_trials.json"


# ---------------------------------------------------------------- queueing and running


def format_value(value: Any) -> str:
    """A value as `dvc exp run -S` reads it (Hydra's override grammar)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value))  # Hydra reads 2e-5, not 2e-05
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot pass {value!r} to dvc exp run -S")


def experiment_names(spec: SweepSpec) -> list[str]:
    return [f"{spec.name}-{i}" for i in range(1, len(spec.points()) + 1)]


def queue_commands(spec: SweepSpec) -> list[list[str]]:
    """One `dvc exp run --queue` command line for each combination."""
    commands = []
    for name, point in zip(experiment_names(spec), spec.points(), strict=True):
        cmd = ["dvc", "exp", "run", "--queue", "-n", name]
        for key, value in point.items():
            cmd += ["-S", f"{key}={format_value(value)}"]
        commands.append(cmd + list(spec.targets))
    return commands


def dvc(*args: str, root: Path, capture: bool = True) -> subprocess.CompletedProcess:
    """Run the dvc of this Python environment (the one tuneforge is installed in)."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=capture, text=True)
    if result.returncode != 0:
        output = (result.stdout or "")[-3000:] + (result.stderr or "")[-3000:] if capture else ""
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {result.returncode})\n{output}")
    return result


def check_points(params: Params, spec: SweepSpec) -> None:
    """Fail before queueing anything if a combination is not a valid params.yaml."""
    for i, point in enumerate(spec.points(), 1):
        try:
            params.with_settings(point)
        except Exception as err:  # noqa: BLE001 - re-raised with the combination named
            raise ValueError(f"sweep combination {spec.name}-{i} {point} is invalid: {err}") from None


def run_sweep(root: Path | None = None, jobs: int = 1) -> Path:
    """Queue every combination, run the queue to the end, write the report; returns the report's path."""
    root = root or repo_root()
    params = load_params(root / "params.yaml")
    spec = require_sweep(params)
    check_points(params, spec)
    existing = set(sweep_rows(root, spec, status={}))
    stale = [name for name in experiment_names(spec) if name in existing]
    if stale:  # a rerun replaces the previous sweep's experiments of the same names
        dvc("exp", "remove", *stale, root=root)
    for cmd in queue_commands(spec):
        print(shlex.join(cmd), flush=True)
        dvc(*cmd[1:], root=root)
    started = time.perf_counter()
    # --run-all starts the queue's worker(s) and follows every queued experiment until it has finished.
    dvc("exp", "run", "--run-all", "--jobs", str(jobs), root=root, capture=False)
    print(f"sweep ran {len(spec.points())} experiments in {time.perf_counter() - started:.0f} s", flush=True)
    return write_report(root, spec, queue_status(root))


def require_sweep(params: Params) -> SweepSpec:
    if params.sweep is None:
        raise ValueError("params.yaml has no `sweep` section: add one (see README, 'Sweeps') to run `tuneforge sweep`")
    return params.sweep


def queue_status(root: Path) -> dict[str, str]:
    """{experiment name: Success / Failed / Running / Queued} from DVC's own queue API (what `dvc queue status`
    prints as a table)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {entry["name"]: entry["status"] for entry in repo.experiments.celery_queue.status() if entry["name"]}


# ---------------------------------------------------------------- results


@dataclass
class Run:
    name: str
    rev: str
    settings: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)  # "<file>:<name>" -> value
    status: str = "Success"

    @property
    def ok(self) -> bool:
        return self.status == "Success" and bool(self.metrics)


def lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def flat_metrics(data: dict) -> dict[str, Any]:
    out = {}
    for file, content in (data.get("metrics") or {}).items():
        for key, value in ((content or {}).get("data") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{file}:{key}"] = value
    return out


def sweep_rows(root: Path, spec: SweepSpec, status: dict[str, str]) -> dict[str, Run]:
    """This sweep's experiments (named <name>-<i>, one a point) on the current commit, from `dvc exp show --json`;
    a larger earlier sweep's <name>-<i> beyond this one's points are not this sweep's."""
    shown = json.loads(dvc("exp", "show", "--json", "--no-pager", root=root).stdout or "[]")
    names = set(experiment_names(spec))
    runs: dict[str, Run] = {}
    for baseline in shown:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                name = rev.get("name") or ""
                if name not in names:
                    continue
                data = rev.get("data") or {}
                params_tree = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
                runs[name] = Run(name, rev.get("rev", "")[:7], {k: lookup(params_tree, k) for k in spec.settings},
                                 flat_metrics(data), status.get(name, "Success" if data.get("metrics") else "Failed"))
    for name, state in status.items():  # failed runs leave no experiment ref behind: list them anyway
        if name in names and name not in runs:
            runs[name] = Run(name, "", {}, {}, state)
    return dict(sorted(runs.items(), key=lambda kv: int(kv[0].rsplit("-", 1)[1])))


def best_run(runs: list[Run], spec: SweepSpec) -> Run | None:
    scored = [r for r in runs if r.ok and isinstance(r.metrics.get(spec.metric), (int, float))]
    if not scored:
        return None
    pick = max if spec.higher_is_better else min
    return pick(scored, key=lambda r: r.metrics[spec.metric])


# ---------------------------------------------------------------- report


def cell(value: Any) -> str:
    """A table cell's text (the template escapes it)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def trial_tables(root: Path) -> list[dict]:
    """benchmarks/recipe_trials.json, a table a task: the short CPU trials the default recipe was chosen from."""
    path = root / TRIALS
    if not path.exists():
        return []
    trials = json.loads(path.read_text())
    tables = []
    for task in sorted({t["task"] for t in trials}):
        rows = [t for t in trials if t["task"] == task]
        metric = "micro_f1" if any("micro_f1" in score_of(t) for t in rows) else "macro_f1"
        best = max(rows, key=lambda t: score_of(t).get(metric, -1))
        tables.append({"name": task, "metric": metric, "second": "exact_match" if metric == "micro_f1" else "accuracy",
                       "rows": [{"label": t["label"], "settings": settings_text(t.get("settings") or {}),
                                 "train": t.get("train", {}), "load_before": t.get("load_before"),
                                 "decoding": "constrained" if "eval_constrained" in t else "free", "score": score_of(t),
                                 "valid": score_of(t).get("valid_json", score_of(t).get("valid_label")),
                                 "note": t.get("note"), "best": t is best} for t in rows]})
    return tables


def settings_text(settings: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items())


def score_of(trial: dict) -> dict:
    """A trial's constrained-decoding scores where it has them (what the pipeline evaluates), else free ones."""
    return trial.get("eval_constrained") or trial.get("eval_free") or {}


def write_report(root: Path, spec: SweepSpec | None, status: dict[str, str] | None = None) -> Path:
    """reports/sweep.html from report/templates/sweep.html.j2 (autoescaped, like the index)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    runs, best, metric_keys = [], None, []
    if spec is not None:
        runs = list(sweep_rows(root, spec, status if status is not None else queue_status(root)).values())
        best = best_run(runs, spec)
        metric_file = spec.metric.split(":", 1)[0]
        metric_keys = sorted({k for r in runs for k in r.metrics if k.startswith(metric_file + ":")},
                             key=lambda k: (k != spec.metric, k))
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "report" / "templates"),
                      autoescape=select_autoescape(["html.j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["cell"] = cell
    page = env.get_template("sweep.html.j2").render(spec=spec, runs=runs, best=best, metric_keys=metric_keys,
                                                    trials=trial_tables(root), trials_file=TRIALS)
    out = root / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def main(report_only: bool = False, dry_run: bool = False, jobs: int = 1) -> int:
    root = repo_root()
    params = load_params(root / "params.yaml")
    if dry_run:
        spec = require_sweep(params)
        check_points(params, spec)
        for cmd in queue_commands(spec):
            print(shlex.join(cmd))
        return 0
    if report_only:
        print(f"wrote {write_report(root, params.sweep)}")
        return 0
    print(f"wrote {run_sweep(root, jobs)}")
    return 0
