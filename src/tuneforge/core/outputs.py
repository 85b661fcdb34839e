"""The output-kind contract, in one place: how an answer is parsed, validated and categorised.

A valid answer is what `answer_problem` accepts, the one definition that prepare (training data), evaluation and
export (the `valid_answer` rate) and drift (valid answers in served traffic) share, and what each kind's grammar
produces: json_object, a non-empty JSON object over the task's allowed keys with string values; label, exactly one
of the task's labels. Scoring parses leniently on top of that (a ```json fence, a label in surrounding blanks) so a
freely decoding model's content still counts; validity does not.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tuneforge.core.params import OutputSpec


KINDS = ("json_object", "label")
INVALID = "(invalid)"
# Chat models often wrap JSON in a markdown fence; the language tag is optional and its case varies.
_FENCE = re.compile(r"^```(?i:json)?\s*(.*?)\s*```$", re.S)


def decode_json(text: str) -> object:
    """The JSON value of an answer, unwrapping a ```json fence; ValueError when it does not parse."""
    text = text.strip()
    if m := _FENCE.match(text):
        text = m.group(1)
    try:
        return json.loads(text)  # JSONDecodeError is a ValueError
    except RecursionError as e:  # a degenerate "[[[[..." generation nests past the decoder's limit
        raise ValueError("JSON nested too deeply") from e


def parse_object(text: str) -> dict | None:
    """The answer as a dict, tolerating a ```json fence; None when it is not a JSON object."""
    try:
        obj = decode_json(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def answer_problem(answer: str, output: OutputSpec) -> str:
    """Why an answer does not fit the task's output kind, or '' when it does."""
    if output.kind == "label":
        return "" if answer in output.labels else f"unknown label {answer!r} (allowed: {output.labels})"
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError:
        return "answer is not valid JSON"
    except RecursionError:
        return "answer is JSON nested too deeply for the parser (Python's recursion limit)"
    except ValueError as err:  # int("1" * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        return f"answer holds an unreadable JSON number: {err}"
    if not isinstance(obj, dict) or not obj:
        return "answer is not a non-empty JSON object"
    extra = sorted(set(obj) - set(output.allowed_keys))
    if extra:
        return f"answer uses keys outside output.allowed_keys: {extra}"
    if not all(isinstance(v, str) for v in obj.values()):
        return "answer values must be strings"
    return ""


def canonical_answer(answer: str, output: OutputSpec) -> str:
    """A valid answer (answer_problem is '') in the one form decoding produces, so training teaches that form.

    The json_object grammar (constraints.grammar_for) allows no whitespace around the object and a raw character
    anywhere in a string but DEL: json.dumps' default form, as the readers write it. An answer wrapped in blanks or
    newlines would teach the model text that constrained decoding can never emit."""
    if output.kind == "label":
        return answer
    return json.dumps(json.loads(answer), ensure_ascii=False).replace("\x7f", "\\u007f")


def prediction_category(output: str, spec: OutputSpec) -> str:
    """The label, or for JSON answers the set of keys used ("(invalid)" when it does not parse)."""
    if spec.kind == "label":
        return output.strip() if output.strip() in spec.labels else INVALID
    obj = parse_object(output)
    return "+".join(sorted(obj)) if obj is not None else INVALID
