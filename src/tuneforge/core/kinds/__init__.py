"""The output kinds: one module a kind (base.py says what each implements), registered here.

`OutputSpec` is a task's `output:` block: pydantic picks the kind's class by its `kind` field, so a task's spec
*is* its kind and stages call `task.output.answer_problem(...)`, `.grammar(...)`, `.score(...)` without branching
on the name. tests/test_kinds.py walks KINDS and runs every kind through the same checks.
"""

from __future__ import annotations

from typing import Annotated, Union, get_args

from pydantic import Field, TypeAdapter

from tuneforge.core.kinds.base import INVALID, OutputKind
from tuneforge.core.kinds.chat import ChatOutput
from tuneforge.core.kinds.json_object import JsonObjectOutput
from tuneforge.core.kinds.json_schema import JsonSchemaOutput
from tuneforge.core.kinds.label import LabelOutput
from tuneforge.core.kinds.text import TextOutput
from tuneforge.core.kinds.tool_call import ToolCallOutput

_CLASSES = (LabelOutput, JsonObjectOutput, JsonSchemaOutput, TextOutput, ChatOutput, ToolCallOutput)

KINDS: dict[str, type[OutputKind]] = {get_args(cls.model_fields["kind"].annotation)[0]: cls for cls in _CLASSES}

OutputSpec = Annotated[Union[_CLASSES], Field(discriminator="kind")]  # noqa: UP007 (a tuple of classes)

__all__ = ["INVALID", "KINDS", "OutputKind", "OutputSpec", "output_spec"]


def output_spec(**fields) -> OutputKind:
    """An output block from its fields, as params.yaml's `output:` is read: the kind's class, validated."""
    return TypeAdapter(OutputSpec).validate_python(fields)
