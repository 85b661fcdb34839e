"""params.yaml's checks (issue 26, D18-D20) and the models' defaults agreeing with params.yaml (issue 28)."""

import re
import typing
from pathlib import Path

import pytest
import yaml

from tuneforge.core.params import (
    LLAMA_QUANTIZATION_TYPES,
    RESERVED_TASK_NAMES,
    TASK_NAME,
    Params,
    ParamsError,
    load_params,
    load_params_text,
)


def load_with(repo_root: Path, **sections) -> Params:
    """The shipped params.yaml with some settings replaced: {section: {key: value}} merged one level deep."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    for section, settings in sections.items():
        raw[section] = {**(raw.get(section) or {}), **settings}
    return load_params_text(yaml.safe_dump(raw, sort_keys=False), Path("params.yaml"))


def spam_task(**output) -> dict:
    return {"source": "data/raw/sms_spam/sms-spam.csv", "reader": "sms_spam_lines", "primary_metric": "macro_f1",
            "output": {"kind": "label", "labels": ["spam", "ham"], **output}}


def test_the_shipped_params_yaml_loads(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert set(params.tasks) == {"address_json", "sms_spam", "email_subject"}


# D18: a label the model can never write exactly, or one a reader cannot tell from another, scores nothing.
@pytest.mark.parametrize("labels, named", [
    ([" spam", "ham"], "' spam'"),
    (["spam", "ham\n"], r"'ham\\n'"),
    (["sp\u200bam", "ham"], r"U\+200B"),  # zero-width space
    (["spam\u2060", "ham"], r"U\+2060"),  # word joiner
    (["sp\x07am", "ham"], r"U\+0007"),
    (["ｓｐａｍ", "ham"], "'ｓｐａｍ'"),  # fullwidth
    (["spam", "ha\u00a0m"], r"'ha\\xa0m'"),  # no-break space
    (["ﬁsh", "ham"], "'ﬁsh'"),  # a ligature
    (["spam", "Spam"], "'spam' and 'Spam'"),
    (["Straße", "STRASSE"], "'Straße' and 'STRASSE'"),
])
def test_labels_that_hide_characters_or_look_alike_are_refused(repo_root, labels, named):
    with pytest.raises(ParamsError, match=rf"tasks\.spam\.output.*{named}"):
        load_with(repo_root, tasks={"spam": spam_task(labels=labels)})


def test_json_keys_follow_the_labels_rules(repo_root):
    task = {**spam_task(), "primary_metric": "micro_f1",
            "output": {"kind": "json_object", "allowed_keys": ["Name", "ZipCode "]}}
    with pytest.raises(ParamsError, match=r"tasks\.keys\.output\.allowed_keys.*'ZipCode '"):
        load_with(repo_root, tasks={"keys": task})


def test_labels_in_any_script_still_load(repo_root):
    params = load_with(repo_root, tasks={"t": spam_task(labels=["спам", "не спам", "スパム"])})
    assert params.task("t").output.labels == ["спам", "не спам", "スパム"]


# D19: a task named like a folder another stage writes makes DVC refuse the whole pipeline.
@pytest.mark.parametrize("name", ["base", "base_gguf", "model_cards", "Base"])
def test_task_names_of_the_pipelines_own_folders_are_refused(repo_root, name):
    with pytest.raises(ParamsError, match=rf"task name '{name}' .*(models/base|reports/model_cards)"):
        load_with(repo_root, tasks={name: spam_task()})


def test_reserved_task_names_are_the_folders_dvc_yaml_writes_beside_a_tasks(repo_root):
    """Every output dvc.yaml names beside a per-task folder (models/base beside models/${key}) is reserved,
    and nothing else is."""
    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    per_task_parents, fixed = set(), set()
    for stage in stages.values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                if "${key}" in path:
                    per_task_parents.add(path.split("${key}")[0].rstrip("/"))
                else:
                    fixed.add(path)
    beside_tasks = {Path(p).name for p in fixed if str(Path(p).parent) in per_task_parents}
    assert {name for name in beside_tasks if TASK_NAME.fullmatch(name)} == set(RESERVED_TASK_NAMES)


# D20: settings that cannot mean anything fail when params.yaml loads, not hours later.
@pytest.mark.parametrize("sections, where", [
    ({"train": {"learning_rate": float("inf")}}, r"train\.learning_rate: Input should be a finite number"),
    ({"train": {"weight_decay": float("inf")}}, r"train\.weight_decay: Input should be a finite number"),
    ({"train": {"epochs": float("inf")}}, r"train\.epochs: Input should be a finite number"),
    ({"train": {"task_overrides": {"sms_spam": {"epochs": float("inf")}}}},
     r"train\.task_overrides\.sms_spam\.epochs: Input should be a finite number"),
    ({"drift": {"max_latency_p95_ms": float("inf")}}, r"drift\.max_latency_p95_ms: Input should be a finite number"),
    ({"train": {"seed": 2**32}}, r"train\.seed: Input should be less than or equal to 4294967295"),
    ({"split": {"seed": -1}}, r"split\.seed: Input should be greater than or equal to 0"),
    ({"train": {"lora": {"r": 1_000_000}}}, r"train\.lora\.r: Input should be less than or equal to 1024"),
    ({"export": {"quantizations": [], "gate_quantization": "smallest"}},
     r"export\.quantizations: List should have at least 1 item"),
    ({"export": {"quantizations": ["Q8_0", "Q9_9"]}}, r"export\.quantizations\.1: .*'Q9_9' is not a type llama\.cpp"),
    ({"export": {"quantizations": ["q8_0"], "gate_quantization": "smallest"}}, r"export\.quantizations\.0: .*'q8_0'"),
    ({"export": {"quantizations": ["Q8_0", "Q8_0"]}}, r"export: .*quantizations lists \['Q8_0'\] more than once"),
    ({"export": {"base_quantization": "Q9_9"}}, r"export\.base_quantization: .*'Q9_9' is not a type llama\.cpp"),
    ({"tasks": {"csv": {**spam_task(), "reader": "csv", "columns": {"input": "text", "output": "text"}}}},
     r"tasks\.csv: .*columns\.input and columns\.output both name 'text'"),
])
def test_absurd_settings_are_refused_by_name(repo_root, sections, where):
    with pytest.raises(ParamsError, match=where):
        load_with(repo_root, **sections)


def test_known_quantization_types_are_llama_cpps():
    """The list params checks against is the one the pinned llama-cpp-python's quantizer takes (quantize.py looks
    each type up as LLAMA_FTYPE_MOSTLY_<type>): bumping llama-cpp-python fails here until the list follows."""
    llama_cpp = pytest.importorskip("llama_cpp")
    known = {n.removeprefix("LLAMA_FTYPE_MOSTLY_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")}
    assert LLAMA_QUANTIZATION_TYPES == known


# Issue 28: params.yaml is the recipe; a line deleted from it must not change what runs.
NOT_DEFAULTS = {  # settings params.yaml sets that the models rightly do not default to
    "tasks": "the project's own tasks",
    "train.task_overrides": "per-task settings, naming the project's tasks",
    "sweep.targets": "stages of the project's own tasks",
}


def model_of(annotation):
    """The pydantic model a field holds (SweepSpec for `SweepSpec | None`), or None for a plain value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
            return candidate
    return None


def settings_against_defaults(model, node: dict, prefix: str = ""):
    """(dotted name, params.yaml's value, the model's default) for every value params.yaml sets."""
    for key, value in node.items():
        name, field = f"{prefix}{key}", model.model_fields[key]
        if name in NOT_DEFAULTS:
            continue
        inner = model_of(field.annotation)
        if inner is not None and isinstance(value, dict):
            yield from settings_against_defaults(inner, value, name + ".")
        elif not field.is_required():
            default = field.get_default(call_default_factory=True)
            yield name, value, default.model_dump() if hasattr(default, "model_dump") else default


def test_params_yaml_sets_what_the_models_default_to(repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    compared = list(settings_against_defaults(Params, raw))
    differ = [f"{name}: params.yaml {value!r}, model {default!r}" for name, value, default in compared
              if value != default]
    assert not differ, "the pydantic models' defaults differ from params.yaml:\n" + "\n".join(differ)
    assert len(compared) > 50  # the walk reached every section's settings
    assert not re.search(r"\btasks\.", " ".join(name for name, _, _ in compared))


# D21: a source outside the repository is refused when params.yaml loads, before any line of it is read.
@pytest.mark.parametrize("source", ["../../etc/passwd", "/proc/self/environ", "data/raw/../../../secret.csv",
                                    "C:\\Users\\x\\data.csv"])
@pytest.mark.parametrize("field", ["source", "production_source"])
def test_sources_outside_the_repository_are_refused_by_name(repo_root, field, source):
    with pytest.raises(ParamsError, match=rf"tasks\.sms_spam\.{field}.*inside the repository"):
        load_with(repo_root, tasks={"sms_spam": {**spam_task(), field: source}})
