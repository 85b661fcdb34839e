"""text: a free-text answer (a house-style reply, a summary, a subject line), scored against the reference text.

Any non-blank text is an answer (within output.max_chars, and inside output.grammar when one is given); the task's
format rules (output.regex, required_terms, forbidden_terms) are scored as a pass rate, format_pass, rather than
made validity, so a model that writes good text in the wrong form is measured, not thrown away. Decoding is free
unless the task gives its own GBNF grammar.

chrF and BLEU are corpus scores, not means of sentence scores: each row keeps sacrebleu's per-sentence statistics
and a resample sums them, so the point estimate equals sacrebleu's corpus_score and the bootstrap interval comes
from the same definition.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field, PositiveInt, field_validator, model_validator

from tuneforge.core.kinds.base import INVALID, FromTotals, OutputKind, rate, ratio

LENGTH_BUCKETS = (5, 10, 20, 50, 100)  # upper ends, in words, of the length classes drift and the audit count


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # chrF2, character 6-grams: sacrebleu's and WMT's default


@lru_cache(maxsize=1)
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU()


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"])


def _sentence_stats(metric, hyps: list[str], refs: list[str]) -> np.ndarray:
    """sacrebleu's per-sentence statistics, (rows, k): counts whose sums give the corpus score."""
    width = len(metric()._extract_corpus_statistics(["x"], [["x"]])[0])  # known even with no rows to score
    stats = metric()._extract_corpus_statistics(hyps, [refs]) if hyps else []
    return np.asarray(stats, dtype=np.int32).reshape(len(hyps), width)


def _corpus(metric, key: str) -> FromTotals:
    """A sacrebleu metric of each resample's summed sentence statistics (row_counts' `key`), on [0, 1]."""
    return lambda t: np.asarray([metric()._compute_score_from_stats(stats).score / 100 for stats in t[key]])


def collapse(text: str) -> str:
    return " ".join(text.split())


def length_bucket(answer: str) -> str:
    words = len(answer.split())
    low = 1
    for high in LENGTH_BUCKETS:
        if words <= high:
            return f"{low}-{high} words"
        low = high + 1
    return f">{LENGTH_BUCKETS[-1]} words"


class _ByteTokens:
    """One token a byte (and an end token): lets llguidance match an answer's text against a grammar."""

    eos_token_id, bos_token_id = 256, None
    tokens = [bytes([b]) for b in range(256)] + [b"<end>"]
    special_token_ids = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


@lru_cache(maxsize=1)
def _byte_tokenizer():
    from llguidance import LLTokenizer, TokenizerWrapper

    return LLTokenizer(TokenizerWrapper(_ByteTokens()), slices=[])


@lru_cache(maxsize=8)
def _compiled(gbnf: str) -> str:
    """The GBNF grammar as llguidance reads it (the engine evaluation and export decode with), or ValueError."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import gbnf_to_lark

    try:
        grammar = LLMatcher.grammar_from_lark(gbnf_to_lark(gbnf))
    except Exception as err:  # the converter raises bare Exception for an undefined rule
        raise ValueError(f"output.grammar is not a valid GBNF grammar: {err}") from None
    if problem := LLMatcher.validate_grammar(grammar, _byte_tokenizer()):
        raise ValueError(f"output.grammar is not a valid GBNF grammar: {problem}")
    return grammar


def matches_grammar(answer: str, gbnf: str) -> bool:
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), _compiled(gbnf), log_level=0)
    return matcher.consume_tokens(list(answer.encode())) and matcher.is_accepting()


class TextOutput(OutputKind):
    # The settings are `grammar:` and `baseline:` in params.yaml; the attributes are gbnf and baseline_method, since
    # grammar() and baseline() are every kind's methods.
    model_config = ConfigDict(serialize_by_alias=True)

    kind: Literal["text"]
    max_chars: PositiveInt | None = Field(None, description="an answer longer than this (surrounding whitespace "
                                          "ignored) is invalid")
    regex: str | None = Field(None, description="format rule: the whole answer matches this Python regular "
                              "expression (re.fullmatch)")
    required_terms: list[str] = Field(default_factory=list, description="format rule: the answer contains each "
                                      "(case-insensitive)")
    forbidden_terms: list[str] = Field(default_factory=list, description="format rule: the answer contains none "
                                       "(case-insensitive)")
    gbnf: str | None = Field(None, alias="grammar", description="a GBNF grammar every answer matches: decoding is "
                             "constrained to it (unless constrained: false) and an answer outside it is invalid; "
                             "none: free decoding")
    baseline_method: Literal["retrieval", "lead"] = Field(
        "retrieval", alias="baseline", description="retrieval: the answer of the most similar training input (TF-IDF "
        "cosine); lead: the input's first sentence, cut to the training answers' mean length in words")

    plain_metric: ClassVar[str] = "chrf"
    plain_sentence: ClassVar[str] = ("writes answers with a chrF of {share} against the reference answers of {n} test "
                                     "inputs (character n-gram F-score: 1 is the reference text itself)")
    answer_noun: ClassVar[str] = "text"
    answers_are: ClassVar[str] = "free text"  # the model card's "answered with ..."
    NOT_PRIMARY: ClassVar = frozenset({"length_ratio"})
    METRICS: ClassVar = {
        "chrf": _corpus(_chrf, "chrf_stats"),
        "bleu": _corpus(_bleu, "bleu_stats"),
        "rouge_l": lambda t: ratio(t["rouge_l"], t["rows"]),
        "exact_match": rate("exact"),
        "length_ratio": lambda t: ratio(t["answer_chars"], t["reference_chars"]),
        "format_pass": rate("format_pass"),
    }

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, regex: str | None) -> str | None:
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as err:
                raise ValueError(f"output.regex does not compile: {err}") from None
        return regex

    @field_validator("gbnf")
    @classmethod
    def _grammar_compiles(cls, gbnf: str | None) -> str | None:
        if gbnf is not None:
            _compiled(gbnf)
        return gbnf

    @model_validator(mode="after")
    def _terms_satisfiable(self) -> TextOutput:
        for setting, terms in (("output.required_terms", self.required_terms),
                               ("output.forbidden_terms", self.forbidden_terms)):
            if any(not term.strip() for term in terms):
                raise ValueError(f"{setting} holds an empty term")
        both = sorted({t.casefold() for t in self.required_terms} & {t.casefold() for t in self.forbidden_terms})
        if both:
            raise ValueError(f"{both} are both required and forbidden terms: no answer could pass")
        return self

    @property
    def baseline_name(self) -> str:
        return {"retrieval": "TF-IDF nearest training input: its answer",
                "lead": "the input's first sentence, cut to the mean answer length"}[self.baseline_method]

    def describe(self) -> str:
        limits = [f"at most {self.max_chars} characters"] if self.max_chars is not None else []
        limits += ["matching the task's GBNF grammar"] if self.gbnf is not None else []
        rules = [f"`{self.regex}` as a whole"] if self.regex is not None else []
        rules += [f"contains `{t}`" for t in self.required_terms] + [f"never `{t}`" for t in self.forbidden_terms]
        return (self.answers_are + (f" ({', '.join(limits)})" if limits else "")
                + (f"; format rules, scored as format_pass: {'; '.join(rules)}" if rules else "") + ".")

    # --- the answer contract ---

    def answer_problem(self, answer: str) -> str:
        text = answer.strip()
        if not text:
            return "empty answer"
        if self.max_chars is not None and len(text) > self.max_chars:
            return f"answer has {len(text)} characters, over output.max_chars ({self.max_chars})"
        if self.gbnf is not None and not matches_grammar(answer, self.gbnf):
            return "answer does not match output.grammar"
        return ""

    def canonical_answer(self, answer: str) -> str:
        """Without surrounding whitespace: a trailing newline in training answers would teach one to every answer
        and count against it in exact match. Kept as is under a grammar, which may ask for that whitespace."""
        return answer if self.gbnf is not None else answer.strip()

    def category(self, answer: str) -> str:
        return INVALID if self.answer_problem(answer) else length_bucket(answer)

    def grammar(self, input_text: str) -> str | None:
        return self.gbnf

    def broken_rules(self, answer: str) -> list[str]:
        """The format rules the answer breaks (surrounding whitespace ignored)."""
        text, folded = answer.strip(), answer.casefold()
        broken = ["regex"] if self.regex is not None and not re.fullmatch(self.regex, text) else []
        broken += [f"required: {t}" for t in self.required_terms if t.casefold() not in folded]
        broken += [f"forbidden: {t}" for t in self.forbidden_terms if t.casefold() in folded]
        return broken

    def _rules(self) -> list[str]:
        return ((["regex"] if self.regex is not None else []) + [f"required: {t}" for t in self.required_terms]
                + [f"forbidden: {t}" for t in self.forbidden_terms])

    # --- scoring ---

    def row_counts(self, inputs, references, outputs) -> dict[str, np.ndarray]:
        hyps, refs = list(outputs), list(references)
        return {
            "chrf_stats": _sentence_stats(_chrf, hyps, refs),
            "bleu_stats": _sentence_stats(_bleu, hyps, refs),
            "rouge_l": np.asarray([_rouge().score(r, o)["rougeL"].fmeasure
                                   for o, r in zip(outputs, references, strict=True)], dtype=float),
            "exact": np.asarray([collapse(o) == collapse(r) for o, r in zip(outputs, references, strict=True)],
                                dtype=np.int64),
            "answer_chars": np.asarray([len(collapse(o)) for o in outputs], dtype=np.int64),
            "reference_chars": np.asarray([len(collapse(r)) for r in references], dtype=np.int64),
            "format_pass": np.asarray([not self.broken_rules(o) for o in outputs], dtype=np.int64),
        }

    def details(self, inputs, references, outputs) -> dict:
        """per_rule {format rule: share of answers that keep it}, when the task has format rules."""
        rules = self._rules()
        if not rules or not outputs:
            return {}
        broken = Counter(rule for o in outputs for rule in self.broken_rules(o))
        return {"per_rule": {rule: 1 - broken[rule] / len(outputs) for rule in rules}}

    def example_score(self, prediction: str, reference: str, input_text: str) -> float:
        """Sentence chrF on [0, 1]."""
        return _chrf().sentence_score(prediction, [reference]).score / 100

    def error_kind(self, prediction: str, reference: str, input_text: str) -> str:
        if not prediction.strip():
            return "empty output"
        if self.max_chars is not None and len(prediction.strip()) > self.max_chars:
            return "too long"
        if self.answer_problem(prediction):
            return "outside the grammar"
        if self.broken_rules(prediction):
            return "breaks a format rule"
        return "ok" if collapse(prediction) == collapse(reference) else "differs from the reference"

    def answer_balance(self, answers: Sequence[str]) -> Counter:
        """Answers in each length class (words)."""
        return Counter(length_bucket(a) for a in answers)

    # --- the classical baseline ---

    def baseline(self, train: list[dict], test: list[dict], seed: int = 0) -> list[str]:
        if self.baseline_method == "lead":
            mean_words = np.mean([len(self.reference(r).split()) for r in train]) if train else 1
            return [lead(self.input_text(r), max(1, round(mean_words))) for r in test]
        return nearest_answers([self.input_text(r) for r in train], [self.reference(r) for r in train],
                               [self.input_text(r) for r in test])


def lead(text: str, words: int) -> str:
    """The text's first sentence, at most `words` words."""
    first = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]
    return " ".join(first.split()[:words])


def nearest_answers(train_inputs: list[str], train_answers: list[str], test_inputs: list[str]) -> list[str]:
    """For each test input, the answer of the training input nearest by TF-IDF cosine (word 1-2-grams); the first
    training record where nothing is shared."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    train_matrix = vectorizer.fit_transform(train_inputs)
    test_matrix = vectorizer.transform(test_inputs)
    nearest = []
    for start in range(0, len(test_inputs), 1000):  # bounds the dense similarity block's memory
        nearest += list((test_matrix[start:start + 1000] @ train_matrix.T).toarray().argmax(axis=1))
    return [train_answers[i] for i in nearest]
