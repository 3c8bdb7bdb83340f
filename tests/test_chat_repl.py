"""`impruver chat`: one-shot and piped replies equal plain `generate`; the terminal REPL driven through a pty;
commands, system prompts and function calling with /tool."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from test_chat_support import (REPO, chat_dirs, chat_plan, cli_env, direct_reply,  # noqa: F401, F811
                               function_caller, impruver_cmd)

from impruver.chat.load import load
from impruver.chat.repl import Session, scripted
from impruver.plan import ChatSpec

GREEDY = ("chat.do_sample=false", "chat.max_new_tokens=24")


def run_chat(output_dir: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(impruver_cmd("chat", f"output_dir={output_dir}", *GREEDY, *args), cwd=REPO, env=cli_env(),
                          input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


@pytest.fixture(scope="module")
def reference(chat_dirs: dict[str, Path]) -> Any:
    """The full model and tokenizer loaded straight with transformers, for the direct `generate` reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = chat_dirs["full"]
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_one_shot_prompt_prints_the_reply_generate_gives(chat_dirs: dict[str, Path], reference: Any) -> None:
    done = run_chat(chat_dirs["full"], "--prompt", "Привет")
    expected = direct_reply(*reference, [{"role": "user", "content": "Привет"}])
    assert expected and done.stdout == expected + "\n"


def test_piped_lines_are_turns_with_history_and_commands(chat_dirs: dict[str, Path], reference: Any) -> None:
    system = "Ты — Сайга."
    done = run_chat(chat_dirs["full"], f"chat.system_prompt='{system}'",
                    stdin="Привет\nКак дела?\n\n/reset\nЕщё раз\n/exit\nnot read\n")
    sys_turn = {"role": "system", "content": system}
    first = direct_reply(*reference, [sys_turn, {"role": "user", "content": "Привет"}])
    second = direct_reply(*reference, [sys_turn, {"role": "user", "content": "Привет"},
                                       {"role": "assistant", "content": first},
                                       {"role": "user", "content": "Как дела?"}])
    fresh = direct_reply(*reference, [sys_turn, {"role": "user", "content": "Ещё раз"}])
    assert done.stdout == f"{first}\n{second}\n(conversation cleared)\n{fresh}\n"
    assert len({first, second, fresh}) == 3  # the history did change the second reply


def test_function_call_is_shown_and_tool_answers_it(function_caller: Path) -> None:
    loaded = load(chat_plan(function_caller))
    session = Session(loaded, ChatSpec(do_sample=False, max_new_tokens=40))
    out = io.StringIO()
    assert scripted(session, io.StringIO('Погода?\n/tool {"temp": 21\n/tool {"temp": 21}\n/history\n'), out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1] == '[function_call] get_weather({"city": "Moscow"})  (answer with /tool JSON)'
    assert lines[2] == "Тепло, +21"  # the bad JSON line was refused (on stderr) and changed nothing
    assert lines[3:] == ["[user] Погода?", '[function_call] {"name": "get_weather", "arguments": {"city": "Moscow"}}',
                         '[function_response] {"temp": 21}', "[assistant] Тепло, +21"]


def test_system_command_and_unknown_commands(chat_dirs: dict[str, Path], reference: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load(chat_plan(chat_dirs["full"]))
    session = Session(loaded, ChatSpec(do_sample=False, max_new_tokens=24))
    out = io.StringIO()
    scripted(session, io.StringIO("/system Отвечай кратко.\n/bogus\nПривет\n/system\n/help\n"), out)
    expected = direct_reply(*reference, [{"role": "system", "content": "Отвечай кратко."},
                                         {"role": "user", "content": "Привет"}])
    text = out.getvalue()
    assert text.startswith(f"(system prompt set; conversation cleared)\n{expected}\nsystem prompt: 'Отвечай кратко.'\n")
    assert "/tool JSON" in text  # the help
    assert "unknown command /bogus; commands: /system, /reset" in capsys.readouterr().err


def test_history_is_trimmed_by_tokens_to_fit_the_context(chat_dirs: dict[str, Path]) -> None:
    loaded = load(chat_plan(chat_dirs["full"]))
    chat = ChatSpec(do_sample=False, max_new_tokens=1900)  # leaves 148 prompt tokens of the 2048
    session = Session(loaded, chat)
    out = io.StringIO()
    question = "The quick brown fox jumps over the lazy dog. " * 2
    session.messages = [m for i in range(4) for m in ({"role": "user", "content": question},
                                                      {"role": "assistant", "content": f"answer {i}"})]
    reply, dropped = session.start("user", "Привет")
    reply.stop()
    assert dropped > 0 and reply.prompt_tokens <= 148 and session.messages[-1]["content"] == "Привет"
    assert session.messages[0]["role"] == "user" and len(session.messages) == 9 - dropped
    assert out.getvalue() == ""


# -- the terminal REPL through a pseudo-terminal -----------------------------------------------------------------


class Terminal:
    """The far side of a pty running a command: send keys, wait for text, see how output arrived."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its stdin/stdout/stderr are the pty, which is its controlling terminal
            try:
                os.chdir(REPO)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.buffer = b""
        self.pos = 0
        self.reads = 0

    def expect(self, pattern: str, timeout: float = 90) -> str:
        """Read until ``pattern`` shows up after what earlier calls consumed; return the text up to it."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.buffer.decode("utf-8", "replace")
            found = text.find(pattern, self.pos)
            if found >= 0:
                seen, self.pos = text[self.pos:found + len(pattern)], found + len(pattern)
                return seen
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            data = self._read() if ready else None
            if not data:
                self.close()
                why = "timed out" if not ready else "the command ended"
                raise AssertionError(f"{why} waiting for {pattern!r}; last output: {text[self.pos:][-1500:]!r}")
            self.buffer += data
            self.reads += 1

    def _read(self) -> bytes:
        try:
            return os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return b""

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, timeout: float = 30) -> int:
        """Drain the output and return the exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.1)[0]:
                self.buffer += self._read()
        self.close()
        raise AssertionError("the command did not exit")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_terminal_repl_streams_resets_survives_ctrl_c_and_exits_on_ctrl_d(chat_dirs: dict[str, Path]) -> None:
    # 400 new tokens take this tiny model about a second: long enough to interrupt a reply while it streams.
    argv = impruver_cmd("chat", f"output_dir={chat_dirs['full']}", "chat.do_sample=false",
                        "chat.max_new_tokens=400")
    term = Terminal(argv, cli_env())
    try:
        term.expect("you> ")
        term.send("Привет\r")
        term.expect("bot> ")
        reads = term.reads
        reply = term.expect("you> ")
        assert term.reads - reads >= 5, "the reply came in one piece, not streamed"
        assert len(reply) > 100 and "[stopped]" not in reply

        term.send("/history\r")
        assert "[user] Привет" in term.expect("you> ")
        term.send("/reset\r")
        term.expect("(conversation cleared)")
        term.expect("you> ")
        term.send("/history\r")
        assert "(empty)" in term.expect("you> ")

        term.send("Как дела?\r")
        term.expect("bot> ")
        term.expect(" ")  # some of the reply has streamed
        term.send("\x03")  # Ctrl+C while the reply streams
        term.expect("[stopped]", timeout=20)
        term.expect("you> ")
        time.sleep(0.5)  # let readline start waiting: a signal just before its select() is only seen at the next key
        term.send("\x03")  # Ctrl+C at the prompt only says how to quit
        term.expect("Ctrl+D or /exit to quit")
        term.expect("you> ")
        term.send("Ещё\r")  # the conversation goes on
        term.expect("bot> ")
        term.expect(" ")
        term.send("\x03")
        term.expect("you> ")
        term.send("/history\r")
        history = term.expect("you> ")
        assert "[user] Как дела?" in history and "[assistant] " in history and "[user] Ещё" in history
        assert history.index("[user] Как дела?") < history.index("[assistant] ") < history.index("[user] Ещё")
        term.send("\x1b[A\r")  # up arrow: readline brings back the last line (/history), Enter runs it again
        assert "[user] Ещё" in term.expect("you> ")

        term.send("/system Раз\\\r")  # a backslash at the end continues the message on the next line
        term.expect("...> ")
        term.send("два\r")
        term.expect("(system prompt set; conversation cleared)")
        term.expect("you> ")
        term.send("/system\r")
        assert "system prompt: 'Раз\\nдва'" in term.expect("you> ")

        term.send("\x04")  # Ctrl+D at the prompt
        status = term.wait()
    finally:
        term.close()
    assert status == 0
    assert b"Traceback" not in term.buffer
