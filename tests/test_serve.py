"""`tuneforge serve` on a free loopback port: real chat completions through the openai client, logged for drift."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/setup.sh")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tuneforge.stages import export  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, repo_root, base_model_dir):
    if not (repo_root / "vendor" / "llama.cpp-converter" / "convert_hf_to_gguf.py").exists():
        pytest.skip("the GGUF converter is fetched by scripts/setup.sh")
    root = tmp_path_factory.mktemp("serve")
    shutil.copy(repo_root / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "vendor").symlink_to(repo_root / "vendor")
    gguf = root / "models" / "address_json" / "gguf"
    os.environ["TUNEFORGE_ROOT"] = str(root)
    try:
        export.quantize_gguf(export.convert_to_gguf(base_model_dir, gguf / "model-f16.gguf"), gguf / "model-Q8_0.gguf", "Q8_0")
    finally:
        del os.environ["TUNEFORGE_ROOT"]
    port = free_port()
    env = {**os.environ, "TUNEFORGE_ROOT": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", "--task", "address_json", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.stdout.read().decode()[-2000:]}")
    yield url, root / "data" / "production" / "address_json.jsonl"
    proc.terminate()
    proc.wait(timeout=20)


def test_chat_completions_are_answered_and_logged(server):
    url, log = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    inputs = ["123 Main St, Springfield, IL 62701", "PO Box 42, Austin, TX 78701"]
    for text in inputs:
        reply = client.chat.completions.create(model="address_json", max_tokens=24,
                                               messages=[{"role": "user", "content": text}])
        assert isinstance(reply.choices[0].message.content, str)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["input"] for r in rows[-2:]] == inputs
    for row in rows[-2:]:
        assert row["latency_ms"] > 0 and row["model_file"] == "model-Q8_0.gguf"  # export.gate_quantization
        assert len(row["model_sha256"]) == 64 and row["timestamp"] > 0 and "output" in row


def test_malformed_requests_get_clear_4xx_and_the_server_keeps_serving(server):
    url, log = server
    before = log.read_text().count("\n") if log.exists() else 0
    post = lambda body: httpx.post(f"{url}/v1/chat/completions", content=body,  # noqa: E731
                                   headers={"content-type": "application/json"}, timeout=60)
    bad_json = post(b'{"messages": [')
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    empty = post(json.dumps({"messages": []}).encode())
    assert empty.status_code == 400 and "non-empty list" in empty.json()["error"]["message"]
    wrong = post(json.dumps({"messages": [{"role": "user", "content": 5}]}).encode())
    assert wrong.status_code == 400
    huge = post(json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]}).encode())
    assert huge.status_code == 413 and "exceeds" in huge.json()["error"]["message"]
    ok = post(json.dumps({"messages": [{"role": "user", "content": "1 Elm St"}], "max_tokens": 8}).encode())
    assert ok.status_code == 200
    assert log.read_text().count("\n") == before + 1  # only the good request was logged
