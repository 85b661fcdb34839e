"""The layout keeps DVC's code dependencies exact by construction; these tests keep it that way.

For each stage, the tuneforge files its command runs (the module it names, a notebook's imports, and everything they
import, transitively) are exactly the stage's code deps in dvc.yaml (scripts/stage_deps.py generates them). A future
import that reaches outside them fails here instead of leaving `dvc repro` to call stale outputs up to date, and a
dep the stage no longer runs fails too, so editing it cannot rerun hours of training for nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
_spec = importlib.util.spec_from_file_location("stage_deps", ROOT / "scripts" / "stage_deps.py")
stage_deps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage_deps)
imported_modules = stage_deps.imported_modules


def test_every_stage_lists_exactly_the_code_it_runs():
    found = stage_deps.differences()
    assert not found, "\n".join(f"dvc.yaml stage {stage!r} runs {missing} without listing them, and lists {extra} that "
                                 "it does not run: `python scripts/stage_deps.py --write`"
                                 for stage, (missing, extra) in found.items())


def test_dvc_yaml_runs_the_pipelines_stages_in_their_order():
    """dvc.yaml holds exactly core.paths.PIPELINE's stages, each running the command PIPELINE names."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [stage.name for stage in stage_deps.PIPELINE]
    for stage in stage_deps.PIPELINE:
        spec = stages[stage.name].get("do", stages[stage.name])
        assert spec["cmd"] == stage.command, f"dvc.yaml stage {stage.name!r} runs {spec['cmd']!r}"
        assert ("foreach" in stages[stage.name]) == bool(stage.notebook), f"{stage.name}: per-task stages run foreach"


def test_an_edit_to_the_request_log_reruns_no_training():
    """Only stages that import core/traffic.py (drift) depend on it: a serving fix reruns no training."""
    dependants = [stage for stage in stage_deps.STAGES
                  if "src/tuneforge/core/traffic.py" in stage_deps.code_deps(stage)]
    assert dependants == ["drift"]


def test_the_check_names_a_missing_import(tmp_path):
    """The generator's check fails, naming the stage and the file, when dvc.yaml lacks a module the stage runs."""
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text((ROOT / "dvc.yaml").read_text().replace("        - src/tuneforge/core/batching.py\n", "", 1))
    found = stage_deps.differences(dvc_yaml)
    assert found and all(missing == ["src/tuneforge/core/batching.py"] for missing, _ in found.values())
    stage_deps.write(dvc_yaml)
    assert not stage_deps.differences(dvc_yaml)
    assert yaml.safe_load(dvc_yaml.read_text()) == yaml.safe_load((ROOT / "dvc.yaml").read_text())


def test_core_imports_no_stage_and_stages_import_only_the_core():
    for path in (SRC / "tuneforge" / "core").glob("*.py"):
        bad = [m for m in imported_modules(path.read_text(), "tuneforge.core") if not m.startswith("tuneforge.core")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the core must not import stages, reports or the cli"
    for path in (SRC / "tuneforge" / "stages").glob("*.py"):
        bad = [m for m in imported_modules(path.read_text(), "tuneforge.stages")
               if not m.startswith("tuneforge.core") and m != "tuneforge.stages"]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: a stage imports only tuneforge.core"


def test_index_needs_no_edit_for_a_new_task():
    index = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["index"]
    assert "metrics" in index["deps"] and not any("/" in d and d.startswith("metrics/") for d in index["deps"])


def test_bytecode_is_not_a_code_dependency():
    """Importing tuneforge (a test, a notebook, JupyterLab) writes __pycache__ beside the modules wherever Python
    writes bytecode; DVC must not hash it into the stages' code deps, or every stage would look changed."""
    import subprocess

    pyc = "src/tuneforge/core/__pycache__/batching.cpython-311.pyc"
    result = subprocess.run(["dvc", "check-ignore", pyc], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and pyc in result.stdout, result.stdout + result.stderr


def test_relative_imports_resolve_against_the_modules_package():
    """`from .records import x` in tuneforge/core/metrics.py is tuneforge.core.records (not a submodule of metrics)."""
    assert "tuneforge.core.records" in imported_modules("from .records import read_jsonl", "tuneforge.core")
    assert "tuneforge.core" in imported_modules("from .. import core", "tuneforge.stages")
