"""The tool_call output kind: its settings, tool-call records through the reader and prepare, the loss on the call
span, the wire format read off real templates (Qwen2.5-Instruct, Llama-3.1-Instruct on their families' tokenizers),
parsing, the grammar in llguidance and llama.cpp, and the metrics.

The templates in tests/data/chat_templates are the models' own (their tokenizer_config.json's chat_template); the
tokenizers come from llama.cpp's vocabulary GGUFs (scripts/make_random_model.py), whose own templates predate tools.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from tuneforge.core.chat import IGNORE, end_of_turn, prompt_text, render, template_renders_tools
from tuneforge.core.kinds import KINDS, output_spec
from tuneforge.core.kinds.tool_call import NO_CALL, ToolCallFormat, ToolCallOutput
from tuneforge.core.params import SplitSpec, TaskSpec
from tuneforge.core.readers import Record, Rejected, read_source
from tuneforge.stages.prepare import prepare

from .conftest import ROOT, load_script

DATA = ROOT / "tests" / "data"
TOOLS = yaml.safe_load((DATA / "tool_call_task" / "tools.yaml").read_text())
KIND = output_spec(kind="tool_call", tools=TOOLS)


def family_tokenizer(family: str, template: str):
    builder = load_script("make_random_model")
    if not builder.VOCAB_DIR.exists():
        pytest.skip("the vocabulary GGUFs are fetched by scripts/fetch_gguf_converter.sh")
    tokenizer = builder.family_tokenizer(family)
    tokenizer.chat_template = (DATA / "chat_templates" / template).read_text()
    return tokenizer


@pytest.fixture(scope="module")
def qwen():
    return family_tokenizer("qwen2", "qwen2.5-instruct.jinja")


@pytest.fixture(scope="module")
def llama():
    return family_tokenizer("llama", "llama-3.1-instruct.jinja")


def task(source: str = "records.jsonl") -> TaskSpec:
    return TaskSpec(source=source, reader="chat_jsonl", output=KIND)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The test data set through the prepare stage: canonical records, as training and evaluation read them."""
    root = tmp_path_factory.mktemp("tool_call")
    (root / "records.jsonl").write_bytes((DATA / "tool_call_task" / "records.jsonl").read_bytes())
    out = prepare(task(), SplitSpec(), root)
    assert not out.rejected, out.rejected
    return [r.to_json() for rows in out.splits.values() for r in rows]


def call(name: str, **arguments) -> dict:
    return {"name": name, "arguments": arguments}


def calls(*items: dict) -> str:
    return json.dumps({"tool_calls": list(items)}, ensure_ascii=False)


def reply(text: str) -> str:
    return json.dumps({"content": text}, ensure_ascii=False)


# --- settings ---

def test_registered():
    assert KINDS["tool_call"] is ToolCallOutput and isinstance(KIND, ToolCallOutput)
    assert KIND.template_kwargs() == {"tools": TOOLS}
    assert list(KIND.metric_functions())[:2] == ["exact_match", "tool_accuracy"]  # exact_match: the default primary


def tool(name="f", **function) -> dict:
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize(("tools", "message"), [
    ([], "needs a non-empty output.tools"),
    ([{"name": "f"}], "output.tools[0] must be {\"type\": \"function\""),
    ([tool(), tool("get weather")], "output.tools[1].function.name 'get weather' is not a tool name"),
    ([tool("3d")], "is not a tool name"),
    ([tool(), tool("g"), tool("f")], "output.tools[2].function.name 'f' is output.tools[0]'s too"),
    ([tool(paramters={})], "output.tools[0].function has unknown key(s) ['paramters']"),
    ([tool(), tool(parameters={"type": "object", "properties": {"x": {"type": "strin"}}})],
     "output.tools[1].function.parameters at /properties/x/type: "),
    ([tool(parameters={"type": "object", "required": "x"})], "output.tools[0].function.parameters at /required: "),
    ([tool(parameters={"type": "string"})], 'must describe an object ("type": "object")'),
    ([tool(parameters={"type": "object", "properties": {"x": {"type": "frobnicate"}}})], "at /properties/x/type"),
])
def test_tools_are_checked_when_params_load(tools, message):
    with pytest.raises(ValidationError) as failure:
        output_spec(kind="tool_call", tools=tools)
    assert message in str(failure.value)


def test_a_tool_without_parameters_takes_an_empty_object():
    kind = output_spec(kind="tool_call", tools=[tool("ping", description="Is the service up?")])
    assert kind.answer_problem(calls(call("ping"))) == ""
    assert "must be a JSON object" in kind.answer_problem(json.dumps({"tool_calls": [{"name": "ping",
                                                                                      "arguments": []}]}))


# --- records ---

def test_the_reader_keeps_tool_records(tmp_path):
    items = list(read_source(DATA / "tool_call_task" / "records.jsonl", "records.jsonl", task()))
    assert not [r for r in items if isinstance(r, Rejected)] and len(items) == 60
    assert not [r for r in items if r.problem()]
    two_step = next(r for r in items if any(m["role"] == "tool" for m in r.messages))
    assert [m["role"] for m in two_step.messages] == ["user", "assistant", "tool", "assistant"]
    assert two_step.messages[1]["content"] == ""  # OpenAI's null content of a call
    assert two_step.messages[2]["tool_call_id"] == two_step.messages[1]["tool_calls"][0]["id"]
    # The id is the content's: arguments as JSON text or as an object, and any call id, are one record.
    as_text = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}]
    as_object = [as_text[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]}]
    other_city = [as_text[0], {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bergen"}}}]}]
    assert Record(as_text, "x:1").id == Record(as_object, "x:2").id != Record(other_city, "x:3").id


def test_plain_record_ids_are_unchanged():
    """Records without tool calls keep the ids they had before tools existed (data/processed stays valid)."""
    import hashlib

    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ham"}]
    old = hashlib.sha256(json.dumps([["user", "hi"], ["assistant", "ham"]], ensure_ascii=False).encode()).hexdigest()
    assert Record(plain, "x:1").id == old[:16]


def message(role, content="", **extra):
    return {"role": role, "content": content, **extra}


def function_call(name="get_weather", arguments=None, **extra) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments or {"city": "Oslo"}}, **extra}


@pytest.mark.parametrize(("messages", "reason"), [
    ([message("user", "hi"), message("tool", "42"), message("assistant", "ok")],
     "tool message at position 1 answers no tool call"),
    ([message("user", "hi"), message("assistant", None, tool_calls=["get_weather(Oslo)"])],
     "tool_calls[0] of the assistant message at position 1 is not an object"),
    ([message("user", "hi"), message("assistant", None, tool_calls=[{"type": "function", "function": {"name": 3}}])],
     "tool_calls[0] of the assistant message at position 1 must be"),
    ([message("user", "hi"), message("assistant", None, tool_calls=[function_call()]), message("user", "and?"),
      message("assistant", "ok")], "makes 1 tool call(s) but 0 tool result(s) follow"),
    ([message("user", "hi"), message("assistant", None, tool_calls=[function_call(), function_call()]),
      message("tool", "1"), message("assistant", "ok")], "makes 2 tool call(s) but 1 tool result(s) follow"),
    ([message("user", "hi"), message("assistant", None, tool_calls=[function_call()]), message("tool", "1")],
     "the last message must be the assistant's answer"),
    ([message("user", "hi", tool_calls=[function_call()]), message("assistant", "ok")],
     "only an assistant message may call tools"),
    ([message("user", "hi"), message("assistant", None, tool_calls={"name": "x"})], "tool_calls must be a list"),
    ([message("user", "hi"), message("assistant", None)], "a string content"),
    ([message("user", "hi"), message("assistant", "ok", tool_calls=[function_call(arguments='{"city": "<|im_end|>"}')])],
     "chat-template special token(s) in the assistant message"),
])
def test_bad_tool_records_are_quarantined_with_file_and_line(tmp_path, messages, reason):
    good = [message("user", "Weather in Oslo?"), message("assistant", None, tool_calls=[function_call()])]
    lines = [json.dumps({"messages": good}), json.dumps({"messages": messages})]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    out = prepare(task(), SplitSpec(), tmp_path, specials=["<|im_end|>"])
    assert [(r.file, r.line) for r in out.rejected] == [("records.jsonl", 2)]
    assert reason in out.rejected[0].reason, out.rejected[0].reason


def test_an_answer_that_both_replies_and_calls_is_quarantined(tmp_path):
    both = [message("user", "Weather in Oslo?"), message("assistant", "Let me check.", tool_calls=[function_call()])]
    undeclared = [message("user", "Delete it all"), message("assistant", None,
                                                            tool_calls=[function_call("delete_all", {"x": 1})])]
    off_schema = [message("user", "Weather?"), message("assistant", None,
                                                       tool_calls=[function_call(arguments={"unit": "celsius"})])]
    not_json = [message("user", "Weather in Rome?"),
                message("assistant", None, tool_calls=[function_call(arguments="{city: Rome}")])]
    lines = [json.dumps({"messages": m}) for m in (both, undeclared, off_schema, not_json)]
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    reasons = [r.reason for r in prepare(task(), SplitSpec(), tmp_path).rejected]
    assert reasons[0].startswith("an assistant turn both replies and calls tools")
    assert reasons[1].startswith("call 1 names 'delete_all', not a tool of output.tools")
    assert reasons[2] == "call 1 (get_weather): arguments at /: 'city' is a required property"
    assert reasons[3] == "call 1 (get_weather): arguments must be a JSON object"


def test_prepare_stores_canonical_calls(prepared):
    """Arguments become objects (templates write them with tojson) with the grammar's key order: required
    properties first, in schema order."""
    for record in prepared:
        for m in record["messages"]:
            for c in m.get("tool_calls", []):
                assert isinstance(c["function"]["arguments"], dict) and m["content"] == ""
        assert KIND.answer_problem(KIND.reference(record)) == ""
    event = next(r for r in prepared if "for 90 minutes" in r["messages"][0]["content"])
    arguments = event["messages"][-1]["tool_calls"][0]["function"]["arguments"]
    assert list(arguments) == ["title", "date", "time", "duration_minutes"]
    assert KIND.canonical_answer(calls(call("get_weather", unit="celsius", city="Oslo"))) == \
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]}'
    assert KIND.canonical_answer(calls(call("create_event", duration_minutes=30.0, date="2025-01-01", title="x"))) == \
        '{"tool_calls": [{"name": "create_event", "arguments": {"title": "x", "date": "2025-01-01", ' \
        '"duration_minutes": 30}}]}'


# --- the template: loss, wire format, parsing, grammar ---

def trained_text(tokenizer, rendered) -> str:
    return tokenizer.decode([t for t, label in zip(rendered.input_ids, rendered.labels, strict=True) if label != IGNORE])


def test_the_loss_is_on_each_call_span_exactly(qwen, prepared):
    record = next(r for r in prepared if sum(bool(m.get("tool_calls")) for m in r["messages"]) == 2)
    messages = record["messages"]
    rendered = render(qwen, messages, **KIND.template_kwargs())
    first, last = (m["tool_calls"][0]["function"] for m in (messages[1], messages[3]))
    wire = '<tool_call>\n{{"name": "{}", "arguments": {}}}\n</tool_call><|im_end|>'
    assert trained_text(qwen, rendered) == (wire.format(first["name"], json.dumps(first["arguments"]))
                                            + wire.format(last["name"], json.dumps(last["arguments"])))
    whole = qwen.apply_chat_template(messages, tokenize=False, tools=TOOLS)
    assert rendered.input_ids == qwen(whole, add_special_tokens=False)["input_ids"]
    prompt = qwen(prompt_text(qwen, messages, tools=TOOLS), add_special_tokens=False)["input_ids"]
    assert rendered.input_ids[: len(prompt)] == prompt  # what the model reads at inference
    first_prompt = qwen(prompt_text(qwen, messages[:2], tools=TOOLS), add_special_tokens=False)["input_ids"]
    assert set(rendered.labels[: len(first_prompt)]) == {IGNORE}
    assert '"name": "create_event"' in prompt_text(qwen, messages, tools=TOOLS)  # the tools are in the prompt


def test_plain_records_render_as_before(qwen):
    messages = [message("user", "see you at 5"), message("assistant", "ham")]
    rendered = render(qwen, messages)
    assert trained_text(qwen, rendered) == "ham<|im_end|>"
    assert render(qwen, messages, **{}) == rendered


def test_the_wire_format_is_read_off_the_template(qwen, llama):
    assert ToolCallFormat.from_tokenizer(qwen) == ToolCallFormat(
        prefix="<tool_call>\n", suffix="\n</tool_call>", separator="\n", head='{"name": ', between=', "arguments": ',
        tail="}", name_first=True, name_key="name", arguments_key="arguments")
    # Llama 3.1: bare JSON with the arguments under "parameters"; its template refuses two calls in a turn.
    assert ToolCallFormat.from_tokenizer(llama) == ToolCallFormat(
        prefix="", suffix="", separator=None, head='{"name": ', between=', "parameters": ', tail="}",
        name_first=True, name_key="name", arguments_key="parameters")


def test_a_template_without_tools_fails_with_advice(tokenizer):
    """The embedded SmolLM2's template ignores tools=: a tool_call task on it fails at base_model."""
    problem = template_renders_tools(tokenizer)
    assert problem.startswith("the base model's chat template does not render tools=")
    assert "Qwen2.5-Instruct" in problem
    with pytest.raises(ValueError, match="does not render tools="):
        KIND.bind(tokenizer)


def test_an_unbound_kind_says_how_to_bind():
    with pytest.raises(RuntimeError, match=r"call output.bind\(tokenizer\) first"):
        KIND.from_generation("<tool_call>")
    with pytest.raises(RuntimeError, match="not bound"):
        KIND.grammar("Weather in Oslo?")


def answer_spans(tokenizer, kind, records):
    """(the text the model generates for each record's final answer, the record's reference)."""
    eot = end_of_turn(tokenizer)
    for record in records:
        rendered = render(tokenizer, record["messages"], **kind.template_kwargs())
        final = trained_text(tokenizer, rendered).split(eot)[-2]  # the last trained turn, end-of-turn dropped
        yield final, kind.reference(record)


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_generated_calls_parse_back_to_the_reference(family, request, prepared):
    tokenizer = request.getfixturevalue(family)
    kind = KIND.bind(tokenizer)
    single = [r for r in prepared if len(r["messages"][-1].get("tool_calls", [])) < 2]  # Llama 3.1: one call a turn
    records = prepared if family == "qwen" else single
    for text, reference in answer_spans(tokenizer, kind, records):
        assert kind.from_generation(text) == reference, text
    # Blanks around the call, and arguments written as JSON text, are read the same.
    wire = '{"name": "get_weather", "parameters": "{\\"unit\\": \\"celsius\\", \\"city\\": \\"Oslo\\"}"}'
    if family == "qwen":
        wire = '\n<tool_call>\n' + wire.replace("parameters", "arguments") + '\n</tool_call>\n'
    assert kind.from_generation(wire) == calls(call("get_weather", city="Oslo", unit="celsius"))
    assert kind.from_generation(" It is sunny. ") == reply("It is sunny.")
    if family == "qwen":  # a last call cut off before its closing tag still counts
        assert kind.from_generation('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}') == WEATHER
    # Text that opens as a call but is not one stays as written: an invalid answer.
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' if family == "qwen" else '{"name": 3}'
    assert kind.from_generation(broken) == broken and kind.answer_problem(broken)


def walk(matcher, tokenizer, text: str) -> bool:
    """Whether the grammar takes text token by token and may end there."""
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if not matcher.allowed()[token]:
            return False
        matcher.consume(token)
    return bool(matcher.allowed()[tokenizer.eos_token_id])


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_the_grammar_takes_the_templates_own_calls_token_by_token(family, request, prepared):
    pytest.importorskip("llguidance")
    from tuneforge.core.constraints import GrammarMatcher

    tokenizer = request.getfixturevalue(family)
    kind = KIND.bind(tokenizer)
    grammar = kind.grammar("Weather in Oslo?")
    single = [r for r in prepared if len(r["messages"][-1].get("tool_calls", [])) < 2]
    for text, _ in answer_spans(tokenizer, kind, prepared if family == "qwen" else single):
        assert walk(GrammarMatcher(tokenizer, len(tokenizer), grammar), tokenizer, text), text
    opening = "<tool_call>\n" if family == "qwen" else ""
    refused = [opening + '{"name": "delete_all", "arguments": {}}',                        # an undeclared tool
               opening + '{"name": "get_weather", "arguments": {"unit": "celsius"}}',      # a required argument missing
               opening + '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"}}',
               ("<b>bold</b>" if family == "qwen" else "{not a call}"),                    # a reply that opens as a call
               "   padded"]
    for text in refused:
        assert not walk(GrammarMatcher(tokenizer, len(tokenizer), grammar), tokenizer, text), text
    if family == "llama":  # one call a turn
        two = '{"name": "get_weather", "parameters": {"city": "Oslo"}}{"name": "get_weather", "parameters": {"city": "Rome"}}'
        assert not walk(GrammarMatcher(tokenizer, len(tokenizer), grammar), tokenizer, two)


def test_llama_cpp_parses_the_grammar(qwen, llama):
    llama_cpp = pytest.importorskip("llama_cpp")
    for tokenizer in (qwen, llama):
        llama_cpp.LlamaGrammar.from_string(KIND.bind(tokenizer).grammar(""), verbose=False)


# --- the answer contract and the metrics ---

@pytest.mark.parametrize(("answer", "problem"), [
    (calls(call("get_weather", city="Oslo")), ""),
    (reply("Hello!"), ""),
    (calls(call("get_weather", city="Oslo"), call("get_weather", city="Rome")), ""),
    ("get_weather(Oslo)", "answer is not valid JSON"),
    ('{"tool_calls": []}', "tool_calls must be a non-empty list"),
    ('{"content": "  "}', "the reply without a call is empty"),
    ('{"content": "x", "extra": 1}', 'answer must be {"tool_calls": [...]} or {"content": "..."}'),
    ('{"tool_calls": [{"name": "get_weather"}]}', 'call 1 must be {"name": <tool name>, "arguments": {...}}'),
    (calls(call("get_weather", city="Oslo"), call("delete_all")), "call 2 names 'delete_all', not a tool of output.tools (['get_weather', 'convert_units', 'create_event'])"),
    (calls(call("get_weather", city="Oslo", unit="kelvin")),
     "call 1 (get_weather): arguments at /unit: 'kelvin' is not one of ['celsius', 'fahrenheit']"),
    (calls(call("create_event", title="x", date="2025-01-01", duration_minutes=0)),
     "call 1 (create_event): arguments at /duration_minutes: 0 is less than the minimum of 1"),
])
def test_answer_problem(answer, problem):
    assert KIND.answer_problem(answer) == problem


WEATHER = calls(call("get_weather", city="Oslo"))
EVENT = calls(call("create_event", title="Gym", date="2025-02-20", time="18:00"))
REFERENCES = [WEATHER, WEATHER, EVENT, EVENT, reply("Hi!"), reply("Hi!"), WEATHER]
OUTPUTS = [
    WEATHER,                                                                  # ok
    calls(call("get_weather", city="Oslo", unit="celsius")),                  # wrong arguments (one extra leaf)
    calls(call("create_event", title="Gym", date="2025-02-21", time="18:00")),  # wrong arguments (2 of 3 leaves)
    calls(call("convert_units", value=1, from_unit="km", to_unit="mi")),      # wrong tool
    reply("Hello there"),                                                     # ok: no call needed, none made
    WEATHER,                                                                  # called when no call was needed
    "<tool_call>\n{oops",                                                     # invalid call
]


def test_metrics_on_known_answers():
    scores = KIND.score(["x"] * len(OUTPUTS), REFERENCES, OUTPUTS)
    assert scores["n"] == 7
    assert scores["exact_match"] == pytest.approx(2 / 7)             # rows 1 and 5
    assert scores["tool_accuracy"] == pytest.approx(4 / 7)           # rows 1, 2, 3, 5
    assert scores["arguments_exact"] == pytest.approx(1 / 3)         # of rows 1-3, whose tool is right
    # leaves: expected 1+1+3+3+0+0+1 = 9; predicted 1+2+3+3+0+1+0 = 10; right 1+1+2+0 = 4
    assert scores["arguments_f1"] == pytest.approx(2 * 4 / (9 + 10))
    assert scores["valid_call"] == pytest.approx(4 / 5)              # rows 1-4 of the five needing a call
    assert scores["no_call_accuracy"] == pytest.approx(1 / 2)
    assert scores["valid_answer"] == pytest.approx(6 / 7)
    assert scores["per_tool"]["get_weather"]["support"] == 3
    assert scores["per_tool"][NO_CALL] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    kinds = [KIND.error_kind(o, r, "x") for o, r in zip(OUTPUTS, REFERENCES, strict=True)]
    assert kinds == ["ok", "wrong arguments", "wrong arguments", "wrong tool", "ok",
                     "called when no call was needed", "invalid call"]
    assert KIND.error_kind(reply("No."), WEATHER, "x") == "no call when one was needed"
    assert KIND.error_kind("", WEATHER, "x") == "empty output"
    assert KIND.error_kind(calls(call("delete_all")), WEATHER, "x") == "undeclared tool"
    assert KIND.error_kind(calls(call("get_weather")), WEATHER, "x") == "arguments break the schema"
    assert [KIND.example_score(o, r, "x") for o, r in zip(OUTPUTS, REFERENCES, strict=True)] == \
        pytest.approx([1.0, 2 / 3, 2 / 3, 0.0, 1.0, 0.0, 0.0])
    # Parallel calls in another order are the same answer.
    two = calls(call("get_weather", city="Oslo"), call("get_weather", city="Rome"))
    swapped = calls(call("get_weather", city="Rome"), call("get_weather", city="Oslo"))
    assert KIND.score(["x"], [two], [swapped])["exact_match"] == 1.0
    assert [KIND.category(a) for a in (two, reply("Hi"), "nope")] == ["get_weather", NO_CALL, "(invalid)"]
    assert KIND.answer_balance([two, reply("Hi"), EVENT]) == {"get_weather": 2, NO_CALL: 1, "create_event": 1}


def test_metric_functions_take_resamples():
    rows = np.random.default_rng(0).integers(0, len(OUTPUTS), size=(5, len(OUTPUTS)))
    totals = KIND.totals(["x"] * len(OUTPUTS), REFERENCES, OUTPUTS, rows)
    for name, f in KIND.metric_functions().items():
        assert f(totals).shape == (5,), name
    once = KIND.totals(["x"] * len(OUTPUTS), REFERENCES, OUTPUTS, np.arange(len(OUTPUTS))[None, :])
    assert KIND.metric_functions()["exact_match"](once)[0] == pytest.approx(2 / 7)


def test_the_baseline_picks_the_tool_and_borrows_arguments(prepared):
    train = [r for i, r in enumerate(prepared) if i % 4]
    test = [r for i, r in enumerate(prepared) if not i % 4]
    outputs = KIND.baseline(train, test)
    assert len(outputs) == len(test) and all(KIND.answer_problem(o) == "" for o in outputs)
    scores = KIND.score([KIND.input_text(r) for r in test], [KIND.reference(r) for r in test], outputs)
    assert scores["tool_accuracy"] >= 0.6, scores
    assert KIND.baseline(train, test) == outputs  # deterministic
