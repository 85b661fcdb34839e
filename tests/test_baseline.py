"""The evaluation's classical baselines, trained on the real data and scored by the same metric code."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tuneforge.core.metrics import score_outputs
from tuneforge.core.params import load_params
from tuneforge.core.readers import Record, read_source
from tuneforge.stages.evaluate import (
    label_baseline,
    run_baseline,
    tagger_baseline,
    word_tags,
)

PARAMS = load_params()


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


def test_run_baseline_picks_the_output_kind():
    data = records("sms_spam")[:400]
    name, outputs, seconds = run_baseline(PARAMS.task("sms_spam"), data[:300], data[300:])
    assert name.startswith("TF-IDF") and len(outputs) == 100 and seconds > 0
    name, outputs, _ = run_baseline(PARAMS.task("address_json"), records("address_json")[:200], records("address_json")[:5])
    assert "tagger" in name and all(isinstance(json.loads(o), dict) for o in outputs)
