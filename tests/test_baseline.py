"""The evaluation's classical baselines, trained on the real data and scored by the same metric code; the bootstrap
intervals of metrics on their real answers."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from tuneforge.core.kinds.json_object import word_tags
from tuneforge.core.metrics import (
    Interval,
    bootstrap_interval,
    metric_on_rows,
    paired_difference,
    score_outputs,
)
from tuneforge.core.params import EvaluateSpec, load_params
from tuneforge.core.readers import Record, read_source
from tuneforge.stages.evaluate import (
    EvalResult,
    Generations,
    gate,
)

PARAMS = load_params()


def tagger_baseline(train: list[dict], test: list[dict]) -> list[str]:
    """address_json's classical baseline: the json_object kind's word tagger."""
    return PARAMS.task("address_json").output.baseline(train, test)


def label_baseline(train: list[dict], test: list[dict]) -> list[str]:
    """sms_spam's classical baseline: the label kind's TF-IDF + logistic regression."""
    return PARAMS.task("sms_spam").output.baseline(train, test)


def records(task: str) -> list[dict]:
    spec = PARAMS.task(task)
    found = [r for r in read_source(Path(spec.source), spec.source, spec) if isinstance(r, Record)]
    random.Random(0).shuffle(found)
    return [{"id": r.id, "messages": r.messages} for r in found]


def test_word_tags_align_values_spread_over_the_input():
    answer = {"StreetNamePreType": "Route Route", "StreetName": "30 45", "IntersectionSeparator": "&"}
    assert word_tags("Route 30 & Route 45", answer) == [
        "StreetNamePreType", "StreetName", "IntersectionSeparator", "StreetNamePreType", "StreetName"]
    assert word_tags("Memphis, TN", {"PlaceName": "Memphis"}) == ["PlaceName", "(none)"]


def test_tagger_rebuilds_training_answers_and_beats_chance_on_held_out_addresses():
    data = records("address_json")
    train, test = data[:600], data[600:700]
    spec = PARAMS.task("address_json")
    refit = score_outputs(spec, train[:50], tagger_baseline(train, train[:50]))
    held_out = score_outputs(spec, test, tagger_baseline(train, test))
    assert refit["valid_json"] == 1.0 and refit["micro_f1"] > 0.9
    assert held_out["allowed_keys_only"] == 1.0 and held_out["micro_f1"] > 0.7, held_out["micro_f1"]


def test_tfidf_logistic_regression_answers_labels_scored_like_the_llm():
    data = records("sms_spam")
    train, test = data[:1500], data[1500:1800]
    outputs = label_baseline(train, test)
    assert set(outputs) <= {"spam", "ham"}
    scores = score_outputs(PARAMS.task("sms_spam"), test, outputs)
    assert scores["valid_label"] == 1.0 and scores["macro_f1"] > 0.85, scores["macro_f1"]


def test_each_kind_with_a_classical_model_answers_with_a_confidence():
    """label and json_object fit a scikit-learn model whose answers are the baseline's and come with a confidence;
    text's baseline is a rule with none."""
    data = records("sms_spam")[:400]
    kind = PARAMS.task("sms_spam").output
    model = kind.fit_classical(data[:300])
    answers, confidence = kind.classical_answers(model, data[300:])
    assert answers == kind.baseline(data[:300], data[300:]) and len(confidence) == 100
    assert all(0.5 <= c <= 1 for c in confidence)  # the winning class's probability
    kind = PARAMS.task("address_json").output
    model = kind.fit_classical(records("address_json")[:200])
    answers, confidence = kind.classical_answers(model, records("address_json")[:5])
    assert all(isinstance(json.loads(o), dict) for o in answers) and all(c >= 0 for c in confidence)
    assert PARAMS.task("email_subject").output.fit_classical(records("email_subject")[:50]) is None


# --- Intervals on the classical baselines' real answers ---

@pytest.fixture(scope="module")
def addresses():
    """141 held-out address rows (the size of address_json's test split) and the tagger's answers."""
    data = records("address_json")
    test = data[600:741]
    return test, tagger_baseline(data[:600], test)


@pytest.fixture(scope="module")
def messages():
    data = records("sms_spam")
    test = data[1500:1800]
    return test, label_baseline(data[:1500], test)


def test_resampled_counts_rebuild_every_metric_of_score_outputs(addresses, messages):
    """The bootstrap scores resamples from per-row counts: on all rows, once each, they give score_outputs' numbers."""
    for task, (test, outputs) in (("address_json", addresses), ("sms_spam", messages)):
        spec = PARAMS.task(task)
        scores = score_outputs(spec, test, outputs)
        metrics = [name for name, value in scores.items() if isinstance(value, float)]  # every scalar but n
        assert spec.primary_metric in metrics and spec.output.plain_metric in metrics
        for metric in metrics:
            whole = metric_on_rows(spec, test, outputs, metric, np.arange(len(test))[None])
            assert whole[0] == pytest.approx(scores[metric], abs=1e-12), (task, metric)


def test_a_clearly_better_model_differs_significantly_and_a_model_from_itself_not_at_all(messages):
    test, tfidf = messages
    spec = PARAMS.task("sms_spam")
    always_ham = ["ham"] * len(test)  # the majority class: macro-F1 about 0.46
    better = paired_difference(spec, test, tfidf, always_ham, spec.primary_metric)
    assert better.low > 0 and better.low <= better.estimate <= better.high, better
    assert paired_difference(spec, test, tfidf, tfidf, spec.primary_metric) == Interval(0.0, 0.0, 0.0)


def test_intervals_are_the_same_in_every_run_and_fast(addresses):
    test, outputs = addresses
    spec = PARAMS.task("address_json")
    start = time.perf_counter()
    first = bootstrap_interval(spec, test, outputs, "micro_f1")
    seconds = time.perf_counter() - start  # 1,000 resamples of 141 rows: ~16 ms on the 2-core CPU
    assert first == bootstrap_interval(spec, test, outputs, "micro_f1")
    assert first.low < first.estimate < first.high and first.high - first.low < 0.15, first
    assert seconds < 2, seconds
    other_draw = bootstrap_interval(spec, test, outputs, "micro_f1", seed=1)
    assert other_draw != first and other_draw.estimate == first.estimate  # the seed is what fixes the draw


def test_the_evaluation_gate_fails_only_when_the_interval_says_so(messages):
    """On real answers: a tuned score a little under min_score, or a little under the base's, is noise and passes;
    the whole interval under min_score, or a paired difference wholly under -max_regression, fails."""
    test, tfidf = messages
    spec = PARAMS.task("sms_spam")
    primary = spec.primary_metric
    always_ham = ["ham"] * len(test)
    first_spam = [i for i, answer in enumerate(tfidf) if answer == "spam"][:3]
    flipped = ["ham" if i in first_spam else answer for i, answer in enumerate(tfidf)]  # 3 spam answers lost

    def summary(tuned, base):
        return {**bootstrap_interval(spec, test, tuned, primary).to_metrics(f"tuned_{primary}"),
                **paired_difference(spec, test, tuned, base, primary).to_metrics(f"delta_{primary}")}

    close = summary(tfidf, flipped)
    tuned = Interval.from_metrics(close, f"tuned_{primary}")
    just_above = spec.model_copy(update={"min_score": round(tuned.estimate + 0.005, 3)})
    assert gate(just_above, EvaluateSpec(), close) == []
    over_the_interval = spec.model_copy(update={"min_score": round(tuned.high + 0.005, 3)})
    [failure] = gate(over_the_interval, EvaluateSpec(), close)
    assert failure.startswith(f"tuned {primary} {tuned.describe()} is below the task's min_score")

    slightly_worse = summary(flipped, tfidf)
    assert slightly_worse[f"delta_{primary}"] < 0 and gate(spec, EvaluateSpec(), slightly_worse) == []
    below_minimum, failure = gate(spec, EvaluateSpec(max_regression=0.1), summary(always_ham, tfidf))
    assert "is below evaluate.min_tuned_score" in below_minimum  # macro-F1 about 0.47
    assert "trails the base's by" in failure and "95% CI" in failure and "evaluate.max_regression 0.100" in failure


def test_eval_json_carries_the_intervals_the_gate_reads(messages):
    test, tfidf = messages
    spec = PARAMS.task("sms_spam")

    def answers(outputs):  # as generate() returns them; timings are not what is checked
        return Generations(outputs, [0.0] * len(outputs), [1] * len(outputs), 1.0)

    result = EvalResult(test, True, answers(["ham"] * len(test)), answers(tfidf), None, 2.0, 1.0, "TF-IDF", tfidf, 1.0,
                        spec)
    summary = result.summary()
    for metric in ("macro_f1", "accuracy"):
        for who in ("base", "tuned", "baseline", "delta"):
            interval = Interval.from_metrics(summary, f"{who}_{metric}")
            assert interval is not None and interval.low <= interval.estimate <= interval.high, (who, metric)
        assert summary[f"delta_{metric}_ci"][0] > 0  # TF-IDF is clearly better than always answering ham
    assert json.loads(json.dumps(summary)) == summary and gate(spec, EvaluateSpec(), summary) == []
