"""LoRA / QLoRA fine-tuning: one loop, read top to bottom.

    setup: records -> chat template with loss mask -> packed sequences; base + LoRA; AdamW; resume if a checkpoint matches
    train_step: micro-batches -> token-mean loss -> gradients clipped to `max_grad_norm` -> AdamW, warmup + cosine
    evaluate: validation loss every `eval_every` steps -> best adapter kept, early stopping
    save: checkpoint every `checkpoint_every` steps (a rerun resumes from it); at the end the best adapter,
          train.json (train_metrics) and train_history.csv
    on a GPU, decoder layers compiled once the first steps show the run is long enough to pay for it

The same code runs on one CPU, one GPU or several GPUs: launched with
`accelerate launch --num_processes N -m tuneforge.stages.train --task T`, accelerate prepares the
model (DDP), the optimizer and the DataLoader (each process gets its share of every epoch's steps).
Sharding the model (FSDP, DeepSpeed) is refused: validation and saving read each process's whole copy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from torch.utils._pytree import tree_map
from tqdm import tqdm

from tuneforge.core.batching import (
    AnswerLoss,
    causal_lm,
    eval_batches,
    evaluate_loss,
    render_records,
    step_loader,
)
from tuneforge.core.modeling import (
    apply_liger_kernels,
    bf16_weight_bytes,
    choose_kernels,
    compute_dtype,
    free_gpu_bytes,
    load_causal_lm,
    load_tokenizer,
    use_varlen_attention,
    varlen_attention_unsupported,
)
from tuneforge.core.params import Params, TrainSpec, load_params
from tuneforge.core.paths import (
    adapter_dir,
    base_model_dir,
    checkpoint_dir,
    metrics_file,
    processed_dir,
    repo_root,
    train_history_file,
)
from tuneforge.core.records import read_jsonl, write_metrics

if TYPE_CHECKING:
    from accelerate import Accelerator

# ---------------------------------------------------------------- mode


@dataclass
class Mode:
    name: str  # "qlora" or "lora"
    device: str
    dtype: torch.dtype
    reason: str = ""
    gradient_checkpointing: bool = False
    kernels: str = "none"  # "liger" or "none"
    attention: str = "sdpa"  # "varlen" (modeling.varlen_attention) or transformers' "sdpa"
    speed_reason: str = ""


def choose_mode(spec: TrainSpec, model_dir: Path, device: torch.device, free_bytes: int | None = None) -> Mode:
    """`auto` decides by memory: LoRA in bf16 when the base fits the GPU comfortably, QLoRA when it does not.

    4-bit weights cost speed and quality (a 135M base on an H200 lost 11 points of exact match to QLoRA
    and ran 26% slower), so they are worth it only where bf16 weights would crowd the GPU. On a CPU,
    LoRA measured faster than bitsandbytes 4-bit (which dequantises every matmul), in bf16 only where
    the CPU has bf16 units. `free_bytes` is the free memory of the tightest GPU (several processes).
    """
    dtype = compute_dtype(device.type)
    if spec.mode != "auto":
        return Mode(spec.mode, str(device), dtype, f"forced by train.mode: {spec.mode}")
    if device.type != "cuda":
        return Mode("lora", str(device), dtype, "auto: no GPU, so LoRA (bitsandbytes 4-bit is slower on a CPU)")
    weights = bf16_weight_bytes(model_dir)
    free = free_bytes if free_bytes is not None else free_gpu_bytes(device)
    share = weights / free
    fits = share <= spec.auto_lora_max_memory_share
    verdict = "LoRA in bf16" if fits else "QLoRA (4-bit NF4)"
    return Mode("lora" if fits else "qlora", str(device), dtype,
                f"auto: bf16 weights {weights / 1e9:.2f} GB are {share:.1%} of {free / 1e9:.1f} GB free GPU memory "
                f"({'within' if fits else 'above'} train.auto_lora_max_memory_share {spec.auto_lora_max_memory_share:.0%}): "
                f"{verdict}")


def activation_bytes(model_dir: Path, tokens: int, trust_remote_code: bool = False) -> int:
    """A generous estimate of what one micro-batch's activations take without checkpointing, from the config.

    Measured on one H200 (benchmarks/README.md, LoRA on all linear layers, bf16): Llama-3.2-1B's shape kept
    ~180 KB a token a layer; 2 bytes x (24 x hidden + 8 x intermediate) is 229 KB for it, a margin for
    LoRA dropout's copies and the allocator.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    config = getattr(config, "text_config", None) or config
    per_token_layer = 2 * (24 * config.hidden_size + 8 * getattr(config, "intermediate_size", 4 * config.hidden_size))
    return tokens * config.num_hidden_layers * per_token_layer


def choose_speed(mode: Mode, spec: TrainSpec, model_dir: Path, free_bytes: int | None, trust_remote_code: bool = False) -> Mode:
    """Kernels and gradient checkpointing for this device (both GPU-only levers; a CPU run keeps what it had).

    Checkpointing recomputes each layer's forward in the backward (~30% slower): worth it only where the
    activations would not fit. `auto` checkpoints when one micro-batch's estimated activations exceed
    auto_checkpointing_memory_share of the GPU memory left after the weights (4-bit ones for QLoRA).
    """
    kernels, kernel_reason = choose_kernels(spec.kernels, torch.device(mode.device).type)
    if spec.gradient_checkpointing != "auto":
        checkpointing, why = spec.gradient_checkpointing, f"train.gradient_checkpointing: {spec.gradient_checkpointing}"
    elif free_bytes is None:
        checkpointing, why = False, "auto: no GPU, no checkpointing"
    else:
        weights = bf16_weight_bytes(model_dir) // (4 if mode.name == "qlora" else 1)
        need = activation_bytes(model_dir, spec.batch_size * spec.max_seq_len, trust_remote_code)
        room = max(0, free_bytes - weights) * spec.auto_checkpointing_memory_share
        checkpointing = need > room
        why = (f"auto: activations ~{need / 1e9:.1f} GB for {spec.batch_size} x {spec.max_seq_len} tokens "
               f"{'above' if checkpointing else 'within'} {spec.auto_checkpointing_memory_share:.0%} of "
               f"{max(0, free_bytes - weights) / 1e9:.1f} GB free after the weights: "
               f"{'checkpointing' if checkpointing else 'no checkpointing'}")
    mode.gradient_checkpointing, mode.kernels = checkpointing, kernels
    mode.speed_reason = f"kernels: {kernel_reason}; gradient checkpointing: {why}"
    return mode


# ---------------------------------------------------------------- schedule

WARMUP_STEPS = 3  # steps that train.json's steady_tokens_per_second leaves out (first kernel compiles, allocator growth)
# train.compile auto: after the warm-up, this many steps are timed, and the decoder layers are compiled when the rest of
# the run would take at least COMPILE_PAYS_AFTER_SECONDS eager. In the stage on an H200 (1B shape, Liger, varlen
# attention) compiling took ~20 s, recompiles as the batches' shapes varied included, and the compiled steps ran 14%
# faster (benchmarks/README.md): 300 s of eager steps then save ~40 s, twice what compiling costs.
COMPILE_TIMED_STEPS = 5
COMPILE_PAYS_AFTER_SECONDS = 300.0


def lr_at(step: int, total: int, spec: TrainSpec) -> float:
    """Linear warmup, then cosine decay to zero over the run's planned steps."""
    warmup = max(1, int(spec.warmup_fraction * total))
    if step < warmup:
        return spec.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return spec.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- model


def choose_attention(model, spec: TrainSpec, mode: Mode) -> None:
    """PyTorch's variable-length Flash attention over packed rows where it computes the same thing (auto, varlen),
    else transformers' SDPA with its block-diagonal mask; the choice and why go into mode (train.json)."""
    if spec.attention == "sdpa":
        mode.attention, why = "sdpa", "train.attention: sdpa"
    else:
        why_not = "train.packing is off" if not spec.packing else varlen_attention_unsupported(model.config, model.device)
        if why_not is None and not use_varlen_attention(model):
            why_not = f"{type(model).__name__} cannot change its attention implementation"
        if why_not is not None and spec.attention == "varlen":
            raise ValueError(f"train.attention: varlen, but {why_not}; use auto or sdpa")
        mode.attention = "sdpa" if why_not else "varlen"
        why = f"{spec.attention}: " + (f"SDPA ({why_not})" if why_not else "PyTorch's varlen Flash attention over packed rows")
    mode.speed_reason += f"; attention: {why}"


def build_model(params: Params, mode: Mode, model_dir: Path | None = None, spec: TrainSpec | None = None):
    """The base (4-bit for QLoRA) with LoRA adapters on `train.lora.target_modules` (spec: a task's own train
    settings, Params.train_for; default the train section)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    spec = spec or params.train
    model = load_causal_lm(model_dir or base_model_dir(), dtype=mode.dtype, device=mode.device, load_in_4bit=mode.name == "qlora",
                           trust_remote_code=params.model.trust_remote_code)
    model.config.use_cache = False
    if mode.kernels == "liger":  # before peft wraps the layers: Liger patches the modules themselves
        mode.speed_reason += f" ({apply_liger_kernels(model)})"
    choose_attention(model, spec, mode)
    # Non-reentrant checkpointing: the reentrant kind breaks DDP's gradient hooks and needs input grads.
    checkpointing = {"use_reentrant": False}
    if mode.name == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=mode.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif mode.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    # The adapter's files alike in every clone: the stage's base named by its project path in adapter_config.json
    # and peft's model card, not by this checkout's absolute one (which a teammate's `dvc pull` would not have) ...
    if model_dir is None:
        model.name_or_path = model.config.name_or_path = base_model_dir().relative_to(repo_root()).as_posix()
    model = get_peft_model(model, lora)
    # ... and the target modules sorted (peft keeps a set, whose order changes from one process to the next).
    config = model.peft_config["default"]
    if isinstance(config.target_modules, set):
        config.target_modules = sorted(config.target_modules)
    return model


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers, by the class names transformers lists in `_no_split_modules` (every family names its own)."""
    lm = causal_lm(model)
    layer_classes = set(getattr(lm, "_no_split_modules", None) or ())
    return [m for m in lm.modules() if type(m).__name__ in layer_classes]


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place; returns how many.

    Regional compilation: the layers run the same code, so they share one compiled graph and compiling takes seconds
    whatever the depth. `Module.compile` keeps parameter names, so checkpoints and adapters are unchanged.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(causal_lm(model)).__name__} names no decoder layer class (_no_split_modules) to "
                         "compile; set train.compile: false")
    for layer in layers:
        layer.compile()
    return len(layers)


def auto_compile(remaining_steps: int, seconds_per_step: float) -> tuple[bool, str]:
    """train.compile auto on a GPU: compile when the rest of the run, timed eager, is long enough to pay for it."""
    remaining = remaining_steps * seconds_per_step
    pays = remaining >= COMPILE_PAYS_AFTER_SECONDS
    return pays, (f"auto: the remaining {remaining_steps} steps would take ~{remaining:.0f} s eager "
                  f"({'at least' if pays else 'under'} {COMPILE_PAYS_AFTER_SECONDS:.0f} s): "
                  f"{'decoder layers compiled' if pays else 'eager'}")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in causal_lm(model).named_parameters() if v.requires_grad}


# ---------------------------------------------------------------- checkpoints


# Settings that change how fast a step runs, not what it computes (beyond float rounding). The auto values already
# resolve differently from one machine to the next, so a resumed run may take another path than the killed one.
SPEED_SETTINGS = frozenset({"compile", "kernels", "attention", "gradient_checkpointing",
                            "auto_checkpointing_memory_share", "pad_to_multiple_of", "checkpoint_every"})


def fingerprint(params: Params, task: str, train_file: Path) -> str:
    """A checkpoint resumes only a run with the same recipe, base and data. Speed settings are left out, so that
    turning one on between a killed run and its rerun keeps the steps already trained; so are the other tasks'
    overrides (the task's own are applied)."""
    recipe = params.train_for(task).model_dump(exclude={*SPEED_SETTINGS, "task_overrides"})
    blob = json.dumps([recipe, params.model.model_dump(), task], sort_keys=True).encode()
    return hashlib.sha256(blob + train_file.read_bytes()).hexdigest()[:16]


class CheckpointWriter:
    """Checkpoints written by a background thread: the step loop waits while the state is copied to host memory (and
    for the previous checkpoint, should it still be writing).

    A checkpoint (the best adapter, trainable weights, optimizer state and RNG states) goes to a temporary
    folder that is then renamed: a kill mid-write leaves the previous checkpoint intact. The best adapter goes
    in too because `dvc repro` deletes a stage's outputs before rerunning it. Writing took ~1.3 s a checkpoint
    on a 1B base (r 64 on every linear layer): 7% of an H200 run's loop when the steps waited for it.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, folder: Path, model, optimizer, state: dict, adapter_dir: Path, best: dict | None) -> None:
        """best: the best adapter's weights (host copies), written to adapter_dir first; None: adapter_dir is current."""
        self.wait()
        snapshot = {"trainable": trainable_state(model),
                    "optimizer": tree_map(lambda v: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v,
                                          optimizer.state_dict()),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        progress = json.dumps(state, indent=2)

        def write() -> None:
            try:
                if best is not None:
                    model.save_pretrained(adapter_dir, state_dict=best)
                tmp = folder.with_name(folder.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                shutil.copytree(adapter_dir, tmp / "best_adapter")
                torch.save(snapshot, tmp / "state.pt")
                (tmp / "progress.json").write_text(progress)
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
            except BaseException as error:  # noqa: BLE001 (re-raised in the training loop by wait())
                self._error = error

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Until the last checkpoint is on disk; its error, if writing it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError("writing a training checkpoint failed") from error


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


# ---------------------------------------------------------------- refusals, before anything loads

# accelerate's distributed types that shard the weights over the processes. The stage validates through the unwrapped
# model and saves the adapter without gathering shards: right where every process holds all the weights (DDP, what
# tests/test_train.py runs over 2 processes), wrong for these.
SHARDING_DISTRIBUTED_TYPES = frozenset({"FSDP", "DEEPSPEED", "MEGATRON_LM"})


def check_distributed_type(distributed_type: str, source: str) -> None:
    if distributed_type.upper() in SHARDING_DISTRIBUTED_TYPES:
        raise ValueError(f"{source} sets distributed_type: {distributed_type}, which the training stage does not "
                         "support: it validates and saves the adapter from each process's whole copy of the model, so "
                         "only data parallelism trains correctly. Use distributed_type: MULTI_GPU (DDP, on one or "
                         "several machines), or leave train.accelerate_config empty and set train.num_processes")


def check_accelerate_config(config_file: Path) -> None:
    """Refuse an `accelerate config` file whose distributed_type shards the model, before launching anything."""
    if not config_file.is_file():
        raise FileNotFoundError(f"train.accelerate_config: {config_file} does not exist; write it with `accelerate config`")
    config = yaml.safe_load(config_file.read_text()) or {}
    check_distributed_type(str(config.get("distributed_type", "NO")), str(config_file))


def check_audit_passed(task: str) -> None:
    """Train only on data that passed the audit gate (dvc.yaml lists its gate_passed among this stage's params)."""
    audit = metrics_file(task, "audit")
    if not audit.exists():
        raise FileNotFoundError(f"{audit} does not exist: the data audit has not run for {task}. Run it first "
                                f"(`dvc repro audit@{task}`); training starts only on data the audit passed")
    if json.loads(audit.read_text()).get("gate_passed") is not True:
        raise ValueError(f"{audit} says the data audit failed for {task} (gate_passed is not true), so it is not "
                         f"trained: fix the data (the audit's report, reports/{task}/01_data_audit.html, says what "
                         f"failed), then rerun the audit (`dvc repro audit@{task}`)")


def check_can_train(task: str, params: Params) -> None:
    """What run_training refuses before it trains or launches anything."""
    check_audit_passed(task)
    if params.train.accelerate_config:
        check_accelerate_config(repo_root() / params.train.accelerate_config)


# ---------------------------------------------------------------- setup


@dataclass
class Run:
    """One task's training as setup() builds it: what the step, the evaluation and the checkpoints work on."""

    task: str
    spec: TrainSpec
    accelerator: Accelerator
    mode: Mode
    model: torch.nn.Module  # the PEFT model: evaluated, saved and checkpointed
    loss_model: torch.nn.Module  # AnswerLoss(model) behind accelerate's wrapper (DDP): the training forward
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    validation: list[dict[str, torch.Tensor]]
    train_examples: int
    train_rows: int
    steps_per_epoch: int  # this process's steps, from the real batch count (even across processes)
    total_steps: int
    adapter_dir: Path
    checkpoint_dir: Path
    fingerprint: str

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def setup(task: str, params: Params) -> Run:
    """Accelerator, mode, data, model and optimizer for one task, in the order that fixes the random numbers each
    draws (the LoRA weights' initialisation among them): a rerun, or a resumed run, starts from the same ones."""
    from accelerate import Accelerator, DataLoaderConfiguration

    spec = params.train_for(task)
    # The seedable sampler reshuffles rows with seed + epoch on every process alike; even_batches completes
    # an epoch's last step on every process (with the epoch's first rows) when steps do not divide evenly,
    # so no process is left without a batch while the others wait in an all-reduce.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=spec.seed,
                                                                        even_batches=True,
                                                                        non_blocking=torch.cuda.is_available()))
    # `accelerate launch --config_file` by hand skips run_training's check of the file
    check_distributed_type(accelerator.distributed_type.value, "accelerate launch")
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)

    free = None
    if accelerator.device.type == "cuda":  # the tightest GPU decides, so every process picks the same mode
        free = int(accelerator.gather(torch.tensor([free_gpu_bytes(accelerator.device)], device=accelerator.device)).min())
    mode = choose_speed(choose_mode(spec, base_model_dir(), accelerator.device, free), spec, base_model_dir(), free,
                        params.model.trust_remote_code)

    tokenizer = load_tokenizer(base_model_dir())
    data = processed_dir(task)
    template_kwargs = params.tasks[task].output.template_kwargs()  # e.g. tools=: rendered as the base's template does
    train_examples = render_records(tokenizer, read_jsonl(data / "train.jsonl"), spec.max_seq_len, **template_kwargs)
    eval_examples = render_records(tokenizer, read_jsonl(data / "validation.jsonl")[: spec.eval_rows], spec.max_seq_len,
                                   **template_kwargs)
    validation = eval_batches(eval_examples, spec, tokenizer.pad_token_id)
    # Rows are packed once; one DataLoader item is one optimizer step on one process (grad_accum micro-batches).
    loader = step_loader(train_examples, spec, tokenizer.pad_token_id)
    train_rows = len(loader.dataset)

    model = build_model(params, mode, spec=spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Fused AdamW on a GPU (one kernel for all LoRA tensors); the CPU keeps torch's default implementation.
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                  fused=True if accelerator.device.type == "cuda" else None)
    # The forward goes through accelerate's wrapper (DDP): AnswerLoss's forward is the masked loss.
    # The model is already on its device (QLoRA's 4-bit weights must not be moved again).
    loss_model, optimizer, loader = accelerator.prepare(AnswerLoss(model), optimizer, loader,
                                                        device_placement=[False, True, True])
    return Run(task=task, spec=spec, accelerator=accelerator, mode=mode, model=model, loss_model=loss_model,
               trainable=trainable, optimizer=optimizer, loader=loader, validation=validation,
               train_examples=len(train_examples), train_rows=train_rows, steps_per_epoch=len(loader),
               total_steps=spec.max_steps or math.ceil(spec.epochs * len(loader)),
               adapter_dir=adapter_dir(task), checkpoint_dir=checkpoint_dir(task),
               fingerprint=fingerprint(params, task, data / "train.jsonl") + f"-p{accelerator.num_processes}")


def resume_or_start(run: Run) -> dict:
    """The run's progress: from its last checkpoint when one matches the recipe, else step 0 with the base model's
    validation loss (the untrained adapter is the best one so far)."""
    state = load_checkpoint(run.checkpoint_dir, run.model, run.optimizer, run.fingerprint, run.adapter_dir)
    if state is not None:
        return state
    base_loss = evaluate(run)
    if run.is_main:
        run.model.save_pretrained(run.adapter_dir)
    return {"fingerprint": run.fingerprint, "step": 0, "tokens_seen": 0, "base_eval_loss": base_loss,
            "best_eval_loss": base_loss, "best_step": 0, "bad_evals": 0, "train_seconds": 0.0,
            "history": [{"step": 0, "tokens_seen": 0, "train_loss": None, "grad_norm": None, "eval_loss": base_loss,
                         "lr": 0.0}]}


# ---------------------------------------------------------------- one step, evaluation


def train_step(run: Run, item: dict, lr: float) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One optimizer step over the step's micro-batches. Returns the step's mean train loss and its gradients' total
    norm before clipping (None without clipping), both left on the device, and the tokens the step saw on all
    processes."""
    accelerator, spec = run.accelerator, run.spec
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # The loss is the token mean over the whole global step, whatever the micro-batches and processes:
    # each process scales its summed loss by N / (all processes' trained tokens), since DDP averages.
    trained, tokens = item["trained_tokens"], item["tokens"]
    if accelerator.num_processes > 1:
        counts = torch.tensor([trained, tokens], device=accelerator.device)
        trained, tokens = (int(c) for c in accelerator.reduce(counts, reduction="sum"))
    scale = accelerator.num_processes / max(1, trained)
    step_loss = torch.zeros((), device=accelerator.device)
    micro = item["micro_batches"]
    for i, batch in enumerate(micro):
        # Gradients are all-reduced once a step, on its last micro-batch.
        sync = accelerator.no_sync(run.loss_model) if i < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            loss = run.loss_model(batch) * scale
            accelerator.backward(loss)
        step_loss += loss.detach()
    # Clipped after the all-reduce, so every process sees the same global gradient and clips it alike.
    grad_norm = accelerator.clip_grad_norm_(run.trainable, spec.max_grad_norm) if spec.max_grad_norm else None
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    # This process's share of the step's mean loss, summed over processes.
    return accelerator.reduce(step_loss, reduction="sum") / accelerator.num_processes, grad_norm, tokens


def evaluate(run: Run) -> float:
    """The validation loss. Every process scores the same batches; the mean makes the value (and early stopping)
    identical on all. Eager even with compiled layers: no-grad forwards would compile graphs of their own for a small
    share of the time."""
    with torch.compiler.set_stance("force_eager"):
        loss = evaluate_loss(run.model, run.validation, str(run.accelerator.device))
    return float(run.accelerator.reduce(torch.tensor([loss], device=run.accelerator.device), reduction="mean"))


class History:
    """The per-step records of train_history.csv (state["history"], checkpointed with the run).

    A step's loss and gradient norm stay on the device until the next evaluation or checkpoint reads them all in one
    host sync: reading them every step would stall the host until the GPU finished the step, so the next step's batch
    and kernel launches could not overlap it.
    """

    def __init__(self, records: list[dict]) -> None:
        self.records = records
        self._unread: list[tuple[dict, torch.Tensor, torch.Tensor | None]] = []

    def add(self, record: dict, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        self.records.append(record)
        self._unread.append((record, loss, grad_norm))

    def read(self) -> None:
        if not self._unread:
            return
        records, losses, norms = zip(*self._unread, strict=True)
        for record, loss in zip(records, torch.stack(losses).tolist(), strict=True):
            record["train_loss"] = loss
        if norms[0] is not None:  # clipping is on for every step or none
            for record, norm in zip(records, torch.stack(norms).float().tolist(), strict=True):
                record["grad_norm"] = norm
        self._unread.clear()


# ---------------------------------------------------------------- timing, compile decision


class Timer:
    """The run's wall time, the part spent outside training steps (validation, checkpoints), and the steady state's
    start: WARMUP_STEPS steps after the first (or after compiling), once kernels are compiled and caches warm."""

    def __init__(self, first_step: int, tokens_seen: int) -> None:
        self.started = time.perf_counter()
        self.tokens_at_start = tokens_seen
        self.eval_seconds = self.checkpoint_seconds = 0.0
        self.warm_step = first_step + WARMUP_STEPS
        self.warm_mark: tuple[float, int, float] | None = None  # (time, tokens seen, seconds aside) at warm_step

    def aside(self) -> float:
        return self.eval_seconds + self.checkpoint_seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def evaluating(self):
        started = time.perf_counter()
        yield
        self.eval_seconds += time.perf_counter() - started

    @contextlib.contextmanager
    def checkpointing(self):
        started = time.perf_counter()
        yield
        self.checkpoint_seconds += time.perf_counter() - started

    def step_done(self, step: int, tokens_seen: int, synchronize: bool) -> None:
        """synchronize: wait for the GPU's queued steps before reading the clock, where the time must be exact."""
        if step == self.warm_step:
            if synchronize:
                torch.cuda.synchronize()
            self.warm_mark = (time.perf_counter(), tokens_seen, self.aside())

    def steps_seconds_since_warm(self) -> float:
        return time.perf_counter() - self.warm_mark[0] - (self.aside() - self.warm_mark[2])


class CompileDecision:
    """train.compile: true compiles the decoder layers now; auto on a GPU decides once COMPILE_TIMED_STEPS steps after
    the warm-up are timed (auto_compile); the reason goes into train.json's speed_reason."""

    def __init__(self, run: Run, first_step: int) -> None:
        spec, device_type = run.spec, run.accelerator.device.type
        self.pending, self.compiled_at = False, None
        self.decide_at = first_step + WARMUP_STEPS + COMPILE_TIMED_STEPS
        if spec.compile != "auto":
            self.reason = f"train.compile: {str(spec.compile).lower()}"
            if spec.compile:
                compile_decoder_layers(run.model)
                self.compiled_at = first_step
        elif device_type != "cuda":
            self.reason = ("auto: eager on a CPU (on this project's 2-core CPU the compiled step was no faster, 4.96 "
                           "against 4.95 s for 4 x 256 tokens, and compiling cost ~14 s)")
        elif not decoder_layers(run.model):
            self.reason = "auto: the model names no decoder layer class to compile: eager"
        else:
            self.pending, self.reason = True, "auto: the run ended before its steps were timed: eager"

    def step_done(self, run: Run, step: int, timer: Timer) -> None:
        if not (self.pending and step == self.decide_at):
            return
        torch.cuda.synchronize()
        per_step = torch.tensor([timer.steps_seconds_since_warm() / COMPILE_TIMED_STEPS], device=run.accelerator.device)
        self.pending = False  # every process decides alike, on the mean of their timings
        compiled, self.reason = auto_compile(run.total_steps - step,
                                             float(run.accelerator.reduce(per_step, reduction="mean")))
        if compiled:
            compile_decoder_layers(run.model)
            self.compiled_at = step
            timer.warm_step = step + WARMUP_STEPS  # steady again once the graphs are compiled


# ---------------------------------------------------------------- the run


def train_task(task: str, params: Params | None = None) -> dict:
    """Train one task's adapter; returns the metrics also written to metrics/<task>/train.json."""
    params = params or load_params()
    run = setup(task, params)
    spec = run.spec
    state = resume_or_start(run)
    resumed_from = state["step"]
    history = History(state["history"])
    # The best adapter so far stays in host memory and is written at checkpoints and at the end: writing it at
    # every better evaluation cost seconds a time on a 1B base (r 64 on every linear layer is ~45M weights).
    best: dict[str, torch.Tensor] | None = None
    checkpoints = CheckpointWriter()
    compiler = CompileDecision(run, resumed_from)
    if run.accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    run.loss_model.train()
    bar = tqdm(total=run.total_steps, initial=resumed_from, desc=f"train {task}", disable=not run.is_main, mininterval=5)
    timer = Timer(resumed_from, state["tokens_seen"])
    stop_reason = "max_steps" if spec.max_steps else "epochs"
    while state["step"] < run.total_steps and stop_reason in ("max_steps", "epochs"):
        epoch, done_in_epoch = divmod(state["step"], run.steps_per_epoch)
        run.loader.set_epoch(epoch)
        # A resumed run skips the steps this epoch already took; the sampler's seed + epoch gives the same order.
        epoch_steps = run.accelerator.skip_first_batches(run.loader, done_in_epoch) if done_in_epoch else run.loader
        for item in epoch_steps:
            lr = lr_at(state["step"], run.total_steps, spec)
            loss, grad_norm, tokens = train_step(run, item, lr)
            state["step"] += 1
            state["tokens_seen"] += tokens
            record = {"step": state["step"], "tokens_seen": state["tokens_seen"], "train_loss": None,
                      "grad_norm": None, "eval_loss": None, "lr": lr}
            history.add(record, loss, grad_norm)
            timer.step_done(state["step"], state["tokens_seen"], synchronize=compiler.pending)
            compiler.step_done(run, state["step"], timer)

            if state["step"] % spec.eval_every == 0 or state["step"] == run.total_steps:
                history.read()
                with timer.evaluating():
                    record["eval_loss"] = evaluate(run)
                    if record["eval_loss"] < state["best_eval_loss"]:
                        state.update(best_eval_loss=record["eval_loss"], best_step=state["step"], bad_evals=0)
                        if run.is_main:
                            best = {k: v.detach().to("cpu", copy=True)
                                    for k, v in run.model.named_parameters() if v.requires_grad}
                    else:
                        state["bad_evals"] += 1
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", eval=f"{state['best_eval_loss']:.3f}",
                                tok_s=f"{(state['tokens_seen'] - timer.tokens_at_start) / timer.elapsed():.0f}",
                                refresh=False)
            bar.update(1)

            if state["bad_evals"] >= spec.early_stopping_patience:
                stop_reason = f"early stopping: no better validation loss in {spec.early_stopping_patience} evaluations"
                break
            if state["step"] >= run.total_steps:
                break
            if run.is_main and state["step"] % spec.checkpoint_every == 0:
                history.read()
                with timer.checkpointing():
                    checkpoints.save(run.checkpoint_dir, run.model, run.optimizer,
                                     {**state, "train_seconds": state["train_seconds"] + timer.elapsed()},
                                     run.adapter_dir, best)
                best = None  # written with this checkpoint
    bar.close()
    history.read()
    with timer.checkpointing():
        checkpoints.wait()
    elapsed = timer.elapsed()
    state["train_seconds"] += elapsed

    metrics = train_metrics(run, state, timer, elapsed, compiler, stop_reason, resumed_from)
    if run.is_main:
        save(run, state, metrics, best)
    run.accelerator.wait_for_everyone()
    return metrics


def train_metrics(run: Run, state: dict, timer: Timer, elapsed: float, compiler: CompileDecision, stop_reason: str,
                  resumed_from: int) -> dict:
    """train.json: the choices made and why, the run's size, its speeds and its losses."""
    mode, tokens = run.mode, state["tokens_seen"] - timer.tokens_at_start
    return {
        "task": run.task, "mode": mode.name, "mode_reason": mode.reason, "device": str(run.accelerator.device),
        "kernels": mode.kernels, "gradient_checkpointing": mode.gradient_checkpointing, "attention": mode.attention,
        "compiled": compiler.compiled_at is not None, "compiled_at_step": compiler.compiled_at,
        "speed_reason": f"{mode.speed_reason}; compile: {compiler.reason}",
        "dtype": str(mode.dtype).replace("torch.", ""), "max_grad_norm": run.spec.max_grad_norm or None,
        "processes": run.accelerator.num_processes, "steps": state["step"], "planned_steps": run.total_steps,
        "steps_per_epoch": run.steps_per_epoch, "stop_reason": stop_reason, "resumed_from_step": resumed_from,
        "train_examples": run.train_examples, "train_rows": run.train_rows, "tokens_seen": state["tokens_seen"],
        "tokens_per_second": tokens / max(elapsed, 1e-9),
        # the same without validation and checkpoint time: the training steps alone
        "step_tokens_per_second": tokens / max(elapsed - timer.aside(), 1e-9),
        # the steps after the first WARMUP_STEPS, without validation and checkpoints: comparable with a model step
        # timed after warm-up (benchmarks/gpu_runs.py)
        "steady_tokens_per_second": None if timer.warm_mark is None else (state["tokens_seen"] - timer.warm_mark[1]) / max(
            timer.started + elapsed - timer.warm_mark[0] - (timer.aside() - timer.warm_mark[2]), 1e-9),
        "eval_seconds": timer.eval_seconds, "checkpoint_seconds": timer.checkpoint_seconds,
        "wall_seconds": state["train_seconds"],
        "base_eval_loss": state["base_eval_loss"], "best_eval_loss": state["best_eval_loss"],
        "best_step": state["best_step"],
        "final_train_loss": next((h["train_loss"] for h in reversed(state["history"]) if h["train_loss"] is not None), None),
        "peak_memory_gb": peak_memory_gb(run.accelerator.device.type),
    }


def save(run: Run, state: dict, metrics: dict, best: dict[str, torch.Tensor] | None) -> None:
    """The main process's outputs: the best adapter (best: its weights when not yet written), train.json, the history;
    the checkpoints go, as a finished run leaves nothing to resume."""
    if best is not None:
        run.model.save_pretrained(run.adapter_dir, state_dict=best)
    write_metrics(metrics_file(run.task, "train"), metrics)
    write_history(train_history_file(run.task), state["history"])
    (run.adapter_dir / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(run.checkpoint_dir.parent, ignore_errors=True)


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


HISTORY_COLUMNS = ("step", "tokens_seen", "train_loss", "grad_norm", "eval_loss", "lr")


def write_history(path: Path, history: list[dict]) -> None:
    """CSV that `dvc plots show` draws (loss against step); grad_norm is empty where clipping is off."""
    lines = [",".join(HISTORY_COLUMNS)]
    for h in history:
        cells = [h.get(column) for column in HISTORY_COLUMNS]
        lines.append(",".join("" if c is None else f"{c:.6g}" if isinstance(c, float) else str(c) for c in cells))
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- entry points


def run_training(task: str, params: Params | None = None) -> dict:
    """The notebook's entry point: refuse what should not train, then train in this process, or through `accelerate
    launch` where train.num_processes or train.accelerate_config asks for it; returns train.json's metrics."""
    params = params or load_params()
    check_can_train(task, params)
    if params.train.num_processes == 1 and not params.train.accelerate_config:
        return train_task(task, params)
    config = ["--config_file", str(repo_root() / params.train.accelerate_config)] if params.train.accelerate_config else []
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes",
                    str(params.train.num_processes), "-m", "tuneforge.stages.train", "--task", task], check=True)
    return json.loads(metrics_file(task, "train").read_text())


def main(argv: list[str] | None = None) -> None:
    """One process of `accelerate launch -m tuneforge.stages.train --task T`, as run_training launches it."""
    parser = argparse.ArgumentParser(description="train one task's adapter (accelerate launch for several GPUs)")
    parser.add_argument("--task", required=True)
    args = parser.parse_args(argv)
    from accelerate import PartialState

    metrics = train_task(args.task)
    if PartialState().is_main_process:
        print(json.dumps(metrics, indent=2))
    PartialState().destroy_process_group()


if __name__ == "__main__":
    main()
