"""`tuneforge serve`: the exported GGUF behind llama.cpp's OpenAI-compatible server, every answer logged.

With --task: that task's merged GGUF (the file its export gate chose). Without: every task from one process,
over one base GGUF (models/base_gguf) with each task's LoRA adapter (GGUF) loaded once; the request's `model`
field (the task name) picks the adapter, the system prompt and the request log; /v1/models lists the tasks.

Each answered chat completion is appended to data/production/<task>/requests.jsonl (input, output, latency,
model file hash, timestamp): the current traffic the drift stage compares with the test split.
Only two routes are answered: POST /v1/chat/completions (checked, given the task's system prompt, logged)
and GET /v1/models (the task names, answered by RequestLog itself, so a health check never waits behind the
model's lock). Everything else llama-cpp-python offers (raw completions,
embeddings, tokenizer endpoints, API docs, CORS preflight) is refused, so no traffic escapes the log.
The server binds to loopback by default; any other address needs an API key. Without a key, only requests whose
Host header names loopback (localhost, 127.0.0.1, [::1]) are answered, so a web page on another site cannot reach
the server through DNS rebinding; no response carries CORS headers, so browsers share no answer with other sites.

What is served is what was evaluated: the task's system prompt, its grammar, greedy decoding and its
max_new_tokens, for one user message. A client sends messages (the task's own system message or none, then one
user message, its non-blank input, without the chat template's special tokens; no earlier turns, no assistant
messages, except for a chat task, which answers a conversation of alternating user and assistant turns ending with
the user's and logs it whole), optionally `model`, `user`, `seed` (an integer, which greedy decoding ignores) and `max_tokens` or its
current OpenAI name `max_completion_tokens` (a JSON integer; a larger one is cut to the task's; a smaller one only
where params' serve.allow_client_max_tokens is true, logged as client_max_tokens), and temperature 0, n 1, stream
false, logprobs false if it sends them at all; null stands for any field's default. A task that answers with tool
calls (output kind tool_call) also takes OpenAI's `tools`, if they are its own (the same function tools, in any
order; others are refused, naming the difference), and tool_choice "auto": its chat template renders the task's
tools whatever the request says, as training did, and the answer comes back as `tool_calls` (finish_reason
"tool_calls") or as a plain reply. Any other field (grammar, response_format, other tasks' tools, functions, stop,
logit_bias, penalties, sampling settings) is refused with a 400, so no client grammar ever reaches llama.cpp (an
unparsable one crashed it). Inputs and answers are logged with e-mail addresses, phone numbers and card numbers
redacted (core.pii, the audit's detector); an answer is logged as its kind's answer string (tool_call:
{"tool_calls": [...]} or {"content": ...}), what drift judges.

Routing (serve_routing.py; params' serve.route, --no-route to turn it off): where a task has a router (label and
json_object kinds: models/<task>/classical/router.json beside its classical model), each request is answered by the
fine-tune or the classical model, whichever the router expects to score higher, and the completion carries a
`tuneforge` field: answered_by, confidence (the calibrated expected score), fine_tune_confidence and
classical_confidence (raw), deferred. A deferred request (neither is expected to score well enough) is answered
with an empty content and finish_reason "deferred", and logged with deferred true and no output (drift judges no
answer of it), both answers beside it for review. Every prompt is evaluated whole, and the answer tokens'
log-probabilities read off the raw logits, as the export stage does (answer_as_exported), so that the fine-tune's
confidence is the one the router was checked with there.

Limits (set below): an answer stops after ANSWER_SECONDS (finish_reason "length", logged as cut_by_time_limit, and
drift does not judge it); a request's head must arrive
within HEAD_SECONDS of the connection opening (or of its previous answer) and be at most MAX_HEAD_BYTES, its body
within BODY_SECONDS and at most 6 bytes a character of 2 * n_ctx characters plus 16 KiB; over LIMIT_CONCURRENCY
open connections and requests, requests get a 503; connections past MAX_CONNECTIONS are answered 503 and closed as
they open; idle keep-alive connections close after KEEP_ALIVE_SECONDS; on shutdown, running requests get
SHUTDOWN_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import ipaddress
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from tuneforge.core.chat import special_tokens_in
from tuneforge.core.constraints import constrain_request
from tuneforge.core.kinds import OutputKind
from tuneforge.core.pii import redact
from tuneforge.core.traffic import append_request
from tuneforge.serve_routing import Routed, TaskRouting, load_task_routing

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see export.py: spin-waits stall a busy small machine

API_KEY_ENV = "TUNEFORGE_API_KEY"
CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
ROUTES = {CHAT: "POST", MODELS: "GET"}

# Request fields a client may send besides `messages`; the fields in EVALUATED only with the value evaluation used.
# Everything else changes how an answer is decoded, so it is refused.
TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")  # OpenAI's old and current names for one limit
CLIENT_FIELDS = {"messages", "model", "user", "seed", *TOKEN_LIMIT_FIELDS}
EVALUATED = {"temperature": 0, "n": 1, "stream": False, "logprobs": False}
INTEGER_FIELDS = ("seed", *TOKEN_LIMIT_FIELDS)  # llama-cpp-python's schema would also take "5", 5.0 and true
# A task that answers with tool calls takes OpenAI's tool fields, restating what it was trained with: its own tools
# (contract_problem compares them), and the model's own choice between calling and replying. Neither is passed on:
# the chat template gets the task's tools from TEMPLATE_KWARGS.
TOOL_FIELDS = ("tools", "tool_choice")
TOOL_CHOICES = ("auto",)

ANSWER_SECONDS = 30  # generation stops here (the embedded model: 40 tokens after a 600-word prompt took 16 s on 2 busy cores)
HEAD_SECONDS = 10  # for a request's line and headers, from the connection's opening or its previous answer
BODY_SECONDS = 10  # for the whole body once the head is in
MAX_HEAD_BYTES = 16_384  # request line and headers (h11's default, stated)
KEEP_ALIVE_SECONDS = 5  # an idle connection between requests
LIMIT_CONCURRENCY = 64  # open connections and running requests, past which uvicorn answers 503 (answers queue on one model)
MAX_CONNECTIONS = 128  # past this, a new connection is answered 503 and closed at once: open files stay bounded
SHUTDOWN_SECONDS = 5  # what running requests get on SIGTERM before they are cancelled


class TimeLimitCut:
    """Whether the server's time limit (limit_answer_time) stopped one request's answer. RequestLog puts a fresh one
    in ANSWER_CUT for each request; the model generates in a worker thread that runs in a copy of the request's
    context, and that copy holds this same object, so what the thread records is read back after the answer."""

    fired = False


ANSWER_CUT: contextvars.ContextVar[TimeLimitCut] = contextvars.ContextVar("answer_cut")

# The chat template's extra arguments for the request being answered: its task's (output.template_kwargs(), e.g.
# tools=), set by RequestLog and read in the model's worker thread (see TimeLimitCut) by the chat handler
# that pass_template_kwargs installs.
TEMPLATE_KWARGS: contextvars.ContextVar[dict] = contextvars.ContextVar("template_kwargs", default={})


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
    # The task's output kind, bound to the base's tokenizer where it reads answers off the chat template: each
    # request decodes under its grammar (core.constraints) and its answer is read and sent back by it, as evaluated.
    output: OutputKind | None = None
    max_new_tokens: int = 96  # the task's token budget, as evaluated
    special_tokens: tuple[str, ...] = ()  # the served model's control tokens as text: refused in messages
    allow_client_max_tokens: bool = False  # params' serve.allow_client_max_tokens
    routing: TaskRouting | None = None  # the task's classical model and router, where requests are routed

    def log_fields(self) -> dict:
        fields = {"model_file": self.model_file.name, "model_sha256": self.model_sha256}
        if self.base_file is not None:
            fields.update(base_file=self.base_file.name, base_sha256=self.base_sha256)
        return fields


class RequestLog:
    """ASGI middleware in front of llama-cpp-python's app.

    For every HTTP request: Host (without an API key), API key (when set), route, then for chat completions:
    content type, size and time while the body streams in, JSON, message shape, a character limit over every
    string, the task (by the `model` field when several are served), the task's contract (module docstring), then
    the task's system prompt, grammar and token cap are applied; the answer is logged (redacted) to that task's
    file before the client hears back. Errors are short JSON messages in OpenAI's shape that never echo the
    (rewritten) request.
    """

    def __init__(self, app, *, routes: dict[str, Route], max_input_chars: int, api_key: str | None = None):
        """One route: every request goes to it, whatever its `model` field says; several: `model` must name one."""
        self.app, self.routes = app, routes
        self.max_input_chars = max_input_chars
        # A character escapes to at most 6 bytes (\uXXXX); field names and punctuation get a fixed allowance.
        self.max_body_bytes = 6 * max_input_chars + 16_384
        # Compared as UTF-8 bytes: header values arrive as bytes, and hmac.compare_digest refuses non-ASCII str.
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.model_list = model_list(routes.values())

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets: nothing here speaks them
            return await send({"type": "websocket.close", "code": 1008})
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is None and not addressed_to_loopback(headers.get("host", "")):
            return await reply_error(send, 421, f"Host {headers.get('host', '')!r} is not a name of this server: "
                                     "without an API key it answers only requests addressed to localhost, 127.0.0.1 "
                                     f"or [::1] (so no web page can drive it); set ${API_KEY_ENV} to serve other names")
        if self.api_key and not self.authorised(headers.get("authorization", "")):
            return await reply_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                     extra_headers=[(b"www-authenticate", b"Bearer")])
        path, method = scope["path"], scope["method"]
        if path not in ROUTES:
            return await reply_error(send, 404, f"{path} is not served here: tuneforge serve answers POST {CHAT} "
                                     "(every answer logged for drift) and GET /v1/models")
        if method != ROUTES[path]:
            return await reply_error(send, 405, f"{path} accepts {ROUTES[path]} only")
        if path == MODELS:  # llama-cpp-python's own route waits for the model's lock, behind every running answer
            return await reply_json(send, 200, self.model_list)

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
        scheme, _, key = header.partition(" ")  # header: the raw bytes, read as latin-1
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode("latin-1"), self.api_key)

    async def read_body(self, receive, declared: str | None) -> tuple[bytes, str, int]:
        """The body, read chunk by chunk and refused as soon as it passes max_body_bytes (a declared
        Content-Length over the limit is refused before reading anything) or BODY_SECONDS."""
        too_big = f"request body exceeds this server's limit of {self.max_body_bytes} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", too_big, 413
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + BODY_SECONDS
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                return b"", f"the request body did not arrive within this server's limit of {BODY_SECONDS} s", 408
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
        problem = contract_problem(payload, route)
        if problem:
            return {}, None, problem, 400
        payload["model"] = route.task
        if payload["messages"][0]["role"] != "system" and route.system_prompt:
            payload["messages"] = [{"role": "system", "content": route.system_prompt}, *payload["messages"]]
        payload["temperature"] = 0.0
        payload["max_tokens"] = min(client_max_tokens(payload) or route.max_new_tokens, route.max_new_tokens)
        # llama-cpp-python reads neither the current name nor, under greedy decoding, the seed: dropped, not passed on.
        payload.pop("max_completion_tokens", None)
        payload.pop("seed", None)
        for field in TOOL_FIELDS:  # the task's own tools reach the template through TEMPLATE_KWARGS
            payload.pop(field, None)
        if route.output is not None:  # decoded as evaluated: the task's grammar, plain greedy (llama.cpp's default 1.1)
            payload["repeat_penalty"] = 1.0
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
        except ValueError:  # int() refuses a number of more than 4,300 digits
            return {}, "request body holds a number with more digits than this server reads", 400
        except RecursionError:
            return {}, "request body is nested too deeply", 400
        if not isinstance(payload, dict):
            return {}, "request body must be a JSON object", 400
        # null asks for a field's default (OpenAI's clients send it so); llama-cpp-python's schema refuses it for some
        # fields (top_p), and the task's own settings apply whatever a client left out.
        payload = {k: v for k, v in payload.items() if v is not None}
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return {}, "'messages' must be a non-empty list", 400
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                   for m in messages):
            return {}, "each message needs a role (system, user or assistant) and a string content", 400
        strings = list(iter_strings(payload))
        if any(not is_encodable(s) for s in strings):  # JSON's "\ud800" escape decodes to one; UTF-8 cannot hold it
            return {}, "the request contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)", 400
        # The tools a client restates are the task's own, dropped before the model: not input, whatever their size.
        size = sum(map(len, strings)) - sum(map(len, iter_strings(payload.get("tools", []))))
        if size > self.max_input_chars:
            return {}, (f"request of {size} characters (all fields, names included) exceeds this server's limit "
                        f"of {self.max_input_chars}"), 413
        problem = field_problems({k: v for k, v in payload.items() if k not in TOOL_FIELDS})  # never passed on
        if problem:
            return {}, problem, 422
        if payload.get("stream"):
            return {}, ("streaming is not supported: the request log, and routing between a task's fine-tune and its "
                        "classical model, need the whole answer"), 400
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
        cut = TimeLimitCut()
        ANSWER_CUT.set(cut)  # this request's task only: each request runs in its own
        TEMPLATE_KWARGS.set(route.output.template_kwargs() if route.output is not None else {})
        try:
            await self.app(scope, replay, hold)
        except Exception:  # noqa: BLE001 - the traceback goes to the server's stderr, a short message to the client
            traceback.print_exc(file=sys.stderr)
            reply["status"] = 500
        if reply["status"] != 200:
            return await reply_error(send, reply["status"], upstream_error(reply["status"], reply["body"]))
        answer = json.loads(reply["body"])
        answer["model"] = route.task
        choice = answer["choices"][0]
        # The answer tokens' log-probabilities (answer_as_exported) are for routing only (a client's logprobs are
        # refused): never sent back.
        logprobs, choice["logprobs"] = choice.get("logprobs"), None
        output = served_answer(choice, route.output)
        routed = None
        if route.routing is not None:  # the classical model answers in a worker thread, off the event loop
            routed = await asyncio.to_thread(route.routing.decide, route.output, request_record(payload["messages"]),
                                             output, logprobs)
            routed.rewrite(choice, route.output)
            answer["tuneforge"] = routed.summary()
            output = routed.answer
        # Logged before the client hears back, in a worker thread: the line's lock, write and fsync would otherwise
        # hold the event loop, and with it every other connection, for as long as the disk takes.
        await asyncio.to_thread(self.log, route, payload, answer, output, time.perf_counter() - start, cut.fired,
                                routed)
        body = json.dumps(answer, ensure_ascii=False).encode()
        headers = [(k, v) for k, v in reply["headers"] if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def log(self, route: Route, payload: dict, answer: dict, output: str | None, seconds: float,
            cut_by_time_limit: bool, routed: Routed | None = None) -> None:
        """One line: the input (the kind's input_text: the one user message, or a chat task's conversation) and the
        answer string (output: what drift
        judges with the kind's answer_problem; None for a deferred request, which was given none), personal data
        redacted;
        a client's lower max_tokens, the one setting it may change, and the server's time limit cutting the answer
        are logged with them (drift judges neither kind of answer as the model's own). A routed request also logs
        its routing (Routed.summary) and both answerers' answers."""
        choice = answer["choices"][0]
        cut_short = {"client_max_tokens": payload["max_tokens"]} if payload["max_tokens"] < route.max_new_tokens else {}
        if cut_by_time_limit:
            cut_short["cut_by_time_limit"] = True
        routing = {} if routed is None else {**routed.summary(), "fine_tune_output": redact(routed.fine_tune_answer),
                                             "classical_output": redact(routed.classical_answer)}
        append_request(route.log_file, {
            "task": route.task, "input": redact(logged_input(route, payload["messages"])),
            "output": None if output is None else redact(output), "finish_reason": choice["finish_reason"],
            **cut_short, **routing, "latency_ms": 1000 * seconds, **route.log_fields(),
        })


def served_answer(choice: dict, output: OutputKind | None) -> str:
    """The answer string of a completion's choice, read by the task's kind as evaluation reads generated text
    (tool_call: the template's call syntax into canonical JSON); the choice's message is rewritten as the kind sends
    answers back (tool_call: OpenAI's tool_calls, finish_reason "tool_calls" where the model stopped after them)."""
    if output is None:
        return choice["message"]["content"]
    answer = output.from_generation(choice["message"]["content"])
    choice["message"] = output.to_message(answer)
    if choice["message"].get("tool_calls") and choice["finish_reason"] == "stop":
        choice["finish_reason"] = "tool_calls"
    return answer


def logged_input(route: Route, messages: list[dict]) -> str:
    """What the answer is about, as evaluation records it (the kind's input_text: the last user message, or a chat
    task's whole conversation before the answer), so that drift compares like with like."""
    if route.output is None:
        return messages[-1]["content"]
    return route.output.input_text(request_record(messages))


def request_record(messages: list[dict]) -> dict:
    """A request's messages as a record of the task's data (an empty answer after them), what its output kind reads
    inputs from."""
    return {"messages": [*messages, {"role": "assistant", "content": ""}]}


def contract_problem(payload: dict, route: Route) -> str:
    """Why a request would not be answered as its task was evaluated, or "" (the module docstring's contract)."""
    tools = route.output.template_kwargs().get("tools") if route.output is not None else None
    accepted = CLIENT_FIELDS | (set(TOOL_FIELDS) if tools is not None else set())
    refused = sorted(k for k, v in payload.items() if k not in accepted and not (k in EVALUATED and v == EVALUATED[k]))
    if refused:
        grammar = "under its own grammar, " if route.output is not None and route.output.constrained else ""
        evaluated = ", ".join(f"{k} {json.dumps(v)}" for k, v in EVALUATED.items())
        own_tools = "its own tools, tool_choice \"auto\", " if tools is not None else ""
        return (f"{', '.join(refused)}: not accepted here. {route.task}'s answers are decoded as it was evaluated "
                f"({grammar}greedy, after its own system prompt, at most {route.max_new_tokens} new tokens); a client "
                f"may send messages, model, user, seed, max_tokens (or max_completion_tokens), {own_tools}and "
                f"{evaluated}")
    if tools is not None and "tools" in payload and (problem := tools_problem(payload["tools"], tools)):
        return problem
    if "tool_choice" in payload and payload["tool_choice"] not in TOOL_CHOICES:
        return (f"tool_choice {json.dumps(payload['tool_choice'])}: not accepted here. {route.task} was trained to "
                "choose between calling one of its tools and replying: send tool_choice \"auto\" or none")
    not_integers = [k for k in INTEGER_FIELDS if k in payload and type(payload[k]) is not int]
    if not_integers:  # bool is a subclass of int: `type`, not isinstance
        return f"{', '.join(not_integers)} must be a JSON integer"
    limits = {payload[k] for k in TOKEN_LIMIT_FIELDS if k in payload}
    if len(limits) > 1:
        return "max_tokens and max_completion_tokens (its current OpenAI name) differ: send one of them"
    max_tokens = client_max_tokens(payload)
    if max_tokens is not None and max_tokens < 1:  # llama.cpp reads 0 and below as "no limit"
        return f"max_tokens must be at least 1 (this task answers in at most {route.max_new_tokens})"
    if max_tokens is not None and max_tokens < route.max_new_tokens and not route.allow_client_max_tokens:
        return (f"max_tokens {max_tokens} would cut {route.task}'s answers short of the {route.max_new_tokens} tokens "
                "it was evaluated with: send none (or at least that many), or set serve.allow_client_max_tokens: true "
                "in params.yaml")
    messages = payload["messages"]
    if any(m["role"] == "system" and (i > 0 or m["content"] != route.system_prompt) for i, m in enumerate(messages)):
        return (f"the system prompt is {route.task}'s own, as evaluated: send no system message (the server adds it)"
                if route.system_prompt else f"{route.task} was evaluated without a system prompt: send none")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if route.output is not None and route.output.multi_turn:  # a chat task answers a conversation, as evaluated
        if any(a == b for a, b in zip(turns, turns[1:])) or turns[0] != "user":
            return (f"{route.task} answers a conversation: after the optional system prompt, turns alternate user, "
                    "assistant, ..., ending with the user's")
    # Earlier turns would steer the answer (invented examples) and only the last message is logged.
    elif turns.count("user") > 1 or "assistant" in turns:
        return (f"{route.task} answers one user message, as it was evaluated: send the input as a single user message, "
                "without earlier turns or assistant messages")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return "the last message must be the user's input, and not blank: it is what the task answers"
    for i, message in enumerate(messages):
        found = special_tokens_in(message["content"], route.special_tokens)
        if found:
            return (f"message {i} holds the chat template's special tokens {found}: the model would read them as turn "
                    "markers; send the text without them")
    return ""


def tools_problem(sent, tools: list[dict]) -> str:
    """Why a request's tools are not the task's, or "": the same tools (canonical JSON, in any order), since
    the model was trained with those and is answered with them whatever the request says."""
    def canonical(tool) -> str:
        return json.dumps(tool, sort_keys=True)

    def name(tool) -> str | None:
        function = tool.get("function") if isinstance(tool, dict) else None
        return function.get("name") if isinstance(function, dict) and isinstance(function.get("name"), str) else None

    if isinstance(sent, list) and sorted(map(canonical, sent)) == sorted(map(canonical, tools)):
        return ""
    own = {t["function"]["name"]: canonical(t) for t in tools}
    if isinstance(sent, list):
        named = {name(t): canonical(t) for t in sent if name(t) is not None}
        differences = [f"{what} {names}" for what, names in (
            ("missing", [n for n in own if n not in named]),
            ("not its own", sorted(n for n in named if n not in own)),
            ("defined otherwise", [n for n in own if n in named and named[n] != own[n]])) if names]
        if len(named) < len(sent):
            differences.append("entries that are not function tools or repeat a name")
    else:
        differences = ["not a list"]
    return (f"tools: not the task's tools ({'; '.join(differences)}); it answers with the tools it was trained on: "
            f"{list(own)} (send those, as declared, or none)")


def client_max_tokens(payload: dict) -> int | None:
    """The client's token limit under either of OpenAI's names (contract_problem has checked they agree)."""
    return next((payload[k] for k in TOKEN_LIMIT_FIELDS if k in payload), None)


def model_list(routes) -> dict:
    """GET /v1/models in OpenAI's shape: each task, created when its served file (merged GGUF or adapter) was."""
    return {"object": "list", "data": [{"id": r.task, "object": "model", "owned_by": "tuneforge",
                                        "created": int(r.model_file.stat().st_mtime)} for r in routes]}


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
    await reply_json(send, status, {"error": {"message": message, "type": kind}}, extra_headers)


async def reply_json(send, status: int, content: dict, extra_headers: list | None = None) -> None:
    body = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": body})


def addressed_to_loopback(host_header: str) -> bool:
    """Whether a Host header names loopback (any port): what a keyless server accepts, so that a name an attacker
    points at 127.0.0.1 (DNS rebinding) does not reach it from a browser."""
    try:
        name = urlsplit(f"//{host_header}").hostname
    except ValueError:
        return False
    return name is not None and is_loopback(name)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def resolve_api_key(host: str, api_key: str | None) -> str | None:
    """The key from --api-key or $TUNEFORGE_API_KEY, without surrounding whitespace (a trailing newline from a file
    or an environment variable could never be sent back); required when the server listens beyond loopback."""
    key = (api_key or os.environ.get(API_KEY_ENV) or "").strip() or None
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


def build_app(task: str | None = None, quantization: str | None = None, n_ctx: int = 1024, api_key: str | None = None,
              route: bool = True):
    """task: serve that task's merged GGUF (quantization: a type from export.quantizations; by default the one
    its export gate chose); None: every task from one base GGUF with each task's adapter. route: False turns routing
    off whatever params' serve.route says (--no-route)."""
    import llama_cpp.server.app as server_app
    from llama_cpp.server.settings import ModelSettings

    from tuneforge.core.gguf import file_sha256, served_quantization
    from tuneforge.core.params import load_params
    from tuneforge.core.paths import production_file, task_gguf_file

    params = load_params()
    route = route and params.serve.route
    if task is None:
        return build_multi_task_app(params, n_ctx, api_key, route)
    try:
        spec = params.task(task)
        model_file = task_gguf_file(task, quantization or served_quantization(task))
    except (KeyError, FileNotFoundError, ValueError) as err:
        raise ServeError(err.args[0]) from None
    if not model_file.exists():
        raise ServeError(f"{model_file} does not exist: run `dvc repro export@{task}` first")
    output = served_outputs({task: spec.output})[task]
    routing = task_routing(task, output) if route else None  # before the model loads: a refusal stops at once
    app = server_app.create_app(server_settings=server_settings(api_key),
                                model_settings=[ModelSettings(model=str(model_file), model_alias=task, n_ctx=n_ctx,
                                                              n_threads=params.export.n_threads, verbose=False)])
    llm = server_app._llama_proxy._current_model  # loaded by create_app's LlamaProxy
    served = Route(task, production_file(task), spec.system_prompt, model_file, file_sha256(model_file),
                   output=output, max_new_tokens=spec.max_new_tokens, special_tokens=control_token_strings(llm),
                   allow_client_max_tokens=params.serve.allow_client_max_tokens, routing=routing)
    return guarded_app(app, llm, {task: served}, n_ctx, api_key)


def build_multi_task_app(params, n_ctx: int, api_key: str | None, route: bool = True):
    """Every task in params.yaml over models/base_gguf, each with its adapter from its export stage."""
    import llama_cpp.server.app as server_app
    from llama_cpp.server.settings import ModelSettings

    from tuneforge.core.adapters import AdapterSwitch
    from tuneforge.core.gguf import file_sha256
    from tuneforge.core.paths import adapter_gguf_file, base_gguf_file, production_file

    base_file = base_gguf_file(params.export.base_quantization)
    if not base_file.exists():
        raise ServeError(f"{base_file} does not exist: run `dvc repro base_gguf` first")
    missing = [t for t in params.tasks if not adapter_gguf_file(t).exists()]
    if missing:
        raise ServeError(f"no GGUF adapter for {missing}: run `dvc repro {' '.join(f'export@{t}' for t in missing)}` "
                         "(or serve one task with --task)")
    tasks = list(params.tasks)
    outputs = served_outputs({t: params.tasks[t].output for t in tasks})
    routing = {t: task_routing(t, outputs[t]) if route else None for t in tasks}
    app = server_app.create_app(server_settings=server_settings(api_key),
                                model_settings=[ModelSettings(model=str(base_file), model_alias=tasks[0], n_ctx=n_ctx,
                                                              n_threads=params.export.n_threads, verbose=False)])
    # create_app loaded the base through its LlamaProxy; the adapters attach to that same Llama, and a proxy
    # that switches adapters replaces it (llama-cpp-python 0.3.36 keeps it in this module-level variable).
    switch = AdapterSwitch(server_app._llama_proxy._current_model, {t: adapter_gguf_file(t) for t in tasks})
    server_app._llama_proxy = TaskAdapterProxy(switch)
    base_sha = file_sha256(base_file)
    specials = control_token_strings(switch.llm)
    routes = {t: Route(t, production_file(t), params.tasks[t].system_prompt, adapter_gguf_file(t),
                       file_sha256(adapter_gguf_file(t)), base_file, base_sha, output=outputs[t],
                       max_new_tokens=params.tasks[t].max_new_tokens, special_tokens=specials,
                       allow_client_max_tokens=params.serve.allow_client_max_tokens, routing=routing[t]) for t in tasks}
    return guarded_app(app, switch.llm, routes, n_ctx, api_key)


def task_routing(task: str, output: OutputKind) -> TaskRouting | None:
    """The task's classical model and router, where the evaluation stage saved a router; a model file that skops
    must not load (core.router.load_classical) or an unreadable router stops the server with the reason."""
    from tuneforge.core.paths import classical_dir
    from tuneforge.core.router import UntrustedModelError

    try:
        return load_task_routing(classical_dir(task), output)
    except UntrustedModelError as err:
        raise ServeError(f"task {task}: {err}") from None
    except (ValueError, KeyError) as err:  # router.json: not JSON, or not a router's fields
        raise ServeError(f"task {task}: {classical_dir(task)}/router.json could not be read ({type(err).__name__}: "
                         f"{err}); refit it with `dvc repro` (the evaluation stage saves it), or serve with "
                         "--no-route") from None


def served_outputs(outputs: dict[str, OutputKind]) -> dict[str, OutputKind]:
    """Each task's output kind as evaluation used it: bound to the base model's tokenizer where the kind reads how
    answers are written off the chat template (tool_call), the template the exported GGUFs carry."""
    from tuneforge.core.modeling import load_tokenizer
    from tuneforge.core.paths import base_model_dir

    binding = [t for t, output in outputs.items() if output.binds_to_template]
    if not binding:
        return outputs
    if not base_model_dir().is_dir():
        raise ServeError(f"{base_model_dir()} does not exist: run `dvc repro base_model` first ({binding} read how "
                         "the model writes answers off its tokenizer's chat template)")
    tokenizer = load_tokenizer(base_model_dir())
    bound = {}
    for task, output in outputs.items():
        try:
            bound[task] = output.bind(tokenizer)
        except ValueError as err:
            raise ServeError(f"task {task}: {err}") from None
    return bound


def server_settings(api_key: str | None):
    """llama-cpp-python's settings: its routes check the key too, comparing it with the header as Starlette decodes
    it (latin-1), so a non-ASCII key is given to them in that form."""
    from llama_cpp.server.settings import ServerSettings

    return ServerSettings(api_key=api_key.encode("utf-8").decode("latin-1") if api_key else None)


def guarded_app(app, llm, routes: dict[str, Route], n_ctx: int, api_key: str | None) -> RequestLog:
    """llama-cpp-python's app without its CORS middleware (it allowed every origin, with credentials), its model's
    answers cut at ANSWER_SECONDS, behind RequestLog."""
    from fastapi.middleware.cors import CORSMiddleware

    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]  # read on the first request
    limit_answer_time(llm, ANSWER_SECONDS)
    answer_as_exported(llm)
    pass_template_kwargs(llm)
    # A character is at least a quarter of a token here; keep room for the answer in the context.
    return RequestLog(app, routes=routes, max_input_chars=2 * n_ctx, api_key=api_key)


def control_token_strings(llm) -> tuple[str, ...]:
    """The text of every control token in the model's GGUF vocabulary: its chat template's markers (<|im_start|>,
    <|im_end|>, ...), which a message must not hold."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return tuple(llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")
                 for token in range(llm.n_vocab())
                 if llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL)


def pass_template_kwargs(llm) -> None:
    """Render every chat prompt of llm with the request's TEMPLATE_KWARGS (its task's tools=), as training and
    evaluation rendered it.

    Not through the request's `tools`: llama-cpp-python's request schema rewrites them (keys put in its own order,
    "strict" dropped, a tool without parameters refused), and its chat template writes them with tojson, so the
    prompt would differ from the one the task learned. Its chat handler hands them to the GGUF's Jinja template.
    """
    from llama_cpp.llama_chat_format import get_chat_completion_handler

    handler = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)  # as Llama.create_chat_completion picks
               or get_chat_completion_handler(llm.chat_format))

    def with_template_kwargs(**kwargs):
        return handler(**{**kwargs, **TEMPLATE_KWARGS.get()})

    llm.chat_handler = with_template_kwargs


def answer_as_exported(llm) -> None:
    """Every completion of llm decoded as the export stage's generate_gguf decodes it, so that the fine-tune's
    confidence is the one the router was checked with there:

    - the prompt evaluated from its first token, in one batch, instead of reusing the previous request's cached
      prefix and evaluating the rest apart: llama.cpp rounds a token's logits differently in a batch of another size,
      so on a Q4_K_M file a reused prefix moved the confidence by up to 1e-3 from the export stage's and flipped a
      near-tied answer (evaluated whole: within 1e-7, the same answers). Only the system prompt's few tokens are
      evaluated again;
    - each answer token's log-probability under the raw logits (before the grammar masks them) recorded as the
      sampler picks it, and returned as the choice's logprobs (one log-softmax a token; llama-cpp-python's own
      logprobs sort the whole vocabulary for every token, 34 ms a token here).
    """
    import llama_cpp

    sample, create_completion = llm.sample, llm.create_completion
    picked: list[float] = []

    def sample_and_record(*args, idx=None, **kwargs):
        ridx = idx - llm.n_tokens if idx is not None else -1  # the row Llama.sample reads
        raw = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, ridx), shape=(llm.n_vocab(),)).copy()
        token = sample(*args, idx=idx, **kwargs)
        picked.append(float(llama_cpp.Llama.logits_to_logprobs(raw)[token]))
        return token

    def create_completion_as_exported(*args, **kwargs):
        llm.reset()  # forgets the cached tokens; their cache entries are overwritten from position 0
        picked.clear()
        completion = create_completion(*args, **kwargs)
        if isinstance(completion, dict):  # streaming is refused before it gets here
            n = completion["usage"]["completion_tokens"]  # the answer's tokens; the stop token was picked last
            # In the text-completion form the chat handler turns into the chat form (content[i].logprob).
            completion["choices"][0]["logprobs"] = {"tokens": [""] * n, "text_offset": [0] * n,
                                                    "token_logprobs": picked[:n], "top_logprobs": [{}] * n}
        return completion

    llm.sample, llm.create_completion = sample_and_record, create_completion_as_exported


def limit_answer_time(llm, seconds: float) -> None:
    """Stop every answer of llm `seconds` after its generation starts, with finish_reason "length", and record it in
    the request's ANSWER_CUT (where RequestLog set one): the log must not pass a cut answer off as the model's own.

    llama-cpp-python's chat route passes no stopping criteria, but its chat handler generates through
    llm.create_completion: that method, on this instance, adds a deadline to the criteria the handler gives.
    """
    from llama_cpp import StoppingCriteriaList

    create_completion = llm.create_completion

    def create_completion_in_time(*args, stopping_criteria=None, **kwargs):
        deadline = time.monotonic() + seconds
        late = False

        def past_deadline(tokens, logits) -> bool:
            nonlocal late
            late = time.monotonic() > deadline
            return late

        reply = create_completion(*args, stopping_criteria=StoppingCriteriaList([*(stopping_criteria or []), past_deadline]),
                                  **kwargs)
        if late:
            reply["choices"][0]["finish_reason"] = "length"
            cut = ANSWER_CUT.get(None)  # None: llm called outside a served request
            if cut is not None:
                cut.fired = True
        return reply

    llm.create_completion = create_completion_in_time


def guarded_h11_protocol():
    """uvicorn's h11 protocol with the two guards it lacks (uvicorn's keep-alive timer starts only after a first
    answer, so idle or trickling connections stayed open for ever, ~20,000 of them exhausting open files):
    a connection past MAX_CONNECTIONS is answered 503 and closed as it opens, and one that has not sent a whole
    request head HEAD_SECONDS after it opened (or after its previous answer) is closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > MAX_CONNECTIONS:
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                transport.close()
            else:
                self.wait_for_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.wait_for_head()

        def connection_lost(self, exc) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def wait_for_head(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(HEAD_SECONDS, self.close_if_no_head)

        def close_if_no_head(self) -> None:
            waiting_for_head = self.cycle is None or self.cycle.response_complete  # a request's cycle starts at its head
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, host: str, port: int):
    """uvicorn's settings for `tuneforge serve`: the limits of the module docstring."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=guarded_h11_protocol(),
                          limit_concurrency=LIMIT_CONCURRENCY, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_graceful_shutdown=SHUTDOWN_SECONDS)


def serve(task: str | None, host: str, port: int, quantization: str | None, api_key: str | None = None,
          route: bool = True) -> None:
    import uvicorn

    if task is None and quantization:
        raise ServeError("--quantization picks one task's merged file: give --task too (without --task every task "
                         "runs over the base GGUF, export.base_quantization)")
    key = resolve_api_key(host, api_key)
    if not is_loopback(host):
        print(f"tuneforge serve: listening on {host}:{port} with an API key, over plain HTTP: put a TLS proxy in "
              "front of it before the key crosses a network you do not trust", file=sys.stderr)
    uvicorn.Server(uvicorn_config(build_app(task, quantization, api_key=key, route=route), host, port)).run()
