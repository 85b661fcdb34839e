"""Task metrics, shared by every stage that scores model outputs (evaluation, GGUF parity, drift).

What each output kind measures lives with the kind (core/kinds): its per-row counts and the metrics made from
their sums. All rates are fractions in [0, 1]; every result is plain JSON-serialisable Python.

Intervals (bootstrap_interval, paired_difference): how far a metric would move on another draw of test rows, so that
gates decide on significant differences, not on the noise of a few rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tuneforge.core.kinds.base import FromTotals

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tuneforge.core.params import TaskSpec


def confusion_figure(confusion: dict, title: str = "") -> Figure:
    """A labelled heatmap of a label task's `confusion` (kinds/label.py), with the counts in the cells."""
    # Imported here: the scoring stages never draw, and pyplot is slow to import and picks a backend.
    # pyplot (not a bare Figure) so that notebooks can show the figure with plt.show().
    import matplotlib.pyplot as plt
    import numpy as np

    rows, columns = confusion["labels"], confusion["columns"]
    matrix = np.asarray(confusion["matrix"], dtype=int)
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 0.9 * len(rows) + 1.5))
    ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("answered")
    ax.set_ylabel("expected")
    # White text on the dark half of the colour map keeps every count readable.
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _inputs_and_references(task: TaskSpec, records: list[dict]) -> tuple[list[str], list[str]]:
    return [task.output.input_text(r) for r in records], [task.output.reference(r) for r in records]


def score_outputs(task: TaskSpec, records: list[dict], outputs: list[str]) -> dict:
    """The task kind's metrics of outputs on records (core/kinds), valid_answer among them: the share of answers that
    fit the task's output contract (answer_problem, as drift judges served answers)."""
    return task.output.score(*_inputs_and_references(task, records), outputs)


# --- Intervals: a paired percentile bootstrap over test rows ---

CONFIDENCE = 0.95
# 1,000 resamples: measured on 141 address rows, each end of micro-F1's interval (width 0.075) moves by 0.0015 (sd over
# 30 seeds; 2,000 gave 0.0010), and one interval takes ~16 ms on the 2-core CPU (tests/test_baseline.py keeps it fast).
BOOTSTRAP_RESAMPLES = 1000
# Fixed: every run, clone and machine draws the same resampled rows, so an interval moves only when the answers do.
BOOTSTRAP_SEED = 0


def ci_key(name: str) -> str:
    """The metrics-JSON key of a metric's interval: <name>_ci."""
    return f"{name}_ci"


@dataclass(frozen=True)
class Interval:
    """A metric's estimate on the test rows and its bootstrap interval [low, high] at CONFIDENCE.

    In a metrics JSON it is two keys, `<name>: estimate` and `<name>_ci: [low, high]`: to_metrics writes them and
    from_metrics reads them, so every stage, report and check shares the one shape.
    """

    estimate: float
    low: float
    high: float

    def __neg__(self) -> Interval:
        """The interval of minus the metric: a drop from a difference."""
        return Interval(0.0 - self.estimate, 0.0 - self.high, 0.0 - self.low)  # 0.0 - x: no -0.0 to print

    def to_metrics(self, name: str) -> dict:
        return {name: self.estimate, ci_key(name): [self.low, self.high]}

    @classmethod
    def from_metrics(cls, metrics: dict, name: str) -> Interval | None:
        """None when the metric or its interval is missing (metrics written before intervals were)."""
        estimate, bounds = metrics.get(name), metrics.get(ci_key(name))
        if estimate is None or not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
            return None
        return cls(estimate, *bounds)

    def bounds(self, form: Callable[[float], str] = "{:.3f}".format) -> str:
        """"95% CI 0.742–0.831"; "95% CI -0.061 to +0.000" between signed ends, where a dash would read as a minus."""
        low, high = form(self.low), form(self.high)
        return f"{CONFIDENCE:.0%} CI {low}{' to ' if low[0] in '+-' else '–'}{high}"

    def describe(self, form: Callable[[float], str] = "{:.3f}".format) -> str:
        """"0.787 (95% CI 0.742–0.831)"."""
        return f"{form(self.estimate)} ({self.bounds(form)})"


def _from_totals(task: TaskSpec, metric: str) -> FromTotals:
    functions = task.output.metric_functions()
    if metric not in functions:
        raise ValueError(f"no bootstrap for {metric!r} on a {task.output.kind} task (one of {sorted(functions)})")
    return functions[metric]


def metric_on_rows(task: TaskSpec, records: list[dict], outputs: list[str], metric: str,
                   rows: np.ndarray) -> np.ndarray:
    """The metric on each resample of the rows: `rows` holds one row of record indices a resample."""
    return _from_totals(task, metric)(task.output.totals(*_inputs_and_references(task, records), outputs, rows))


def _estimate(task: TaskSpec, records: list[dict], outputs: list[str], metric: str) -> float:
    """The metric on all rows, each once (score_outputs' value)."""
    return float(metric_on_rows(task, records, outputs, metric, np.arange(len(records))[None, :])[0])


def _resampled_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) record indices drawn with replacement: the same for every model scored on the same n rows."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    """The CONFIDENCE percentile interval of the resampled values."""
    low, high = np.quantile(values, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(low), float(high)


def bootstrap_interval(task: TaskSpec, records: list[dict], outputs: list[str], metric: str, *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """One model's metric (score_outputs' value) and its percentile bootstrap interval over the test rows."""
    estimate = _estimate(task, records, outputs, metric)
    if not records:  # nothing to resample
        return Interval(estimate, estimate, estimate)
    values = metric_on_rows(task, records, outputs, metric, _resampled_rows(len(records), resamples, seed))
    return Interval(estimate, *_percentiles(values))


def paired_difference(task: TaskSpec, records: list[dict], outputs_a: list[str], outputs_b: list[str], metric: str, *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """metric(a) - metric(b) on the same records, and its paired percentile bootstrap interval: each resample scores
    both models on the same drawn rows, so what the rows share (easy or hard inputs) cancels out of the difference."""
    estimate = _estimate(task, records, outputs_a, metric) - _estimate(task, records, outputs_b, metric)
    if not records:
        return Interval(estimate, estimate, estimate)
    rows = _resampled_rows(len(records), resamples, seed)
    values = (metric_on_rows(task, records, outputs_a, metric, rows)
              - metric_on_rows(task, records, outputs_b, metric, rows))
    return Interval(estimate, *_percentiles(values))
