"""Every `impruver` command in README.md and README.ru.md works as printed, at the planning level (offline, in a
few seconds): each is split as the shell splits it, its stage's flags are checked by the command line's own
parser, and its overrides are composed and planned (every point of a sweep); `impruver cp` runs for real so
that the `--config` lines after it find their file. README.ru.md shows the same commands: the same two setup
commands and nothing the English README does not have."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from impruver import cli
from impruver.compose import precheck
from impruver.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
READMES = {"en": REPO / "README.md", "ru": REPO / "README.ru.md"}
SETUP = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install . && impruver",
         '. .venv/bin/activate && pip install ".[test]" && pytest')
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")  # a leading VAR=value of the shell


def shell_lines(text: str) -> list[str]:
    """The lines of the ```bash blocks, continuation lines joined."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append(pending + line)
            pending = ""
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def impruver_commands(text: str) -> list[list[str]]:
    """Each `impruver ...` command (after any VAR=value), as argument lists without the program name."""
    found = []
    for words in (part for line in shell_lines(text) for part in _and_chain(shlex.split(line, comments=True))):
        while words and ENV.match(words[0]):
            words = words[1:]
        if words and words[0] == "impruver":
            found.append(words[1:])
    return found


def _and_chain(words: list[str]) -> list[list[str]]:
    """`a && b` as the commands a and b."""
    parts: list[list[str]] = [[]]
    for word in words:
        if word == "&&":
            parts.append([])
        else:
            parts[-1].append(word)
    return parts


def check(argv: list[str]) -> None:
    """Run ``impruver ARGV`` up to (not including) the work itself: flags parsed, every job planned."""
    command = argv[0] if argv and argv[0] in cli.COMMANDS else None
    rest = argv[1:] if command else argv
    if command == "ls":
        return  # tests/test_cli.py runs it (it lists every component: slow here)
    if command == "download":  # its arguments parsed as the command parses them (the Hub is not reached here)
        from impruver.download import parser

        parser().parse_args(rest)
        return
    if command == "cp" or "--version" in argv:
        assert cli.main(argv) == 0, argv
        return
    if command == "run":
        recipe, rest = rest[0], rest[1:]
        assert recipe in cli.RECIPES, argv
        command = cli.RECIPES[recipe]
    args = cli.split_args(rest, command or "main")
    if args.informational and not args.multirun:
        return  # --cfg / --info / -sc print and run nothing; the flags parsed
    config_file, overrides = cli.config_source(args)
    from impruver.compose import expand_sweeps, hydra_overrides

    overrides = hydra_overrides(overrides, config_file=config_file)
    if args.multirun and "hydra/sweeper=optuna" not in overrides:
        overrides = expand_sweeps(overrides)[0]  # one point stands for the sweep (tests/test_sweep.py runs them)
    precheck(overrides, config_file, multirun=args.multirun and "hydra/sweeper=optuna" in overrides)


def test_both_readmes_show_the_two_setup_commands_and_the_same_examples() -> None:
    texts = {lang: path.read_text(encoding="utf-8") for lang, path in READMES.items()}
    for lang, text in texts.items():
        for setup in SETUP:
            assert setup in shell_lines(text), (lang, setup)
    assert "README.ru.md" in texts["en"] and "README.md" in texts["ru"]
    english = {tuple(c) for c in impruver_commands(texts["en"])}
    russian = [tuple(c) for c in impruver_commands(texts["ru"])]
    assert len(russian) >= 20 and not [c for c in russian if c not in english]
    assert ("data=my_chats.jsonl",) in russian  # the short path for one's own data


def test_every_readme_command_plans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README.md's commands (README.ru.md's are among them: see above)."""
    monkeypatch.chdir(tmp_path)  # where `impruver cp` writes, and where no last run is recorded
    failures = []
    for argv in impruver_commands(READMES["en"].read_text(encoding="utf-8")):
        try:
            check(argv)
        except (ConfigError, AssertionError) as exc:
            failures.append(f"impruver {shlex.join(argv)}: {exc}")
    assert not failures, "\n".join(failures)
