"""`tuneforge serve`: the exported GGUF behind llama.cpp's OpenAI-compatible server, every answer logged.

With --task: that task's merged GGUF (the file its export gate chose). Without: every task from one process,
over one base GGUF (models/base_gguf) with each task's LoRA adapter (GGUF) loaded once; the request's `model`
field (the task name) picks the adapter, the system prompt and the request log; /v1/models lists the tasks.

Each answered chat completion is appended to data/production/<task>/requests.jsonl (input, output, latency,
model file hash, timestamp): the current traffic the drift stage compares with the test split.
Only two routes are answered: POST /v1/chat/completions (checked, given the task's system prompt, logged)
and GET /v1/models (the task name, no input). Everything else llama-cpp-python offers (raw completions,
embeddings, tokenizer endpoints, API docs, CORS preflight) is refused, so no traffic escapes the log.
The server binds to loopback by default; any other address needs an API key.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from tuneforge.core.constraints import constrain_request
from tuneforge.core.params import OutputSpec
from tuneforge.core.traffic import append_request

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see export.py: spin-waits stall a busy small machine

API_KEY_ENV = "TUNEFORGE_API_KEY"
CHAT = "/v1/chat/completions"
ROUTES = {CHAT: "POST", "/v1/models": "GET"}


class ServeError(ValueError):
    """A setting that keeps the server from starting, said in one sentence."""


@dataclass
class Route:
    """Where one task's requests go: its system prompt, its request log, and the files that answer it."""

    task: str
    log_file: Path
    system_prompt: str
    model_file: Path  # the merged GGUF, or the task's adapter GGUF over base_file
    model_sha256: str
    base_file: Path | None = None
    base_sha256: str | None = None
    # The task's output kind: each request decodes under its grammar (core.constraints), as evaluated.
    output: OutputSpec | None = None

    def log_fields(self) -> dict:
        fields = {"model_file": self.model_file.name, "model_sha256": self.model_sha256}
        if self.base_file is not None:
            fields.update(base_file=self.base_file.name, base_sha256=self.base_sha256)
        return fields


class RequestLog:
    """ASGI middleware in front of llama-cpp-python's app.

    For every HTTP request: API key (when set), route, then for chat completions: content type, size while
    the body streams in, JSON, message shape, a character limit over every string, the task (by the `model`
    field when several are served), the task's system prompt when the client sent none; the answer is logged
    to that task's file before the client hears back. Errors are short JSON messages in OpenAI's shape that
    never echo the (rewritten) request.
    """

    def __init__(self, app, *, routes: dict[str, Route], max_input_chars: int, api_key: str | None = None):
        """One route: every request goes to it, whatever its `model` field says; several: `model` must name one."""
        self.app, self.routes = app, routes
        self.max_input_chars = max_input_chars
        # A character escapes to at most 6 bytes (\uXXXX); field names and punctuation get a fixed allowance.
        self.max_body_bytes = 6 * max_input_chars + 16_384
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets: nothing here speaks them
            return await send({"type": "websocket.close", "code": 1008})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and not self.authorised(headers.get("authorization", "")):
            return await reply_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     extra_headers=[(b"www-authenticate", b"Bearer")])
        path, method = scope["path"], scope["method"]
        if path not in ROUTES:
            return await reply_error(send, 404, f"{path} is not served here: tuneforge serve answers POST {CHAT} "
                                     "(every answer logged for drift) and GET /v1/models")
        if method != ROUTES[path]:
            return await reply_error(send, 405, f"{path} accepts {ROUTES[path]} only")
        if path != CHAT:
            return await self.app(scope, receive, send)

        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            return await reply_error(send, 415, f"send the body as JSON with 'Content-Type: application/json' "
                                     f"(got {media_type or 'no content type'!r})")
        body, problem, status = await self.read_body(receive, headers.get("content-length"))
        if problem:
            return await reply_error(send, status, problem)
        payload, route, problem, status = self.check(body)
        if problem:
            return await reply_error(send, status, problem)
        await self.answer(scope, receive, send, payload, route)

    def authorised(self, header: str) -> bool:
        scheme, _, key = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    async def read_body(self, receive, declared: str | None) -> tuple[bytes, str, int]:
        """The body, read chunk by chunk and refused as soon as it passes max_body_bytes (a declared
        Content-Length over the limit is refused before reading anything)."""
        too_big = f"request body exceeds this server's limit of {self.max_body_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", too_big, 413
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", "client disconnected", 400
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return b"", too_big, 413
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), "", 200

    def check(self, body: bytes) -> tuple[dict, Route | None, str, int]:
        """(payload with defaults, its task's route, problem, HTTP status): a clear 4xx instead of a server error."""
        payload, problem, status = self.check_payload(body)
        if problem:
            return {}, None, problem, status
        if len(self.routes) == 1:
            route = next(iter(self.routes.values()))
        else:
            route = self.routes.get(payload.get("model")) if isinstance(payload.get("model"), str) else None
            if route is None:
                return {}, None, (f"'model' must name one of the tasks this server answers: {sorted(self.routes)} "
                                  "(GET /v1/models lists them)"), 404
            payload["model"] = route.task
        if payload["messages"][0]["role"] != "system" and route.system_prompt:
            payload["messages"] = [{"role": "system", "content": route.system_prompt}, *payload["messages"]]
        payload.setdefault("temperature", 0.0)
        if route.output is not None:  # decoded as evaluated: the task's grammar, plain greedy (llama.cpp's default 1.1)
            payload.setdefault("repeat_penalty", 1.0)
            constrain_request(payload, route.output)
        return payload, route, "", 200

    def check_payload(self, body: bytes) -> tuple[dict, str, int]:
        """(payload, problem, HTTP status) for any task: JSON, shape, size, llama-cpp-python's schema."""
        try:
            payload = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as err:
            return {}, f"request body is not UTF-8 (byte {err.start})", 400
        except json.JSONDecodeError as err:
            return {}, f"request body is not valid JSON: {err}", 400
        except RecursionError:
            return {}, "request body is nested too deeply", 400
        if not isinstance(payload, dict):
            return {}, "request body must be a JSON object", 400
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return {}, "'messages' must be a non-empty list", 400
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                   for m in messages):
            return {}, "each message needs a role (system, user or assistant) and a string content", 400
        strings = list(iter_strings(payload))
        if any(not is_encodable(s) for s in strings):  # JSON's "\ud800" escape decodes to one; UTF-8 cannot hold it
            return {}, "the request contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)", 400
        size = sum(map(len, strings))
        if size > self.max_input_chars:
            return {}, (f"request of {size} characters (all fields, names included) exceeds this server's limit "
                        f"of {self.max_input_chars}"), 413
        problem = field_problems(payload)
        if problem:
            return {}, problem, 422
        if payload.get("stream"):
            return {}, "streaming is not supported: the request log needs the whole answer", 400
        return payload, "", 200

    async def answer(self, scope, receive, send, payload: dict, route: Route) -> None:
        """Run the checked request through llama-cpp-python, holding its reply: a success is logged and
        named by the task (llama.cpp puts the GGUF's absolute path in 'model'); an error is reduced to a
        message that cannot echo the rewritten body or the system prompt."""
        new_body = json.dumps(payload).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
        scope = {**scope, "headers": headers + [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(new_body)).encode())]}
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()

        reply = {"status": 500, "headers": [], "body": b""}

        async def hold(message):
            if message["type"] == "http.response.start":
                reply["status"], reply["headers"] = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                reply["body"] += message.get("body", b"")

        start = time.perf_counter()
        try:
            await self.app(scope, replay, hold)
        except Exception:  # noqa: BLE001 - the traceback goes to the server's stderr, a short message to the client
            traceback.print_exc(file=sys.stderr)
            reply["status"] = 500
        if reply["status"] != 200:
            return await reply_error(send, reply["status"], upstream_error(reply["status"], reply["body"]))
        answer = json.loads(reply["body"])
        answer["model"] = route.task
        self.log(route, payload, answer, time.perf_counter() - start)  # logged before the client hears back
        body = json.dumps(answer, ensure_ascii=False).encode()
        headers = [(k, v) for k, v in reply["headers"] if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def log(self, route: Route, payload: dict, answer: dict, seconds: float) -> None:
        user = [m["content"] for m in payload["messages"] if m.get("role") == "user"]
        append_request(route.log_file, {
            "task": route.task, "input": user[-1] if user else "", "output": answer["choices"][0]["message"]["content"],
            "latency_ms": 1000 * seconds, **route.log_fields(),
        })


def field_problems(payload: dict) -> str:
    """llama-cpp-python's own request schema, checked here: its route turns a validation error into a 500
    whose message quotes the request."""
    from llama_cpp.server.types import CreateChatCompletionRequest
    from pydantic import ValidationError

    try:
        CreateChatCompletionRequest.model_validate(payload)
    except ValidationError as err:
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return ""


def iter_strings(value):
    """Every string in a JSON value, object keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from iter_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from iter_strings(v)


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def upstream_error(status: int, body: bytes) -> str:
    """A safe message for an error llama-cpp-python returned: its 4xx reasons (context length, field
    validation: location and message, without the offending input), never its 5xx text, which quotes the body."""
    if status >= 500:
        return "the model server failed on this request (details are in the server's log)"
    try:
        detail = json.loads(body)
    except ValueError:
        return f"the model server refused the request (HTTP {status})"
    if isinstance(detail.get("error"), dict) and isinstance(detail["error"].get("message"), str):
        return detail["error"]["message"]
    if isinstance(detail.get("detail"), str):
        return detail["detail"]
    if isinstance(detail.get("detail"), list):
        return "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg', '')}" for e in detail["detail"]
                         if isinstance(e, dict))
    return f"the model server refused the request (HTTP {status})"


async def reply_error(send, status: int, message: str, extra_headers: list | None = None) -> None:
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def resolve_api_key(host: str, api_key: str | None) -> str | None:
    """The key from --api-key or $TUNEFORGE_API_KEY; required when the server listens beyond loopback."""
    key = api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and not is_loopback(host):
        raise ServeError(f"--host {host} exposes the model beyond this machine: set an API key with "
                         f"${API_KEY_ENV} (or --api-key); clients send it as 'Authorization: Bearer <key>'")
    return key


class TaskAdapterProxy:
    """Stands in for llama-cpp-python's LlamaProxy (which loads one Llama per model name and reloads on every
    switch): one Llama over the base file, the request's model name (a task) picks the active adapter.
    Called under the server's inner lock, so the switch and the generation that follows are never interleaved."""

    def __init__(self, switch):
        self.switch = switch

    def __call__(self, model: str | None = None):
        self.switch.use(model)  # RequestLog has already checked that `model` names a task
        return self.switch.llm

    def __iter__(self):
        yield from self.switch.adapters

    def free(self) -> None:
        self.switch.close()


def build_app(task: str | None = None, quantization: str | None = None, n_ctx: int = 1024, api_key: str | None = None):
    """task: serve that task's merged GGUF (quantization: a type from export.quantizations; by default the one
    its export gate chose); None: every task from one base GGUF with each task's adapter."""
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from tuneforge.core.gguf import file_sha256, served_quantization
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import models_dir, production_file

    params = load_params()
    if task is None:
        return build_multi_task_app(params, n_ctx, api_key)
    try:
        spec = params.task(task)
        model_file = models_dir(task) / "gguf" / f"model-{quantization or served_quantization(task)}.gguf"
    except (KeyError, FileNotFoundError, ValueError) as err:
        raise ServeError(err.args[0]) from None
    if not model_file.exists():
        raise ServeError(f"{model_file} does not exist: run `dvc repro export@{task}` first")
    # The key is checked twice: by RequestLog before any body is read, and by llama-cpp-python's own routes.
    app = create_app(server_settings=ServerSettings(api_key=api_key),
                     model_settings=[ModelSettings(model=str(model_file), model_alias=task, n_ctx=n_ctx,
                                                   n_threads=params.export.n_threads, verbose=False)])
    route = Route(task, production_file(task), spec.system_prompt, model_file, file_sha256(model_file), output=spec.output)
    # A character is at least a quarter of a token here; keep room for the answer in the context.
    return RequestLog(app, routes={task: route}, max_input_chars=2 * n_ctx, api_key=api_key)


def build_multi_task_app(params, n_ctx: int, api_key: str | None):
    """Every task in params.yaml over models/base_gguf, each with its adapter from its export stage."""
    import llama_cpp.server.app as server_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from tuneforge.core.adapters import AdapterSwitch
    from tuneforge.core.gguf import adapter_gguf, file_sha256
    from tuneforge.core.paths import base_gguf_dir, production_file

    base_file = base_gguf_dir() / f"model-{params.export.base_quantization}.gguf"
    if not base_file.exists():
        raise ServeError(f"{base_file} does not exist: run `dvc repro base_gguf` first")
    missing = [t for t in params.tasks if not adapter_gguf(t).exists()]
    if missing:
        raise ServeError(f"no GGUF adapter for {missing}: run `dvc repro {' '.join(f'export@{t}' for t in missing)}` "
                         "(or serve one task with --task)")
    tasks = list(params.tasks)
    app = server_app.create_app(server_settings=ServerSettings(api_key=api_key),
                                model_settings=[ModelSettings(model=str(base_file), model_alias=tasks[0], n_ctx=n_ctx,
                                                              n_threads=params.export.n_threads, verbose=False)])
    # create_app loaded the base through its LlamaProxy; the adapters attach to that same Llama, and a proxy
    # that switches adapters replaces it (llama-cpp-python 0.3.36 keeps it in this module-level variable).
    switch = AdapterSwitch(server_app._llama_proxy._current_model, {t: adapter_gguf(t) for t in tasks})
    server_app._llama_proxy = TaskAdapterProxy(switch)
    base_sha = file_sha256(base_file)
    routes = {t: Route(t, production_file(t), params.tasks[t].system_prompt, adapter_gguf(t),
                       file_sha256(adapter_gguf(t)), base_file, base_sha, output=params.tasks[t].output) for t in tasks}
    return RequestLog(app, routes=routes, max_input_chars=2 * n_ctx, api_key=api_key)


def serve(task: str | None, host: str, port: int, quantization: str | None, api_key: str | None = None) -> None:
    import uvicorn

    if task is None and quantization:
        raise ServeError("--quantization picks one task's merged file: give --task too (without --task every task "
                         "runs over the base GGUF, export.base_quantization)")
    key = resolve_api_key(host, api_key)
    if not is_loopback(host):
        print(f"tuneforge serve: listening on {host}:{port} with an API key, over plain HTTP: put a TLS proxy in "
              "front of it before the key crosses a network you do not trust", file=sys.stderr)
    uvicorn.run(build_app(task, quantization, api_key=key), host=host, port=port, log_level="warning")
