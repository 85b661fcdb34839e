"""Every output kind through the stages, on the CPU: a tiny random-weight Qwen2 (a real family's tokenizer, and a
chat template that renders tools=) through base_model -> prepare -> train -> evaluate -> export -> drift, with one
task a kind: text (the embedded email subjects), json_schema (nested orders), tool_call (an assistant with tools,
multi-step records among them) and chat (two-turn conversations). Random weights answer nonsense: the test checks
that each stage runs, scores with the kind's own metrics and keeps the kind's contract, not that the answers are good.
"""

import shutil

import pytest
import yaml

pytest.importorskip("llama_cpp", reason="llama_cpp is not importable: scripts/setup.sh installs llama-cpp-python")

from tuneforge.core.modeling import load_tokenizer  # noqa: E402
from tuneforge.core.params import load_params  # noqa: E402
from tuneforge.core.paths import base_gguf_dir, base_model_dir, models_dir, predictions_file, processed_dir  # noqa: E402
from tuneforge.core.records import read_jsonl, write_jsonl  # noqa: E402
from tuneforge.stages import drift  # noqa: E402
from tuneforge.stages.base_gguf import export_base_gguf  # noqa: E402
from tuneforge.stages.base_model import save_base_model  # noqa: E402
from tuneforge.stages.evaluate import run_evaluation  # noqa: E402
from tuneforge.stages.export import run_export  # noqa: E402
from tuneforge.stages.prepare import prepare, write_prepared  # noqa: E402
from tuneforge.stages.train import train_task  # noqa: E402

from .conftest import ROOT, load_script  # noqa: E402

pytestmark = pytest.mark.slow  # four tasks through every stage

DATA = ROOT / "tests" / "data"
TOOLS = yaml.safe_load((DATA / "tool_call_task" / "tools.yaml").read_text())
# name -> (the task's params, the raw files it reads: repository path -> file to copy there)
TASKS = {
    "subjects": ({"source": "data/raw/subjects/emails.jsonl", "reader": "prompt_completion_jsonl",
                  "system_prompt": "Write the subject line of this email.",
                  "output": {"kind": "text", "max_chars": 80}},
                 {"data/raw/subjects/emails.jsonl": ROOT / "data" / "raw" / "email_subject" / "emails.jsonl"}),
    "orders": ({"source": "data/raw/orders/records.jsonl", "reader": "prompt_completion_jsonl",
                "system_prompt": "Extract the order as JSON.",
                "output": {"kind": "json_schema", "schema_file": "data/raw/orders/schema.json"}},
               {"data/raw/orders/records.jsonl": DATA / "json_schema_task" / "records.jsonl",
                "data/raw/orders/schema.json": DATA / "json_schema_task" / "schema.json"}),
    "assistant": ({"source": "data/raw/assistant/records.jsonl", "reader": "chat_jsonl",
                   "system_prompt": "You are a helpful assistant with tools.",
                   "output": {"kind": "tool_call", "tools": TOOLS}},
                  {"data/raw/assistant/records.jsonl": DATA / "tool_call_task" / "records.jsonl"}),
    "conversations": ({"source": "data/raw/conversations/records.jsonl", "reader": "chat_jsonl",
                       "output": {"kind": "chat"}},
                      {"data/raw/conversations/records.jsonl": DATA / "chat_task" / "records.jsonl"}),
}
SETTINGS = {
    "train": {"max_seq_len": 640, "batch_size": 2, "max_steps": 2,  # the tools alone take ~400 tokens of a prompt
              "eval_every": 2, "eval_rows": 4,
              "checkpoint_every": 10, "early_stopping_patience": 10, "task_overrides": {},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}},
    "evaluate": {"batch_size": 4, "slices": ["input_length"]},
    "export": {"quantizations": ["Q8_0"], "max_rows": 3, "parity_rows": 2, "gate_quantization": "Q8_0",
               "imatrix_rows": 4, "compare_without_imatrix": False, "max_metric_drop": 1.0, "min_top1_agreement": 0.0,
               "n_threads": 2},
    "drift": {"min_rows": 3},
}


builder = load_script("make_random_model")
if not builder.VOCAB_DIR.exists():
    pytest.skip("the vocabulary GGUFs are fetched by scripts/fetch_gguf_converter.sh", allow_module_level=True)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return builder.make_random_model("qwen2", tmp_path_factory.mktemp("qwen2"))


def project(root, task: str, base, monkeypatch):
    """A project folder with the one task, tiny settings, its raw files, model.base = base and a chat template that
    renders tools (Qwen2.5-Instruct's)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    task_params, files = TASKS[task]
    root.mkdir(parents=True, exist_ok=True)
    params["model"]["base"] = str(base)
    # The vocabulary GGUF's ChatML template ignores tools=; Qwen2.5-Instruct's real one renders them.
    params["model"]["chat_template"] = "qwen2.5-instruct.jinja"
    shutil.copy2(DATA / "chat_templates" / "qwen2.5-instruct.jinja", root / "qwen2.5-instruct.jinja")
    params["tasks"] = {task: {**task_params, "max_new_tokens": 24}}
    for section, values in SETTINGS.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "vendor").symlink_to(ROOT / "vendor")
    for rel, src in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, root / rel)
    monkeypatch.setenv("TUNEFORGE_ROOT", str(root))
    return load_params(root / "params.yaml")


@pytest.mark.parametrize("task", list(TASKS))
def test_a_task_of_each_kind_goes_through_every_stage(task, qwen2, tmp_path, monkeypatch):
    root = tmp_path / "project"
    params = project(root, task, qwen2, monkeypatch)
    spec = params.task(task)

    save_base_model(params.model, base_model_dir(), params.tasks)
    tokenizer = load_tokenizer(base_model_dir())
    output = spec.output.bind(tokenizer)

    result = prepare(spec, params.split, root)
    assert not result.rejected, result.rejected[:3]
    for name, keep in (("train", 16), ("validation", 4), ("test", 4)):
        result.splits[name] = result.splits[name][:keep]
    write_prepared(result, processed_dir(task), root / "data" / "quarantine" / f"{task}.jsonl")

    train = train_task(task, params)
    assert train["steps"] == 2

    train_records, test, validation = (read_jsonl(processed_dir(task) / f"{name}.jsonl")
                                       for name in ("train", "test", "validation"))
    evaluation = run_evaluation(spec, params.evaluate, params.train.max_seq_len, train_records, test, validation,
                                base_model_dir(), models_dir(task) / "adapter")
    summary = evaluation.summary()
    for metric in output.metric_functions():  # the kind's own metrics, for every model, with the headline's interval
        assert f"tuned_{metric}" in summary and f"baseline_{metric}" in summary
    assert f"tuned_{spec.primary_metric}_ci" in summary and summary["slices"]["input_length"]["groups"]
    assert evaluation.tuned_perplexity > 1
    if evaluation.constrained:  # decoded under the kind's grammar: only answers of the kind's shape come out
        cut = [o for o, n in zip(evaluation.tuned.outputs, evaluation.tuned.output_tokens) if n >= 24]
        assert all(not output.answer_problem(o) for o in evaluation.tuned.outputs if o not in cut)
    rows = evaluation.prediction_rows()
    assert [r["expected"] for r in rows] == [output.reference(r) for r in test]
    write_jsonl(predictions_file(task), rows)

    export_base_gguf(params, base_model_dir(), base_gguf_dir())
    export = run_export(task, params)
    assert [row["label"] for row in export.rows] == ["hf", "f16", "Q8_0", "adapter"]
    # export.max_rows for the merged files; the base + adapter file (not gated) answers the parity rows only
    assert {label: len(answers) for label, answers in export.outputs.items()} == {
        "f16": min(len(test), 3), "Q8_0": min(len(test), 3), "adapter": min(len(test), 2)}

    # Drift: the served answers (the Q8_0 file's) as traffic, against the evaluation's answers.
    reference = drift.traffic_frame([r["input"] for r in rows], [r["tuned_output"] for r in rows],
                                    [None] * len(rows), tokenizer, output)
    served = export.outputs["Q8_0"]
    current = drift.traffic_frame([r["input"] for r in rows[: len(served)]], served, [100.0] * len(served),
                                  tokenizer, output)
    outcome = drift.run_drift(reference, current, params.drift)
    assert set(current["output_valid"].dropna()) <= {"valid", "invalid"}
    assert outcome.snapshot is not None and isinstance(outcome.retrain, bool)  # Evidently judged the traffic


def test_a_tool_call_task_on_a_base_whose_template_cannot_render_tools_fails_at_base_model(tmp_path, monkeypatch):
    """The embedded SmolLM2's template ignores tools=: refused before any weights load, naming the task and a way out."""
    from tuneforge.core.params import ModelSpec

    monkeypatch.setenv("TUNEFORGE_ROOT", str(ROOT))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tasks"] = {"assistant": {**TASKS["assistant"][0], "source": "tests/data/tool_call_task/records.jsonl"}}
    params["train"]["task_overrides"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    tasks = load_params(tmp_path / "params.yaml").tasks
    with pytest.raises(ValueError, match=r"task assistant: the base model's chat template does not render tools="):
        save_base_model(ModelSpec(), tmp_path / "base", tasks)
    assert not (tmp_path / "base").exists()
