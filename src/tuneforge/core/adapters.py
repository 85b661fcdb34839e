"""One base GGUF in memory, every task's LoRA adapter (GGUF) loaded against it, one context switched between them.

llama-cpp-python's own server applies an adapter only at load time (one model per adapter); this uses
llama.cpp's adapter API directly: llama_adapter_lora_init once per adapter, llama_set_adapters_lora per task.
Shared by the export stage (adapter parity) and `tuneforge serve` (many tasks, one process).
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from tuneforge.core.gguf import load_llama


class AdapterSwitch:
    """A Llama over the base file whose active LoRA adapter is chosen per call to use(name)."""

    def __init__(self, llm, adapters: dict[str, Path]):
        """llm: a llama_cpp.Llama over the base GGUF (e.g. the one llama-cpp-python's server loaded)."""
        import llama_cpp

        self.llm = llm
        self.files = dict(adapters)
        self.adapters = {}
        for name, path in adapters.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"adapter for {name!r}: {path} does not exist: run `dvc repro export@{name}` first")
            pointer = llama_cpp.llama_adapter_lora_init(llm.model, str(path).encode())
            if not pointer:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path} over {llm.model_path} "
                                   "(was it converted from an adapter of this base model?)")
            self.adapters[name] = pointer
        self.active: str | None = None
        llm._stack.callback(self._free)  # before the context and the model (the stack unwinds in reverse)

    @classmethod
    def load(cls, base_file: Path, adapters: dict[str, Path], *, n_ctx: int = 1024, n_threads: int | None = None,
             logits_all: bool = False) -> AdapterSwitch:
        if not base_file.is_file():
            raise FileNotFoundError(f"{base_file} does not exist: run `dvc repro base_gguf` first")
        return cls(load_llama(base_file, n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all), adapters)

    def use(self, name: str | None) -> float:
        """Make `name`'s adapter the only one applied (None: the bare base model); returns the seconds it took."""
        import llama_cpp

        if name == self.active:
            return 0.0
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter loaded for {name!r} (loaded: {sorted(self.adapters)})")
        start = time.perf_counter()
        if name is None:
            code = llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            chosen = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            code = llama_cpp.llama_set_adapters_lora(self.llm.ctx, chosen, 1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise RuntimeError(f"llama_set_adapters_lora({name}) returned {code}")
        self.llm.reset()  # the cached prefix was computed with the other adapter: never reuse it
        self.active = name
        return time.perf_counter() - start

    def _free(self) -> None:
        import llama_cpp

        llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        for pointer in self.adapters.values():
            llama_cpp.llama_adapter_lora_free(pointer)
        self.adapters.clear()

    def close(self) -> None:
        self.llm.close()
