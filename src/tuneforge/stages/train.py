"""LoRA / QLoRA fine-tuning: one loop, read top to bottom.

    records -> chat template with loss mask -> packed sequences -> AdamW, warmup + cosine
    -> validation loss every `eval_every` steps -> best adapter kept, early stopping
    -> checkpoint every `checkpoint_every` steps (rerun resumes from it)

The same code runs on one CPU, one GPU or several GPUs: launched with
`accelerate launch --num_processes N -m tuneforge.stages.train --task T`, each process takes
every N-th batch and accelerate averages the gradients (DDP).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from tuneforge.core.batching import (
    causal_lm,
    evaluate_loss,
    loss_sum,
    make_batches,
    render_records,
)
from tuneforge.core.chat import IGNORE
from tuneforge.core.modeling import (
    compute_dtype,
    load_causal_lm,
    load_tokenizer,
    pick_device,
)
from tuneforge.core.params import Params, TrainSpec, load_params
from tuneforge.core.paths import base_model_dir, metrics_file, models_dir, processed_dir, train_history_file
from tuneforge.core.records import read_jsonl, write_metrics

# ---------------------------------------------------------------- mode


@dataclass
class Mode:
    name: str  # "qlora" or "lora"
    device: str
    dtype: torch.dtype


def choose_mode(spec: TrainSpec) -> Mode:
    """QLoRA (4-bit NF4, bf16 compute) on CUDA; plain LoRA on CPU.

    On a 2-core CPU, LoRA measured faster than bitsandbytes 4-bit (which dequantises
    every matmul), so `auto` picks LoRA there, in bf16 only where the CPU has bf16 units.
    """
    device = pick_device()
    name = spec.mode if spec.mode != "auto" else ("qlora" if device == "cuda" else "lora")
    return Mode(name, device, compute_dtype(device))


# ---------------------------------------------------------------- data


# ---------------------------------------------------------------- loss


def lr_at(step: int, total: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to zero over the run's planned steps."""
    warmup = max(1, int(spec.warmup_fraction * total))
    if step < warmup:
        return spec.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return spec.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- model


def build_model(params: Params, mode: Mode, model_dir: Path | None = None):
    """The base (4-bit for QLoRA) with LoRA adapters on `train.lora.target_modules`."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec = params.train
    model = load_causal_lm(model_dir or base_model_dir(), dtype=mode.dtype, device=mode.device, load_in_4bit=mode.name == "qlora",
                           trust_remote_code=params.model.trust_remote_code)
    model.config.use_cache = False
    if mode.name == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in causal_lm(model).named_parameters() if v.requires_grad}


# ---------------------------------------------------------------- checkpoints


def fingerprint(params: Params, task: str, train_file: Path) -> str:
    """Resume only a run with identical settings and data."""
    blob = json.dumps([params.train.model_dump(), params.model.model_dump(), task], sort_keys=True).encode()
    return hashlib.sha256(blob + train_file.read_bytes()).hexdigest()[:16]


def save_checkpoint(folder: Path, model, optimizer, state: dict, best_adapter: Path) -> None:
    """Write to a temporary folder, then rename: a kill mid-write leaves the previous checkpoint intact.

    The best adapter so far goes in too: `dvc repro` deletes a stage's outputs before rerunning it.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(best_adapter, tmp / "best_adapter")
    torch.save({"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "state.pt")
    (tmp / "progress.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, model, optimizer, expected_fingerprint: str, best_adapter: Path) -> dict | None:
    progress_file = folder / "progress.json"
    if not progress_file.exists():
        return None
    state = json.loads(progress_file.read_text())
    if state["fingerprint"] != expected_fingerprint:
        print(f"ignoring checkpoint {folder}: it was made with other settings or data")
        return None
    saved = torch.load(folder / "state.pt", weights_only=True)  # a crafted pickle must not run code
    lm = causal_lm(model)
    lm.load_state_dict(saved["trainable"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    shutil.copytree(folder / "best_adapter", best_adapter, dirs_exist_ok=True)
    return state


# ---------------------------------------------------------------- the run


def train_task(task: str, params: Params | None = None) -> dict:
    """Train one task's adapter; returns the metrics also written to reports/<task>/train.json."""
    from accelerate import Accelerator

    params = params or load_params()
    spec = params.train
    mode = choose_mode(spec)
    accelerator = Accelerator(cpu=mode.device == "cpu")
    if accelerator.num_processes > 1:
        mode.device = str(accelerator.device)
    is_main = accelerator.is_main_process
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)

    tokenizer = load_tokenizer(base_model_dir())
    data = processed_dir(task)
    train_examples = render_records(tokenizer, read_jsonl(data / "train.jsonl"), spec.max_seq_len)
    eval_examples = render_records(tokenizer, read_jsonl(data / "validation.jsonl")[: spec.eval_rows], spec.max_seq_len)
    eval_batches = make_batches(eval_examples, spec, tokenizer.pad_token_id, seed=0)

    model = build_model(params, mode)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.learning_rate,
                                  weight_decay=spec.weight_decay)
    # No DDP wrapper: loss_sum calls the decoder and head directly, which would bypass DDP's gradient
    # hooks. Each process computes its batches' LoRA gradients; they are averaged before the step.
    trainable = [p for p in model.parameters() if p.requires_grad]

    batches_per_epoch = len(make_batches(train_examples, spec, tokenizer.pad_token_id, seed=spec.seed))
    steps_per_epoch = max(1, batches_per_epoch // (spec.grad_accum * accelerator.num_processes))
    total_steps = spec.max_steps or math.ceil(spec.epochs * steps_per_epoch)

    out = models_dir(task)
    adapter_dir, checkpoint_dir = out / "adapter", out / "checkpoints" / "last"
    fp = fingerprint(params, task, data / "train.jsonl")
    state = load_checkpoint(checkpoint_dir, model, optimizer, fp, adapter_dir) or {
        "fingerprint": fp, "step": 0, "tokens_seen": 0, "best_eval_loss": None, "best_step": 0,
        "bad_evals": 0, "history": [], "train_seconds": 0.0,
    }
    resumed_from = state["step"]
    if state["step"] == 0:
        base_loss = evaluate_loss(model, eval_batches, mode.device)
        state["history"].append({"step": 0, "tokens_seen": 0, "train_loss": None, "eval_loss": base_loss, "lr": 0.0})
        state["base_eval_loss"] = base_loss
        if is_main:
            model.save_pretrained(adapter_dir)  # the untrained adapter is "best" so far
        state["best_eval_loss"] = base_loss

    if mode.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"train {task}", disable=not is_main, mininterval=5)
    started = time.perf_counter()
    tokens_at_start = state["tokens_seen"]
    stop_reason = "max_steps" if spec.max_steps else "epochs"
    while state["step"] < total_steps:
        step = state["step"]
        epoch, first = divmod(step * spec.grad_accum * accelerator.num_processes, batches_per_epoch)
        epoch_batches = make_batches(train_examples, spec, tokenizer.pad_token_id, seed=spec.seed + epoch)
        wanted = epoch_batches[first : first + spec.grad_accum * accelerator.num_processes]
        mine = wanted[accelerator.process_index :: accelerator.num_processes]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, spec)
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in mine)
        loss_value = 0.0
        for batch in mine:
            batch = {k: v.to(mode.device) for k, v in batch.items()}
            s, _ = loss_sum(model, batch)
            loss = s / max(1, step_tokens)  # token-mean over the whole step, whatever the micro-batches
            loss.backward()
            loss_value += loss.item()
            state["tokens_seen"] += int(batch["tokens"]) * accelerator.num_processes
        if accelerator.num_processes > 1:
            for p in trainable:
                p.grad = accelerator.reduce(p.grad, reduction="mean")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        elapsed = time.perf_counter() - started
        tokens_per_s = (state["tokens_seen"] - tokens_at_start) / max(elapsed, 1e-9)
        record = {"step": state["step"], "tokens_seen": state["tokens_seen"], "train_loss": loss_value,
                  "eval_loss": None, "lr": lr_at(step, total_steps, spec)}
        if state["step"] % spec.eval_every == 0 or state["step"] == total_steps:
            record["eval_loss"] = evaluate_loss(model, eval_batches, mode.device)
            if record["eval_loss"] < state["best_eval_loss"]:
                state.update(best_eval_loss=record["eval_loss"], best_step=state["step"], bad_evals=0)
                if is_main:
                    model.save_pretrained(adapter_dir)
            else:
                state["bad_evals"] += 1
        state["history"].append(record)
        bar.set_postfix(loss=f"{loss_value:.3f}", eval=f"{state['best_eval_loss']:.3f}", tok_s=f"{tokens_per_s:.0f}")
        bar.update(1)
        if state["bad_evals"] >= spec.early_stopping_patience:
            stop_reason = f"early stopping: no better validation loss in {spec.early_stopping_patience} evaluations"
            break
        if is_main and state["step"] % spec.checkpoint_every == 0 and state["step"] < total_steps:
            save_checkpoint(checkpoint_dir, model, optimizer, {**state, "train_seconds": state["train_seconds"] + elapsed},
                            adapter_dir)
    bar.close()
    state["train_seconds"] += time.perf_counter() - started

    metrics = {
        "task": task, "mode": mode.name, "device": mode.device, "dtype": str(mode.dtype).replace("torch.", ""),
        "processes": accelerator.num_processes, "steps": state["step"], "planned_steps": total_steps,
        "stop_reason": stop_reason, "resumed_from_step": resumed_from,
        "train_examples": len(train_examples), "tokens_seen": state["tokens_seen"],
        "tokens_per_second": (state["tokens_seen"] - tokens_at_start) / max(time.perf_counter() - started, 1e-9),
        "wall_seconds": state["train_seconds"],
        "base_eval_loss": state["base_eval_loss"], "best_eval_loss": state["best_eval_loss"],
        "best_step": state["best_step"],
        "final_train_loss": next((h["train_loss"] for h in reversed(state["history"]) if h["train_loss"] is not None), None),
        "peak_memory_gb": peak_memory_gb(mode.device),
    }
    if is_main:
        write_metrics(metrics_file(task, "train"), metrics)
        write_history(train_history_file(task), state["history"])
        (adapter_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        shutil.rmtree(checkpoint_dir.parent, ignore_errors=True)  # finished: nothing left to resume
    accelerator.wait_for_everyone()
    return metrics


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_history(path: Path, history: list[dict]) -> None:
    """CSV that `dvc plots show` draws (loss against step)."""
    lines = ["step,tokens_seen,train_loss,eval_loss,lr"]
    for h in history:
        cells = [h["step"], h["tokens_seen"], h["train_loss"], h["eval_loss"], h["lr"]]
        lines.append(",".join("" if c is None else f"{c:.6g}" if isinstance(c, float) else str(c) for c in cells))
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train one task's adapter (accelerate launch for several GPUs)")
    parser.add_argument("--task", required=True)
    args = parser.parse_args(argv)
    print(json.dumps(train_task(args.task), indent=2))


if __name__ == "__main__":
    main()
