"""How full the training rows are: the stage's packing (core.batching.pack: greedy, in the seeded order) against
best-fit decreasing (TRL's default packing_strategy="bfd"), on each task's real training split.

A CPU step costs the same whatever its rows hold (every position of a 4 x 256 batch is computed), so the fill is
the share of a step's compute that trains on tokens; the same tokens would take fewer steps in fuller rows. (Tried
2026-12-07: best fit with steps cut to keep the tokens lost quality; benchmarks/README.md, CPU section.)

    python benchmarks/packing_fill.py [--out benchmarks/results_packing_fill.json]
"""

from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path

from tuneforge.core.batching import TrainRows, render_records
from tuneforge.core.modeling import load_tokenizer
from tuneforge.core.params import load_params
from tuneforge.core.paths import base_model_dir, processed_dir
from tuneforge.core.records import read_jsonl


def best_fit_rows(lengths: list[int], cap: int) -> int:
    """Longest first, each into the fullest row it still fits in."""
    room: list[int] = []  # each open row's free tokens, sorted
    for n in sorted(lengths, reverse=True):
        at = bisect.bisect_left(room, n)
        if at < len(room):
            bisect.insort(room, room.pop(at) - n)
        else:
            bisect.insort(room, cap - n)
    return len(room)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results_packing_fill.json")
    args = parser.parse_args()
    params = load_params()
    tokenizer = load_tokenizer(base_model_dir())
    results = {}
    for task in params.tasks:
        spec = params.train_for(task)
        examples = render_records(tokenizer, read_jsonl(processed_dir(task) / "train.jsonl"), spec.max_seq_len,
                                  **params.tasks[task].output.template_kwargs())
        tokens = sum(len(ex.input_ids) for ex in examples)
        greedy = len(TrainRows(examples, spec, seed=spec.seed))  # the stage's rows
        best_fit = best_fit_rows([len(ex.input_ids) for ex in examples], spec.max_seq_len)
        row = {"examples": len(examples), "tokens": tokens, "max_seq_len": spec.max_seq_len,
               "next_fit_rows": greedy, "next_fit_fill": tokens / (greedy * spec.max_seq_len),
               "best_fit_rows": best_fit, "best_fit_fill": tokens / (best_fit * spec.max_seq_len),
               "steps_an_epoch_next_fit": greedy / spec.batch_size, "steps_an_epoch_best_fit": best_fit / spec.batch_size}
        results[task] = row
        print(f"{task}: {len(examples)} examples, {tokens} tokens; next-fit {greedy} rows ({row['next_fit_fill']:.1%} "
              f"full), best-fit {best_fit} rows ({row['best_fit_fill']:.1%} full)")
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
