"""`tuneforge serve`: the exported GGUF behind llama.cpp's OpenAI-compatible server, every request logged.

Each answered chat completion is appended to data/production/<task>.jsonl (input, output, latency,
model file hash, timestamp): the current traffic the drift stage compares with the test split.
The server binds to loopback by default and sends nothing anywhere else.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tuneforge.core.constraints import constrain_request
from tuneforge.core.params import OutputSpec
from tuneforge.core.traffic import append_request

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see export.py: spin-waits stall a busy small machine


class RequestLog:
    """ASGI middleware around /v1/chat/completions: checks the request, adds the task's system
    prompt when the client sent none, and logs the answered request."""

    def __init__(self, app, *, task: str, log_file: Path, system_prompt: str, model_file: Path, model_sha256: str,
                 max_input_chars: int, output: OutputSpec | None = None):
        self.app, self.task, self.log_file = app, task, log_file
        self.output = output  # the task's output kind: each request decodes under its grammar (core.constraints)
        self.system_prompt, self.model_file, self.model_sha256 = system_prompt, model_file, model_sha256
        self.max_input_chars = max_input_chars

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        payload, problem, status = self.check(body)
        if problem:
            return await reply_error(send, status, problem)

        new_body = json.dumps(payload).encode()
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                 + [(b"content-length", str(len(new_body)).encode())]}
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()

        response = {"status": 500, "body": b""}
        start = time.perf_counter()

        async def capture(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body":
                response["body"] += message.get("body", b"")
                if not message.get("more_body") and response["status"] == 200:
                    self.log(payload, response["body"], time.perf_counter() - start)  # logged before the client hears back
            await send(message)

        await self.app(scope, replay, capture)

    def log(self, payload: dict, body: bytes, seconds: float) -> None:
        answer = json.loads(body)
        user = [m["content"] for m in payload["messages"] if m.get("role") == "user"]
        append_request(self.log_file, {
            "task": self.task, "input": user[-1] if user else "", "output": answer["choices"][0]["message"]["content"],
            "latency_ms": 1000 * seconds, "model_file": self.model_file.name, "model_sha256": self.model_sha256,
        })

    def check(self, body: bytes) -> tuple[dict, str, int]:
        """(payload with defaults, problem, HTTP status): a clear 4xx instead of a server error."""
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return {}, f"request body is not valid JSON: {err}", 400
        if not isinstance(payload, dict):
            return {}, "request body must be a JSON object", 400
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return {}, "'messages' must be a non-empty list", 400
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                   for m in messages):
            return {}, "each message needs a role (system, user or assistant) and a string content", 400
        size = sum(len(m["content"]) for m in messages)
        if size > self.max_input_chars:
            return {}, f"input of {size} characters exceeds this server's limit of {self.max_input_chars}", 413
        if payload.get("stream"):
            return {}, "streaming is not supported: the request log needs the whole answer", 400
        if messages[0]["role"] != "system" and self.system_prompt:
            payload["messages"] = [{"role": "system", "content": self.system_prompt}, *messages]
        payload.setdefault("temperature", 0.0)
        if self.output is not None:
            constrain_request(payload, self.output)
        return payload, "", 200


async def reply_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_app(task: str, quantization: str | None = None, n_ctx: int = 1024):
    """quantization: a type from export.quantizations; by default the one the export gate checked."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from tuneforge.core.gguf import file_sha256
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import models_dir, production_file

    params = load_params()
    spec = params.task(task)
    model_file = models_dir(task) / "gguf" / f"model-{quantization or params.export.gate_quantization}.gguf"
    if not model_file.exists():
        raise FileNotFoundError(f"{model_file} does not exist: run `dvc repro export@{task}` first")
    app = create_app(server_settings=ServerSettings(),
                     model_settings=[ModelSettings(model=str(model_file), model_alias=task, n_ctx=n_ctx,
                                                   n_threads=params.export.n_threads, verbose=False)])
    # A character is at least a quarter of a token here; keep room for the answer in the context.
    return RequestLog(app, task=task, log_file=production_file(task), system_prompt=spec.system_prompt,
                      model_file=model_file, model_sha256=file_sha256(model_file), max_input_chars=2 * n_ctx,
                      output=spec.output)


def serve(task: str, host: str, port: int, quantization: str | None) -> None:
    import uvicorn

    uvicorn.run(build_app(task, quantization), host=host, port=port, log_level="warning")
