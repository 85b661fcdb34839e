"""`tuneforge serve`'s routing: each request of a task that has a router is answered by the fine-tune or by the
task's classical model, whichever the router (core/router.py, fitted by the evaluation stage) expects to score
higher, or deferred to review when neither is expected to score well enough.

The router reads the same raw confidences the evaluation and export stages gave it: the fine-tune's is
core.router.answer_confidence over its answer tokens' log-probabilities under the raw logits, before the grammar
masks them (serve.answer_as_exported records them as the sampler picks each token, as the export stage's
generate_gguf does); the classical model's is the output kind's classical_answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneforge.core.kinds import OutputKind
from tuneforge.core.router import FINE_TUNE, Route, Router, answer_confidence, load_classical, load_router

DEFERRED = "deferred"  # the finish_reason of a deferred request: an empty answer, never a silent guess


@dataclass(frozen=True)
class Routed:
    """One request's routing: both answers, both raw confidences, and the router's decision."""

    route: Route
    fine_tune_answer: str
    fine_tune_confidence: float
    classical_answer: str
    classical_confidence: float

    @property
    def answer(self) -> str | None:
        """The answer served: the chosen answerer's, or None when the request is deferred."""
        if self.route.deferred:
            return None
        return self.fine_tune_answer if self.route.answerer == FINE_TUNE else self.classical_answer

    def rewrite(self, choice: dict, output: OutputKind) -> None:
        """The completion's choice as the router decided: the fine-tune's as it came, the classical model's answer
        in the form the kind sends answers back in, or an empty deferred answer."""
        if self.route.deferred:
            choice["message"], choice["finish_reason"] = {"role": "assistant", "content": ""}, DEFERRED
        elif self.route.answerer != FINE_TUNE:
            choice["message"], choice["finish_reason"] = output.to_message(self.classical_answer), "stop"

    def summary(self) -> dict:
        """The completion's `tuneforge` field, and the request log's routing fields."""
        return {"answered_by": self.route.answerer, "confidence": self.route.confidence,
                "fine_tune_confidence": self.fine_tune_confidence, "classical_confidence": self.classical_confidence,
                "deferred": self.route.deferred}


@dataclass(frozen=True)
class TaskRouting:
    """A task's classical model and router, loaded once at start-up."""

    classical: object  # the fitted scikit-learn estimator (core/router.py load_classical)
    router: Router

    def decide(self, output: OutputKind, record: dict, fine_tune_answer: str, logprobs: dict | None) -> Routed:
        """Route one request: record holds its messages as evaluation feeds records (the kind's input_text reads
        them), logprobs the fine-tune's answer tokens in a chat completion's logprobs form."""
        answers, confidences = output.classical_answers(self.classical, [record])
        confidence = fine_tune_confidence(logprobs)
        route = self.router.route([confidence], confidences)[0]
        return Routed(route, fine_tune_answer, confidence, answers[0], confidences[0])


def fine_tune_confidence(logprobs: dict | None) -> float:
    """answer_confidence over a chat completion's token logprobs (serve.answer_as_exported): the answer's tokens only,
    not the stop token, as generate_gguf counts them."""
    return answer_confidence([token["logprob"] for token in (logprobs or {}).get("content") or []])


def load_task_routing(folder: Path, output: OutputKind) -> TaskRouting | None:
    """The task's router and classical model from its classical folder (the evaluation stage's), or None where it
    has no router. Raises core.router.UntrustedModelError for a model file skops must not load, ValueError or
    KeyError for an unreadable router.json."""
    router = load_router(folder)
    if router is None:
        return None
    return TaskRouting(load_classical(folder, output.classical_trusted), router)
