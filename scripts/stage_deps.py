"""Each DVC stage's code deps, generated from what its command imports: `python scripts/stage_deps.py [--write]`.

A stage runs one entry point (a module, or the notebook runner with one notebook). Its code deps are the files of
every tuneforge module that entry point imports, transitively (lazy imports inside functions too), and of their
parent packages, plus the non-Python files the code reads (NON_PYTHON_DEPS). So an edit to a serving helper reruns
no training, and a new import cannot leave a stage's outputs "up to date" while its code changed.

Without --write: exit 1 and list each stage whose deps in dvc.yaml differ (tests/test_layout.py runs this check).
With --write: rewrite those deps in dvc.yaml, keeping its comments and every other dep (data, models, notebooks).
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
from importlib.util import resolve_name
from pathlib import Path

from ruamel.yaml import YAML

from tuneforge.core.paths import PIPELINE  # the stage list's one home (importing it runs no stage)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CODE_PREFIX = "src/tuneforge/"

STAGES = {stage.name: stage for stage in PIPELINE}
NOTEBOOK_RUNNER = "tuneforge.report.notebook"
# Files under src/ that a module reads rather than imports.
NON_PYTHON_DEPS = {"tuneforge.report.index": ["src/tuneforge/report/templates"]}


def module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imported_modules(code: str, package: str = "") -> set[str]:
    """tuneforge modules named by the import statements of some code (every scope, lazy imports too); package is the
    package a relative import is resolved against (a module's parent, or the package itself for an __init__)."""
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):  # `from .. import core` names no module: its package is the base
            module = resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from tuneforge.core import metrics`
    return {m for m in found if m.split(".")[0] == "tuneforge" and module_file(m)}


def closure(modules: set[str]) -> set[str]:
    """These modules, their parent packages and everything they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a/__init__, a/b/__init__
        file = module_file(name)
        todo += imported_modules(file.read_text(), name if file.name == "__init__.py" else name.rpartition(".")[0])
    return seen


def notebook_code(name: str) -> str:
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def entry_modules(stage: str) -> set[str]:
    if STAGES[stage].notebook:
        return {NOTEBOOK_RUNNER} | imported_modules(notebook_code(STAGES[stage].notebook))
    return {STAGES[stage].module}


def code_deps(stage: str) -> list[str]:
    """The stage's code deps as dvc.yaml lists them: repository-relative paths, sorted."""
    modules = closure(entry_modules(stage))
    files = {module_file(m).relative_to(ROOT).as_posix() for m in modules}
    files |= {path for m in modules for path in NON_PYTHON_DEPS.get(m, [])}
    return sorted(files)


def stage_spec(stages, stage: str):
    spec = stages[stage]
    return spec["do"] if "do" in spec else spec


def listed_code_deps(spec) -> list[str]:
    return sorted(d for d in spec["deps"] if isinstance(d, str) and d.startswith(CODE_PREFIX))


def differences(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (missing from dvc.yaml, listed but not run)} for every stage whose code deps are not its imports'."""
    stages = YAML().load(dvc_yaml)["stages"]
    found = {}
    for stage in STAGES:
        want, have = code_deps(stage), listed_code_deps(stage_spec(stages, stage))
        if want != have:
            found[stage] = (sorted(set(want) - set(have)), sorted(set(have) - set(want)))
    return found


def write(dvc_yaml: Path = ROOT / "dvc.yaml") -> None:
    """Replace each stage's code deps in place: the new list sits where the old one began, other deps keep order."""
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    document = yaml.load(dvc_yaml)
    for stage in STAGES:
        deps = stage_spec(document["stages"], stage)["deps"]
        positions = [i for i, d in enumerate(deps) if isinstance(d, str) and d.startswith(CODE_PREFIX)]
        at = positions[0] if positions else 0
        for i in reversed(positions):
            del deps[i]
        for offset, path in enumerate(code_deps(stage)):
            deps.insert(at + offset, path)
    out = io.StringIO()
    yaml.dump(document, out)
    dvc_yaml.write_text(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args(argv)
    if args.write:
        write()
    found = differences()
    for stage, (missing, extra) in found.items():
        print(f"{stage}: runs {missing} without listing them; lists {extra} that it does not run", file=sys.stderr)
    if found:
        print("run `python scripts/stage_deps.py --write` to update dvc.yaml", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
