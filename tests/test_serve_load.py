"""`impruver serve` under load and attack: batching equals generating alone, many clients, limits, keys, queues.

All on loopback with the tiny chat fixture model (tests/test_chat_support.py), bounded in time and count.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from test_chat_server import client, serving
from test_chat_support import REPO, chat_dirs, chat_plan, cli_env, direct_reply, impruver_cmd  # noqa: F401, F811

from impruver.chat.batching import Batcher, Job, Sampling
from impruver.chat.generate import render
from impruver.chat.load import load
from impruver.chat.server import Limits

openai = pytest.importorskip("openai", reason="the openai client is in the test extra: pip install -e .[test]")
PROMPTS = ["Привет", "Hello, how are you today?", "Сайга — русскоязычный", "The quick brown fox",
           "Как дела?", "It talks with people and helps them."]


@pytest.fixture(scope="module")
def loaded(chat_dirs: dict[str, Path]) -> Any:
    return load(chat_plan(chat_dirs["full"]))


@pytest.fixture(scope="module")
def served(loaded: Any, chat_dirs: dict[str, Path]) -> Any:
    """(base URL, Model) of a server with default limits."""
    plan = chat_plan(chat_dirs["full"])
    with serving(loaded, plan.chat) as url:
        from test_chat_server import full_server_model

        yield url, full_server_model(url)


def prompt_ids(loaded: Any, text: str) -> list[int]:
    return render(loaded.tokenizer, [{"role": "user", "content": text}])


def address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def post(url: str, body: Any, headers: dict[str, str] | None = None, *, raw: bytes | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*address(url), timeout=timeout)
    connection.request("POST", "/v1/chat/completions", body=raw if raw is not None else json.dumps(body),
                       headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.getheaders()), data


# -- batching ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("joining", ["cache", "prefill"])
def test_batched_greedy_replies_equal_each_reply_alone(loaded: Any, joining: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Six prompts of different lengths and budgets: together (five joining a batch already decoding) = alone =
    generate(). Rows join by merging KV caches, or (caches that cannot be edited) by prefilling every row again."""
    if joining == "prefill":
        monkeypatch.setattr("impruver.chat.batching._layers", lambda past: None)
    budgets = [24, 7, 30, 12, 18, 3]
    jobs = [(prompt_ids(loaded, p), Sampling(max_new_tokens=n, repetition_penalty=1.1))
            for p, n in zip(PROMPTS, budgets, strict=True)]
    batcher = Batcher(loaded.model, loaded.tokenizer, max_batch=8)
    try:
        alone = []
        for ids, sampling in jobs:
            job = batcher.generate(Job(ids, sampling))
            job.wait(60)
            alone.append(job)
        first = batcher.generate(Job(*jobs[0]))
        while first.completion_tokens < 3:  # the others join a batch already decoding
            time.sleep(0.001)
        together = [first, *(batcher.generate(Job(ids, sampling)) for ids, sampling in jobs[1:])]
        for job in together:
            job.wait(60)
        assert batcher.widest >= 5  # they were decoded side by side
    finally:
        batcher.close()
    for a, b, (ids, sampling), text in zip(alone, together, jobs, PROMPTS, strict=True):
        assert b.ids == a.ids and b.text == a.text and b.finish_reason == a.finish_reason == "length"
        reference = direct_reply(loaded.model, loaded.tokenizer, [{"role": "user", "content": text}],
                                 max_new_tokens=sampling.max_new_tokens)
        assert a.text == reference and len(a.ids) == sampling.max_new_tokens


def test_seeded_sampling_repeats_and_differs_by_seed(loaded: Any) -> None:
    ids = prompt_ids(loaded, PROMPTS[0])
    batcher = Batcher(loaded.model, loaded.tokenizer)
    try:
        def sample(seed: int) -> list[int]:
            sampling = Sampling(max_new_tokens=16, do_sample=True, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
            job = batcher.generate(Job(ids, sampling))
            job.wait(60)
            return job.ids

        assert sample(1) == sample(1) != sample(2)
    finally:
        batcher.close()


def test_fifty_concurrent_requests_stream_and_not_all_succeed(served: Any, loaded: Any) -> None:
    url, model = served
    api = client(url)
    expected = direct_reply(loaded.model, loaded.tokenizer, [{"role": "user", "content": PROMPTS[1]}],
                            max_new_tokens=12)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": PROMPTS[1]}]
        if i % 2:
            chunks = api.chat.completions.create(model="x", messages=messages, temperature=0, max_tokens=12,
                                                 stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return api.chat.completions.create(model="x", messages=messages, temperature=0,
                                           max_tokens=12).choices[0].message.content

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(ask, range(50)))  # any non-200 raises in the client
    assert replies == [expected] * 50
    assert model.batcher.widest > 1  # requests shared batches


def test_the_most_stop_strings_allowed_do_not_delay_a_short_request(served: Any) -> None:
    url, model = served
    api = client(url)
    short = {"model": "x", "messages": [{"role": "user", "content": "Привет"}], "temperature": 0, "max_tokens": 4}
    started = time.monotonic()
    api.chat.completions.create(**short)
    alone = time.monotonic() - started
    limits = model.limits
    stops = [f"{i:04d}" + "щ" * (limits.max_stop_chars - 4) for i in range(limits.max_stops)]
    done: list[Any] = []
    heavy = threading.Thread(target=lambda: done.append(api.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=1500, stop=stops)))
    heavy.start()
    deadline = time.monotonic() + 30
    while not any(job.stops[:1] == stops[:1] and job.completion_tokens > 5 for job in model.batcher.active):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    started = time.monotonic()
    api.chat.completions.create(**short)
    beside = time.monotonic() - started
    heavy.join(120)
    assert done and done[0].choices[0].finish_reason == "length"
    assert beside < alone + 1.0, (alone, beside)


# -- limits and refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"seed": 2**70}, "seed"),
    ({"seed": -(2**70)}, "seed"),
    ({"stop": [str(i) for i in range(1000)]}, "stop"),
    ({"stop": ["x" * 10_000]}, "stop"),
    ({"max_tokens": 10**9}, "messages"),
    ({"messages": [{"role": "user", "content": "a" * 10**6}]}, "messages"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": -0.1}, "top_p"),
    ({"max_completion_tokens": "many"}, "max_completion_tokens"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": "f"}]}]},
     "messages[0].tool_calls"),
])
def test_bad_parameters_are_400_before_any_work(served: Any, body: dict[str, Any], param: str) -> None:
    url, model = served
    batches = model.batcher.batches
    status, _, data = post(url, {"messages": [{"role": "user", "content": "hi"}], **body})
    assert status == 400 and json.loads(data)["error"]["param"] == param
    assert model.batcher.batches == batches


def test_non_finite_numbers_are_400(served: Any) -> None:
    url, _ = served
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    status, _, data = post(url, None, raw=raw)
    assert status == 400 and json.loads(data)["error"]["param"] == "temperature"


def test_a_ten_megabyte_body_sent_whole_gets_413(served: Any) -> None:
    url, _ = served
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 10 * 2**20}]}).encode()
    status, headers, data = post(url, None, raw=body)  # the client sends it all, then reads the answer
    assert status == 413 and "over" in json.loads(data)["error"]["message"]
    assert client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2).choices


def test_three_hundred_idle_connections_do_not_stop_a_request(served: Any) -> None:
    url, _ = served
    idle = []
    try:
        for i in range(300):
            sock = socket.create_connection(address(url), timeout=10)
            if i % 2:  # half of them send part of a request head and stall
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            idle.append(sock)
        started = time.monotonic()
        answer = client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=3)
        assert answer.choices[0].message.role == "assistant" and time.monotonic() - started < 10
    finally:
        for sock in idle:
            sock.close()


def test_silent_and_slow_connections_are_closed(loaded: Any, chat_dirs: dict[str, Path]) -> None:
    limits = Limits(header_timeout_s=0.5, body_timeout_s=0.5)
    with serving(loaded, chat_plan(chat_dirs["full"]).chat, limits=limits) as url:
        silent = socket.create_connection(address(url), timeout=10)
        silent.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        slow = socket.create_connection(address(url), timeout=10)
        slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert silent.recv(100) == b""  # closed by the server within the timeout
        assert slow.makefile("rb").read().startswith(b"HTTP/1.1 408")
        silent.close()
        slow.close()


def test_a_full_queue_answers_503_with_retry_after(loaded: Any, chat_dirs: dict[str, Path]) -> None:
    with serving(loaded, chat_plan(chat_dirs["full"]).chat, limits=Limits(max_batch=1, max_waiting=1)) as url:
        from test_chat_server import full_server_model

        model = full_server_model(url)
        long = http.client.HTTPConnection(*address(url), timeout=60)  # holds the only row, streaming
        long.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1900,
                                      "stream": True, "temperature": 0}))
        stream = long.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")
        waiting: list[Any] = []
        second = threading.Thread(target=lambda: waiting.append(post(url, {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})))
        second.start()
        deadline = time.monotonic() + 30
        while model.batcher.waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        status, headers, data = post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(data)["error"]["code"] == "overloaded"
        long.close()  # the stream's client goes away: its row frees, the waiting request is answered
        second.join(60)
        assert waiting and waiting[0][0] == 200


# -- the API key ------------------------------------------------------------------------------------------------


def test_with_an_api_key_requests_without_it_get_401(loaded: Any, chat_dirs: dict[str, Path]) -> None:
    with serving(loaded, chat_plan(chat_dirs["full"]).chat, api_key="sk-right") as url:
        messages = [{"role": "user", "content": "hi"}]
        for key in (None, "sk-wrong", "sk-righ", ""):
            headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
            status, _, data = post(url, {"messages": messages, "max_tokens": 2}, headers)
            assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        api = openai.OpenAI(base_url=url, api_key="sk-right", max_retries=0, timeout=60)
        assert api.chat.completions.create(model="x", messages=messages, max_tokens=2).choices
        assert [m.id for m in api.models.list()] == ["full"]


def test_a_host_beyond_loopback_needs_a_key(chat_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from impruver.chat.server import API_KEY_ENV, run
    from impruver.errors import ConfigError

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match="API key is required"):
        run(chat_plan(chat_dirs["full"], "chat.host=0.0.0.0"))
    env = {k: v for k, v in cli_env().items() if k != API_KEY_ENV}
    result = subprocess.run(impruver_cmd("serve", f"output_dir={chat_dirs['full']}", "chat.host=0.0.0.0"),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "API key" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_the_key_comes_from_the_flag_then_the_environment(chat_dirs: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from impruver.chat.server import API_KEY_ENV, api_key_of, check_exposure
    from impruver.errors import ConfigError

    plan = chat_plan(chat_dirs["full"])
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_of(plan) is None
    monkeypatch.setenv(API_KEY_ENV, "sk-env")
    assert api_key_of(plan) == "sk-env" and api_key_of(plan, "sk-flag") == "sk-flag"
    check_exposure("0.0.0.0", "sk-env")  # a key: any host
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(host, None)  # loopback: no key needed
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        with pytest.raises(ConfigError, match="API key is required"):
            check_exposure(host, None)


def test_many_stop_strings_cost_little_per_token(loaded: Any) -> None:
    """Stops are matched in the text's new tail, not prepared per token: 1,000 of them over 300 tokens is quick."""
    stops = [f"«{i}»" for i in range(1000)]
    job = Job([1], Sampling(max_new_tokens=300), stops=stops)
    tokens = prompt_ids(loaded, " ".join(PROMPTS))[:300]
    started = time.monotonic()
    for token in tokens:
        job.add(token, lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True), set())
    assert time.monotonic() - started < 1.0 and job.finish_reason in (None, "length")
    job = Job([1], Sampling(max_new_tokens=300), stops=[*stops, "quick"])
    for token in tokens:
        job.add(token, lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True), set())
        if job.finished:
            break
    assert job.finish_reason == "stop" and "quick" not in job.text and job.text.endswith("The")


def test_a_client_that_goes_away_before_a_whole_reply_frees_its_row(served: Any) -> None:
    url, model = served
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1900, "temperature": 0})
    with socket.create_connection(address(url), timeout=10) as sock:  # not streaming: waits for the whole reply
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body.encode())}\r\n\r\n{body}".encode())
        deadline = time.monotonic() + 30
        while not (model.last is not None and model.last.completion_tokens > 3):
            assert time.monotonic() < deadline
            time.sleep(0.005)
    job = model.last
    while not (job.finished and not model.batcher.active):
        assert time.monotonic() < deadline, "the server is still generating for a client that went away"
        time.sleep(0.01)
    assert job.finish_reason == "interrupted" and job.completion_tokens < 1900
