"""Merged model -> GGUF (llama.cpp's own converter) -> quantized, run and checked with llama-cpp-python.

The converter comes from the sdist of the same llama-cpp-python version that runs the files
(scripts/fetch_gguf_converter.sh puts it in vendor/), so the writer and the reader always match.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tuneforge.core.chat import end_of_turn, prompt_text, stop_token_ids, tokens_after
from tuneforge.core.constraints import grammars_for
# converter_dir is re-exported: callers (tests/test_export.py) check export.converter_dir().
from tuneforge.core.gguf import converter_dir, generate_gguf, gguf_files, load_llama, run_converter  # noqa: F401
from tuneforge.core.metrics import score_outputs
from tuneforge.core.modeling import load_tokenizer
from tuneforge.core.params import ExportSpec, Params
from tuneforge.core.paths import (
    base_model_dir,
    models_dir,
    predictions_file,
    processed_dir,
    repo_root,
)
from tuneforge.core.records import read_jsonl

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


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    result = run_converter(hf_dir, out_file, "--outtype", outtype)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {hf_dir}:\n{result.stderr[-3000:]}")
    return out_file


def quantize_gguf(in_file: Path, out_file: Path, qtype: str) -> Path:
    import llama_cpp
    from llama_cpp._logger import (
        llama_log_callback,  # the callback llama-cpp-python installs at import
    )

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        known = sorted(n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ValueError(f"unknown quantization type {qtype!r}; llama.cpp knows {known}")
    if not in_file.is_file():
        raise FileNotFoundError(f"{in_file} does not exist: convert the model to GGUF first")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1  # 0 would mean the host's core count, not the ones this process may use
    # llama.cpp logs every tensor (~230 kB in a notebook), and llama-cpp-python's log filter reads ggml's levels
    # off by one (warnings pass at verbose=False, errors never do): collect the log, show it only on failure.
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        code = llama_cpp.llama_model_quantize(str(in_file).encode(), str(out_file).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({in_file} -> {qtype}) returned {code}:\n{''.join(lines)[-3000:]}")
    # e.g. k-quants need rows divisible by 256; SmolLM2-135M's 576 falls back to q5_0/q8_0 for most tensors.
    for line in lines:
        if "required fallback quantization" in line:
            logging.getLogger(__name__).warning("%s: %s", out_file.name, line.strip())
    return out_file


@torch.no_grad()
def next_token_parity(hf_model, tokenizer, llm, records: list[dict], desc: str = "next-token parity") -> dict:
    """Teacher-forced on each reference answer: top-1 agreement and mean KL(HF || GGUF) per answer token."""
    if not llm._logits_all:  # without it Llama.scores holds no per-position logits, only stale memory
        raise ValueError("next_token_parity needs a model loaded with load_llama(..., logits_all=True)")
    agree, kls, count = 0, [], 0
    for record in tqdm(records, desc=desc, unit="answer"):
        text = prompt_text(tokenizer, record["messages"])
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        # Tokenized after the prompt, as chat.render does for training.
        answer = tokens_after(tokenizer, text, prompt, record["messages"][-1]["content"] + end_of_turn(tokenizer))
        ids = prompt + answer
        hf_logits = hf_model(torch.tensor([ids])).logits[0].float()
        llm.reset()
        llm.eval(ids)
        gg_logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        # Positions that predict the answer tokens: the last prompt token through the second-to-last answer token.
        rows = slice(len(prompt) - 1, len(ids) - 1)
        p_log = torch.log_softmax(hf_logits[rows], -1)
        q_log = torch.log_softmax(gg_logits[rows], -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += p_log.shape[0]
    return {"top1_agreement": agree / max(1, count), "mean_kl": float(torch.cat(kls).mean()), "answer_tokens": count}


@torch.no_grad()
def hf_speed(hf_model, tokenizer, records: list[dict], max_new_tokens: int) -> dict:
    """The HF model's prompt and generation tokens/s on the same prompts, one at a time like llama.cpp."""
    n_prompt, n_gen, t_prompt, t_gen = 0, 0, 0.0, 0.0
    stops = stop_token_ids(tokenizer)
    for record in tqdm(records, desc="HF model speed", unit="prompt"):
        enc = tokenizer(prompt_text(tokenizer, record["messages"]), add_special_tokens=False, return_tensors="pt")
        start = time.perf_counter()
        hf_model(**enc)
        t_prompt += time.perf_counter() - start
        start = time.perf_counter()
        out = hf_model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        t_gen += time.perf_counter() - start
        n_prompt += enc["input_ids"].shape[1]
        # Without the final end-of-turn token, as generate_gguf counts.
        n_gen += sum(int(t) not in stops for t in out[0, enc["input_ids"].shape[1]:])
    # generate() re-reads the prompt; subtract that to compare decoding speed with llama.cpp's.
    t_gen = max(t_gen - t_prompt, 1e-9)
    return {"prompt_tokens_per_second": n_prompt / max(t_prompt, 1e-9), "generation_tokens_per_second": n_gen / t_gen}


def export_all(merged_dir: Path, gguf_dir: Path, quantizations: list[str]) -> dict[str, Path]:
    """f16 with the converter, then each quantization from the f16 file."""
    files = gguf_files(gguf_dir, quantizations)
    with tqdm(total=len(files), desc="GGUF files (f16, then each quantization)", unit="file") as bar:
        convert_to_gguf(merged_dir, files["f16"], "f16")
        bar.update()
        for q in quantizations:
            quantize_gguf(files["f16"], files[q], q)
            bar.update()
    return files




@dataclass
class ExportResult:
    """Every model's row (the HF merged model first, then each GGUF file) and each GGUF file's answers."""

    primary: str
    records: list[dict]
    hf_outputs: list[str]
    rows: list[dict]
    outputs: dict[str, list[str]]
    failures: list[str]

    def row(self, model: str) -> dict:
        return next(r for r in self.rows if r["model"] == model)

    def metrics(self, gguf_names: list[str]) -> dict:
        """Flat numbers for export.json."""
        hf = self.rows[0]
        out = {"hf_" + self.primary: hf[self.primary], "hf_generation_tokens_per_second": hf["gen_tok_s"],
               "rows": len(self.records)}
        for name in gguf_names:
            r = self.row(f"GGUF {name}")
            out.update({f"{name}_size_mb": r["size_mb"], f"{name}_{self.primary}": r[self.primary],
                        f"{name}_delta": r["delta"], f"{name}_top1_agreement": r["top1_agreement"],
                        f"{name}_mean_kl": r["mean_kl"], f"{name}_prompt_tokens_per_second": r["prompt_tok_s"],
                        f"{name}_generation_tokens_per_second": r["gen_tok_s"]})
        return {**out, "gate_passed": not self.failures}


def gate(result_rows: list[dict], primary: str, spec: ExportSpec) -> list[str]:
    """The gated file may lose at most export.max_metric_drop of the HF model's primary metric."""
    hf = result_rows[0][primary]
    gated = next(r for r in result_rows if r["model"] == f"GGUF {spec.gate_quantization}")
    if gated["delta"] < -spec.max_metric_drop:
        return [f"{spec.gate_quantization} {primary} {gated[primary]:.3f} is {-gated['delta']:.3f} below the HF "
                f"model's {hf:.3f} (export.max_metric_drop = {spec.max_metric_drop})"]
    return []


def run_export(task: str, params: Params) -> ExportResult:
    """Merge, convert, quantize; then every file answers the same test prompts and is scored and compared."""
    from transformers import AutoModelForCausalLM

    spec, cfg = params.task(task), params.export
    merged_dir, gguf_dir = models_dir(task) / "merged", models_dir(task) / "gguf"
    merge_adapter(base_model_dir(), models_dir(task) / "adapter", merged_dir, params.model.trust_remote_code)
    files = export_all(merged_dir, gguf_dir, cfg.quantizations)

    tokenizer = load_tokenizer(merged_dir)
    test = {r["id"]: r for r in read_jsonl(processed_dir(task) / "test.jsonl")}
    predictions = read_jsonl(predictions_file(task))  # the HF tuned model's answers from the evaluation stage
    rows = predictions[: cfg.max_rows] if cfg.max_rows else predictions
    records = [test[p["id"]] for p in rows]
    hf_outputs = [p["tuned_output"] for p in rows]
    hf_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32,
                                                    trust_remote_code=params.model.trust_remote_code)
    primary = spec.primary_metric
    hf_score = score_outputs(spec, records, hf_outputs)[primary]
    speed = hf_speed(hf_model, tokenizer, records[:10], spec.max_new_tokens)
    table = [{"model": "HF merged (fp32 safetensors)", "file": str(merged_dir / "model.safetensors"),
              "size_mb": (merged_dir / "model.safetensors").stat().st_size / 1e6, primary: hf_score,
              "delta": 0.0, "top1_agreement": 1.0, "mean_kl": 0.0,
              "prompt_tok_s": speed["prompt_tokens_per_second"], "gen_tok_s": speed["generation_tokens_per_second"]}]
    outputs = {}
    for name, path in files.items():
        run = generate_gguf(load_llama(path, n_threads=cfg.n_threads), tokenizer, records, spec.max_new_tokens,
                            desc=f"GGUF {name} answers",
                            grammars=grammars_for(spec.output, records))  # decoded as evaluated and served
        parity = next_token_parity(hf_model, tokenizer, load_llama(path, logits_all=True, n_threads=cfg.n_threads),
                                   records[: cfg.parity_rows], desc=f"GGUF {name} next-token parity")
        score = score_outputs(spec, records, run.outputs)[primary]
        outputs[name] = run.outputs
        table.append({"model": f"GGUF {name}", "file": str(path.relative_to(repo_root())),
                      "size_mb": path.stat().st_size / 1e6, primary: score, "delta": score - hf_score,
                      "top1_agreement": parity["top1_agreement"], "mean_kl": parity["mean_kl"],
                      "prompt_tok_s": run.prompt_tokens_per_second, "gen_tok_s": run.generation_tokens_per_second})
    return ExportResult(primary, records, hf_outputs, table, outputs, gate(table, primary, cfg))
