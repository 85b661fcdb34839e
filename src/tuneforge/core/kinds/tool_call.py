"""tool_call: the model either calls one of the task's tools (OpenAI function tools) or replies without a call.

Records are OpenAI chat records: the answer is the last assistant turn, either `tool_calls` (content empty) or a
plain reply, the right answer when no tool fits. Earlier turns may call tools and get their results (`tool`
messages); every assistant turn is trained on.

Answer strings (predictions, metrics, the request log) are canonical JSON, whatever the model's wire format:
`{"tool_calls": [{"name": ..., "arguments": {...}}]}` for a call (several entries for parallel calls) and
`{"content": "..."}` for a reply. Arguments are written with their keys in the order the grammar writes them.

Prompts and training render through the base model's own chat template with `tools=` (template_kwargs), so the
model learns the call syntax its template teaches; that syntax differs by family (Qwen2.5:
`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`, Llama 3.1: `{"name": ..., "parameters": ...}`).
`ToolCallFormat` reads it off the template by rendering a probe call, and from it parses generated text and builds
the grammar. So a kind must be bound to the tokenizer (`output.bind(tokenizer)`) before from_generation or
grammar.

The grammar: either the calls, each a JSON object naming a declared tool with arguments from llama.cpp's converter
of that tool's parameters schema, in the template's wire text; or a reply, any text whose first character is
neither blank nor the first character of a call. A reply therefore cannot open with "<" (Qwen2.5) or "{" (Llama
3.1): the price of letting one grammar choose between a call and a reply at the first token, without lookahead.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, PrivateAttr, model_validator

from tuneforge.core.chat import (PROBE_ARGUMENTS, PROBE_TOOL, assistant_turn, decoded_arguments, end_of_turn,
                                 function_call, probe_call, template_renders_tools)
from tuneforge.core.kinds.base import INVALID, OutputKind, prf, rate, ratio
from tuneforge.core.kinds.gbnf import gbnf_literal
from tuneforge.core.kinds.json_answers import dumps, strict_json
from tuneforge.core.kinds.json_schema import _canonical, pointer, ref_problem, schema_gbnf

NO_CALL = "(no call)"  # the tool choice of a reply without a call
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # OpenAI's limit is 64 characters
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
_NO_PARAMETERS = {"type": "object", "properties": {}}


def leaves(value: object, path: str = "") -> list[tuple[str, str]]:
    """(JSON pointer, the value as canonical JSON) for every scalar in value; an empty object or array is a leaf,
    so that a call without arguments still has one."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in leaves(v, f"{path}/{k}")]
    if isinstance(value, list) and value:
        return [leaf for i, v in enumerate(value) for leaf in leaves(v, f"{path}/{i}")]
    return [(path or "/", json.dumps(value, sort_keys=True))]


# --- grammar pieces ---

# A GBNF token: a string literal, a character class, a rule name, or any other character.
_GBNF_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[A-Za-z0-9-]+|\s+|.', re.S)


def renamed(grammar: str, prefix: str) -> str:
    """grammar with every rule name prefixed, so that several tools' grammars share one file without collisions
    (each converter names its top rule `root` and its helpers `string`, `space`, ...)."""
    names = {line.split("::=", 1)[0].strip() for line in grammar.splitlines() if "::=" in line}
    return "".join(prefix + t if t in names else t for t in _GBNF_TOKEN.findall(grammar))


def _literal(text: str) -> str:
    """text as a GBNF literal; "" for no text (an empty literal is no element)."""
    return gbnf_literal(text) if text else ""


def _class_char(c: str) -> str:
    return f"\\x{ord(c):02X}" if ord(c) < 0x100 else f"\\u{ord(c):04X}" if ord(c) < 0x10000 else f"\\U{ord(c):08X}"


# --- the template's wire format ---

def _skip(text: str, pos: int, literal: str) -> int:
    """The position after `literal` (surrounding blanks ignored) at pos, or -1 when it is not there (or pos is
    -1 already)."""
    if pos < 0:
        return -1
    while pos < len(text) and text[pos].isspace():
        pos += 1
    literal = literal.strip()
    return pos + len(literal) if text.startswith(literal, pos) else -1


def _object_at(text: str, wanted) -> tuple[int, int, dict] | None:
    """(start, end, value) of the first JSON object in text for which wanted(value) holds."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict) and wanted(value):
            return start, end, value
    return None


@dataclass(frozen=True)
class ToolCallFormat:
    """How a chat template writes an assistant turn's tool calls: each call is prefix + a JSON object + suffix,
    calls joined by separator (None: the template writes one call a turn); the object is head + name + between +
    arguments + tail (name_first), or with arguments first. The keys are the object's (Llama 3.1 writes the
    arguments under "parameters")."""

    prefix: str
    suffix: str
    separator: str | None
    head: str
    between: str
    tail: str
    name_first: bool
    name_key: str
    arguments_key: str

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ToolCallFormat:
        """Read off the tokenizer's chat template: the span it writes for a probe call, after the generation
        prompt and before the end of the turn; ValueError when the template does not write tools and calls."""
        if problem := template_renders_tools(tokenizer):
            raise ValueError(problem)
        eot = end_of_turn(tokenizer)

        def span(calls: list[dict]) -> str:
            messages = [{"role": "user", "content": "ping"},
                        {"role": "assistant", "content": "", "tool_calls": calls}]
            answer = assistant_turn(tokenizer, messages, eot, tools=[PROBE_TOOL])[1]
            return answer.removesuffix(eot)

        one = span([probe_call()])
        found = _object_at(one, lambda v: "__probe__" in v.values() and PROBE_ARGUMENTS in v.values())
        if found is None:
            raise ValueError(f"cannot find the JSON object of a tool call in what the chat template writes for one: "
                             f"{one!r}; a tool_call task needs a template that writes calls as JSON objects")
        start, end, call = found
        name_key = next(k for k, v in call.items() if v == "__probe__")
        arguments_key = next(k for k, v in call.items() if v == PROBE_ARGUMENTS)
        text = one[start:end]
        name_at = text.index(json.dumps("__probe__"))
        name_end = name_at + len(json.dumps("__probe__"))
        args_at, args_end, _ = _object_at(text, lambda v: v == PROBE_ARGUMENTS)
        if name_at < args_at:
            head, between, tail = text[:name_at], text[name_end:args_at], text[args_end:]
        else:
            head, between, tail = text[:args_at], text[args_end:name_at], text[name_end:]
        prefix, suffix = one[:start], one[end:]
        separator = None
        try:  # a template may refuse two calls in one turn (Llama 3.1 raises)
            two = span([probe_call(), probe_call({"__arg__": "__other__"})])
        except Exception:  # noqa: BLE001 (jinja raises whatever the template's author chose)
            two = ""
        first = prefix + text + suffix
        second = prefix + text.replace('"__value__"', '"__other__"') + suffix
        if two.startswith(first) and two.endswith(second) and len(two) >= len(first) + len(second):
            separator = two[len(first): len(two) - len(second)]
        return cls(prefix, suffix, separator, head, between, tail, name_at < args_at, name_key, arguments_key)

    @property
    def opening(self) -> str:
        """What a call's text starts with, blanks aside."""
        return self.prefix.strip() or "{"

    def parse(self, text: str) -> str:
        """The answer string of generated text: canonical JSON of its calls, {"content": text} when the text does
        not open as a call, or the text itself when it opens as one but is not (an invalid answer, kept as
        written for the request log). Blanks around the pieces, arguments written as JSON text and a missing
        suffix after the last call are forgiven: the grammar allows none of them, free generation may."""
        body = text.strip()
        if not body.startswith(self.opening):
            return dumps({"content": body})
        calls, pos, decoder = [], 0, json.JSONDecoder()
        while not calls or body[pos:].strip():
            if calls and self.separator is None:
                return text
            pos = _skip(body, _skip(body, pos, self.separator) if calls else pos, self.prefix)
            call = None
            if pos >= 0:
                try:
                    call, pos = decoder.raw_decode(body, _skip(body, pos, ""))
                except ValueError:
                    pass
            if not (isinstance(call, dict) and isinstance(call.get(self.name_key), str)
                    and self.arguments_key in call):
                return text
            calls.append({"name": call[self.name_key], "arguments": decoded_arguments(call[self.arguments_key])})
            if not body[pos:].strip():  # a last call without its suffix: cut off, or a model that drops it
                break
            pos = _skip(body, pos, self.suffix)
            if pos < 0:
                return text
        return dumps({"tool_calls": calls})

    def grammar(self, tools: list[dict]) -> str:
        """GBNF: the calls (each naming a declared tool, its arguments as that tool's schema allows) in this wire
        format, or a reply that does not open like a call."""
        rules, alternatives = [], []
        for i, tool in enumerate(tools):
            function = tool["function"]
            name, arguments = gbnf_literal(json.dumps(function["name"])), f"t{i}-root"
            first, second = (name, arguments) if self.name_first else (arguments, name)
            pieces = [_literal(self.head), first, _literal(self.between), second, _literal(self.tail)]
            rules.append(f"tc-tool{i} ::= " + " ".join(filter(None, pieces)))
            rules.append(renamed(schema_gbnf(function.get("parameters") or _NO_PARAMETERS), f"t{i}-").strip())
            alternatives.append(f"tc-tool{i}")
        call = " ".join(filter(None, [_literal(self.prefix), "( " + " | ".join(alternatives) + " )",
                                      _literal(self.suffix)]))
        calls = "tc-call" if self.separator is None else \
            "tc-call ( " + " ".join(filter(None, [_literal(self.separator), "tc-call"])) + " )*"
        first = _class_char(self.opening[0])
        return "\n".join([
            "root ::= tc-calls | tc-reply",
            f"tc-calls ::= {calls}",
            f"tc-call ::= {call}",
            f"tc-reply ::= [^{first}\\x00-\\x20\\x7F] [^\\x00]*",
            *rules,
        ]) + "\n"


# --- the kind ---

def _tool_problem(i: int, tool: object) -> str:
    """Why output.tools[i] is not an OpenAI function tool this kind can use, or ''."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    where = f"output.tools[{i}]"
    if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)):
        return (f'{where} must be {{"type": "function", "function": {{"name": ..., "description": ..., '
                '"parameters": <JSON Schema>}} (OpenAI\'s function-tool format)')
    if extra := sorted(set(tool) - {"type", "function"}):
        return f"{where} has unknown key(s) {extra}: a tool holds only type and function"
    function = tool["function"]
    if extra := sorted(set(function) - _FUNCTION_KEYS):
        return f"{where}.function has unknown key(s) {extra} (allowed: {sorted(_FUNCTION_KEYS)})"
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return (f"{where}.function.name {name!r} is not a tool name: letters, digits and underscores, not starting "
                "with a digit, at most 64 characters")
    if not isinstance(function.get("description", ""), str):
        return f"{where}.function.description must be a string"
    if "parameters" not in function:
        return ""
    parameters = function["parameters"]
    if not isinstance(parameters, dict):
        return f"{where}.function.parameters must be a JSON Schema (an object)"
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError as err:
        return f"{where}.function.parameters at {pointer(err.path) or '/'}: {err.message}"
    if problem := ref_problem(parameters):
        return f"{where}.function.parameters {problem}"
    if parameters.get("type") != "object":
        return f'{where}.function.parameters must describe an object ("type": "object"): the arguments are one'
    return ""


class ToolCallOutput(OutputKind):
    kind: Literal["tool_call"]
    tools: list[dict] = Field(description="the tools the model may call, in OpenAI's function-tool format: "
                              '{"type": "function", "function": {"name", "description", '
                              '"parameters": <JSON Schema>}}')

    _validators: dict = PrivateAttr(default_factory=dict)  # tool name -> its arguments' validator
    _format: ToolCallFormat | None = PrivateAttr(None)     # set by bind()
    _grammar: str | None = PrivateAttr(None)

    plain_metric: ClassVar[str] = "exact_match"
    plain_sentence: ClassVar[str] = ("gets {share} of the {n} test inputs exactly right (the right tool with the "
                                     "right arguments, or no call where none is needed)")
    answer_noun: ClassVar[str] = "tool call"
    baseline_name: ClassVar[str] = ("TF-IDF + logistic regression picks the tool (or no call); the nearest training "
                                    "input with that choice gives the arguments")
    binds_to_template: ClassVar[bool] = True
    METRICS: ClassVar = {
        "exact_match": rate("exact"),
        "tool_accuracy": rate("tool_right"),
        "arguments_exact": lambda t: ratio(t["arguments_exact"], t["tool_right_call"]),
        "arguments_f1": lambda t: ratio(2 * t["tp"], t["predicted"] + t["expected"]),
        "valid_call": lambda t: ratio(t["valid_call"], t["call_needed"]),
        "no_call_accuracy": lambda t: ratio(t["no_call_right"], t["no_call_needed"]),
    }

    @model_validator(mode="after")
    def _check_tools(self) -> ToolCallOutput:
        from jsonschema import Draft202012Validator

        if not self.tools:
            raise ValueError("output.kind tool_call needs a non-empty output.tools list")
        seen: dict[str, int] = {}
        for i, tool in enumerate(self.tools):
            if problem := _tool_problem(i, tool):
                raise ValueError(problem)
            name = tool["function"]["name"]
            if name in seen:
                raise ValueError(f"output.tools[{i}].function.name {name!r} is output.tools[{seen[name]}]'s too: "
                                 "tool names must be unique")
            seen[name] = i
            parameters = tool["function"].get("parameters") or _NO_PARAMETERS
            if self.constrained:
                try:
                    schema_gbnf(parameters)
                except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as err:
                    raise ValueError(f"output.tools[{i}].function.parameters: llama.cpp's JSON Schema converter, "
                                     f"which makes the constrained-decoding grammar, cannot handle it: "
                                     f"{err or type(err).__name__} (or set output.constrained: false)") from None
            self._validators[name] = Draft202012Validator(parameters)
        return self

    # --- binding to the model's chat template ---

    def bind(self, tokenizer) -> ToolCallOutput:
        """This kind with the wire format the tokenizer's chat template writes calls in; ValueError when the
        template does not render tools."""
        bound = self.model_copy()
        bound._format, bound._grammar = ToolCallFormat.from_tokenizer(tokenizer), None
        return bound

    @property
    def wire(self) -> ToolCallFormat:
        if self._format is None:
            raise RuntimeError("output kind tool_call is not bound to a tokenizer: call output.bind(tokenizer) "
                               "first (how a call is written comes from the base model's chat template)")
        return self._format

    def template_kwargs(self) -> dict:
        return {"tools": self.tools}

    def from_generation(self, text: str) -> str:
        answer = self.wire.parse(text)
        return self.canonical_answer(answer) if not self.answer_problem(answer) else answer

    def to_message(self, answer: str) -> dict:
        """A call as OpenAI's API writes one: content null, each call with an id and its arguments as JSON text
        (keys in the answer's order); a reply as content. An answer that breaks the contract goes back as
        content, the text the request log holds."""
        obj, _ = strict_json(answer)
        if isinstance(obj, dict) and set(obj) == {"content"} and isinstance(obj["content"], str):
            return {"role": "assistant", "content": obj["content"]}
        if self.answer_problem(answer):
            return {"role": "assistant", "content": answer}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
            for i, call in enumerate(obj["tool_calls"])]}

    def grammar(self, input_text: str) -> str | None:
        if self._grammar is None:
            self._grammar = self.wire.grammar(self.tools)
        return self._grammar

    def describe(self) -> str:
        names = "`, `".join(t["function"]["name"] for t in self.tools)
        return (f"a call to one of the tools `{names}` (arguments as the tool's JSON Schema says), or a plain reply "
                "where no tool fits.")

    # --- records ---

    def answers(self, messages: list[dict]) -> list[str]:
        """Each assistant turn as an answer string. Lenient: a turn holding both a reply and calls, or arguments
        that are not JSON, gives an answer that answer_problem names."""
        out = []
        for m in messages:
            if m["role"] != "assistant":
                continue
            if not m.get("tool_calls"):
                out.append(dumps({"content": m["content"]}))
                continue
            calls = [function_call(call) or {"name": None, "arguments": None} for call in m["tool_calls"]]
            out.append(dumps({"content": m["content"], "tool_calls": calls} if m["content"]
                             else {"tool_calls": calls}))
        return out

    def reference(self, record: dict) -> str:
        return self.answers(record["messages"])[-1]

    def canonical_messages(self, messages: list[dict]) -> list[dict]:
        """Assistant turns as the template is given them: a reply alone, or calls with their arguments as objects
        (templates write them with tojson) in canonical key order, content empty; call ids are kept."""
        answers = iter(self.answers(messages))
        out = []
        for m in messages:
            if m["role"] != "assistant":
                out.append(m)
                continue
            answer = json.loads(self.canonical_answer(next(answers)))
            if "content" in answer:
                out.append({"role": "assistant", "content": answer["content"]})
                continue
            calls = []
            for original, call in zip(m["tool_calls"], answer["tool_calls"], strict=True):
                ids = {"id": original["id"]} if "id" in original else {}
                calls.append({"type": "function", **ids,
                              "function": {"name": call["name"], "arguments": call["arguments"]}})
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        return out

    # --- the answer contract ---

    def _check(self, answer: str) -> tuple[str, str]:
        """(error kind, why the answer breaks the contract), or ("", "")."""
        from jsonschema.exceptions import best_match

        obj, problem = strict_json(answer)
        if problem:
            return "invalid call", problem
        if isinstance(obj, dict) and set(obj) == {"content", "tool_calls"}:
            return "invalid call", "an assistant turn both replies and calls tools: a turn is either (content empty)"
        if not (isinstance(obj, dict) and len(obj) == 1 and set(obj) <= {"content", "tool_calls"}):
            return "invalid call", 'answer must be {"tool_calls": [...]} or {"content": "..."}'
        if "content" in obj:
            if not isinstance(obj["content"], str):
                return "invalid call", "the reply (content) must be a string"
            return ("empty output", "the reply without a call is empty") if not obj["content"].strip() else ("", "")
        calls = obj["tool_calls"]
        if not isinstance(calls, list) or not calls:
            return "invalid call", "tool_calls must be a non-empty list"
        for j, call in enumerate(calls, start=1):
            if not (isinstance(call, dict) and set(call) == {"name", "arguments"} and isinstance(call["name"], str)):
                return "invalid call", f'call {j} must be {{"name": <tool name>, "arguments": {{...}}}}'
            name = call["name"]
            if name not in self._validators:
                return ("undeclared tool",
                        f"call {j} names {name!r}, not a tool of output.tools ({list(self._validators)})")
            if not isinstance(call["arguments"], dict):
                return "invalid call", f"call {j} ({name}): arguments must be a JSON object"
            error = best_match(self._validators[name].iter_errors(call["arguments"]))
            if error is not None:
                return ("arguments break the schema",
                        f"call {j} ({name}): arguments at {pointer(error.absolute_path) or '/'}: {error.message}")
        return "", ""

    def answer_problem(self, answer: str) -> str:
        return self._check(answer)[1]

    def canonical_answer(self, answer: str) -> str:
        """Arguments in the grammar's form (keys in the order llama.cpp's converter writes them, whole numbers
        of integer properties as integers), as json_schema writes its answers."""
        obj = json.loads(answer)
        if "tool_calls" in obj:
            obj = {"tool_calls": [{"name": c["name"], "arguments": self._canonical_arguments(c)}
                                  for c in obj["tool_calls"]]}
        return dumps(obj)

    def _canonical_arguments(self, call: dict) -> object:
        validator = self._validators[call["name"]]
        return _canonical(call["arguments"], validator.schema, validator.schema, validator)

    def _calls(self, answer: str) -> list[dict] | None:
        """The answer's calls ([] for a reply), or None when it breaks the contract."""
        if self._check(answer)[0]:
            return None
        return json.loads(answer).get("tool_calls", [])

    def _reference_calls(self, reference: str) -> list[dict]:
        # prepare validates references, so a bad one here is a caller bug: fail loudly rather than score 0.
        calls = self._calls(reference)
        if calls is None:
            raise ValueError(f"reference is not a valid tool_call answer: {reference!r} "
                             f"({self.answer_problem(reference)})")
        return calls

    def category(self, answer: str) -> str:
        """The tools called ("+"-joined), NO_CALL for a reply, INVALID when the answer breaks the contract."""
        calls = self._calls(answer)
        return INVALID if calls is None else "+".join(sorted({c["name"] for c in calls})) or NO_CALL

    def answer_schema(self) -> dict:
        call = {"oneOf": [{"type": "object",
                           "properties": {"name": {"const": t["function"]["name"]},
                                          "arguments": t["function"].get("parameters") or _NO_PARAMETERS},
                           "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]}
        return {"oneOf": [
            {"type": "object", "properties": {"tool_calls": {"type": "array", "minItems": 1, "items": call}},
             "required": ["tool_calls"], "additionalProperties": False},
            {"type": "object", "properties": {"content": {"type": "string", "minLength": 1}},
             "required": ["content"], "additionalProperties": False},
        ]}

    # --- scoring ---

    @staticmethod
    def _choice(calls: list[dict]) -> tuple[str, ...]:
        return tuple(sorted(c["name"] for c in calls))

    @staticmethod
    def _same_calls(a: list[dict], b: list[dict]) -> bool:
        def key(calls):
            return sorted((c["name"], json.dumps(c["arguments"], sort_keys=True)) for c in calls)
        return key(a) == key(b)

    @staticmethod
    def _leaves(calls: list[dict]) -> Counter:
        return Counter((c["name"], *leaf) for c in calls for leaf in leaves(c["arguments"]))

    def row_counts(self, inputs, references, outputs) -> dict[str, np.ndarray]:
        """An answer that breaks the contract chooses no tool and predicts no argument. Argument leaves carry
        their tool's name, so a wrong tool's arguments are all false positives; the order of parallel calls
        does not matter."""
        names = ("exact", "tool_right", "call_needed", "tool_right_call", "arguments_exact", "valid_call",
                 "no_call_needed", "no_call_right", "tp", "predicted", "expected")
        counts: dict[str, list] = {n: [] for n in names}
        for prediction, reference in zip(outputs, references, strict=True):
            ref, pred = self._reference_calls(reference), self._calls(prediction)
            right = pred is not None and self._choice(pred) == self._choice(ref)
            same = right and self._same_calls(pred, ref)
            ref_leaves, pred_leaves = self._leaves(ref), self._leaves(pred or [])
            counts["exact"].append(same)
            counts["tool_right"].append(right)
            counts["call_needed"].append(bool(ref))
            counts["tool_right_call"].append(right and bool(ref))
            counts["arguments_exact"].append(same and bool(ref))
            counts["valid_call"].append(bool(ref) and bool(pred))
            counts["no_call_needed"].append(not ref)
            counts["no_call_right"].append(not ref and right)
            counts["tp"].append(sum((ref_leaves & pred_leaves).values()))
            counts["predicted"].append(sum(pred_leaves.values()))
            counts["expected"].append(sum(ref_leaves.values()))
        return {name: np.asarray(v, dtype=np.int64) for name, v in counts.items()}

    def details(self, inputs, references, outputs) -> dict:
        """per_tool {tool or NO_CALL: precision, recall, f1, support}: how often each choice is made when it
        should be (support: references making it)."""
        tp: Counter[str] = Counter()
        predicted: Counter[str] = Counter()
        expected: Counter[str] = Counter()
        for prediction, reference in zip(outputs, references, strict=True):
            ref, pred = self._reference_calls(reference), self._calls(prediction)
            ref_choice = Counter(self._choice(ref) or (NO_CALL,))
            pred_choice = Counter() if pred is None else Counter(self._choice(pred) or (NO_CALL,))
            expected.update(ref_choice)
            predicted.update(pred_choice)
            tp.update(ref_choice & pred_choice)
        per_tool = {}
        for name in [t["function"]["name"] for t in self.tools] + [NO_CALL]:
            p, r, f = prf(tp[name], predicted[name], expected[name])
            per_tool[name] = {"precision": p, "recall": r, "f1": f, "support": expected[name]}
        return {"per_tool": per_tool}

    def example_score(self, prediction: str, reference: str, input_text: str) -> float:
        """1 for the right call (or rightly none); with the right tool, the F1 of the argument leaves; else 0."""
        ref, pred = self._reference_calls(reference), self._calls(prediction)
        if pred is None or self._choice(pred) != self._choice(ref):
            return 0.0
        if self._same_calls(pred, ref):
            return 1.0
        ref_leaves, pred_leaves = self._leaves(ref), self._leaves(pred)
        return prf(sum((ref_leaves & pred_leaves).values()), sum(pred_leaves.values()), sum(ref_leaves.values()))[2]

    def error_kind(self, prediction: str, reference: str, input_text: str) -> str:
        """Contract failures first (empty, not a call, an undeclared tool, arguments off the schema), then the
        choice (a call where none was needed, none where one was, the wrong tool), then the arguments."""
        if not prediction.strip():
            return "empty output"
        kind, _ = self._check(prediction)
        if kind:
            return kind
        ref, pred = self._reference_calls(reference), json.loads(prediction).get("tool_calls", [])
        if not ref:
            return "called when no call was needed" if pred else "ok"
        if not pred:
            return "no call when one was needed"
        if self._choice(pred) != self._choice(ref):
            return "wrong tool"
        return "ok" if self._same_calls(pred, ref) else "wrong arguments"

    def answer_balance(self, answers: Sequence[str]) -> Counter:
        """Calls of each tool, and replies without a call."""
        counts: Counter[str] = Counter()
        for answer in answers:
            calls = json.loads(answer).get("tool_calls", [])
            counts.update([c["name"] for c in calls] or [NO_CALL])
        return counts

    # --- the classical baseline ---

    def baseline(self, train: list[dict], test: list[dict], seed: int = 0) -> list[str]:
        """TF-IDF over word 1-2-grams and character 2-5-grams; logistic regression picks the tool choice (the
        tools called, or no call); the answer is that of the most similar training input with that choice, whose
        arguments are then at least of the right tool."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_union

        references = [self.reference(r) for r in train]
        choices = [self.category(a) for a in references]
        features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                              TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))
        X_train = features.fit_transform([self.input_text(r) for r in train])
        X_test = features.transform([self.input_text(r) for r in test])
        if len(set(choices)) > 1:
            model = LogisticRegression(C=10, max_iter=2000, random_state=seed)  # C=10: TF-IDF features are small
            predicted = model.fit(X_train, choices).predict(X_test)
        else:
            predicted = choices[:1] * len(test)
        similarity = (X_test @ X_train.T).toarray()
        choices_array = np.asarray(choices)
        outputs = []
        for row, choice in zip(similarity, predicted, strict=True):
            row = np.where(choices_array == choice, row, -np.inf)
            outputs.append(references[int(np.argmax(row))])
        return outputs
