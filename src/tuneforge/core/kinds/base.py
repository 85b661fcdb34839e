"""The contract every output kind implements: one class a kind, holding its params.yaml settings and every rule
about its answers, so that stages ask the task's kind and never branch on its name.

A kind is a pydantic model (the task's `output:` block) with these methods. Answers travel as strings everywhere
(training records, predictions files, the request log); what a string must be is the kind's `answer_problem`, the
one validity rule that prepare, evaluation, export, drift and serve share.

Metrics are computed from per-row counts (`row_counts`) summed over rows and turned into each scalar metric by the
kind's `METRICS` functions: the point estimate sums every row once, a bootstrap resample sums the drawn rows, so an
interval and its estimate always come from one definition (core.metrics).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
from pydantic import Field

from tuneforge.core.fields import Strict

INVALID = "(invalid)"  # the category of an answer that breaks the kind's contract

# A metric from its counts summed over rows: every array has a leading resample axis (one row when scoring once).
FromTotals = Callable[[dict[str, np.ndarray]], np.ndarray]


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    return np.divide(numerator, denominator, out=np.zeros(np.broadcast(numerator, denominator).shape),
                     where=denominator != 0)


def rate(name: str) -> FromTotals:
    """The share of rows whose count `name` is 1 (valid, exact, ...)."""
    return lambda t: ratio(t[name], t["rows"])


def prf(tp: int, n_predicted: int, n_expected: int) -> tuple[float, float, float]:
    """Precision, recall, F1; 0.0 where a denominator is empty (nothing predicted / expected)."""
    p = tp / n_predicted if n_predicted else 0.0
    r = tp / n_expected if n_expected else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def last(record: dict, role: str) -> dict:
    """The record's last message of a role."""
    return next(m for m in reversed(record["messages"]) if m["role"] == role)


class OutputKind(Strict):
    """A task's `output:` block and its answers' contract. Subclasses set `kind` (a Literal: the registry's key)."""

    kind: str
    constrained: bool = Field(True, description="decode under the grammar of this output kind (evaluation, export, "
                              "serve) where it has one; false: free generation, scored the same way")

    # Words and numbers the reports use. plain_metric: how often the whole answer is right.
    plain_metric: ClassVar[str]
    plain_sentence: ClassVar[str]   # e.g. "gets {share} of the {n} test inputs exactly right"
    answer_noun: ClassVar[str]      # e.g. "JSON object": "check answers before use" in the model card
    baseline_name: ClassVar[str]    # the classical baseline, in words
    METRICS: ClassVar[dict[str, FromTotals]]  # every scalar metric; the first is the default primary metric
    # Metrics where higher is not better (a rate of mistakes, a ratio aiming at 1): reported, never a primary metric,
    # which the gates, the sweep and the weakest slice all rank by.
    NOT_PRIMARY: ClassVar[frozenset[str]] = frozenset()
    # Whether bind() reads how answers are written off the base's chat template (tool_call): then a kind must be
    # bound before its grammar or from_generation is used, and whoever binds needs the base's tokenizer.
    binds_to_template: ClassVar[bool] = False
    # Whether a request (and a record) may hold earlier turns: chat answers a conversation's last user turn;
    # every other kind answers one input, and `tuneforge serve` refuses earlier turns for it.
    multi_turn: ClassVar[bool] = False

    # --- records ---

    def input_text(self, record: dict) -> str:
        """What the answer is about: the last user turn."""
        return last(record, "user")["content"]

    def reference(self, record: dict) -> str:
        """The record's expected answer as a string: its last assistant turn."""
        return last(record, "assistant")["content"]

    def answers(self, messages: list[dict]) -> list[str]:
        """Every assistant turn's answer: each is trained on, so prepare validates each."""
        return [m["content"] for m in messages if m["role"] == "assistant"]

    def canonical_messages(self, messages: list[dict]) -> list[dict]:
        """The record's messages with every answer in canonical form (canonical_answer), as prepare stores them."""
        return [{**m, "content": self.canonical_answer(m["content"])} if m["role"] == "assistant" else m
                for m in messages]

    def bind(self, tokenizer) -> OutputKind:
        """This kind for one tokenizer: a kind whose grammar or parsing depends on how the model's chat template
        writes answers (tool_call) learns it here; stages bind before generating or parsing."""
        return self

    def template_kwargs(self) -> dict:
        """Extra arguments of the chat template (tool_call: tools=)."""
        return {}

    def from_generation(self, text: str) -> str:
        """The answer string of a model's generated text (decoded, special tokens skipped)."""
        return text

    def to_message(self, answer: str) -> dict:
        """The answer as the assistant message of an OpenAI chat completion (what `tuneforge serve` sends back)."""
        return {"role": "assistant", "content": answer}

    def describe(self) -> str:
        """What an answer is, in Markdown for the model card: "answered with <this>"."""
        raise NotImplementedError

    # --- the answer contract ---

    def answer_problem(self, answer: str) -> str:
        """Why an answer does not fit this kind, or '' when it does: the one validity rule."""
        raise NotImplementedError

    def training_problem(self, answer: str) -> str:
        """What a training answer must satisfy beyond answer_problem (prepare asks both), or ''."""
        return ""

    def canonical_answer(self, answer: str) -> str:
        """A valid answer in the one form decoding produces, so that training teaches that form."""
        return answer

    def category(self, answer: str) -> str:
        """A short category of an answer for drift's prediction column (INVALID when it breaks the contract)."""
        return "valid" if not self.answer_problem(answer) else INVALID

    def grammar(self, input_text: str) -> str | None:
        """The GBNF grammar an answer to input_text must match, or None when this kind decodes freely."""
        return None

    def answer_schema(self) -> dict | None:
        """The answer's JSON Schema for clients, when answers are JSON."""
        return None

    # --- scoring ---

    def row_counts(self, inputs: Sequence[str], references: Sequence[str],
                   outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Per row, the counts whose sums give every metric in METRICS (arrays of shape (rows,) or (rows, k));
        "rows" (1 a row) is added by the caller."""
        raise NotImplementedError

    def details(self, inputs: Sequence[str], references: Sequence[str], outputs: Sequence[str]) -> dict:
        """Tables beside the scalar metrics (per key, per label, confusion), for the reports."""
        return {}

    def example_score(self, prediction: str, reference: str, input_text: str) -> float:
        """One number in [0, 1] for one answer, to rank wins and regressions."""
        raise NotImplementedError

    def error_kind(self, prediction: str, reference: str, input_text: str) -> str:
        """A short category for grouping errors in a report; "ok" when right."""
        raise NotImplementedError

    def answer_balance(self, answers: Sequence[str]) -> Counter:
        """What the audit counts across a split's answers (labels, keys, ...)."""
        return Counter()

    # --- the classical baseline ---

    # The types beyond scikit-learn's that the kind's saved classical model may hold: skops loads nothing else
    # (core/router.py), so a tampered file is refused rather than run.
    classical_trusted: ClassVar[tuple[str, ...]] = ()

    def baseline(self, train: list[dict], test: list[dict]) -> list[str]:
        """A model without an LLM, fit on the train records: its answers to the test records."""
        return self.classical_answers(self.fit_classical(train), test)[0]

    def fit_classical(self, train: list[dict], seed: int = 0):
        """The classical model as a fitted scikit-learn estimator, one that can answer beside the fine-tune (saved,
        calibrated, routed to: core/router.py); None where the kind's baseline is a rule without a confidence."""
        return None

    def classical_answers(self, model, records: list[dict]) -> tuple[list[str], list[float]]:
        """The fitted classical model's answers to records and a raw confidence each (higher: surer; calibrated
        on the validation split before any use)."""
        raise NotImplementedError

    # --- derived: the same for every kind ---

    def totals(self, inputs: Sequence[str], references: Sequence[str], outputs: Sequence[str],
               rows: np.ndarray) -> dict[str, np.ndarray]:
        """The row counts summed over each resample (`rows`: one row of record indices a resample)."""
        counts = {"rows": np.ones(len(outputs), dtype=np.int64),
                  "valid_answer": np.asarray([not self.answer_problem(o) for o in outputs], dtype=np.int64),
                  **{k: np.asarray(v) for k, v in self.row_counts(inputs, references, outputs).items()}}
        return {name: c[rows].sum(axis=1) for name, c in counts.items()}

    def metric_functions(self) -> dict[str, FromTotals]:
        """METRICS and valid_answer (the share of answers answer_problem accepts), which every kind has."""
        return {**self.METRICS, "valid_answer": rate("valid_answer")}

    def score(self, inputs: Sequence[str], references: Sequence[str], outputs: Sequence[str]) -> dict:
        """n, every scalar metric over all rows, and the kind's details."""
        t = self.totals(inputs, references, outputs, np.arange(len(outputs))[None, :])
        return {"n": len(outputs), **{name: float(f(t)[0]) for name, f in self.metric_functions().items()},
                **self.details(inputs, references, outputs)}
