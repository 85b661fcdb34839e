"""A random-weight Hugging Face model folder of a named family, with that family's real tokenizer and chat template.

For tests and benchmarks of the models users bring (Llama 3, Qwen2, Mistral, Phi-3), offline: the tokenizers come
from the vocabulary-only GGUFs that llama.cpp ships for its own tokenizer tests (scripts/fetch_gguf_converter.sh
puts them in vendor/llama.cpp-converter/models/), the weights are random, the shapes tiny or real:

    python scripts/make_random_model.py llama /tmp/llama-tiny
    python scripts/make_random_model.py llama /tmp/llama-1b --shape llama-3.2-1b --dtype bfloat16

The folder then works as `model.base` in params.yaml. Importable: `make_random_model(family, out_dir, shape)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VOCAB_DIR = ROOT / "vendor" / "llama.cpp-converter" / "models"

# Meta-Llama-3-8B-Instruct's template. (Llama 3.1/3.2 add a system block stamped with today's date, which would
# make renders depend on the day they run.)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral-7B-Instruct-v0.2's template: an optional system message joins the first user turn.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token}}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}{%- endfor %}"
)


@dataclass(frozen=True)
class Family:
    vocab: str  # ggml-vocab-<vocab>.gguf
    model_type: str  # transformers' config model_type
    chat_template: str | None  # None: the one the vocabulary GGUF carries
    eos_token: str | None  # the tokenizer's eos as the family's instruct models set it; None: the GGUF's
    end_of_turn: str  # the token an assistant turn ends with (generation_config stops on it)
    sentencepiece: bool = False  # also write tokenizer.model: llama.cpp's converter reads SPM vocabularies from it
    ignore_merges: bool = False  # tokenizer.json's BPE setting in the family's real folder (the GGUF does not say)
    add_bos_token: bool = False  # the family's tokenizer puts its bos before every encoded text
    config: dict = field(default_factory=dict)  # the family's fixed settings, whatever the shape


FAMILIES = {
    # As Meta's tokenizer.json has it. Without the bos, llama.cpp's converter (which hashes encode(text) with
    # special tokens) takes the tokenizer for Smaug-Llama-3's and records pre-tokenizer smaug-bpe, not llama-bpe.
    "llama": Family("llama-bpe", "llama", LLAMA3_TEMPLATE, "<|eot_id|>", "<|eot_id|>", ignore_merges=True,
                    add_bos_token=True,
                    config={"rope_theta": 500000.0, "rms_norm_eps": 1e-5}),
    "qwen2": Family("qwen2", "qwen2", None, "<|im_end|>", "<|im_end|>",
                    config={"rope_theta": 1000000.0, "rms_norm_eps": 1e-6}),
    "mistral": Family("llama-spm", "mistral", MISTRAL_TEMPLATE, None, "</s>", sentencepiece=True,
                      config={"rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None}),
    # Phi-3-mini keeps <|endoftext|> as eos while turns end with <|end|>: the stages must stop on both.
    "phi3": Family("phi-3", "phi3", None, None, "<|end|>", sentencepiece=True,
                   config={"rope_theta": 10000.0, "rms_norm_eps": 1e-5}),
}

# Shapes, whatever the family; the vocabulary size always comes from the tokenizer. `tiny` keeps every weight
# row a multiple of 256, so Q4_K_M uses real k-quants instead of falling back to q5_0/q8_0.
SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True},
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                     "tie_word_embeddings": True},
}


def vocab_file(family: str) -> Path:
    path = VOCAB_DIR / f"ggml-vocab-{FAMILIES[family].vocab}.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run scripts/fetch_gguf_converter.sh")
    return path


def gguf_tokenizer(family: str, cache_dir: Path | None = None):
    """The vocabulary GGUF as a transformers tokenizer, as converted (no template or eos changes yet).

    transformers takes 5-45 s to turn a GGUF vocabulary into a tokenizer on 2 busy cores, loading the saved
    tokenizer.json takes about a second: the conversion is cached, keyed by the file's hash and transformers' version.
    """
    import transformers
    from transformers import AutoTokenizer

    source = vocab_file(family)
    spec = json.dumps(FAMILIES[family].ignore_merges).encode()  # what fix_tokenizer_json depends on
    key = hashlib.sha256(source.read_bytes() + spec).hexdigest()[:16] + "-transformers-" + transformers.__version__
    if cache_dir is None:
        cache_dir = Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge")) / "tokenizers"
    cached = cache_dir / f"{source.stem}-{key}"
    if (cached / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    fix_tokenizer_json(tmp / "tokenizer.json", gguf_token_count(source), FAMILIES[family].ignore_merges)
    shutil.rmtree(cached, ignore_errors=True)
    try:
        tmp.rename(cached)  # whole or not at all: a killed run never leaves half a cache entry
    except OSError:  # a concurrent run renamed its copy first
        shutil.rmtree(tmp)
    return AutoTokenizer.from_pretrained(cached)


def gguf_token_count(gguf_path: Path) -> int:
    from gguf import GGUFReader

    return len(GGUFReader(str(gguf_path)).fields["tokenizer.ggml.tokens"].data)


def fix_tokenizer_json(tokenizer_json: Path, count: int, ignore_merges: bool) -> None:
    """Undo what transformers' GGUF conversion gets wrong: a gpt2-type vocabulary gets an <|endoftext|> appended
    that the family never had (Llama 3 would have 128,257 tokens instead of 128,256), and BPE's ignore_merges."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < count]
    if ignore_merges:
        data["model"]["ignore_merges"] = True
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_sentencepiece_model(gguf_path: Path, out_file: Path) -> None:
    """tokenizer.model for a SentencePiece (llama-type) vocabulary GGUF: its base pieces, scores and types.

    Only the SentencePiece vocabulary proper (up to the last normal piece) goes in; tokens after it (Phi-3's
    <|user|>, <|end|>, ...) are added tokens, which tokenizer.json carries, as in the families' real folders.
    """
    from gguf import GGUFReader  # noqa: I001  (PyPI's gguf reads the file; only the converter needs its own)
    from sentencepiece import sentencepiece_model_pb2 as sp

    reader = GGUFReader(str(gguf_path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    normal = sp.ModelProto.SentencePiece.NORMAL
    size = max(i for i, t in enumerate(types) if t == normal) + 1
    model = sp.ModelProto()
    model.trainer_spec.model_type = sp.TrainerSpec.BPE
    model.trainer_spec.vocab_size = size
    model.trainer_spec.byte_fallback = True
    model.trainer_spec.split_digits = True
    model.trainer_spec.allow_whitespace_only_pieces = True
    trainer = model.trainer_spec
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    for i in range(size):
        piece = model.pieces.add()
        piece.piece = tokens[i]
        if types[i] in (normal, sp.ModelProto.SentencePiece.BYTE):
            piece.type, piece.score = types[i], scores[i]
        else:  # the GGUF may mark <s>, </s> as user-defined with score -1000: SentencePiece has them as control
            piece.type = sp.ModelProto.SentencePiece.UNKNOWN if i == 0 else sp.ModelProto.SentencePiece.CONTROL
            piece.score = 0.0
    out_file.write_bytes(model.SerializeToString())


def family_tokenizer(family: str, cache_dir: Path | None = None):
    """The family's tokenizer with its chat template and its instruct models' eos."""
    spec = FAMILIES[family]
    tokenizer = gguf_tokenizer(family, cache_dir)
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    if tokenizer.chat_template is None:
        raise ValueError(f"{family}: the vocabulary GGUF carries no chat template and the family defines none")
    if spec.eos_token is not None:
        tokenizer.eos_token = spec.eos_token
    if spec.add_bos_token:
        tokenizer.add_bos_token = True
    return tokenizer


def make_config(family: str, tokenizer, shape: str | dict):
    from transformers import AutoConfig, GenerationConfig

    spec = FAMILIES[family]
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    end_of_turn = tokenizer.convert_tokens_to_ids(spec.end_of_turn)
    stops = list(dict.fromkeys([tokenizer.eos_token_id, end_of_turn]))
    config = AutoConfig.for_model(spec.model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=stops[0] if len(stops) == 1 else stops,
                                  pad_token_id=tokenizer.pad_token_id, **{**spec.config, **dims})
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops,
                                  pad_token_id=tokenizer.pad_token_id)
    return config, generation


def make_random_model(family: str, out_dir: Path, shape: str | dict = "tiny", *, seed: int = 0,
                      dtype: torch.dtype = torch.float32, cache_dir: Path | None = None, device: str = "cpu") -> Path:
    """Write config, random safetensors, tokenizer (+ tokenizer.model for SPM families) and chat template.

    device="cuda" draws the random weights on the GPU. Measured for the Llama-3.2-1B shape on the H200 machine:
    105-115 s on its 16 CPU cores, 59-103 s with the GPU (the tokenizer's conversion and the writing stay).
    """
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    if isinstance(shape, str) and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    tokenizer = family_tokenizer(family, cache_dir)
    config, generation = make_config(family, tokenizer, shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = generation
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if FAMILIES[family].sentencepiece:
        write_sentencepiece_model(vocab_file(family), out_dir / "tokenizer.model")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda: somewhat faster for 1B+ shapes)")
    args = parser.parse_args(argv)
    out = make_random_model(args.family, args.out_dir, args.shape, seed=args.seed, dtype=getattr(torch, args.dtype),
                            device=args.device)
    config = json.loads((out / "config.json").read_text())
    print(f"{args.family} ({args.shape}): {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"vocab {config['vocab_size']} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
