"""The base_gguf stage: models/base as one quantized GGUF (export.base_quantization) in models/base_gguf/.

Every task's LoRA adapter (converted to GGUF by its export stage) runs over this one file, so
`tuneforge serve` without --task holds the base weights once for all tasks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tuneforge.core.params import Params
from tuneforge.core.paths import gguf_file
from tuneforge.core.quantize import convert_to_gguf, quantize_gguf


def export_base_gguf(params: Params, base_dir: Path, out_dir: Path) -> Path:
    """Returns the quantized base file; the f16 intermediate is not kept (the merged tasks keep their own)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    quantization = params.export.base_quantization
    out_file = gguf_file(out_dir, quantization)
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        f16 = convert_to_gguf(base_dir, gguf_file(Path(scratch), "f16"), "f16")
        quantize_gguf(f16, out_file, quantization, tensor_types=params.export.tensor_types)
    return out_file


def main() -> None:
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import base_gguf_dir, base_model_dir

    print(f"wrote {export_base_gguf(load_params(), base_model_dir(), base_gguf_dir())}")


if __name__ == "__main__":  # the DVC stage's command: python -m tuneforge.stages.base_gguf
    main()
