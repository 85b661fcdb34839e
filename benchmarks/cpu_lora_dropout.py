"""What LoRA's dropout and the attention kernel cost a CPU training step (the recipe's train.lora.dropout).

    python benchmarks/cpu_lora_dropout.py [--json benchmarks/results_cpu_lora_dropout.json]

The embedded model with the stage's LoRA (build_model, the stage's dtype), 4 rows of 256 random tokens a step with
the last 56 of each trained (the CPU profile's micro-batch), AdamW; 2 warm-up steps, then 4 timed, for: dropout
0.05 and 0 under SDPA's flash kernel, dropout 0 under SDPA's math kernel; then a profile of one dropout-0.05 step
by operator. peft draws a Bernoulli mask over every adapter's input (7 adapters a layer, 30 layers) each step; on
the CPU those draws alone took a fifth of the step.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from tuneforge.core.batching import IGNORE, answer_loss
from tuneforge.core.modeling import compute_dtype
from tuneforge.core.params import load_params
from tuneforge.stages.train import Mode, build_model

WARMUP, TIMED, ROWS, SEQ, TRAINED = 2, 4, 4, 256, 56


def setup(dropout: float):
    torch.manual_seed(0)
    params = load_params().with_settings({"train.lora.dropout": dropout})
    model = build_model(params, Mode("lora", "cpu", compute_dtype("cpu")))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = torch.Generator().manual_seed(1)

    def step() -> None:
        ids = torch.randint(0, 49000, (ROWS, SEQ), generator=rows)
        labels = ids.clone()
        labels[:, : SEQ - TRAINED] = IGNORE
        (answer_loss(model, {"input_ids": ids, "labels": labels}) / (ROWS * TRAINED)).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def seconds_a_step(dropout: float, backend: SDPBackend) -> float:
    step = setup(dropout)
    with sdpa_kernel([backend]):
        for _ in range(WARMUP):
            step()
        start = time.perf_counter()
        for _ in range(TIMED):
            step()
    return (time.perf_counter() - start) / TIMED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for dropout, backend in ((0.05, SDPBackend.FLASH_ATTENTION), (0.0, SDPBackend.FLASH_ATTENTION),
                             (0.0, SDPBackend.MATH)):
        seconds = seconds_a_step(dropout, backend)
        rows.append({"lora_dropout": dropout, "sdpa": backend.name, "seconds_a_step": seconds,
                     "tokens_per_second": ROWS * SEQ / seconds})
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["speed_vs_dropout_0.05"] = rows[0]["seconds_a_step"] / row["seconds_a_step"]
    step = setup(0.05)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    top = [{"op": e.key, "share_of_step": e.self_cpu_time_total / total, "calls": e.count} for e in ops[:6]]
    for op in top:
        print(f"{op['op']:<60} {op['share_of_step']:6.1%} {op['calls']:6d} calls")
    result = {"machine": f"{torch.get_num_threads()} torch threads, {compute_dtype('cpu')}", "rows": rows,
              "dropout_0.05_profile": top}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
