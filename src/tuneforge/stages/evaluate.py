"""Base vs fine-tuned on the held-out test split: greedy batched generation, task metrics, perplexity."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tuneforge.core import metrics
from tuneforge.core.batching import collate_padded, evaluate_loss, render_records
from tuneforge.core.chat import prompt_text
from tuneforge.core.metrics import score_outputs
from tuneforge.core.params import EvaluateSpec, TaskSpec


@dataclass
class Generations:
    outputs: list[str]
    latency_s: list[float]  # per example: its batch's wall time / batch size
    output_tokens: list[int]
    tokens_per_second: float


@torch.no_grad()
def generate(model, tokenizer, records: list[dict], *, batch_size: int, max_new_tokens: int,
             desc: str = "answers") -> Generations:
    """Greedy, batched, left-padded (so every prompt ends where generation starts); a progress bar named desc."""
    tokenizer.padding_side = "left"
    model.eval()
    device = next(model.parameters()).device
    outputs, latency, n_tokens = [], [], []
    total_time = 0.0
    bar = tqdm(total=len(records), desc=desc, unit="answer")
    for i in range(0, len(records), batch_size):
        batch = records[i : i + batch_size]
        prompts = [prompt_text(tokenizer, r["messages"]) for r in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        start = time.perf_counter()
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        elapsed = time.perf_counter() - start
        total_time += elapsed
        for row in out[:, enc["input_ids"].shape[1]:]:
            ids = row.tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            outputs.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
            n_tokens.append(len(ids))
            latency.append(elapsed / len(batch))
        bar.update(len(batch))
    bar.close()
    return Generations(outputs, latency, n_tokens, sum(n_tokens) / max(total_time, 1e-9))


def perplexity(model, tokenizer, records: list[dict], max_seq_len: int, batch_size: int) -> float:
    """exp(mean loss on answer tokens) over the given records."""
    device = str(next(model.parameters()).device)
    examples = render_records(tokenizer, records, max_seq_len)
    batches = [collate_padded(examples[i : i + batch_size], tokenizer.pad_token_id)
               for i in range(0, len(examples), batch_size)]
    return math.exp(evaluate_loss(model, batches, device))


def per_example(task: TaskSpec, record: dict, output: str) -> tuple[float, str]:
    kw = {"allowed_keys": task.output.allowed_keys, "labels": task.output.labels}
    user, reference = record["messages"][-2]["content"], record["messages"][-1]["content"]
    return (metrics.example_score(task.output.kind, output, reference, user, **kw),
            metrics.error_kind(task.output.kind, output, reference, user, **kw))


def gate(task: TaskSpec, spec: EvaluateSpec, base_score: float, tuned_score: float) -> list[str]:
    name = task.primary_metric
    failures = []
    minimum, setting = ((task.min_score, "the task's min_score") if task.min_score is not None
                        else (spec.min_tuned_score, "evaluate.min_tuned_score"))
    if tuned_score < minimum:
        failures.append(f"tuned {name} {tuned_score:.3f} is below {setting} {minimum:.3f}")
    if tuned_score < base_score - spec.max_regression:
        failures.append(f"tuned {name} {tuned_score:.3f} trails the base's {base_score:.3f} by more than "
                        f"evaluate.max_regression {spec.max_regression:.3f}")
    return failures


@dataclass
class EvalResult:
    records: list[dict]
    base: Generations
    tuned: Generations
    base_scores: dict
    tuned_scores: dict
    base_perplexity: float
    tuned_perplexity: float

    def summary(self, task: TaskSpec) -> dict:
        """Flat numbers for eval.json: base_*, tuned_*, delta_* for every scalar metric."""
        out = {}
        for name in [k for k, v in self.tuned_scores.items() if isinstance(v, (int, float)) and k != "n"]:
            out[f"base_{name}"] = self.base_scores[name]
            out[f"tuned_{name}"] = self.tuned_scores[name]
            out[f"delta_{name}"] = self.tuned_scores[name] - self.base_scores[name]
        for who, gen, ppl in (("base", self.base, self.base_perplexity), ("tuned", self.tuned, self.tuned_perplexity)):
            out[f"{who}_validation_perplexity"] = ppl
            out[f"{who}_latency_ms_per_example"] = 1000 * sum(gen.latency_s) / max(1, len(gen.latency_s))
            out[f"{who}_tokens_per_second"] = gen.tokens_per_second
            out[f"{who}_mean_output_tokens"] = sum(gen.output_tokens) / max(1, len(gen.output_tokens))
        out["test_rows"] = len(self.records)
        out["primary_metric"] = task.primary_metric
        return out

    def prediction_rows(self, task: TaskSpec) -> list[dict]:
        rows = []
        for i, record in enumerate(self.records):
            base_score, base_error = per_example(task, record, self.base.outputs[i])
            tuned_score, tuned_error = per_example(task, record, self.tuned.outputs[i])
            rows.append({
                "id": record["id"], "input": record["messages"][-2]["content"],
                "expected": record["messages"][-1]["content"],
                "base_output": self.base.outputs[i], "tuned_output": self.tuned.outputs[i],
                "base_score": base_score, "tuned_score": tuned_score,
                "base_error": base_error, "tuned_error": tuned_error,
                "base_latency_s": self.base.latency_s[i], "tuned_latency_s": self.tuned.latency_s[i],
                "tuned_output_tokens": self.tuned.output_tokens[i],
            })
        return rows


def run_evaluation(task: TaskSpec, spec: EvaluateSpec, max_seq_len: int, test: list[dict], validation: list[dict],
                   base_dir, adapter_dir, trust_remote_code: bool = False) -> EvalResult:
    """Score the base model, then the same weights with the adapter merged in (full precision)."""
    from peft import PeftModel

    from tuneforge.core.modeling import (
        compute_dtype,
        load_causal_lm,
        load_tokenizer,
        pick_device,
    )

    device = pick_device()
    tokenizer = load_tokenizer(base_dir)
    model = load_causal_lm(base_dir, dtype=compute_dtype(device), device=device, trust_remote_code=trust_remote_code)
    kw = {"batch_size": spec.batch_size, "max_new_tokens": task.max_new_tokens}
    base = generate(model, tokenizer, test, desc="base model answers", **kw)
    base_ppl = perplexity(model, tokenizer, validation, max_seq_len, spec.batch_size)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    tuned = generate(model, tokenizer, test, desc="tuned model answers", **kw)
    tuned_ppl = perplexity(model, tokenizer, validation, max_seq_len, spec.batch_size)
    return EvalResult(test, base, tuned, score_outputs(task, test, base.outputs), score_outputs(task, test, tuned.outputs),
                      base_ppl, tuned_ppl)
