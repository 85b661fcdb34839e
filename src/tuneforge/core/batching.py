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


def render_records(tokenizer, records: list[dict], max_seq_len: int) -> list[Rendered]:
    """Chat-render each record, truncated to max_seq_len; records left with no trained token are dropped."""
    out = []
    for record in records:
        r = render(tokenizer, record["messages"])
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


def collate_packed(rows: list[list[Rendered]], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples side by side in one row; position_ids restart at 0 for each.

    With no attention_mask, transformers reads the restarts as example boundaries and
    builds a block-diagonal causal mask, so no token attends across examples.
    """
    width = max(sum(len(ex.input_ids) for ex in row) for row in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        r_ids = [t for ex in row for t in ex.input_ids]
        r_labels = [t for ex in row for t in ex.labels]
        r_pos = [p for ex in row for p in range(len(ex.input_ids))]
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_labels + [IGNORE] * pad)
        positions.append(r_pos + list(range(pad)))  # padding forms its own (untrained) block
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions),
            "tokens": torch.tensor(sum(len(ex.input_ids) for row in rows for ex in row))}


def collate_padded(examples: list[Rendered], pad_id: int) -> dict[str, torch.Tensor]:
    """One example a row, right-padded, with an attention mask."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = [ex.input_ids + [pad_id] * (width - len(ex.input_ids)) for ex in examples]
    labels = [ex.labels + [IGNORE] * (width - len(ex.labels)) for ex in examples]
    mask = [[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in examples]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask),
            "tokens": torch.tensor(sum(len(ex.input_ids) for ex in examples))}


def make_batches(examples: list[Rendered], spec: TrainSpec, pad_id: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """One epoch of batches in a seeded order (so a resumed run sees the same batches)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    if spec.packing:
        rows = pack(shuffled, spec.max_seq_len)
        return [collate_packed(rows[i : i + spec.batch_size], pad_id) for i in range(0, len(rows), spec.batch_size)]
    return [collate_padded(shuffled[i : i + spec.batch_size], pad_id) for i in range(0, len(shuffled), spec.batch_size)]


def causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over trained tokens, number of trained tokens).

    The LM head runs only on positions that carry loss: with a 49k vocabulary it is the
    most expensive matmul, and most positions (prompts, padding) carry none.
    """
    lm = causal_lm(model)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "tokens")}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    # On CUDA, autocast keeps the fp32 pieces (LoRA weights, and the norms and head that QLoRA's
    # preparation upcasts) in bf16 matmuls: without it a 1B QLoRA step ran at half the speed.
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=targets.device.type == "cuda"):
        hidden = lm.base_model(**inputs).last_hidden_state[:, :-1]  # the decoder, whatever the architecture names it
        logits = lm.get_output_embeddings()(hidden[keep])
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def evaluate_loss(model, batches: list[dict[str, torch.Tensor]], device: str) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        s, n = loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(s), count + n
    model.train()
    return total / max(1, count)
