"""`impruver chat`: talk to the model a run trained, in a terminal, in one shot (``--prompt``) or from a script.

Interactive use (stdin is a terminal): replies stream token by token; line editing and history with the arrow
keys (readline); Ctrl+C stops the current reply and keeps the conversation; Ctrl+D (or /exit) quits. The
history is trimmed by tokens, oldest exchanges first, so that prompt + reply fit the model's context.
With stdin not a terminal, each input line is a user turn (or a /command) and each reply is printed on its own.

    impruver chat output_dir=outputs/demo
    impruver chat output_dir=outputs/demo --prompt "Привет!" chat.do_sample=false
    printf 'Привет\\nКак дела?\\n' | impruver chat output_dir=outputs/demo
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from impruver.chat.generate import (CALL_ROLE, RESPONSE_ROLE, Generation, Message, fit, generation_kwargs,
                                    parse_function_call)
from impruver.errors import ImpruverError, RunError

if TYPE_CHECKING:
    from impruver.plan import ChatSpec, Plan

HELP = """commands:
  /system TEXT   set the system prompt (and start over); /system alone shows it, /system - removes it
  /reset         forget the conversation (the system prompt stays)
  /history       show the conversation as the model sees it
  /tool JSON     answer the model's function call with a function_response turn, e.g. /tool {"temp": 21}
  /help          this help
  /exit          quit (or Ctrl+D); Ctrl+C stops a reply and keeps the conversation
end a line with \\ to write more lines in one message"""
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
COMMANDS = ("/system", "/reset", "/history", "/tool", "/help", "/exit", "/quit")


@dataclass
class Session:
    """A conversation with one loaded model: its history (impruver's roles) and system prompt."""

    loaded: Any
    chat: ChatSpec  # plan.chat (replies capped to the context: see chat_settings)
    system: str | None = None
    messages: list[Message] = field(default_factory=list)  # user / assistant / function turns, no system

    def __post_init__(self) -> None:
        self.budget = self.loaded.context_length - self.chat.max_new_tokens  # prompt tokens allowed

    def conversation(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def start(self, role: str, content: str) -> tuple[Generation, int]:
        """Add a turn and start the reply; return it and how many old messages were forgotten to fit."""
        self.messages.append({"role": role, "content": content})
        conversation = self.conversation()
        try:
            ids, dropped = fit(self.loaded.tokenizer, conversation, self.budget)
        except BaseException:  # the template refused it, or Ctrl+C: the turn was never sent
            self.messages.pop()
            raise
        self.messages = conversation[1:] if self.system else conversation  # fit() never drops the system turn
        kwargs = generation_kwargs(self.chat)
        return Generation(self.loaded.model, self.loaded.tokenizer, ids, kwargs), dropped

    def finish(self, reply: Generation) -> dict[str, Any] | None:
        """Keep the reply (even a stopped one) in the history; return the function call it makes, if any."""
        text = reply.text
        call = parse_function_call(text) if reply.finish_reason != "interrupted" else None
        if call is not None:
            content = json.dumps(call, ensure_ascii=False)
            self.messages.append({"role": CALL_ROLE, "content": content})
        elif text or reply.finish_reason != "interrupted":
            self.messages.append({"role": "assistant", "content": text})  # an empty reply is still an answer
        else:
            self.messages.pop()  # stopped before a word came: as if the question had not been sent
        return call

    def reset(self) -> None:
        self.messages.clear()


# -- the stage -------------------------------------------------------------------------------------------------


def run(plan: Plan, *, prompt: str | None = None) -> int:
    """`impruver chat`: load ``plan.output_dir`` and talk to it (the command line refuses other stages' flags).

    Args:
        plan: the validated plan; ``plan.chat`` holds the generation settings.
        prompt: one message to answer (``--prompt``); the reply is printed and the command ends.

    Returns:
        0 (problems raise :class:`~impruver.errors.RunError`, exit status 2).
    """
    from impruver.chat.load import locate, quiet_libraries, seed

    locate(plan.output_dir, model_path=plan.model.path)  # a missing model fails before torch is imported
    quiet_libraries()
    try:
        from impruver.chat.load import chat_settings, load

        loaded = load(plan)
        seed(plan.chat.seed)
        session = Session(loaded, chat_settings(plan.chat, loaded.context_length), system=plan.chat.system_prompt)
        if prompt is not None:
            return one_shot(session, prompt, sys.stdout)
        if not sys.stdin.isatty():
            return scripted(session, sys.stdin, sys.stdout)
        return interactive(session)
    except ImpruverError:
        raise
    except BrokenPipeError:  # the reader went away (`impruver chat ... | head -1`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error when Python flushes at exit
        return 0
    except Exception as exc:  # never a traceback for the user: say what failed
        raise RunError(f"chat failed: {type(exc).__name__}: {exc}") from None


def one_shot(session: Session, prompt: str, out: TextIO) -> int:
    """Answer one message and print the reply (streamed in a terminal)."""
    reply, _ = session.start("user", prompt)
    _show(reply, out, stream=out.isatty(), prefix="")
    session.finish(reply)
    return 0


def scripted(session: Session, lines: TextIO, out: TextIO) -> int:
    """Each input line is a user turn or a /command; each reply is printed on its own."""
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            if not _turn(session, line, out, stream=False):
                break
        except ImpruverError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        except BrokenPipeError:
            raise
        except Exception as exc:  # a script gets every reply it can, and the reason for any it cannot
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    return 0


def interactive(session: Session) -> int:
    """The terminal REPL; returns 0 on /exit or Ctrl+D."""
    _readline()
    out = sys.stdout
    out.write(f"impruver chat: {session.loaded.describe()}\n"
              f"/help for commands, Ctrl+C stops a reply, Ctrl+D quits\n")
    while True:
        out.write("\n")  # readline redraws a one-line prompt best
        out.flush()
        try:
            line = _read_message()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl+D or /exit to quit)\n")
            continue
        if not line.strip():
            continue
        try:
            if not _turn(session, line, out, stream=True):
                return 0
        except KeyboardInterrupt:
            out.write("\n[stopped]\n")
        except ImpruverError as exc:
            out.write(f"\nerror: {exc}\n")
        except Exception as exc:  # whatever it was, the conversation goes on, and no traceback is shown
            out.write(f"\nerror: {type(exc).__name__}: {exc}\n")
        out.flush()


def _read_message() -> str:
    """One message from the terminal; a line ending in a backslash continues on the next line."""
    lines = [input("you> ")]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input("...> "))
    return "\n".join(lines)


def _turn(session: Session, line: str, out: TextIO, *, stream: bool) -> bool:
    """One line of input: a command or a user message. False means: quit."""
    if line.startswith("/"):
        command, _, arg = line.partition(" ")
        if command in ("/exit", "/quit"):
            return False
        if command in ("/tool", "/function"):
            _reply(session, RESPONSE_ROLE, _tool_json(arg), out, stream=stream)
            return True
        _command(session, command, arg.strip(), out)
        return True
    _reply(session, "user", line, out, stream=stream)
    return True


def _command(session: Session, command: str, arg: str, out: TextIO) -> None:
    if command == "/help":
        out.write(HELP + "\n")
    elif command == "/reset":
        session.reset()
        out.write("(conversation cleared)\n")
    elif command == "/history":
        turns = session.conversation()
        out.write("\n".join(f"[{m['role']}] {m['content']}" for m in turns) if turns else "(empty)")
        out.write("\n")
    elif command == "/system":
        if not arg:
            out.write(f"system prompt: {session.system!r}\n")
            return
        session.system = None if arg == "-" else arg
        session.reset()
        out.write("(system prompt set; conversation cleared)\n" if session.system else "(system prompt removed)\n")
    else:
        raise RunError(f"unknown command {command}; commands: {', '.join(COMMANDS)} (/help)")
    out.flush()


def _tool_json(arg: str) -> str:
    """The /tool argument as compact JSON; RunError (shown, not fatal) when it is not JSON."""
    try:
        return json.dumps(json.loads(arg), ensure_ascii=False)
    except ValueError as exc:
        raise RunError(f"/tool needs JSON, e.g. /tool {{\"result\": 42}} ({exc})") from None


def _reply(session: Session, role: str, content: str, out: TextIO, *, stream: bool) -> None:
    """Add a turn, generate the answer (streamed), keep it; Ctrl+C stops it and keeps what came."""
    reply, dropped = session.start(role, content)
    if dropped:
        out.write(f"(forgot the {dropped} oldest messages to fit the context)\n")
    try:
        _show(reply, out, stream=stream)
    except KeyboardInterrupt:
        reply.stop()
        session.finish(reply)
        raise
    call = session.finish(reply)
    if call is not None:
        out.write(f"[function_call] {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"
                  f"  (answer with /tool JSON)\n")
    out.flush()


def _show(reply: Generation, out: TextIO, *, stream: bool, prefix: str = "bot> ") -> None:
    """Print the reply: piece by piece in a terminal, whole (exactly as generated) otherwise."""
    if stream:
        out.write(prefix)
        out.flush()
        shown = ""
        for piece in reply:
            piece = piece.lstrip() if not shown else piece
            shown += piece
            out.write(_printable(piece))
            out.flush()
        if reply.finish_reason == "length":
            out.write(" [max_new_tokens reached]")
        out.write("\n")
    else:
        reply.wait()
        out.write(reply.text + "\n")
    out.flush()


def _printable(text: str) -> str:
    """Text safe for a terminal: control characters (an escape sequence could reconfigure it) become U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def _readline() -> None:
    """Arrow keys, line editing and in-session history for input() (where readline exists)."""
    try:
        import readline  # noqa: F401  importing it is what turns line editing on for input()
    except ImportError:  # Windows without pyreadline: plain input still works
        pass
