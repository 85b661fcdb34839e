"""output.kind json_schema: settings checked at load, the answer contract, the grammar (llama.cpp's converter, read
by llama.cpp and by llguidance, accepting each canonical answer token by token), scoring and the baseline."""

import ctypes
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from tuneforge.core.kinds import INVALID, KINDS, output_spec
from tuneforge.core.kinds.json_schema import JsonSchemaOutput

DATA = Path(__file__).parent / "data" / "json_schema_task"
SCHEMA_FILE = "tests/data/json_schema_task/schema.json"
SCHEMA = json.loads((DATA / "schema.json").read_text())
RECORDS = [json.loads(line) for line in (DATA / "records.jsonl").read_text().splitlines()]
EXTRACTIVE = ["/order_id", "/customer/name", "/customer/email", "/customer/city", "/items/*/sku", "/items/*/name"]

# Features the converter has to get right: a $ref, anyOf, enums with non-ASCII and a quote, an object const, a
# property name with a quote and a backslash, required properties after optional ones.
TRICKY = {
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"], "additionalProperties": False}},
    "type": "object",
    "properties": {
        "note": {"type": "string"},
        "where": {"anyOf": [{"$ref": "#/$defs/point"}, {"type": "string"}]},
        "tags": {"type": "array", "items": {"enum": ["café", 'a"b', "😀"]}},
        "meta": {"const": {"z": 1, "a": [True, None]}},
        'we"ird\\': {"type": "integer"},
    },
    "required": ["where", "meta"],
    "additionalProperties": False,
}
TRICKY_ANSWER = ('{"we\\"ird\\\\": 3.0, "tags": ["café", "a\\"b", "😀"], "meta": {"a": [true, null], "z": 1}, '
                 '"where": {"y": 2, "x": 1e-05}, "note": "line\\nbreak"}')
TRICKY_CANONICAL = ('{"where": {"x": 1e-05, "y": 2}, "meta": {"z": 1, "a": [true, null]}, "note": "line\\nbreak", '
                    '"tags": ["café", "a\\"b", "😀"], "we\\"ird\\\\": 3}')


def make(**settings) -> JsonSchemaOutput:
    return output_spec(kind="json_schema", **settings)


@pytest.fixture(scope="module")
def kind() -> JsonSchemaOutput:
    return make(schema=SCHEMA, extractive_fields=EXTRACTIVE)


def order(**changes) -> dict:
    """A valid order in canonical key order, with changes."""
    base = {"order_id": "A1043", "customer": {"name": "Maria Lopez"},
            "items": [{"sku": "MUG-BL-01", "name": "Blue Mug", "quantity": 2, "unit_price": 7.5},
                      {"sku": "TT-22", "name": "Tea Towel", "quantity": 1, "unit_price": 4.25}],
            "shipping": "express", "total": 19.25}
    return {**base, **changes}


INPUT = ("Order A1043 for Maria Lopez: 2 x Blue Mug (SKU MUG-BL-01) at $7.50 each; 1 x Tea Towel (SKU TT-22) "
         "at $4.25. Express shipping. Total $19.25.")


# --- settings ---

def test_registered_and_read_by_alias_or_name():
    assert KINDS["json_schema"] is JsonSchemaOutput
    by_alias = make(schema=SCHEMA)
    by_name = JsonSchemaOutput(kind="json_schema", schema_=SCHEMA)
    assert by_alias.answer_schema() == by_name.answer_schema() == SCHEMA
    assert by_alias.model_dump()["schema"] == SCHEMA  # written back under the name params.yaml uses
    assert JsonSchemaOutput.model_validate(by_alias.model_dump()) == by_alias  # params' with_settings round trip


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "object", "properties": {"age": {"type": "integr"}}},
     "output.schema at /properties/age/type: 'integr' is not valid under any of the given schemas"),
    ({"type": "object", "properties": {"items": {"type": "array", "minItems": -1}}},
     "output.schema at /properties/items/minItems: -1 is less than the minimum of 0"),
    ({"type": "object", "required": "name"}, "output.schema at /required: 'name' is not of type 'array'"),
])
def test_an_invalid_schema_is_refused_naming_where(schema, message):
    with pytest.raises(ValidationError) as err:
        make(schema=schema)
    assert message in str(err.value)


@pytest.mark.parametrize(("schema", "feature"), [
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "[A-Z]+"}}},
     'Pattern must start with "^" and end with "$"'),
    ({"type": "object", "properties": {"x": {"not": {"type": "string"}}}}, "Unrecognized schema: {'not'"),
])
def test_a_schema_the_grammar_converter_cannot_handle_is_refused_saying_what(schema, feature):
    with pytest.raises(ValidationError) as err:
        make(schema=schema)
    assert "llama.cpp's JSON Schema converter" in str(err.value) and feature in str(err.value)
    free = make(schema=schema, constrained=False)  # decoding freely needs no grammar
    assert free.grammar("") is None and free.answer_problem('{"code": "AB"}') == ""


def test_exactly_one_of_schema_and_schema_file():
    for settings in ({}, {"schema": SCHEMA, "schema_file": SCHEMA_FILE}):
        with pytest.raises(ValidationError, match="exactly one of output.schema"):
            make(**settings)


def test_schema_file_is_read_from_the_repository(repo_root, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_ROOT", str(repo_root))
    kind = make(schema_file=SCHEMA_FILE)
    assert kind.answer_schema() == SCHEMA and kind.grammar("") == make(schema=SCHEMA).grammar("")
    assert kind.model_dump()["schema"] is None  # the file stays the source, as params.yaml says
    assert f"`{SCHEMA_FILE}`" in kind.describe()


def test_a_missing_or_broken_schema_file_is_refused_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_ROOT", str(tmp_path))
    (tmp_path / "data" / "raw" / "t").mkdir(parents=True)
    broken = tmp_path / "data" / "raw" / "t" / "schema.json"
    broken.write_text('{\n  "type": "object",\n  "properties": {"a": {"type": "string"},}\n}\n')
    (tmp_path / "list.json").write_text("[]")
    cases = {
        "data/raw/t/missing.json": "output.schema_file data/raw/t/missing.json: no such file",
        "data/raw/t/schema.json": "output.schema_file data/raw/t/schema.json:3:",
        "list.json": "holds a JSON list, not a JSON Schema object",
        str(broken): "must be a path relative to the repository root",
        "../outside/schema.json": "must be a path relative to the repository root",
    }
    for name, message in cases.items():
        with pytest.raises(ValidationError) as err:
            make(schema_file=name)
        assert message in str(err.value), name
    broken.write_text('{"type": "object", "properties": {"age": {"type": "integr"}}}')
    with pytest.raises(ValidationError, match="output.schema_file data/raw/t/schema.json at /properties/age/type"):
        make(schema_file="data/raw/t/schema.json")


def test_extractive_fields_must_name_places_in_the_schema():
    assert make(schema=SCHEMA, extractive_fields=["/items/*/sku", "/items/0/name", "/customer/city"])
    assert make(schema=TRICKY, extractive_fields=["/where", "/tags/*", "/where/x"])  # through anyOf and $ref
    for pointer, message in (("/customer/nmae", "the schema has nothing at /customer/nmae"),
                             ("/items/sku", "the schema has nothing at /items/sku"),
                             ("items/*/sku", "is not a JSON pointer")):
        with pytest.raises(ValidationError, match=message):
            make(schema=SCHEMA, extractive_fields=[pointer])


# --- the answer contract ---

def test_answer_problem_on_nested_answers(kind):
    valid = order()
    assert kind.answer_problem(json.dumps(valid)) == ""
    assert kind.answer_problem(json.dumps(valid, separators=(",", ":"))) == ""  # any layout json.loads reads
    bad_qty = order(items=[{"sku": "X", "name": "Mug", "quantity": "x", "unit_price": 1}])
    assert kind.answer_problem(json.dumps(bad_qty)) == "answer at /items/0/quantity: 'x' is not of type 'integer'"
    zero = order(items=[{"sku": "X", "name": "Mug", "quantity": 0, "unit_price": 1}])
    assert kind.answer_problem(json.dumps(zero)) == "answer at /items/0/quantity: 0 is less than the minimum of 1"
    no_total = {k: v for k, v in valid.items() if k != "total"}
    assert kind.answer_problem(json.dumps(no_total)) == "answer at /: 'total' is a required property"
    assert kind.answer_problem(json.dumps(order(shipping="air"))) == (
        "answer at /shipping: 'air' is not one of ['standard', 'express', 'pickup']")
    extra = order(customer={"name": "Bo", "phone": "1"})
    assert "answer at /customer: Additional properties are not allowed ('phone'" in kind.answer_problem(
        json.dumps(extra))
    assert kind.answer_problem(json.dumps(order(items=[]))) == "answer at /items: [] should be non-empty"
    repeated = json.dumps(valid).replace('"order_id": "A1043"', '"order_id": "A1", "order_id": "A1043"')
    assert kind.answer_problem(repeated) == ""  # read as json.loads reads it...
    assert kind.training_problem(repeated) == "answer repeats key(s) ['order_id']"  # ...but never trained on
    assert kind.training_problem(json.dumps(valid)) == ""
    for not_json in ("", "```json\n" + json.dumps(valid) + "\n```", '{"order_id": "A1"'):
        assert kind.answer_problem(not_json) == "answer is not valid JSON"


def test_a_training_answer_the_grammar_cannot_write_is_refused_though_the_schema_allows_it():
    """The converter closes objects to their listed properties and caps integers at 16 digits; the schema does
    neither. Training on such an answer would teach what constrained decoding forbids."""
    open_schema = {"type": "object", "properties": {"a": {"type": "string"}, "n": {"type": "integer"}}}
    kind, free = make(schema=open_schema), make(schema=open_schema, constrained=False)
    assert kind.training_problem('{"a": "x", "n": 12}') == ""
    for answer in ('{"a": "x", "b": 1}', '{"n": 12345678901234567}'):
        assert kind.answer_problem(answer) == ""
        problem = kind.training_problem(answer)
        assert "constrained decoding could never write it" in problem and "at character" in problem, answer
        assert free.training_problem(answer) == ""  # decoding freely, the schema alone decides


def test_canonical_answers_follow_the_grammars_key_order(kind):
    record = next(r for r in RECORDS if '"gift_wrap"' in r["completion"])
    canonical = kind.canonical_answer(record["completion"])
    assert list(json.loads(canonical))[-2:] == ["total", "gift_wrap"]  # required ones first, then optional
    shuffled = ('{"total": 19.25, "shipping": "express", "items": [{"unit_price": 7.5, "quantity": 2.0, "name": '
                '"Blue Mug", "sku": "MUG-BL-01"}], "customer": {"city": "Graz", "name": "Maria Lopez"}, '
                '"order_id": "A1043"}')
    assert kind.canonical_answer(shuffled) == (
        '{"order_id": "A1043", "customer": {"name": "Maria Lopez", "city": "Graz"}, "items": [{"sku": "MUG-BL-01", '
        '"name": "Blue Mug", "quantity": 2, "unit_price": 7.5}], "shipping": "express", "total": 19.25}')
    tricky = make(schema=TRICKY)
    assert tricky.canonical_answer(TRICKY_ANSWER) == TRICKY_CANONICAL
    for answer in [r["completion"] for r in RECORDS] + [shuffled]:
        canonical = kind.canonical_answer(answer)
        assert json.loads(canonical) == json.loads(answer)
        assert kind.canonical_answer(canonical) == canonical
        assert kind.training_problem(canonical) == ""  # its canonical form passes the grammar (byte by byte)
    assert tricky.training_problem(TRICKY_ANSWER) == "" and tricky.training_problem(TRICKY_CANONICAL) == ""


# --- the grammar, in both engines ---

def test_the_grammar_allows_one_optional_space_and_no_raw_control_characters(kind):
    rules = dict(line.split(" ::= ", 1) for line in kind.grammar("").splitlines())
    assert rules["space"] == '" "?'  # llama.cpp's longer whitespace rule would let a small model ramble
    assert rules["char"].startswith(r'[^"\\\x7F\x00-\x1F]')
    assert kind.grammar("any input") == kind.grammar("")


@pytest.fixture(scope="module")
def llama_vocab():
    """The embedded GGUF's vocabulary (no weights): what llama.cpp's grammar sampler is built on."""
    from llama_cpp import Llama

    from tuneforge.stages.base_model import EMBEDDED_GGUF, embedded_gguf_folder

    return Llama(model_path=str(embedded_gguf_folder() / EMBEDDED_GGUF), vocab_only=True, verbose=False)


def llama_cpp_accepts(llm, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets text's tokens through, one by one, and then the end of text."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    assert sampler, "llama.cpp could not parse the grammar"
    try:
        for token in [*llm.tokenize(text.encode(), add_bos=False, special=False), llm.token_eos()]:
            data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if math.isinf(data[0].logit):
                return False
            if token != llm.token_eos():
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_llama_cpp_reads_the_grammar_and_decodes_canonical_answers_under_it(kind, llama_vocab):
    import llama_cpp

    assert not llama_cpp.llama_sampler_init_grammar(llama_vocab._model.vocab, b"root ::= (", b"root")  # the check bites
    for answer in [r["completion"] for r in RECORDS[:12]]:
        assert llama_cpp_accepts(llama_vocab, kind.grammar(""), kind.canonical_answer(answer)), answer
    assert llama_cpp_accepts(llama_vocab, make(schema=TRICKY).grammar(""), TRICKY_CANONICAL)
    assert not llama_cpp_accepts(llama_vocab, make(schema=TRICKY).grammar(""), TRICKY_ANSWER)  # not its key order


def grammar_matcher_accepts(tokenizer, grammar: str, text: str) -> bool:
    """Token by token as HF generation meets it (core.constraints.GrammarMatcher, llguidance): each token of
    text is allowed when it comes, then end of text."""
    from tuneforge.core.constraints import GrammarMatcher

    matcher = GrammarMatcher(tokenizer, len(tokenizer), grammar)
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if not matcher.allowed()[token]:
            return False
        matcher.consume(token)
    return bool(matcher.allowed()[tokenizer.eos_token_id])


def test_llguidance_reads_the_grammar_and_decodes_canonical_answers_under_it(kind, tokenizer):
    for answer in [r["completion"] for r in RECORDS]:
        assert grammar_matcher_accepts(tokenizer, kind.grammar(""), kind.canonical_answer(answer)), answer
    tricky = make(schema=TRICKY).grammar("")
    assert grammar_matcher_accepts(tokenizer, tricky, TRICKY_CANONICAL)
    assert not grammar_matcher_accepts(tokenizer, tricky, TRICKY_ANSWER)
    optional_first = {**{k: v for k, v in order().items() if k != "total"}, "gift_wrap": True, "total": 19.25}
    assert kind.answer_problem(json.dumps(optional_first)) == ""  # valid, but not in the grammar's order
    for refused in (json.dumps(optional_first),
                    json.dumps(order(), indent=2),                              # a rambling layout
                    json.dumps(order(shipping="air")),                          # outside the enum
                    json.dumps(order(order_id="A|B")).replace("|", "\n")):      # a raw newline in a string
        assert not grammar_matcher_accepts(tokenizer, kind.grammar(""), refused), refused


# --- scoring ---

NESTED = {"type": "object", "properties": {
    "id": {"type": "string"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "sku": {"type": "string"}, "qty": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["sku", "qty"], "additionalProperties": False}},
    "note": {"type": "string"}},
    "required": ["id", "items"], "additionalProperties": False}
NESTED_INPUT = "Order A1: 2 of X (red, big) and 1 of Y, nothing else."
NESTED_REF = ('{"id": "A1", "items": [{"sku": "X", "qty": 2, "tags": ["red", "big"]}, '
              '{"sku": "Y", "qty": 1, "tags": []}]}')
# The reference's 8 leaves: /id, /items/0/sku, /items/0/qty, /items/0/tags/0, /items/0/tags/1, /items/1/sku,
# /items/1/qty and /items/1/tags (an empty list is an answer too).
NESTED_CASES = [  # prediction, tp, predicted, schema_valid, exact, extracted, invented
    ('{"items": [{"qty": 2, "sku": "X", "tags": ["red", "big"]}, {"sku": "Y", "qty": 1, "tags": []}], "id": "A1"}',
     8, 8, 1, 1, 3, 0),
    ('{"id": "A1", "items": [{"sku": "X", "qty": 3, "tags": ["big", "red"]}, {"sku": "Y", "qty": 1}]}',
     4, 7, 1, 0, 3, 0),                            # qty wrong, tags swapped (indices matter), tags missing
    ('```json\n{"id": "A1", "items": [{"sku": "X", "qty": 2, "tags": ["red", "big"]}]}\n```', 5, 5, 0, 0, 2, 0),
    ('{"id": "A1", "items": [{"sku": "Z", "qty": "2"}, {"sku": "Y", "qty": 1, "tags": []}]}', 4, 6, 0, 0, 3, 1),
    ("not JSON at all", 0, 0, 0, 0, 0, 0),
]


@pytest.fixture(scope="module")
def nested() -> JsonSchemaOutput:
    return make(schema=NESTED, extractive_fields=["/id", "/items/*/sku"])


def test_metrics_on_known_nested_examples(nested):
    outputs = [case[0] for case in NESTED_CASES]
    scores = nested.score([NESTED_INPUT] * len(outputs), [NESTED_REF] * len(outputs), outputs)
    tp, predicted, valid, exact, extracted, invented = (sum(case[i] for case in NESTED_CASES) for i in range(1, 7))
    expected = 8 * len(outputs)
    assert scores["n"] == 5
    assert scores["field_precision"] == pytest.approx(tp / predicted)
    assert scores["field_recall"] == pytest.approx(tp / expected)
    assert scores["field_f1"] == pytest.approx(2 * tp / (predicted + expected))
    assert scores["schema_valid"] == pytest.approx(valid / 5) and scores["exact_match"] == pytest.approx(exact / 5)
    assert scores["invented_values"] == pytest.approx(invented / extracted)
    assert scores["valid_answer"] == pytest.approx(2 / 5)
    assert list(nested.METRICS)[0] == "field_f1"
    per_field = scores["per_field"]
    assert set(per_field) == {"/id", "/items/*/sku", "/items/*/qty", "/items/*/tags/*", "/items/*/tags"}
    assert per_field["/id"] == {"precision": 1.0, "recall": 0.8, "f1": pytest.approx(8 / 9), "support": 5}
    assert nested.score([NESTED_INPUT], [NESTED_REF], [NESTED_CASES[1][0]])["invented_values"] == 0.0
    no_extractive = make(schema=NESTED)
    assert no_extractive.score([NESTED_INPUT] * 5, [NESTED_REF] * 5, outputs)["invented_values"] == 0.0


def test_totals_over_resamples_give_one_value_per_resample(nested):
    outputs = [case[0] for case in NESTED_CASES]
    n, resamples = len(outputs), 7
    rows = np.random.default_rng(0).integers(0, n, size=(resamples, n))
    totals = nested.totals([NESTED_INPUT] * n, [NESTED_REF] * n, outputs, rows)
    for name, metric in nested.metric_functions().items():
        assert metric(totals).shape == (resamples,), name
    once = nested.totals([NESTED_INPUT] * n, [NESTED_REF] * n, outputs, np.arange(n)[None, :])
    scores = nested.score([NESTED_INPUT] * n, [NESTED_REF] * n, outputs)
    assert {k: float(f(once)[0]) for k, f in nested.METRICS.items()} == {k: scores[k] for k in nested.METRICS}


def test_example_scores_and_error_kinds(nested):
    ref = NESTED_REF
    assert nested.example_score(NESTED_CASES[0][0], ref, NESTED_INPUT) == 1.0
    assert nested.example_score(NESTED_CASES[1][0], ref, NESTED_INPUT) == pytest.approx(2 * 4 / (7 + 8))
    assert nested.example_score("nope", ref, NESTED_INPUT) == 0.0
    kinds = {
        "": "empty output",
        "{'id': 'A1'}": "invalid JSON",
        '{"id": "A1"}': "breaks the schema",
        NESTED_CASES[0][0]: "ok",
        '{"id": "A1", "items": [{"sku": "Q", "qty": 2, "tags": ["red", "big"]}, {"sku": "Y", "qty": 1, "tags": []}]}':
            "invented value",
        '{"id": "A1", "items": [{"sku": "X", "qty": 2, "tags": ["red", "big"]}]}': "missing fields",
        '{"id": "A1", "note": "hi", "items": [{"sku": "X", "qty": 2, "tags": ["red", "big"]}, '
        '{"sku": "Y", "qty": 1, "tags": []}]}': "extra fields",
        '{"id": "A1", "items": [{"sku": "Y", "qty": 2, "tags": ["red", "big"]}, {"sku": "X", "qty": 1, "tags": []}]}':
            "wrong values",
    }
    for prediction, expected in kinds.items():
        assert nested.error_kind(prediction, ref, NESTED_INPUT) == expected, prediction


def test_category_and_answer_balance(kind):
    answers = [kind.canonical_answer(r["completion"]) for r in RECORDS]
    assert kind.category(answers[0]) == "+".join(sorted(json.loads(answers[0])))
    assert kind.category(json.dumps(order(shipping="air"))) == INVALID
    assert kind.category("{") == INVALID
    assert make(schema={"type": "array", "items": {"type": "integer"}}).category("[1, 2]") == "valid"
    balance = kind.answer_balance(answers)
    assert balance["order_id"] == len(RECORDS) and 0 < balance["gift_wrap"] < len(RECORDS)


# --- the baseline ---

def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": "Extract the order as JSON."},
                         {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_the_baseline_answers_with_the_nearest_train_inputs_answer(nested):
    a = '{"id": "A1", "items": [{"sku": "X", "qty": 2}]}'
    b = '{"id": "B7", "items": [{"sku": "Y", "qty": 1}]}'
    c = '{"id": "C3", "items": []}'
    train = [chat("two red mugs for the kitchen", a), chat("one blue teapot, gift wrapped", b),
             chat("cancelled order, nothing shipped", c)]
    test = [chat("three red mugs", ""), chat("a blue teapot please", ""), chat("order cancelled", "")]
    assert nested.baseline(train, test) == [a, b, c]
    assert "TF-IDF" in nested.baseline_name


# --- the test data set ---

def test_the_order_data_set_is_valid_nested_and_mostly_copied(kind):
    top, item = SCHEMA["properties"], SCHEMA["properties"]["items"]["items"]
    assert top["customer"]["type"] == "object" and top["items"]["type"] == "array" and item["type"] == "object"
    assert item["properties"]["quantity"]["type"] == "integer" and top["total"]["type"] == "number"
    assert "enum" in top["shipping"] and top["gift_wrap"]["type"] == "boolean"
    assert "gift_wrap" not in SCHEMA["required"] and "name" in top["customer"]["required"]
    assert len(RECORDS) >= 50
    answers = [r["completion"] for r in RECORDS]
    assert all(kind.answer_problem(a) == kind.training_problem(a) == "" for a in answers)
    assert sum(kind.canonical_answer(a) != a for a in answers) > len(answers) // 2  # prepare has work to do
    inputs = [r["prompt"] for r in RECORDS]
    scores = kind.score(inputs, answers, answers)
    assert scores["exact_match"] == 1.0 and scores["invented_values"] == 0.0


@pytest.mark.parametrize("constrained", [True, False])
def test_a_ref_that_does_not_resolve_within_the_schema_is_refused_with_its_pointer(constrained):
    """Nothing is fetched (stages run offline): a remote or dangling $ref fails when params load, decoding or not."""
    for ref in ("other.json#/x", "#/$defs/missing", "http://127.0.0.1:9/s.json"):
        with pytest.raises(ValidationError) as err:
            make(schema={"type": "object", "properties": {"x": {"$ref": ref}}}, constrained=constrained)
        assert f"at /properties/x: $ref '{ref}' does not resolve within the schema" in str(err.value)
