"""Drift verdicts on real data: a channel shift (SMS -> email) is caught, same-distribution traffic is not."""

import json

import pytest

from tuneforge.core.params import DriftSpec, load_params
from tuneforge.core.traffic import append_request, read_traffic
from tuneforge.stages.drift import run_drift, traffic_frame
from tuneforge.stages.prepare import prepare


@pytest.fixture(scope="module")
def splits(repo_root):
    params = load_params(repo_root / "params.yaml")
    return {t: prepare(params.task(t), params.split, repo_root).splits for t in ("sms_spam", "address_json")}, params


def frame(texts, outputs, tokenizer, spec, latency=None):
    return traffic_frame(texts, outputs, latency or [None] * len(texts), tokenizer, spec)


@pytest.mark.slow  # an Evidently report (tens of seconds)
def test_sms_to_email_shift_recommends_retraining(splits, tokenizer, repo_root):
    data, params = splits
    spec = params.task("sms_spam").output
    test = data["sms_spam"]["test"][:200]
    reference = frame([r.user_text for r in test], [r.answer for r in test], tokenizer, spec)
    emails = [json.loads(line)["text"] for line in (repo_root / "data/raw/production/spam_assassin.jsonl").open()][::30][:200]
    current = frame(emails, ["spam" if i % 3 else "Ham" for i in range(len(emails))], tokenizer, spec, [120.0] * len(emails))
    outcome = run_drift(reference, current, DriftSpec())
    assert outcome.retrain
    assert "input_chars" in outcome.drifted_columns and "input" in outcome.drifted_columns
    assert any("valid answers fell" in r for r in outcome.reasons)
    assert outcome.metrics["current_latency_p95_ms"] == pytest.approx(120.0)


@pytest.mark.slow  # an Evidently report (tens of seconds)
def test_held_out_addresses_do_not_cry_drift(splits, tokenizer):
    data, params = splits
    spec = params.task("address_json").output
    test, production = data["address_json"]["test"], data["address_json"]["production"]
    reference = frame([r.user_text for r in test], [r.answer for r in test], tokenizer, spec)
    current = frame([r.user_text for r in production], [r.answer for r in production], tokenizer, spec)
    outcome = run_drift(reference, current, DriftSpec())
    assert not outcome.retrain, outcome.reasons
    assert outcome.metrics["drift_share"] < 0.5


def test_too_little_traffic_gives_no_verdict(splits, tokenizer):
    data, params = splits
    spec = params.task("address_json").output
    test = data["address_json"]["test"]
    reference = frame([r.user_text for r in test], [r.answer for r in test], tokenizer, spec)
    outcome = run_drift(reference, reference.head(40), DriftSpec(min_rows=50))
    assert not outcome.retrain and "too few" in outcome.reasons[0] and outcome.snapshot is None
    empty = frame([], [], tokenizer, spec)  # a task nobody has sent a request yet
    assert len(empty) == 0 and not run_drift(reference, empty, DriftSpec()).retrain


def test_traffic_log_appends_whole_lines_and_names_bad_ones(tmp_path):
    log = tmp_path / "production" / "t.jsonl"
    append_request(log, {"input": "a", "output": "ham"})
    with log.open("ab") as f:
        f.write(b'{"input": 3}\n{"inp')  # a foreign writer's bad line, and a torn one
    append_request(log, {"input": "b"})
    rows, problems = read_traffic(log)
    assert [r["input"] for r in rows] == ["a"]
    assert problems == [f"{log}:2: needs a string field 'input'", f"{log}:3: not a JSON line"]
    assert "timestamp" in rows[0]


def test_traffic_lines_with_huge_numbers_or_deep_nesting_are_skipped_and_named(tmp_path):
    log = tmp_path / "t.jsonl"
    append_request(log, {"input": "a"})
    with log.open("ab") as f:
        f.write(b'{"input": "b", "latency_ms": ' + b"9" * 5000 + b"}\n")  # int() refuses over 4,300 digits
        f.write(b'{"input": "c", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
    append_request(log, {"input": "d"})
    rows, problems = read_traffic(log)
    assert [r["input"] for r in rows] == ["a", "d"]
    assert problems == [f"{log}:2: not a JSON line", f"{log}:3: nested too deeply to read"]


def test_answers_a_client_cut_short_are_not_judged():
    from tuneforge.stages.drift import judged_outputs

    rows = [{"input": "a", "output": "spam"}, {"input": "b", "output": "s", "client_max_tokens": 1}]
    assert judged_outputs(rows) == ["spam", None]


def test_answers_the_servers_time_limit_cut_short_are_not_judged():
    """A slow prompt's answer, stopped by tuneforge serve's ANSWER_SECONDS, is not the model's answer: judged as
    invalid it would lower the valid-answer rate and could steer the retrain verdict."""
    from tuneforge.stages.drift import judged_outputs

    rows = [{"input": "a", "output": "spam"}, {"input": "b", "output": "{\"Recip", "cut_by_time_limit": True}]
    assert judged_outputs(rows) == ["spam", None]
