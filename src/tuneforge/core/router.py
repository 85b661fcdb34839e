"""Routing a task's requests between its answerers: the fine-tune and the classical model.

Every task trains two models: the LoRA fine-tune and its output kind's classical model (kinds: fit_classical). Each
gives a raw confidence with its answer: the fine-tune the geometric mean of its answer tokens' probabilities
(under the raw logits, as llama.cpp's logprobs read them), the classical model its own score (a class probability,
a tagger's weakest margin). Raw confidences are not comparable across models, so each is calibrated on the
validation split into the answer's expected score (isotonic regression against the output kind's per-example
score); the router then answers with the model expected to score higher, and defers (to review) when neither is
expected to score well enough. The threshold is set on validation so that at most `route.max_deferral` of
requests defer.

The evaluation stage fits the router and saves it beside the classical model (`models/<task>/classical/`): the
estimator through skops (no pickle: a file holding a type the output kind does not trust is refused), the router
as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FINE_TUNE, CLASSICAL = "fine_tune", "classical"


def answer_confidence(token_log_probs: Sequence[float]) -> float:
    """The fine-tune's raw confidence in one answer: the geometric mean of its answer tokens' probabilities (each
    under the logits before the grammar masks them; the stop token not counted); an empty answer has confidence 0.
    The evaluation (HF), the export and serve (GGUF, llama-cpp-python's logprobs) all reduce with this. HF's logits
    come after generate()'s own processors: for a base whose generation_config sets a repetition_penalty they are
    not the raw logits llama.cpp reports (the embedded SmolLM2 sets none)."""
    return float(np.exp(np.mean(token_log_probs))) if len(token_log_probs) else 0.0


@dataclass(frozen=True)
class Calibration:
    """A monotone map from one answerer's raw confidence to its expected score, as isotonic regression's
    breakpoints (x ascending, y non-decreasing; clipped at both ends), and the validation confidences it was fitted
    on (sorted): plain JSON, read the same everywhere."""

    x: tuple[float, ...]
    y: tuple[float, ...]
    raw: tuple[float, ...]

    @classmethod
    def fit(cls, raw: Sequence[float], score: Sequence[float]) -> Calibration:
        from sklearn.isotonic import IsotonicRegression

        if len(raw) == 0:
            raise ValueError("calibration needs at least one validation answer")
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(np.asarray(raw, float),
                                                                                 np.asarray(score, float))
        return cls(tuple(map(float, iso.X_thresholds_)), tuple(map(float, iso.y_thresholds_)),
                   tuple(sorted(map(float, raw))))

    def __call__(self, raw: Sequence[float]) -> np.ndarray:
        return np.interp(np.asarray(raw, float), self.x, self.y)

    def rank(self, raw: Sequence[float]) -> np.ndarray:
        """Where each raw confidence falls among the validation ones (0: below all, 1: at or above all): breaks the
        ties that isotonic regression's flat steps leave, so that the least sure answers can be told apart."""
        return np.searchsorted(self.raw, np.asarray(raw, float), side="right") / len(self.raw)


def expected_calibration_error(confidence: Sequence[float], score: Sequence[float], bins: int = 10) -> float:
    """How far calibrated confidence is from the score it promises: the row-weighted mean |mean confidence - mean
    score| over equal-width confidence bins."""
    confidence, score = np.asarray(confidence, float), np.asarray(score, float)
    if len(confidence) == 0:
        return float("nan")
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return float(sum(abs(confidence[which == b].mean() - score[which == b].mean()) * (which == b).sum()
                     for b in range(bins) if (which == b).any()) / len(confidence))


def selective_curve(confidence: Sequence[float], score: Sequence[float], points: int = 20) -> list[dict]:
    """Coverage against mean score when only the most confident answers are kept (selective prediction): one row
    per coverage step, the chart in the evaluation report."""
    order = np.argsort(-np.asarray(confidence, float), kind="stable")
    ranked = np.asarray(score, float)[order]
    n = len(ranked)
    if n == 0:
        return []
    rows = []
    for k in sorted({max(1, round(n * (i + 1) / points)) for i in range(points)}):
        rows.append({"coverage": k / n, "mean_score": float(ranked[:k].mean()), "rows": k})
    return rows


@dataclass(frozen=True)
class Route:
    """One request's routing: who answers, how sure (calibrated expected score), and whether it is deferred."""

    answerer: str
    confidence: float
    deferred: bool


@dataclass(frozen=True)
class Router:
    """The routing policy of one task, fitted on its validation split."""

    fine_tune: Calibration
    classical: Calibration
    # A request is deferred when its (calibrated confidence, rank of the chosen answerer's raw confidence) sorts
    # below this pair; None: never.
    defer_below: tuple[float, float] | None
    max_deferral: float     # route.max_deferral it was fitted for
    prefer: str             # the answerer taken when both are expected to score the same (the better on validation)

    @classmethod
    def fit(cls, fine_tune_raw: Sequence[float], fine_tune_score: Sequence[float], classical_raw: Sequence[float],
            classical_score: Sequence[float], max_deferral: float) -> Router:
        fine_tune, classical = Calibration.fit(fine_tune_raw, fine_tune_score), Calibration.fit(classical_raw,
                                                                                                classical_score)
        prefer = FINE_TUNE if np.mean(fine_tune_score) >= np.mean(classical_score) else CLASSICAL
        router = cls(fine_tune, classical, None, max_deferral, prefer)
        # Defer the rows that sort strictly below the k-th lowest: at most max_deferral of validation defers.
        k = int(np.floor(max_deferral * len(fine_tune_raw)))
        if k > 0:
            ordered = sorted(key[1:] for key in router._keys(fine_tune_raw, classical_raw))
            router = cls(fine_tune, classical, ordered[k], max_deferral, prefer)
        return router

    def _keys(self, fine_tune_raw: Sequence[float], classical_raw: Sequence[float]) -> list[tuple[str, float, float]]:
        """Per row: (answerer, calibrated confidence, rank of its raw confidence) for the answerer expected to score
        higher; the last two order requests from least to most sure."""
        ft, cl = self.fine_tune(fine_tune_raw), self.classical(classical_raw)
        ft_rank, cl_rank = self.fine_tune.rank(fine_tune_raw), self.classical.rank(classical_raw)
        keys = []
        for a, b, ra, rb in zip(ft.tolist(), cl.tolist(), ft_rank.tolist(), cl_rank.tolist(), strict=True):
            answerer = FINE_TUNE if a > b else CLASSICAL if b > a else self.prefer
            keys.append((answerer, a, ra) if answerer == FINE_TUNE else (answerer, b, rb))
        return keys

    def route(self, fine_tune_raw: Sequence[float], classical_raw: Sequence[float], defer: bool = True) -> list[Route]:
        """Each row's route. defer=False: never defer (the routed system at 0% deferral)."""
        return [Route(answerer, confidence, defer and self.defer_below is not None
                      and (confidence, rank) < tuple(self.defer_below))
                for answerer, confidence, rank in self._keys(fine_tune_raw, classical_raw)]

    @staticmethod
    def answers(routes: Sequence[Route], fine_tune: Sequence, classical: Sequence) -> list:
        """Per row, the chosen answerer's item (its answer, or its score): a deferred row keeps its answerer's, so
        this is the routed system at 0% deferral; the report scores the deferred rows apart."""
        return [f if r.answerer == FINE_TUNE else c for r, f, c in zip(routes, fine_tune, classical, strict=True)]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Router:
        def calibration(d: dict) -> Calibration:
            return Calibration(tuple(d["x"]), tuple(d["y"]), tuple(d["raw"]))

        below = data["defer_below"]
        return cls(calibration(data["fine_tune"]), calibration(data["classical"]),
                   None if below is None else (float(below[0]), float(below[1])), float(data["max_deferral"]),
                   data["prefer"])


# --- the saved classical model and router ---

CLASSICAL_FILE, ROUTER_FILE = "model.skops", "router.json"


def save_classical(folder: Path, model, router: Router | None, why_none: str = "") -> None:
    """The fitted estimator through skops (no pickle) and the router as JSON; where the output kind has no
    classical model that gives a confidence, a README saying so (why_none) and nothing else."""
    import shutil

    import skops.io as sio

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if model is None:
        (folder / "README.md").write_text(f"No classical model to route to: {why_none}\n", encoding="utf-8")
        return
    sio.dump(model, folder / CLASSICAL_FILE)
    if router is not None:
        (folder / ROUTER_FILE).write_text(json.dumps(router.to_json(), indent=1) + "\n", encoding="utf-8")


class UntrustedModelError(ValueError):
    """A saved classical model holds types its output kind does not trust (or is not a skops file at all)."""


def load_classical(folder: Path, trusted: Sequence[str]):
    """The saved estimator, loaded only if it holds nothing beyond scikit-learn's types and the kind's `trusted`
    ones: skops rebuilds objects from a declared schema and never unpickles, so a tampered file is refused here
    instead of running its code."""
    import skops.io as sio

    path = folder / CLASSICAL_FILE
    try:
        untrusted = sorted(set(sio.get_untrusted_types(file=path)) - set(trusted))
    except Exception as err:  # skops raises whatever its zip and JSON readers do on a file that is not its own
        raise UntrustedModelError(f"{path} is not a readable skops file ({type(err).__name__}: {err}); refit it "
                                  "with `dvc repro` (the evaluation stage saves it)") from err
    if untrusted:
        raise UntrustedModelError(f"{path} holds types tuneforge does not trust: {untrusted}; refusing to load it "
                                  "(a file edited or replaced by hand? refit it with `dvc repro`)")
    try:
        return sio.load(path, trusted=list(trusted) or None)
    except Exception as err:  # e.g. saved by another scikit-learn or skops version than this one
        raise UntrustedModelError(f"{path} could not be loaded ({type(err).__name__}: {err}); refit it with "
                                  "`dvc repro`") from err


def load_router(folder: Path) -> Router | None:
    path = folder / ROUTER_FILE
    return Router.from_json(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
