"""`tuneforge serve` without --task: both embedded tasks from one process over one base GGUF, each request routed
by its `model` field to its task's adapter, system prompt and request log.

Real files throughout: the base converted and quantized like the base_gguf stage does, a real (random, non-trivial)
LoRA adapter per task converted with llama.cpp's convert_lora_to_gguf.py, and each task's merged model exported
like the export stage does; each served answer must equal its merged file's. Both are f16 here
(export.base_quantization: F16): over a quantized base the adapter's product is added unrounded while the merged
file rounds it with the weights, so near-ties can flip (the export report measures how often, per task).
"""

import json
import os

import pytest
import torch

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")
openai = pytest.importorskip("openai")
import httpx

from tests.serving import start_server
from tuneforge.core import quantize
from tuneforge.core.gguf import load_llama
from tuneforge.core.params import load_params

pytestmark = pytest.mark.slow  # builds GGUF adapters and serves them

TASKS = {"address_json": ("Parse the US address into JSON.", ["1600 Pennsylvania Ave NW, Washington, DC 20500",
                                                              "350 Fifth Avenue, New York, NY 10118"]),
         "sms_spam": ("Classify the SMS as spam or ham.", ["WINNER!! Claim your prize now", "see you at 6 then"])}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def root(module_tmp, repo_root, base_model_dir):
    """A repository root holding what base_gguf and both export stages write."""
    try:
        quantize.converter_dir("convert_lora_to_gguf.py")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = module_tmp
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["export"]["base_quantization"] = "F16"
    params["serve"]["allow_client_max_tokens"] = True  # short answers (MAX_TOKENS) keep the comparison quick
    params["tasks"] = {t: params["tasks"][t] for t in TASKS}  # the two tasks this module builds adapters for
    params["train"]["task_overrides"] = {t: v for t, v in params["train"]["task_overrides"].items() if t in TASKS}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "dvc.yaml").write_text("stages: {}\n")
    scratch = root / "scratch"
    quantize.convert_to_gguf(base_model_dir, root / "models" / "base_gguf" / "model-F16.gguf")  # as base_gguf writes it
    for seed, task in enumerate(TASKS):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False))
        with torch.no_grad():  # random B, small enough to keep the model fluent, large enough to change answers
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        gguf = root / "models" / task / "gguf"
        peft_model.save_pretrained(scratch / task / "adapter")
        quantize.convert_lora_to_gguf(scratch / task / "adapter", base_model_dir, gguf / "adapter-f16.gguf")
        peft_model.merge_and_unload().save_pretrained(scratch / task / "merged")
        AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(scratch / task / "merged")
        quantize.convert_to_gguf(scratch / task / "merged", gguf / "model-f16.gguf")
    return root


def merged_answer(root, task: str, text: str) -> str:
    """The merged file's answer to the request the server makes of it: the task's grammar, plain greedy."""
    from llama_cpp import LlamaGrammar

    output = load_params(root / "params.yaml").task(task).output
    grammar = {"grammar": LlamaGrammar.from_string(output.grammar(text), verbose=False)} if output.constrained else {}
    llm = load_llama(root / "models" / task / "gguf" / "model-f16.gguf", n_threads=2)
    reply = llm.create_chat_completion(messages=[{"role": "system", "content": TASKS[task][0]},
                                                 {"role": "user", "content": text}], temperature=0, max_tokens=MAX_TOKENS,
                                       repeat_penalty=1.0, **grammar)
    llm.close()
    return reply["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def server(root):
    proc, url, _ = start_server(root)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def log_rows(root, task: str) -> list[dict]:
    path = root / "data" / "production" / task / "requests.jsonl"  # core.paths.production_file(task)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_models_lists_every_task(server):
    listed = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in listed["data"]] == list(TASKS)


def test_each_task_answers_like_its_merged_file_and_logs_to_its_own_file(server, root):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    served = {}
    # Interleaved, so every request switches the adapter: A, B, A, B.
    for i in range(2):
        for task, (_, inputs) in TASKS.items():
            reply = client.chat.completions.create(model=task, messages=[{"role": "user", "content": inputs[i]}],
                                                   max_tokens=MAX_TOKENS)
            assert reply.model == task
            served[task, inputs[i]] = reply.choices[0].message.content
    for (task, text), answer in served.items():
        assert answer == merged_answer(root, task, text), (task, text)
    assert served["address_json", TASKS["address_json"][1][0]] != served["sms_spam", TASKS["sms_spam"][1][0]]
    for task, (_, inputs) in TASKS.items():
        rows = log_rows(root, task)
        assert [r["input"] for r in rows] == inputs  # each task's traffic in its own file, nothing in the other's
        assert all(r["task"] == task and r["model_file"] == "adapter-f16.gguf" and r["base_file"] == "model-F16.gguf"
                   for r in rows)
        assert [r["output"] for r in rows] == [served[task, text] for text in inputs]
    # MAX_TOKENS is below address_json's max_new_tokens: params allows it here, and the log says the client cut it.
    assert all(r["client_max_tokens"] == MAX_TOKENS for r in log_rows(root, "address_json"))


def test_a_request_for_no_task_is_refused_and_not_logged(server, root):
    before = {task: len(log_rows(root, task)) for task in TASKS}
    for body in ({"messages": [{"role": "user", "content": "hi"}]},
                 {"model": "other", "messages": [{"role": "user", "content": "hi"}]}):
        reply = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
        assert reply.status_code == 404
        assert "address_json" in reply.json()["error"]["message"] and "sms_spam" in reply.json()["error"]["message"]
    assert {task: len(log_rows(root, task)) for task in TASKS} == before


def test_serving_without_adapters_says_which_stage_to_run(tmp_path, repo_root):
    from tuneforge.serve import ServeError, build_app

    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text())  # base_quantization: Q8_0
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "models" / "base_gguf").mkdir(parents=True)
    os.environ["TUNEFORGE_ROOT"] = str(tmp_path)
    try:
        with pytest.raises(ServeError, match="run `dvc repro base_gguf`"):
            build_app()
        (tmp_path / "models" / "base_gguf" / "model-Q8_0.gguf").write_bytes(b"")
        with pytest.raises(ServeError, match="export@address_json export@sms_spam"):
            build_app()
    finally:
        del os.environ["TUNEFORGE_ROOT"]
