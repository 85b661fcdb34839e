"""json_schema: a JSON answer valid under the task's JSON Schema (nested objects, arrays, numbers, enums, ...).

The schema comes inline (output.schema) or from a file in the repository (output.schema_file). Constrained
decoding uses the grammar llama.cpp's own converter makes from it (llama_cpp.llama_grammar.SchemaConverter), so
that evaluation (llguidance, fed the same GBNF) and `tuneforge serve` (llama.cpp) decode under one grammar. That
grammar writes each object's properties in a fixed order, required ones first, each group in schema order; the
canonical answer is written in that order, or training would teach an order decoding never emits. What the
converter gets wrong for JSON as json.dumps writes and json.loads reads it is fixed in `schema_gbnf`; whatever else
the grammar and the schema disagree on (an object the converter closes where the schema leaves it open, a
17-digit integer) is checked, not assumed: when decoding is constrained, a training answer is refused unless its
canonical form passes the grammar.

Scoring flattens an answer into (JSON pointer, value) leaves, array indices included, and compares those.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import PurePosixPath
from typing import ClassVar, Literal

import numpy as np
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from tuneforge.core.kinds.base import INVALID, OutputKind, prf, rate, ratio
from tuneforge.core.kinds.gbnf import gbnf_literal
from tuneforge.core.kinds.json_answers import decode_json, dumps, repeated_keys, strict_json
from tuneforge.core.kinds.json_object import in_input
from tuneforge.core.paths import repo_root

JsonPath = tuple[str | int, ...]  # a location in a JSON value: object keys (str) and array indices (int)

_UNPARSABLE = object()  # what _lenient gives for text holding no JSON (None is JSON's null)


# --- JSON pointers ---

def pointer(path: Sequence[str | int]) -> str:
    """RFC 6901: "/items/0/sku"; "" is the whole value."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _segments(ptr: str) -> list[str]:
    return [s.replace("~1", "/").replace("~0", "~") for s in ptr.split("/")[1:]]


def _matches(pattern: list[str], path: JsonPath) -> bool:
    """Whether a leaf's path is what an extractive_fields pointer names ("*": any array index)."""
    return len(pattern) == len(path) and all(
        (p == "*" and isinstance(s, int)) or p == str(s) for p, s in zip(pattern, path, strict=True))


# --- the schema ---

def _deref(schema: dict, root: dict) -> dict:
    """The schema a local "$ref" ("#/...") points at, as the converter follows it (its siblings ignored)."""
    seen = set()
    while isinstance(schema, dict) and isinstance(ref := schema.get("$ref"), str) and ref.startswith("#"):
        if ref in seen:
            break
        seen.add(ref)
        target = root
        try:
            for segment in _segments(ref[1:]):
                target = target[int(segment)] if isinstance(target, list) else target[segment]
        except (KeyError, IndexError, ValueError, TypeError):
            return {}  # a dangling $ref describes nothing (jsonschema and the converter say so where they meet it)
        schema = target
    return schema


def _children(schema: dict, segment: str, root: dict) -> list[dict]:
    """The subschemas that may describe a value's child `segment` ("*": any array element)."""
    schema = _deref(schema, root)
    if not isinstance(schema, dict):
        return []
    found = []
    for combinator in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(combinator, []):
            found += _children(branch, segment, root)
    items, prefix = schema.get("items"), schema.get("prefixItems", [])
    if segment == "*" or segment.isdigit():
        found += [items] if isinstance(items, dict) else []
        found += prefix if segment == "*" else prefix[int(segment):int(segment) + 1]
    if segment in schema.get("properties", {}):
        found.append(schema["properties"][segment])
    elif isinstance(schema.get("additionalProperties"), dict):
        found.append(schema["additionalProperties"])
    return found


def _schema_pointer_problem(ptr: str, schema: dict) -> str:
    if not ptr.startswith("/"):
        return f"{ptr!r} is not a JSON pointer (it starts with '/', e.g. \"/items/*/sku\")"
    level, walked = [schema], ""
    for segment in _segments(ptr):
        walked += "/" + segment
        level = [child for s in level for child in _children(s, segment, schema)]
        if not level:
            return f"{ptr!r}: the schema has nothing at {walked}"
    return ""


# A string's character: any but a quote, backslash, control character or DEL (json.dumps escapes those, json.loads
# refuses raw control characters), or an escape, where the converter's own allowed raw newlines.
_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'
# The converter's number with an exponent that may start with 0: Python writes 0.00001 as 1e-05.
_NUMBER = '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? [0-9] [0-9]? [0-9]?)? space'


def schema_gbnf(schema: dict) -> str:
    """The GBNF grammar llama.cpp's JSON-Schema converter makes of a schema, with literals (property names, const
    and enum values) written as `dumps` writes them, raw non-ASCII included: the converter wrote json.dumps' ASCII
    escapes into GBNF unescaped, so "café" became "caf\\u00e9" (which llguidance's GBNF reader refuses) and a quote
    or backslash in a name broke the literal. Its whitespace rule is kept: at most one space where JSON allows
    whitespace (`space ::= " "?`), which covers dumps' separators and leaves a model no room to ramble."""
    from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

    class Converter(SchemaConverter):
        def _format_literal(self, literal: str) -> str:
            # Every caller hands over json.dumps text (llama-cpp-python 0.3.x).
            return gbnf_literal(dumps(json.loads(literal)))

        def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
            if name == "char":
                rule = BuiltinRule(_CHAR, [])
            elif name == "number":
                rule = BuiltinRule(_NUMBER, rule.deps)
            return super()._add_primitive(name, rule)

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    # resolve_refs rewrites "$ref"s in place: on a copy, so the task's schema stays as written
    converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "stdin"), "")
    return converter.format_grammar() + "\n"


def _canonical(value: object, schema: object, root: dict, validator) -> object:
    """value with every object's keys in the order the converter's grammar writes them, following the converter's
    own reading of the schema (which keyword wins where several apply); integers written as integers."""
    schema = _deref(schema, root)
    if not isinstance(schema, dict):
        return value
    kind = schema.get("type")
    if "anyOf" in schema or "oneOf" in schema:
        branches = schema.get("oneOf") or schema["anyOf"]
        branch = next((b for b in branches if validator.evolve(schema=b).is_valid(value)), {})
        return _canonical(value, branch, root, validator)
    if isinstance(kind, list):
        return value  # the converter's union of bare types: free key order
    if "const" in schema:
        return schema["const"]  # the grammar spells out the schema's own value
    if "enum" in schema:
        return next((v for v in schema["enum"] if validator.evolve(schema={"const": v}).is_valid(value)), value)
    if isinstance(value, dict) and kind in (None, "object"):
        if "properties" in schema or schema.get("additionalProperties", True) is not True:
            props, required = schema.get("properties", {}), set(schema.get("required", []))
            extra = schema.get("additionalProperties")
        elif "allOf" in schema:  # the converter merges the parts; a part's properties are all required
            props, required, extra = {}, set(), None
            for part in schema["allOf"]:
                for sub in part.get("anyOf", [part]):
                    sub_props = _deref(sub, root).get("properties", {})
                    props.update(sub_props)
                    required |= set(sub_props) if sub is part else set()
        else:
            return value
        order = [k for k in props if k in required] + [k for k in props if k not in required]
        out = {k: _canonical(value[k], props[k], root, validator) for k in order if k in value}
        extra = extra if isinstance(extra, dict) else {}
        out.update({k: _canonical(v, extra, root, validator) for k, v in value.items() if k not in props})
        return out
    if isinstance(value, list) and kind in (None, "array"):
        items = schema.get("items") or schema.get("prefixItems")
        if isinstance(items, list):
            return [_canonical(v, s, root, validator) for v, s in zip(value, items, strict=False)] + value[len(items):]
        if isinstance(items, dict):
            return [_canonical(v, items, root, validator) for v in value]
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)  # 2.0 is an integer to JSON Schema, but the grammar's integers have no ".0"
    return value


@lru_cache(maxsize=1)
def _byte_tokenizer():
    """llguidance over single bytes: checks text against a grammar exactly, without a model's vocabulary."""
    from llguidance import LLTokenizer, TokenizerWrapper

    class Bytes:
        eos_token_id, bos_token_id = 256, None
        tokens = [bytes([b]) for b in range(256)] + [b""]

        def __call__(self, text: bytes) -> list[int]:
            return list(text)

    return LLTokenizer(TokenizerWrapper(Bytes()))


def _llguidance_grammar(gbnf: str) -> str:
    """The grammar compiled for llguidance, as HF generation reads the GBNF; ValueError when it cannot."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

    try:
        grammar = LLMatcher.grammar_from_lark(gbnf_to_lark(gbnf))
    except (GbnfToLarkError, ValueError) as err:
        raise ValueError(f"llguidance cannot read it: {err}") from err
    if problem := LLMatcher.validate_grammar(grammar, _byte_tokenizer()):
        raise ValueError(f"llguidance cannot read it: {problem}")
    return grammar


def _grammar_stop(grammar: str, text: str) -> int | None:
    """Where text leaves the grammar (a character offset), or None when the grammar accepts all of it."""
    from llguidance import LLMatcher

    matcher = LLMatcher(_byte_tokenizer(), grammar, log_level=0)
    data = text.encode()
    consumed = matcher.try_consume_tokens(list(data))
    if consumed == len(data) and matcher.is_accepting():
        return None
    return len(data[:consumed].decode(errors="ignore"))


# --- scoring ---

def _lenient(text: str) -> object:
    try:
        return decode_json(text)
    except ValueError:
        return _UNPARSABLE


def _leaves(value: object) -> dict[JsonPath, object]:
    """Each scalar and each empty array or object by its path (an empty list is an answer too: "no items")."""
    leaves, stack = {}, [((), value)]
    while stack:  # a loop, not recursion: a freely decoding model may nest as deep as json.loads allows
        path, v = stack.pop()
        if isinstance(v, dict) and v:
            stack += [((*path, k), x) for k, x in v.items()]
        elif isinstance(v, list) and v:
            stack += [((*path, i), x) for i, x in enumerate(v)]
        else:
            leaves[path] = v
    return leaves


def _norm(value: object) -> str:
    """A leaf's value for comparison: JSON text, so 2 and "2" differ (the type is part of a schema's answer),
    2 and 2.0 do not, and a string's whitespace is collapsed as json_object's values are."""
    if isinstance(value, str):
        value = " ".join(value.split())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return dumps(value)


def _pairs(value: object) -> set[tuple[JsonPath, str]]:
    return set() if value is _UNPARSABLE else {(p, _norm(v)) for p, v in _leaves(value).items()}


def _reference(text: str) -> object:
    # prepare validates references, so a bad one here is a caller bug: fail loudly rather than score 0.
    value, problem = strict_json(text)
    if problem:
        raise ValueError(f"reference is not JSON: {text!r}")
    return value


def _field(path: JsonPath) -> str:
    """A leaf's field, array indices generalised: "/items/*/sku"."""
    return pointer(["*" if isinstance(p, int) else p for p in path])


def _refuse_retrieval(uri: str):
    raise LookupError(f"{uri} is not fetched: every stage runs offline")


def ref_problem(schema: dict) -> str:
    """The first $ref the schema cannot resolve within itself, as "at <pointer>: $ref <ref> ...", or ''. A remote
    $ref is never fetched (stages and tests run offline): found here, when params load, rather than as a crash when
    the first answer is validated."""
    from referencing import Registry, Resource
    from referencing.exceptions import Unresolvable
    from referencing.jsonschema import DRAFT202012

    uri = "urn:tuneforge:schema"
    resolver = Registry(retrieve=_refuse_retrieval).with_resource(
        uri, Resource.from_contents(schema, default_specification=DRAFT202012)).resolver(base_uri=uri)

    def walk(node: object, path: list) -> str:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                try:
                    resolver.lookup(ref)
                except Unresolvable:
                    return f"at {pointer(path) or '/'}: $ref {ref!r} does not resolve within the schema"
            return next((p for k, v in node.items() if (p := walk(v, [*path, k]))), "")
        if isinstance(node, list):
            return next((p for i, v in enumerate(node) if (p := walk(v, [*path, i]))), "")
        return ""

    return walk(schema, [])


class JsonSchemaOutput(OutputKind):
    model_config = ConfigDict(validate_by_name=True, serialize_by_alias=True)

    kind: Literal["json_schema"]
    schema_: dict | None = Field(None, alias="schema", description="the answer's JSON Schema, inline (or "
                                 "schema_file)")
    schema_file: str | None = Field(None, description="the JSON Schema's file, relative to the repository root "
                                    "(e.g. data/raw/<task>/schema.json)")
    extractive_fields: list[str] = Field([], description="JSON pointers of values copied from the input "
                                         "(\"/items/*/sku\", * any array index): invented_values counts those absent "
                                         "from it")

    _schema: dict = PrivateAttr()
    _gbnf: str | None = PrivateAttr()  # None: decoding is free and the converter could not make a grammar
    _ll_grammar: str | None = PrivateAttr()

    plain_metric: ClassVar[str] = "exact_match"
    plain_sentence: ClassVar[str] = "gets {share} of the {n} test inputs exactly right"
    answer_noun: ClassVar[str] = "JSON answer"
    baseline_name: ClassVar[str] = "TF-IDF nearest neighbour (word 1-2-grams, cosine): the closest train input's answer"
    NOT_PRIMARY: ClassVar = frozenset({"invented_values"})
    METRICS: ClassVar = {
        "field_f1": lambda t: ratio(2 * t["tp"], t["predicted"] + t["expected"]),
        "schema_valid": rate("schema_valid"),
        "exact_match": rate("exact"),
        "field_precision": lambda t: ratio(t["tp"], t["predicted"]),
        "field_recall": lambda t: ratio(t["tp"], t["expected"]),
        "invented_values": lambda t: ratio(t["invented"], t["extracted"]),
    }

    @model_validator(mode="after")
    def _load_schema(self) -> JsonSchemaOutput:
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for

        if (self.schema_ is None) == (self.schema_file is None):
            raise ValueError("output.kind json_schema needs exactly one of output.schema (inline) and "
                             "output.schema_file")
        where = "output.schema" if self.schema_file is None else f"output.schema_file {self.schema_file}"
        schema = self.schema_ if self.schema_file is None else _read_schema_file(self.schema_file)
        try:
            validator_for(schema, default=Draft202012Validator).check_schema(schema)
        except SchemaError as err:
            at = f" at {pointer(err.path)}" if err.path else ""
            raise ValueError(f"{where}{at}: {err.message}") from None
        if problem := ref_problem(schema):
            raise ValueError(f"{where}: {problem}")
        for ptr in self.extractive_fields:
            if problem := _schema_pointer_problem(ptr, schema):
                raise ValueError(f"output.extractive_fields: {problem}")
        self._schema, self._gbnf, self._ll_grammar = schema, None, None
        try:
            gbnf = schema_gbnf(schema)
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as err:
            problem = f"llama.cpp's JSON Schema converter, which makes the grammar, cannot handle it: {err}"
        else:
            try:
                self._gbnf, self._ll_grammar = gbnf, _llguidance_grammar(gbnf)
                return self
            except ValueError as err:
                problem = f"the grammar llama.cpp's converter makes of it is unusable: {err}"
        if self.constrained:
            raise ValueError(f"{where}: {problem}. Simplify the schema, or set output.constrained: false to decode "
                             "freely (answers are still checked against the schema)")
        return self

    def _validator(self):
        from jsonschema import Draft202012Validator
        from jsonschema.validators import validator_for

        cls = validator_for(self._schema, default=Draft202012Validator)
        return cls(self._schema, format_checker=cls.FORMAT_CHECKER)

    def _breaks_schema(self, value: object) -> str:
        """The first schema error in value ('' when valid): where it is and what."""
        from jsonschema.exceptions import best_match

        error = best_match(self._validator().iter_errors(value))
        if error is None:
            return ""
        message = error.message if len(error.message) <= 200 else error.message[:200] + "..."
        return f"answer at {pointer(error.path) or '/'}: {message}"

    def describe(self) -> str:
        source = f" (`{self.schema_file}`)" if self.schema_file else ""
        return f"JSON valid under the task's JSON Schema{source}."

    def answer_problem(self, answer: str) -> str:
        value, problem = strict_json(answer)
        return problem or self._breaks_schema(value)

    def training_problem(self, answer: str) -> str:
        """Of an answer answer_problem accepts: no repeated key (json.loads keeps the last, the model would be
        trained on both) and, when decoding is constrained, a canonical form the grammar accepts. Generated
        answers need neither check: the grammar writes each listed property once, and only what it accepts."""
        if repeated := repeated_keys(answer):
            return f"answer repeats key(s) {repeated}"
        if not self.constrained:
            return ""
        canonical = self.canonical_answer(answer)
        stop = _grammar_stop(self._ll_grammar, canonical)
        if stop is None:
            return ""
        return (f"answer is valid under the schema but constrained decoding could never write it: its canonical form "
                f"leaves the grammar llama.cpp's converter makes of the schema at character {stop} "
                f"({canonical[max(0, stop - 30):stop]!r} ^ {canonical[stop:stop + 30]!r}). The converter closes "
                "objects to their listed properties unless additionalProperties says otherwise, and writes integers "
                "of at most 16 digits")

    def canonical_answer(self, answer: str) -> str:
        """dumps' form with each object's keys in the grammar's order (required properties first, each group in
        schema order): training on any other order teaches text constrained decoding can never emit."""
        return dumps(_canonical(json.loads(answer), self._schema, self._schema, self._validator()))

    def category(self, answer: str) -> str:
        """The set of top-level keys of a valid object, "valid" for a valid non-object, else INVALID."""
        value, problem = strict_json(answer)
        if problem or self._breaks_schema(value):
            return INVALID
        return ("+".join(sorted(value)) or "{}") if isinstance(value, dict) else "valid"

    def grammar(self, input_text: str) -> str | None:
        return self._gbnf

    def answer_schema(self) -> dict:
        return self._schema

    def row_counts(self, inputs, references, outputs) -> dict[str, np.ndarray]:
        """Leaves are compared by (path, value); unparsable output predicts none. Only values at extractive_fields
        count toward invented_values."""
        patterns = [_segments(p) for p in self.extractive_fields]
        validator = self._validator()
        counts: dict[str, list] = {n: [] for n in ("schema_valid", "exact", "tp", "predicted", "expected",
                                                   "extracted", "invented")}
        for prediction, reference, input_text in zip(outputs, references, inputs, strict=True):
            pred = _lenient(prediction)
            strict, problem = strict_json(prediction)
            pred_pairs, ref_pairs = _pairs(pred), _pairs(_reference(reference))
            copied = [v for p, v in (_leaves(pred).items() if pred is not _UNPARSABLE else [])
                      if any(_matches(pattern, p) for pattern in patterns)]
            counts["schema_valid"].append(not problem and validator.is_valid(strict))
            counts["exact"].append(pred is not _UNPARSABLE and pred_pairs == ref_pairs)
            counts["tp"].append(len(pred_pairs & ref_pairs))
            counts["predicted"].append(len(pred_pairs))
            counts["expected"].append(len(ref_pairs))
            counts["extracted"].append(len(copied))
            counts["invented"].append(sum(not in_input(v, input_text) for v in copied))
        return {name: np.asarray(v, dtype=np.int64) for name, v in counts.items()}

    def details(self, inputs, references, outputs) -> dict:
        """per_field {field ("/items/*/sku"): {precision, recall, f1, support}} over the fields the references
        use, so the table keeps the task's fields whatever the model invents."""
        tp: Counter[str] = Counter()
        predicted: Counter[str] = Counter()
        expected: Counter[str] = Counter()
        for prediction, reference in zip(outputs, references, strict=True):
            pred_pairs, ref_pairs = _pairs(_lenient(prediction)), _pairs(_reference(reference))
            predicted.update(_field(p) for p, _ in pred_pairs)
            expected.update(_field(p) for p, _ in ref_pairs)
            tp.update(_field(p) for p, _ in pred_pairs & ref_pairs)
        per_field = {}
        for field in sorted(expected):
            p, r, f = prf(tp[field], predicted[field], expected[field])
            per_field[field] = {"precision": p, "recall": r, "f1": f, "support": expected[field]}
        return {"per_field": per_field}

    def example_score(self, prediction: str, reference: str, input_text: str) -> float:
        """The F1 of the example's (path, value) leaves (0 when it does not parse)."""
        pred = _lenient(prediction)
        if pred is _UNPARSABLE:
            return 0.0
        pred_pairs, ref_pairs = _pairs(pred), _pairs(_reference(reference))
        if pred_pairs == ref_pairs:
            return 1.0
        return prf(len(pred_pairs & ref_pairs), len(pred_pairs), len(ref_pairs))[2]

    def error_kind(self, prediction: str, reference: str, input_text: str) -> str:
        """Format failures first (empty, unparsable, against the schema), then content: a copied value absent
        from the input outranks missing fields, extra fields and plain wrong values, since inventing text is the
        worst content error."""
        if not prediction.strip():
            return "empty output"
        pred = _lenient(prediction)
        if pred is _UNPARSABLE:
            return "invalid JSON"
        if not self._validator().is_valid(pred):
            return "breaks the schema"
        ref = _reference(reference)
        if _pairs(pred) == _pairs(ref):
            return "ok"
        pred_leaves, ref_leaves = _leaves(pred), _leaves(ref)
        patterns = [_segments(p) for p in self.extractive_fields]
        if any(not in_input(v, input_text) for p, v in pred_leaves.items()
               if any(_matches(pattern, p) for pattern in patterns)):
            return "invented value"
        if set(ref_leaves) - set(pred_leaves):
            return "missing fields"
        if set(pred_leaves) - set(ref_leaves):
            return "extra fields"
        return "wrong values"

    def answer_balance(self, answers: Sequence[str]) -> Counter:
        """Answers using each top-level key."""
        counts: Counter[str] = Counter()
        for answer in answers:
            value = json.loads(answer)
            counts.update(value.keys() if isinstance(value, dict) else [])
        return counts

    def baseline(self, train: list[dict], test: list[dict]) -> list[str]:
        """Each test input gets the answer of its most similar train input (TF-IDF over word 1-2-grams, cosine):
        right where inputs repeat a template, and a floor for how much of an answer the input's words alone
        predict."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        train_x = vectorizer.fit_transform([self.input_text(r) for r in train])
        test_x = vectorizer.transform([self.input_text(r) for r in test])
        nearest = np.asarray((test_x @ train_x.T).argmax(axis=1)).ravel()  # rows are l2-normed: dot is cosine
        return [self.reference(train[i]) for i in nearest]


def _read_schema_file(name: str) -> dict:
    """The schema in a repository file: a relative path inside the repository, so that the task's settings mean
    the same on every checkout (and DVC can track the file)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"output.schema_file {name!r} must be a path relative to the repository root, inside it "
                         "(no leading '/', no '..'), e.g. data/raw/<task>/schema.json")
    file = repo_root() / path
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"output.schema_file {name}: no such file ({file})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"output.schema_file {name}: cannot read it ({err})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"output.schema_file {name}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from None
    if not isinstance(schema, dict):
        raise ValueError(f"output.schema_file {name} holds a JSON {type(schema).__name__}, not a JSON Schema object")
    return schema
