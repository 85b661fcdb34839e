"""`tuneforge serve` routing each request between the fine-tune and the classical model (serve_routing.py).

Real servers over files this module builds itself, so that it runs from a fresh clone (no pipeline output needed):

- sms_spam's served GGUF: the embedded SmolLM2 base GGUF (Q4_1), under the name the export stage gives sms_spam's
  gate quantization (metrics/sms_spam/export.json says which), as test_serve.py serves it;
- each task's classical model: its output kind's fit_classical on the first few hundred train records of the
  repository's own raw data (split by the prepare stage), saved by core.router.save_classical as the evaluation
  stage saves it;
- the routers: the "evaluated" one fitted as the evaluation stage fits it (Router.fit on both answerers' raw
  confidences and per-example scores over validation SMS, route.max_deferral), here on the served file's own
  generate_gguf answers; the others crafted (fitted on synthetic confidences so that one answerer always wins, or
  each wins some requests, or every request defers);
- for the multi-task server: a base GGUF converted from the base_model_dir fixture and a random LoRA adapter per
  task (address_json, sms_spam) converted with convert_lora_to_gguf, as test_multiserve.py builds them.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import yaml

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tests.serving import free_port, start_server  # noqa: E402
from tuneforge.core.params import load_params  # noqa: E402
from tuneforge.core.router import (  # noqa: E402
    CLASSICAL,
    FINE_TUNE,
    ROUTER_FILE,
    Router,
    load_classical,
    load_router,
    save_classical,
)

pytestmark = pytest.mark.slow  # starts llama.cpp servers

ROOT = Path(__file__).resolve().parents[1]
TASK, QUANTIZATION = "sms_spam", "Q4_K_M"  # the export gate's usual choice for sms_spam (the smallest file)
TRAIN_ROWS = 400  # train records each classical model is fitted on: a second or two, a usable model
CALIBRATION_ROWS = 20  # validation SMS the evaluated router is fitted on (at most 1 defers at route.max_deferral 0.05)
SMS = ["WINNER!! You have been selected for a £900 prize. Call 09061701461 to claim now",
       "Ok lar... Joking wif u oni...", "Are you coming to the pub tonight? Text me",
       "FREE entry in 2 a wkly comp to win FA Cup final tkts. Text FA to 87121",
       "I'll be home late, don't wait up for dinner", "URGENT! Your mobile number has won a 2000 bonus. Call now"]


@cache
def prepared(task: str):
    """The task's raw source as the prepare stage reads, dedupes and splits it."""
    from tuneforge.stages.prepare import prepare

    params = load_params(ROOT / "params.yaml")
    return prepare(params.task(task), params.split, ROOT)


def split_records(task: str, split: str, n: int, leave_out: tuple[str, ...] = ()) -> list[dict]:
    """The first n records of one of the task's splits whose input is none of leave_out."""
    rows = [r.to_json() for r in prepared(task).splits[split] if r.user_text not in leave_out]
    return rows[:n]


@cache
def fit_classical(task: str):
    """The task's classical model, fitted by its output kind on TRAIN_ROWS train records (leaving the test SMS out)."""
    train = split_records(task, "train", TRAIN_ROWS, leave_out=tuple(SMS))
    return load_params(ROOT / "params.yaml").task(task).output.fit_classical(train)


def write_root(root: Path, classical: dict) -> Path:
    """A repository root with params.yaml (only the tasks of `classical`) and each task's classical folder holding
    its model (classical: task -> fitted model) and no router yet: the tests write the router each needs."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tasks"] = {t: params["tasks"][t] for t in classical}
    params["train"]["task_overrides"] = {t: v for t, v in params["train"]["task_overrides"].items() if t in classical}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    for task, model in classical.items():
        save_classical(root / "models" / task / "classical", model, None)
    return root


def served_file(root: Path) -> Path:
    return root / "models" / TASK / "gguf" / f"model-{QUANTIZATION}.gguf"  # core.paths.task_gguf_file


@pytest.fixture(scope="module")
def root(module_tmp):
    """sms_spam served from the embedded base GGUF, as if its export gate chose that file, with its classical model."""
    from tuneforge.stages.base_model import EMBEDDED_GGUF, embedded_gguf_folder

    root = write_root(module_tmp / "single", {TASK: fit_classical(TASK)})
    served_file(root).parent.mkdir(parents=True)
    served_file(root).symlink_to(embedded_gguf_folder() / EMBEDDED_GGUF)
    (root / "metrics" / TASK).mkdir(parents=True)
    (root / "metrics" / TASK / "export.json").write_text(json.dumps({"served_quantization": QUANTIZATION}))
    return root


def gguf_answers(llm, tokenizer, rows: list[dict]):
    """generate_gguf's sms_spam answers and raw confidences (the export stage's decoding: grammar, greedy)."""
    from tuneforge.core.constraints import grammars_for
    from tuneforge.core.gguf import generate_gguf

    spec = load_params(ROOT / "params.yaml").task(TASK)
    output = spec.output.bind(tokenizer)
    return generate_gguf(llm, tokenizer, rows, spec.max_new_tokens, output, grammars=grammars_for(output, rows))


@pytest.fixture(scope="module")
def evaluated(root, tokenizer) -> Router:
    """The router the evaluation stage would fit for the served file: both answerers' raw confidences on validation
    SMS (none of the test SMS), each answer scored against the SMS's real label (evaluate.per_example)."""
    from tuneforge.core.gguf import load_llama
    from tuneforge.stages.evaluate import per_example

    params = load_params(root / "params.yaml")
    spec = params.task(TASK)
    rows = split_records(TASK, "validation", CALIBRATION_ROWS, tuple(SMS))
    llm = load_llama(served_file(root), n_threads=2)
    try:
        fine_tune = gguf_answers(llm, tokenizer, rows)
    finally:
        llm.close()
    folder = root / "models" / TASK / "classical"
    answers, confidences = spec.output.classical_answers(load_classical(folder, spec.output.classical_trusted), rows)

    def scores(outputs: list[str]) -> list[float]:
        return [per_example(spec, r, o)[0] for r, o in zip(rows, outputs, strict=True)]

    return Router.fit(fine_tune.confidences, scores(fine_tune.outputs), confidences, scores(answers),
                      params.route.max_deferral)


class Serving:
    """A server over root, stopped on exit: the task's merged file (task None: every task over the base GGUF)."""

    def __init__(self, root: Path, *args: str, task: str | None = TASK):
        self.root, self.args = root, (*(("--task", task) if task else ()), *args)

    def __enter__(self):
        self.proc, self.url, _ = start_server(self.root, *self.args)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused")
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=20)

    def ask(self, text: str, task: str = TASK):
        return self.client.chat.completions.create(model=task, messages=[{"role": "user", "content": text}])


def set_router(root: Path, router: Router, task: str = TASK) -> None:
    (root / "models" / task / "classical" / ROUTER_FILE).write_text(json.dumps(router.to_json()))


def crafted(winner: str) -> Router:
    """A router under which `winner` is expected to score 1 and the other answerer 0, whatever their confidences."""
    raw = [0.0, 0.5, 1.0]
    ones, zeros = [1.0] * 3, [0.0] * 3
    scores = (ones, zeros) if winner == FINE_TUNE else (zeros, ones)
    return Router.fit(raw, scores[0], raw, scores[1], max_deferral=0.0)


def mixed() -> Router:
    """A router under which the classical model answers where its raw confidence is above 0.97, the fine-tune
    elsewhere (expected to score 0.5 everywhere), and nothing defers."""
    return Router.fit([0.0, 1.0], [0.5, 0.5], [0.95, 0.99], [0.0, 1.0], max_deferral=0.0)


def log_rows(root: Path, task: str = TASK) -> list[dict]:
    path = root / "data" / "production" / task / "requests.jsonl"  # core.paths.production_file(task)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def records(task: str, texts: list[str]) -> list[dict]:
    system = yaml.safe_load((ROOT / "params.yaml").read_text())["tasks"][task]["system_prompt"]
    return [{"messages": [{"role": "system", "content": system}, {"role": "user", "content": text},
                          {"role": "assistant", "content": ""}]} for text in texts]


def exported_routes(llm, tokenizer, texts: list[str], router: Router, classical) -> list[dict]:
    """What the export stage decides with the same router over the same file: generate_gguf's answers and
    confidences, routed by its ExportRouting against the classical model's (the answers at 0% deferral: a deferred
    row keeps its answerer's), and Router.route's answerer, confidence and deferral."""
    from tuneforge.stages.export import ExportRouting

    rows = records(TASK, texts)
    run = gguf_answers(llm, tokenizer, rows)
    answers, confidences = load_params(ROOT / "params.yaml").task(TASK).output.classical_answers(classical, rows)
    routed, _ = ExportRouting(router, answers, confidences, reference=[]).route(run.outputs, run.confidences)
    routes = router.route(run.confidences, confidences)
    return [{"answered_by": r.answerer, "deferred": r.deferred, "confidence": r.confidence,
             "fine_tune_confidence": ft, "classical_confidence": cl, "content": answer}
            for r, ft, cl, answer in zip(routes, run.confidences, confidences, routed, strict=True)]


def assert_same_routes(served: list, exported: list[dict]) -> None:
    """Served completions against exported_routes, confidence by confidence; a deferred request is served an empty
    answer. The fine-tune's confidence within a relative 1e-5 (llama.cpp's logprobs are float32): the bare base
    model's confidence in its "spam" or "ham" is far below 1e-5, which an absolute tolerance would not tell apart."""
    for reply, expected in zip(served, exported, strict=True):
        routing = reply.model_extra["tuneforge"]
        assert routing["answered_by"] == expected["answered_by"] and routing["deferred"] == expected["deferred"]
        assert reply.choices[0].message.content == ("" if expected["deferred"] else expected["content"])
        assert routing["fine_tune_confidence"] == pytest.approx(expected["fine_tune_confidence"], rel=1e-5)
        assert routing["classical_confidence"] == pytest.approx(expected["classical_confidence"], abs=1e-9)
        assert routing["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)


@pytest.mark.parametrize("router", ["evaluated", "mixed"])
def test_served_routes_are_the_export_stages_with_the_same_router(root, tokenizer, evaluated, router):
    """The evaluation stage's router, and one where each answerer wins some requests: serve's answerer, answer and
    confidences for each request are what generate_gguf's confidences, the classical model's answers and the same
    Router give (the export stage's routing), on the same GGUF file."""
    from tuneforge.core.gguf import load_llama

    folder = root / "models" / TASK / "classical"
    set_router(root, evaluated if router == "evaluated" else mixed())
    with Serving(root) as server:
        served = [server.ask(text) for text in SMS]
    trusted = load_params(root / "params.yaml").task(TASK).output.classical_trusted
    llm = load_llama(served_file(root), n_threads=2)
    try:
        exported = exported_routes(llm, tokenizer, SMS, load_router(folder), load_classical(folder, trusted))
    finally:
        llm.close()
    assert_same_routes(served, exported)
    assert all(reply.choices[0].logprobs is None for reply in served)  # asked for by routing, not sent back


def test_a_crafted_router_picks_the_answerer_and_the_log_records_both_answers(root):
    before = len(log_rows(root))
    set_router(root, crafted(FINE_TUNE))
    with Serving(root) as server:
        by_fine_tune = server.ask(SMS[2])
    set_router(root, crafted(CLASSICAL))
    with Serving(root) as server:
        by_classical = server.ask(SMS[2])
    assert by_fine_tune.model_extra["tuneforge"]["answered_by"] == FINE_TUNE
    assert by_classical.model_extra["tuneforge"]["answered_by"] == CLASSICAL
    for reply in (by_fine_tune, by_classical):
        routing = reply.model_extra["tuneforge"]
        assert set(routing) == {"answered_by", "confidence", "fine_tune_confidence", "classical_confidence", "deferred"}
        assert routing["confidence"] == 1.0 and not routing["deferred"]  # the winner's calibration: 1 everywhere
        assert 0 < routing["fine_tune_confidence"] <= 1 and 0.5 <= routing["classical_confidence"] <= 1
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content in ("spam", "ham")
    rows = log_rows(root)[before:]
    assert [r["answered_by"] for r in rows] == [FINE_TUNE, CLASSICAL]
    for row, reply in zip(rows, (by_fine_tune, by_classical), strict=True):
        routing = reply.model_extra["tuneforge"]
        assert {k: row[k] for k in routing} == routing
        assert row["output"] == reply.choices[0].message.content and row["input"] == SMS[2]
        assert row[f"{row['answered_by']}_output"] == row["output"]
        assert row["fine_tune_output"] in ("spam", "ham") and row["classical_output"] in ("spam", "ham")


def test_a_deferred_request_gets_an_empty_answer_and_drift_judges_none(root):
    from tuneforge.core.traffic import read_traffic
    from tuneforge.stages.drift import judged_outputs

    set_router(root, replace(crafted(CLASSICAL), defer_below=(2.0, 0.0)))  # above every calibrated confidence
    before = len(log_rows(root))
    with Serving(root) as server:
        reply = server.ask(SMS[1])
        streamed = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                              json={"messages": [{"role": "user", "content": SMS[1]}], "stream": True})
    assert streamed.status_code == 400 and "routing" in streamed.json()["error"]["message"]
    assert reply.choices[0].message.content == "" and reply.choices[0].finish_reason == "deferred"
    routing = reply.model_extra["tuneforge"]
    assert routing["deferred"] and routing["answered_by"] == CLASSICAL  # who would have answered
    row = log_rows(root)[before]
    assert row["deferred"] and row["finish_reason"] == "deferred" and row["output"] is None
    assert row["fine_tune_output"] in ("spam", "ham") and row["classical_output"] in ("spam", "ham")  # for review
    rows, problems = read_traffic(root / "data" / "production" / TASK / "requests.jsonl")
    assert not problems and judged_outputs(rows)[before] is None  # not an invalid answer: no answer at all


def test_routing_off_serves_the_fine_tune_alone(root):
    set_router(root, crafted(CLASSICAL))
    before = len(log_rows(root))
    with Serving(root, "--no-route") as server:
        reply = server.ask(SMS[0])
    assert "tuneforge" not in (reply.model_extra or {}) and reply.choices[0].message.content in ("spam", "ham")
    assert "answered_by" not in log_rows(root)[before]


def test_a_tampered_classical_model_or_router_stops_start_up(root, tmp_path):
    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    tampered = tmp_path / "root"
    shutil.copytree(root, tampered, symlinks=True)
    set_router(tampered, crafted(CLASSICAL))  # routed: the classical model is loaded at start-up
    folder = tampered / "models" / TASK / "classical"
    env = {**{k: v for k, v in os.environ.items() if k != "TUNEFORGE_API_KEY"}, "TUNEFORGE_ROOT": str(tampered)}

    def start() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tuneforge.cli", "serve", "--task", TASK, "--port",
                               str(free_port())], env=env, capture_output=True, text=True, timeout=120)

    sio.dump(FunctionTransformer(os.system), folder / "model.skops")  # a "model" that would run shell commands
    refused = start()
    assert refused.returncode == 2 and "does not trust" in refused.stderr and "system" in refused.stderr
    shutil.copy(root / "models" / TASK / "classical" / "model.skops", folder / "model.skops")
    (folder / ROUTER_FILE).write_text('{"fine_tune": ')
    unreadable = start()
    assert unreadable.returncode == 2 and "router.json could not be read" in unreadable.stderr


@pytest.fixture(scope="module")
def multi_root(module_tmp, base_model_dir, evaluated):
    """address_json and sms_spam over one base GGUF (converted from base_model_dir, export.base_quantization), each
    with a random LoRA adapter as GGUF and its classical model: sms_spam routed by the evaluated router, address_json
    by one under which its classical model always answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.core import quantize

    try:
        quantize.converter_dir("convert_lora_to_gguf.py")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    multi = write_root(module_tmp / "multi", {t: fit_classical(t) for t in ("address_json", TASK)})
    set_router(multi, evaluated)
    set_router(multi, crafted(CLASSICAL), task="address_json")
    base = load_params(multi / "params.yaml").export.base_quantization
    quantize.convert_to_gguf(base_model_dir, multi / "models" / "base_gguf" / f"model-{base}.gguf",
                             base.lower())  # Q8_0: the converter writes it directly
    for seed, task in enumerate(("address_json", TASK)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        with torch.no_grad():  # random B, small enough to keep the model fluent, large enough to change answers
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        peft_model.save_pretrained(multi / "scratch" / task)
        quantize.convert_lora_to_gguf(multi / "scratch" / task, base_model_dir,
                                      multi / "models" / task / "gguf" / "adapter-f16.gguf")  # core.paths' name
    return multi


def test_multi_task_serve_routes_each_task_with_its_own_router(multi_root, tokenizer):
    """Without --task: the base GGUF with each task's adapter, each task routed by its own router; sms_spam's
    routes are the export stage's over the same base and adapter."""
    from tuneforge.core.adapters import AdapterSwitch

    root = multi_root
    address = "1600 Pennsylvania Ave NW, Washington, DC 20500"
    with Serving(root, task=None) as server:
        spam = [server.ask(text) for text in SMS[:3]]
        parsed = server.ask(address, task="address_json")
    params = load_params(root / "params.yaml")
    base = root / "models" / "base_gguf" / f"model-{params.export.base_quantization}.gguf"
    switch = AdapterSwitch.load(base, {TASK: root / "models" / TASK / "gguf" / "adapter-f16.gguf"}, n_threads=2)
    try:
        switch.use(TASK)
        folder = root / "models" / TASK / "classical"
        exported = exported_routes(switch.llm, tokenizer, SMS[:3], load_router(folder),
                                   load_classical(folder, params.task(TASK).output.classical_trusted))
    finally:
        switch.close()
    assert_same_routes(spam, exported)
    # address_json: its own router and classical model, which always answers (a JSON object in the fine-tune's form).
    output = params.task("address_json").output
    folder = root / "models" / "address_json" / "classical"
    classical_answer = output.classical_answers(load_classical(folder, output.classical_trusted),
                                                records("address_json", [address]))[0][0]
    routing = parsed.model_extra["tuneforge"]
    row = log_rows(root, "address_json")[-1]
    assert routing["answered_by"] == CLASSICAL and not routing["deferred"]
    assert row["classical_output"] == classical_answer and {k: row[k] for k in routing} == routing
    assert isinstance(row["fine_tune_output"], str)  # the fine-tune answered too, for review
    assert parsed.choices[0].message.content == classical_answer
    assert [r["answered_by"] for r in log_rows(root)] == [r.model_extra["tuneforge"]["answered_by"] for r in spam]
