"""Training on the real tiny model: packing, loss masking, resume after a kill, CUDA QLoRA (skipped on CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.core.batching import (
    collate_packed,
    collate_padded,
    loss_sum,
    pack,
    render_records,
)
from tuneforge.core.params import load_params
from tuneforge.stages.prepare import prepare, write_prepared
from tuneforge.stages.train import Mode, build_model

TINY = {"max_seq_len": 128, "batch_size": 2, "max_steps": 4, "eval_every": 2, "eval_rows": 4,
        "checkpoint_every": 1, "early_stopping_patience": 10, "lora": {"r": 4, "alpha": 8, "dropout": 0.1,
                                                                        "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture
def tiny_root(tmp_path, repo_root, base_model_dir, monkeypatch):
    """A minimal project folder: params, 40 training records, the base model."""
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["train"].update(TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    shutil.copytree(repo_root / "data" / "raw" / "address_json", tmp_path / "data" / "raw" / "address_json")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(base_model_dir)
    monkeypatch.setenv("TUNEFORGE_ROOT", str(tmp_path))
    p = load_params(tmp_path / "params.yaml")
    prepared = prepare(p.task("address_json"), p.split, tmp_path)
    prepared.splits["train"] = prepared.splits["train"][:40]
    write_prepared(prepared, tmp_path / "data" / "processed" / "address_json", tmp_path / "data" / "quarantine" / "a.jsonl",
                   tmp_path / "data" / "production" / "address_json")
    return tmp_path


def test_packed_and_padded_batches_give_the_same_loss(tiny_root, tokenizer):
    from tuneforge.core.records import read_jsonl

    params = load_params(tiny_root / "params.yaml")
    params.train.lora.dropout = 0.0
    records = read_jsonl(tiny_root / "data/processed/address_json/train.jsonl")[:6]
    examples = render_records(tokenizer, records, 512)
    rows = pack(examples, 512)
    assert len(rows) < len(examples)  # several examples share a row
    model = build_model(params, Mode("lora", "cpu", torch.float32))
    with torch.no_grad():
        packed_sum, packed_n = loss_sum(model, collate_packed(rows, tokenizer.pad_token_id))
        padded_sum, padded_n = loss_sum(model, collate_padded(examples, tokenizer.pad_token_id))
    assert packed_n == padded_n == sum(e.trained_tokens for e in examples)
    assert abs(float(packed_sum) / packed_n - float(padded_sum) / padded_n) < 1e-4


def test_a_killed_run_resumes_to_the_same_adapter(tiny_root):
    env = {**os.environ, "TUNEFORGE_ROOT": str(tiny_root), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "tuneforge.stages.train", "--task", "address_json"]
    adapter = tiny_root / "models/address_json/adapter"
    progress = tiny_root / "models/address_json/checkpoints/last/progress.json"

    subprocess.run(cmd, env=env, check=True, capture_output=True)
    uninterrupted = load_file(adapter / "adapter_model.safetensors")
    first = json.loads((tiny_root / "metrics/address_json/train.json").read_text())
    assert first["resumed_from_step"] == 0 and first["steps"] == 4 and first["mode"] == "lora"
    shutil.rmtree(tiny_root / "models/address_json")

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if progress.exists() and json.loads(progress.read_text())["step"] >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = json.loads(progress.read_text())["step"]
    assert 2 <= step_at_kill < 4
    shutil.rmtree(adapter)  # as `dvc repro` does with a stage's outputs before rerunning it

    subprocess.run(cmd, env=env, check=True, capture_output=True)
    resumed = load_file(adapter / "adapter_model.safetensors")
    second = json.loads((tiny_root / "metrics/address_json/train.json").read_text())
    assert second["resumed_from_step"] == step_at_kill
    assert second["best_eval_loss"] == pytest.approx(first["best_eval_loss"], abs=1e-5)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-5, rtol=1e-4)
    assert not progress.exists()  # a finished run leaves nothing to resume


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (QLoRA path)")
def test_qlora_on_cuda(tiny_root):
    from tuneforge.stages.train import train_task

    metrics = train_task("address_json", load_params(tiny_root / "params.yaml"))
    assert metrics["mode"] == "qlora" and metrics["device"] == "cuda"
    assert metrics["best_eval_loss"] < metrics["base_eval_loss"]
    assert (tiny_root / "models/address_json/adapter/adapter_model.safetensors").exists()
