"""Host time a training step spends on batching, against dataset size (no model: the batching alone).

Synthetic rendered examples (random token ids, 40-300 tokens, the last third of each trained) stand in
for chat-rendered records. For each size it times:
- `before`: what each step cost before the DataLoader (the whole epoch shuffled, packed and collated,
  then one step's batch taken), once;
- `rows_once`: packing the dataset into rows, once per run;
- `epoch_start`: starting an epoch's iterator (the seeded sampler draws its permutation), once per epoch;
- `per_step`: the mean time to get one step's collated micro-batches from the accelerate-prepared DataLoader.

    python benchmarks/batching_host_time.py --sizes 4000 40000 400000 --out benchmarks/results_batching.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from tuneforge.core.batching import StepCollator, TrainRows, collate_packed, pack
from tuneforge.core.chat import IGNORE, Rendered
from tuneforge.core.params import TrainSpec


def synthetic(n: int, seed: int = 0) -> list[Rendered]:
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(40, 300, size=n):
        ids = rng.integers(0, 49152, size=length).tolist()
        answer = length // 3
        out.append(Rendered(ids, [IGNORE] * (length - answer) + ids[-answer:]))
    return out


def before_per_step(examples: list[Rendered], spec: TrainSpec) -> float:
    """The old make_batches: the whole epoch re-batched to take one step's batch."""
    started = time.perf_counter()
    order = np.random.default_rng(spec.seed).permutation(len(examples))
    rows = pack([examples[i] for i in order], spec.max_seq_len)
    batches = [collate_packed(rows[i : i + spec.batch_size], 0) for i in range(0, len(rows), spec.batch_size)]
    assert batches
    return time.perf_counter() - started


def after(examples: list[Rendered], spec: TrainSpec, steps: int) -> dict:
    from accelerate import Accelerator, DataLoaderConfiguration

    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                                  data_seed=spec.seed))
    started = time.perf_counter()
    rows = TrainRows(examples, spec, seed=spec.seed)
    rows_once = time.perf_counter() - started
    loader = torch.utils.data.DataLoader(rows, batch_size=spec.batch_size * spec.grad_accum, shuffle=True,
                                         collate_fn=StepCollator(spec.batch_size, 0, spec.packing))
    loader = accelerator.prepare(loader)
    loader.set_epoch(0)
    started = time.perf_counter()
    iterator = iter(loader)
    next(iterator)  # the first step includes the epoch's permutation (and the loader's one-ahead prefetch)
    epoch_start = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return {"rows": len(rows), "rows_once_s": rows_once, "epoch_start_s": epoch_start,
            "per_step_ms": 1000 * (time.perf_counter() - started) / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 40000, 400000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    spec = TrainSpec(max_seq_len=args.seq, batch_size=args.batch)
    results = []
    for n in args.sizes:
        examples = synthetic(n)
        row = {"examples": n, "before_per_step_s": before_per_step(examples, spec), **after(examples, spec, args.steps)}
        print(json.dumps(row))
        results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"seq": args.seq, "batch": args.batch, "steps_timed": args.steps, "rows": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
