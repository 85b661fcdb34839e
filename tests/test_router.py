"""core/router.py: calibration, the routing policy, and the saved classical model that is loaded without pickle."""

import json
import os

import numpy as np
import pytest

from tuneforge.core.params import load_params
from tuneforge.core.router import (
    CLASSICAL,
    FINE_TUNE,
    Calibration,
    Router,
    UntrustedModelError,
    expected_calibration_error,
    load_classical,
    load_router,
    save_classical,
    selective_curve,
)


def draws(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw confidences, and answers right with a probability that rises with them (well separated: 0.1 to 0.9)."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0, 1, n)
    right = (rng.uniform(0, 1, n) < 0.1 + 0.8 * raw).astype(float)
    return raw, right


def test_calibrated_confidence_ranks_right_answers_above_wrong_ones_on_new_rows():
    calibration = Calibration.fit(*draws(400, 0))
    raw, right = draws(2000, 1)
    p = calibration(raw)
    high, low = p >= np.median(p), p < np.median(p)
    assert right[high].mean() > right[low].mean() + 0.25
    assert expected_calibration_error(p, right) < 0.06
    assert np.all(np.diff(calibration.y) >= 0) and 0 <= p.min() and p.max() <= 1  # monotone, a probability


def test_an_uncalibrated_confidence_has_a_larger_calibration_error():
    raw, right = draws(2000, 1)
    overconfident = np.sqrt(raw)  # ranks the same, promises more
    assert expected_calibration_error(overconfident, right) > expected_calibration_error(
        Calibration.fit(*draws(400, 0))(raw), right) + 0.05


def two_experts(n: int, seed: int):
    """Two answerers, each sure and right on its own half of the inputs, unsure and often wrong on the other."""
    rng = np.random.default_rng(seed)
    half = rng.uniform(0, 1, n) < 0.5
    ft_raw = np.where(half, rng.uniform(0.8, 1, n), rng.uniform(0, 0.3, n))
    cl_raw = np.where(half, rng.uniform(0, 3, n), rng.uniform(6, 9, n))  # another scale altogether (a margin)
    ft_right = np.where(half, rng.uniform(0, 1, n) < 0.95, rng.uniform(0, 1, n) < 0.4).astype(float)
    cl_right = np.where(half, rng.uniform(0, 1, n) < 0.5, rng.uniform(0, 1, n) < 0.95).astype(float)
    return ft_raw, ft_right, cl_raw, cl_right


def test_the_router_beats_both_answerers_and_defers_at_most_its_share():
    router = Router.fit(*two_experts(400, 0), max_deferral=0.05)
    ft_raw, ft_right, cl_raw, cl_right = two_experts(4000, 1)
    routes = router.route(ft_raw, cl_raw, defer=False)
    routed = np.where([r.answerer == FINE_TUNE for r in routes], ft_right, cl_right)
    assert routed.mean() > max(ft_right.mean(), cl_right.mean()) + 0.2
    deferred = [r.deferred for r in router.route(ft_raw, cl_raw)]
    assert 0 < np.mean(deferred) <= 0.08  # 5% on validation; a new draw lands near it
    assert not any(r.deferred for r in routes)
    assert Router.answers(routes[:2], ["f0", "f1"], ["c0", "c1"]) == [
        "f0" if routes[0].answerer == FINE_TUNE else "c0", "f1" if routes[1].answerer == FINE_TUNE else "c1"]


def test_no_deferral_when_max_deferral_is_zero_and_ties_go_to_the_better_answerer():
    ft_raw, ft_right, cl_raw, cl_right = two_experts(400, 0)
    router = Router.fit(ft_raw, ft_right, cl_raw, np.zeros_like(cl_right), max_deferral=0.0)
    assert router.defer_below is None and router.prefer == FINE_TUNE
    assert not any(r.deferred for r in router.route(ft_raw, cl_raw))
    flat = Router.fit([0.5, 0.6], [1.0, 1.0], [1.0, 2.0], [1.0, 1.0], 0.0)  # both always right: a tie everywhere
    assert {r.answerer for r in flat.route([0.1, 0.9], [0.1, 5.0])} == {flat.prefer}


def test_the_saved_router_routes_as_the_fitted_one(tmp_path):
    router = Router.fit(*two_experts(300, 0), max_deferral=0.1)
    save_classical(tmp_path, {"not": "an estimator"}, router)
    loaded = load_router(tmp_path)
    ft_raw, _, cl_raw, _ = two_experts(500, 2)
    assert loaded.route(ft_raw, cl_raw) == router.route(ft_raw, cl_raw)
    assert json.loads((tmp_path / "router.json").read_text())["prefer"] in (FINE_TUNE, CLASSICAL)


def test_selective_curve_keeps_the_surest_first():
    curve = selective_curve([0.9, 0.1, 0.8, 0.2], [1.0, 0.0, 1.0, 0.0], points=4)
    assert [row["coverage"] for row in curve] == [0.25, 0.5, 0.75, 1.0]
    assert [row["mean_score"] for row in curve] == [1.0, 1.0, pytest.approx(2 / 3), 0.5]


@pytest.fixture(scope="module")
def sms_classical():
    params = load_params()
    kind = params.task("sms_spam").output
    train = [{"id": str(i), "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": label}]}
             for i, (text, label) in enumerate([("WIN a FREE prize now, call 0800", "spam"), ("see you at lunch", "ham"),
                                                ("URGENT claim your cash reward", "spam"), ("running late, sorry", "ham")]
                                               * 5)]
    return kind, kind.fit_classical(train)


def test_the_classical_model_round_trips_through_skops(tmp_path, sms_classical):
    kind, model = sms_classical
    save_classical(tmp_path, model, None)
    loaded = load_classical(tmp_path, kind.classical_trusted)
    probe = [{"messages": [{"role": "user", "content": "FREE cash prize, call now"}, {"role": "assistant", "content": "spam"}]}]
    assert kind.classical_answers(loaded, probe) == kind.classical_answers(model, probe)


def test_a_tampered_classical_model_is_refused_not_run(tmp_path, sms_classical):
    """A file whose objects call something the kind does not trust (here os.system, as a FunctionTransformer's
    function) is refused before anything in it is built; so is a file that is not skops at all."""
    import skops.io as sio
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    kind, model = sms_classical
    save_classical(tmp_path, model, None)
    sio.dump(make_pipeline(FunctionTransformer(os.system), model), tmp_path / "model.skops")
    with pytest.raises(UntrustedModelError, match=r"does not trust: \[.*system.*\]; refusing to load it"):
        load_classical(tmp_path, kind.classical_trusted)
    (tmp_path / "model.skops").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UntrustedModelError, match="is not a readable skops file"):
        load_classical(tmp_path, kind.classical_trusted)


def address(i: int, text: str, answer: dict) -> dict:
    return {"id": str(i), "messages": [{"role": "user", "content": text},
                                       {"role": "assistant", "content": json.dumps(answer)}]}


def test_the_word_tagger_round_trips_through_skops_with_its_one_trusted_function(tmp_path):
    """json_object's tagger holds a function of tuneforge's own (the 32-bit index cast): the kind trusts exactly it."""
    kind = load_params().task("address_json").output
    train = [address(i, f"{n} Main St", {"AddressNumber": str(n), "StreetName": "Main", "StreetNamePostType": "St"})
             for i, n in enumerate(range(100, 130))]
    model = kind.fit_classical(train)
    save_classical(tmp_path, model, None)
    probe = [address(0, "451 Main St", {"AddressNumber": "451"})]
    assert kind.classical_answers(load_classical(tmp_path, kind.classical_trusted), probe) == kind.classical_answers(
        model, probe)
    with pytest.raises(UntrustedModelError, match="_int32_indices"):
        load_classical(tmp_path, ())


def test_a_tagger_with_two_classes_answers_every_word():
    """With one key and untagged words the linear model has two classes and one signed score a word."""
    kind = load_params().task("address_json").output
    train = [address(i, f"{n} plus words", {"AddressNumber": str(n)}) for i, n in enumerate(range(100, 130))]
    model = kind.fit_classical(train)
    assert len(model.classes_) == 2
    answers, confidence = kind.classical_answers(model, [address(0, "777 plus words", {"AddressNumber": "777"})])
    assert json.loads(answers[0]) == {"AddressNumber": "777"} and confidence[0] > 0


def test_flat_calibration_still_defers_the_least_sure_share():
    """Isotonic steps leave ties (here every answer scored 1, so every calibrated confidence is 1): the rank of the
    raw confidence among validation's breaks them, and the least sure max_deferral of validation defers."""
    rng = np.random.default_rng(0)
    ft_raw, cl_raw = rng.uniform(0, 1, 400), rng.uniform(0, 5, 400)
    router = Router.fit(ft_raw, np.ones(400), cl_raw, np.ones(400), max_deferral=0.05)
    routes = router.route(ft_raw, cl_raw)
    assert sum(r.deferred for r in routes) == 20
    assert max(raw for raw, r in zip(ft_raw, routes) if r.deferred) < np.quantile(ft_raw, 0.1)
