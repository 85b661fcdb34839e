"""tuneforge's training step with each speed lever on and off, against transformers' Trainer, Trainer with Liger
kernels and TRL's SFTTrainer (packing, padding-free), in one process on one GPU.

Random weights of real architectures (saved once a shape), random full rows of `seq` tokens, every position
trained, LoRA r 16 (alpha 32, no dropout) on all linear layers, bf16; 10 timed steps after 3 warm-up steps.
Peak memory is torch.cuda.max_memory_allocated from before the model is loaded (weights included).

    pip install -e ".[gpu,bench]"   # liger-kernel; trl + datasets for the SFTTrainer rows
    python benchmarks/trainer_comparison.py --out results_trainer_h200.json             # CUDA, the default cases
    python benchmarks/trainer_comparison.py --cases llama-3.2-1b:1024:8 --modes lora --only tf_base trainer

Each row is written to --out as soon as it is measured (a run cut short keeps what it measured). Liger patches
transformers' modules process-wide; each run restores the patched modules' globals after itself.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from train_throughput import ARCHS

ARCHS = {**ARCHS, "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),  # a CPU smoke test
         "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                       rope_theta=500000.0, tie_word_embeddings=False)}

# tuneforge variants: (name, Liger kernels, gradient checkpointing: all / half of the layers / none, fused AdamW,
# micro-batch multiplier, torch.compile of each decoder layer)
TUNEFORGE = {
    "tf_base": ("none", "all", False, 1, False),            # the stage before this work: checkpointing, torch AdamW
    "tf_nockpt": ("none", "none", False, 1, False),
    "tf_liger_ckpt": ("liger", "all", False, 1, False),
    "tf_liger_ckpt_fused": ("liger", "all", True, 1, False),
    "tf_liger_half": ("liger", "half", True, 1, False),
    "tf_liger_nockpt": ("liger", "none", True, 1, False),
    "tf_liger_ckpt_2x": ("liger", "all", True, 2, False),
    "tf_liger_nockpt_compile": ("liger", "none", True, 1, True),
    "tf_liger_ckpt_compile": ("liger", "all", True, 1, True),
    "tf_liger_half_compile": ("liger", "half", True, 1, True),
}
HF = ["trainer", "trainer_liger", "sft_packed", "sft_packed_liger"]


def save_random_model(arch: str, folder: Path) -> Path:
    """Random bf16 weights of the config, initialised on the GPU (an 8B shape in seconds), saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**ARCHS[arch], max_position_embeddings=8192)
    with torch.device(DEVICE):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    reset()
    return folder


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reset() -> None:
    # Compiled code is cached per code object: the variants before would count against the recompile limit (8),
    # past which dynamo runs the layers eager, silently.
    torch._dynamo.reset()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


class RestoreModules:
    """Liger replaces functions and classes in transformers' model modules for the whole process: put them back."""

    def __enter__(self):
        import transformers.models.llama.modeling_llama as llama

        self.saved = [(m, dict(vars(m))) for m in (llama,)]
        return self

    def __exit__(self, *exc):
        for module, attrs in self.saved:
            vars(module).clear()
            vars(module).update(attrs)


def random_rows(n: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


def run_tuneforge(model_dir: Path, mode: str, variant: str, case: dict, args) -> dict:
    from tuneforge.core.batching import loss_sum
    from tuneforge.core.params import Params, TrainSpec
    from tuneforge.stages.train import Mode, build_model, compile_decoder_layers

    kernels, checkpointing, fused_adamw, multiplier, compiled = TUNEFORGE[variant]
    batch = case["batch"] * multiplier
    spec = TrainSpec(mode=mode, lora={"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0})
    reset()
    torch.manual_seed(0)  # the same LoRA initialisation in every variant: comparable loss curves
    model = build_model(Params(tasks={}, train=spec), Mode(mode, DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32, kernels=kernels,
                                                           gradient_checkpointing=checkpointing != "none"), model_dir)
    if checkpointing == "half":  # every other decoder layer keeps its activations
        for i, layer in enumerate(model.get_base_model().model.layers):
            layer.gradient_checkpointing = i % 2 == 0
    if compiled:  # the stage's regional compilation (one graph shared by the layers), compiled during the warm-up steps
        compile_decoder_layers(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=True if fused_adamw and DEVICE == "cuda" else None)
    steps = case.get("steps", args.steps)
    rows = random_rows((args.warmup + steps) * batch, case["seq"], model.config.vocab_size)
    losses = []
    for i in range(args.warmup + steps):
        if i == args.warmup:
            sync()
            start = time.perf_counter()
        ids = rows[i * batch:(i + 1) * batch].to(DEVICE, non_blocking=True)
        s, n = loss_sum(model, {"input_ids": ids, "labels": ids})
        loss = s / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    sync()
    seconds = time.perf_counter() - start
    row = {"tokens_per_s": steps * batch * case["seq"] / seconds, "peak_gib": peak_gib(),
           "batch": batch, "kernels": kernels, "checkpointing": checkpointing, "fused_adamw": fused_adamw,
           "losses": [float(x) for x in losses]}
    del model, optimizer
    return row


def tiny_tokenizer():
    """SFTTrainer wants a tokenizer for its pad id; the rows are token ids already."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def run_hf(model_dir: Path, mode: str, variant: str, case: dict, args) -> dict:
    """Trainer / SFTTrainer + peft (+ bitsandbytes) as their documentation sets them up, checkpointing on."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    reset()
    kw: dict = {"dtype": torch.bfloat16}
    if mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    kw["device_map"] = {"": 0 if DEVICE == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    steps = case.get("steps", args.steps)
    batch, seq = case["batch"], case["seq"]
    ids = random_rows((args.warmup + steps) * batch, seq, model.config.vocab_size)
    times: dict = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **_):
            if state.global_step == args.warmup:
                sync()
                times["start"] = time.perf_counter()

        def on_step_end(self, a, state, control, **_):
            if state.global_step == args.warmup + steps:
                sync()
                times["end"] = time.perf_counter()

    common = dict(per_device_train_batch_size=batch, max_steps=args.warmup + steps, gradient_checkpointing=True,
                  bf16=DEVICE == "cuda", use_cpu=DEVICE == "cpu", learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to=[],
                  dataloader_drop_last=True, use_liger_kernel=variant.endswith("_liger"))
    with tempfile.TemporaryDirectory() as out:
        if variant.startswith("trainer"):
            if mode != "qlora":
                model.enable_input_require_grads()
            model = get_peft_model(model, lora)
            rows = [{"input_ids": r, "labels": r.clone()} for r in ids]
            trainer = Trainer(model=model, train_dataset=rows, callbacks=[Clock()],
                              args=TrainingArguments(output_dir=out, **common))
        else:  # TRL's documented packing: best-fit decreasing packing, padding-free batches with position_ids
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            data = Dataset.from_dict({"input_ids": ids.tolist()})
            trainer = SFTTrainer(model=model, train_dataset=data, processing_class=tiny_tokenizer(), peft_config=lora,
                                 callbacks=[Clock()],
                                 args=SFTConfig(output_dir=out, packing=True, padding_free=True, max_length=seq, **common))
        trainer.train()
    row = {"tokens_per_s": steps * batch * seq / (times["end"] - times["start"]),
           "peak_gib": peak_gib(), "batch": batch}
    del trainer, model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["llama-3.2-1b:1024:8"], help="arch:seq:batch[:steps]")
    parser.add_argument("--modes", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    parser.add_argument("--only", nargs="+", default=[*TUNEFORGE, *HF], help="variants to run")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new run after this many seconds")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    for name in ("bitsandbytes", "liger-kernel", "trl", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # the variants that need it then fail visibly
            versions[name] = "missing"
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "versions": versions, "rank": args.rank, "rows": []}
    print(json.dumps(result), flush=True)
    began = time.perf_counter()
    for spec in args.cases:
        if time.perf_counter() - began > args.budget_s:
            print(f"budget spent: skipping {spec}", flush=True)
            continue
        arch, seq, batch, *rest = spec.split(":")
        case = {"arch": arch, "seq": int(seq), "batch": int(batch), **({"steps": int(rest[0])} if rest else {})}
        with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
            model_dir = save_random_model(arch, Path(tmp))
            for mode in args.modes:
                for variant in args.only:
                    if time.perf_counter() - began > args.budget_s:
                        print(f"budget spent: skipping {spec} {mode} {variant}", flush=True)
                        continue
                    started = time.perf_counter()
                    try:
                        with RestoreModules():
                            fn = run_tuneforge if variant in TUNEFORGE else run_hf
                            row = fn(model_dir, mode, variant, case, args)
                    except Exception as e:  # noqa: BLE001 (one failing variant must not lose the others)
                        row = {"error": f"{type(e).__name__}: {e}"[:600]}
                        traceback.print_exc()
                        reset()
                    row = {**case, "mode": mode, "variant": variant, **row, "wall_s": time.perf_counter() - started}
                    result["rows"].append(row)
                    args.out.write_text(json.dumps(result, indent=1) + "\n")
                    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items() if k != "losses"},
                          flush=True)


if __name__ == "__main__":
    main()
