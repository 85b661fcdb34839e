"""Running GGUF files with llama-cpp-python: loading, greedy generation from the HF chat template's tokens,
file names and checksums. Shared by the export stage, `tuneforge serve` and the demo-traffic script.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from tuneforge.core.chat import prompt_text, stop_token_ids

if TYPE_CHECKING:
    from tuneforge.core.kinds import OutputKind

# Spin-waiting OpenMP threads stall llama.cpp on a busy 2-core machine (a run went from 3 s to >120 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_llama(gguf_file: Path, *, logits_all: bool = False, n_ctx: int = 1024, n_threads: int | None = None):
    """logits_all=True keeps every position's logits (next_token_parity needs them; generation does not)."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_file), n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), logits_all=logits_all,
                 verbose=False, seed=0)


@dataclass
class GgufRun:
    """One dict per record: output, confidence (core.router.answer_confidence), prompt_tokens, generated_tokens,
    prompt_seconds, generation_seconds."""

    results: list[dict]

    @property
    def outputs(self) -> list[str]:
        return [r["output"] for r in self.results]

    @property
    def confidences(self) -> list[float]:
        return [r["confidence"] for r in self.results]

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


def generate_gguf(llm, tokenizer, records: list[dict], max_new_tokens: int, output: OutputKind | None = None,
                  desc: str | None = None, grammars: list[str] | None = None) -> GgufRun:
    """Greedy answers to each record's conversation minus its last (reference) message; with desc, a progress bar.

    The prompt is the HF tokenizer's chat-template rendering, fed as token ids, so the GGUF model reads exactly
    the tokens the HF model read in evaluation; create_chat_completion re-renders and re-tokenizes inside llama.cpp.
    grammars: one GBNF grammar a record (core.constraints), applied with the same masking as HF evaluation.
    output: the task's output kind, bound to the tokenizer: its template arguments and how it reads an answer
    (None: the decoded text is the answer).
    """
    from tuneforge.core.constraints import GrammarMatcher, mask_logits
    from llama_cpp import Llama

    from tuneforge.core.router import answer_confidence

    stops = set(stop_token_ids(tokenizer))
    results = []
    for i, record in enumerate(tqdm(records, desc=desc, unit="answer", disable=desc is None)):
        matcher = GrammarMatcher(tokenizer, llm.n_vocab(), grammars[i]) if grammars is not None else None
        ids = tokenizer(prompt_text(tokenizer, record["messages"], **(output.template_kwargs() if output else {})),
                        add_special_tokens=False)["input_ids"]
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prompt_seconds = time.perf_counter() - start
        answer: list[int] = []
        log_probs: list[float] = []  # each answer token's, under the logits before the grammar (the confidence)
        start = time.perf_counter()
        for _ in range(max_new_tokens):
            raw = last_logits(llm)
            logits = mask_logits(raw.copy(), matcher.allowed()) if matcher is not None else raw
            token = int(np.argmax(logits))
            if token in stops:
                break
            if matcher is not None:
                matcher.consume(token)
            answer.append(token)
            log_probs.append(float(Llama.logits_to_logprobs(raw)[token]))  # as serve's logprobs compute it
            llm.eval([token])
        text = tokenizer.decode(answer, skip_special_tokens=True).strip()
        results.append({"output": output.from_generation(text) if output else text,
                        "confidence": answer_confidence(log_probs),
                        "prompt_tokens": len(ids),
                        "generated_tokens": len(answer), "prompt_seconds": prompt_seconds,
                        "generation_seconds": time.perf_counter() - start})
    return GgufRun(results)


def gguf_files(folder: Path, quantizations: list[str]) -> dict[str, Path]:
    """The f16 file and one file a quantization type, in folder."""
    from tuneforge.core.paths import gguf_file

    return {q: gguf_file(folder, q) for q in ("f16", *quantizations)}


def served_quantization(task: str) -> str:
    """The type the export gate vouched for (the smallest file that passed), read from metrics/<task>/export.json."""
    import json

    from tuneforge.core.paths import metrics_file

    path = metrics_file(task, "export")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `dvc repro export@{task}` (or name a --quantization)")
    served = json.loads(path.read_text()).get("served_quantization")
    if not served:
        raise ValueError(f"{path}: no GGUF file passed the export gate for {task}; name a --quantization to serve one anyway")
    return served


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
