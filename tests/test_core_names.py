"""The core asks components what they are; it never branches on a built-in builder's name.

An AST scan of the core modules for conditions (``==``, ``!=``, ``in``, ``not in``, ``startswith``/``endswith``,
``match`` cases) on a string literal that is the name of a registered built-in component (methods, model families,
distribution strategies, tokenizer and model builders). Names as values (a default, a message, a suggestion) are
fine; names as conditions make a plugin's component a second-class citizen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from impruver import registry

REPO = Path(__file__).resolve().parents[1]
CORE = ["impruver/plan/__init__.py", "impruver/plan/schema.py", "impruver/plan/build.py", "impruver/plan/io.py",
        "impruver/plan/probes.py", "impruver/memory.py", "impruver/cli.py", "impruver/launch.py",
        "impruver/train/recipe.py", "impruver/train/checkpoint.py", "impruver/jobs.py", "impruver/compose.py"]
KINDS = ("methods", "families", "strategies", "tokenizers", "models")
def builtin_names() -> set[str]:
    names = {name for kind in KINDS for name in registry.names(kind)}
    assert {"lora", "qlora", "scratch", "full", "gpt2", "llama", "bpe", "fsdp", "ddp"} <= names
    return names


def _literals(node: ast.AST) -> list[str]:
    """String constants of an operand: itself, or the items of a tuple / list / set literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for item in node.elts for s in _literals(item)]
    return []


def _is_name(literal: str, names: set[str]) -> bool:
    # A prefix test such as startswith("deepspeed") names the deepspeed_zero* strategies.
    return literal in names or any(name.startswith(literal) and len(literal) >= 3 for name in names)


def conditions_on_names(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of every condition on a built-in name in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        operands: list[ast.AST] = []
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                 for op in node.ops):
            operands = [node.left, *node.comparators]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith", "removeprefix", "removesuffix")):
            operands = list(node.args)
        elif isinstance(node, ast.match_case):
            operands = [n for n in ast.walk(node.pattern) if isinstance(n, ast.Constant)]
        for operand in operands:
            found += [(node.lineno if hasattr(node, "lineno") else operand.lineno, s)  # type: ignore[attr-defined]
                      for s in _literals(operand) if _is_name(s, names)]
    return sorted(set(found))


def test_the_scan_finds_what_it_looks_for() -> None:
    names = {"lora", "deepspeed_zero3", "gpt2"}
    source = ("if method.builder in ('lora', 'qlora'): pass\n"
              "x = dist.startswith('deepspeed')\n"
              "y = family == 'gpt2'\n"
              "z = {'lora': 1}\n"  # a value, not a condition
              "w = 'gpt2' if a else 'llama'\n")
    assert conditions_on_names(source, names) == [(1, "lora"), (2, "deepspeed"), (3, "gpt2")]


@pytest.mark.parametrize("module", CORE)
def test_core_module_has_no_condition_on_a_builtin_name(module: str) -> None:
    found = conditions_on_names((REPO / module).read_text(encoding="utf-8"), builtin_names())
    assert not found, f"{module} branches on built-in component names: " + ", ".join(
        f"line {line} ({name!r})" for line, name in found)
