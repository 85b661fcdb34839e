"""Merged model -> GGUF (llama.cpp's own converter) -> quantized, run and checked with llama-cpp-python.

The converter comes from the sdist of the same llama-cpp-python version that runs the files
(scripts/fetch_gguf_converter.sh puts it in vendor/), so the writer and the reader always match.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tuneforge.chat import prompt_text
from tuneforge.paths import repo_root

# Spin-waiting OpenMP threads stall llama.cpp on a busy 2-core machine (a run went from 3 s to >120 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def converter_dir() -> Path:
    folder = repo_root() / "vendor" / "llama.cpp-converter"
    if not (folder / "convert_hf_to_gguf.py").exists():
        raise FileNotFoundError(f"{folder} is missing: run scripts/fetch_gguf_converter.sh (scripts/setup.sh does)")
    return folder


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
    return out_dir


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    folder = converter_dir()
    # The bundled gguf-py first: PyPI's gguf is a different version and breaks this converter (LazyChunkedTensor).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder / "gguf-py"), str(folder)]), "HF_HUB_OFFLINE": "1"}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, str(folder / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile",
                             str(out_file), "--outtype", outtype], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {hf_dir}:\n{result.stderr[-3000:]}")
    return out_file


def quantize_gguf(in_file: Path, out_file: Path, qtype: str) -> Path:
    import llama_cpp
    from llama_cpp._logger import llama_log_callback  # the callback llama-cpp-python installs at import

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


def load_llama(gguf_file: Path, *, logits_all: bool = False, n_ctx: int = 1024, n_threads: int | None = None):
    """logits_all=True keeps every position's logits (next_token_parity needs them; generation does not)."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), logits_all=logits_all,
                 verbose=False, seed=0)


@dataclass
class GgufRun:
    """One dict per record: output, prompt_tokens, generated_tokens, prompt_seconds, generation_seconds."""

    results: list[dict]

    @property
    def outputs(self) -> list[str]:
        return [r["output"] for r in self.results]

    def total(self, key: str) -> float:
        return sum(r[key] for r in self.results)

    @property
    def generated_tokens(self) -> int:
        return int(self.total("generated_tokens"))

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.total("prompt_tokens") / max(self.total("prompt_seconds"), 1e-9)

    @property
    def generation_tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.total("generation_seconds"), 1e-9)


def last_logits(llm) -> np.ndarray:
    """Logits after the last evaluated token, read from the context (Llama.scores holds them only with logits_all)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def generate_gguf(llm, tokenizer, records: list[dict], max_new_tokens: int) -> GgufRun:
    """Greedy answers to each record's conversation minus its last (reference) message.

    The prompt is the HF tokenizer's chat-template rendering, fed as token ids, so the GGUF model reads exactly
    the tokens the HF model read in evaluation; create_chat_completion re-renders and re-tokenizes inside llama.cpp.
    """
    eos = tokenizer.eos_token_id
    results = []
    for record in records:
        ids = tokenizer(prompt_text(tokenizer, record["messages"]), add_special_tokens=False)["input_ids"]
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prompt_seconds = time.perf_counter() - start
        answer: list[int] = []
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            token = int(np.argmax(last_logits(llm)))
            if token == eos:
                break
            answer.append(token)
            llm.eval([token])
        results.append({"output": tokenizer.decode(answer, skip_special_tokens=True).strip(), "prompt_tokens": len(ids),
                        "generated_tokens": len(answer), "prompt_seconds": prompt_seconds,
                        "generation_seconds": time.perf_counter() - start})
    return GgufRun(results)


@torch.no_grad()
def next_token_parity(hf_model, tokenizer, llm, records: list[dict]) -> dict:
    """Teacher-forced on each reference answer: top-1 agreement and mean KL(HF || GGUF) per answer token."""
    if not llm._logits_all:  # without it Llama.scores holds no per-position logits, only stale memory
        raise ValueError("next_token_parity needs a model loaded with load_llama(..., logits_all=True)")
    agree, kls, count = 0, [], 0
    for record in records:
        prompt = tokenizer(prompt_text(tokenizer, record["messages"]), add_special_tokens=False)["input_ids"]
        # Tokenized apart from the prompt, as chat.render does for training.
        answer = tokenizer(record["messages"][-1]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
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
    for record in records:
        enc = tokenizer(prompt_text(tokenizer, record["messages"]), add_special_tokens=False, return_tensors="pt")
        start = time.perf_counter()
        hf_model(**enc)
        t_prompt += time.perf_counter() - start
        start = time.perf_counter()
        out = hf_model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        t_gen += time.perf_counter() - start
        n_prompt += enc["input_ids"].shape[1]
        # Without the final end-of-turn token, as generate_gguf counts.
        n_gen += int((out[0, enc["input_ids"].shape[1]:] != tokenizer.eos_token_id).sum())
    # generate() re-reads the prompt; subtract that to compare decoding speed with llama.cpp's.
    t_gen = max(t_gen - t_prompt, 1e-9)
    return {"prompt_tokens_per_second": n_prompt / max(t_prompt, 1e-9), "generation_tokens_per_second": n_gen / t_gen}


def gguf_files(folder: Path, quantizations: list[str]) -> dict[str, Path]:
    return {"f16": folder / "model-f16.gguf", **{q: folder / f"model-{q}.gguf" for q in quantizations}}


def export_all(merged_dir: Path, gguf_dir: Path, quantizations: list[str]) -> dict[str, Path]:
    """f16 with the converter, then each quantization from the f16 file."""
    files = gguf_files(gguf_dir, quantizations)
    convert_to_gguf(merged_dir, files["f16"], "f16")
    for q in quantizations:
        quantize_gguf(files["f16"], files[q], q)
    return files


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
