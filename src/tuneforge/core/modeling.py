"""Loading the base model and its tokenizer (saved in models/base/ by the base_model stage), and the device
and dtype they run with."""

from __future__ import annotations

import math
from pathlib import Path

import torch


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


def bf16_weight_bytes(model_dir: Path) -> int:
    """What the base's weights take in bf16, read from the safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    numel = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                numel += math.prod(f.get_slice(name).get_shape())
    if not numel:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (run the base_model stage)")
    return 2 * numel


def free_gpu_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


def liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def choose_kernels(setting: str, device_type: str) -> tuple[str, str]:
    """("liger" or "none", why). Liger's kernels are Triton, so GPU-only; on a CPU nothing changes."""
    if setting == "none":
        return "none", "train.kernels: none"
    if device_type != "cuda":
        if setting == "liger":
            raise ValueError("train.kernels: liger needs a CUDA GPU (Liger's kernels are Triton); use auto or none")
        return "none", "no GPU: PyTorch's kernels (Liger's are Triton, GPU-only)"
    if not liger_installed():
        if setting == "liger":
            raise ImportError("train.kernels: liger, but liger-kernel is not installed: pip install 'tuneforge[gpu]'")
        return "none", "liger-kernel is not installed (pip install 'tuneforge[gpu]'): PyTorch's kernels"
    return "liger", f"train.kernels: {setting}: Liger's kernels on CUDA"


def apply_liger_kernels(model) -> str:
    """Liger's RMSNorm, SwiGLU and RoPE into a transformers CausalLM, in place (before peft wraps it), and its fused
    linear cross-entropy for batching.answer_loss (the head and the loss in chunks: no full logits tensor).

    Returns what was applied. The fused loss works for any architecture; the layer kernels only for the families
    liger-kernel knows (llama, qwen2/3, mistral, gemma, phi3, ...).
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from liger_kernel.transformers.monkey_patch import (
        MODEL_TYPE_TO_APPLY_LIGER_FN,
        _apply_liger_kernel_to_instance,
    )

    model.fused_linear_cross_entropy = LigerFusedLinearCrossEntropyLoss(
        reduction="sum", softcap=getattr(model.config, "final_logit_softcapping", None))
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"fused linear cross-entropy only (liger-kernel has no layer kernels for {model.config.model_type})"
    # The loss is fused in batching.answer_loss (every position, untrained ones ignored), not in the model's forward.
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    return "RMSNorm, SwiGLU, RoPE and fused linear cross-entropy"
