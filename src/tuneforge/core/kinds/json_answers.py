"""Reading answers that are JSON, shared by the JSON kinds (json_object, json_schema, tool_call)."""

from __future__ import annotations

import json
import re

# Chat models often wrap JSON in a markdown fence; the language tag is optional and its case varies.
_FENCE = re.compile(r"^```(?i:json)?\s*(.*?)\s*```$", re.S)


def decode_json(text: str) -> object:
    """The JSON value of an answer, unwrapping a ```json fence; ValueError when it does not parse. Lenient: for
    scoring, so that a freely decoding model's content still counts (validity is strict_json)."""
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


def strict_json(answer: str) -> tuple[object, str]:
    """(the answer's JSON value, "") or (None, why it is not JSON): no fence, no leniency."""
    try:
        return json.loads(answer), ""
    except json.JSONDecodeError:
        return None, "answer is not valid JSON"
    except RecursionError:
        return None, "answer is JSON nested too deeply for the parser (Python's recursion limit)"
    except ValueError as err:  # int("1" * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        return None, f"answer holds an unreadable JSON number: {err}"


def repeated_keys(answer: str) -> list[str]:
    """Keys an object in the answer gives twice: json.loads keeps the last, the model would be trained on both."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in items]
        repeated.extend(sorted({k for k in keys if keys.count(k) > 1}))
        return dict(items)

    json.loads(answer, object_pairs_hook=pairs)
    return repeated


def dumps(value: object) -> str:
    """The one JSON form constrained decoding produces: json.dumps' default separators, raw non-ASCII, DEL escaped
    (the grammars allow any raw character in a string but DEL)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
