"""From chat records to tensors, and the loss on them: the training contract that training, evaluation
(perplexity) and the throughput benchmark share.

    records -> chat template with loss mask -> (packed) rows -> collated batches -> summed answer-token loss
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tuneforge.core.chat import IGNORE, Rendered, render
from tuneforge.core.params import TrainSpec


def render_records(tokenizer, records: list[dict], max_seq_len: int, **template_kwargs) -> list[Rendered]:
    """Chat-render each record (template_kwargs: the output kind's, e.g. tools=), truncated to max_seq_len; records
    left with no trained token are dropped."""
    out = []
    for record in records:
        r = render(tokenizer, record["messages"], **template_kwargs)
        r = Rendered(r.input_ids[:max_seq_len], r.labels[:max_seq_len])
        if r.trained_tokens:
            out.append(r)
    return out


def pack(examples: list[Rendered], max_seq_len: int) -> list[list[Rendered]]:
    """Greedy packing in the given order: each row holds whole examples up to max_seq_len tokens."""
    rows: list[list[Rendered]] = []
    current: list[Rendered] = []
    used = 0
    for ex in examples:
        if current and used + len(ex.input_ids) > max_seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex.input_ids)
    if current:
        rows.append(current)
    return rows


def padded_width(width: int, multiple: int) -> int:
    """The batch width rounded up to a multiple: on a GPU, fixed widths let cuDNN's attention reuse its plan.

    Measured on one H200 (benchmarks/README.md): with packed rows of a new width every step, cuDNN attention
    spent ~2 ms of host time a layer building a plan, and the model step ran at 0.71 of its fixed-width speed.
    """
    return -(-width // multiple) * multiple


def collate_packed(rows: list[list[Rendered]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Examples side by side in one row; position_ids restart at 0 for each.

    With no attention_mask, transformers' SDPA path reads the restarts as example boundaries and builds a
    block-diagonal causal mask, so no token attends across examples. The same boundaries also come as the
    keys transformers' Flash path reads (`cu_seq_lens_q/k`: where each example starts in the flattened batch;
    `max_length_q/k`: the longest, a host int), for modeling.varlen_attention; SDPA ignores them.
    """
    width = padded_width(max(sum(len(ex.input_ids) for ex in row) for row in rows), multiple)
    ids, labels, positions, lengths = [], [], [], []
    for row in rows:
        r_ids = [t for ex in row for t in ex.input_ids]
        r_labels = [t for ex in row for t in ex.labels]
        r_pos = [p for ex in row for p in range(len(ex.input_ids))]
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE] * pad)
        positions.append(r_pos + list(range(pad)))  # padding forms its own (untrained) block
        lengths += [len(ex.input_ids) for ex in row] + ([pad] if pad else [])
    starts = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
            "cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": max(lengths), "max_length_k": max(lengths),
            "tokens": torch.tensor(sum(len(ex.input_ids) for row in rows for ex in row))}


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch's tensors on the device; host ints (the boundaries' max_length) stay ints."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def collate_padded(examples: list[Rendered], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """One example a row, right-padded, with an attention mask."""
    width = padded_width(max(len(ex.input_ids) for ex in examples), multiple)
    ids = [ex.input_ids + [pad_id] * (width - len(ex.input_ids)) for ex in examples]
    labels = [ex.labels + [IGNORE] * (width - len(ex.labels)) for ex in examples]
    mask = [[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in examples]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask),
            "tokens": torch.tensor(sum(len(ex.input_ids) for ex in examples))}


class TrainRows(torch.utils.data.Dataset):
    """The training set as the units a batch is made of, built once for the whole run.

    With packing, examples are packed once (in a seeded order) into rows of up to max_seq_len tokens;
    without, each example is a row. The DataLoader's seeded sampler then shuffles rows every epoch, so
    a training step's host work is collating its own rows, whatever the dataset's size.
    """

    def __init__(self, examples: list[Rendered], spec: TrainSpec, seed: int):
        order = np.random.default_rng(seed).permutation(len(examples))
        shuffled = [examples[i] for i in order]
        self.rows: list[list[Rendered]] = pack(shuffled, spec.max_seq_len) if spec.packing else [[ex] for ex in shuffled]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[Rendered]:
        return self.rows[i]


class StepCollator:
    """One DataLoader item = one optimizer step on this process: its rows, cut into micro-batches of
    `batch_size` rows of a width rounded up to `pad_to_multiple_of`, with the step's token counts computed on
    the host (no device sync to learn them)."""

    def __init__(self, batch_size: int, pad_id: int, packing: bool, pad_to_multiple_of: int = 1):
        self.batch_size, self.pad_id, self.packing, self.multiple = batch_size, pad_id, packing, pad_to_multiple_of

    def __call__(self, rows: list[list[Rendered]]) -> dict:
        micro = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            batch = (collate_packed(chunk, self.pad_id, self.multiple) if self.packing
                     else collate_padded([r[0] for r in chunk], self.pad_id, self.multiple))
            del batch["tokens"]  # counted below as plain ints
            micro.append(batch)
        return {"micro_batches": micro,
                "tokens": sum(len(ex.input_ids) for row in rows for ex in row),
                "trained_tokens": sum(ex.trained_tokens for row in rows for ex in row)}


def step_loader(examples: list[Rendered], spec: TrainSpec, pad_id: int) -> torch.utils.data.DataLoader:
    """The training steps: rows packed once (TrainRows), shuffled every epoch by a seeded sampler, one item a step.

    The loader has its own generator: starting an epoch's iterator then draws nothing from the global RNG (which
    dropout uses), so a resumed run, restoring that RNG from its checkpoint, continues exactly. On a GPU, pinned
    host batches copy to the device without blocking the host.
    """
    return torch.utils.data.DataLoader(TrainRows(examples, spec, seed=spec.seed), batch_size=spec.batch_size * spec.grad_accum,
                                       shuffle=True, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator().manual_seed(spec.seed),
                                       collate_fn=StepCollator(spec.batch_size, pad_id, spec.packing, spec.pad_to_multiple_of))


def eval_batches(examples: list[Rendered], spec: TrainSpec, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Validation batches, built once, in file order."""
    rows = pack(examples, spec.max_seq_len) if spec.packing else [[ex] for ex in examples]
    collate = StepCollator(spec.batch_size, pad_id, spec.packing, spec.pad_to_multiple_of)
    return [b for i in range(0, len(rows), spec.batch_size) for b in collate(rows[i : i + spec.batch_size])["micro_batches"]]


def causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the trained (answer) tokens.

    PyTorch's path runs the LM head only on positions that carry loss: with a 49k-128k vocabulary it is
    the most expensive matmul, and most positions (prompts, padding) carry none. Liger's fused path takes
    every position instead, the untrained ones labelled IGNORE: selecting the trained rows (`hidden[keep]`)
    waits for the GPU to count them and gives the kernels a new shape every step, which cost more on an
    H200 than the head's extra rows (benchmarks/README.md).
    """
    lm = causal_lm(model)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "tokens")}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    # On CUDA, autocast keeps the fp32 pieces (LoRA weights, and the norms and head that QLoRA's
    # preparation upcasts) in bf16 matmuls: without it a 1B QLoRA step ran at half the speed.
    fused = getattr(lm, "fused_linear_cross_entropy", None) if torch.is_grad_enabled() else None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=targets.device.type == "cuda"):
        hidden = lm.base_model(**inputs).last_hidden_state[:, :-1]  # the decoder, whatever the architecture names it
        head = lm.get_output_embeddings()
        # Liger (modeling.apply_liger_kernels): head and loss in chunks, no full logits. Only over a plain head
        # (not one with LoRA adapters or 4-bit weights, whose .weight alone is not the layer).
        if fused is not None and type(head) is torch.nn.Linear:
            return fused(head.weight, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), head.bias)
        logits = head(hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over trained tokens, number of trained tokens)."""
    return answer_loss(model, batch), int((batch["labels"][:, 1:] != IGNORE).sum())


class AnswerLoss(torch.nn.Module):
    """The (PEFT) model behind a forward that returns the summed answer-token loss.

    accelerate wraps this module (DDP), so every training forward runs through the wrapper's own
    forward, which DDP needs to set up its gradient all-reduce; inside, answer_loss computes the loss.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return answer_loss(self.model, batch)


@torch.no_grad()
def evaluate_loss(model, batches: list[dict[str, torch.Tensor]], device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_sum(model, to_device(batch, device))
        total, count = total + float(s), count + n
    model.train()
    return total / max(1, count)
