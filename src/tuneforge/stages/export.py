"""Merged model -> GGUF (llama.cpp's own converter) -> quantized with a task-calibrated importance matrix;
the adapter -> GGUF as well; every file run and checked with llama-cpp-python against the HF model.

The converters come from the sdist of the same llama-cpp-python version that runs the files
(scripts/fetch_gguf_converter.sh puts them in vendor/), so the writer and the reader always match.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tuneforge.core.adapters import AdapterSwitch
from tuneforge.core.chat import IGNORE, prompt_text, render, stop_token_ids
from tuneforge.core.constraints import grammars_for
from tuneforge.core.kinds import OutputKind
from tuneforge.core.gguf import (
    file_sha256,
    generate_gguf,
    gguf_files,
    load_llama,
)
from tuneforge.core.metrics import Interval, paired_difference, score_outputs
from tuneforge.core.modeling import load_tokenizer
from tuneforge.core.params import ExportSpec, Params
from tuneforge.core.paths import (
    adapter_dir,
    adapter_gguf_file,
    base_gguf_file,
    base_model_dir,
    classical_dir,
    gguf_dir,
    gguf_file,
    merged_dir,
    predictions_file,
    processed_dir,
    repo_root,
)
from tuneforge.core.quantize import (  # noqa: F401  (converter_dir: part of this stage's interface for tests)
    collect_imatrix,
    convert_lora_to_gguf,
    convert_to_gguf,
    converter_dir,
    quantize_gguf,
)
from tuneforge.core.records import read_jsonl
from tuneforge.core.router import Router, load_router

# Spin-waiting OpenMP threads stall llama.cpp on a busy 2-core machine (a run went from 3 s to >120 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Adapter merged into the full-precision base (never into 4-bit weights: the fine-tune would be lost)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)  # with chat_template.jinja: the converter embeds it
    if (base_dir / "tokenizer.model").exists():  # SentencePiece families: the converter reads it, save_pretrained drops it
        shutil.copy2(base_dir / "tokenizer.model", out_dir / "tokenizer.model")
    return out_dir


def export_all(merged_folder: Path, gguf_folder: Path, quantizations: list[str], *, imatrix: dict | None = None,
               tensor_types: dict[str, str] | None = None) -> dict[str, Path]:
    """f16 with the converter, then each quantization from the f16 file (calibrated when an imatrix is given)."""
    files = gguf_files(gguf_folder, quantizations)
    convert_to_gguf(merged_folder, files["f16"], "f16")
    for q in quantizations:
        quantize_gguf(files["f16"], files[q], q, imatrix=imatrix, tensor_types=tensor_types)
    return files


@dataclass
class ParityReference:
    """The HF model's next-token log-probabilities at every answer position of the parity records, teacher-forced
    on the reference answers: computed once, then compared with each GGUF file.

    Held in host memory: answer tokens x vocabulary x 4 bytes, ~0.4 GB for the default 24 rows (~2,000 answer tokens)
    at the embedded 49k vocabulary, ~1 GB at Llama 3's 128k; export.parity_rows scales it.
    """

    sequences: list[list[int]]  # prompt + answer token ids, one a record
    prompt_lengths: list[int]
    log_probs: list[torch.Tensor]  # (answer tokens, vocabulary) a record


@torch.no_grad()
def parity_reference(hf_model, tokenizer, records: list[dict], output: OutputKind,
                     desc: str = "HF next-token reference") -> ParityReference:
    reference = ParityReference([], [], [])
    for record in tqdm(records, desc=desc, unit="answer"):
        # The tokens training saw (chat.render), through the last answer: its trained span is what is compared.
        rendered = render(tokenizer, record["messages"], **output.template_kwargs())
        trained = [i for i, label in enumerate(rendered.labels) if label != IGNORE]
        end = trained[-1] + 1
        start = end
        while start > 0 and rendered.labels[start - 1] != IGNORE:
            start -= 1
        ids = rendered.input_ids[:end]
        logits = hf_model(torch.tensor([ids])).logits[0].float()
        reference.sequences.append(ids)
        reference.prompt_lengths.append(start)
        # Positions that predict the answer tokens: the last prompt token through the second-to-last answer token.
        reference.log_probs.append(torch.log_softmax(logits[start - 1 : end - 1], -1))
    return reference


def next_token_parity(reference: ParityReference, llm, desc: str = "next-token parity") -> dict:
    """Teacher-forced on each reference answer: top-1 agreement and mean KL(HF || GGUF) per answer token."""
    if not llm._logits_all:  # without it Llama.scores holds no per-position logits, only stale memory
        raise ValueError("next_token_parity needs a model loaded with load_llama(..., logits_all=True)")
    agree, kls, count = 0, [], 0
    for ids, prompt_length, p_log in tqdm(list(zip(reference.sequences, reference.prompt_lengths, reference.log_probs)),
                                          desc=desc, unit="answer"):
        llm.reset()
        llm.eval(ids)
        gg_logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        q_log = torch.log_softmax(gg_logits[prompt_length - 1 : len(ids) - 1], -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += p_log.shape[0]
    return {"top1_agreement": agree / max(1, count), "mean_kl": float(torch.cat(kls).mean()) if kls else 0.0,
            "answer_tokens": count}


# The HF speed probe: enough tokens for a rate, few enough that fp32 generation on a CPU (~20 tokens/s) costs
# seconds, not the minute that 10 prompts x 96 steps took.
SPEED_PROMPTS, SPEED_STEPS = 4, 32


@torch.no_grad()
def hf_speed(hf_model, tokenizer, records: list[dict], max_new_tokens: int, output: OutputKind) -> dict:
    """The HF model's prompt and generation tokens/s on the same prompts, one at a time like llama.cpp."""
    n_prompt, n_gen, t_prompt, t_gen = 0, 0, 0.0, 0.0
    stops = stop_token_ids(tokenizer)
    for record in tqdm(records, desc="HF model speed", unit="prompt"):
        enc = tokenizer(prompt_text(tokenizer, record["messages"], **output.template_kwargs()), add_special_tokens=False,
                        return_tensors="pt")
        start = time.perf_counter()
        hf_model(**enc)
        t_prompt += time.perf_counter() - start
        # A fixed number of decoding steps, past the end of the answer: a label's answer ends with the prefill's own
        # token, leaving nothing to time but the noise between two prefills (sms_spam once read 1.2e10 tokens/s).
        steps = max(2, min(max_new_tokens, SPEED_STEPS))
        start = time.perf_counter()
        out = hf_model.generate(**enc, do_sample=False, min_new_tokens=steps, max_new_tokens=steps,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        t_gen += time.perf_counter() - start
        n_prompt += enc["input_ids"].shape[1]
        n_gen += out.shape[1] - enc["input_ids"].shape[1] - 1  # the first new token comes from the prefill
    # generate() re-reads the prompt; subtract that to compare decoding speed with llama.cpp's.
    t_gen = max(t_gen - t_prompt, 1e-9)
    return {"prompt_tokens_per_second": n_prompt / max(t_prompt, 1e-9), "generation_tokens_per_second": n_gen / t_gen}


def memory_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth as a numpy copy sees it (bytes read + bytes written, best of `repeats`).

    Decoding one token reads every weight once, so bandwidth / file size bounds a single stream's tokens/s."""
    src = np.ones(megabytes * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


@dataclass
class ExportResult:
    """Every model's row (the HF merged model first, then each GGUF file) and each GGUF file's answers."""

    primary: str
    records: list[dict]
    hf_outputs: list[str]
    rows: list[dict]
    outputs: dict[str, list[str]]
    served: str | None
    failures: list[str]
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def row(self, model: str) -> dict:
        return next(r for r in self.rows if r["model"] == model)

    def metrics(self) -> dict:
        """Flat numbers for export.json: one group of keys per GGUF row, named by its short label."""
        hf = self.rows[0]
        out = {"hf_" + self.primary: hf[self.primary], "hf_generation_tokens_per_second": hf["gen_tok_s"],
               "rows": len(self.records), **self.extra}
        for r in self.rows[1:]:
            key = r["label"]
            out.update({f"{key}_size_mb": r["size_mb"], f"{key}_{self.primary}": r[self.primary],
                        f"{key}_delta": r["delta"], f"{key}_delta_ci": r["delta_ci"], f"{key}_rows": r["rows"],
                        f"{key}_top1_agreement": r["top1_agreement"],
                        f"{key}_mean_kl": r["mean_kl"], f"{key}_same_answers_as_reference": r["same_answers_as_reference"],
                        f"{key}_prompt_tokens_per_second": r["prompt_tok_s"],
                        f"{key}_generation_tokens_per_second": r["gen_tok_s"],
                        f"{key}_bandwidth_bound_fraction": r["bandwidth_bound_fraction"]})
            if "routed_delta" in r:  # the served system: this file's answers routed with the classical model's
                out.update({f"{key}_routed_{self.primary}": r[f"routed_{self.primary}"],
                            f"{key}_routed_delta": r["routed_delta"], f"{key}_routed_delta_ci": r["routed_delta_ci"],
                            f"{key}_routed_deferred_share": r["routed_deferred_share"]})
        if f"routed_{self.primary}" in hf:
            out[f"hf_routed_{self.primary}"] = hf[f"routed_{self.primary}"]
        return {**out, "served_quantization": self.served, "gate_passed": not self.failures}


def gate(rows: list[dict], primary: str, spec: ExportSpec) -> tuple[str | None, list[str], list[str]]:
    """(served type, failures, notes): the smallest kept quantized file that passes every bar (or only
    export.gate_quantization, when it names a type).

    - The primary metric, against the f16 file (the fp32 HF model's twin) on the same rows: a file fails only when
      its drop is significantly beyond export.max_metric_drop, that is when even the low end of the paired 95%
      interval of f16 - file (each row's `delta_ci` negated) is above the allowance. A larger drop that the interval
      does not confirm is within the noise of the rows evaluated (export.max_rows): the file passes, with a note.
    - Next-token agreement with the HF model at least export.min_top1_agreement, as measured: it counts every
      teacher-forced answer token of the parity rows (~2,000), not a few dozen answers.
    - Where the task routes (ExportRouting): the routed answers (this file's or the classical model's, as serve
      answers) against the f16 file's routed answers, under the same rule as the fine-tune's drop. It is checked
      whether or not serve.route is on, so the served file is good for either.
    """
    candidates = sorted((r for r in rows if r.get("kept_quantization")), key=lambda r: r["size_mb"])
    if spec.gate_quantization != "smallest":
        candidates = [r for r in candidates if r["kept_quantization"] == spec.gate_quantization]
    notes = []
    for r in candidates:
        drop = -Interval.from_metrics(r, "delta")
        measured = f"{primary} {drop.describe()} below the f16 file's, the fp32 HF model's twin, on {r['rows']} rows"
        short = []
        if drop.low > spec.max_metric_drop:
            short.append(f"{measured}: beyond the {spec.max_metric_drop} allowed even at the interval's low end")
        # Where the task routes (ExportRouting), the served system's answers are gated as well as the fine-tune's.
        routed_drop = Interval.from_metrics(r, "routed_delta")
        if routed_drop is not None and (-routed_drop).low > spec.max_metric_drop:
            short.append(f"routed (fine-tune or classical model, as served) {primary} {(-routed_drop).describe()} below "
                         f"the f16 file's routed answers: beyond the {spec.max_metric_drop} allowed even at the "
                         "interval's low end")
        if r["top1_agreement"] < spec.min_top1_agreement:
            short.append(f"top-1 agreement {r['top1_agreement']:.3f} < {spec.min_top1_agreement} "
                         f"(short by {spec.min_top1_agreement - r['top1_agreement']:.3f})")
        if not short:
            if drop.estimate > spec.max_metric_drop:
                notes.append(f"{r['kept_quantization']} passes: {measured}, more than the {spec.max_metric_drop} "
                             "allowed but within the noise of these rows (the interval reaches the allowance)")
            if routed_drop is not None and (-routed_drop).estimate > spec.max_metric_drop:
                notes.append(f"{r['kept_quantization']} passes: routed {primary} {(-routed_drop).describe()} below the "
                             f"f16 file's routed answers, more than the {spec.max_metric_drop} allowed but within the "
                             "noise of these rows")
            return r["kept_quantization"], [], notes
        notes.append(f"{r['kept_quantization']} ({r['size_mb']:.0f} MB) does not pass: " + "; ".join(short))
    return None, notes or ["no quantized file to gate"], notes


@dataclass
class ExportRouting:
    """The evaluation stage's router (models/<task>/classical/router.json) and the classical model's answers and raw
    confidences on the export rows (from its predictions): each GGUF file's answers are routed as `tuneforge serve`
    routes them, so the gate also vouches for the served system, not only for the fine-tune alone."""

    router: Router
    answers: list[str]
    confidences: list[float]
    reference: list[str]  # the routed answers the deltas are taken against (the HF model's, then the f16 file's)

    @classmethod
    def load(cls, task: str, rows: list[dict]) -> ExportRouting | None:
        router = load_router(classical_dir(task))
        if router is None:
            return None
        return cls(router, [r["baseline_output"] for r in rows], [r["baseline_confidence"] for r in rows],
                   [r["routed_output"] for r in rows])

    def route(self, outputs: list[str], confidences: list[float]) -> tuple[list[str], float]:
        """The routed answers at 0% deferral (as evaluate's routed_*) and the share routing would defer."""
        n = len(outputs)
        routes = self.router.route(confidences, self.confidences[:n])
        return Router.answers(routes, outputs, self.answers[:n]), float(np.mean([r.deferred for r in routes])) if n else 0.0


class _Evaluator:
    """Runs one GGUF model over the test records and the parity records and returns its table row."""

    def __init__(self, parity: ParityReference, tokenizer, spec, cfg: ExportSpec, records, reference: list[str],
                 bandwidth: float, routing: ExportRouting | None):
        """reference: the answers every file's metric delta and same-answer rate are taken against."""
        self.parity, self.tokenizer, self.spec, self.cfg = parity, tokenizer, spec, cfg
        self.records, self.reference, self.bandwidth, self.routing = records, reference, bandwidth, routing
        self.primary = spec.primary_metric

    def row(self, model: str, label: str, path: Path, size_bytes: int, rows: int,
            make_llm) -> tuple[dict, list[str], list[str] | None]:
        """(table row, the file's answers, its routed answers: None without a router).
        make_llm(logits_all) -> a llama_cpp.Llama ready to run (for an adapter: with it applied)."""
        records, hf_outputs = self.records[:rows], self.reference[:rows]
        llm = make_llm(False)
        output = self.spec.output.bind(self.tokenizer)
        run = generate_gguf(llm, self.tokenizer, records, self.spec.max_new_tokens, output, desc=f"{model} answers",
                            grammars=grammars_for(output, records))  # decoded as evaluated and served
        llm.close()
        llm = make_llm(True)
        parity = next_token_parity(self.parity, llm, desc=f"{model} next-token parity")
        llm.close()
        score = score_outputs(self.spec, records, run.outputs)[self.primary]
        # Paired on the same rows: the gate's evidence that a drop is more than the noise of these rows.
        delta = paired_difference(self.spec, records, run.outputs, hf_outputs, self.primary)
        limit = self.bandwidth * 1e9 / size_bytes  # tokens/s if each token only had to stream the file once
        routed, answers = {}, None
        if self.routing is not None:
            answers, deferred = self.routing.route(run.outputs, run.confidences)
            routed = {f"routed_{self.primary}": score_outputs(self.spec, records, answers)[self.primary],
                      **paired_difference(self.spec, records, answers, self.routing.reference[:rows],
                                          self.primary).to_metrics("routed_delta"),
                      "routed_deferred_share": deferred}
        return ({"model": model, "label": label, "file": str(path.relative_to(repo_root())), "size_mb": size_bytes / 1e6,
                 self.primary: score, **delta.to_metrics("delta"), "rows": len(records),
                 "top1_agreement": parity["top1_agreement"], "mean_kl": parity["mean_kl"],
                 "same_answers_as_reference": float(np.mean([a == b for a, b in zip(run.outputs, hf_outputs)])) if records else None,
                 "prompt_tok_s": run.prompt_tokens_per_second, "gen_tok_s": run.generation_tokens_per_second,
                 "bandwidth_limit_tok_s": limit, "bandwidth_bound_fraction": run.generation_tokens_per_second / limit,
                 **routed},
                run.outputs, answers)


def run_export(task: str, params: Params) -> ExportResult:
    """Merge, convert, calibrate, quantize; convert the adapter; then every file answers the same test prompts
    and is scored and compared with the HF model; the gate picks the smallest file that keeps the fine-tune."""
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    spec, cfg = params.task(task), params.export
    merged = merged_dir(task)
    merge_adapter(base_model_dir(), adapter_dir(task), merged, params.model.trust_remote_code)
    tokenizer = load_tokenizer(merged)
    hf_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32,
                                                    trust_remote_code=params.model.trust_remote_code)
    files = gguf_files(gguf_dir(task), cfg.quantizations)
    convert_to_gguf(merged, files["f16"], "f16")
    imatrix, imatrix_rows, imatrix_seconds = None, 0, 0.0
    if cfg.imatrix_rows:
        start = time.perf_counter()
        train_rows = read_jsonl(processed_dir(task) / "train.jsonl")[: cfg.imatrix_rows]
        imatrix = collect_imatrix(hf_model, tokenizer, train_rows, files["f16"], params.train.max_seq_len,
                                  spec.output.template_kwargs())
        imatrix_rows = len(train_rows)
        imatrix_seconds = time.perf_counter() - start
    for q in cfg.quantizations:
        quantize_gguf(files["f16"], files[q], q, imatrix=imatrix, tensor_types=cfg.tensor_types)
    convert_lora_to_gguf(adapter_dir(task), base_model_dir(), adapter_gguf_file(task))
    base_file = base_gguf_file(cfg.base_quantization)
    if not base_file.is_file():
        raise FileNotFoundError(f"{base_file} does not exist: run `dvc repro base_gguf` first")

    test = {r["id"]: r for r in read_jsonl(processed_dir(task) / "test.jsonl")}
    predictions = read_jsonl(predictions_file(task))  # the HF tuned model's answers from the evaluation stage
    rows = predictions[: cfg.max_rows] if cfg.max_rows else predictions
    records = [test[p["id"]] for p in rows]
    hf_outputs = [p["tuned_output"] for p in rows]
    primary = spec.primary_metric
    bandwidth = memory_bandwidth_gb_s()
    speed = hf_speed(hf_model, tokenizer, records[:SPEED_PROMPTS], spec.max_new_tokens, spec.output)
    merged_bytes = (merged / "model.safetensors").stat().st_size
    table = [{"model": "HF merged (fp32 safetensors)", "label": "hf", "file": str(merged / "model.safetensors"),
              "size_mb": merged_bytes / 1e6, primary: score_outputs(spec, records, hf_outputs)[primary],
              "delta": 0.0, "rows": len(records), "top1_agreement": 1.0, "mean_kl": 0.0, "same_answers_as_reference": 1.0,
              "prompt_tok_s": speed["prompt_tokens_per_second"], "gen_tok_s": speed["generation_tokens_per_second"],
              "bandwidth_limit_tok_s": bandwidth * 1e9 / merged_bytes,
              "bandwidth_bound_fraction": speed["generation_tokens_per_second"] * merged_bytes / (bandwidth * 1e9)}]
    routing = ExportRouting.load(task, rows)
    if routing is not None:
        table[0][f"routed_{primary}"] = score_outputs(spec, records, routing.reference)[primary]
    parity = parity_reference(hf_model, tokenizer, records[: cfg.parity_rows], spec.output)
    evaluator = _Evaluator(parity, tokenizer, spec, cfg, records, hf_outputs, bandwidth, routing)
    outputs: dict[str, list[str]] = {}

    def add(model: str, label: str, path: Path, n_rows: int, make_llm, size_bytes: int | None = None,
            **extra) -> list[str] | None:
        """Runs one file, adds its row; returns its routed answers (None where the task does not route)."""
        row, answers, routed = evaluator.row(model, label, path, size_bytes or path.stat().st_size, n_rows, make_llm)
        table.append({**row, **extra})
        outputs[label] = answers
        return routed

    def plain(path: Path):
        return lambda logits_all: load_llama(path, logits_all=logits_all, n_threads=cfg.n_threads)

    # The f16 file is the fp32 HF model's twin (KL ~1e-6, top-1 1.0) and answers greedily in fp32; the evaluation
    # stage's answers come from batched bf16 generation on CUDA and AMX CPUs, and differ from fp32's on most long
    # answers (measured: f16 gave the same answer on 30% of address_json rows). So every file is compared with
    # the f16 file's answers on the same rows: the delta is what quantization costs, not bf16 noise.
    f16_routed = add("GGUF f16", "f16", files["f16"], len(records), plain(files["f16"]))
    evaluator.reference = outputs["f16"]
    if routing is not None:
        routing.reference = f16_routed
    calibrated = " (task imatrix)" if imatrix else ""
    with tempfile.TemporaryDirectory(dir=gguf_dir(task)) as scratch:
        for q in cfg.quantizations:
            add(f"GGUF {q}{calibrated}", q, files[q], len(records), plain(files[q]), kept_quantization=q)
            if imatrix and cfg.compare_without_imatrix:
                uncalibrated = quantize_gguf(files["f16"], gguf_file(Path(scratch), q), q, tensor_types=cfg.tensor_types)
                if file_sha256(uncalibrated) == file_sha256(files[q]):  # e.g. Q8_0: its rounding ignores the imatrix
                    table[-1]["imatrix_effect"] = "none (same bytes)"
                    continue
                add(f"GGUF {q} without imatrix", f"{q}_no_imatrix", uncalibrated, len(records), plain(uncalibrated))
                table[-1]["file"] = "(not kept)"
                uncalibrated.unlink()

    # The task's adapter over the shared base file, as `tuneforge serve` without --task runs it.
    def with_adapter(logits_all: bool):
        switch = AdapterSwitch.load(base_file, {task: adapter_gguf_file(task)}, n_threads=cfg.n_threads, logits_all=logits_all)
        switch.use(task)
        return switch.llm

    # Its size is what a token reads: the base file and the adapter (export.json also gives the adapter alone).
    # Not gated, so it answers the parity rows only: what it shows is how often it answers as the merged file of
    # the same type (on address_json all 80 rows cost 71 s of the stage's 336).
    add(f"GGUF base {cfg.base_quantization} + adapter", "adapter", adapter_gguf_file(task),
        min(cfg.parity_rows, len(records)), with_adapter,
        size_bytes=base_file.stat().st_size + adapter_gguf_file(task).stat().st_size)
    merged_same_type = outputs.get(cfg.base_quantization)
    # The rows that decided the gate (export.max_rows of them) out of the evaluated test split.
    extra = {"test_rows": len(predictions), "memory_bandwidth_gb_s": bandwidth, "imatrix_rows": imatrix_rows,
             "imatrix_seconds": imatrix_seconds, "adapter_file_size_mb": adapter_gguf_file(task).stat().st_size / 1e6,
             "base_gguf_size_mb": base_file.stat().st_size / 1e6}
    if merged_same_type is not None:
        # How often base + adapter answers exactly as the merged file of the same type (rounding differs slightly).
        extra["adapter_same_answers_as_merged"] = float(np.mean([a == b for a, b in zip(outputs["adapter"], merged_same_type)]))
    served, failures, notes = gate(table, primary, cfg)
    extra["seconds"] = time.perf_counter() - started
    return ExportResult(primary, records, hf_outputs, table, outputs, served, failures, notes, extra)
