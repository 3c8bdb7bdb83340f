"""`impruver serve`: an OpenAI-compatible HTTP endpoint for the model a run trained (standard library only).

    impruver serve output_dir=outputs/demo chat.port=8000
    curl http://127.0.0.1:8000/v1/chat/completions \
        -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}'

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream: true`` gives server-sent events, as OpenAI's
API does); any ``model`` name is accepted, since one model is served. It binds to ``chat.host`` (127.0.0.1 unless
the config says otherwise). Requests are answered one at a time (one model, one generation); a bad request gets
a 4xx JSON error in OpenAI's shape, never a crash. Function calling: ``tools`` reach the chat template as in
training, a reply that is a function call comes back as ``tool_calls``, and ``tool`` messages become
function_response turns.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from impruver import toolcalls
from impruver.chat.generate import CALL_ROLE, RESPONSE_ROLE, Generation, generation_kwargs, render
from impruver.errors import ImpruverError, RunError
from impruver.ui import console, log

if TYPE_CHECKING:
    from impruver.plan import ChatSpec, Plan

MAX_BODY_BYTES = 8 * 2**20
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class BadRequest(Exception):
    """A client error: becomes ``{"error": {...}}`` with a 4xx status."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Request:
    """A validated chat completion request."""

    messages: list[dict[str, Any]]
    stream: bool
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str]
    tools: list[Any] | None
    include_usage: bool


# -- parsing requests (pure, testable without a model) --------------------------------------------------------


def parse_request(body: Any) -> Request:
    """Check a /v1/chat/completions body; raise BadRequest naming the parameter at fault."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    if body.get("n", 1) != 1:
        raise BadRequest("only n=1 is supported", param="n")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("'stop' must be a string or a list of strings", param="stop")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", param="tools")
    options = body.get("stream_options") or {}
    return Request(
        messages=parsed,
        stream=_typed(body, "stream", bool, False),
        max_tokens=_number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1),
        temperature=_number(body, "temperature", float, 0, 2),
        top_p=_number(body, "top_p", float, 0, 1),
        seed=_number(body, "seed", int),
        stop=stops,
        tools=tools or None,  # as given: templates that read `tools` expect OpenAI's {type, function} objects
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


def _message(message: Any, i: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{i}] must be an object", param=f"messages[{i}]")
    role = message.get("role")
    if role not in ROLES:
        raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                         param=f"messages[{i}].role")
    content = _content(message.get("content"), i)
    calls = message.get("tool_calls")
    if role == "assistant" and calls:
        if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
            raise BadRequest(f"messages[{i}].tool_calls must be a list of objects", param=f"messages[{i}].tool_calls")
        return {"role": "assistant", "content": content, "tool_calls": calls}
    if content is None:
        raise BadRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _content(content: Any, i: int) -> str | None:
    """A string, or OpenAI's list of parts of which only text parts are understood."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def _typed(body: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise BadRequest(f"'{key}' must be a {kind.__name__}, got {value!r}", param=key)
    return value


def _number(body: dict[str, Any], key: str, kind: type, low: float | None = None,
            high: float | None = None) -> Any:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"'{key}' must be between {low} and {high}, got {value}", param=key)
    return kind(value)


# -- answering ------------------------------------------------------------------------------------------------


class Model:
    """The loaded model, its settings and a lock: one generation at a time."""

    def __init__(self, loaded: Any, chat: ChatSpec) -> None:
        self.loaded = loaded
        self.chat = chat
        self.lock = threading.Lock()
        self.last: Generation | None = None  # the latest reply, for logs and tests

    def conversation(self, request: Request) -> list[dict[str, Any]]:
        """OpenAI messages in impruver's roles: tool calls and their results become function turns."""
        turns = []
        if self.chat.system_prompt and not any(m["role"] == "system" for m in request.messages):
            turns.append({"role": "system", "content": self.chat.system_prompt})
        for m in request.messages:
            if m.get("tool_calls"):
                for call in m["tool_calls"]:
                    try:
                        found = toolcalls.from_openai(call, strict=False)
                    except toolcalls.ToolCallError as exc:
                        raise BadRequest(f"messages: {exc}", param="messages") from None
                    turns.append({"role": CALL_ROLE, "content": toolcalls.content_of(found)})
            elif m["role"] in ("tool", "function"):
                turns.append({"role": RESPONSE_ROLE, "content": m["content"]})
            else:
                turns.append({"role": m["role"], "content": m["content"]})
        return turns

    def start(self, request: Request) -> Generation:
        """Render the prompt, check it fits, and start generating (the caller holds ``lock``)."""
        import torch

        try:
            ids = render(self.loaded.tokenizer, self.conversation(request), tools=request.tools)
        except RunError as exc:  # the model's chat template refuses this conversation (a role, an order...)
            raise BadRequest(str(exc), param="messages") from None
        room = self.loaded.context_length - len(ids)
        wanted = request.max_tokens or self.chat.max_new_tokens
        if room < 1 or (request.max_tokens and request.max_tokens > room):
            raise BadRequest(f"this model's context is {self.loaded.context_length} tokens; the messages take "
                             f"{len(ids)} and {wanted} more were asked for. Shorten the messages or max_tokens.",
                             param="messages", code="context_length_exceeded")
        if request.seed is not None:
            torch.manual_seed(request.seed)
        kwargs = generation_kwargs(self.chat, max_new_tokens=min(wanted, room), temperature=request.temperature,
                                   top_p=request.top_p)
        self.last = Generation(self.loaded.model, self.loaded.tokenizer, ids, kwargs, stop_strings=request.stop)
        return self.last


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def tool_calls(call: dict[str, Any]) -> list[dict[str, Any]]:
    return [toolcalls.to_openai(call)]


def finish(reply: Generation, request: Request) -> tuple[dict[str, Any], str]:
    """The reply as an OpenAI message, and its finish_reason."""
    text = reply.text
    call = toolcalls.parse_reply(text, allow_json=bool(request.tools))
    if call is not None:
        return {"role": "assistant", "content": None, "tool_calls": tool_calls(call)}, "tool_calls"
    reason = "length" if reply.finish_reason == "length" else "stop"
    return {"role": "assistant", "content": text}, reason


def usage(reply: Generation) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 handler: each response ends by closing the connection, which suits server-sent events."""

    server_version = "impruver"
    model: Model  # set on the subclass made by make_server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  the base class's name
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802  http.server's naming
        self._guard(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guard(self._post)

    def _not_allowed(self) -> None:
        raise BadRequest(f"{self.command} is not supported; routes: GET /v1/models, POST /v1/chat/completions",
                         status=405, code="method_not_allowed")

    def do_PUT(self) -> None:  # noqa: N802
        self._guard(self._not_allowed)

    do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_PUT  # noqa: N815

    def _guard(self, handler: Any) -> None:
        """Every failure becomes a JSON error; nothing escapes to the server thread."""
        try:
            handler()
        except BadRequest as exc:
            self._json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except ImpruverError as exc:
            self._json(500, {"error": {"message": str(exc), "type": "server_error", "param": None, "code": None}})
        except Exception as exc:  # a bug must not take the server down; the client is told
            log.exception("request failed")
            self._json(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                       "param": None, "code": None}})

    def _get(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        name = self.model.loaded.name
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [_model_card(name)]})
        elif path == f"/v1/models/{name}":
            self._json(200, _model_card(name))
        elif path in ("", "/health"):
            self._json(200, {"status": "ok", "model": name})
        elif path == "/v1/chat/completions":
            self._not_allowed()
        else:
            raise BadRequest(f"no route GET {self.path}; routes: GET /v1/models, POST /v1/chat/completions",
                             status=404, code="not_found")

    def _post(self) -> None:
        if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
            raise BadRequest(f"no route POST {self.path}; routes: GET /v1/models, POST /v1/chat/completions",
                             status=404, code="not_found")
        request = parse_request(self._body())
        with self.model.lock:
            reply = self.model.start(request)
            try:
                self._stream(reply, request) if request.stream else self._complete(reply, request)
            finally:
                if not reply.done:
                    reply.stop()  # a client that went away ends the generation too
                log.info("%d prompt + %d completion tokens (%s)", reply.prompt_tokens, reply.completion_tokens,
                         reply.finish_reason)

    def _body(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("bad Content-Length header") from None
        if length <= 0:
            raise BadRequest("the request needs a JSON body")
        if length > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None

    def _complete(self, reply: Generation, request: Request) -> None:
        reply.wait()
        message, reason = finish(reply, request)
        self._json(200, {
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self.model.loaded.name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
            "usage": usage(reply),
        })

    def _stream(self, reply: Generation, request: Request) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model.loaded.name, "system_fingerprint": None}

        def send(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
                     **extra}
            self._event(json.dumps(chunk, ensure_ascii=False))

        send({"role": "assistant", "content": ""})
        held = bool(request.tools) or bool(request.stop)  # a call or a stop string is known only at the end
        shown = ""
        try:
            for piece in reply:
                if not held:
                    piece = piece.lstrip() if not shown else piece
                    shown += piece
                    if piece:
                        send({"content": piece})
        except ImpruverError as exc:  # the headers are sent: report it in the stream, as OpenAI does
            self._event(json.dumps({"error": {"message": str(exc), "type": "server_error", "param": None,
                                              "code": None}}))
            return
        message, reason = finish(reply, request)
        if held and message.get("tool_calls"):
            send({"tool_calls": [{"index": 0, **message["tool_calls"][0]}]})
        elif held and message["content"]:
            send({"content": message["content"]})
        send({}, reason)
        if request.include_usage:
            self._event(json.dumps({**base, "choices": [], "usage": usage(reply)}))
        self._event("[DONE]")

    def _event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "impruver"}


def make_server(loaded: Any, chat: ChatSpec, *, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``loaded`` on ``host:port`` (port 0: a free one; see ``server.server_address``)."""
    handler = type("BoundHandler", (Handler,), {"model": Model(loaded, chat)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


# -- the stage -------------------------------------------------------------------------------------------------


def run(plan: Plan) -> int:
    """`impruver serve`: load ``plan.output_dir`` and answer OpenAI-style requests until Ctrl+C.

    Args:
        plan: the validated plan; ``plan.chat`` gives the host, port and default generation settings.

    Returns:
        0 after Ctrl+C (problems raise :class:`~impruver.errors.RunError`, exit status 2).
    """
    from impruver.chat.load import chat_settings, load, locate, quiet_libraries, seed

    locate(plan.output_dir, model_path=plan.model.path)  # fail before importing torch
    quiet_libraries()
    loaded = load(plan)
    seed(plan.chat.seed)
    host, port = plan.chat.host, plan.chat.port
    try:
        server = make_server(loaded, chat_settings(plan.chat, loaded.context_length), host=host, port=port)
    except OSError as exc:
        raise RunError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another with "
                       f"chat.port=N (or stop what uses it)") from None
    address = f"http://{host}:{server.server_address[1]}/v1"
    console.print(f"serving {loaded.describe()}\n  OpenAI-compatible API at {address} (model '{loaded.name}'); "
                  f"Ctrl+C stops", markup=False)
    sys.stdout.flush()  # scripts wait for this line to know the server is up
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the model (no authentication)",
                    host)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped", markup=False)
    finally:
        server.server_close()
    return 0
