"""params.yaml loads, and the models' defaults agree with it (issue 28)."""

import re
import typing

import yaml

from tuneforge.core.params import Params, load_params


def test_the_shipped_params_yaml_loads(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert set(params.tasks) == {"address_json", "sms_spam"}


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
