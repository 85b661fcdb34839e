"""Task metrics on hand-made predictions."""

import matplotlib

matplotlib.use("Agg")

import pytest

from tuneforge.metrics import confusion_figure, error_kind, example_score, score

KEYS = ["AddressNumber", "StreetName", "PlaceName"]
INPUT = "12 Main Springfield"
REF = '{"AddressNumber": "12", "StreetName": "Main", "PlaceName": "Springfield"}'


def json_score(predictions, references=None, inputs=None):
    references = references or [REF] * len(predictions)
    inputs = inputs or [INPUT] * len(predictions)
    return score("json_object", predictions, references, inputs, allowed_keys=KEYS)


def test_perfect_json_answers():
    s = json_score([REF, '```json\n' + REF + '\n```'])  # a fenced block is accepted
    assert s["valid_json"] == s["exact_match"] == s["micro_f1"] == s["allowed_keys_only"] == 1.0
    assert s["hallucination_rate"] == 0.0


def test_malformed_list_and_empty_outputs_count_as_nothing_predicted():
    s = json_score(['{"AddressNumber": "12"', '["12"]', "", REF])
    assert s["valid_json"] == 0.25 and s["exact_match"] == 0.25
    assert s["micro_precision"] == 1.0 and s["micro_recall"] == 0.25
    assert s["micro_f1"] == pytest.approx(0.4)


def test_extra_missing_wrong_and_hallucinated_values():
    preds = ['{"AddressNumber": "12", "StreetName": "Main", "PlaceName": "Springfield", "Color": "red"}',
             '{"AddressNumber": "12"}',
             '{"AddressNumber": "13", "StreetName": "Main", "PlaceName": "Springfield"}']
    s = json_score(preds)
    assert s["valid_json"] == 1.0
    assert s["allowed_keys_only"] == pytest.approx(2 / 3)
    assert s["exact_match"] == 0.0
    # tp: 3 + 1 + 2 = 6; predicted pairs 4 + 1 + 3 = 8; true pairs 9
    assert s["micro_precision"] == pytest.approx(6 / 8) and s["micro_recall"] == pytest.approx(6 / 9)
    # values not in the input: "red" and "13" out of 8 predicted values
    assert s["hallucination_rate"] == pytest.approx(2 / 8)
    assert s["per_key"]["AddressNumber"]["recall"] == pytest.approx(2 / 3)
    kinds = [error_kind("json_object", p, REF, INPUT, allowed_keys=KEYS) for p in preds]
    assert kinds == ["extra keys", "missing keys", "hallucinated value"]
    assert error_kind("json_object", '{"AddressNumber": "Main", "StreetName": "12", "PlaceName": "Springfield"}',
                      REF, INPUT, allowed_keys=KEYS) == "wrong values"
    assert error_kind("json_object", "", REF, INPUT, allowed_keys=KEYS) == "empty output"
    assert error_kind("json_object", "{oops", REF, INPUT, allowed_keys=KEYS) == "invalid JSON"
    assert error_kind("json_object", "[1]", REF, INPUT, allowed_keys=KEYS) == "not a JSON object"
    assert error_kind("json_object", REF, REF, INPUT, allowed_keys=KEYS) == "ok"
    assert example_score("json_object", '{"AddressNumber": "12"}', REF, INPUT) == pytest.approx(0.5)


def test_labels_are_exact_and_case_sensitive():
    preds = ["spam", " ham\n", "Spam", "maybe", ""]
    refs = ["spam", "ham", "spam", "ham", "ham"]
    s = score("label", preds, refs, [""] * 5, labels=["spam", "ham"])
    assert s["valid_label"] == pytest.approx(2 / 5)
    assert s["accuracy"] == pytest.approx(2 / 5)
    # spam: tp 1, predicted 1, true 2 -> f1 2/3; ham: tp 1, predicted 1, true 3 -> f1 0.5
    assert s["per_label"]["spam"]["f1"] == pytest.approx(2 / 3)
    assert s["per_label"]["ham"]["f1"] == pytest.approx(0.5)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert s["confusion"]["columns"] == ["spam", "ham", "(invalid)"]
    assert s["confusion"]["matrix"] == [[1, 0, 1], [0, 1, 2]]
    assert error_kind("label", "Spam", "spam", "", labels=["spam", "ham"]) == "not an allowed label"
    assert error_kind("label", "ham", "spam", "", labels=["spam", "ham"]) == "wrong label"
    assert error_kind("label", "", "spam", "", labels=["spam", "ham"]) == "empty output"
    assert example_score("label", " spam ", "spam", "", labels=["spam", "ham"]) == 1.0
    fig = confusion_figure(s["confusion"], "test")
    assert fig.axes[0].get_title() == "test"


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown output kind"):
        score("regression", [], [], [])
