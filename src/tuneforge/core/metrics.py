"""Task metrics, shared by every stage that scores model outputs (evaluation, GGUF parity, drift).

json_object tasks: the answer must be a JSON object over the task's allowed keys.
label tasks: the answer must be exactly one allowed label (case-sensitive, surrounding whitespace ignored).
All rates are fractions in [0, 1]; every result is plain JSON-serialisable Python.

Intervals (bootstrap_interval, paired_difference): how far a metric would move on another draw of test rows, so that
gates decide on significant differences, not on the noise of a few rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tuneforge.core.outputs import INVALID, KINDS, answer_problem, decode_json, parse_object

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from tuneforge.core.params import TaskSpec


def _reference(text: str) -> dict:
    # prepare validates references, so a bad one here is a caller bug: fail loudly rather than score 0.
    obj = parse_object(text)
    if obj is None:
        raise ValueError(f"reference is not a JSON object: {text!r}")
    return obj


def _norm(value: object) -> str:
    """str() with whitespace collapsed, so 123 == "123" and " Main  St" == "Main St"."""
    return " ".join(str(value).split())


def _pairs(obj: dict | None) -> set[tuple[str, str]]:
    return {(k, _norm(v)) for k, v in (obj or {}).items()}


def _in_input(value: object, input_text: str) -> bool:
    return _norm(value).casefold() in _norm(input_text).casefold()


def _prf(tp: int, n_predicted: int, n_expected: int) -> tuple[float, float, float]:
    """Precision, recall, F1; 0.0 where a denominator is empty (nothing predicted / expected)."""
    p = tp / n_predicted if n_predicted else 0.0
    r = tp / n_expected if n_expected else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _rate(count: int, n: int) -> float:
    return count / n if n else 0.0


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r} (expected one of {KINDS})")


def score_json_object(predictions: Sequence[str], references: Sequence[str], inputs: Sequence[str],
                      allowed_keys: Sequence[str]) -> dict:
    """n, valid_json, allowed_keys_only, exact_match, micro_precision/recall/f1 over (key, value) pairs,
    hallucination_rate, and per_key {allowed key: {precision, recall, f1, support}}.

    Invalid output predicts no pairs. Pairs under disallowed keys count as false positives in the micro
    scores but get no per_key row, so the table keeps the task's schema whatever the model invents.
    """
    allowed = set(allowed_keys)
    valid = allowed_only = exact = values = hallucinated = 0
    tp: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    expected: Counter[str] = Counter()
    for pred_text, ref_text, input_text in zip(predictions, references, inputs, strict=True):
        pred, ref = parse_object(pred_text), _reference(ref_text)
        pred_pairs, ref_pairs = _pairs(pred), _pairs(ref)
        if pred is not None:
            valid += 1
            allowed_only += set(pred) <= allowed
            exact += pred_pairs == ref_pairs
            values += len(pred)
            hallucinated += sum(not _in_input(v, input_text) for v in pred.values())
        predicted.update(k for k, _ in pred_pairs)
        expected.update(k for k, _ in ref_pairs)
        tp.update(k for k, _ in pred_pairs & ref_pairs)
    per_key = {}
    for key in allowed_keys:
        p, r, f = _prf(tp[key], predicted[key], expected[key])
        per_key[key] = {"precision": p, "recall": r, "f1": f, "support": expected[key]}
    micro_p, micro_r, micro_f = _prf(sum(tp.values()), sum(predicted.values()), sum(expected.values()))
    n = len(predictions)
    return {
        "n": n,
        "valid_json": _rate(valid, n),
        "allowed_keys_only": _rate(allowed_only, n),
        "exact_match": _rate(exact, n),
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": micro_f,
        "hallucination_rate": _rate(hallucinated, values),
        "per_key": per_key,
    }


def _answer_label(prediction: str, labels: Sequence[str]) -> str:
    """The allowed label the answer is (surrounding whitespace ignored), else INVALID."""
    answer = prediction.strip()
    return answer if answer in labels else INVALID


def score_label(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> dict:
    """n, valid_label, accuracy, macro_f1 (over `labels`; invalid answers count as wrong),
    per_label {label: {precision, recall, f1, support}} and confusion:

        {"labels": [reference labels: the rows],
         "columns": [the labels, then "(invalid)" for answers that are no allowed label],
         "matrix": [[count of (row label expected, column answered)] for each row]}
    """
    labels = list(labels)
    if not labels:
        raise ValueError("a label task needs at least one label")
    if unknown := sorted(set(references) - set(labels)):
        raise ValueError(f"references outside the allowed labels: {unknown}")
    columns = [*labels, INVALID]
    matrix = [[0] * len(columns) for _ in labels]
    for prediction, reference in zip(predictions, references, strict=True):
        matrix[labels.index(reference)][columns.index(_answer_label(prediction, labels))] += 1
    per_label = {}
    for i, label in enumerate(labels):
        support = sum(matrix[i])
        p, r, f = _prf(matrix[i][i], sum(row[i] for row in matrix), support)
        per_label[label] = {"precision": p, "recall": r, "f1": f, "support": support}
    n = len(predictions)
    return {
        "n": n,
        "valid_label": _rate(n - sum(row[-1] for row in matrix), n),
        "accuracy": _rate(sum(matrix[i][i] for i in range(len(labels))), n),
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(labels),
        "per_label": per_label,
        "confusion": {"labels": labels, "columns": columns, "matrix": matrix},
    }


def score(kind: str, predictions: Sequence[str], references: Sequence[str], inputs: Sequence[str], *,
          allowed_keys: Sequence[str] = (), labels: Sequence[str] = ()) -> dict:
    """The aggregate metrics of a task kind ("json_object" or "label"), plus "n"."""
    _check_kind(kind)
    if kind == "label":
        return score_label(predictions, references, labels)
    return score_json_object(predictions, references, inputs, allowed_keys)


def example_score(kind: str, prediction: str, reference: str, input_text: str, *,
                  allowed_keys: Sequence[str] = (), labels: Sequence[str] = ()) -> float:
    """One number in [0, 1] per example, for ranking wins and regressions: the F1 of the example's
    (key, value) pairs (0 when invalid) for json_object, correctness for label."""
    _check_kind(kind)
    if kind == "label":
        return float(_answer_label(prediction, labels) == reference)
    pred = parse_object(prediction)
    if pred is None:
        return 0.0
    pred_pairs, ref_pairs = _pairs(pred), _pairs(_reference(reference))
    if pred_pairs == ref_pairs:  # also right when both are empty, where F1 is undefined
        return 1.0
    return _prf(len(pred_pairs & ref_pairs), len(pred_pairs), len(ref_pairs))[2]


def error_kind(kind: str, prediction: str, reference: str, input_text: str, *,
               allowed_keys: Sequence[str] = (), labels: Sequence[str] = ()) -> str:
    """A short category for grouping errors in a report; "ok" when right.

    Format failures come first (empty, unparsable, not an object, keys outside the schema), then
    content: a value absent from the input outranks missing keys, extra keys and plain wrong values,
    since inventing text is the worst content error.
    """
    _check_kind(kind)
    if not prediction.strip():
        return "empty output"
    if kind == "label":
        answer = _answer_label(prediction, labels)
        if answer == INVALID:
            return "not an allowed label"
        return "ok" if answer == reference else "wrong label"
    try:
        obj = decode_json(prediction)
    except ValueError:
        return "invalid JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    ref = _reference(reference)
    if not set(obj) <= set(allowed_keys):
        return "extra keys"
    if _pairs(obj) == _pairs(ref):
        return "ok"
    if not all(_in_input(v, input_text) for v in obj.values()):
        return "hallucinated value"
    if set(ref) - set(obj):
        return "missing keys"
    if set(obj) - set(ref):
        return "extra keys"
    return "wrong values"


def confusion_figure(confusion: dict, title: str = "") -> Figure:
    """A labelled heatmap of score_label's `confusion`, with the counts in the cells."""
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


def _inputs_and_references(records: list[dict]) -> tuple[list[str], list[str]]:
    """The user turn and the last (reference) turn of each record."""
    return [r["messages"][-2]["content"] for r in records], [r["messages"][-1]["content"] for r in records]


def score_outputs(task: TaskSpec, records: list[dict], outputs: list[str]) -> dict:
    """score() for a task's records (user turn = input, last turn = reference), plus valid_answer: the share of
    answers that fit the task's output contract (outputs.answer_problem, as drift judges served answers)."""
    inputs, references = _inputs_and_references(records)
    scores = score(task.output.kind, outputs, references, inputs,
                   allowed_keys=task.output.allowed_keys, labels=task.output.labels)
    return {**scores, "valid_answer": _rate(sum(not answer_problem(o, task.output) for o in outputs), len(outputs))}


# The plain-language measure of each output kind: how often the whole answer is right.
PLAIN_METRICS = {"json_object": "exact_match", "label": "accuracy"}

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


def _row_counts(task: TaskSpec, records: list[dict], outputs: list[str]) -> dict[str, np.ndarray]:
    """Per test row, the counts whose sums over rows give each scalar metric of score_outputs (_FROM_TOTALS):
    resampling rows is then resampling these counts, without scoring every resample from text."""
    inputs, references = _inputs_and_references(records)
    counts: dict[str, list] = {"rows": [1] * len(outputs),
                               "valid_answer": [not answer_problem(o, task.output) for o in outputs]}
    if task.output.kind == "label":
        labels = list(task.output.labels)
        answers = [_answer_label(o, labels) for o in outputs]
        counts["valid_label"] = [a != INVALID for a in answers]
        counts["correct"] = [a == r for a, r in zip(answers, references, strict=True)]
        for label in labels:  # score_label's confusion matrix, one row at a time
            counts[f"tp:{label}"] = [a == r == label for a, r in zip(answers, references, strict=True)]
            counts[f"predicted:{label}"] = [a == label for a in answers]
            counts[f"expected:{label}"] = [r == label for r in references]
    else:
        allowed = set(task.output.allowed_keys)
        for name in ("valid", "allowed_only", "exact", "values", "hallucinated", "tp", "predicted", "expected"):
            counts[name] = []
        for prediction, reference, input_text in zip(outputs, references, inputs, strict=True):
            pred = parse_object(prediction)  # as score_json_object counts them
            pred_pairs, ref_pairs = _pairs(pred), _pairs(_reference(reference))
            counts["valid"].append(pred is not None)
            counts["allowed_only"].append(pred is not None and set(pred) <= allowed)
            counts["exact"].append(pred is not None and pred_pairs == ref_pairs)
            counts["values"].append(len(pred or {}))
            counts["hallucinated"].append(sum(not _in_input(v, input_text) for v in (pred or {}).values()))
            counts["tp"].append(len(pred_pairs & ref_pairs))
            counts["predicted"].append(len(pred_pairs))
            counts["expected"].append(len(ref_pairs))
    return {name: np.asarray(values, dtype=np.int64) for name, values in counts.items()}


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0 (as _prf and _rate)."""
    return np.divide(numerator, denominator, out=np.zeros(np.shape(numerator)), where=denominator != 0)


def _macro_f1(totals: dict[str, np.ndarray]) -> np.ndarray:
    labels = [name.removeprefix("tp:") for name in totals if name.startswith("tp:")]
    # _prf's F1, 2pr / (p + r), is 2 tp / (predicted + expected) wherever it is not 0.
    return np.mean([_ratio(2 * totals[f"tp:{label}"], totals[f"predicted:{label}"] + totals[f"expected:{label}"])
                    for label in labels], axis=0)


# Each scalar metric of score_outputs, by output kind, from its counts summed over (resampled) rows.
_FROM_TOTALS: dict[str, dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]]] = {
    "json_object": {
        "valid_answer": lambda t: _ratio(t["valid_answer"], t["rows"]),
        "valid_json": lambda t: _ratio(t["valid"], t["rows"]),
        "allowed_keys_only": lambda t: _ratio(t["allowed_only"], t["rows"]),
        "exact_match": lambda t: _ratio(t["exact"], t["rows"]),
        "micro_precision": lambda t: _ratio(t["tp"], t["predicted"]),
        "micro_recall": lambda t: _ratio(t["tp"], t["expected"]),
        "micro_f1": lambda t: _ratio(2 * t["tp"], t["predicted"] + t["expected"]),
        "hallucination_rate": lambda t: _ratio(t["hallucinated"], t["values"]),
    },
    "label": {
        "valid_answer": lambda t: _ratio(t["valid_answer"], t["rows"]),
        "valid_label": lambda t: _ratio(t["valid_label"], t["rows"]),
        "accuracy": lambda t: _ratio(t["correct"], t["rows"]),
        "macro_f1": _macro_f1,
    },
}


def _from_totals(task: TaskSpec, metric: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    from_totals = _FROM_TOTALS[task.output.kind].get(metric)
    if from_totals is None:
        raise ValueError(f"no bootstrap for {metric!r} on a {task.output.kind} task "
                         f"(one of {sorted(_FROM_TOTALS[task.output.kind])})")
    return from_totals


def metric_on_rows(task: TaskSpec, records: list[dict], outputs: list[str], metric: str,
                   rows: np.ndarray) -> np.ndarray:
    """The metric on each resample of the rows: `rows` holds one row of record indices a resample."""
    totals = {name: counts[rows].sum(axis=-1) for name, counts in _row_counts(task, records, outputs).items()}
    return _from_totals(task, metric)(totals)


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
    _from_totals(task, metric)  # an unknown metric fails here, before any scoring
    estimate = score_outputs(task, records, outputs)[metric]
    if not records:  # nothing to resample
        return Interval(estimate, estimate, estimate)
    values = metric_on_rows(task, records, outputs, metric, _resampled_rows(len(records), resamples, seed))
    return Interval(estimate, *_percentiles(values))


def paired_difference(task: TaskSpec, records: list[dict], outputs_a: list[str], outputs_b: list[str], metric: str, *,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Interval:
    """metric(a) - metric(b) on the same records, and its paired percentile bootstrap interval: each resample scores
    both models on the same drawn rows, so what the rows share (easy or hard inputs) cancels out of the difference."""
    _from_totals(task, metric)
    estimate = score_outputs(task, records, outputs_a)[metric] - score_outputs(task, records, outputs_b)[metric]
    if not records:
        return Interval(estimate, estimate, estimate)
    rows = _resampled_rows(len(records), resamples, seed)
    values = (metric_on_rows(task, records, outputs_a, metric, rows)
              - metric_on_rows(task, records, outputs_b, metric, rows))
    return Interval(estimate, *_percentiles(values))
