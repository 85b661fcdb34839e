"""Training throughput: tuneforge's loop against plain transformers Trainer + peft (+ bitsandbytes), side by side.

Same architecture (random-initialised weights of a real config), sequence length, batch, LoRA rank and
gradient checkpointing for both; each pair is measured in the same process, one after the other.

    python benchmarks/train_throughput.py                      # CUDA: QLoRA and LoRA bf16, three architectures
    python benchmarks/train_throughput.py --arch smollm2-135m --modes lora --seq 256 --batch 4 --steps 3  # CPU

Prints tokens/s, peak memory and the ratio tuneforge / baseline.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

ARCHS = {  # the published configs' shapes (llama architecture)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, rope_theta=130000.0, tie_word_embeddings=True),
}


def save_random_model(arch: str, folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**ARCHS[arch], max_position_embeddings=4096)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


def peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_batches(n: int, batch: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": (ids := torch.randint(0, vocab, (batch, seq), generator=g)), "labels": ids.clone()} for _ in range(n)]


def run_tuneforge(model_dir: Path, mode: str, args, device: str) -> dict:
    from tuneforge.core.batching import loss_sum
    from tuneforge.core.params import Params, TrainSpec
    from tuneforge.stages.train import Mode, build_model

    spec = TrainSpec(mode=mode, gradient_checkpointing=True, lora={"r": args.rank, "alpha": 2 * args.rank, "dropout": 0.0})
    params = Params(tasks={}, train=spec)
    reset(device)
    model = build_model(params, Mode(mode, device, torch.bfloat16 if device == "cuda" else torch.float32), model_dir)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = random_batches(args.warmup + args.steps, args.batch, args.seq, model.config.vocab_size)
    start = None
    for i, batch in enumerate(batches):
        if i == args.warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        s, n = loss_sum(model, batch)
        (s / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "peak_gib": peak_gib(device)}
    del model, optimizer
    return result


def run_baseline(model_dir: Path, mode: str, args, device: str) -> dict:
    """Plain Trainer + peft (+ bitsandbytes for QLoRA), as its documentation sets it up."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    reset(device)
    kw: dict = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    if mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.to(device)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    batches = random_batches(args.warmup + args.steps, args.batch, args.seq, model.config.vocab_size)
    rows = [{"input_ids": b["input_ids"][i], "labels": b["labels"][i]} for b in batches for i in range(args.batch)]

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **_):
            if state.global_step == args.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, train_dataset=rows, callbacks=[clock], args=TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            gradient_checkpointing=True, bf16=device == "cuda", learning_rate=1e-4, logging_steps=10**6,
            save_strategy="no", report_to=[], use_cpu=device == "cpu", dataloader_drop_last=True))
        trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock.start
    result = {"tokens_per_s": args.steps * args.batch * args.seq / seconds, "peak_gib": peak_gib(device)}
    del trainer, model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--modes", nargs="+", default=["qlora", "lora"], choices=["qlora", "lora"])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, seq {args.seq}, batch {args.batch}, "
          f"LoRA r={args.rank} on all linear layers, gradient checkpointing, {args.steps} timed steps after {args.warmup}")
    print(f"{'arch':14} {'mode':6} {'tuneforge tok/s':>16} {'baseline tok/s':>15} {'ratio':>6} {'tf GiB':>7} {'base GiB':>8}")
    rows = []
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = save_random_model(arch, Path(tmp))
            for mode in args.modes:
                if mode == "qlora" and device != "cuda":
                    continue
                ours = run_tuneforge(model_dir, mode, args, device)
                base = run_baseline(model_dir, mode, args, device)
                row = {"arch": arch, "mode": mode, "tuneforge": ours, "baseline": base,
                       "ratio": ours["tokens_per_s"] / base["tokens_per_s"]}
                rows.append(row)
                print(f"{arch:14} {mode:6} {ours['tokens_per_s']:16,.0f} {base['tokens_per_s']:15,.0f} {row['ratio']:6.2f} "
                      f"{ours['peak_gib']:7.1f} {base['peak_gib']:8.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
