"""Redaction: secrets are found by whole key names and by the values of secret environment variables."""

from __future__ import annotations

import pytest

from impruver.compose import plan_job
from impruver.plan import redact

ENV = {"HF_TOKEN": "hf_abcdefghijklmnop", "WANDB_API_KEY": "0123456789abcdef", "HOME": "/home/someone",
       "MY_KEY": "1", "SSH_AUTH_SOCK": "/tmp/ssh-agent-socket-xyz"}


def test_secret_keys_are_whole_names() -> None:
    data = redact({"token": "t0", "api_key": "k", "password": "p", "hf_token": "h", "access_token": "a",
                   "wandb_api_key": "w", "Secret": "s",
                   "sep_token": "<sep>", "pad_token": "<pad>", "max_tokens": 5, "tokens": 12, "keywords": "x",
                   "tokenizer": {"special_tokens": {"pad_token": "<pad>", "cls_token": "<cls>"}}}, env={})
    assert {k: data[k] for k in ("token", "api_key", "password", "hf_token", "access_token", "wandb_api_key",
                                 "Secret")} == dict.fromkeys(("token", "api_key", "password", "hf_token",
                                                              "access_token", "wandb_api_key", "Secret"), "***")
    assert (data["sep_token"], data["pad_token"], data["max_tokens"], data["tokens"], data["keywords"]) == \
        ("<sep>", "<pad>", 5, 12, "x")
    assert data["tokenizer"]["special_tokens"] == {"pad_token": "<pad>", "cls_token": "<cls>"}


def test_a_mapping_renames_fields_and_keeps_them() -> None:
    data = redact({"dataset": {"sources": {"a": {"mapping": {"token": "text", "password": "answer"}}}}}, env={})
    assert data["dataset"]["sources"]["a"]["mapping"] == {"token": "text", "password": "answer"}


def test_values_of_secret_environment_variables_are_redacted_anywhere() -> None:
    data = redact({"model": {"path": "hf_abcdefghijklmnop", "revision": "main"},
                   "url": "https://user:0123456789abcdef@example.org/x", "list": ["hf_abcdefghijklmnop", "ok"],
                   "home": "/home/someone", "flag": "1", "sock": "/tmp/ssh-agent-socket-xyz"}, env=ENV)
    assert data["model"] == {"path": "***", "revision": "main"}
    assert data["url"] == "https://user:***@example.org/x" and data["list"] == ["***", "ok"]
    # HOME and SSH_AUTH_SOCK do not name secrets; MY_KEY's value is too short to be told from a setting
    assert (data["home"], data["flag"], data["sock"]) == ("/home/someone", "1", "/tmp/ssh-agent-socket-xyz")


def test_an_oc_env_secret_never_reaches_plan_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_zzzsecretzzzvalue")
    plan = plan_job(["preset=demo", "model.revision=${oc.env:HF_TOKEN}", "tokenizer.special_tokens={sep_token: '<s>'}"])
    assert plan.model.revision == "hf_zzzsecretzzzvalue"  # the run itself gets the value
    text = plan.to_yaml()
    assert "hf_zzzsecretzzzvalue" not in text and "revision: '***'" in text
    assert "sep_token: <s>" in text
