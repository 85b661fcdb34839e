"""Task metrics on hand-made predictions, with the expected numbers worked out by hand."""

import json

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere: tests never open a window

import matplotlib.pyplot as plt
import pytest
from pydantic import ValidationError

from tuneforge.core.kinds import INVALID, output_spec
from tuneforge.core.kinds.json_answers import parse_object
from tuneforge.core.metrics import confusion_figure

KEYS = ["AddressNumber", "StreetName", "StreetNamePostType", "PlaceName"]
INPUT = "123 Main St Springfield"
REF = '{"AddressNumber": "123", "StreetName": "Main", "StreetNamePostType": "St"}'
LABELS = ["spam", "ham"]
JSON = output_spec(kind="json_object", allowed_keys=KEYS)
LABEL = output_spec(kind="label", labels=LABELS)

# One example of each case; every reference is REF (3 pairs) and every input is INPUT.
CASES = {
    # 123 as a number and " Main " padded still equal the reference after str() and whitespace normalisation
    "perfect": '{"AddressNumber": 123, "StreetName": " Main ", "StreetNamePostType": "St"}',
    "fenced": "```json\n" + REF + "\n```",
    "malformed": '{"AddressNumber": "123"',
    "list": '["123", "Main", "St"]',
    "empty": "",
    # "Recipient" is not an allowed key; its value does occur in the input
    "disallowed key": '{"AddressNumber": "123", "StreetName": "Main", "StreetNamePostType": "St", '
                      '"Recipient": "Springfield"}',
    "missing keys": '{"AddressNumber": "123"}',
    "wrong values": '{"AddressNumber": "Main", "StreetName": "123", "StreetNamePostType": "St"}',
    # neither "124" nor "Street" occurs in the input
    "hallucinated": '{"AddressNumber": "124", "StreetName": "Main", "StreetNamePostType": "Street"}',
}


def score_json(predictions):
    n = len(predictions)
    return JSON.score([INPUT] * n, [REF] * n, predictions)


def test_perfect_json_answers_score_one():
    s = score_json([CASES["perfect"], CASES["fenced"], REF])
    assert s == {
        # valid_answer is the strict contract (answer_problem): 123 is no string and a fence is no bare object,
        # so only REF itself is a valid answer; scoring reads all three leniently.
        "n": 3, "valid_answer": 1 / 3, "valid_json": 1.0, "allowed_keys_only": 1.0, "exact_match": 1.0,
        "micro_precision": 1.0, "micro_recall": 1.0, "micro_f1": 1.0, "hallucination_rate": 0.0,
        "per_key": {
            "AddressNumber": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3},
            "StreetName": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3},
            "StreetNamePostType": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3},
            "PlaceName": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
        },
    }


@pytest.mark.parametrize("text, expected", [
    ('  {"a": 1}\n', {"a": 1}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ('```JSON {"a": 1} ```', {"a": 1}),
    ('```\n{"a": 1}\n```', {"a": 1}),
    ('```json\n{"a": 1}\n```\nHope this helps!', None),  # text after the fence
    ('Sure: {"a": 1}', None),
    ('{"a": 1', None),
    ("[1, 2]", None),
    ('"a"', None),
    ("null", None),
    ("", None),
    ("[" * 100_000, None),  # degenerate repetition past the decoder's recursion limit
])
def test_parse_object(text, expected):
    assert parse_object(text) == expected


def test_mixed_json_answers_aggregate_by_hand():
    s = score_json(list(CASES.values()))
    assert s["n"] == 9
    # valid: perfect, fenced, disallowed key, missing keys, wrong values, hallucinated
    assert s["valid_json"] == pytest.approx(6 / 9)
    assert s["allowed_keys_only"] == pytest.approx(5 / 9)  # the valid ones less "disallowed key"
    assert s["exact_match"] == pytest.approx(2 / 9)  # perfect, fenced
    # predicted pairs 3+3+0+0+0+4+1+3+3 = 17; true pairs 9*3 = 27; correct 3+3+3+1+1+1 = 12
    assert s["micro_precision"] == pytest.approx(12 / 17)
    assert s["micro_recall"] == pytest.approx(12 / 27)
    assert s["micro_f1"] == pytest.approx(2 * 12 / (17 + 27))
    # 17 predicted values in the valid answers, of which "124" and "Street" are not in the input
    assert s["hallucination_rate"] == pytest.approx(2 / 17)
    # AddressNumber: predicted 6 times, right 4 times, expected 9 times
    assert s["per_key"]["AddressNumber"] == pytest.approx(
        {"precision": 4 / 6, "recall": 4 / 9, "f1": 8 / 15, "support": 9})
    # StreetName: predicted 5 times (not in "missing keys"), right 4 times (not in "wrong values")
    assert s["per_key"]["StreetName"] == pytest.approx(
        {"precision": 4 / 5, "recall": 4 / 9, "f1": 8 / 14, "support": 9})
    assert s["per_key"]["PlaceName"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert list(s["per_key"]) == KEYS  # the invented "Recipient" key gets no row
    json.dumps(s)  # the stages write it to JSON as is


@pytest.mark.parametrize("case, kind, value", [
    ("perfect", "ok", 1.0),
    ("fenced", "ok", 1.0),
    ("malformed", "invalid JSON", 0.0),
    ("list", "not a JSON object", 0.0),
    ("empty", "empty output", 0.0),
    ("disallowed key", "extra keys", 6 / 7),  # 3 of 4 pairs right, all 3 found
    ("missing keys", "missing keys", 0.5),  # 1 of 1 right, 1 of 3 found
    ("wrong values", "wrong values", 1 / 3),
    ("hallucinated", "hallucinated value", 1 / 3),
])
def test_json_error_kind_and_example_score(case, kind, value):
    prediction = CASES[case]
    assert JSON.error_kind(prediction, REF, INPUT) == kind
    assert JSON.example_score(prediction, REF, INPUT) == pytest.approx(value)


def test_json_error_kind_edge_cases():
    def kind(prediction):
        return JSON.error_kind(prediction, REF, INPUT)

    assert kind(" \n\t") == "empty output"
    assert kind('"123 Main St"') == "not a JSON object"
    # an allowed key the reference does not have
    assert kind(REF[:-1] + ', "PlaceName": "Springfield"}') == "extra keys"
    # hallucination outranks missing keys; matching ignores case and spacing
    assert kind('{"AddressNumber": "999"}') == "hallucinated value"
    assert kind('{"AddressNumber": "123", "StreetName": "MAIN  st"}') == "missing keys"


def test_hallucination_check_ignores_case_and_whitespace():
    s = JSON.score(["123  Main St\nSpringfield"], ['{"StreetName": "Main St", "PlaceName": "Springfield"}'],
                   ['{"StreetName": "main   ST", "PlaceName": "springfield"}'])
    assert s["hallucination_rate"] == 0.0
    assert s["exact_match"] == 0.0  # values themselves compare case-sensitively


def test_empty_json_object_matching_empty_reference_is_right():
    assert JSON.example_score("{}", "{}", INPUT) == 1.0
    assert JSON.error_kind("{}", "{}", INPUT) == "ok"


def test_labels_are_exact_case_sensitive_and_whitespace_tolerant():
    predictions = ["spam", "  ham\n", "Spam", "eggs", "", "ham", "spam"]
    references = ["spam", "ham", "spam", "ham", "ham", "spam", "spam"]
    s = LABEL.score([""] * 7, references, predictions)
    assert s["n"] == 7
    assert s["valid_label"] == pytest.approx(4 / 7)  # "Spam", "eggs" and "" are no allowed label
    assert s["accuracy"] == pytest.approx(3 / 7)
    assert s["confusion"] == {
        "labels": ["spam", "ham"],
        "columns": ["spam", "ham", INVALID],
        "matrix": [[2, 1, 1],   # spam expected: spam, spam, ham, "Spam"
                   [0, 1, 2]],  # ham expected: ham, "eggs", ""
    }
    # spam: P 2/2, R 2/4 -> F1 2/3; ham: P 1/2, R 1/3 -> F1 2/5
    assert s["per_label"]["spam"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4})
    assert s["per_label"]["ham"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3})
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.4) / 2)
    json.dumps(s)


def test_macro_f1_by_hand_with_a_label_never_predicted():
    s = output_spec(kind="label", labels=["a", "b", "c"]).score([""] * 4, ["a", "b", "c", "a"], ["a", "a", "b", "a"])
    # a: P 2/3, R 2/2 -> F1 0.8; b: P 0/1 -> 0; c: never predicted -> 0
    assert s["macro_f1"] == pytest.approx(0.8 / 3)
    assert s["accuracy"] == 0.5
    assert s["valid_label"] == 1.0


@pytest.mark.parametrize("prediction, reference, kind, value", [
    ("spam", "spam", "ok", 1.0),
    (" ham \n", "ham", "ok", 1.0),
    ("Spam", "spam", "not an allowed label", 0.0),
    ("eggs", "ham", "not an allowed label", 0.0),
    ("spam, probably", "spam", "not an allowed label", 0.0),
    ("ham", "spam", "wrong label", 0.0),
    ("  ", "spam", "empty output", 0.0),
])
def test_label_error_kind_and_example_score(prediction, reference, kind, value):
    assert LABEL.error_kind(prediction, reference, "") == kind
    assert LABEL.example_score(prediction, reference, "") == value


def test_empty_batches_score_zero():
    assert score_json([])["valid_json"] == 0.0
    assert LABEL.score([], [], [])["macro_f1"] == 0.0


def test_bad_calls_are_errors():
    with pytest.raises(ValidationError, match="regression"):  # an unknown kind fails when its spec is built
        output_spec(kind="regression")
    with pytest.raises(ValueError):  # lengths differ
        JSON.score([INPUT], [REF], [REF, REF])
    with pytest.raises(ValueError, match="reference is not a JSON object"):
        JSON.score([INPUT], ["[1]"], [REF])
    with pytest.raises(ValueError, match="outside the allowed labels"):
        LABEL.score([""], ["Spam"], ["spam"])


def test_confusion_figure_builds():
    s = LABEL.score([""] * 3, ["spam", "spam", "ham"], ["spam", "ham", "Spam"])
    fig = confusion_figure(s["confusion"], title="tuned model")
    try:
        ax = fig.axes[0]
        assert ax.get_title() == "tuned model"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["spam", "ham", INVALID]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["spam", "ham"]
        assert [t.get_text() for t in ax.texts] == ["1", "1", "0", "0", "0", "1"]
        fig.canvas.draw()  # renders without error
    finally:
        plt.close(fig)


def test_one_definition_of_a_valid_answer_for_evaluation_and_drift(repo_root):
    """Evaluation's valid_answer rate and drift's valid/invalid column come from the same contract
    (the kind's answer_problem): a fenced answer or one with keys outside the schema is scored but not valid."""
    import pandas as pd

    from tuneforge.core.metrics import score_outputs
    from tuneforge.core.params import load_params
    from tuneforge.stages.drift import traffic_frame

    spec = load_params(repo_root / "params.yaml").task("address_json")
    record = {"messages": [{"role": "user", "content": "1 Main St"},
                           {"role": "assistant", "content": '{"AddressNumber": "1", "StreetName": "Main"}'}]}
    answers = ['{"AddressNumber": "1", "StreetName": "Main"}', '```json\n{"AddressNumber": "1"}\n```',
               ' {"AddressNumber": "1"}', '{"Invented": "1"}', "{}"]
    scores = score_outputs(spec, [record] * len(answers), answers)
    assert scores["valid_answer"] == pytest.approx(2 / 5) and scores["valid_json"] == 1.0

    class Tokenizer:  # traffic_frame counts tokens; the validity column is what is checked here
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    frame = traffic_frame(["1 Main St"] * len(answers), answers, [None] * len(answers), Tokenizer(), spec.output)
    assert (frame["output_valid"] == "valid").mean() == pytest.approx(scores["valid_answer"])
    assert isinstance(frame, pd.DataFrame)


def test_an_interval_is_written_and_read_as_one_shape_in_metrics_json(repo_root):
    from tuneforge.core.metrics import Interval, bootstrap_interval
    from tuneforge.core.params import load_params

    interval = Interval(0.787, 0.742, 0.831)
    written = json.loads(json.dumps(interval.to_metrics("tuned_micro_f1")))
    assert written == {"tuned_micro_f1": 0.787, "tuned_micro_f1_ci": [0.742, 0.831]}
    assert Interval.from_metrics(written, "tuned_micro_f1") == interval
    assert Interval.from_metrics({"tuned_micro_f1": 0.787}, "tuned_micro_f1") is None  # metrics from before intervals
    assert interval.describe() == "0.787 (95% CI 0.742–0.831)"
    drop = -Interval(-0.03, -0.061, 0.0)
    assert drop == Interval(0.03, 0.0, 0.061) and drop.describe() == "0.030 (95% CI 0.000–0.061)"
    assert Interval(-0.03, -0.061, 0.0).bounds() == "95% CI -0.061 to 0.000"

    spec = load_params(repo_root / "params.yaml").task("sms_spam")
    assert bootstrap_interval(spec, [], [], "accuracy") == Interval(0.0, 0.0, 0.0)  # no rows: nothing to resample
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ham"}]}
    with pytest.raises(ValueError, match="no bootstrap for 'micro_f1' on a label task"):
        bootstrap_interval(spec, [record], ["ham"], "micro_f1")
