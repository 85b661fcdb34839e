"""label: the answer is exactly one of the task's labels (classification)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from tuneforge.core.fields import ExactName, distinct_names
from tuneforge.core.kinds.base import INVALID, OutputKind, prf, rate, ratio
from tuneforge.core.kinds.gbnf import gbnf_literal


def _macro_f1(t: dict[str, np.ndarray]) -> np.ndarray:
    labels = [name.removeprefix("tp:") for name in t if name.startswith("tp:")]
    # F1 = 2pr / (p + r) = 2 tp / (predicted + expected) wherever it is not 0.
    return np.mean([ratio(2 * t[f"tp:{label}"], t[f"predicted:{label}"] + t[f"expected:{label}"])
                    for label in labels], axis=0)


class LabelOutput(OutputKind):
    kind: Literal["label"]
    labels: list[ExactName] = Field(description="the exact answers allowed")

    plain_metric: ClassVar[str] = "accuracy"
    plain_sentence: ClassVar[str] = "labels {share} of the {n} test inputs correctly"
    answer_noun: ClassVar[str] = "label"
    baseline_name: ClassVar[str] = "TF-IDF (word 1-2-grams + char 2-5-grams) + logistic regression"
    METRICS: ClassVar = {"macro_f1": _macro_f1, "accuracy": rate("correct"), "valid_label": rate("valid_label")}

    @model_validator(mode="after")
    def _two_distinct_labels(self) -> LabelOutput:
        if len(self.labels) < 2:
            raise ValueError("output.kind label needs output.labels with at least two labels")
        distinct_names("output.labels", self.labels)
        return self

    def describe(self) -> str:
        return "exactly one of the labels `" + "`, `".join(self.labels) + "`."

    def answer_problem(self, answer: str) -> str:
        return "" if answer in self.labels else f"unknown label {answer!r} (allowed: {self.labels})"

    def label_of(self, prediction: str) -> str:
        """The allowed label the answer is (surrounding whitespace ignored), else INVALID."""
        answer = prediction.strip()
        return answer if answer in self.labels else INVALID

    def category(self, answer: str) -> str:
        return self.label_of(answer)

    def grammar(self, input_text: str) -> str | None:
        return "root ::= " + " | ".join(gbnf_literal(label) for label in self.labels) + "\n"

    def answer_schema(self) -> dict:
        return {"type": "string", "enum": list(self.labels)}

    def _checked(self, references: Sequence[str]) -> None:
        if unknown := sorted(set(references) - set(self.labels)):
            raise ValueError(f"references outside the allowed labels: {unknown}")

    def row_counts(self, inputs, references, outputs) -> dict[str, np.ndarray]:
        self._checked(references)
        answers = [self.label_of(o) for o in outputs]
        counts = {"valid_label": [a != INVALID for a in answers],
                  "correct": [a == r for a, r in zip(answers, references, strict=True)]}
        for label in self.labels:  # the confusion matrix, one row at a time
            counts[f"tp:{label}"] = [a == r == label for a, r in zip(answers, references, strict=True)]
            counts[f"predicted:{label}"] = [a == label for a in answers]
            counts[f"expected:{label}"] = [r == label for r in references]
        return {name: np.asarray(v, dtype=np.int64) for name, v in counts.items()}

    def details(self, inputs, references, outputs) -> dict:
        """per_label {label: {precision, recall, f1, support}} and confusion:

            {"labels": [reference labels: the rows],
             "columns": [the labels, then "(invalid)" for answers that are no allowed label],
             "matrix": [[count of (row label expected, column answered)] for each row]}
        """
        self._checked(references)
        labels, columns = list(self.labels), [*self.labels, INVALID]
        matrix = [[0] * len(columns) for _ in labels]
        for prediction, reference in zip(outputs, references, strict=True):
            matrix[labels.index(reference)][columns.index(self.label_of(prediction))] += 1
        per_label = {}
        for i, label in enumerate(labels):
            support = sum(matrix[i])
            p, r, f = prf(matrix[i][i], sum(row[i] for row in matrix), support)
            per_label[label] = {"precision": p, "recall": r, "f1": f, "support": support}
        return {"per_label": per_label, "confusion": {"labels": labels, "columns": columns, "matrix": matrix}}

    def example_score(self, prediction: str, reference: str, input_text: str) -> float:
        return float(self.label_of(prediction) == reference)

    def error_kind(self, prediction: str, reference: str, input_text: str) -> str:
        if not prediction.strip():
            return "empty output"
        answer = self.label_of(prediction)
        if answer == INVALID:
            return "not an allowed label"
        return "ok" if answer == reference else "wrong label"

    def answer_balance(self, answers: Sequence[str]) -> Counter:
        return Counter(answers)

    def fit_classical(self, train: list[dict], seed: int = 0):
        """TF-IDF over word 1-2-grams and character 2-5-grams, then logistic regression."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union

        model = make_pipeline(
            make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                       TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
            LogisticRegression(C=10, max_iter=2000, random_state=seed))  # C=10: TF-IDF features are small and many
        return model.fit([self.input_text(r) for r in train], [self.reference(r) for r in train])

    def classical_answers(self, model, records: list[dict]) -> tuple[list[str], list[float]]:
        """The most probable label and its probability."""
        if not records:
            return [], []
        proba = model.predict_proba([self.input_text(r) for r in records])
        best = proba.argmax(axis=1)
        return [str(model.classes_[i]) for i in best], proba.max(axis=1).tolist()
