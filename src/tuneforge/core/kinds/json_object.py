"""json_object: a flat JSON object over the task's allowed keys with string values (extraction into named fields).

Constrained decoding: a non-empty object whose keys are output.allowed_keys (any order) and whose values are
strings. With output.extractive each value is a run of the input's own words, in input order (a word may drop its
trailing commas), joined by single spaces; so a value can only be copied from this request's input. Ordered runs
rather than contiguous spans because labelled data joins the tokens of one tag across the address (usaddress:
"Route 30 & Route 45" -> StreetName "30 45"; 86 of 8,836 values in labeled.xml). Keys may repeat (a grammar
cannot forbid that cheaply); json.loads keeps the last value, as scoring does, and prepare refuses such records.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from tuneforge.core.fields import ExactName, distinct_names
from tuneforge.core.kinds.base import OutputKind, prf, rate, ratio
from tuneforge.core.kinds.gbnf import JSON_STRING, gbnf_literal
from tuneforge.core.kinds.json_answers import decode_json, dumps, parse_object, repeated_keys, strict_json


def norm(value: object) -> str:
    """str() with whitespace collapsed, so 123 == "123" and " Main  St" == "Main St"."""
    return " ".join(str(value).split())


def in_input(value: object, input_text: str) -> bool:
    return norm(value).casefold() in norm(input_text).casefold()


def _pairs(obj: dict | None) -> set[tuple[str, str]]:
    return {(k, norm(v)) for k, v in (obj or {}).items()}


def _reference(text: str) -> dict:
    # prepare validates references, so a bad one here is a caller bug: fail loudly rather than score 0.
    obj = parse_object(text)
    if obj is None:
        raise ValueError(f"reference is not a JSON object: {text!r}")
    return obj


def input_words(input_text: str) -> list[list[str]]:
    """The forms each whitespace-separated word of the input may take in a value: itself, and without trailing
    commas (readers strip those: "Memphis," -> "Memphis")."""
    words = []
    for word in input_text.split():
        forms = [word] if word.rstrip(",") in ("", word) else [word, word.rstrip(",")]
        words.append([json.dumps(form, ensure_ascii=False)[1:-1] for form in forms])  # as inside a JSON string
    return words


def _extractive_rules(input_text: str) -> list[str]:
    """value ::= a JSON string of input words in input order.

    s<i> offers each word form that occurs at or after word i, once, leading to the state after its first such
    occurrence: a string of words has one parse (leftmost matching), however often a word repeats. The language
    is the same as "any later word" would give, but the grammar sampler keeps one stack where that kept one per
    repeat (a 600-character "a a a ..." input made llama.cpp spend minutes on a few tokens).
    """
    words = input_words(input_text)
    if not words:
        return [f"value ::= {JSON_STRING}"]
    rules, first = [], {}  # first: form -> index of its first word at or after i
    for i in reversed(range(len(words))):
        first.update({form: i for form in words[i]})
        rules.append(f"s{i} ::= " + " | ".join(
            gbnf_literal(form) + (f' ( " " s{j + 1} )?' if j + 1 < len(words) else "") for form, j in first.items()))
    return ['value ::= "\\"" s0 "\\""', *reversed(rules)]


class JsonObjectOutput(OutputKind):
    kind: Literal["json_object"]
    allowed_keys: list[ExactName] = Field(description="keys the answer may use")
    extractive: bool = Field(False, description="every value is copied from the input (its words, in order), and "
                             "constrained decoding allows only those")

    plain_metric: ClassVar[str] = "exact_match"
    plain_sentence: ClassVar[str] = "gets {share} of the {n} test inputs exactly right"
    answer_noun: ClassVar[str] = "JSON object"
    baseline_name: ClassVar[str] = "linear-SVM word tagger (values copied from the input)"
    NOT_PRIMARY: ClassVar = frozenset({"hallucination_rate"})
    METRICS: ClassVar = {
        "micro_f1": lambda t: ratio(2 * t["tp"], t["predicted"] + t["expected"]),
        "exact_match": rate("exact"),
        "valid_json": rate("valid"),
        "allowed_keys_only": rate("allowed_only"),
        "micro_precision": lambda t: ratio(t["tp"], t["predicted"]),
        "micro_recall": lambda t: ratio(t["tp"], t["expected"]),
        "hallucination_rate": lambda t: ratio(t["hallucinated"], t["values"]),
    }

    @model_validator(mode="after")
    def _keys_given(self) -> JsonObjectOutput:
        if not self.allowed_keys:
            raise ValueError("output.kind json_object needs a non-empty output.allowed_keys list")
        distinct_names("output.allowed_keys", self.allowed_keys)
        return self

    def describe(self) -> str:
        copied = ", each value copied from the input" if self.extractive else ""
        return "a JSON object whose keys are among `" + "`, `".join(self.allowed_keys) + f"`{copied}."

    def answer_problem(self, answer: str) -> str:
        obj, problem = strict_json(answer)
        if problem:
            return problem
        if not isinstance(obj, dict) or not obj:
            return "answer is not a non-empty JSON object"
        extra = sorted(set(obj) - set(self.allowed_keys))
        if extra:
            return f"answer uses keys outside output.allowed_keys: {extra}"
        if not all(isinstance(v, str) for v in obj.values()):
            return "answer values must be strings"
        return ""

    def training_problem(self, answer: str) -> str:
        """json.loads keeps the last of two equal keys; the model would be trained on both. (The grammar cannot
        forbid a repeat cheaply, so a generated answer that repeats a key stays valid and is read as json.loads
        reads it.)"""
        repeated = repeated_keys(answer)
        return f"answer repeats key(s) {repeated}" if repeated else ""

    def canonical_answer(self, answer: str) -> str:
        """json.dumps' default form, as the grammar allows it (no whitespace around the object): an answer wrapped
        in blanks or newlines would teach text that constrained decoding can never emit."""
        return dumps(json.loads(answer))

    def category(self, answer: str) -> str:
        """The set of keys used ("(invalid)" when it does not parse)."""
        obj = parse_object(answer)
        return "+".join(sorted(obj)) if obj is not None else "(invalid)"

    def grammar(self, input_text: str) -> str | None:
        keys = " | ".join(gbnf_literal(json.dumps(key, ensure_ascii=False)) for key in self.allowed_keys)
        rules = [
            # One optional space after ',' and ':' covers json.dumps' default and compact separators alike;
            # unbounded whitespace would let a small model ramble in blanks.
            'root ::= "{" pair ( "," " "? pair )* "}"',
            'pair ::= key ":" " "? value',
            f"key ::= {keys}",
            *(_extractive_rules(input_text) if self.extractive else [f"value ::= {JSON_STRING}"]),
        ]
        return "\n".join(rules) + "\n"

    def answer_schema(self) -> dict:
        return {"type": "object", "properties": {key: {"type": "string"} for key in self.allowed_keys},
                "additionalProperties": False, "minProperties": 1}

    def row_counts(self, inputs, references, outputs) -> dict[str, np.ndarray]:
        """Invalid output predicts no pairs; pairs under disallowed keys count as false positives."""
        allowed = set(self.allowed_keys)
        counts: dict[str, list] = {n: [] for n in ("valid", "allowed_only", "exact", "values", "hallucinated", "tp",
                                                   "predicted", "expected")}
        for prediction, reference, input_text in zip(outputs, references, inputs, strict=True):
            pred = parse_object(prediction)
            pred_pairs, ref_pairs = _pairs(pred), _pairs(_reference(reference))
            counts["valid"].append(pred is not None)
            counts["allowed_only"].append(pred is not None and set(pred) <= allowed)
            counts["exact"].append(pred is not None and pred_pairs == ref_pairs)
            counts["values"].append(len(pred or {}))
            counts["hallucinated"].append(sum(not in_input(v, input_text) for v in (pred or {}).values()))
            counts["tp"].append(len(pred_pairs & ref_pairs))
            counts["predicted"].append(len(pred_pairs))
            counts["expected"].append(len(ref_pairs))
        return {name: np.asarray(v, dtype=np.int64) for name, v in counts.items()}

    def details(self, inputs, references, outputs) -> dict:
        """per_key {allowed key: {precision, recall, f1, support}}: pairs under disallowed keys get no row, so the
        table keeps the task's schema whatever the model invents."""
        tp: Counter[str] = Counter()
        predicted: Counter[str] = Counter()
        expected: Counter[str] = Counter()
        for prediction, reference in zip(outputs, references, strict=True):
            pred_pairs, ref_pairs = _pairs(parse_object(prediction)), _pairs(_reference(reference))
            predicted.update(k for k, _ in pred_pairs)
            expected.update(k for k, _ in ref_pairs)
            tp.update(k for k, _ in pred_pairs & ref_pairs)
        per_key = {}
        for key in self.allowed_keys:
            p, r, f = prf(tp[key], predicted[key], expected[key])
            per_key[key] = {"precision": p, "recall": r, "f1": f, "support": expected[key]}
        return {"per_key": per_key}

    def example_score(self, prediction: str, reference: str, input_text: str) -> float:
        """The F1 of the example's (key, value) pairs (0 when invalid)."""
        pred = parse_object(prediction)
        if pred is None:
            return 0.0
        pred_pairs, ref_pairs = _pairs(pred), _pairs(_reference(reference))
        if pred_pairs == ref_pairs:  # also right when both are empty, where F1 is undefined
            return 1.0
        return prf(len(pred_pairs & ref_pairs), len(pred_pairs), len(ref_pairs))[2]

    def error_kind(self, prediction: str, reference: str, input_text: str) -> str:
        """Format failures first (empty, unparsable, not an object, keys outside the schema), then content: a value
        absent from the input outranks missing keys, extra keys and plain wrong values, since inventing text is the
        worst content error."""
        if not prediction.strip():
            return "empty output"
        try:
            obj = decode_json(prediction)
        except ValueError:
            return "invalid JSON"
        if not isinstance(obj, dict):
            return "not a JSON object"
        ref = _reference(reference)
        if not set(obj) <= set(self.allowed_keys):
            return "extra keys"
        if _pairs(obj) == _pairs(ref):
            return "ok"
        if not all(in_input(v, input_text) for v in obj.values()):
            return "hallucinated value"
        if set(ref) - set(obj):
            return "missing keys"
        if set(obj) - set(ref):
            return "extra keys"
        return "wrong values"

    def answer_balance(self, answers: Sequence[str]) -> Counter:
        """Records using each key."""
        counts: Counter[str] = Counter()
        for answer in answers:
            counts.update(json.loads(answer).keys())
        return counts

    classical_trusted: ClassVar[tuple[str, ...]] = ("tuneforge.core.kinds.json_object._int32_indices",)

    def fit_classical(self, train: list[dict], seed: int = 0):
        """A linear classifier over word features predicts each input word's key; the words of one key, in order,
        make its value (how usaddress itself parses, with a CRF there).

        A linear SVM rather than logistic regression: on address_json's validation split it scored micro-F1 0.883
        against 0.868 and trained in 3 s against 190 s on this 2-core machine."""
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import FunctionTransformer
        from sklearn.svm import LinearSVC

        X, y = [], []
        for record in train:
            text = self.input_text(record)
            X += word_features(text)
            y += word_tags(text, json.loads(self.reference(record)))
        model = make_pipeline(DictVectorizer(), FunctionTransformer(_int32_indices),
                              LinearSVC(C=1.0, max_iter=5000, random_state=seed))
        return model.fit(X, y)

    def classical_answers(self, model, records: list[dict]) -> tuple[list[str], list[float]]:
        """The tagged words joined per key; the confidence is the weakest word's margin between its best and
        second-best key (one doubtful word can spoil the object)."""
        outputs, confidences = [], []
        for record in records:
            text = self.input_text(record)
            words = _words(text)
            obj: dict[str, list[str]] = {}
            margin = 0.0
            if words:
                scores = model.decision_function(word_features(text))
                if scores.ndim == 1:  # two classes: one signed score a word, positive for classes_[1]
                    scores = np.column_stack([-scores, scores])
                top2 = np.sort(scores, axis=1)[:, -2:]
                margin = float((top2[:, 1] - top2[:, 0]).min())
                for word, tag in zip(words, model.classes_[scores.argmax(axis=1)], strict=True):
                    if tag != NO_TAG:
                        obj.setdefault(tag, []).append(word)
            outputs.append(json.dumps({k: " ".join(v) for k, v in obj.items()}, ensure_ascii=False))
            confidences.append(margin)
        return outputs, confidences


# --- the tagger baseline's features ---

NO_TAG = "(none)"


def _int32_indices(matrix):
    """DictVectorizer's sparse matrix with 32-bit indices: here it builds 64-bit ones, which liblinear refuses."""
    matrix.indices, matrix.indptr = matrix.indices.astype("int32"), matrix.indptr.astype("int32")
    return matrix


def _words(text: str) -> list[str]:
    """The input's words as values hold them (whitespace-separated, trailing commas dropped), as input_words
    allows them."""
    return [w.rstrip(",") or w for w in text.split()]


def word_tags(input_text: str, answer: dict) -> list[str]:
    """The key each input word was copied into (NO_TAG for none): every value's words are matched to the input's
    words in order, the earliest unmatched value word first, so that a value spread over the input ("30 45")
    still aligns."""
    pending = {key: str(value).split() for key, value in answer.items()}
    tags = []
    for word in _words(input_text):
        key = next((k for k, rest in pending.items() if rest and rest[0] == word), None)
        if key is not None:
            pending[key].pop(0)
        tags.append(key or NO_TAG)
    return tags


def _shape(word: str) -> str:
    """Character classes with runs collapsed: "123" -> "d", "St." -> "Xx.", "#4B" -> "#dX"."""
    classes = ["d" if c.isdigit() else "X" if c.isupper() else "x" if c.islower() else c for c in word]
    return "".join(c for i, c in enumerate(classes) if i == 0 or c != classes[i - 1])


def word_features(text: str) -> list[dict]:
    """Per word: itself, its shape, affixes, position and its neighbours (two each side)."""
    raw = text.split()
    words = _words(text)
    feats = []
    for i, word in enumerate(words):
        f = {"word": word.lower(), "shape": _shape(word), "prefix": word[:3].lower(), "suffix": word[-3:].lower(),
             "comma": raw[i].endswith(","), "digits": word.isdigit(), "length": min(len(word), 6),
             "from_start": min(i, 6), "from_end": min(len(words) - 1 - i, 6)}
        for offset in (-2, -1, 1, 2):
            j = i + offset
            if 0 <= j < len(words):
                f[f"word{offset:+d}"] = words[j].lower()
                f[f"shape{offset:+d}"] = _shape(words[j])
                f[f"comma{offset:+d}"] = raw[j].endswith(",")
            else:
                f[f"word{offset:+d}"] = "(edge)"
        feats.append(f)
    return feats
