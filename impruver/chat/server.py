"""`impruver serve`: an OpenAI-compatible HTTP endpoint for the model a run trained (uvicorn + starlette).

    impruver serve output_dir=outputs/demo chat.port=8000
    curl http://127.0.0.1:8000/v1/chat/completions \
        -d '{"model": "demo", "messages": [{"role": "user", "content": "Hi"}]}'
    IMPRUVER_API_KEY=sk-... impruver serve chat.host=0.0.0.0      # any other host than loopback needs a key

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream: true`` gives server-sent events, as OpenAI's
API does), ``GET /health``; any ``model`` name is accepted, since one model is served. It binds to ``chat.host``
(127.0.0.1 unless the config says otherwise); with an API key every /v1 route wants ``Authorization: Bearer KEY``.

Holding under load: a deep accept queue, keep-alive and body timeouts (idle connections cost an asyncio task,
not a thread), a bounded queue of waiting requests (503 with ``Retry-After`` beyond it), and limits checked
before any heavy work (body bytes read in chunks, prompt characters, stop strings, max_tokens). A request's
prompt is rendered and tokenized in a worker thread; generation is one scheduler thread that batches concurrent
requests (chat/batching.py). A bad request gets a 4xx JSON error in OpenAI's shape, never a crash.

Function calling: ``tools`` reach the chat template as in training, a reply that is a function call comes back as
``tool_calls``, and ``tool`` messages become function_response turns.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from impruver import toolcalls
from impruver.chat.batching import Batcher, Job, QueueFull, Sampling
from impruver.chat.generate import CALL_ROLE, RESPONSE_ROLE, generation_kwargs, render
from impruver.errors import ConfigError, Problem, RunError
from impruver.ui import console, log

if TYPE_CHECKING:
    from impruver.plan import ChatSpec, Plan

MAX_BODY_BYTES = 8 * 2**20
API_KEY_ENV = "IMPRUVER_API_KEY"
# torch.Generator.manual_seed takes any 64-bit value, signed or not; beyond it a seed is a 400, not a 500.
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class Limits:
    """What one request may ask and how much the server holds; checked before any heavy work.

    Attributes:
        max_body_bytes: request body size; larger bodies get 413 (read and dropped up to ``drain_bytes``, so the
            client that sent one whole reads the answer instead of a broken pipe).
        drain_bytes: a body announced larger than this is refused at once and the connection closed.
        max_prompt_chars: characters of all messages and tool schemas (None: 32 per token of context, far more
            than any prompt that fits, so the check only stops prompts that could never fit).
        max_stops, max_stop_chars: stop strings per request and characters per stop string (OpenAI takes 4).
        max_batch: requests decoded together; max_waiting: requests waiting for a place (beyond: 503).
        retry_after_s: the Retry-After of a 503.
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        header_timeout_s: a connection that has not sent a whole request head in this time is closed (uvicorn
            itself only times out connections idle after a response).
        body_timeout_s: a body not fully received in this time gets 408.
        max_connections: open connections plus requests in progress (uvicorn answers 503 beyond it).
        backlog: the listening socket's accept queue.
    """

    max_body_bytes: int = MAX_BODY_BYTES
    drain_bytes: int = 64 * 2**20
    max_prompt_chars: int | None = None
    max_stops: int = 16
    max_stop_chars: int = 256
    max_batch: int = 16
    max_waiting: int = 256
    retry_after_s: int = 1
    keep_alive_s: float = 5.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 4096
    backlog: int = 2048

    def prompt_chars(self, context_length: int) -> int:
        return self.max_prompt_chars or 32 * context_length

    @classmethod
    def of(cls, chat: Any) -> Limits:
        """The defaults, with any of these names that ``plan.chat`` sets (``chat.max_batch=32``)."""
        given = {name: getattr(chat, name) for name in cls.__dataclass_fields__
                 if getattr(chat, name, None) is not None}
        return cls(**given)
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


def parse_request(body: Any, limits: Limits | None = None, *, max_prompt_chars: int | None = None) -> Request:
    """Check a /v1/chat/completions body; raise BadRequest naming the parameter at fault.

    Pure and cheap: it runs before the prompt is rendered or tokenized, so an oversized request costs nothing.
    """
    limits = limits or Limits()
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
    if len(stops) > limits.max_stops:
        raise BadRequest(f"at most {limits.max_stops} stop strings are allowed, got {len(stops)}", param="stop")
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise BadRequest(f"a stop string may have at most {limits.max_stop_chars} characters", param="stop")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", param="tools")
    chars = sum(len(m["content"] or "") + len(json.dumps(m.get("tool_calls") or "")) for m in parsed)
    chars += len(json.dumps(tools, ensure_ascii=False)) if tools else 0
    if max_prompt_chars is not None and chars > max_prompt_chars:
        raise BadRequest(f"the messages and tools have {chars} characters; this server takes at most "
                         f"{max_prompt_chars} (far more than the model's context holds)", param="messages",
                         code="context_length_exceeded")
    options = body.get("stream_options") or {}
    return Request(
        messages=parsed,
        stream=_typed(body, "stream", bool, False),
        max_tokens=_number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1),
        temperature=_number(body, "temperature", float, 0, 2),
        top_p=_number(body, "top_p", float, 0, 1),
        seed=_number(body, "seed", int, *SEED_RANGE),
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
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  and isinstance(c["function"].get("name"), str) for c in calls):
            raise BadRequest(f"messages[{i}].tool_calls must be a list of {{type, function: {{name, arguments}}}} "
                             f"objects", param=f"messages[{i}].tool_calls")
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
    if isinstance(value, float) and not math.isfinite(value):  # json.loads takes NaN and Infinity
        raise BadRequest(f"'{key}' must be a finite number, got {value}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadRequest(f"'{key}' must be between {low} and {high}, got {value}", param=key)
    return kind(value)


# -- answering ------------------------------------------------------------------------------------------------


class Model:
    """The loaded model, its settings and the batching scheduler that generates for every request."""

    def __init__(self, loaded: Any, chat: ChatSpec, limits: Limits | None = None) -> None:
        self.loaded = loaded
        self.chat = chat
        self.limits = limits or Limits()
        self.batcher = Batcher(loaded.model, loaded.tokenizer, max_batch=self.limits.max_batch,
                               max_waiting=self.limits.max_waiting)
        # Rendering and tokenizing happen in request threads, one at a time: a fast tokenizer's settings are
        # shared state, and this work is short once the prompt-size limit has been checked.
        self.prepare_lock = threading.Lock()
        self.last: Job | None = None  # the latest reply, for logs and tests

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

    def check(self, request: Request) -> None:
        """What can be refused before the prompt is rendered: max_tokens beyond the whole context."""
        context = self.loaded.context_length
        if request.max_tokens and request.max_tokens >= context:
            raise BadRequest(f"this model's context is {context} tokens and {request.max_tokens} new tokens were "
                             f"asked for. Shorten max_tokens.", param="messages", code="context_length_exceeded")

    def prepare(self, request: Request, notify: Any = None) -> Job:
        """Render the prompt, check it fits, and make its job (in the request's thread, not the scheduler's)."""
        self.check(request)
        with self.prepare_lock:
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
        kwargs = generation_kwargs(self.chat, max_new_tokens=min(wanted, room), temperature=request.temperature,
                                   top_p=request.top_p)
        self.last = Job(ids, Sampling.of(kwargs, seed=request.seed), stops=request.stop,
                        hold=bool(request.tools), notify=notify)
        return self.last


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def tool_calls(call: dict[str, Any]) -> list[dict[str, Any]]:
    return [toolcalls.to_openai(call)]


def finish(reply: Job, request: Request) -> tuple[dict[str, Any], str]:
    """The reply as an OpenAI message, and its finish_reason."""
    text = reply.text
    call = toolcalls.parse_reply(text, allow_json=bool(request.tools))
    if call is not None:
        return {"role": "assistant", "content": None, "tool_calls": tool_calls(call)}, "tool_calls"
    reason = "length" if reply.finish_reason == "length" else "stop"
    return {"role": "assistant", "content": text}, reason


def usage(reply: Job) -> dict[str, int]:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def _error(exc: BadRequest, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _server_error(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": None}}


ROUTES_HINT = "routes: GET /v1/models, POST /v1/chat/completions"


class App:
    """The ASGI application: routes, the API key, body limits and the bridge to the scheduler."""

    def __init__(self, model: Model, *, api_key: str | None = None) -> None:
        self.model = model
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.requests import Request as HTTPRequest

        if scope["type"] != "http":  # lifespan and websockets: nothing to set up, nothing served
            return
        request = HTTPRequest(scope, receive)
        try:
            response = await self._route(request)
        except BadRequest as exc:
            response = _error(exc, {"Connection": "close"} if exc.status in (408, 413) else None)
        except QueueFull as exc:
            response = _error(BadRequest(f"the server is busy ({exc}); retry later", status=503,
                                         kind="server_error", code="overloaded"),
                              {"Retry-After": str(self.model.limits.retry_after_s)})
        except Exception as exc:  # a bug must not take the server down; the client is told
            log.exception("request failed")
            from starlette.responses import JSONResponse

            response = JSONResponse(_server_error(f"{type(exc).__name__}: {exc}"), status_code=500)
        await response(scope, receive, send)

    async def _route(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path, method = request.url.path.rstrip("/"), request.method
        name = self.model.loaded.name
        if path in ("", "/health"):
            return JSONResponse({"status": "ok", "model": name})
        self._authorize(request)
        routes = {"/v1/models": "GET", f"/v1/models/{name}": "GET", "/v1/chat/completions": "POST"}
        if path not in routes:
            raise BadRequest(f"no route {method} {request.url.path}; {ROUTES_HINT}", status=404, code="not_found")
        if method != routes[path]:
            raise BadRequest(f"{method} is not supported; {ROUTES_HINT}", status=405, code="method_not_allowed")
        if path == "/v1/models":
            return JSONResponse({"object": "list", "data": [_model_card(name)]})
        if path != "/v1/chat/completions":
            return JSONResponse(_model_card(name))
        return await self._chat(request)

    def _authorize(self, request: Any) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # Constant-time comparison: the time taken tells nothing about how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key):
            raise BadRequest("a valid API key is required: send 'Authorization: Bearer <key>'", status=401,
                             code="invalid_api_key")

    async def _body(self, request: Any) -> Any:
        """The JSON body, read in chunks with a cap (413 beyond it) and a deadline (408)."""
        limits = self.model.limits
        try:
            announced = int(request.headers.get("content-length") or -1)
        except ValueError:
            raise BadRequest("bad Content-Length header") from None
        too_large = BadRequest(f"the body is over {limits.max_body_bytes} bytes", status=413)
        if announced > limits.drain_bytes:  # not worth reading: answered now, the connection then closed
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size <= limits.max_body_bytes:
                        chunks.append(chunk)
                    elif size > limits.drain_bytes:
                        raise too_large
                    # Between the two limits the rest is read and dropped, so the client sees the 413.
        except TimeoutError:
            raise BadRequest(f"the body did not arrive within {limits.body_timeout_s:g} s", status=408) from None
        if size > limits.max_body_bytes:
            raise too_large
        if size == 0:
            raise BadRequest("the request needs a JSON body")
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None

    async def _chat(self, http: Any) -> Any:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import StreamingResponse

        model = self.model
        body = await self._body(http)
        request = parse_request(body, model.limits,
                                max_prompt_chars=model.limits.prompt_chars(model.loaded.context_length))
        model.check(request)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def notify() -> None:  # called by the scheduler thread
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the event loop has closed (shutting down): nobody is waiting any more
                pass

        model.batcher.reserve()  # QueueFull (503) before the prompt is rendered
        try:
            job = await run_in_threadpool(model.prepare, request, notify)
        except BaseException:
            model.batcher.release()
            raise
        model.batcher.submit(job)
        if request.stream:
            return StreamingResponse(self._events(job, request, changed), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(http, job, request, changed)

    async def _complete(self, http: Any, job: Job, request: Request, changed: asyncio.Event) -> Any:
        from starlette.responses import JSONResponse

        gone = asyncio.ensure_future(_disconnected(http))
        try:
            while not job.finished:
                waiter = asyncio.ensure_future(changed.wait())
                await asyncio.wait([waiter, gone], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                changed.clear()
                if gone.done():
                    job.cancel()  # the client went away: its row leaves the batch
                    break
        finally:
            gone.cancel()
        _log(job)
        if job.finish_reason == "error":
            return JSONResponse(_server_error(f"generation failed: {job.error}"), status_code=500)
        message, reason = finish(job, request)
        return JSONResponse({
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self.model.loaded.name, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}],
            "usage": usage(job),
        })

    async def _events(self, job: Job, request: Request, changed: asyncio.Event) -> AsyncIterator[str]:
        """Server-sent events; starlette cancels this when the client goes away, which cancels the job."""
        base = {"id": completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model.loaded.name, "system_fingerprint": None}

        def event(delta: dict[str, Any], reason: str | None = None) -> str:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        shown = ""
        try:
            yield event({"role": "assistant", "content": ""})
            while True:
                done = job.finished  # read before the text: the scheduler writes the text first
                visible = job.visible
                if not job.hold and len(visible) > len(shown) and visible.startswith(shown):
                    yield event({"content": visible[len(shown):]})
                    shown = visible
                if done:
                    break
                await changed.wait()
                changed.clear()
        finally:
            if not job.finished:
                job.cancel()
        _log(job)
        if job.finish_reason == "error":  # the headers are sent: report it in the stream, as OpenAI does
            yield f"data: {json.dumps(_server_error(f'generation failed: {job.error}'))}\n\n"
            return
        message, reason = finish(job, request)
        if job.hold and message.get("tool_calls"):
            yield event({"tool_calls": [{"index": 0, **message["tool_calls"][0]}]})
        elif job.hold and message["content"]:
            yield event({"content": message["content"]})
        yield event({}, reason)
        if request.include_usage:
            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(job)})}\n\n"
        yield "data: [DONE]\n\n"


async def _disconnected(http: Any) -> None:
    """Returns once the client has gone away (the body is read, so the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _log(job: Job) -> None:
    log.info("%d prompt + %d completion tokens (%s)", job.prompt_tokens, job.completion_tokens, job.finish_reason)


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "impruver"}


@dataclass
class Server:
    """uvicorn serving :class:`App` on a socket bound at construction (so the port is known and errors early)."""

    model: Model
    app: App
    sock: socket.socket
    limits: Limits
    _server: Any = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _uvicorn(self) -> Any:
        import uvicorn

        config = uvicorn.Config(self.app, lifespan="off", access_log=False, log_config=None, log_level="warning",
                                backlog=self.limits.backlog, timeout_keep_alive=int(self.limits.keep_alive_s) or 1,
                                limit_concurrency=self.limits.max_connections, loop="asyncio",
                                timeout_graceful_shutdown=5,  # Ctrl+C does not wait for long streams
                                http=_protocol(self.limits.header_timeout_s))
        self._server = uvicorn.Server(config)
        return self._server

    def serve_forever(self) -> None:
        """Serve until Ctrl+C (in the main thread) or :meth:`shutdown`."""
        self._uvicorn().run(sockets=[self.sock])

    def start(self) -> Server:
        """Serve in a background thread (tests, benchmarks); returns once it accepts connections."""
        server = self._uvicorn()
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RunError("the server did not start")
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.model.batcher.close()
        self.sock.close()


def _protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request head (slow or silent clients are dropped)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self.loop.call_later(header_timeout_s, self._head_timeout, self.cycle)

        def _head_timeout(self, cycle: Any) -> None:
            # Still no new request since the timer was armed, and none in progress: waiting for a head too long.
            idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
            if idle and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def make_server(loaded: Any, chat: ChatSpec, *, host: str, port: int, api_key: str | None = None,
                limits: Limits | None = None) -> Server:
    """A server for ``loaded`` on ``host:port`` (port 0: a free one; see ``server.port``).

    Raises:
        OSError: the address cannot be bound.
    """
    limits = limits or Limits()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(limits.backlog)  # the accept queue: 50 clients at once must not meet a reset
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    model = Model(loaded, chat, limits)
    return Server(model=model, app=App(model, api_key=api_key), sock=sock, limits=limits)


# -- the stage -------------------------------------------------------------------------------------------------


def api_key_of(plan: Plan, flag: str | None = None) -> str | None:
    """The API key: ``--api-key``, else ``$IMPRUVER_API_KEY``, else ``chat.api_key`` (never logged or written)."""
    for key in (flag, os.environ.get(API_KEY_ENV), getattr(plan.chat, "api_key", None)):
        if key:
            return key.get_secret_value() if hasattr(key, "get_secret_value") else str(key)
    return None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this machine can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """A server reachable from other machines must ask for a key; refuse to start otherwise (exit status 2)."""
    if not is_loopback(host) and not api_key:
        raise ConfigError([Problem("chat.api_key", f"chat.host={host} lets other machines in, so an API key is "
                                   f"required: pass --api-key KEY or set {API_KEY_ENV} (or serve on "
                                   f"chat.host=127.0.0.1)")])


def run(plan: Plan, *, api_key: str | None = None) -> int:
    """`impruver serve`: load ``plan.output_dir`` and answer OpenAI-style requests until Ctrl+C.

    Args:
        plan: the validated plan; ``plan.chat`` gives the host, port and default generation settings.
        api_key: the ``--api-key`` flag (else ``$IMPRUVER_API_KEY`` or ``chat.api_key``); required when
            ``chat.host`` is not a loopback address.

    Returns:
        0 after Ctrl+C (problems raise :class:`~impruver.errors.ImpruverError`, exit status 2).
    """
    from impruver.chat.load import chat_settings, load, locate, quiet_libraries, seed

    host, port = plan.chat.host, plan.chat.port
    key = api_key_of(plan, api_key)
    check_exposure(host, key)  # before anything loads
    locate(plan.output_dir, model_path=plan.model.path)  # fail before importing torch
    quiet_libraries()
    loaded = load(plan)
    seed(plan.chat.seed)
    try:
        server = make_server(loaded, chat_settings(plan.chat, loaded.context_length), host=host, port=port,
                             api_key=key, limits=Limits.of(plan.chat))
    except OSError as exc:
        raise RunError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another with "
                       f"chat.port=N (or stop what uses it)") from None
    address = f"http://{host}:{server.port}/v1"
    console.print(f"serving {loaded.describe()}\n  OpenAI-compatible API at {address} (model '{loaded.name}'"
                  f"{', API key required' if key else ''}); Ctrl+C stops", markup=False)
    sys.stdout.flush()  # scripts wait for this line to know the server is up
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.model.batcher.close()
        server.sock.close()
    console.print("stopped", markup=False)
    return 0
