"""The helper scripts take arguments as data: a path or a revision never passes through a shell."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_reproduction_clones_into_a_path_a_shell_would_split(tmp_path):
    check = load_script("check_reproduction")
    clone = tmp_path / "a clone; touch pwned $(touch pwned2)"
    check.run(["git", "clone", "-q", "--", str(ROOT), str(clone)], cwd=tmp_path)
    assert (clone / "dvc.yaml").exists()
    assert not list(tmp_path.glob("pwned*")) and not list(ROOT.glob("pwned*"))
