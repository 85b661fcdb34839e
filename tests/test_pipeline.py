"""The real pipeline through DVC and papermill, in a temporary copy of the repository, with small params."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, dump_dom_offline, git

pytestmark = pytest.mark.slow

PRIMARY = {"address_json": "micro_f1", "sms_spam": "macro_f1", "email_subject": "chrf"}  # the embedded tasks
REMOTE_LOAD = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*?\s(?:src|href)=["']https?://""")

SMALL = {  # keep CI fast through params, not by mocking any stage
    # (email_subject's own step count, a task override, would win over max_steps)
    "train": {"max_steps": 2, "eval_every": 1, "eval_rows": 8, "checkpoint_every": 1, "batch_size": 4,
              "task_overrides": {"email_subject": {"max_steps": 2}}},
    "evaluate": {"max_rows": 24, "min_tuned_score": 0.0, "max_regression": 1.0},
    # two training steps teach nothing: gates must not fail
    "tasks": {"address_json": {"min_score": 0.0}, "email_subject": {"min_score": 0.0}},
    "export": {"max_rows": 6, "parity_rows": 3, "imatrix_rows": 8, "max_metric_drop": 1.0, "min_top1_agreement": 0.0},
}


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def merge(into: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def set_params(repo: Path, overrides: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    merge(params, overrides)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit(repo: Path, message: str) -> None:
    git("-c", "user.email=t@t", "-c", "user.name=t", "add", "-A", cwd=repo)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", message, cwd=repo)


@pytest.fixture(scope="module")
def pipeline(module_tmp):
    repo = copy_repo(module_tmp)
    set_params(repo, SMALL)
    commit(repo, "small params")
    first = dvc("repro", cwd=repo)
    commit(repo, "repro")
    return repo, first.stdout


def test_repro_writes_splits_reports_and_metrics(pipeline):
    repo, _ = pipeline
    for task in PRIMARY:
        for split in ("train", "validation", "test"):
            assert (repo / f"data/processed/{task}/{split}.jsonl").stat().st_size > 0
        audit = json.loads((repo / f"metrics/{task}/audit.json").read_text())
        assert audit["gate_passed"] and audit["exact_leakage"] == 0
        html = (repo / f"reports/{task}/01_data_audit.html").read_text()
        assert "Verdict" in html and "import pandas" not in html  # no code cells in the report
        assert "https://cdn" not in html and "unpkg.com" not in html
    assert (repo / "data/processed/address_json/production.jsonl").exists()


def test_every_stage_reported(pipeline):
    repo, _ = pipeline
    for task in PRIMARY:
        train = json.loads((repo / f"metrics/{task}/train.json").read_text())
        assert train["mode"] == "lora" and train["device"] == "cpu" and train["steps"] == 2
        # The same adapter config in every clone: the base by its project path, the modules in a stable order.
        adapter_config = json.loads((repo / f"models/{task}/adapter/adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == "models/base"
        assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
        assert len(adapter_config["target_modules"]) == 7  # all-linear on a Llama: q k v o gate up down
        assert f"tuned_{PRIMARY[task]}" in (repo / f"metrics/{task}/eval.json").read_text()
        assert len((repo / f"data/predictions/{task}.jsonl").read_text().splitlines()) == 24
        export = json.loads((repo / f"metrics/{task}/export.json").read_text())
        assert export["Q4_K_M_size_mb"] < export["f16_size_mb"] / 2
        assert (repo / f"models/{task}/gguf/model-Q4_K_M.gguf").read_bytes()[:4] == b"GGUF"
        drift = json.loads((repo / f"metrics/{task}/drift.json").read_text())
        assert isinstance(drift["retrain"], bool)
        for name in ("audit", "train", "eval", "export", "drift"):  # what made each number
            env = json.loads((repo / f"metrics/{task}/{name}.json").read_text())["environment"]
            assert env["torch"] and env["transformers"] and env["llama-cpp-python"] and len(env["commit"]) >= 40
        for name in ("02_train", "03_evaluate", "04_export_gguf", "05_drift_report", "05_drift_evidently"):
            page = (repo / f"reports/{task}/{name}.html").read_text()
            # Nothing loaded from the network (inlined plotly.js merely mentions its CDN in a default setting).
            assert not REMOTE_LOAD.search(page), name
    assert (repo / "reports/index.html").exists()


def test_index_and_its_links_render_offline_in_chromium(pipeline, tmp_path):
    repo, _ = pipeline
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    index = repo / "reports/index.html"
    links = re.findall(r'href="([^"]+)"', index.read_text())
    assert len(links) >= 10
    dumps = {}
    for page in [index] + [index.parent / link for link in links]:
        assert page.exists(), page
        dumps[page.name] = dump_dom_offline(chromium, page, tmp_path / "profile")
    assert "address_json" in dumps["index.html"] and "sms_spam" in dumps["index.html"]
    assert "Verdict" in dumps["01_data_audit.html"]


def test_second_repro_is_up_to_date(pipeline):
    repo, _ = pipeline
    out = dvc("repro", cwd=repo).stdout
    assert "Running stage" not in out
    assert "up to date" in out.lower()


def test_changing_an_audit_threshold_reruns_only_audit_and_the_index(pipeline):
    repo, _ = pipeline
    set_params(repo, {"audit": {"max_pii_fraction": 0.2}})
    out = dvc("repro", cwd=repo).stdout
    ran = sorted(line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage"))
    # The index shows every task's numbers, so it follows the audits' new metrics; training depends on the audit's
    # verdict alone (unchanged), so nothing else reruns.
    assert ran == ["audit@address_json", "audit@email_subject", "audit@sms_spam", "index"]
    commit(repo, "pii threshold")


def test_metrics_show_and_experiments(pipeline):
    repo, _ = pipeline
    shown = dvc("metrics", "show", "--json", cwd=repo).stdout
    assert "near_leakage_fraction" in shown
    dvc("exp", "run", "-S", "audit.max_over_length_fraction=0.02", cwd=repo)
    assert "0.02" in dvc("exp", "show", "--no-pager", "--csv", cwd=repo).stdout


def test_audit_gate_fails_with_file_and_line(pipeline, tmp_path):
    repo, _ = pipeline
    raw = repo / "data/raw/sms_spam/sms-spam.csv"
    original = raw.read_bytes()
    try:
        raw.write_bytes(original + b"this line is not a message\n" * 200)
        result = dvc("repro", "audit@sms_spam", cwd=repo, check=False)
        assert result.returncode != 0
        message = result.stdout + result.stderr
        assert "audit.max_invalid_fraction" in message
        assert "data/raw/sms_spam/sms-spam.csv:5576" in message
        quarantined = [json.loads(line) for line in (repo / "data/quarantine/sms_spam.jsonl").open()]
        assert len(quarantined) == 200 and quarantined[0]["line"] == 5576
    finally:
        raw.write_bytes(original)
        dvc("repro", "audit@sms_spam", cwd=repo)


def test_share_through_a_dvc_remote(pipeline, tmp_path):
    repo, _ = pipeline
    remote = tmp_path / "remote"
    dvc("remote", "add", "-d", "shared", str(remote), cwd=repo)
    commit(repo, "remote")
    dvc("push", cwd=repo)
    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc("config", "--local", "cache.type", "hardlink,copy", cwd=clone)  # one copy of the models on disk, not two
    dvc("pull", cwd=clone)
    assert (clone / "models/base/model.safetensors").exists()
    status = dvc("status", cwd=clone).stdout
    assert "up to date" in status.lower(), status
    out = dvc("repro", cwd=clone).stdout
    assert "Running stage" not in out


def test_new_tasks_of_other_kinds_need_no_dvc_yaml_edit(pipeline):
    """Tasks added to params.yaml run through every stage and reach the index, whatever their output kind (a label,
    a nested JSON Schema, a multi-turn chat; text is embedded; tool_call needs a base whose template renders tools=,
    tests/test_kinds_pipeline.py); dvc.yaml stays as it is."""
    repo, _ = pipeline
    params = yaml.safe_load((repo / "params.yaml").read_text())
    spam = {k: v for k, v in params["tasks"]["sms_spam"].items() if k != "production_source"}
    data = Path(__file__).parent / "data"
    for folder, files in (("orders", ("json_schema_task/records.jsonl", "json_schema_task/schema.json")),
                          ("conversations", ("chat_task/records.jsonl",))):
        (repo / "data/raw" / folder).mkdir(parents=True)
        for name in files:
            shutil.copy2(data / name, repo / "data/raw" / folder / Path(name).name)
    # Every order confirmation names its customer's e-mail, and half of them outgrow the small params' 256-token rows.
    set_params(repo, {"audit": {"max_pii_fraction": 1.0, "max_over_length_fraction": 1.0},
                      "tasks": {
        "spam_again": spam,
        "orders": {"source": "data/raw/orders/records.jsonl", "reader": "prompt_completion_jsonl",
                   "system_prompt": "Extract the order as JSON.", "max_new_tokens": 16,
                   "output": {"kind": "json_schema", "schema_file": "data/raw/orders/schema.json"}},
        "conversations": {"source": "data/raw/conversations/records.jsonl", "reader": "chat_jsonl",
                          "output": {"kind": "chat"}, "max_new_tokens": 8},
    }})
    dvc("repro", cwd=repo)
    assert git("status", "--porcelain", "dvc.yaml", cwd=repo) == ""
    assert json.loads((repo / "metrics/spam_again/eval.json").read_text())["test_rows"] == 24
    index = (repo / "reports/index.html").read_text()
    for task, metric in (("spam_again", "macro_f1"), ("orders", "field_f1"), ("conversations", "chrf")):
        assert f"tuned_{metric}" in (repo / f"metrics/{task}/eval.json").read_text() and task in index
