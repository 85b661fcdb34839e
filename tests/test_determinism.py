"""Same code, same data, same machine: a short training run twice gives identical adapter weights and metrics.

Two fresh clones on this machine agreed step for step (FACTS); this keeps that agreement under a test. Each run is
a fresh process, as a fresh clone's `dvc repro` would be.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.test_train import tiny_root  # noqa: F401  (the fixture: params, 40 training records, the base model)

pytestmark = pytest.mark.slow  # trains twice in fresh processes

# Numbers that measure the machine, not the run (timings, speeds, memory, versions).
MACHINE_DEPENDENT = re.compile(r"second|memory|environment")


def train_once(root) -> tuple[bytes, dict]:
    env = {**os.environ, "TUNEFORGE_ROOT": str(root), "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "tuneforge.stages.train", "--task", "address_json"], env=env, check=True,
                   capture_output=True)
    weights = (root / "models/address_json/adapter/adapter_model.safetensors").read_bytes()
    metrics = json.loads((root / "metrics/address_json/train.json").read_text())
    return weights, {k: v for k, v in metrics.items() if not MACHINE_DEPENDENT.search(k)}


def test_two_runs_give_identical_adapters_and_metrics(tiny_root):  # noqa: F811
    first_weights, first_metrics = train_once(tiny_root)
    history = (tiny_root / "metrics/address_json/train_history.csv").read_text()
    for folder in ("models/address_json", "metrics/address_json"):
        subprocess.run(["rm", "-rf", str(tiny_root / folder)], check=True)
    second_weights, second_metrics = train_once(tiny_root)
    assert second_metrics == first_metrics
    assert second_weights == first_weights  # bit for bit
    assert (tiny_root / "metrics/address_json/train_history.csv").read_text() == history
