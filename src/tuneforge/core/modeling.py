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


VARLEN_ATTENTION = "tuneforge_varlen"  # the name it is registered under in transformers' AttentionInterface


def varlen_attention_unsupported(config, device: torch.device) -> str | None:
    """Why PyTorch's variable-length (Flash) attention cannot replace this model's, or None when it can.

    It computes plain causal attention within each packed example: models whose attention adds anything else
    (sliding windows, logit soft-capping) keep transformers' own path with its block-diagonal mask.
    """
    if device.type != "cuda":
        return "no GPU"
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401 (PyTorch >= 2.10)
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "Flash attention needs a GPU of compute capability 8.0 or later"
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return f"{cfg.model_type} uses sliding-window attention"
        if getattr(cfg, "attn_logit_softcapping", None):
            return f"{cfg.model_type} soft-caps attention logits"
        if getattr(cfg, "attention_dropout", 0.0):
            return f"{cfg.model_type} drops attention weights out (attention_dropout)"
    return None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, cu_seq_lens_q=None,
                     max_length_q=None, **kwargs):
    """transformers attention over packed rows with PyTorch's variable-length Flash attention.

    The collator gives each micro-batch its examples' boundaries (`cu_seq_lens_q`, `max_length_q`: the keys
    transformers' own Flash path reads), computed on the host: the rows are flattened into one sequence of
    examples and each attends causally within itself. transformers' SDPA path instead finds the boundaries
    from position_ids on the GPU (a host sync every forward) and builds a block-diagonal mask, which sends
    SDPA to a kernel that computes the masked-out blocks too. Rows without boundaries (unpacked ones) are
    one causal sequence each, as under SDPA with no mask.
    """
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    batch, heads, length, dim = query.shape  # transformers' layout: (batch, heads, tokens, head dim)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    if k.shape[1] != heads and "enable_gqa" not in _VARLEN_PARAMS:
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    gqa = {"enable_gqa": True} if "enable_gqa" in _VARLEN_PARAMS and k.shape[1] != heads else {}
    causal = {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)}
    out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling, **causal, **gqa)
    return out.reshape(batch, length, heads, dim), None


def _varlen_params() -> frozenset[str]:
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


_VARLEN_PARAMS = _varlen_params()  # its keywords moved between PyTorch releases (is_causal, then window_size)


def use_varlen_attention(model) -> bool:
    """Switch a loaded transformers model to varlen_attention (registered under VARLEN_ATTENTION); False when
    the model cannot change its attention (it then keeps its own, with the block-diagonal mask).

    transformers builds no attention mask for a registered name it has no mask function for: the boundaries
    come with the batch instead.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    model.set_attn_implementation(VARLEN_ATTENTION)
    return model.config._attn_implementation == VARLEN_ATTENTION

