"""`tuneforge serve` for a tool_call task: OpenAI `tools=` requests answered with `tool_calls`, the task's own tools
rendered by the chat template as in training (whatever the request sends), other tools refused, every answer logged
as its answer string.

The served model is a tiny Qwen2 (Qwen2.5-Instruct's chat template, tests/data/tool_call_task's tools) built to call:
its layers add nothing, so each next token depends on the current one only; its output head prefers '"' (strings
close as soon as they open, keys open), then ',' and '}' (numbers and objects end), then the end of the turn, and
makes '<' the answer to the newline that ends the generation prompt. Under the task's grammar it therefore always
opens a call (a reply cannot start with '<') and finishes it within the token budget. A random model may reply
instead, and LoRA training on random weights had not learnt to open a call after 200 steps (80 s on this CPU).
"""

import asyncio
import copy
import json

import pytest
import yaml

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import jsonschema  # noqa: E402

from tests.serving import start_server  # noqa: E402
from tuneforge.core.kinds import output_spec  # noqa: E402
from tuneforge.serve import Route, contract_problem, served_answer, tools_problem  # noqa: E402

from .conftest import ROOT, load_script  # noqa: E402

DATA = ROOT / "tests" / "data"
TASK = "assistant"
TOOLS = yaml.safe_load((DATA / "tool_call_task" / "tools.yaml").read_text())
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def reordered(tools: list[dict]) -> list[dict]:
    """The same tools, each object's keys in reverse order."""
    return [{"function": dict(reversed(list(t["function"].items()))), "type": t["type"]} for t in tools]


# The served task declares its tools with their keys in another order than llama-cpp-python's request schema writes
# them, and one with OpenAI's "strict", which that schema drops: the prompt must still be the one training renders.
TASK_TOOLS = reordered([{**t, "function": {**t["function"], "strict": False}} if i == 0 else t
                        for i, t in enumerate(TOOLS)])
SYSTEM_PROMPT = "You are a helpful assistant with tools."
TEMPLATE = (DATA / "chat_templates" / "qwen2.5-instruct.jinja").read_text()
MAX_NEW_TOKENS = 160  # the built model writes a call a character at a time: ~105 tokens
QUESTION = "Convert 12 mi to km."

builder = load_script("make_random_model")
if not builder.VOCAB_DIR.exists():
    pytest.skip("the vocabulary GGUFs are fetched by scripts/fetch_gguf_converter.sh", allow_module_level=True)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    tokenizer = builder.family_tokenizer("qwen2")
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tool_call(qwen_tokenizer):
    return output_spec(kind="tool_call", tools=TOOLS).bind(qwen_tokenizer)


# --- without a server ---

def choice(text: str) -> dict:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}


def test_calls_go_back_as_openai_tool_calls_and_replies_as_content(tool_call):
    weather = {"name": "get_weather", "arguments": {"city": "Paris"}}
    units = {"name": "convert_units", "arguments": {"value": 5, "from_unit": "km", "to_unit": "mi"}}
    wire = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in (weather, units))
    answered = choice(wire)
    answer = served_answer(answered, tool_call)
    assert json.loads(answer) == {"tool_calls": [weather, units]} and not tool_call.answer_problem(answer)
    assert answered["finish_reason"] == "tool_calls"
    assert answered["message"] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1", "type": "function", "function": {"name": "convert_units", "arguments": json.dumps(
            json.loads(answer)["tool_calls"][1]["arguments"])}}]}  # in the answer's (the grammar's) key order

    replied = choice("Hello! How can I help?")
    assert served_answer(replied, tool_call) == '{"content": "Hello! How can I help?"}'
    assert replied == choice("Hello! How can I help?")  # a reply is sent back as it was written

    # An answer that breaks the contract (a tool the task does not have) goes back as content, as it is logged.
    broken = choice('<tool_call>\n{"name": "book_flight", "arguments": {}}\n</tool_call>')
    answer = served_answer(broken, tool_call)
    assert tool_call.answer_problem(answer) and broken["message"] == {"role": "assistant", "content": answer}
    assert broken["finish_reason"] == "stop"


def test_other_kinds_send_their_text_back_unchanged():
    label = output_spec(kind="label", labels=["spam", "ham"])
    answered = choice("spam")
    assert served_answer(answered, label) == "spam" and answered == choice("spam")


def test_only_the_tasks_own_tools_are_accepted():
    assert tools_problem(copy.deepcopy(TOOLS), TOOLS) == ""
    assert tools_problem(reordered(TOOLS)[::-1], TOOLS) == ""  # the same tools: keys and tools in another order
    changed = copy.deepcopy(TOOLS)
    changed[0]["function"]["description"] = "The weather."
    foreign = {"type": "function", "function": {"name": "book_flight", "parameters": {"type": "object"}}}
    names = "['get_weather', 'convert_units', 'create_event']"
    for sent, difference in ((changed, "defined otherwise ['get_weather']"), (TOOLS[1:], "missing ['get_weather']"),
                             ([*TOOLS, foreign], "not its own ['book_flight']"), ([*TOOLS, TOOLS[0]], "repeat a name"),
                             ({"tools": TOOLS}, "not a list")):
        problem = tools_problem(sent, TOOLS)
        assert problem.startswith("tools: not the task's tools") and difference in problem, problem
        assert f"it answers with the tools it was trained on: {names}" in problem


def test_a_label_task_still_refuses_tools(tmp_path):
    route = Route("spam", tmp_path / "requests.jsonl", "", tmp_path / "model.gguf", "0" * 64,
                  output=output_spec(kind="label", labels=["spam", "ham"]))
    messages = [{"role": "user", "content": "WINNER!! Claim your prize now"}]
    for fields in ({"tools": TOOLS}, {"tool_choice": "auto"}):
        problem = contract_problem({"messages": messages, **fields}, route)
        assert problem.startswith(f"{next(iter(fields))}: not accepted here") and "its own tools" not in problem


def test_a_chat_task_takes_a_conversation_and_logs_it_as_evaluation_reads_it(tmp_path):
    """Only a chat task answers earlier turns; its log input is the kind's input_text, as in the predictions file."""
    from tuneforge.serve import logged_input

    chat = Route("talk", tmp_path / "requests.jsonl", "", tmp_path / "model.gguf", "0" * 64,
                 output=output_spec(kind="chat"))
    label = Route("spam", tmp_path / "requests.jsonl", "", tmp_path / "model.gguf", "0" * 64,
                  output=output_spec(kind="label", labels=["spam", "ham"]))
    conversation = [{"role": "user", "content": "Suggest a subject"}, {"role": "assistant", "content": "Lunch"},
                    {"role": "user", "content": "In capitals"}]
    assert contract_problem({"messages": conversation}, chat) == ""
    assert "answers one user message" in contract_problem({"messages": conversation}, label)
    assert "turns alternate" in contract_problem({"messages": [conversation[0], *conversation]}, chat)
    assert "turns alternate" in contract_problem({"messages": conversation[1:]}, chat)
    record = {"messages": [*conversation, {"role": "assistant", "content": "LUNCH"}]}
    assert logged_input(chat, conversation) == chat.output.input_text(record)
    assert logged_input(label, conversation[-1:]) == "In capitals"


# --- served: a built model that calls (slow: builds its GGUFs, starts llama.cpp servers) ---


def calling_model(folder):
    """The tiny Qwen2 of the module docstring, as a HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = builder.make_random_model("qwen2", folder, shape={**builder.SHAPES["tiny"], "tie_word_embeddings": False})
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def token(text: str) -> int:
        (token_id,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        return token_id

    with torch.no_grad():
        for layer in model.model.layers:  # the last hidden state is the current token's embedding, normalised
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed[:, 0] = 1.0  # one feature every token has (~15 after the final norm): head column 0 is a preference
        head.zero_()  # every other token scores 0: ties go to the lowest id, a single character
        head[token('"'), 0] = 2.0
        head[token(","), 0] = head[token("}"), 0] = 1.5
        head[token("<|im_end|>"), 0] = 1.0
        head[token("<")] = 40 * embed[token("\n")]  # ~60 after the newline, ~0 after other tokens
        head[token("<"), 0] = 0.0
    model.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def project(module_tmp, repo_root):
    """A repository root with the tool_call task, its base (models/base), its merged GGUF (here the base's own
    weights, as f16) and, for serving without --task, the base GGUF and a no-op adapter GGUF."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.core import quantize
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import adapter_gguf_file, base_gguf_file, base_model_dir, task_gguf_file
    from tuneforge.stages.base_model import save_base_model

    base = calling_model(module_tmp / "built")
    root = module_tmp / "project"
    root.mkdir()
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["model"]["base"] = str(base)
    params["tasks"] = {TASK: {"source": "data/raw/assistant/records.jsonl", "reader": "chat_jsonl",
                              "system_prompt": SYSTEM_PROMPT, "max_new_tokens": MAX_NEW_TOKENS,
                              "output": {"kind": "tool_call", "tools": TASK_TOOLS}}}
    params["train"]["task_overrides"] = {}
    params["export"]["base_quantization"] = "F16"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "vendor").symlink_to(repo_root / "vendor")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNEFORGE_ROOT", str(root))
        save_base_model(load_params(root / "params.yaml").model, base_model_dir())
        merged = quantize.convert_to_gguf(base_model_dir(), task_gguf_file(TASK, "f16"))
        base_gguf_file("F16").parent.mkdir(parents=True)
        base_gguf_file("F16").symlink_to(merged)
        adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir()),  # B = 0: changes nothing
                                 LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        adapter.save_pretrained(module_tmp / "adapter")
        quantize.convert_lora_to_gguf(module_tmp / "adapter", base_model_dir(), adapter_gguf_file(TASK))
    return root


@pytest.fixture(scope="module")
def server(project):
    proc, url, _ = start_server(project, "--task", TASK, "--quantization", "f16")
    yield url, project / "data" / "production" / TASK / "requests.jsonl"
    proc.terminate()
    proc.wait(timeout=20)


def logged(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
def test_tools_requests_are_answered_with_tool_calls_and_logged(server):
    url, log = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=TASK, messages=[{"role": "user", "content": QUESTION}],
                                           tools=TASK_TOOLS)
    answered = reply.choices[0]
    assert answered.finish_reason == "tool_calls" and answered.message.content is None
    assert answered.message.tool_calls, answered.message
    calls = []
    for i, call in enumerate(answered.message.tool_calls):
        assert (call.id, call.type) == (f"call_{i}", "function") and call.function.name in PARAMETERS
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS[call.function.name])
        calls.append({"name": call.function.name, "arguments": arguments})

    row = logged(log)[-1]
    assert row["input"] == QUESTION and row["finish_reason"] == "tool_calls"
    assert json.loads(row["output"]) == {"tool_calls": calls}  # the answer string, as drift reads it
    assert output_spec(kind="tool_call", tools=TASK_TOOLS).answer_problem(row["output"]) == ""

    # The task's tools are in the prompt whatever the request says: without tools=, or with tool_choice "auto",
    # the same answer.
    for fields in ({}, {"tool_choice": "auto"}):
        again = client.chat.completions.create(model=TASK, messages=[{"role": "user", "content": QUESTION}], **fields)
        assert again.choices[0].message.tool_calls == answered.message.tool_calls, fields
    assert [r["output"] for r in logged(log)[-2:]] == [row["output"]] * 2


@pytest.mark.slow
def test_other_tools_and_tool_choices_are_refused(server):
    url, log = server
    before = len(logged(log))
    changed = copy.deepcopy(TASK_TOOLS)
    changed[2]["function"]["parameters"]["required"] = ["title"]
    messages = [{"role": "user", "content": QUESTION}]
    refused = {json.dumps({"tools": changed}): "defined otherwise ['create_event']",
               json.dumps({"tools": TASK_TOOLS[:1]}): "missing ['convert_units', 'create_event']",
               json.dumps({"tools": TOOLS}): "defined otherwise ['get_weather']"}  # without its "strict"
    for tool_choice in ("required", "none", {"type": "function", "function": {"name": "get_weather"}}):
        refused[json.dumps({"tools": TASK_TOOLS, "tool_choice": tool_choice})] = "send tool_choice \"auto\" or none"
    for fields, reason in refused.items():
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **json.loads(fields)}, timeout=60)
        assert reply.status_code == 400, fields
        assert reason in reply.json()["error"]["message"], reply.json()
    with pytest.raises(openai.BadRequestError, match="it answers with the tools it was trained on"):
        openai.OpenAI(base_url=f"{url}/v1", api_key="unused").chat.completions.create(
            model=TASK, messages=messages, tools=changed)
    assert len(logged(log)) == before


@pytest.mark.slow
def test_the_served_prompt_is_the_trained_prompt_over_the_base_with_adapters(project, qwen_tokenizer, monkeypatch):
    """Without --task (base GGUF + the task's adapter), in this process: the tokens llama.cpp reads are those of
    the HF tokenizer's prompt_text with the task's tools as declared (training and evaluation's prompt), whatever
    order the client's tools come in."""
    import llama_cpp.server.app as server_app

    from tuneforge.core.chat import prompt_text
    from tuneforge.serve import build_app

    monkeypatch.setenv("TUNEFORGE_ROOT", str(project))
    app = build_app(None)
    llm = server_app._llama_proxy.switch.llm
    prompts = []
    create_completion = llm.create_completion

    def recording(*args, **kwargs):
        prompts.append(kwargs["prompt"])
        return create_completion(*args, **kwargs)

    llm.create_completion = recording
    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await client.post("/v1/chat/completions", timeout=120, json={
                "model": TASK, "messages": [{"role": "user", "content": QUESTION}], "tools": reordered(TASK_TOOLS)})

    try:
        reply = asyncio.run(ask())
    finally:
        server_app._llama_proxy.free()
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["tool_calls"], reply.text
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": ""}]
    trained = qwen_tokenizer(prompt_text(qwen_tokenizer, messages, tools=TASK_TOOLS),
                             add_special_tokens=False)["input_ids"]
    assert len(prompts) == 1
    assert qwen_tokenizer.decode(prompts[0]) == qwen_tokenizer.decode(trained)
    assert list(prompts[0]) == trained
