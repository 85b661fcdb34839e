"""`tuneforge serve` on a free loopback port: real chat completions through the openai client, logged for drift,
and hostile requests answered with clear 4xx statuses (never a 500, never unlogged traffic).

The server runs the embedded SmolLM2 GGUF (the base model's own file) under the name the export stage gives the
gate quantization: serving is what is tested here, the export is tested in test_export.py.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tests import serving  # noqa: E402
from tests.serving import free_port  # noqa: E402
from tuneforge.core.paths import production_file  # noqa: E402
from tuneforge.stages.base_model import EMBEDDED_GGUF, embedded_gguf_folder  # noqa: E402

pytestmark = pytest.mark.slow  # starts llama.cpp servers

SYSTEM_PROMPT = "Parse the US address into JSON."  # params.yaml's address_json prompt: must never be echoed
MAX_NEW_TOKENS = 8  # address_json's answer budget in these tests: the server's cap, short answers keep them quick


@pytest.fixture(scope="module")
def serve_root(module_tmp, repo_root):
    root = module_tmp
    params = yaml.safe_load((repo_root / "params.yaml").read_text())
    params["tasks"]["address_json"]["max_new_tokens"] = MAX_NEW_TOKENS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text("stages: {}\n")
    gguf = root / "models" / "address_json" / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "model-Q8_0.gguf").symlink_to(embedded_gguf_folder() / EMBEDDED_GGUF)
    (root / "metrics" / "address_json").mkdir(parents=True)  # the export gate chose that file:
    (root / "metrics" / "address_json" / "export.json").write_text('{"served_quantization": "Q8_0"}')
    return root


def start_server(root, *extra_args, env_extra=None):
    """address_json's server over root (tests.serving.start_server)."""
    return serving.start_server(root, "--task", "address_json", *extra_args, env_extra=env_extra)


def production_file_in(root):
    os.environ["TUNEFORGE_ROOT"] = str(root)
    try:
        return production_file("address_json")
    finally:
        del os.environ["TUNEFORGE_ROOT"]


@pytest.fixture(scope="module")
def server(serve_root):
    proc, url, port = start_server(serve_root)
    yield url, production_file_in(serve_root), port
    proc.terminate()
    proc.wait(timeout=20)


def logged_lines(log) -> int:
    return log.read_text().count("\n") if log.exists() else 0


def post(url, path="/v1/chat/completions", body=b"", content_type="application/json", **headers):
    if content_type:
        headers["content-type"] = content_type
    return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60)


def chat(text: str, **fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}], **fields}).encode()


def test_chat_completions_are_answered_and_logged(server, serve_root):
    url, log, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    inputs = ["123 Main St, Springfield, IL 62701", "PO Box 42, Austin, TX 78701"]
    for text in inputs:
        reply = client.chat.completions.create(model="address_json", max_tokens=24,
                                               messages=[{"role": "user", "content": text}])
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.model == "address_json"  # not the GGUF's absolute path
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["input"] for r in rows[-2:]] == inputs
    for row in rows[-2:]:
        assert row["latency_ms"] > 0 and row["model_file"] == "model-Q8_0.gguf"  # served_quantization
        assert len(row["model_sha256"]) == 64 and row["timestamp"] > 0 and "output" in row
        assert "cut_by_time_limit" not in row  # the field is there only when the server's time limit cut the answer
    raw = post(url, body=chat("1 Elm St"))
    assert raw.status_code == 200 and str(serve_root) not in raw.text and ".gguf" not in raw.text


def test_malformed_requests_get_clear_4xx_and_the_server_keeps_serving(server):
    url, log, _ = server
    before = logged_lines(log)
    bad_json = post(url, body=b'{"messages": [')
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    empty = post(url, body=json.dumps({"messages": []}).encode())
    assert empty.status_code == 400 and "non-empty list" in empty.json()["error"]["message"]
    wrong = post(url, body=json.dumps({"messages": [{"role": "user", "content": 5}]}).encode())
    assert wrong.status_code == 400
    huge = post(url, body=chat("x" * 100_000))
    assert huge.status_code == 413 and "exceeds" in huge.json()["error"]["message"]
    deep = post(url, body=b"[" * 5000 + b"]" * 5000)
    assert deep.status_code == 400
    # A field llama-cpp-python validates itself: its reason comes back, the rewritten request does not.
    typo = post(url, body=chat("1 Elm St", max_tokens="lots"))
    assert typo.status_code == 422 and "max_tokens" in typo.text and SYSTEM_PROMPT not in typo.text
    ok = post(url, body=chat("1 Elm St"), content_type="application/json; charset=utf-8")
    assert ok.status_code == 200
    assert logged_lines(log) == before + 1  # only the good request was logged


def test_every_other_endpoint_is_refused_and_nothing_unlogged_is_answered(server):
    """Issue 12, item 5: POST /v1/completions was answered with no log, no system prompt and no limit."""
    url, log, _ = server
    before = logged_lines(log)
    completion = post(url, "/v1/completions", json.dumps({"prompt": "1 Elm St", "max_tokens": 4}).encode())
    assert completion.status_code == 404 and "/v1/chat/completions" in completion.json()["error"]["message"]
    for path in ("/v1/engines/copilot-codex/completions", "/v1/embeddings", "/extras/tokenize", "/extras/detokenize"):
        assert post(url, path, b'{"input": "x", "prompt": "x", "tokens": [1]}').status_code == 404, path
    for path in ("/docs", "/openapi.json", "/"):
        assert httpx.get(f"{url}{path}").status_code == 404, path
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405
    preflight = httpx.options(f"{url}/v1/chat/completions", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    models = httpx.get(f"{url}/v1/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["address_json"]
    assert ".gguf" not in models.text
    assert logged_lines(log) == before


def test_models_are_listed_in_openais_shape(server, serve_root):
    url, _, _ = server
    listed = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").models.list()
    assert [(m.id, m.object, m.owned_by) for m in listed.data] == [("address_json", "model", "tuneforge")]
    served_file = serve_root / "models" / "address_json" / "gguf" / "model-Q8_0.gguf"
    assert listed.data[0].created == int(served_file.stat().st_mtime)


def test_models_are_listed_while_the_model_is_busy(tmp_path):
    """llama-cpp-python's /v1/models waited for the model's lock, so a health check timed out behind running
    answers: RequestLog answers it itself. Here the app behind it never answers at all."""
    import asyncio

    from tuneforge.serve import RequestLog, Route

    async def busy_model(scope, receive, send):
        await asyncio.Event().wait()

    model_file = tmp_path / "model-Q8_0.gguf"
    model_file.write_bytes(b"")
    app = RequestLog(busy_model, max_input_chars=2048, routes={
        "address_json": Route("address_json", tmp_path / "requests.jsonl", SYSTEM_PROMPT, model_file, "0" * 64)})

    async def list_models():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            return await asyncio.wait_for(client.get("/v1/models"), 5)

    listed = asyncio.run(list_models())
    assert listed.status_code == 200
    assert listed.json() == {"object": "list", "data": [{"id": "address_json", "object": "model", "owned_by": "tuneforge",
                                                         "created": int(model_file.stat().st_mtime)}]}


def test_non_json_bodies_get_415_without_echo(server):
    """Issue 12, item 8: curl -d, text/plain and forms got a 500 that echoed the body with the system prompt."""
    url, log, _ = server
    before = logged_lines(log)
    for content_type in ("application/x-www-form-urlencoded", "text/plain", None, "multipart/form-data; boundary=x"):
        reply = post(url, body=chat("1 Elm St"), content_type=content_type)
        assert reply.status_code == 415, content_type
        assert "Content-Type: application/json" in reply.json()["error"]["message"]
        assert SYSTEM_PROMPT not in reply.text
    assert logged_lines(log) == before


def test_lone_surrogates_and_oversized_fields_are_refused(server):
    """Issue 12, items 8 and 12: a lone surrogate gave a 500; a 1 MB `stop` list passed the content-only limit."""
    url, log, _ = server
    before = logged_lines(log)
    surrogate = post(url, body=b'{"messages": [{"role": "user", "content": "1 Elm \\ud800 St"}]}')
    assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["error"]["message"]
    stops = post(url, body=chat("1 Elm St", stop=["ab"] * 1500))  # 3,000 characters outside message content
    assert stops.status_code == 413 and "all fields" in stops.json()["error"]["message"]
    big = post(url, body=chat("1 Elm St", user="x" * 1_000_000))
    assert big.status_code == 413
    assert logged_lines(log) == before


def raw_request(port: int, head: bytes, body_parts) -> bytes:
    """Send a request's head and part of its body, never finishing it, and read what the server says."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        try:
            s.sendall(head)
            for part in body_parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the rest arrived: what it said is still readable
        return s.recv(4096)


def test_size_check_runs_while_the_body_streams_in(server):
    """Issue 12, item 12: the whole body was buffered before the 413. The body here never ends, so only an
    early answer can arrive (the old code waited for the rest and the read timed out)."""
    _, log, port = server
    before = logged_lines(log)
    declared = raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                           b"content-length: 20000000\r\n\r\n", [b'{"messages": [' + b" " * 1000])
    assert declared.startswith(b"HTTP/1.1 413")
    chunk = b" " * 8192
    chunked = raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          b"transfer-encoding: chunked\r\n\r\n", [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 8)
    assert chunked.startswith(b"HTTP/1.1 413")
    assert logged_lines(log) == before


def test_api_key_required_beyond_loopback_and_enforced_when_set(serve_root):
    refused = subprocess.run([sys.executable, "-m", "tuneforge.cli", "serve", "--task", "address_json",
                              "--host", "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if k != "TUNEFORGE_API_KEY"},
                                  "TUNEFORGE_ROOT": str(serve_root)}, timeout=120)
    assert refused.returncode == 2
    assert "TUNEFORGE_API_KEY" in refused.stderr and "Traceback" not in refused.stderr

    proc, url, _ = start_server(serve_root, env_extra={"TUNEFORGE_API_KEY": "s3cret"})
    try:
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert post(url, body=chat("1 Elm St")).status_code == 401
        assert post(url, body=chat("1 Elm St"), authorization="Bearer wrong").status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret")
        reply = client.chat.completions.create(model="address_json", messages=[{"role": "user", "content": "1 Elm St"}])
        assert isinstance(reply.choices[0].message.content, str)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
