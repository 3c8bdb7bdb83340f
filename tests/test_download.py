"""``impruver download`` and the plan's Hub ids: one clear line and exit 2 for an unreachable Hub (in under 5 s),
a gated, a missing repository; a download that prints the folder and the override; every missing Hub id of a plan
reported at once, fast.

The Hub is never reached: HF_ENDPOINT points at a closed local port, or at a small local server that answers the
way the Hub's API does (the error codes huggingface_hub reads, a repository of two files).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens there, the connection is refused at once
FILES = {"config.json": b'{"model_type": "gpt2"}', "README.md": b"# tiny\n"}
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The three answers the tests need: a gated repository, a missing one, and org/tiny with two files."""

    def log_message(self, *args: object) -> None:  # keep the test output quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/":
            return self._send(200)
        if "org/gated" in path:
            return self._send(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        if "org/tiny" not in path:
            return self._send(404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound",
                                                               "X-Error-Message": "Repository not found"})
        if path.startswith("/api/models/org/tiny/tree/"):
            tree = [{"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
                    for name, body in FILES.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        if path.startswith("/api/"):
            info = {"id": "org/tiny", "sha": SHA, "siblings": [{"rfilename": name} for name in FILES]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        name = path.rsplit("/", 1)[-1]
        body = FILES[name]
        self._send(200, body, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'})


@pytest.fixture(scope="module")
def fake_hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _online_env(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """The Hub switched on (none of the offline variables) and pointed at ``endpoint``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}


def _download(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "impruver", "download", *args], env=env, capture_output=True,
                          text=True, timeout=60)
    return done, time.perf_counter() - started


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_an_unreachable_hub_exits_2_at_once_with_one_line(tmp_path: Path) -> None:
    done, seconds = _download(_online_env(CLOSED_PORT, tmp_path), "ai-forever/rugpt3small_based_on_gpt2")
    assert done.returncode == 2 and seconds < 5, (done.returncode, seconds)
    assert "cannot be reached" in _one_line(done.stderr) and CLOSED_PORT in done.stderr


def test_offline_mode_says_so(tmp_path: Path) -> None:
    done, _ = _download({**_online_env(CLOSED_PORT, tmp_path), "HF_HUB_OFFLINE": "1"}, "org/name",
                        "--repo-type", "dataset")
    assert done.returncode == 2 and "HF_HUB_OFFLINE is set" in _one_line(done.stderr)


def test_gated_and_missing_repositories_get_one_line_each(tmp_path: Path, fake_hub: str) -> None:
    env = _online_env(fake_hub, tmp_path)
    gated, _ = _download(env, "org/gated")
    assert gated.returncode == 2 and "is gated" in _one_line(gated.stderr) and "hf auth login" in gated.stderr
    missing, _ = _download(env, "org/nothing-here")
    assert missing.returncode == 2 and "no model org/nothing-here on the Hub" in _one_line(missing.stderr)
    assert "--repo-type dataset" in missing.stderr


def test_a_download_prints_the_folder_and_the_override(tmp_path: Path, fake_hub: str) -> None:
    dest = tmp_path / "models" / "tiny"
    done, _ = _download(_online_env(fake_hub, tmp_path), "org/tiny", "--dest", str(dest))
    assert done.returncode == 0, done.stderr
    assert {p.name for p in dest.iterdir() if p.is_file()} == set(FILES)
    assert (dest / "config.json").read_bytes() == FILES["config.json"]
    assert f"impruver model.path={dest}" in done.stdout


def test_a_plan_reports_every_missing_hub_id_at_once_fast(tmp_path: Path, monkeypatch) -> None:
    """Three Hub ids (model, tokenizer, a dataset), the Hub unreachable: one error names all three, in one probe."""
    from impruver import hub
    from impruver.errors import RunError
    from impruver.plan import make_plan
    from impruver.plan.probes import check_hub, environment_problems

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    probes = []
    real = hub.reachable
    monkeypatch.setattr(hub, "reachable", lambda: probes.append(1) or real())
    monkeypatch.setattr(hub, "go_offline", lambda: None)  # keep this test process as it was
    plan = make_plan({
        "output_dir": str(tmp_path / "run"),
        "model": {"builder": "hf", "path": "org/missing-model"},
        "tokenizer": {"builder": "hf", "path": "org/missing-tokenizer", "chat_template": "saiga"},
        "dataset": {"sources": {"chats": {"path": "org/missing-chats", "format": "openai"},
                                "local": {"path": str(tmp_path / "mine.jsonl"), "format": "openai"}}},
        "method": {"builder": "lora"}, "hardware": {"name": "cpu", "device": "cpu"},
    })
    started = time.perf_counter()
    with pytest.raises(RunError) as caught:
        check_hub(plan)
    assert time.perf_counter() - started < 5 and len(probes) == 1
    message = str(caught.value)
    for key, repo, command in (("model.path", "org/missing-model", "hf download org/missing-model --local-dir"),
                               ("tokenizer.path", "org/missing-tokenizer", "hf download org/missing-tokenizer"),
                               ("dataset.sources.chats.path", "org/missing-chats",
                                "hf download org/missing-chats --repo-type dataset")):
        assert f"{key}: {repo}" in message and command in message
    assert "mine.jsonl" not in message
    assert {p.key for p in environment_problems(plan)} >= {"model.path", "tokenizer.path", "dataset.sources.chats.path"}


def test_a_cached_hub_id_is_not_missing(tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    from impruver import hub

    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--cached" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    try:
        refs = [hub.HubRef("model.path", "org/cached", "model"), hub.HubRef("tokenizer.path", "org/gone", "model")]
        missing, why = hub.missing(refs)  # HF_HUB_OFFLINE=1 in the tests: no probe at all
        assert [r.repo_id for r in missing] == ["org/gone"] and "HF_HUB_OFFLINE" in why
        hub.require_reachable("org/cached", "model", "model.path")  # offline, but cached: loads from the cache
    finally:
        snapshot.rmdir()


def test_hub_hints_say_hf_download() -> None:
    from impruver.hub import hub_unreachable

    assert "hf download org/data --repo-type dataset --local-dir DIR" in str(
        hub_unreachable("org/data", "dataset", "dataset.sources.x.path"))
    assert "huggingface-cli" not in str(hub_unreachable("org/model", "model", "model.path"))


def test_a_composed_run_needs_only_its_model_from_the_hub(tmp_path: Path) -> None:
    """Composed data carries its own tokenizer and samples: its Hub sources are not asked for again (an offline
    GPU box trains what a machine with network composed), unless the data is composed again."""
    from impruver.plan import make_plan
    from impruver.plan.probes import hub_refs

    plan = make_plan({
        "output_dir": str(tmp_path / "run"), "model": {"builder": "hf", "path": "org/model"},
        "tokenizer": {"builder": "hf", "path": "org/tokenizer", "chat_template": "saiga"},
        "dataset": {"sources": {"chats": {"path": "org/chats", "format": "openai"}}},
        "method": {"builder": "lora"}, "hardware": {"name": "cpu", "device": "cpu"},
    })
    assert [r.key for r in hub_refs(plan)] == ["model.path", "tokenizer.path", "dataset.sources.chats.path"]
    for path in (plan.train_path, plan.val_path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("")
    assert [r.key for r in hub_refs(plan)] == ["model.path"]
    assert len(hub_refs(plan, recompose=True)) == 3
