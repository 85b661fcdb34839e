"""`tuneforge sweep`: DVC experiments over the settings in params.yaml's `sweep` section, and a page comparing them.

    params.yaml sweep -> one `dvc exp run --queue -n <name>-<i> -S key=value ... <targets>` per combination
    -> `dvc exp run --run-all` (starts the queue's worker, waits for every queued experiment)
    -> `dvc exp show --json` -> reports/sweep.html: every run's settings and metrics, the best highlighted

Each experiment runs in DVC's temporary workspace, so the checkout is untouched; `dvc exp apply <best>`
brings the winner's params (and outputs) into it. Recipe trials recorded in benchmarks/recipe_trials.json
(short trainings on this CPU, see benchmarks/recipe_trials.py) are summarised on the same page.
"""

from __future__ import annotations

import html
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

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:80rem;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}
td.l,th.l{text-align:left}
tr.best td{background:#dff5dd;font-weight:600}
tr.failed td{color:#a00}
code,pre{background:#f6f6f6;padding:.1rem .3rem}
.note{color:#555;font-size:.9rem}
"""


def fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return html.escape(json.dumps(value))
    return html.escape(str(value))


def sweep_table(runs: list[Run], spec: SweepSpec, best: Run | None) -> str:
    metric_file = spec.metric.split(":", 1)[0]
    metric_keys = sorted({k for r in runs for k in r.metrics if k.startswith(metric_file + ":")},
                         key=lambda k: (k != spec.metric, k))
    head = ["experiment", "status", *spec.settings, *(k.split(":", 1)[1] for k in metric_keys)]
    lines = ["<table><tr>" + "".join(f'<th class="l">{html.escape(h)}</th>' if i < 2 else f"<th>{html.escape(h)}</th>"
                                      for i, h in enumerate(head)) + "</tr>"]
    for run in runs:
        css = "best" if best is not None and run.name == best.name else ("" if run.ok else "failed")
        cells = [f'<td class="l">{html.escape(run.name)}</td>', f'<td class="l">{html.escape(run.status)}</td>']
        cells += [f"<td>{fmt(run.settings.get(k))}</td>" for k in spec.settings]
        cells += [f"<td>{fmt(run.metrics.get(k))}</td>" for k in metric_keys]
        lines.append(f'<tr class="{css}">' + "".join(cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def trials_section(root: Path) -> str:
    """benchmarks/recipe_trials.json: the short CPU trials the default recipe was chosen from."""
    path = root / TRIALS
    if not path.exists():
        return ""
    trials = json.loads(path.read_text())
    parts = ["<h2>Recipe trials on this CPU</h2>",
             "<p class='note'>Short trainings through the training stage's <code>train_task</code>, scored on the first "
             "test rows (<code>python benchmarks/recipe_trials.py</code>; raw rows in "
             f"<code>{TRIALS}</code>). Wall times ran on a shared 2-core machine: read them with the load average. "
             "The best trial of each task by its primary metric is highlighted.</p>"]
    for task in sorted({t["task"] for t in trials}):
        rows = [t for t in trials if t["task"] == task]
        metric = "micro_f1" if any("micro_f1" in score_of(t) for t in rows) else "macro_f1"
        second = "exact_match" if metric == "micro_f1" else "accuracy"
        best = max(rows, key=lambda t: score_of(t).get(metric, -1))
        parts.append(f"<h3>{html.escape(task)}</h3><table><tr><th class='l'>trial</th><th class='l'>settings</th>"
                     "<th>steps</th><th>tokens</th><th>tokens/s</th><th>train s</th><th>load</th><th>best eval loss</th>"
                     f"<th>decoding</th><th>rows</th><th>{metric}</th><th>{second}</th><th>valid</th></tr>")
        for t in rows:
            score, tr = score_of(t), t.get("train", {})
            valid = score.get("valid_json", score.get("valid_label"))
            css = ' class="best"' if t is best else ""
            parts.append(
                f"<tr{css}><td class='l'>{html.escape(t['label'])}</td><td class='l'>{settings_text(t.get('settings') or {})}</td>"
                f"<td>{fmt(tr.get('steps'))}</td><td>{fmt(tr.get('tokens_seen'))}</td>"
                f"<td>{fmt(tr.get('tokens_per_second'))}</td><td>{fmt(tr.get('wall_seconds'))}</td>"
                f"<td>{fmt(t.get('load_before'))}</td><td>{fmt(tr.get('best_eval_loss'))}</td>"
                f"<td>{'constrained' if 'eval_constrained' in t else 'free'}</td><td>{fmt(score.get('rows'))}</td>"
                f"<td>{fmt(score.get(metric))}</td><td>{fmt(score.get(second))}</td><td>{fmt(valid)}</td></tr>")
            if t.get("note"):
                parts.append(f"<tr><td></td><td class='l' colspan='12'><span class='note'>{html.escape(t['note'])}</span></td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def settings_text(settings: dict) -> str:
    return html.escape(", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()))


def score_of(trial: dict) -> dict:
    """A trial's constrained-decoding scores where it has them (what the pipeline evaluates), else free ones."""
    return trial.get("eval_constrained") or trial.get("eval_free") or {}


def write_report(root: Path, spec: SweepSpec | None, status: dict[str, str] | None = None) -> Path:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tuneforge sweep</title>",
             f"<style>{STYLE}</style></head><body><h1>Sweep</h1>"]
    if spec is not None:
        runs = list(sweep_rows(root, spec, status if status is not None else queue_status(root)).values())
        best = best_run(runs, spec)
        how = f"{spec.method}" + (f", {spec.samples} samples, seed {spec.seed}" if spec.method == "random" else "")
        parts.append(f"<p>{len(runs)} experiment(s) named <code>{html.escape(spec.name)}-&lt;i&gt;</code> ({how}) over "
                     f"{', '.join(f'<code>{html.escape(k)}</code>' for k in spec.settings)}; each ran "
                     f"<code>dvc exp run {html.escape(' '.join(spec.targets) or '(all stages)')}</code>. "
                     f"Best by <code>{html.escape(spec.metric)}</code> "
                     f"({'higher' if spec.higher_is_better else 'lower'} is better): "
                     f"<b>{html.escape(best.name) if best else 'none finished'}</b>.</p>")
        if runs:
            parts.append(sweep_table(runs, spec, best))
        else:
            parts.append("<p class='note'>None of this sweep's experiments exist in this repository yet: "
                         "<code>tuneforge sweep</code> runs them, one after the other (each trains and evaluates its "
                         "targets, so expect the targets' usual time per combination).</p>")
        if best is not None:
            parts.append("<h2>Adopt the best</h2><pre>"
                         f"dvc exp apply {html.escape(best.name)}   # its params.yaml and outputs into the workspace\n"
                         "dvc repro                      # the stages the sweep did not run\n"
                         "git add -A && git commit -m 'recipe from sweep'</pre>")
    parts.append(trials_section(root))
    parts.append("<p class='note'>Rebuild this page: <code>tuneforge sweep</code> (runs the sweep) or "
                 "<code>tuneforge sweep --report-only</code> (experiments already run).</p></body></html>")
    out = root / REPORT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
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
