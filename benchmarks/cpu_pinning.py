"""What pinning the CPU's numerics costs, and which settings change the numbers at all (reproducibility across
machines of one kind).

    python benchmarks/cpu_pinning.py [--json benchmarks/results_cpu_pinning.json]

Each setting runs in its own process (oneDNN and MKL read their environment once, at load): the embedded base model
with the stage's LoRA (build_model, the stage's dtype), first the base forward's loss on one fixed batch of 4 x 256
tokens (fp64 sum of the token losses, and a hash of the logits' bytes: equal hashes mean bit-equal kernels), then
training steps of the CPU recipe's shape (2 warm-up, 4 timed; LoRA dropout 0, as the recipe) for tokens/s. A
setting that leaves the hash unchanged does not touch the kernels this model runs on this machine; one that changes
it is a kernel choice that another machine could make differently.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "default": {},
    "deterministic algorithms": {"TF_DETERMINISTIC": "1"},
    "oneDNN ISA capped at AVX-512 with bf16 (no AMX)": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "oneDNN ISA capped at AVX-512 (no bf16 units, no AMX)": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "oneDNN fp-math mode strict": {"ONEDNN_DEFAULT_FPMATH_MODE": "STRICT"},
    "MKL conditional numerical reproducibility (COMPATIBLE)": {"MKL_CBWR": "COMPATIBLE"},
    "MKL code path pinned to AVX-512 (MKL_CBWR=AVX512)": {"MKL_CBWR": "AVX512"},
    "MKL code path pinned to AVX-512 E1 (MKL_CBWR=AVX512_E1)": {"MKL_CBWR": "AVX512_E1"},
    "one thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "fp32 compute (no bf16)": {"TF_FP32": "1"},
}

CHILD = r'''
import hashlib, json, os, time
import torch
from tuneforge.core.batching import IGNORE, answer_loss, causal_lm
from tuneforge.core.modeling import compute_dtype
from tuneforge.core.params import load_params
from tuneforge.stages.train import Mode, build_model

if os.environ.get("TF_DETERMINISTIC"):
    torch.use_deterministic_algorithms(True)
dtype = torch.float32 if os.environ.get("TF_FP32") else compute_dtype("cpu")
torch.manual_seed(0)
model = build_model(load_params().with_settings({"train.lora.dropout": 0.0}), Mode("lora", "cpu", dtype))
ids = torch.randint(0, 49000, (4, 256), generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    logits = causal_lm(model)(input_ids=ids).logits.float()
loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                         reduction="sum").double().item()
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
rows = torch.Generator().manual_seed(1)
def step():
    batch = torch.randint(0, 49000, (4, 256), generator=rows)
    labels = batch.clone()
    labels[:, :200] = IGNORE
    (answer_loss(model, {"input_ids": batch, "labels": labels}) / 224).backward()
    optimizer.step()
    optimizer.zero_grad()
for _ in range(2):
    step()
start = time.perf_counter()
for _ in range(4):
    step()
seconds = (time.perf_counter() - start) / 4
print(json.dumps({"base_loss_sum": loss, "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest()[:16],
                  "tokens_per_second": 1024 / seconds, "threads": torch.get_num_threads(), "dtype": str(dtype)}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here (--only: add them to its rows)")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="these settings (and the default) only")
    args = parser.parse_args()
    rows = []
    for name, env in SETTINGS.items():
        if args.only and name != "default" and name not in args.only:
            continue
        out = subprocess.run([sys.executable, "-c", CHILD], env={**os.environ, **env}, capture_output=True, text=True)
        if out.returncode:
            rows.append({"setting": name, "env": env, "error": out.stderr.strip().splitlines()[-1]})
        else:
            rows.append({"setting": name, "env": env, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    default = rows[0]
    for row in rows:
        if "error" not in row:
            row["speed_vs_default"] = row["tokens_per_second"] / default["tokens_per_second"]
            row["same_logits_as_default"] = row["logits_sha256"] == default["logits_sha256"]
    if args.json:
        if args.only and args.json.exists():  # the rows of an earlier full run stay, these replace theirs
            done = {row["setting"] for row in rows}
            rows = [row for row in json.loads(args.json.read_text())["rows"] if row["setting"] not in done] + rows
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
