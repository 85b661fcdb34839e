"""The layout keeps DVC's code dependencies complete by construction; these tests keep it that way.

For each stage, every tuneforge module that its command runs (the module it names, a notebook's imports, and
everything they import, transitively) must sit under one of the stage's deps in dvc.yaml. A future import that reaches
outside them fails here instead of leaving `dvc repro` to call stale outputs up to date.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGE_NOTEBOOK = {"prepare": "00_prepare", "audit": "01_data_audit", "train": "02_train", "evaluate": "03_evaluate",
                  "export": "04_export_gguf", "drift": "05_drift_report"}
# Stages whose command runs a module rather than a notebook.
MODULE_STAGES = {"base_model": "tuneforge.stages.base_model", "base_gguf": "tuneforge.stages.base_gguf",
                 "index": "tuneforge.report.index"}


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(code: str, package: str = "") -> set[str]:
    """tuneforge modules named by the import statements of some code (every scope, lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if not node.level else ".".join([*package.split(".")[: -node.level + 1 or None], node.module])
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from tuneforge.core import metrics`
    return {m for m in found if m.split(".")[0] == "tuneforge" and module_file(m)}


def closure(modules: set[str]) -> set[Path]:
    """Files of these modules, their parent packages and everything they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a/__init__, a/b/__init__
        todo += imported_modules(module_file(name).read_text(), name)
    return {module_file(name) for name in seen}


def notebook_code(name: str) -> str:
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def stage_deps(stage: str) -> list[Path]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = spec.get("do", spec)["deps"]
    return [ROOT / d for d in deps if "${" not in d]


def stage_command(stage: str) -> str:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    return spec.get("do", spec)["cmd"]


@pytest.mark.parametrize("stage", [*STAGE_NOTEBOOK, *MODULE_STAGES])
def test_every_module_a_stage_runs_is_one_of_its_deps(stage):
    if stage in STAGE_NOTEBOOK:
        assert stage_command(stage).startswith(f"python -m tuneforge.report.notebook {STAGE_NOTEBOOK[stage]} ")
        entry = {"tuneforge.report.notebook"} | imported_modules(notebook_code(STAGE_NOTEBOOK[stage]))
        assert ROOT / "notebooks" / f"{STAGE_NOTEBOOK[stage]}.ipynb" in stage_deps(stage)
    else:
        assert stage_command(stage) == f"python -m {MODULE_STAGES[stage]}"
        entry = {MODULE_STAGES[stage]}
    deps = stage_deps(stage)
    uncovered = [f.relative_to(ROOT) for f in closure(entry)
                 if not any(f == d or d in f.parents for d in deps)]
    assert not uncovered, f"dvc.yaml stage {stage!r} runs {uncovered} but does not list them (or a folder above them) in deps"


def test_core_imports_no_stage_and_stages_import_only_the_core():
    for path in (SRC / "tuneforge" / "core").glob("*.py"):
        bad = [m for m in imported_modules(path.read_text(), "tuneforge.core.x") if not m.startswith("tuneforge.core")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the core must not import stages, reports or the cli"
    for path in (SRC / "tuneforge" / "stages").glob("*.py"):
        bad = [m for m in imported_modules(path.read_text(), "tuneforge.stages.x")
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
