"""Generate the demo's preference pairs, ``preferences.jsonl``, deterministically, from the demo's own facts.

Every question kind of :mod:`impruver.assets.demo.make_demo` (sums and products, capitals, translations, the next
day or month, opposites, letter counts; English and Russian) gives one pair per fact: a question in one of the
kind's training phrasings, the right answer chosen, and the same answer form with another fact's result rejected
("2 + 7 = 9." over "2 + 7 = 12."). The rejected answer is well-formed and fluent, so only the fact tells the two
apart: what a preference stage after SFT should sharpen. The lines are TRL's preference format with message
lists (``prompt`` / ``chosen`` / ``rejected``), read by ``format: trl_preference``.

Regenerate (byte-identical for the same script)::

    python -m impruver.assets.demo.make_preferences           # rewrites preferences.jsonl next to this file
    python -m impruver.assets.demo.make_preferences --check   # exit status 1 if it is out of date

Standard library only, like make_demo.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
from pathlib import Path

from impruver.assets.demo.make_demo import KINDS, Kind

SEED = 20241202
OUTPUT = Path(__file__).with_name("preferences.jsonl")


def _slots(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _wrong(kind: Kind, fact: dict[str, str], rng: random.Random) -> str | None:
    """The answer form with another fact's result: the answer's slots that no question names (the result, and
    its Russian plural form) come from a fact whose answer differs; None when every other fact answers the same."""
    asked = set().union(*(_slots(q) for q in kind.train))
    result = _slots(kind.answer) - asked
    right = kind.answer.format(**fact)
    others = [f for f in kind.facts if any(f[s] != fact[s] for s in result)]
    if not others:
        return None
    other = rng.choice(others)
    wrong = kind.answer.format(**{**fact, **{s: other[s] for s in result}})
    return wrong if wrong != right else None


def build(seed: int = SEED) -> list[dict[str, object]]:
    """One pair per fact of every kind and language, in kind order."""
    rng = random.Random(seed)
    pairs: list[dict[str, object]] = []
    for make in KINDS:
        for kind in make():
            for fact in kind.facts:
                rejected = _wrong(kind, fact, rng)
                if rejected is None:
                    continue
                question = rng.choice(kind.train).format(**fact)
                pairs.append({"prompt": [{"role": "user", "content": question}],
                              "chosen": [{"role": "assistant", "content": kind.answer.format(**fact)}],
                              "rejected": [{"role": "assistant", "content": rejected}],
                              "kind": kind.name, "lang": kind.lang})
    return pairs


def render(seed: int = SEED) -> str:
    lines = [json.dumps(pair, ensure_ascii=False, separators=(", ", ": ")) for pair in build(seed)]
    return "".join(line + "\n" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale = (args.out.read_bytes() if args.out.exists() else b"") != text.encode("utf-8")
        print(f"{args.out} is {'out of date' if stale else 'up to date'}", file=sys.stderr if stale else sys.stdout)
        return 1 if stale else 0
    tmp = args.out.with_name(f".{args.out.name}.tmp{os.getpid()}")
    tmp.write_bytes(text.encode("utf-8"))
    os.replace(tmp, args.out)
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
