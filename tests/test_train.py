"""Training on the real tiny model: packing, loss masking, resume after a kill, two processes against one,
the memory-based mode choice, CUDA QLoRA (skipped on CPU)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.core.batching import (
    causal_lm,
    collate_packed,
    collate_padded,
    loss_sum,
    pack,
    render_records,
)
from tuneforge.core.chat import IGNORE
from tuneforge.core.params import load_params
from tuneforge.stages.prepare import prepare, write_prepared
from tuneforge.stages.train import Mode, build_model, choose_mode, choose_speed

pytestmark = pytest.mark.slow  # trains the tiny model, often several times (minutes)

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
    write_prepared(prepared, tmp_path / "data" / "processed" / "address_json", tmp_path / "data" / "quarantine" / "a.jsonl")
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
        # rounded up to a width of 64 (the GPU profile): the padding is its own untrained block
        wide = collate_packed(rows, tokenizer.pad_token_id, multiple=64)
        wide_sum, wide_n = loss_sum(model, wide)
    assert packed_n == padded_n == wide_n == sum(e.trained_tokens for e in examples)
    assert wide["input_ids"].shape[1] % 64 == 0
    assert abs(float(packed_sum) / packed_n - float(padded_sum) / padded_n) < 1e-4
    assert abs(float(wide_sum) - float(packed_sum)) / packed_n < 1e-4

    # The fused path (Liger's kernel on a GPU) takes every position, the untrained ones labelled IGNORE: with a
    # plain head + cross-entropy in the kernel's place it must give the trained positions' loss and nothing else.
    def fused(weight, hidden, targets, bias):
        assert hidden.shape[0] == targets.shape[0] == wide["input_ids"].numel() - wide["input_ids"].shape[0]
        return torch.nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")

    causal_lm(model).fused_linear_cross_entropy = fused
    with torch.enable_grad():
        fused_sum, fused_n = loss_sum(model, wide)
    assert fused_n == wide_n and abs(float(fused_sum.detach()) - float(wide_sum)) / wide_n < 1e-4


def test_packed_batches_carry_their_examples_boundaries_and_the_cpu_keeps_sdpa(tiny_root, tokenizer):
    """collate_packed gives the keys transformers' Flash path reads: where each example (and a row's padding)
    starts in the flattened batch, and the longest, as a host int; modeling.varlen_attention uses them on a GPU.
    On a CPU the stage keeps SDPA with its block-diagonal mask and says why; forcing varlen there is an error."""
    from tuneforge.core.records import read_jsonl

    params = load_params(tiny_root / "params.yaml")
    examples = render_records(tokenizer, read_jsonl(tiny_root / "data/processed/address_json/train.jsonl")[:6], 512)
    wide = collate_packed(pack(examples, 512), tokenizer.pad_token_id, multiple=64)
    positions = wide["position_ids"].flatten().tolist()
    starts = wide["cu_seq_lens_q"].tolist()
    assert starts == [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    assert wide["cu_seq_lens_k"] is wide["cu_seq_lens_q"] and wide["cu_seq_lens_q"].dtype == torch.int32
    assert wide["max_length_q"] == wide["max_length_k"] == max(b - a for a, b in zip(starts, starts[1:], strict=False))
    mode = Mode("lora", "cpu", torch.float32)
    build_model(params, mode)
    assert mode.attention == "sdpa" and "attention: auto: SDPA (no GPU)" in mode.speed_reason
    with pytest.raises(ValueError, match="train.attention: varlen, but no GPU"):
        build_model(params, Mode("lora", "cpu", torch.float32), spec=params.train.model_copy(update={"attention": "varlen"}))


def test_a_tasks_own_settings_override_the_train_section(tmp_path, repo_root):
    """train.task_overrides: a task trains with its own learning rate (the shipped recipe's sms_spam), the others
    with the section's; a task that does not exist is named as an error, and sweeps can set an override."""
    from tuneforge.core.params import ParamsError

    params = load_params(repo_root / "params.yaml")
    assert params.train_for("sms_spam").learning_rate == 4.0e-3
    assert params.train_for("address_json") is params.train
    assert params.train_for("sms_spam").max_steps == params.train.max_steps  # only what the override sets
    swept = params.with_settings({"train.task_overrides.address_json.learning_rate": 1e-3})
    assert swept.train_for("address_json").learning_rate == 1e-3 and swept.train_for("sms_spam").learning_rate == 4.0e-3
    text = (repo_root / "params.yaml").read_text().replace("task_overrides: {sms_spam:", "task_overrides: {spam:")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"train.task_overrides names \['spam'\], which are not tasks"):
        load_params(tmp_path / "params.yaml")


def test_a_killed_run_resumes_to_the_same_adapter(tiny_root):
    env = {**os.environ, "TUNEFORGE_ROOT": str(tiny_root), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "tuneforge.stages.train", "--task", "address_json"]
    adapter = tiny_root / "models/address_json/adapter"
    progress = tiny_root / "models/address_json/checkpoints/last/progress.json"

    subprocess.run(cmd, env=env, check=True, capture_output=True)
    uninterrupted = load_file(adapter / "adapter_model.safetensors")
    first = json.loads((tiny_root / "metrics/address_json/train.json").read_text())
    assert first["resumed_from_step"] == 0 and first["steps"] == 4 and first["mode"] == "lora"
    assert first["final_train_loss"] > 0
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
    # Speed settings changed between the kill and the rerun (eager on a CPU either way): the checkpoint still counts.
    params = yaml.safe_load((tiny_root / "params.yaml").read_text())
    params["train"].update(compile=False, kernels="none", checkpoint_every=2)
    (tiny_root / "params.yaml").write_text(yaml.safe_dump(params))

    subprocess.run(cmd, env=env, check=True, capture_output=True)
    resumed = load_file(adapter / "adapter_model.safetensors")
    second = json.loads((tiny_root / "metrics/address_json/train.json").read_text())
    assert second["resumed_from_step"] == step_at_kill
    assert second["best_eval_loss"] == pytest.approx(first["best_eval_loss"], abs=1e-5)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-5, rtol=1e-4)
    assert not progress.exists()  # a finished run leaves nothing to resume


def test_a_checkpoint_resumes_across_speed_settings_but_not_recipe_changes(tmp_path, repo_root):
    """The resume fingerprint: speed settings and other tasks' overrides keep it; the recipe, base or data do not."""
    from tuneforge.core.params import TrainSpec
    from tuneforge.stages.train import SPEED_SETTINGS, fingerprint

    assert SPEED_SETTINGS <= TrainSpec.model_fields.keys()
    train_file = tmp_path / "train.jsonl"
    train_file.write_text('{"input": "a", "output": "b"}\n')
    params = load_params(repo_root / "params.yaml")
    before = fingerprint(params, "address_json", train_file)
    same = {"train.compile": True, "train.kernels": "none", "train.attention": "sdpa", "train.gradient_checkpointing": True,
            "train.pad_to_multiple_of": 64, "train.checkpoint_every": 7, "train.task_overrides.sms_spam.learning_rate": 1e-5}
    for name, value in same.items():
        assert fingerprint(params.with_settings({name: value}), "address_json", train_file) == before, name
    for name, value in {"train.learning_rate": 2e-3, "train.lora.r": 4, "train.seed": 1, "train.max_grad_norm": 0.5,
                        "train.task_overrides.address_json.epochs": 9.0}.items():
        assert fingerprint(params.with_settings({name: value}), "address_json", train_file) != before, name
    assert fingerprint(params, "sms_spam", train_file) != before
    train_file.write_text('{"input": "a", "output": "c"}\n')
    assert fingerprint(params, "address_json", train_file) != before


def test_gradients_are_clipped_to_max_grad_norm_and_their_norm_recorded(tiny_root):
    """train.max_grad_norm: every step's gradient norm, measured before clipping, goes into the history; the gradient
    AdamW steps with is scaled down to that norm, and the step still updates the adapter."""
    from tuneforge.stages.train import setup, train_step, train_task, trainable_state

    params = load_params(tiny_root / "params.yaml")
    params.train.max_grad_norm = 1e-3  # far below this model's gradient norms (~1 to 10)
    metrics = train_task("address_json", params)
    history = pd.read_csv(tiny_root / "metrics/address_json/train_history.csv")
    assert metrics["max_grad_norm"] == 1e-3 and metrics["steps"] == 4
    assert np.isnan(history["grad_norm"][0])  # step 0 is the base model: no gradient
    assert (history["grad_norm"][1:] > 1e-3).all()

    run = setup("address_json", params)
    before = trainable_state(run.model)
    _, grad_norm, _ = train_step(run, next(iter(run.loader)), lr=1e-3)
    assert float(grad_norm) > 1e-3
    # AdamW's first moment after one step is (1 - beta1) x the gradient it was given: the clipped one.
    first_moment = torch.stack([s["exp_avg"].float().norm() for s in run.optimizer.state.values()]).norm()
    assert float(first_moment) == pytest.approx(0.1 * 1e-3, rel=2e-2)
    after = trainable_state(run.model)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_training_refuses_data_the_audit_did_not_pass(tmp_path, repo_root, monkeypatch):
    """dvc.yaml makes the audit's gate_passed a param of the train stage; run_training (the notebook's entry point)
    reads it and refuses, before loading anything, to train without a passed audit."""
    from tuneforge.stages.train import check_can_train, run_training

    params = load_params(repo_root / "params.yaml")
    monkeypatch.setenv("TUNEFORGE_ROOT", str(tmp_path))
    audit = tmp_path / "metrics/address_json/audit.json"
    with pytest.raises(FileNotFoundError, match=r"metrics/address_json/audit.json does not exist.*dvc repro audit@address_json"):
        run_training("address_json", params)
    audit.parent.mkdir(parents=True)
    audit.write_text(json.dumps({"gate_passed": False}))
    with pytest.raises(ValueError, match=r"audit.json says the data audit failed for address_json.*fix the data.*rerun"):
        run_training("address_json", params)
    audit.write_text(json.dumps({"gate_passed": True}))
    check_can_train("address_json", params)


def test_accelerate_configs_that_shard_the_model_are_refused(tmp_path, repo_root, monkeypatch):
    """Validation and saving read each process's whole model, so only DDP is supported (two processes are tested
    above): an `accelerate config` file asking for FSDP or DeepSpeed is refused before anything is launched."""
    from tuneforge.stages.train import check_can_train, run_training

    params = load_params(repo_root / "params.yaml").with_settings({"train.accelerate_config": "accelerate/ddp.yaml"})
    monkeypatch.setenv("TUNEFORGE_ROOT", str(tmp_path))
    (tmp_path / "metrics/address_json").mkdir(parents=True)
    (tmp_path / "metrics/address_json/audit.json").write_text(json.dumps({"gate_passed": True}))
    with pytest.raises(FileNotFoundError, match=r"train.accelerate_config: .*accelerate/ddp.yaml does not exist"):
        run_training("address_json", params)
    (tmp_path / "accelerate").mkdir()
    for distributed_type in ("FSDP", "DEEPSPEED"):
        (tmp_path / "accelerate/ddp.yaml").write_text(f"compute_environment: LOCAL_MACHINE\ndistributed_type: {distributed_type}\n"
                                                  "num_processes: 2\n")
        with pytest.raises(ValueError, match=rf"distributed_type: {distributed_type}, which the training stage does not "
                                             r"support.*MULTI_GPU"):
            run_training("address_json", params)
    (tmp_path / "accelerate/ddp.yaml").write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n")
    check_can_train("address_json", params)


def set_train(root, n_records: int, **train):
    """Keep the first n training records and override train settings in the project's params.yaml."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    train_file = root / "data/processed/address_json/train.jsonl"
    train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:n_records]))


def launch(root, processes: int) -> dict:
    """The stage as the notebook runs it: `accelerate launch` with N processes (gloo on CPU)."""
    env = {**os.environ, "TUNEFORGE_ROOT": str(root), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    if processes > 1:
        cmd.append("--multi_gpu")  # accelerate's multi-process launcher; without a GPU it runs DDP over gloo
    done = subprocess.run([*cmd, "-m", "tuneforge.stages.train", "--task", "address_json"], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((root / "metrics/address_json/train.json").read_text())
    metrics["adapter"] = load_file(root / "models/address_json/adapter/adapter_model.safetensors")
    return metrics


def test_two_processes_match_one_with_the_same_global_batch(tiny_root):
    """DDP through accelerate (2 processes x batch 2) against 1 process x batch 2 x 2 accumulation steps,
    across an epoch boundary: the same rows every step, the same token-mean loss, the same adapter."""
    common = {"packing": False, "batch_size": 2, "max_steps": 0, "epochs": 1.5, "eval_every": 3, "checkpoint_every": 100,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    set_train(tiny_root, 16, grad_accum=2, **common)
    one = launch(tiny_root, 1)
    shutil.rmtree(tiny_root / "models/address_json")
    set_train(tiny_root, 16, grad_accum=1, **common)
    two = launch(tiny_root, 2)
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps_per_epoch"] == two["steps_per_epoch"] == 4  # 16 rows / (2 x 2) a step
    assert one["steps"] == two["steps"] == 6 and one["tokens_seen"] == two["tokens_seen"]
    assert two["best_eval_loss"] == pytest.approx(one["best_eval_loss"], abs=1e-4)
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], abs=1e-4)
    assert one["adapter"].keys() == two["adapter"].keys()
    for name in one["adapter"]:
        torch.testing.assert_close(two["adapter"][name], one["adapter"][name], atol=1e-4, rtol=1e-3)


def test_two_processes_finish_an_odd_batch_count(tiny_root):
    """3 batches an epoch over 2 processes: the second process's last step is completed with the epoch's
    first rows (accelerate's even_batches) instead of leaving it without a batch; both ranks finish. The decoder
    layers are compiled, as a long GPU run compiles them inside DDP."""
    set_train(tiny_root, 6, packing=False, batch_size=2, grad_accum=1, max_steps=0, epochs=2, eval_every=2,
              checkpoint_every=100, compile=True)
    two = launch(tiny_root, 2)
    assert two["compiled"] and two["steps_per_epoch"] == 2 and two["steps"] == two["planned_steps"] == 4
    assert two["final_train_loss"] > 0 and two["stop_reason"] == "epochs"
    assert two["steady_tokens_per_second"] > 0  # the 4th step, after the 3 warm-up steps


def test_auto_mode_decides_by_memory(base_model_dir):
    from tuneforge.core.modeling import bf16_weight_bytes
    from tuneforge.core.params import TrainSpec

    weights = bf16_weight_bytes(base_model_dir)
    assert 0.2e9 < weights < 0.4e9  # SmolLM2-135M: 135M parameters x 2 bytes
    cuda = torch.device("cuda", 0)
    roomy = choose_mode(TrainSpec(), base_model_dir, cuda, free_bytes=140 * 10**9)
    assert roomy.name == "lora" and roomy.dtype == torch.bfloat16 and "LoRA in bf16" in roomy.reason
    tight = choose_mode(TrainSpec(), base_model_dir, cuda, free_bytes=weights * 2)
    assert tight.name == "qlora" and "QLoRA" in tight.reason
    forced = choose_mode(TrainSpec(mode="qlora"), base_model_dir, cuda, free_bytes=140 * 10**9)
    assert forced.name == "qlora" and "forced" in forced.reason
    assert choose_mode(TrainSpec(), base_model_dir, torch.device("cpu")).name == "lora"


def test_speed_levers_are_gpu_only_and_checkpointing_decides_by_memory(base_model_dir, monkeypatch):
    """kernels auto: PyTorch's on a CPU (a CPU run is unchanged), Liger's on a GPU only when installed, else a
    recorded fallback; gradient_checkpointing auto: only when the activations would crowd the free memory."""
    from tuneforge.core import modeling
    from tuneforge.core.params import TrainSpec

    cpu = choose_speed(Mode("lora", "cpu", torch.float32), TrainSpec(gradient_checkpointing="auto"), base_model_dir, None)
    assert cpu.kernels == "none" and cpu.gradient_checkpointing is False and "no GPU" in cpu.speed_reason
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        choose_speed(Mode("lora", "cpu", torch.float32), TrainSpec(kernels="liger"), base_model_dir, None)

    spec = TrainSpec(gradient_checkpointing="auto", max_seq_len=1024, batch_size=8)
    monkeypatch.setattr(modeling, "liger_installed", lambda: False)
    roomy = choose_speed(Mode("lora", "cuda", torch.bfloat16), spec, base_model_dir, 140 * 10**9)
    assert roomy.kernels == "none" and "not installed" in roomy.speed_reason
    assert roomy.gradient_checkpointing is False and "no checkpointing" in roomy.speed_reason
    tight = choose_speed(Mode("lora", "cuda", torch.bfloat16), spec, base_model_dir, 2 * 10**9)
    assert tight.gradient_checkpointing is True and "checkpointing" in tight.speed_reason
    monkeypatch.setattr(modeling, "liger_installed", lambda: True)
    assert choose_speed(Mode("lora", "cuda", torch.bfloat16), spec, base_model_dir, 140 * 10**9).kernels == "liger"
    forced = choose_speed(Mode("lora", "cuda", torch.bfloat16), TrainSpec(gradient_checkpointing=True), base_model_dir,
                          140 * 10**9)
    assert forced.gradient_checkpointing is True


def test_auto_compile_waits_for_a_run_long_enough_to_pay():
    from tuneforge.stages.train import COMPILE_PAYS_AFTER_SECONDS, auto_compile

    steps = 1000
    long_run = auto_compile(steps, 2 * COMPILE_PAYS_AFTER_SECONDS / steps)
    assert long_run[0] is True and "compiled" in long_run[1]
    short_run = auto_compile(steps, 0.5 * COMPILE_PAYS_AFTER_SECONDS / steps)
    assert short_run[0] is False and short_run[1].endswith("eager")


def test_compiled_layers_train_with_the_eager_loss_curve(tiny_root):
    """train.compile: true (auto leaves a CPU eager, but a CPU compiles too) through the stage's loop, its eager
    validation and its checkpoints: the same loss curve as eager, to float tolerance.

    Compiled kernels fuse and order operations differently, so they round differently: the first step's loss (same
    weights, same batch) moved by 0.8e-4 to 1.4e-4 relative on the machine this test was written on, and by 1.8e-3
    on another machine of the same kind (2 cores with AMX, same lock file). The bound is therefore the stage dtype's own
    precision (bf16's machine epsilon, 7.8e-3, where the CPU has bf16 units; fp32's otherwise), not either
    machine's rounding. Adam then amplifies the difference: its first update is the learning rate times each
    gradient's sign, so elements whose gradients are near zero move one way or the other. Later losses agree to
    ~0.5%, inside 1e-2.
    """
    from tuneforge.core.modeling import compute_dtype
    from tuneforge.stages.train import train_task

    params = load_params(tiny_root / "params.yaml")
    params.train.lora.dropout = 0.0  # compiled dropout draws other random numbers than eager
    history = tiny_root / "metrics/address_json/train_history.csv"
    adapter = tiny_root / "models/address_json/adapter/adapter_model.safetensors"
    eager = train_task("address_json", params)
    eager_curve, eager_adapter = pd.read_csv(history), load_file(adapter)
    shutil.rmtree(tiny_root / "models/address_json")
    params.train.compile = True
    compiled = train_task("address_json", params)
    assert not eager["compiled"] and "compile: auto: eager on a CPU" in eager["speed_reason"]
    assert compiled["compiled"] and compiled["compiled_at_step"] == 0 and "train.compile: true" in compiled["speed_reason"]
    curve = pd.read_csv(history)
    first_step_rounding = torch.finfo(compute_dtype("cpu")).eps
    assert curve["train_loss"][1] == pytest.approx(eager_curve["train_loss"][1], rel=first_step_rounding)
    for column in ("train_loss", "eval_loss"):
        np.testing.assert_allclose(curve[column], eager_curve[column], rtol=1e-2)
    assert load_file(adapter).keys() == eager_adapter.keys()  # compiling keeps the parameters' names


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (QLoRA path)")
def test_qlora_on_cuda(tiny_root):
    from tuneforge.stages.train import train_task

    params = load_params(tiny_root / "params.yaml")
    params.train.mode = "qlora"
    metrics = train_task("address_json", params)
    assert metrics["mode"] == "qlora" and metrics["device"].startswith("cuda")
    assert metrics["best_eval_loss"] < metrics["base_eval_loss"]
    assert (tiny_root / "models/address_json/adapter/adapter_model.safetensors").exists()


def test_profiles_rewrite_only_their_lines_and_round_trip(tmp_path, repo_root, monkeypatch):
    from tuneforge.core.params import ParamsError, apply_profile

    shutil.copy(repo_root / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(repo_root / "profiles", tmp_path / "profiles")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("TUNEFORGE_ROOT", str(tmp_path))
    original = (tmp_path / "params.yaml").read_text()
    changes = apply_profile("gpu")
    gpu = load_params(tmp_path / "params.yaml")
    assert gpu.train.max_steps == 0 and gpu.train.epochs > 1 and gpu.train.max_seq_len > 256
    cpu = load_params(repo_root / "params.yaml")
    assert f"train.max_steps: {cpu.train.max_steps} -> 0" in changes
    # One change reported for each line whose setting changed (a line may also take the profile's comment alone).
    setting = lambda line: line.split("#")[0].strip()  # noqa: E731
    assert len(changes) == sum(setting(a) != setting(b) for a, b in zip(original.splitlines(),
                                                                        (tmp_path / "params.yaml").read_text().splitlines()))
    apply_profile("cpu")
    assert (tmp_path / "params.yaml").read_text() == original  # byte for byte, comments included
    with pytest.raises(ParamsError, match="no such profile"):
        apply_profile("tpu")
