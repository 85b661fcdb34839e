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


def test_reproduction_verdicts_judge_metrics_by_their_intervals_and_decisions_exactly():
    check = load_script("check_reproduction")
    committed = {"metrics/t/eval.json": {"tuned_micro_f1": 0.787, "tuned_micro_f1_ci": [0.74, 0.83], "gate_passed": True,
                                         "tuned_exact_match": 0.48, "tuned_exact_match_ci": [0.40, 0.56],
                                         "base_eval_loss": 2.0429, "seconds": 12.0, "valid_answer": 1.0},
                 "metrics/t/export.json": {"served_quantization": "Q4_K_M"}}
    same_numbers = {"metrics/t/eval.json": {**committed["metrics/t/eval.json"], "seconds": 99.0},
                    "metrics/t/export.json": {"served_quantization": "Q4_K_M"}}
    found = check.verdicts(committed, same_numbers)
    assert len(found["equal"]) == 4 and len(found["decision same"]) == 2 and check.report(found) == 0
    elsewhere = {"metrics/t/eval.json": {**committed["metrics/t/eval.json"], "tuned_micro_f1": 0.779,
                                         "tuned_exact_match": 0.30, "base_eval_loss": 2.0417},
                 "metrics/t/export.json": {"served_quantization": "Q8_0"}}
    found = check.verdicts(committed, elsewhere)
    assert [line.split(":")[1].strip() for line in found["within its interval"]] == ["tuned_micro_f1"]
    assert [line.split(":")[1].strip() for line in found["outside its interval"]] == ["tuned_exact_match"]
    assert [line.split(":")[1].strip() for line in found["differs (no interval)"]] == ["base_eval_loss"]
    assert [line.split(":")[1].strip() for line in found["decision differs"]] == ["served_quantization"]
    assert check.report(found) == 1
