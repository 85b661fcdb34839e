"""Short recipe trials on this CPU: train one task through the training stage's own `train_task`, score the
adapter on the first N test rows, append one row to benchmarks/recipe_trials.json.

    python benchmarks/recipe_trials.py --task address_json --label lr2e-3 \
        --set train.learning_rate=2e-3 --set train.max_steps=30 --rows 80

Each trial runs in a scratch project (TUNEFORGE_ROOT) whose data/processed and models/base are links to this
checkout's, so the checkout's models/ and metrics/ are left alone; the adapter is kept under
<scratch>/trials/<task>/<label>/ so a trial can be re-scored (`--rescore`) when decoding changes.
The shared CPU makes wall time noisy: compare trials by steps and tokens, and read wall time with the
load average recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TRIALS = HERE / "recipe_trials.json"
SCRATCH = Path(os.environ.get("RECIPE_SCRATCH", "/tmp/tuneforge-recipe"))


def scratch_root() -> Path:
    """A project folder that shares this checkout's inputs but has its own models/ and metrics/."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "params.yaml", SCRATCH / "params.yaml")
    (SCRATCH / "dvc.yaml").write_text("stages: {}\n")
    for rel in ("data/processed", "models/base"):
        link = SCRATCH / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(REPO / rel)
    return SCRATCH


def parse_settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


def score_adapter(task_name: str, params, adapter: Path, rows: int, constrained: bool) -> dict:
    """Greedy answers of base + adapter (merged) on the first `rows` test records, with the task's metrics."""
    from peft import PeftModel

    from tuneforge.core.metrics import score_outputs
    from tuneforge.core.modeling import (
        compute_dtype,
        load_causal_lm,
        load_tokenizer,
        pick_device,
    )
    from tuneforge.core.paths import base_model_dir, processed_dir
    from tuneforge.core.records import read_jsonl

    task = params.task(task_name)
    test = read_jsonl(processed_dir(task_name) / "test.jsonl")[:rows]
    device = pick_device()
    tokenizer = load_tokenizer(base_model_dir())
    model = load_causal_lm(base_model_dir(), dtype=compute_dtype(device), device=device)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    started = time.perf_counter()
    outputs = generate_answers(model, tokenizer, test, task, params, constrained)
    scores = score_outputs(task, test, outputs)
    scalar = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    return {"rows": len(test), "constrained": constrained, "eval_seconds": round(time.perf_counter() - started, 1),
            **scalar, "examples": [{"input": r["messages"][-2]["content"], "expected": r["messages"][-1]["content"],
                                    "output": o} for r, o in list(zip(test, outputs))[:3]]}


def generate_answers(model, tokenizer, records, task, params, constrained: bool) -> list[str]:
    """The evaluation stage's own generate(); constrained: under the task's grammar, as the stage decodes."""
    from tuneforge.stages import evaluate

    output = task.output.bind(tokenizer)
    kw = {"output": output, "batch_size": params.evaluate.batch_size, "max_new_tokens": task.max_new_tokens}
    if constrained:
        from tuneforge.core.constraints import grammars_for

        return evaluate.generate(model, tokenizer, records, grammars=grammars_for(output, records), **kw).outputs
    return evaluate.generate(model, tokenizer, records, **kw).outputs


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def append(row: dict) -> None:
    rows = json.loads(TRIALS.read_text()) if TRIALS.exists() else []
    rows = [r for r in rows if (r["task"], r["label"]) != (row["task"], row["label"])] + [row]
    TRIALS.write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--label", required=True, help="the trial's name in recipe_trials.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted setting, e.g. train.lora.r=32")
    parser.add_argument("--rows", type=int, default=80, help="test rows scored")
    parser.add_argument("--free", action="store_true", help="unconstrained decoding")
    parser.add_argument("--rescore", action="store_true", help="score the kept adapter again; no training")
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    root = scratch_root()
    os.environ["TUNEFORGE_ROOT"] = str(root)
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import models_dir

    settings = parse_settings(args.set)
    params = load_params(root / "params.yaml").with_settings(settings)
    kept = root / "trials" / args.task / args.label
    rows = json.loads(TRIALS.read_text()) if TRIALS.exists() else []
    previous = next((r for r in rows if (r["task"], r["label"]) == (args.task, args.label)), None)
    if args.rescore:
        if previous is None:
            raise SystemExit(f"no trial {args.task}/{args.label} in {TRIALS}")
        row = {**previous}
    else:
        from tuneforge.stages.train import train_task

        shutil.rmtree(models_dir(args.task), ignore_errors=True)
        load_before, started = load_average(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        train = train_task(args.task, params)
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(models_dir(args.task) / "adapter", kept)
        keep = ("steps", "stop_reason", "tokens_seen", "tokens_per_second", "wall_seconds", "base_eval_loss",
                "best_eval_loss", "best_step", "final_train_loss", "train_examples", "peak_memory_gb")
        row = {"task": args.task, "label": args.label, "settings": settings, "note": args.note, "commit": commit(),
               "started": started, "load_before": load_before,
               "load_after": load_average(), "train": {k: train[k] for k in keep},
               "train_recipe": params.train.model_dump()}
    score = score_adapter(args.task, params, kept, args.rows, constrained=not args.free)
    row["eval_constrained" if score["constrained"] else "eval_free"] = score
    append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "train_recipe"}, indent=1))


if __name__ == "__main__":
    main()
