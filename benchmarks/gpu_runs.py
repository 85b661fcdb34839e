"""The training stage itself on GPUs, in a scratch project folder (nothing in this repository is written).

    # one GPU against N, same task, model and global batch (1 GPU accumulates N micro-batches a step):
    python benchmarks/gpu_runs.py multi-gpu --work /tmp/mg --tokenizer models/base --arch smollm2-1.7b --gpus 2

    # one task through prepare -> base_model -> train -> evaluate under a profile (the stage functions directly):
    python benchmarks/gpu_runs.py task --work /tmp/aj --task address_json --profile gpu

    # what the packed examples' boundaries (position_ids, cu_seq_lens) cost the model step, on the stage's batches:
    python benchmarks/gpu_runs.py boundaries --work /tmp/bd --base /tmp/llama1b --batch 8 --trace-dir /tmp/bd-prof

    # the whole pipeline through `dvc repro` in a scratch copy of this repository, on a local base folder:
    python benchmarks/gpu_runs.py pipeline --work /tmp/p --base /tmp/llama1b --profile gpu --set export.max_rows=8

Each prints and writes (--out) a JSON of the stage's own train.json figures (and evaluation metrics).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def scratch_project(work: Path, tasks: list[str], train: dict, profile: str | None = None) -> None:
    """params.yaml (optionally under a profile, then `train` overrides), the tasks' raw data, prepared splits."""
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TUNEFORGE_ROOT"] = str(work)
    (work / "dvc.yaml").write_text("stages: {}\n")
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    shutil.copytree(REPO / "profiles", work / "profiles", dirs_exist_ok=True)
    from tuneforge.core.params import apply_profile, load_params, only_tasks

    if profile:
        print("\n".join(apply_profile(profile)))
    params = yaml.safe_load((work / "params.yaml").read_text())
    only_tasks(params, tasks)
    params["train"].update(train)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from tuneforge.core.paths import processed_dir, quarantine_file
    from tuneforge.stages.prepare import prepare, write_prepared

    p = load_params()
    for task in tasks:
        spec = p.task(task)
        (work / spec.source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / spec.source, work / spec.source)
        write_prepared(prepare(spec, p.split, work), processed_dir(task), quarantine_file(task))


def launch(work: Path, task: str, processes: int, gpus: str) -> dict:
    env = {**os.environ, "TUNEFORGE_ROOT": str(work), "CUDA_VISIBLE_DEVICES": gpus}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        cmd.append("--multi_gpu")
    started = time.perf_counter()
    subprocess.run([*cmd, "-m", "tuneforge.stages.train", "--task", task], env=env, check=True)
    metrics = json.loads((work / "metrics" / task / "train.json").read_text())
    metrics["launch_wall_seconds"] = time.perf_counter() - started
    metrics["history"] = (work / "metrics" / task / "train_history.csv").read_text()
    shutil.rmtree(work / "models" / task)
    return metrics


def multi_gpu(args) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_throughput import save_random_model

    work = Path(args.work)
    steps_between_evals = 1000  # validation at step 0 and at the end only: the runs time training
    scratch_project(work, [args.task], {"mode": "auto", "max_seq_len": args.seq, "batch_size": args.batch, "max_steps": 0,
                                        "epochs": args.epochs, "eval_every": steps_between_evals, "eval_rows": 64,
                                        "early_stopping_patience": 100, "checkpoint_every": 100000,
                                        "gradient_checkpointing": False})
    base = work / "models" / "base"
    save_random_model(args.arch, base)
    for f in Path(args.tokenizer).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, base / f.name)
    rows = {}
    for n in (1, args.gpus):
        params = yaml.safe_load((work / "params.yaml").read_text())
        params["train"]["grad_accum"] = args.gpus // n  # the same global batch: batch x gpus rows a step
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        rows[n] = launch(work, args.task, n, ",".join(str(i) for i in range(n)))
        print(json.dumps({k: v for k, v in rows[n].items() if k != "history"}, indent=2))
    one, many = rows[1], rows[args.gpus]
    return {"arch": args.arch, "task": args.task, "seq": args.seq, "micro_batch": args.batch, "epochs": args.epochs,
            "global_batch_rows": args.batch * args.gpus, "gpus": args.gpus,
            "speedup": many["tokens_per_second"] / one["tokens_per_second"],
            "eval_loss_difference": many["best_eval_loss"] - one["best_eval_loss"], "one_gpu": one, "n_gpus": many}


def model_step(base_dir: Path, params, steps: int = 10, warmup: int = 3, packed_every: int = 0,
               batches: list[dict] | None = None, compiled: bool = False) -> dict:
    """The model step alone on the stage's shapes and settings: full rows of max_seq_len random tokens, all trained.

    packed_every > 0: position_ids restart every that many tokens, as in packed rows, so attention runs with the
    block-diagonal mask packing needs instead of the plain causal one.
    batches: the stage's own micro-batches instead (packed rows, answer tokens trained), taken in turn.
    """
    import torch

    from tuneforge.core.batching import answer_loss, to_device
    from tuneforge.core.chat import IGNORE
    from tuneforge.core.modeling import compute_dtype, free_gpu_bytes
    from tuneforge.stages.train import (
        Mode,
        build_model,
        choose_speed,
        compile_decoder_layers,
    )

    spec = params.train
    # the stage's own choices of kernels and checkpointing for these shapes
    mode = choose_speed(Mode("lora", "cuda", compute_dtype("cuda")), spec, base_dir, free_gpu_bytes(torch.device("cuda")))
    torch.cuda.reset_peak_memory_stats()
    model = build_model(params, mode, base_dir)
    if compiled:  # the stage's torch.compile of each decoder layer (one graph shared by the layers), during warm-up
        torch._dynamo.reset()  # earlier compiles in this process count against dynamo's recompile limit
        compile_decoder_layers(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    tokens = 0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            started, tokens = time.perf_counter(), 0
        # The trained-token count comes from the host's copy, as in the stage: no device sync inside a step.
        if batches:
            host = batches[i % len(batches)]
            tokens += int(host["tokens"])  # real tokens, padding left out (answer_loss does not pass "tokens" on)
            trained = int((host["labels"][:, 1:] != IGNORE).sum())
            batch = to_device(host, "cuda", non_blocking=True)
        else:
            ids = torch.randint(0, model.config.vocab_size, (spec.batch_size, spec.max_seq_len), generator=g)
            tokens, trained = tokens + ids.numel(), ids[:, 1:].numel()
            ids = ids.cuda(non_blocking=True)
            batch = {"input_ids": ids, "labels": ids}
            if packed_every:
                batch["position_ids"] = (torch.arange(spec.max_seq_len, device="cuda") % packed_every).expand_as(ids)
        (answer_loss(model, batch) / trained).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"tokens_per_second": tokens / seconds, "steps": steps, "packed_every": packed_every,
              "stage_batches": bool(batches), "compiled": compiled, "kernels": mode.kernels,
              "gradient_checkpointing": mode.gradient_checkpointing,
              "batch": spec.batch_size, "seq": spec.max_seq_len, "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    del model, optimizer
    gc.collect()  # Liger binds its forwards to the modules (reference cycles): freed only by the collector
    torch.cuda.empty_cache()
    return result


def stage_batches(task: str, params, steps: int) -> list[dict]:
    """`steps` micro-batches built as the training stage builds them (its rendering, packing and collation; the stage's
    sampler, under accelerate, draws the rows in another order)."""
    import torch

    from tuneforge.core.batching import render_records, step_loader
    from tuneforge.core.modeling import load_tokenizer
    from tuneforge.core.paths import base_model_dir, processed_dir
    from tuneforge.core.records import read_jsonl

    spec = params.train
    tokenizer = load_tokenizer(base_model_dir())
    examples = render_records(tokenizer, read_jsonl(processed_dir(task) / "train.jsonl"), spec.max_seq_len)
    out = []
    for item in step_loader(examples, spec, tokenizer.pad_token_id):
        for batch in item["micro_batches"]:  # the step's real tokens, shared out (exact with one micro-batch a step)
            batch["tokens"] = torch.tensor(item["tokens"] // len(item["micro_batches"]))
        out.extend(item["micro_batches"])
        if len(out) >= steps:
            break
    return out[:steps]


@contextlib.contextmanager
def timed_steps(trace_dir: Path | None = None, name: str = "run", skip: int = 30, active: int = 5):
    """Each optimizer step's end (after a device sync), from a global optimizer hook: the stage's loop is not touched.

    With trace_dir, torch.profiler records `active` steps after the first `skip` and writes the operator tables
    (by device time, by host time) and a summary of device-busy time against wall time there.
    """
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    times: list[float] = []
    profiler = None
    if trace_dir:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        profiler = torch.profiler.profile(activities=activities,
                                          schedule=torch.profiler.schedule(wait=skip, warmup=1, active=active, repeat=1))
        profiler.start()

    def hook(optimizer, args, kwargs) -> None:
        torch.cuda.synchronize()
        times.append(time.perf_counter())
        if profiler is not None:
            profiler.step()

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield times
    finally:
        handle.remove()
        if profiler is not None:
            profiler.stop()
            trace_dir.mkdir(parents=True, exist_ok=True)
            events = profiler.key_averages()
            # profiler.step() number k + 1 runs after step k's end (times[k]); steps skip + 1 ... skip + active are recorded
            window = times[skip : skip + active + 1]
            kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            summary = {"profiled_steps": len(window) - 1, "wall_seconds": window[-1] - window[0] if len(window) > 1 else None,
                       "device_kernel_seconds": kernels / 1e6}
            tables = [events.table(sort_by=key, row_limit=45, max_name_column_width=70)
                      for key in ("self_cpu_time_total", "device_time_total")]
            (trace_dir / f"{name}_profile.txt").write_text(json.dumps(summary, indent=2) + "\n\n" + "\n\n".join(tables))


def step_time_summary(times: list[float], eval_every: int) -> dict:
    """Per-step seconds: the first steps, and the median of the rest (steps right after a validation left out)."""
    import statistics

    gaps = [b - a for a, b in zip(times, times[1:])]  # gaps[i]: step i + 2's time (step 1 has no start mark)
    plain = [g for i, g in enumerate(gaps) if (i + 1) % eval_every != 0]  # step i + 1 ended with a validation
    return {"steps": len(times), "first_10_seconds": gaps[:9], "median_seconds_after_20": statistics.median(plain[20:] or plain),
            "mean_seconds_after_20": statistics.mean(plain[20:] or plain), "max_seconds": max(gaps) if gaps else None}


def task_run(args) -> dict:
    work = Path(args.work)
    overrides = {"max_steps": args.max_steps} if args.max_steps else {}
    overrides.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.train)})
    scratch_project(work, [args.task], overrides, profile=args.profile)
    if args.base:  # a local Hugging Face folder as model.base; export needs the GGUF converter in vendor/
        params = yaml.safe_load((work / "params.yaml").read_text())
        params["model"]["base"] = str(Path(args.base).resolve())
        params["export"].update(max_rows=args.export_rows, parity_rows=min(args.export_rows, 40))
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if (REPO / "vendor").exists() and not (work / "vendor").exists():
        (work / "vendor").symlink_to((REPO / "vendor").resolve())
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import base_model_dir, models_dir, processed_dir
    from tuneforge.core.records import read_jsonl
    from tuneforge.stages.base_model import save_base_model
    from tuneforge.stages.evaluate import run_evaluation
    from tuneforge.stages.train import train_task

    params = load_params()
    started = time.perf_counter()
    save_base_model(params.model, base_model_dir())
    base_seconds = time.perf_counter() - started
    trace_dir = Path(args.trace_dir) if args.trace_dir else None
    timing = timed_steps(trace_dir, "stage") if args.step_times else contextlib.nullcontext([])
    # The model step before the stage as well as after it: single figures moved by up to 25% between runs.
    before = model_step(base_model_dir(), params, steps=args.model_steps) if args.variants and args.no_evaluate else None
    with timing as times:
        train = train_task(args.task, params)
    if args.no_evaluate:
        out = {"task": args.task, "profile": args.profile, "base": params.model.base, "params_train": params.train.model_dump(),
               "train": train}
        if before:
            out["model_step_before_stage"] = before
        if times:
            out["stage_step_times"] = step_time_summary(times, params.train.eval_every)
        save(args, out)
        steps = args.model_steps
        out["model_step"] = model_step(base_model_dir(), params, steps=steps)
        if train["compiled"]:  # the stage compiled its layers: the model step compiled as well, for a like comparison
            out["model_step_compiled"] = model_step(base_model_dir(), params, steps=steps, compiled=True)
            out["stage_over_compiled_model_step"] = train["tokens_per_second"] / out["model_step_compiled"]["tokens_per_second"]
            out["stage_steady_over_compiled_model_step"] = (train["steady_tokens_per_second"] or 0) / out["model_step_compiled"]["tokens_per_second"]
        if args.step_times or args.variants:  # the same model step on the stage's own batches: what the data's shapes cost
            batches = stage_batches(args.task, params, 16)
            steps = args.variant_steps or steps
            out["model_step_stage_batches"] = model_step(base_model_dir(), params, steps=steps, batches=batches)
            all_trained = [{**b, "labels": b["input_ids"]} for b in batches]  # every position carries loss
            out["model_step_stage_batches_all_trained"] = model_step(base_model_dir(), params, steps=steps, batches=all_trained)
            boundaries = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
            causal = [{k: v for k, v in b.items() if k not in boundaries} for b in batches]  # one causal block a row
            out["model_step_stage_batches_no_position_ids"] = model_step(base_model_dir(), params, steps=steps, batches=causal)
            save(args, out)
            if trace_dir:  # profiled again (the profiler slows the host): where the time goes, not how fast
                with timed_steps(trace_dir, "model_step", skip=4):
                    model_step(base_model_dir(), params)
                with timed_steps(trace_dir, "model_step_stage_batches", skip=4):
                    model_step(base_model_dir(), params, batches=batches)
        out["stage_over_model_step"] = train["tokens_per_second"] / out["model_step"]["tokens_per_second"]
        out["stage_steps_over_model_step"] = train["step_tokens_per_second"] / out["model_step"]["tokens_per_second"]
        if train["steady_tokens_per_second"]:
            out["stage_steady_over_model_step"] = train["steady_tokens_per_second"] / out["model_step"]["tokens_per_second"]
        return out
    test = read_jsonl(processed_dir(args.task) / "test.jsonl")[: args.test_rows or None]
    validation = read_jsonl(processed_dir(args.task) / "validation.jsonl")[: args.test_rows or None]
    started = time.perf_counter()
    train_records = read_jsonl(processed_dir(args.task) / "train.jsonl")  # the classical baseline trains on these
    result = run_evaluation(params.task(args.task), params.evaluate, params.train.max_seq_len, train_records, test, validation,
                            base_model_dir(), models_dir(args.task) / "adapter", params.model.trust_remote_code)
    out = {"task": args.task, "profile": args.profile, "base": params.model.base, "params_train": params.train.model_dump(),
           "base_model_seconds": base_seconds, "train": train,
           "evaluate": result.summary(), "evaluate_seconds": time.perf_counter() - started,
           "test_rows": len(test)}
    save(args, out)  # what is done so far survives a later phase running out of time
    if args.model_step:
        out["model_step"] = model_step(base_model_dir(), params)
        out["stage_over_model_step"] = train["tokens_per_second"] / out["model_step"]["tokens_per_second"]
        save(args, out)
    if args.export:
        from tuneforge.core.paths import predictions_file
        from tuneforge.core.records import write_jsonl
        from tuneforge.stages.export import run_export

        write_jsonl(predictions_file(args.task), result.prediction_rows())
        started = time.perf_counter()
        exported = run_export(args.task, params)
        out["export"] = {"rows": exported.rows, "failures": exported.failures, "seconds": time.perf_counter() - started}
    return out


STAGE_START = re.compile(r"^Running stage '([^']+)'")


def copy_project(work: Path) -> None:
    """This repository's tracked files (every file, where no .git is beside them: a carried copy) into `work`."""
    if (REPO / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [f for f in listed.split("\0") if f and (REPO / f).is_file()]
    else:
        files = [str(f.relative_to(REPO)) for f in REPO.rglob("*")
                 if f.is_file() and not {"vendor", "__pycache__", ".venv"} & set(f.relative_to(REPO).parts)]
    for name in files:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, work / name)


def pipeline_run(args) -> dict:
    """`dvc repro` of the whole pipeline in a scratch copy, on `--base`, under a profile and `--set` overrides.

    The copy is a git repository of its own (one commit), so DVC, the metrics' commit stamps and the index's
    "what changed" all work as in a user's clone. Each stage's wall time comes from DVC's own log: from its
    "Running stage" line to the next one (the last stage: to the end of the run).
    """
    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    copy_project(work)
    (work / "vendor").symlink_to((REPO / "vendor").resolve())
    env = {**os.environ, "TUNEFORGE_ROOT": str(work), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(work / "src"), os.environ.get("PYTHONPATH")]))}
    os.environ["TUNEFORGE_ROOT"] = str(work)
    from tuneforge.core.params import apply_profile, load_params, only_tasks

    changes = apply_profile(args.profile) if args.profile else []
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["model"]["base"] = str(Path(args.base).resolve())
    if args.tasks:
        only_tasks(params, args.tasks)
    if args.gates_off:  # random weights score 0 and their quantized files drift: every gate would stop the run
        params["evaluate"].update(min_tuned_score=0.0, max_regression=1.0)
        params["export"].update(max_metric_drop=1.0, min_top1_agreement=0.0)
        for spec in params["tasks"].values():
            spec["min_score"] = 0.0
    for key, value in (kv.split("=", 1) for kv in args.set):  # a dotted path: export.max_rows, tasks.sms_spam.min_score
        *parents, name = key.split(".")
        section = params
        for parent in parents:
            section = section[parent]
        section[name] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    load_params()  # validated before DVC starts
    if shutil.which("git"):
        git = lambda *a: subprocess.run(["git", *a], cwd=work, check=True, capture_output=True)  # noqa: E731
        git("init", "-q")
        git("add", "-A")
        git("-c", "user.name=tuneforge", "-c", "user.email=tuneforge@localhost", "commit", "-qm", "scratch copy")
    else:  # no git on the machine: DVC without an SCM (the metrics' commit stamps stay empty)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.no_scm", "true"], cwd=work, env=env, check=True)
    # A 1B base makes multi-GB outputs: hard links into the cache instead of copies (the outputs are never edited
    # in place: each stage rewrites its own).
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "cache.type", "hardlink,copy"], cwd=work,
                   env=env, check=True)
    log_path = Path(args.log) if args.log else work / "dvc_repro.log"
    starts: list[tuple[str, float]] = []
    started = time.perf_counter()
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro", *args.targets], cwd=work, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc, open(log_path, "w") as log:
        for line in proc.stdout:
            now = time.perf_counter() - started
            log.write(f"[{now:8.1f}s] {line}")
            log.flush()
            print(line, end="", flush=True)
            if match := STAGE_START.match(line):
                starts.append((match.group(1), now))
    total = time.perf_counter() - started
    ends = [t for _, t in starts[1:]] + [total]
    out = {"profile": args.profile, "profile_changes": changes, "base": params["model"]["base"],
           "gates_off": args.gates_off, "overrides": args.set, "tasks": list(params["tasks"]), "returncode": proc.returncode,
           "repro_seconds": total, "stage_seconds": {name: end - start for (name, start), end in zip(starts, ends)},
           "metrics": {f"{task}/{f.stem}": json.loads(f.read_text())  # the tasks run (the copy holds the others')
                       for task in params["tasks"] for f in sorted((work / "metrics" / task).glob("*.json"))},
           "gguf_mb": {str(f.relative_to(work)): f.stat().st_size / 1e6 for f in sorted((work / "models").glob("*/*/*.gguf"))}}
    save(args, out)
    if proc.returncode:
        raise SystemExit(f"dvc repro failed ({proc.returncode}): see {log_path}")
    return out


def step_run(args) -> dict:
    """The model step alone, plain causal rows against packed ones, on a given base folder."""
    work = Path(args.work)
    scratch_project(work, [], {}, profile=args.profile)
    from tuneforge.core.params import load_params

    params = load_params()
    return {"base": args.base, "variants": [model_step(Path(args.base), params, packed_every=n) for n in args.packed_every]}


def boundaries_run(args) -> dict:
    """What the packed examples' boundaries cost the model step, one input at a time, on the stage's own batches:
    position_ids (RoPE restarting per example) and cu_seq_lens (varlen attention within each example), each kept
    or dropped, with the stage's kernels and without Liger's. Dropping either changes what is computed (examples
    attend across, or positions run on): these are timings, not trainings."""
    work = Path(args.work)
    train = {"batch_size": args.batch} if args.batch else {}
    scratch_project(work, [args.task], train, profile=args.profile)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["model"]["base"] = str(Path(args.base).resolve())
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if (REPO / "vendor").exists() and not (work / "vendor").exists():  # base_model's converter pre-flight
        (work / "vendor").symlink_to((REPO / "vendor").resolve())
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import base_model_dir
    from tuneforge.stages.base_model import save_base_model

    params = load_params()
    save_base_model(params.model, base_model_dir())
    batches = stage_batches(args.task, params, 16)
    flash = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    inputs = {"stage_batches": (), "position_ids_only": flash, "cu_seq_lens_only": ("position_ids",),
              "neither": ("position_ids", *flash)}
    out = {"task": args.task, "profile": args.profile, "base": args.base, "batch": params.train.batch_size,
           "seq": params.train.max_seq_len, "steps": args.steps}
    for kernels in args.kernels:
        run_params = params.model_copy(update={"train": params.train.model_copy(update={"kernels": kernels})})
        rows = {"random_full_rows": model_step(base_model_dir(), run_params, steps=args.steps, compiled=args.compile)}
        for name, drop in inputs.items():
            variant = [{k: v for k, v in b.items() if k not in drop} for b in batches]
            rows[name] = model_step(base_model_dir(), run_params, steps=args.steps, batches=variant, compiled=args.compile)
        out[kernels + ("_compiled" if args.compile else "")] = rows
        save(args, out)
        if args.trace_dir:
            for name in ("stage_batches", "neither"):
                variant = [{k: v for k, v in b.items() if k not in inputs[name]} for b in batches]
                with timed_steps(Path(args.trace_dir), f"{kernels}_{name}", skip=4):
                    model_step(base_model_dir(), run_params, batches=variant)
    return out


def save(args, result: dict) -> None:
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mg = sub.add_parser("multi-gpu")
    mg.add_argument("--work", required=True)
    mg.add_argument("--tokenizer", required=True, help="a folder with the tokenizer files (e.g. models/base)")
    mg.add_argument("--arch", default="smollm2-1.7b")
    mg.add_argument("--task", default="sms_spam")
    mg.add_argument("--gpus", type=int, default=2)
    mg.add_argument("--seq", type=int, default=1024)
    mg.add_argument("--batch", type=int, default=8)
    mg.add_argument("--epochs", type=float, default=3)
    tk = sub.add_parser("task")
    tk.add_argument("--work", required=True)
    tk.add_argument("--task", default="address_json")
    tk.add_argument("--profile", default="gpu")
    tk.add_argument("--max-steps", type=int, default=0, help="a quick smoke run instead of the profile's epochs")
    tk.add_argument("--test-rows", type=int, default=0, help="evaluate on the first N test rows only (0: all)")
    tk.add_argument("--train", action="append", default=[], metavar="KEY=VALUE", help="a train setting over the profile")
    tk.add_argument("--base", help="a local Hugging Face folder as model.base (default: the embedded model)")
    tk.add_argument("--export", action="store_true", help="then merge, convert, quantize and run the GGUF files")
    tk.add_argument("--export-rows", type=int, default=20, help="test rows each GGUF file answers")
    tk.add_argument("--model-step", action="store_true", help="also time the model step alone on the same shapes")
    tk.add_argument("--no-evaluate", action="store_true", help="train, then time the model step alone; no evaluation")
    tk.add_argument("--step-times", action="store_true", help="time every optimizer step (a device sync after each)")
    tk.add_argument("--variants", action="store_true",
                    help="with --no-evaluate: also time the model step on the stage's own batches (as --step-times does)")
    tk.add_argument("--model-steps", type=int, default=10, help="timed steps of each model-step figure (after 3 warm-up)")
    tk.add_argument("--variant-steps", type=int, default=0, help="timed steps of the stage-batch variants (0: --model-steps)")
    tk.add_argument("--trace-dir", help="with --step-times: torch.profiler tables of 5 steps of the stage and of the model step")
    st = sub.add_parser("step")
    st.add_argument("--work", required=True)
    st.add_argument("--base", required=True)
    st.add_argument("--profile", default="gpu")
    st.add_argument("--packed-every", type=int, nargs="+", default=[0, 160])
    bd = sub.add_parser("boundaries", help="what the packed examples' boundaries cost the model step")
    bd.add_argument("--work", required=True)
    bd.add_argument("--base", required=True, help="a local Hugging Face folder")
    bd.add_argument("--task", default="address_json")
    bd.add_argument("--profile", default="gpu")
    bd.add_argument("--batch", type=int, default=0, help="micro-batch rows (0: the profile's)")
    bd.add_argument("--steps", type=int, default=40)
    bd.add_argument("--kernels", nargs="+", default=["auto", "none"])
    bd.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (timed after warm-up)")
    bd.add_argument("--trace-dir", help="torch.profiler tables of 5 steps with and without the boundaries")
    pl = sub.add_parser("pipeline")
    pl.add_argument("--work", required=True, help="the scratch copy (replaced)")
    pl.add_argument("--base", required=True, help="a local Hugging Face folder as model.base")
    pl.add_argument("--profile", default="gpu")
    pl.add_argument("--tasks", nargs="*", help="only these tasks (default: every task in params.yaml)")
    pl.add_argument("--set", action="append", default=[], metavar="DOTTED.KEY=VALUE", help="a setting over the profile")
    pl.add_argument("--gates-off", action="store_true", help="no quality gate stops the run (for a random-weight base)")
    pl.add_argument("--targets", nargs="*", default=[], help="dvc repro targets (default: the whole pipeline)")
    pl.add_argument("--log", help="dvc repro's output, each line stamped with seconds since the start")
    for p in (mg, tk, st, bd, pl):
        p.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    result = {"multi-gpu": multi_gpu, "task": task_run, "step": step_run, "boundaries": boundaries_run,
              "pipeline": pipeline_run}[args.command](args)
    print(json.dumps(result, indent=2, default=str))
    save(args, result)


if __name__ == "__main__":
    main()
