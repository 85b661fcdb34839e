"""Task metrics, shared by every stage that scores model outputs (evaluation, GGUF parity, drift).

json_object tasks: the answer must be a JSON object over the task's allowed keys.
label tasks: the answer must be exactly one allowed label (case-sensitive, surrounding whitespace ignored).
All rates are fractions in [0, 1]; every result is plain JSON-serialisable Python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

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


def score_outputs(task: TaskSpec, records: list[dict], outputs: list[str]) -> dict:
    """score() for a task's records (user turn = input, last turn = reference), plus valid_answer: the share of
    answers that fit the task's output contract (outputs.answer_problem, as drift judges served answers)."""
    inputs = [r["messages"][-2]["content"] for r in records]
    references = [r["messages"][-1]["content"] for r in records]
    scores = score(task.output.kind, outputs, references, inputs,
                   allowed_keys=task.output.allowed_keys, labels=task.output.labels)
    return {**scores, "valid_answer": _rate(sum(not answer_problem(o, task.output) for o in outputs), len(outputs))}
