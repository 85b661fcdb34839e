"""Task metrics, shared by every stage that scores model outputs (evaluation, GGUF parity, drift).

json_object tasks: the answer must be a JSON object over the task's allowed keys.
label tasks: the answer must be exactly one allowed label (case-sensitive, surrounding whitespace ignored).
All rates are fractions in [0, 1].
"""

from __future__ import annotations

import json
import re
from collections import Counter

INVALID = "(invalid)"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def parse_object(text: str) -> dict | None:
    """The answer as a dict, tolerating a ```json fence; None when it is not a JSON object."""
    text = text.strip()
    if m := _FENCE.match(text):
        text = m.group(1)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _norm(value) -> str:
    return " ".join(str(value).split())


def _pairs(obj: dict | None) -> set[tuple[str, str]]:
    return {(k, _norm(v)) for k, v in (obj or {}).items()}


def _f1(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _hallucinated(value, input_text: str) -> bool:
    return _norm(value).lower() not in _norm(input_text).lower()


def score_json_object(predictions: list[str], references: list[str], inputs: list[str], allowed_keys) -> dict:
    allowed = set(allowed_keys)
    n = len(predictions)
    valid = allowed_only = exact = 0
    tp_key: Counter[str] = Counter()
    pred_key: Counter[str] = Counter()
    true_key: Counter[str] = Counter()
    values = hallucinated = 0
    for pred_text, ref_text, input_text in zip(predictions, references, inputs):
        pred, ref = parse_object(pred_text), parse_object(ref_text) or {}
        if pred is not None:
            valid += 1
            allowed_only += set(pred) <= allowed
            exact += _pairs(pred) == _pairs(ref)
            for v in pred.values():
                values += 1
                hallucinated += _hallucinated(v, input_text)
        p_pairs, r_pairs = _pairs(pred), _pairs(ref)
        for k, _ in p_pairs:
            pred_key[k] += 1
        for k, _ in r_pairs:
            true_key[k] += 1
        for k, _ in p_pairs & r_pairs:
            tp_key[k] += 1
    per_key = {}
    for key in sorted(set(pred_key) | set(true_key)):
        p, r, f = _f1(tp_key[key], pred_key[key], true_key[key])
        per_key[key] = {"precision": p, "recall": r, "f1": f, "support": true_key[key]}
    mp, mr, mf = _f1(sum(tp_key.values()), sum(pred_key.values()), sum(true_key.values()))
    return {
        "n": n,
        "valid_json": valid / n if n else 0.0,
        "allowed_keys_only": allowed_only / n if n else 0.0,
        "exact_match": exact / n if n else 0.0,
        "micro_precision": mp, "micro_recall": mr, "micro_f1": mf,
        "hallucination_rate": hallucinated / values if values else 0.0,
        "per_key": per_key,
    }


def score_label(predictions: list[str], references: list[str], labels) -> dict:
    """Also returns `per_label` {label: precision, recall, f1, support} and `confusion`:
    {"labels": reference labels (rows), "columns": labels + ["(invalid)"], "matrix": counts [row][column]}."""
    labels = list(labels)
    n = len(predictions)
    cleaned = [p.strip() if p.strip() in labels else INVALID for p in predictions]
    columns = labels + [INVALID]
    matrix = [[0] * len(columns) for _ in labels]
    for pred, ref in zip(cleaned, references):
        if ref in labels:
            matrix[labels.index(ref)][columns.index(pred)] += 1
    per_label = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        p, r, f = _f1(tp, sum(row[i] for row in matrix), sum(matrix[i]))
        per_label[label] = {"precision": p, "recall": r, "f1": f, "support": sum(matrix[i])}
    correct = sum(p == r for p, r in zip(cleaned, references))
    return {
        "n": n,
        "valid_label": sum(p != INVALID for p in cleaned) / n if n else 0.0,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(labels),
        "per_label": per_label,
        "confusion": {"labels": labels, "columns": columns, "matrix": matrix},
    }


def score(kind: str, predictions: list[str], references: list[str], inputs: list[str], *,
          allowed_keys=(), labels=()) -> dict:
    if kind == "json_object":
        return score_json_object(predictions, references, inputs, allowed_keys)
    if kind == "label":
        return score_label(predictions, references, labels)
    raise ValueError(f"unknown output kind {kind!r}")


def example_score(kind: str, prediction: str, reference: str, input_text: str, *, allowed_keys=(), labels=()) -> float:
    """One number per example for ranking wins and regressions: pair F1 (JSON) or correctness (label)."""
    if kind == "label":
        return float(prediction.strip() == reference and reference in labels)
    pred, ref = _pairs(parse_object(prediction)), _pairs(parse_object(reference))
    return _f1(len(pred & ref), len(pred), len(ref))[2]


def error_kind(kind: str, prediction: str, reference: str, input_text: str, *, allowed_keys=(), labels=()) -> str:
    """The first problem that applies, for grouping errors in a report; "ok" when right."""
    if not prediction.strip():
        return "empty output"
    if kind == "label":
        if prediction.strip() not in labels:
            return "not an allowed label"
        return "ok" if prediction.strip() == reference else "wrong label"
    text = prediction.strip()
    if m := _FENCE.match(text):
        text = m.group(1)
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return "invalid JSON"
    if not isinstance(obj, dict):
        return "not a JSON object"
    ref = parse_object(reference) or {}
    if set(obj) - set(allowed_keys):
        return "extra keys"
    if _pairs(obj) == _pairs(ref):
        return "ok"
    if any(_hallucinated(v, input_text) for v in obj.values()):
        return "hallucinated value"
    if set(ref) - set(obj):
        return "missing keys"
    if set(obj) - set(ref):
        return "extra keys"
    return "wrong values"


def confusion_figure(confusion: dict, title: str = ""):
    """A labelled heatmap of score_label's confusion matrix, counts in the cells."""
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(confusion["matrix"])
    fig, ax = plt.subplots(figsize=(1.2 * len(confusion["columns"]) + 2, 0.9 * len(confusion["labels"]) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(confusion["columns"])), confusion["columns"])
    ax.set_yticks(range(len(confusion["labels"])), confusion["labels"])
    ax.set_xlabel("predicted"); ax.set_ylabel("expected")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig
