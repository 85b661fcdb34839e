"""Sweeps: the `sweep` section's validation, and a real 2-point sweep through DVC's queue in a repository copy."""

import itertools
import json
import random
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo
from tests.test_pipeline import commit, dvc, set_params
from tuneforge.core.params import (
    MAX_SWEEP_POINTS,
    Params,
    ParamsError,
    SweepSpec,
    load_params,
    load_params_text,
    only_tasks,
)
from tuneforge.sweep import format_value, queue_commands

METRIC = "metrics/address_json/eval.json:tuned_micro_f1"


def test_grid_and_random_points():
    grid = SweepSpec(metric=METRIC, settings={"train.learning_rate": [1e-3, 2e-3], "train.lora.r": [16, 32, 64]})
    assert len(grid.points()) == 6 and grid.points()[0] == {"train.learning_rate": 1e-3, "train.lora.r": 16}
    sample = SweepSpec(metric=METRIC, method="random", samples=4, seed=1, settings=grid.settings)
    again = SweepSpec(metric=METRIC, method="random", samples=4, seed=1, settings=grid.settings)
    assert sample.points() == again.points() and len(sample.points()) == 4
    assert all(p in grid.points() for p in sample.points())
    assert len({json.dumps(p, sort_keys=True) for p in sample.points()}) == 4  # no combination twice


# Seven settings of ten values each, six of them one YAML alias: a 10^7-point grid in a few lines.
TEN_MILLION = {f"train.{name}": list(range(1, 11)) for name in
               ("seed", "eval_rows", "eval_every", "batch_size", "max_steps", "grad_accum", "checkpoint_every")}
ALIASED_SWEEP = """
sweep:
  metric: metrics/address_json/eval.json:tuned_micro_f1
  settings:
    train.seed: &ten [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    train.eval_rows: *ten
    train.eval_every: *ten
    train.batch_size: *ten
    train.max_steps: *ten
    train.grad_accum: *ten
    train.checkpoint_every: *ten
"""


def test_a_grid_past_the_cap_is_refused_before_it_is_built(repo_root):
    text = (repo_root / "params.yaml").read_text().split("\nsweep:")[0] + ALIASED_SWEEP
    started = time.perf_counter()
    with pytest.raises(ParamsError, match=r"sweep: .*a grid of 10,000,000 combinations \(10 x 10 x 10 x 10 x 10 x 10 x "
                                          r"10\), one experiment each; at most 1,000"):
        load_params_text(text, Path("params.yaml"))
    assert time.perf_counter() - started < 5  # building the grid took 21.8 s before failing
    at_cap = SweepSpec(metric=METRIC, settings={"train.seed": list(range(10)), "train.eval_rows": list(range(1, 11)),
                                                "train.eval_every": list(range(1, 11))})
    assert len(at_cap.points()) == MAX_SWEEP_POINTS
    with pytest.raises(ValueError, match="samples\n  Input should be less than or equal to 1000"):
        SweepSpec(metric=METRIC, method="random", samples=MAX_SWEEP_POINTS + 1, settings=TEN_MILLION)


def test_random_draws_from_a_large_grid_without_building_it():
    started = time.perf_counter()
    points = SweepSpec(metric=METRIC, method="random", samples=4, seed=1, settings=TEN_MILLION).points()
    assert time.perf_counter() - started < 5
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 4
    assert all(list(p) == list(TEN_MILLION) and all(1 <= v <= 10 for v in p.values()) for p in points)
    # the same combinations a seeded random.sample draws from the built grid, as sweeps chose them before
    settings = {"train.learning_rate": [1e-3, 2e-3, 3e-3], "train.lora.r": [8, 16, 32, 64], "train.seed": [1, 2]}
    built = [dict(zip(settings, combo)) for combo in itertools.product(*settings.values())]
    for seed in range(5):
        spec = SweepSpec(metric=METRIC, method="random", samples=5, seed=seed, settings=settings)
        assert spec.points() == random.Random(seed).sample(built, 5)
    assert SweepSpec(metric=METRIC, settings=settings).points() == built


@pytest.mark.parametrize("key, message", [
    ("train.lr", "'lr' is not a setting"),
    ("train.lora", "is a section"),
    ("train.lora.r.x", "has no sub-settings"),
    ("tasks", "name a task and its setting"),
    ("tasks.address_json", "is a section"),
    ("sweep.seed", "cannot sweep its own settings"),
])
def test_unknown_settings_are_refused(key, message):
    with pytest.raises(ValueError, match=message):
        SweepSpec(metric=METRIC, settings={key: [1]})


def test_params_yaml_sweep_is_valid_and_every_point_applies(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.sweep is not None
    for point in params.sweep.points():
        changed = params.with_settings(point)
        assert all(str(v) in json.dumps(changed.model_dump()) for v in point.values())


def test_with_settings_validates_values():
    params = load_params()
    assert params.with_settings({"tasks.address_json.system_prompt": "Parse."}).task("address_json").system_prompt == "Parse."
    with pytest.raises(ParamsError, match="learning_rate"):
        params.with_settings({"train.learning_rate": -1})
    with pytest.raises(ParamsError, match="no task 'nope'"):
        params.with_settings({"tasks.nope.system_prompt": "x"})
    assert isinstance(params.with_settings({"train.lora.target_modules": ["q_proj", "v_proj"]}), Params)


def test_queue_commands_quote_values_for_hydra():
    spec = SweepSpec(metric=METRIC, targets=["evaluate@sms_spam"],
                     settings={"train.learning_rate": [2e-5], "tasks.sms_spam.system_prompt": ["It's spam?"],
                               "train.lora.target_modules": [["q_proj", "v_proj"]]})
    (cmd,) = queue_commands(spec)
    assert cmd[:6] == ["dvc", "exp", "run", "--queue", "-n", "sweep-1"]
    assert "train.learning_rate=2e-5" in cmd and "tasks.sms_spam.system_prompt='It\\'s spam?'" in cmd
    assert "train.lora.target_modules=['q_proj','v_proj']" in cmd and cmd[-1] == "evaluate@sms_spam"
    assert format_value(True) == "true" and format_value(None) == "null"


TINY = {  # two experiments of one training step each: the sweep machinery is what is under test
    "train": {"max_steps": 1, "eval_every": 1, "eval_rows": 4, "checkpoint_every": 1, "batch_size": 2, "max_seq_len": 128},
    "evaluate": {"max_rows": 4, "batch_size": 4, "min_tuned_score": 0.0, "max_regression": 1.0},
    "sweep": {"method": "grid", "name": "tiny", "targets": ["evaluate@sms_spam"],
              "metric": "metrics/sms_spam/eval.json:tuned_macro_f1", "higher_is_better": True,
              "settings": {"train.learning_rate": [1.0e-4, 1.0e-3]}},
}


@pytest.mark.slow
def test_two_point_sweep_through_the_dvc_queue(tmp_path):
    import os
    import subprocess
    import sys

    repo = copy_repo(tmp_path / "repo")
    set_params(repo, TINY)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sweep"]["settings"] = TINY["sweep"]["settings"]  # replace, not merge, the default settings
    # One task and the stages up to evaluation: `dvc exp apply` checks out every output dvc.yaml declares,
    # so each must exist in this copy's cache (a real project has run the whole pipeline once).
    only_tasks(params, ["sms_spam"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())
    for name in ("base_gguf", "export", "drift", "index"):
        stages["stages"].pop(name)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    (repo / "dvc.lock").unlink()  # its outputs are in no cache here
    commit(repo, "tiny params")
    dvc("repro", "audit@sms_spam", cwd=repo)  # the upstream stages once; each experiment reuses them
    commit(repo, "upstream outputs")

    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("TUNEFORGE_ROOT", None)
    run = subprocess.run([sys.executable, "-m", "tuneforge.cli", "sweep"], cwd=repo, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    shown = dvc("exp", "show", "--json", "--no-pager", cwd=repo).stdout
    assert '"tiny-1"' in shown and '"tiny-2"' in shown
    page = (repo / "reports/sweep.html").read_text()
    rows = re.findall(r'<tr class="(best|failed|)"><td class="l">(tiny-\d)</td><td class="l">(\w+)</td>', page)
    assert sorted(name for _, name, _ in rows) == ["tiny-1", "tiny-2"]
    assert all(status == "Success" for _, _, status in rows), rows
    assert [css for css, _, _ in rows].count("best") == 1
    assert "dvc exp apply tiny-" in page
    assert "<script" not in page  # a static page: nothing to load, offline or not

    best = re.search(r"dvc exp apply (tiny-\d)", page).group(1)
    dvc("exp", "apply", best, cwd=repo)
    applied = yaml.safe_load((repo / "params.yaml").read_text())["train"]["learning_rate"]
    assert applied == TINY["sweep"]["settings"]["train.learning_rate"][int(best[-1]) - 1]
