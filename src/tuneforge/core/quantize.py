"""Building GGUF files with llama.cpp's own tools: HF model -> GGUF, PEFT adapter -> GGUF, and quantization
calibrated with an importance matrix collected from the task's training split.

The converters come from the sdist of the same llama-cpp-python version that runs the files
(scripts/fetch_gguf_converter.sh puts them in vendor/), so the writer and the reader always match.
Shared by the export stage, the base-GGUF stage and the tests.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tuneforge.core.paths import repo_root

# Spin-waiting OpenMP threads stall llama.cpp on a busy 2-core machine (a run went from 3 s to >120 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger(__name__)


def converter_dir(script: str = "convert_hf_to_gguf.py") -> Path:
    folder = repo_root() / "vendor" / "llama.cpp-converter"
    if not (folder / script).exists():
        raise FileNotFoundError(f"{folder / script} is missing: run scripts/fetch_gguf_converter.sh (scripts/setup.sh "
                                "does; delete vendor/llama.cpp-converter first if an older fetch lacks this script)")
    return folder


def run_converter(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """One of llama.cpp's converter scripts (export; base_model's vocabulary-only pre-flight reads its log)."""
    folder = converter_dir(script)
    # The bundled gguf-py first: PyPI's gguf is a different version and breaks this converter (LazyChunkedTensor).
    # Then the caller's own PYTHONPATH, where packages installed with `pip --target` live (e.g. on a GPU image).
    search = [str(folder / "gguf-py"), str(folder), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(search), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(folder / script), *args], env=env, capture_output=True, text=True,
                          check=False)  # callers read the converter's own message


def _run_converter(script: str, args: list[str], what: Path) -> None:
    result = run_converter(script, args)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed for {what}:\n{result.stderr[-3000:]}")


def convert_to_gguf(hf_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _run_converter("convert_hf_to_gguf.py", [str(hf_dir), "--outfile", str(out_file), "--outtype", outtype], hf_dir)
    return out_file


def convert_lora_to_gguf(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "f16") -> Path:
    """A PEFT adapter as a GGUF LoRA file that llama.cpp applies over the base model's GGUF at run time.

    base_dir only supplies config.json (architecture, shapes); the adapter's weights stay as trained (f16 here:
    they are small and f16 keeps them within 1e-3 of the HF adapter)."""
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: train the task first")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _run_converter("convert_lora_to_gguf.py", ["--base", str(base_dir), "--outfile", str(out_file), "--outtype", outtype,
                                               str(adapter_dir)], adapter_dir)
    return out_file


def ggml_type(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if value is None:
        known = sorted(n.removeprefix("GGML_TYPE_") for n in dir(llama_cpp) if n.startswith("GGML_TYPE_"))
        raise ValueError(f"unknown tensor type {name!r}; ggml knows {known}")
    return value


def _imatrix_array(imatrix: dict[str, np.ndarray]):
    """llama_model_imatrix_data entries ending in a null entry, plus the buffers they point into (keep them alive)."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep = []
    for entry, (name, values) in zip(entries, imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        if not np.all(np.isfinite(data)):
            raise ValueError(f"importance matrix for {name} has non-finite values")
        keep += [name.encode(), data]
        entry.name = keep[-2]
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    entries[len(imatrix)].name = None
    return entries, keep


def _override_array(tensor_types: dict[str, str]):
    """llama_model_tensor_override entries (regex over GGUF tensor names -> ggml type) ending in a null entry."""
    import llama_cpp

    entries = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
    keep = []
    for entry, (pattern, type_name) in zip(entries, tensor_types.items()):
        keep.append(pattern.encode())
        entry.pattern, entry.type = keep[-1], ggml_type(type_name)
    entries[len(tensor_types)].pattern = None
    return entries, keep


def quantize_gguf(in_file: Path, out_file: Path, qtype: str, *, imatrix: dict[str, np.ndarray] | None = None,
                  tensor_types: dict[str, str] | None = None) -> Path:
    """llama_model_quantize from Python. imatrix: GGUF tensor name -> per-input-column mean of x^2 (see
    collect_imatrix); tensor_types: regex over tensor names -> ggml type, llama.cpp's --tensor-type."""
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
    out_file.parent.mkdir(parents=True, exist_ok=True)  # llama.cpp only says "iostream error" otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1  # 0 would mean the host's core count, not the ones this process may use
    keep = []
    if imatrix:
        entries, buffers = _imatrix_array(imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep += [entries, buffers]
    if tensor_types:
        entries, buffers = _override_array(tensor_types)
        params.tt_overrides = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep += [entries, buffers]
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
    del keep  # the C side is done with the arrays
    text = "".join(lines)
    if code != 0:
        # The last lines say why (e.g. "imatrix size 100 is different from tensor size 576 for blk.0.attn_q.weight").
        raise RuntimeError(f"llama_model_quantize({in_file} -> {qtype}) returned {code}:\n{text[-3000:]}")
    # e.g. k-quants need rows divisible by 256; SmolLM2-135M's 576 falls back to q5_0/q8_0 for most tensors.
    for line in lines:
        if "required fallback quantization" in line:
            log.warning("%s: %s", out_file.name, line.strip())
    return out_file


def gguf_tensor_names(gguf_file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in GGUF order (ne[0] first: the input width of a weight matrix)."""
    from gguf import GGUFReader

    return {t.name: tuple(int(n) for n in t.shape) for t in GGUFReader(str(gguf_file)).tensors}


def hf_to_gguf_names(hf_model, gguf_file: Path) -> dict[str, str]:
    """Each nn.Linear module of the HF model -> its weight's GGUF tensor name, through gguf-py's own name map
    (the one the converter uses). Linear layers with no tensor in the file (e.g. a tied lm_head) are left out."""
    import gguf
    import torch
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_file))
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.get_tensor_name_map(arch, hf_model.config.num_hidden_layers)
    present = {t.name for t in reader.tensors}
    mapping = {}
    for module_name, module in hf_model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = name_map.get_name(module_name)
            if name and f"{name}.weight" in present:
                mapping[module_name] = f"{name}.weight"
    return mapping


def collect_imatrix(hf_model, tokenizer, records: list[dict], gguf_file: Path, max_seq_len: int,
                    template_kwargs: dict | None = None) -> dict[str, np.ndarray]:
    """Importance matrix: for every linear weight, the mean of x^2 per input column over all tokens of the
    given conversations (prompt and answer, rendered with the output kind's template_kwargs), collected with forward
    hooks on the full-precision model.

    Keyed by GGUF tensor name (e.g. blk.3.attn_q.weight); the output head is left out, as llama.cpp's
    imatrix tool does by default (and SmolLM2 ties it to the token embedding, which a one-hot input can't
    calibrate)."""
    import torch

    from tuneforge.core.chat import render

    template_kwargs = template_kwargs or {}

    mapping = hf_to_gguf_names(hf_model, gguf_file)
    if not mapping:
        raise ValueError(f"no linear layer of the HF model maps to a tensor of {gguf_file}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    modules = dict(hf_model.named_modules())
    hooks = []
    for module_name, tensor_name in mapping.items():
        if tensor_name == "output.weight":
            continue

        def hook(module, inputs, output, key=tensor_name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(modules[module_name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for record in records:
                ids = render(tokenizer, record["messages"], **template_kwargs).input_ids[:max_seq_len]  # as trained
                hf_model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}
