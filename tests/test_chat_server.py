"""`impruver serve`: the official openai client, streaming and not, tool calls, and 4xx JSON errors."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_chat_support import (CALL, REPO, TOOLS, chat_dirs, chat_plan, cli_env, direct_reply,  # noqa: F401, F811
                               function_caller, impruver_cmd)

from impruver.chat.load import load
from impruver.chat.server import make_server

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e .[test]")
HELLO = [{"role": "user", "content": "Привет"}]


@pytest.fixture(scope="module")
def full_server(chat_dirs: dict[str, Path]) -> Iterator[tuple[str, Any]]:
    """The full model served in this process on a free port of 127.0.0.1; yields (base URL, loaded model)."""
    plan = chat_plan(chat_dirs["full"])
    loaded = load(plan)
    with serving(loaded, plan.chat) as url:
        yield url, loaded


SERVERS: dict[str, Any] = {}  # base URL -> the server's Model (its scheduler and latest reply)


def full_server_model(url: str) -> Any:
    return SERVERS[url]


class serving:  # noqa: N801  used like a function: `with serving(...) as url`
    """Run make_server's server in a thread for the duration of a with block."""

    def __init__(self, loaded: Any, chat: Any, **options: Any) -> None:
        self.server = make_server(loaded, chat, host="127.0.0.1", port=0, **options)

    def __enter__(self) -> str:
        self.server.start()
        url = f"http://127.0.0.1:{self.server.port}/v1"
        SERVERS[url] = self.server.model
        return url

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()


def client(url: str) -> Any:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def test_openai_client_without_streaming(full_server: tuple[str, Any]) -> None:
    url, loaded = full_server
    api = client(url)
    assert [m.id for m in api.models.list()] == ["full"]
    answer = api.chat.completions.create(model="full", messages=HELLO, temperature=0, max_tokens=24)
    expected = direct_reply(loaded.model, loaded.tokenizer, HELLO)
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length" and answer.model == "full" and answer.id.startswith("chatcmpl-")
    prompt = len(loaded.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)["input_ids"])
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt, 24)


def test_openai_client_with_streaming(full_server: tuple[str, Any]) -> None:
    url, loaded = full_server
    chunks = list(client(url).chat.completions.create(model="full", messages=HELLO, temperature=0, max_tokens=24,
                                                      stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 10  # token by token
    assert "".join(pieces) == direct_reply(loaded.model, loaded.tokenizer, HELLO)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and len({c.id for c in chunks}) == 1


def test_system_prompt_and_stop_strings(full_server: tuple[str, Any]) -> None:
    url, loaded = full_server
    messages = [{"role": "system", "content": "Ты — Сайга."}, *HELLO]
    api = client(url)
    expected = direct_reply(loaded.model, loaded.tokenizer, messages)
    assert api.chat.completions.create(model="x", messages=messages, temperature=0,
                                       max_tokens=24).choices[0].message.content == expected
    start = next(i for i in range(4, len(expected) - 2) if "\ufffd" not in expected[i:i + 2]
                 and expected[i:i + 2].strip())
    stop = expected[start:start + 2]
    cut = expected[:expected.index(stop)].strip()
    answer = api.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=24, stop=[stop])
    assert answer.choices[0].message.content == cut and answer.choices[0].finish_reason == "stop"
    streamed = api.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=24, stop=stop,
                                           stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def raw_request(url: str, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    assert response.getheader("Content-Type") == "application/json"
    return response.status, json.loads(data)


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), [
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/chat/completions", b"", 400, None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("POST", "/v1/chat/completions", b'{"model": "x"}', 400, "messages"),
    ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("POST", "/v1/chat/completions", b'{"messages": ["hi"]}', 400, "messages[0]"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, "messages[0].role"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400, "messages[0].content"),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}', 400,
     "messages[0].content"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400,
     "temperature"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400,
     "max_tokens"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400,
     "stream"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "stop": 5}', 400, "stop"),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}', 400,
     "messages"),
    ("POST", "/v1/completions", b'{"prompt": "hi"}', 404, None),
    ("GET", "/v2/nothing", None, 404, None),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("DELETE", "/v1/models", None, 405, None),
])
def test_malformed_requests_get_4xx_json_errors(full_server: tuple[str, Any], method: str, path: str,
                                                body: bytes | None, status: int, param: str | None) -> None:
    url, _ = full_server
    got, answer = raw_request(url, method, path, body)
    assert got == status
    assert set(answer) == {"error"} and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"] and answer["error"]["param"] == param


def test_a_conversation_the_template_refuses_is_a_400(chat_dirs: dict[str, Path]) -> None:
    plan = chat_plan(chat_dirs["full"])
    loaded = load(plan)
    loaded.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                      "{{ raise_exception('System role not supported') }}{% endif %}"
                                      "{{ m['content'] }}{% endfor %}")
    with serving(loaded, plan.chat) as url:
        body = json.dumps({"messages": [{"role": "system", "content": "x"}, *HELLO]}).encode()
        status, answer = raw_request(url, "POST", "/v1/chat/completions", body)
    assert status == 400 and "System role not supported" in answer["error"]["message"]


def test_openai_client_sees_bad_requests_and_the_server_keeps_going(full_server: tuple[str, Any]) -> None:
    url, _ = full_server
    api = client(url)
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model="full", messages=HELLO, max_tokens=5000)
    assert error.value.status_code == 400 and error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="full", messages=[{"role": "robot", "content": "hi"}])
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # announces 100 MB, sends none of it
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 413") and b'"invalid_request_error"' in reply
    assert api.chat.completions.create(model="full", messages=HELLO, temperature=0, max_tokens=3).choices


def test_client_that_goes_away_mid_stream_stops_the_generation(full_server: tuple[str, Any]) -> None:
    url, _ = full_server
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"messages": HELLO, "max_tokens": 1900, "stream": True, "temperature": 0})
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    response.close()
    connection.close()  # gone after the first event, long before 1900 tokens
    model = full_server_model(url)
    deadline = time.monotonic() + 60
    while not (model.last is not None and model.last.finished and not model.batcher.active):
        assert time.monotonic() < deadline, "the server is still generating for a client that went away"
        time.sleep(0.05)
    assert model.last.finish_reason == "interrupted" and model.last.completion_tokens < 1900
    assert client(url).chat.completions.create(model="full", messages=HELLO, max_tokens=3).choices


def test_tool_calls_round_trip(function_caller: Path) -> None:
    plan = chat_plan(function_caller, "chat.max_new_tokens=40")
    tools = TOOLS
    with serving(load(plan), plan.chat) as url:
        api = client(url)
        question = [{"role": "user", "content": "Погода?"}]
        answer = api.chat.completions.create(model="fc", messages=question, tools=tools, temperature=0)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Moscow"}
        streamed = list(api.chat.completions.create(model="fc", messages=question, tools=tools, temperature=0,
                                                    stream=True))
        deltas = [c.choices[0].delta for c in streamed if c.choices and c.choices[0].delta.tool_calls]
        assert deltas[0].tool_calls[0].function.name == "get_weather"
        assert streamed[-1].choices[0].finish_reason == "tool_calls"
        followup = [*question, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
        final = api.chat.completions.create(model="fc", messages=followup, tools=tools, temperature=0)
        assert final.choices[0].message.content == "Тепло, +21" and final.choices[0].finish_reason == "stop"
        assert json.loads(CALL)["name"] == "get_weather"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_impruver_serve_command_answers_and_stops_on_ctrl_c(chat_dirs: dict[str, Path]) -> None:
    port = free_port()
    process = subprocess.Popen(impruver_cmd("serve", f"output_dir={chat_dirs['adapter']}", f"chat.port={port}",
                                            "chat.max_new_tokens=8"),
                               cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = _wait_for_line(process, "OpenAI-compatible API at", timeout=120)
        assert f"http://127.0.0.1:{port}/v1" in ready and "LoRA adapter" in ready
        api = client(f"http://127.0.0.1:{port}/v1")
        assert api.chat.completions.create(model="adapter", messages=HELLO).choices[0].message.role == "assistant"
        chunks = list(api.chat.completions.create(model="adapter", messages=HELLO, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def _wait_for_line(process: subprocess.Popen[str], text: str, timeout: float) -> str:
    """The first stdout line containing ``text``; fails with the server's stderr if it does not come."""
    found: list[str] = []

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            found.append(line)
            if text in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found or text not in found[-1]:
        process.kill()
        raise AssertionError(f"the server did not start: {''.join(found)} {process.stderr.read()}")  # type: ignore
    return "".join(found)


def test_a_port_in_use_is_a_clear_error(chat_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver.chat.server import run
    from impruver.errors import RunError

    monkeypatch.setattr("impruver.chat.load.quiet_libraries", lambda: None)  # keep library logging as other tests want

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        plan = chat_plan(chat_dirs["full"], f"chat.port={port}")
        assert plan.chat.host == "127.0.0.1"  # localhost unless the config says otherwise
        with pytest.raises(RunError, match=rf"cannot listen on 127.0.0.1:{port}.*chat.port=N"):
            run(plan)
