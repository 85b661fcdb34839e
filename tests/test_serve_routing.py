"""`tuneforge serve` routing each request between the fine-tune and the classical model (serve_routing.py).

Real servers over the pipeline's own files: sms_spam's served GGUF, its classical model (skops) and router, and for
the multi-task server the base GGUF with the address_json and sms_spam adapters. The routers here are either the
evaluation stage's or crafted (fitted on synthetic confidences so that one answerer always wins, or each wins some
requests, or every request defers), saved beside a copy of the classical model as the evaluation stage saves them.
Skipped where the pipeline has not made those files.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tuneforge.core.router import CLASSICAL, FINE_TUNE, ROUTER_FILE, Router, load_classical, load_router  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK, QUANTIZATION = "sms_spam", "Q4_K_M"  # the file sms_spam's export gate chose: its logits differ most by batch
SYSTEM_PROMPT = "Classify the SMS as spam or ham."  # params.yaml's
SMS = ["WINNER!! You have been selected for a £900 prize. Call 09061701461 to claim now",
       "Ok lar... Joking wif u oni...", "Are you coming to the pub tonight? Text me",
       "FREE entry in 2 a wkly comp to win FA Cup final tkts. Text FA to 87121",
       "I'll be home late, don't wait up for dinner", "URGENT! Your mobile number has won a 2000 bonus. Call now"]


def needed(*paths: Path) -> None:
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"made by the pipeline (`dvc repro`), not here: {missing}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_root(root: Path, tasks: list[str]) -> Path:
    """A repository root with params.yaml (only `tasks`), and each task's classical folder copied (the tests
    rewrite its router)."""
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tasks"] = {t: params["tasks"][t] for t in tasks}
    params["train"]["task_overrides"] = {t: v for t, v in params["train"]["task_overrides"].items() if t in tasks}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    for task in tasks:
        shutil.copytree(ROOT / "models" / task / "classical", root / "models" / task / "classical")
    return root


@pytest.fixture(scope="module")
def root(module_tmp):
    """sms_spam served from its export gate's file, with a copy of its classical folder."""
    gguf = ROOT / "models" / TASK / "gguf" / f"model-{QUANTIZATION}.gguf"
    needed(gguf, ROOT / "models" / TASK / "classical" / ROUTER_FILE)
    root = write_root(module_tmp / "single", [TASK])
    (root / "models" / TASK / "gguf").mkdir(parents=True)
    (root / "models" / TASK / "gguf" / gguf.name).symlink_to(gguf)
    (root / "metrics" / TASK).mkdir(parents=True)
    (root / "metrics" / TASK / "export.json").write_text(json.dumps({"served_quantization": QUANTIZATION}))
    return root


def start_server(root: Path, *args: str):
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "TUNEFORGE_API_KEY"}, "TUNEFORGE_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", "--port", str(port), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"server did not start: {proc.stdout.read().decode()[-2000:]}")


class Serving:
    """A server over root, stopped on exit: the task's merged file (task None: every task over the base GGUF)."""

    def __init__(self, root: Path, *args: str, task: str | None = TASK):
        self.root, self.args = root, (*(("--task", task) if task else ()), *args)

    def __enter__(self):
        self.proc, self.url = start_server(self.root, *self.args)
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


def exported_routes(llm, tokenizer, task: str, texts: list[str], router: Router, classical) -> list[dict]:
    """What the export stage does with the same router: generate_gguf's answers and confidences, the classical
    model's, Router.route."""
    from tuneforge.core.constraints import grammars_for
    from tuneforge.core.gguf import generate_gguf
    from tuneforge.core.params import load_params

    spec = load_params(ROOT / "params.yaml").task(task)
    output = spec.output.bind(tokenizer)
    rows = records(task, texts)
    run = generate_gguf(llm, tokenizer, rows, spec.max_new_tokens, output, grammars=grammars_for(output, rows))
    answers, confidences = output.classical_answers(classical, rows)
    routes = router.route(run.confidences, confidences)
    return [{"answered_by": r.answerer, "deferred": r.deferred, "confidence": r.confidence,
             "fine_tune_confidence": ft, "classical_confidence": cl,
             "content": "" if r.deferred else Router.answers([r], [ft_answer], [cl_answer])[0]}
            for r, ft, cl, ft_answer, cl_answer in zip(routes, run.confidences, confidences, run.outputs, answers)]


def assert_same_routes(served: list, exported: list[dict]) -> None:
    """Served completions against exported_routes, confidence by confidence (the fine-tune's within 1e-5: llama.cpp's
    logprobs are float32)."""
    for reply, expected in zip(served, exported, strict=True):
        routing = reply.model_extra["tuneforge"]
        assert routing["answered_by"] == expected["answered_by"] and routing["deferred"] == expected["deferred"]
        assert reply.choices[0].message.content == expected["content"]
        assert routing["fine_tune_confidence"] == pytest.approx(expected["fine_tune_confidence"], abs=1e-5)
        assert routing["classical_confidence"] == pytest.approx(expected["classical_confidence"], abs=1e-9)
        assert routing["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)


@pytest.mark.slow  # six answers under two routers, then the same through generate_gguf
@pytest.mark.parametrize("router", ["evaluated", "mixed"])
def test_served_routes_are_the_export_stages_with_the_same_router(root, tokenizer, router):
    """The evaluation stage's router, and one where each answerer wins some requests: serve's answerer, answer and
    confidences for each request are what generate_gguf's confidences, the classical model's answers and the same
    Router give (the export stage's routing), on the same GGUF file."""
    from tuneforge.core.gguf import load_llama
    from tuneforge.core.params import load_params

    folder = root / "models" / TASK / "classical"
    set_router(root, load_router(ROOT / "models" / TASK / "classical") if router == "evaluated" else mixed())
    with Serving(root) as server:
        served = [server.ask(text) for text in SMS]
    trusted = load_params(root / "params.yaml").task(TASK).output.classical_trusted
    llm = load_llama(root / "models" / TASK / "gguf" / f"model-{QUANTIZATION}.gguf", n_threads=2)
    try:
        exported = exported_routes(llm, tokenizer, TASK, SMS, load_router(folder), load_classical(folder, trusted))
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

    tampered = write_root(tmp_path, [TASK])
    shutil.copytree(root / "models" / TASK / "gguf", tampered / "models" / TASK / "gguf", symlinks=True)
    shutil.copytree(root / "metrics", tampered / "metrics")
    folder = tampered / "models" / TASK / "classical"
    env = {**{k: v for k, v in os.environ.items() if k != "TUNEFORGE_API_KEY"}, "TUNEFORGE_ROOT": str(tampered)}

    def start() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tuneforge.cli", "serve", "--task", TASK, "--port",
                               str(free_port())], env=env, capture_output=True, text=True, timeout=120)

    sio.dump(FunctionTransformer(os.system), folder / "model.skops")  # a "model" that would run shell commands
    refused = start()
    assert refused.returncode == 2 and "does not trust" in refused.stderr and "system" in refused.stderr
    shutil.copy(ROOT / "models" / TASK / "classical" / "model.skops", folder / "model.skops")
    (folder / ROUTER_FILE).write_text('{"fine_tune": ')
    unreadable = start()
    assert unreadable.returncode == 2 and "router.json could not be read" in unreadable.stderr


@pytest.mark.slow  # address_json's answers are ~50 tokens
def test_multi_task_serve_routes_each_task_with_its_own_router(module_tmp, tokenizer):
    """Without --task: the base GGUF with each task's adapter, each task routed by its own router; sms_spam's
    routes are the export stage's over the same base and adapter."""
    from tuneforge.core.adapters import AdapterSwitch
    from tuneforge.core.params import load_params

    tasks = ["address_json", TASK]
    base = ROOT / "models" / "base_gguf" / "model-Q8_0.gguf"
    needed(base, *[ROOT / "models" / t / "gguf" / "adapter-f16.gguf" for t in tasks],
           *[ROOT / "models" / t / "classical" / ROUTER_FILE for t in tasks])
    root = write_root(module_tmp / "multi", tasks)
    (root / "models" / "base_gguf").mkdir(parents=True)
    (root / "models" / "base_gguf" / base.name).symlink_to(base)
    for task in tasks:
        adapter = Path("models") / task / "gguf" / "adapter-f16.gguf"
        (root / adapter).parent.mkdir(parents=True)
        (root / adapter).symlink_to(ROOT / adapter)
    address = "1600 Pennsylvania Ave NW, Washington, DC 20500"
    with Serving(root, task=None) as server:
        spam = [server.ask(text) for text in SMS[:3]]
        parsed = server.ask(address, task="address_json")
    params = load_params(root / "params.yaml")
    switch = AdapterSwitch.load(base, {TASK: ROOT / "models" / TASK / "gguf" / "adapter-f16.gguf"}, n_threads=2)
    try:
        switch.use(TASK)
        folder = root / "models" / TASK / "classical"
        exported = exported_routes(switch.llm, tokenizer, TASK, SMS[:3], load_router(folder),
                                   load_classical(folder, params.task(TASK).output.classical_trusted))
    finally:
        switch.close()
    assert_same_routes(spam, exported)
    # address_json: its own router and classical model (a JSON object in the fine-tune's own form when it answers).
    output = params.task("address_json").output
    folder = root / "models" / "address_json" / "classical"
    classical_answer = output.classical_answers(load_classical(folder, output.classical_trusted),
                                                records("address_json", [address]))[0][0]
    routing = parsed.model_extra["tuneforge"]
    row = log_rows(root, "address_json")[-1]
    assert row["classical_output"] == classical_answer and {k: row[k] for k in routing} == routing
    routed = {FINE_TUNE: row["fine_tune_output"], CLASSICAL: classical_answer}[routing["answered_by"]]
    assert parsed.choices[0].message.content == ("" if routing["deferred"] else routed)
    assert [r["answered_by"] for r in log_rows(root)] == [r.model_extra["tuneforge"]["answered_by"] for r in spam]
