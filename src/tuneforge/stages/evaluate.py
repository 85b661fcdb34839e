"""Base vs fine-tuned on the held-out test split: greedy batched generation (under the output kind's grammar
when the task is constrained, and freely for comparison), task metrics, perplexity, and a classical baseline
trained on the same train split."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from tuneforge.core.batching import collate_padded, evaluate_loss, render_records
from tuneforge.core.chat import prompt_text, stop_token_ids
from tuneforge.core.constraints import grammars_for, hf_logits_processor
from tuneforge.core.metrics import Interval, bootstrap_interval, paired_difference, score_outputs
from tuneforge.core.kinds import OutputKind
from tuneforge.core.params import EvaluateSpec, RouteSpec, TaskSpec
from tuneforge.core.router import (
    CLASSICAL,
    FINE_TUNE,
    Route,
    Router,
    answer_confidence,
    expected_calibration_error,
    selective_curve,
)
from tuneforge.core.slices import slice_metrics


@dataclass
class Generations:
    outputs: list[str]
    latency_s: list[float]  # per example: its batch's wall time / batch size
    output_tokens: list[int]
    tokens_per_second: float
    # Per example: the geometric mean of its answer tokens' probabilities under the model's logits before the grammar
    # masks them (after generate's own processors, e.g. a base's repetition_penalty): the fine-tune's raw confidence
    # (core/router.py).
    confidences: list[float] | None = None


class _StepLogProbs(LogitsProcessor):
    """Placed before the grammar: keeps each step's log-softmax of the logits it is given."""

    def __call__(self, input_ids, scores):
        self.log_probs = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _ChosenLogProbs(LogitsProcessor):
    """Placed last: the log-probability (under _StepLogProbs's logits) of the token greedy decoding takes, the
    argmax of the scores as every processor before it left them (the grammar's mask among them)."""

    def __init__(self, step: _StepLogProbs):
        self.step, self.steps = step, []

    def __call__(self, input_ids, scores):
        # Left on the device: one copy to the host after generate() instead of a sync every step.
        self.steps.append(self.step.log_probs.gather(1, scores.argmax(dim=-1, keepdim=True))[:, 0])
        return scores


@torch.no_grad()
def generate(model, tokenizer, records: list[dict], *, output: OutputKind, batch_size: int, max_new_tokens: int,
             desc: str = "answers", grammars: list[str] | None = None, confidence: bool = False) -> Generations:
    """Greedy, batched by prompt length, left-padded (so every prompt ends where generation starts); answers come
    back in record order, as the output kind (bound to the tokenizer) reads them. A progress bar named desc.

    grammars: one GBNF grammar a record (core.constraints); each row of a batch is masked by its own.
    confidence: also each answer's raw confidence (Generations.confidences).
    """
    tokenizer.padding_side = "left"
    model.eval()
    device = next(model.parameters()).device
    n_vocab = model.get_output_embeddings().weight.shape[0]
    prompts = [prompt_text(tokenizer, r["messages"], **output.template_kwargs()) for r in records]
    # Batches of similar prompt length: a batch pads to its longest prompt, and SMS lengths vary tenfold.
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(records)), key=lambda i: lengths[i])
    outputs, latency, n_tokens = [""] * len(records), [0.0] * len(records), [0] * len(records)
    confidences = [0.0] * len(records)
    total_time = 0.0
    stops = stop_token_ids(tokenizer)
    bar = tqdm(total=len(records), desc=desc, unit="answer")
    for start_at in range(0, len(order), batch_size):
        batch = order[start_at : start_at + batch_size]
        enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        start = time.perf_counter()  # the grammars' set-up counts: a served request pays it too
        processors = ([hf_logits_processor(tokenizer, n_vocab, [grammars[i] for i in batch])]
                      if grammars is not None else [])
        if confidence:
            step = _StepLogProbs()
            chosen = _ChosenLogProbs(step)
            processors = [step, *processors, chosen]
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             logits_processor=LogitsProcessorList(processors) if processors else None,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        elapsed = time.perf_counter() - start
        total_time += elapsed
        chosen_log_probs = torch.stack(chosen.steps).cpu() if confidence else None  # (steps, rows)
        for j, (i, row) in enumerate(zip(batch, out[:, enc["input_ids"].shape[1]:])):
            ids = row.tolist()
            ids = ids[: next((k for k, t in enumerate(ids) if t in stops), len(ids))]
            outputs[i] = output.from_generation(tokenizer.decode(ids, skip_special_tokens=True).strip())
            n_tokens[i] = len(ids)
            latency[i] = elapsed / len(batch)
            if confidence:
                confidences[i] = answer_confidence(chosen_log_probs[: len(ids), j].double().numpy())
        bar.update(len(batch))
    bar.close()
    return Generations(outputs, latency, n_tokens, sum(n_tokens) / max(total_time, 1e-9),
                       confidences if confidence else None)


def perplexity(model, tokenizer, records: list[dict], max_seq_len: int, batch_size: int, output: OutputKind) -> float:
    """exp(mean loss on answer tokens) over the given records."""
    device = str(next(model.parameters()).device)
    # Batches of similar length (a batch pads to its longest); the mean is over tokens, so order does not matter.
    examples = sorted(render_records(tokenizer, records, max_seq_len, **output.template_kwargs()), key=lambda ex: len(ex.input_ids))
    batches = [collate_padded(examples[i : i + batch_size], tokenizer.pad_token_id)
               for i in range(0, len(examples), batch_size)]
    return math.exp(evaluate_loss(model, batches, device))


def per_example(task: TaskSpec, record: dict, output: str) -> tuple[float, str]:
    """(the answer's score in [0, 1], its error category), as the task's output kind judges one answer."""
    kind = task.output
    reference, input_text = kind.reference(record), kind.input_text(record)
    return kind.example_score(output, reference, input_text), kind.error_kind(output, reference, input_text)


def gate(task: TaskSpec, spec: EvaluateSpec, summary: dict) -> list[str]:
    """Failures of the evaluation gate, decided on the intervals in summary (eval.json), not on point estimates: the
    tuned primary metric is below the minimum only when its whole interval is (its upper end below min_score), and
    it regresses only when the whole paired interval of tuned - base is below -evaluate.max_regression. A miss
    within the noise of the test rows passes."""
    name = task.primary_metric
    tuned = Interval.from_metrics(summary, f"tuned_{name}")
    delta = Interval.from_metrics(summary, f"delta_{name}")
    failures = []
    minimum, setting = ((task.min_score, "the task's min_score") if task.min_score is not None
                        else (spec.min_tuned_score, "evaluate.min_tuned_score"))
    if tuned.high < minimum:
        failures.append(f"tuned {name} {tuned.describe()} is below {setting} {minimum:.3f} "
                        "even at the interval's upper end")
    if delta.high < -spec.max_regression:
        failures.append(f"tuned {name} trails the base's by {-delta.estimate:.3f} (tuned - base "
                        f"{delta.describe()}, paired), beyond evaluate.max_regression {spec.max_regression:.3f} "
                        "even at the interval's upper end")
    return failures


@dataclass
class Routing:
    """The classical model as an answerer beside the fine-tune (core/router.py): both calibrated on validation
    rows, then each test request answered by the one expected to score higher, or deferred."""

    router: Router
    validation_rows: int
    # Calibrated confidence against score, per answerer, on the test rows: the calibration's check (on the validation
    # rows it was fitted to, isotonic regression is near 0 by construction).
    test_ece: dict[str, float]
    classical_confidences: list[float]   # raw, per test row
    routes: list[Route]                  # per test row, at route.max_deferral
    curve: list[dict]                    # coverage against the routed system's mean score (test)

    @classmethod
    def fit(cls, task: TaskSpec, route: RouteSpec, classical_model, validation: list[dict], tuned_validation:
            Generations, test: list[dict], tuned_test: Generations, classical_test: list[str],
            classical_test_confidences: list[float]) -> Routing:
        kind = task.output
        classical_validation, classical_validation_raw = kind.classical_answers(classical_model, validation)

        def scores(records, outputs):
            return [per_example(task, r, o)[0] for r, o in zip(records, outputs, strict=True)]

        ft_val, cl_val = scores(validation, tuned_validation.outputs), scores(validation, classical_validation)
        router = Router.fit(tuned_validation.confidences, ft_val, classical_validation_raw, cl_val, route.max_deferral)
        ft_test, cl_test = scores(test, tuned_test.outputs), scores(test, classical_test)

        def ece(calibration, raw, score):
            return expected_calibration_error(calibration(raw), score)

        routes = router.route(tuned_test.confidences, classical_test_confidences)
        routed_scores = Router.answers(routes, ft_test, cl_test)
        return cls(router, len(validation),
                   {FINE_TUNE: ece(router.fine_tune, tuned_test.confidences, ft_test),
                    CLASSICAL: ece(router.classical, classical_test_confidences, cl_test)},
                   classical_test_confidences, routes, selective_curve([r.confidence for r in routes], routed_scores))

    def answered(self) -> list[int]:
        """The test rows the routed system answers at route.max_deferral (the rest defer)."""
        return [i for i, r in enumerate(self.routes) if not r.deferred]


@dataclass
class EvalResult:
    """Every model's answers on the same test records. tuned is decoded as the task says (constrained by
    default); tuned_free is the same model decoding freely, present when the task is constrained and
    evaluate.compare_free is on."""

    records: list[dict]
    constrained: bool
    base: Generations
    tuned: Generations
    tuned_free: Generations | None
    base_perplexity: float
    tuned_perplexity: float
    baseline_name: str
    baseline_outputs: list[str]
    baseline_seconds: float
    task: TaskSpec
    slices: list[str] = field(default_factory=list)  # evaluate.slices: the groups the tuned model is scored by
    classical_model: object | None = None  # the baseline's fitted estimator, where the output kind has one (skops)
    routing: Routing | None = None  # where that model can answer beside the fine-tune

    def outputs(self) -> dict[str, list[str]]:
        """Each scored model's answers, by the name its metrics carry in eval.json (routed: the routed system at 0%
        deferral, every request answered by the answerer expected to score higher)."""
        out = {"base": self.base.outputs, "tuned": self.tuned.outputs}
        if self.tuned_free is not None:
            out["tuned_free"] = self.tuned_free.outputs
        out["baseline"] = self.baseline_outputs
        if self.routing is not None:  # a deferred row keeps its answerer's answer: this is 0% deferral
            out["routed"] = Router.answers(self.routing.routes, self.tuned.outputs, self.baseline_outputs)
        return out

    def scores(self) -> dict[str, dict]:
        return {who: score_outputs(self.task, self.records, outputs) for who, outputs in self.outputs().items()}

    def intervals(self) -> dict:
        """<model>_<metric>_ci for every model and delta_<metric>_ci (tuned - base, paired on the same rows), for the
        primary metric and the plain one (exact match or accuracy): eval.json's keys, as Interval.to_metrics writes
        them."""
        out = {}
        for metric in dict.fromkeys([self.task.primary_metric, self.task.output.plain_metric]):
            for who, outputs in self.outputs().items():
                out.update(bootstrap_interval(self.task, self.records, outputs, metric).to_metrics(f"{who}_{metric}"))
            out.update(paired_difference(self.task, self.records, self.tuned.outputs, self.base.outputs,
                                         metric).to_metrics(f"delta_{metric}"))
        return out

    def summary(self) -> dict:
        """Flat numbers for eval.json: <model>_<metric> for every scalar metric (models: base, tuned, tuned_free,
        baseline), delta_<metric> = tuned - base, the intervals of the headline metrics (intervals()), and
        speed/perplexity for the LLMs."""
        scores = self.scores()
        out = {}
        for name in [k for k, v in scores["tuned"].items() if isinstance(v, (int, float)) and k != "n"]:
            for who, s in scores.items():
                out[f"{who}_{name}"] = s[name]
            out[f"delta_{name}"] = scores["tuned"][name] - scores["base"][name]
        out.update(self.intervals())
        runs = {"base": (self.base, self.base_perplexity), "tuned": (self.tuned, self.tuned_perplexity)}
        if self.tuned_free is not None:
            runs["tuned_free"] = (self.tuned_free, None)
        for who, (gen, ppl) in runs.items():
            if ppl is not None:
                out[f"{who}_validation_perplexity"] = ppl
            out[f"{who}_latency_ms_per_example"] = 1000 * sum(gen.latency_s) / max(1, len(gen.latency_s))
            out[f"{who}_tokens_per_second"] = gen.tokens_per_second
            out[f"{who}_mean_output_tokens"] = sum(gen.output_tokens) / max(1, len(gen.output_tokens))
        out["baseline_seconds"] = self.baseline_seconds
        out["test_rows"] = len(self.records)
        out["primary_metric"] = self.task.primary_metric
        out["constrained"] = self.constrained
        out["slices"] = slice_metrics(self.task, self.records, self.tuned.outputs, self.slices)
        if self.routing is not None:
            out.update(self.routing_summary())
        return out

    def routing_summary(self) -> dict:
        """routed_*: the routed system at route.max_deferral: the deferred share, who answered the rest, and the
        primary metric on the answered rows with its interval; each answerer's calibration error."""
        routing, name = self.routing, self.task.primary_metric
        answered = routing.answered()
        out = {"routed_max_deferral": routing.router.max_deferral,
               "routed_deferred_share": 1 - len(answered) / max(1, len(self.records)),
               "routed_fine_tune_share": sum(r.answerer == FINE_TUNE for r in routing.routes) / max(1, len(self.records)),
               "routing_validation_rows": routing.validation_rows}
        outputs = self.outputs()
        scores = self.scores()
        better = max(("tuned", "baseline"), key=lambda who: scores[who][name])
        out["routed_better_part"] = better
        # What routing adds over the better of its two parts alone (paired on the same rows).
        out.update(paired_difference(self.task, self.records, outputs["routed"], outputs[better],
                                     name).to_metrics(f"routed_gain_{name}"))
        if answered:
            routed = outputs["routed"]
            out.update(bootstrap_interval(self.task, [self.records[i] for i in answered],
                                          [routed[i] for i in answered], name).to_metrics(f"routed_answered_{name}"))
        # Why routing gains what it gains: where both answers score alike no choice helps; the best any router
        # choosing between these two answers could do (per request, the better-scoring one) bounds the gain.
        tuned_scores = [per_example(self.task, r, o)[0] for r, o in zip(self.records, outputs["tuned"], strict=True)]
        classical_scores = [per_example(self.task, r, o)[0] for r, o in zip(self.records, outputs["baseline"],
                                                                            strict=True)]
        differ = [i for i, (a, b) in enumerate(zip(tuned_scores, classical_scores)) if a != b]
        better_answers = [t if a >= b else c for t, c, a, b in zip(outputs["tuned"], outputs["baseline"], tuned_scores,
                                                                    classical_scores)]
        out[f"routed_oracle_{name}"] = score_outputs(self.task, self.records, better_answers)[name]
        out["routed_scores_differ_share"] = len(differ) / max(1, len(self.records))
        out["routed_picked_better_share"] = (sum(
            (tuned_scores[i] > classical_scores[i]) == (routing.routes[i].answerer == FINE_TUNE) for i in differ)
            / len(differ)) if differ else None
        for who in (FINE_TUNE, CLASSICAL):
            out[f"{who}_calibration_error"] = routing.test_ece[who]
        return out

    def prediction_rows(self) -> list[dict]:
        """One row a test record: every model's answer, per-example score and error kind."""
        rows = []
        outputs = self.outputs()
        for i, record in enumerate(self.records):
            row = {"id": record["id"], "input": self.task.output.input_text(record),
                   "expected": self.task.output.reference(record)}
            for who, answers in outputs.items():
                row[f"{who}_output"] = answers[i]
                row[f"{who}_score"], row[f"{who}_error"] = per_example(self.task, record, answers[i])
            row.update({"base_latency_s": self.base.latency_s[i], "tuned_latency_s": self.tuned.latency_s[i],
                        "tuned_output_tokens": self.tuned.output_tokens[i]})
            if self.routing is not None:
                route = self.routing.routes[i]
                row.update({"tuned_confidence": self.tuned.confidences[i],
                            "baseline_confidence": self.routing.classical_confidences[i],
                            "routed_answerer": route.answerer, "routed_confidence": route.confidence,
                            "routed_deferred": route.deferred})
            rows.append(row)
        return rows


def run_evaluation(task: TaskSpec, spec: EvaluateSpec, max_seq_len: int, train: list[dict], test: list[dict],
                   validation: list[dict], base_dir, adapter_dir, trust_remote_code: bool = False,
                   route: RouteSpec | None = None) -> EvalResult:
    """The classical baseline, then the base model, then the same weights with the adapter merged in (full
    precision): both under the task's decoding (constrained unless output.constrained is false), and the tuned
    model once more freely when constrained (evaluate.compare_free), to show what the constraint changes.

    Where the output kind's classical model gives confidences (kinds: fit_classical), the tuned model also answers
    route.calibration_rows validation records, and a router between the two is fitted there (Routing)."""
    from peft import PeftModel

    from tuneforge.core.modeling import (
        compute_dtype,
        load_causal_lm,
        load_tokenizer,
        pick_device,
    )

    route = route or RouteSpec()
    start = time.perf_counter()
    classical_model = task.output.fit_classical(train)
    if classical_model is None:
        baseline_outputs = task.output.baseline(train, test)
    else:
        baseline_outputs, classical_confidences = task.output.classical_answers(classical_model, test)
    baseline_name, baseline_seconds = task.output.baseline_name, time.perf_counter() - start
    device = pick_device()
    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, dtype=compute_dtype(device), device=device, trust_remote_code=trust_remote_code)
    output = task.output.bind(tokenizer)
    kw = {"output": output, "batch_size": spec.batch_size, "max_new_tokens": task.max_new_tokens}
    grammars = grammars_for(output, test)
    base = generate(model, tokenizer, test, desc="base model answers", grammars=grammars, **kw)
    base_ppl = perplexity(model, tokenizer, validation, max_seq_len, spec.batch_size, output)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    routed = classical_model is not None and route.calibration_rows > 0 and bool(validation)
    tuned = generate(model, tokenizer, test, desc="tuned model answers", grammars=grammars, confidence=routed, **kw)
    tuned_free = (generate(model, tokenizer, test, desc="tuned model answers, no grammar", **kw)
                  if grammars is not None and spec.compare_free else None)
    tuned_ppl = perplexity(model, tokenizer, validation, max_seq_len, spec.batch_size, output)
    routing = None
    if routed:
        calibration = validation[: route.calibration_rows]
        tuned_validation = generate(model, tokenizer, calibration, desc="tuned model answers, validation",
                                    grammars=grammars_for(output, calibration), confidence=True, **kw)
        routing = Routing.fit(task, route, classical_model, calibration, tuned_validation, test, tuned,
                              baseline_outputs, classical_confidences)
    return EvalResult(test, grammars is not None, base, tuned, tuned_free, base_ppl, tuned_ppl,
                      baseline_name, baseline_outputs, baseline_seconds, task, spec.slices, classical_model, routing)
