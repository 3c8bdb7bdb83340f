"""The bundled demo dataset (impruver/assets/demo/chats.jsonl and heldout.jsonl): shape, correctness of its facts,
held-out questions that training never asks, determinism."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from impruver.assets.demo import make_demo

ROLES = {"system", "user", "assistant", "function_call", "function_response"}
CYRILLIC = re.compile("[\u0400-\u04ff]")


def _demo_bytes(name: str = "chats.jsonl") -> bytes:
    return resources.files("impruver.assets.demo").joinpath(name).read_bytes()


@pytest.fixture(scope="module")
def records() -> list[dict]:
    lines = _demo_bytes().decode("utf-8").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"chats.jsonl line {number} is not JSON: {e}")
    return out


def _assistant_texts(records: list[dict]) -> list[str]:
    return [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]


def test_file_ships_in_package_and_is_small() -> None:
    resource = resources.files("impruver.assets.demo").joinpath("chats.jsonl")
    assert resource.is_file()
    data = _demo_bytes()
    assert 0 < len(data) < 300_000
    assert data.endswith(b"\n") and b"\r" not in data


def test_record_shape(records: list[dict]) -> None:
    assert 1200 <= len(records) <= 1700  # each fact of each question kind, asked in a few phrasings
    for i, r in enumerate(records, 1):
        assert set(r) <= {"messages", "tools"}, f"line {i}: unexpected keys {set(r)}"
        messages = r["messages"]
        assert messages and all(set(m) == {"role", "content"} for m in messages), f"line {i}"
        roles = [m["role"] for m in messages]
        assert set(roles) <= ROLES, f"line {i}: roles {roles}"
        assert "system" not in roles[1:], f"line {i}: system prompt only first"
        assert "assistant" in roles, f"line {i}: no assistant turn"
        assert roles[-1] == "assistant", f"line {i}: must end with the assistant"
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages), f"line {i}"


def test_no_exact_duplicates_and_sorted(records: list[dict]) -> None:
    lines = _demo_bytes().decode("utf-8").splitlines()
    assert len(set(lines)) == len(lines)
    assert lines == sorted(lines)


def test_both_languages_present(records: list[dict]) -> None:
    ru = sum(1 for r in records if any(CYRILLIC.search(m["content"]) for m in r["messages"]))
    en = len(records) - ru
    assert ru >= 0.35 * len(records), ru
    assert en >= 0.35 * len(records), en


def test_arithmetic_is_correct(records: list[dict]) -> None:
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
    found = re.findall(r"(\d+) ([+\-×]) (\d+) = (-?\d+)", "\n".join(_assistant_texts(records)))
    assert len(found) >= 80
    for a, op, b, c in found:
        assert ops[op](int(a), int(b)) == int(c), f"{a} {op} {b} = {c}"


def test_single_turn_arithmetic_answers_the_question(records: list[dict]) -> None:
    checked = 0
    for r in records:
        m = r["messages"]
        if len(m) != 2:
            continue
        q = re.search(r"(\d+) ([+\-×]) (\d+)", m[0]["content"])
        a = re.search(r"(\d+) ([+\-×]) (\d+) =", m[1]["content"])
        if q and a:
            assert q.groups() == a.groups(), m
            checked += 1
    assert checked >= 60


def test_letter_counts_and_calendar_are_correct(records: list[dict]) -> None:
    text = "\n".join(_assistant_texts(records))
    counts = re.findall(r'The word "(\w+)" has (\d+) letters', text) + re.findall(r"В слове «(\w+)» (\d+) бук", text)
    assert len(counts) >= 30
    assert all(len(word) == int(n) for word, n in counts), counts
    after = re.findall(r"^The (?:day|month) after (\w+) is (\w+)\.$", text, re.M)
    assert len(after) >= 30
    for x, y in after:
        seq = make_demo.DAYS_EN if x in make_demo.DAYS_EN else make_demo.MONTHS_EN
        assert seq[(seq.index(x) + 1) % len(seq)] == y, (x, y)


def test_capitals_match_the_fact_table(records: list[dict]) -> None:
    by_country = {c: k for c, k, *_ in make_demo.CAPITALS}
    by_country.update({g: r for *_, g, r in make_demo.CAPITALS})
    text = "\n".join(_assistant_texts(records))
    claims = re.findall(r"The capital of (.+?) is (.+?)\.$", text, re.M)
    claims += re.findall(r"^Столица (.+?) — (.+?)\.$", text, re.M)
    assert len(claims) >= 40
    for country, capital in claims:
        assert by_country[country] == capital, (country, capital)
    spot = {"France": "Paris", "Japan": "Tokyo", "Canada": "Ottawa", "Australia": "Canberra", "Brazil": "Brasília"}
    assert all(by_country[c] == k for c, k in spot.items())


def test_tool_records(records: list[dict]) -> None:
    tool_records = [r for r in records if any(m["role"] == "function_call" for m in r["messages"])]
    assert 18 <= len(tool_records) <= 30
    assert all("tools" in r for r in tool_records)
    assert all("tools" not in r for r in records if r not in tool_records)
    for r in tool_records:
        names = {t["name"] for t in r["tools"]}
        assert all(t["parameters"]["type"] == "object" for t in r["tools"])
        roles = [m["role"] for m in r["messages"]]
        i = roles.index("function_call")
        assert roles[i + 1] == "function_response" and roles[-1] == "assistant"
        call = json.loads(r["messages"][i]["content"])
        assert set(call) == {"name", "arguments"} and call["name"] in names
        assert isinstance(call["arguments"], dict)
        result = json.loads(r["messages"][i + 1]["content"])
        if call["name"] == "convert_units":  # the converter's result must be right, and the answer must quote it
            factor = {(src, dst): f for src, dst, f, *_ in make_demo.UNITS}[
                (call["arguments"]["from_unit"], call["arguments"]["to_unit"])]
            assert result["value"] == call["arguments"]["value"] * factor
        assert str(result.get("value", result.get("time", result.get("temperature_c")))) in r["messages"][-1]["content"]


def test_few_near_duplicates(records: list[dict]) -> None:
    """Exact Jaccard over 5-word shingles (what MinHash dedup estimates): almost nothing should reach 0.85."""

    def shingles(r: dict) -> set[str]:
        words = " ".join(m["content"] for m in r["messages"]).lower().split()
        return {" ".join(words[i:i + 5]) for i in range(max(1, len(words) - 4))}

    sets = [shingles(r) for r in records]
    close = sum(1 for a, b in itertools.combinations(sets, 2) if len(a & b) >= 0.85 * len(a | b))
    assert close <= 0.02 * len(records), close


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    assert make_demo.render().encode("utf-8") == _demo_bytes()
    assert make_demo.render_heldout().encode("utf-8") == _demo_bytes("heldout.jsonl")
    # In fresh interpreters with different hash seeds (set/dict order must not leak into the output).
    for hash_seed in ("1", "2"):
        out = tmp_path / f"chats{hash_seed}.jsonl"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-m", "impruver.assets.demo.make_demo", "--out", str(out)], check=True,
                       env=env, capture_output=True)
        assert out.read_bytes() == _demo_bytes()
        assert out.with_name("heldout.jsonl").read_bytes() == _demo_bytes("heldout.jsonl")
    check = subprocess.run([sys.executable, "-m", "impruver.assets.demo.make_demo", "--check", "--out", str(out)],
                           capture_output=True)
    assert check.returncode == 0
    out.write_bytes(b"stale\n")
    assert make_demo.main(["--check", "--out", str(out)]) == 1


def test_a_different_seed_gives_different_data() -> None:
    assert make_demo.render(seed=1) != make_demo.render()


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return [json.loads(line) for line in _demo_bytes("heldout.jsonl").decode("utf-8").splitlines()]


def test_heldout_questions_are_never_asked_in_training(records: list[dict], heldout: list[dict]) -> None:
    asked = {m["content"] for r in records for m in r["messages"] if m["role"] == "user"}
    answers = set(_assistant_texts(records))
    assert len(heldout) >= 90
    for q in heldout:
        assert set(q) == {"messages", "answer", "kind", "lang", "split"}
        assert q["messages"][-1]["role"] == "user" and q["messages"][-1]["content"] not in asked, q
        assert q["answer"] in answers, q  # the fact itself is taught (in other phrasings): asking is what is new
    # Each kind in both languages, half in seen phrasings of facts never asked that way, half in unseen phrasings.
    kinds = {q["kind"] for q in heldout}
    assert len(kinds) >= 5
    for kind in kinds:
        for lang in ("en", "ru"):
            splits = [q["split"] for q in heldout if q["kind"] == kind and q["lang"] == lang]
            assert splits.count("combination") == splits.count("phrasing") > 0, (kind, lang)


def test_heldout_phrasings_are_absent_from_training(records: list[dict], heldout: list[dict]) -> None:
    """No training question is any fact in a held-out phrasing; every 'phrasing' question is one of those."""
    asked = {m["content"] for r in records for m in r["messages"] if m["role"] == "user"}
    unseen = set()
    for make in make_demo.KINDS:
        for kind in make():
            assert not set(kind.heldout) & set(kind.train), kind.name
            unseen |= {template.format(**fact) for template in kind.heldout for fact in kind.facts}
    assert not unseen & asked
    assert {q["messages"][-1]["content"] for q in heldout if q["split"] == "phrasing"} <= unseen


def test_heldout_answers_are_correct(heldout: list[dict]) -> None:
    ops = {"+": lambda a, b: a + b, "×": lambda a, b: a * b}
    capitals = {c: k for c, k, *_ in make_demo.CAPITALS} | {g: r for *_, g, r in make_demo.CAPITALS}
    for q in heldout:
        asked, answer = q["messages"][-1]["content"], q["answer"]
        if q["kind"] == "arithmetic":
            a, op, b, c = re.fullmatch(r"(\d+) ([+×]) (\d+) = (\d+)\.", answer).groups()
            assert f"{a} {op} {b}" in asked and ops[op](int(a), int(b)) == int(c)
        if q["kind"] == "capital":
            country, capital = re.fullmatch(r"(?:The capital of (.+) is|Столица (.+) —) (.+)\.", answer).group(1, 3) \
                if answer.startswith("The") else re.fullmatch(r"Столица (.+) — (.+)\.", answer).groups()
            assert country in asked and capitals[country] == capital


# -- the demo's preference pairs (impruver/assets/demo/preferences.jsonl, make_preferences) ------------------------


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    return [json.loads(line) for line in _demo_bytes("preferences.jsonl").decode("utf-8").splitlines()]


def test_preference_pairs_regenerate_byte_identical(tmp_path: Path) -> None:
    from impruver.assets.demo import make_preferences

    assert make_preferences.render().encode("utf-8") == _demo_bytes("preferences.jsonl")
    out = tmp_path / "preferences.jsonl"
    env = {**os.environ, "PYTHONHASHSEED": "3"}  # set/dict order must not leak into the output
    subprocess.run([sys.executable, "-m", "impruver.assets.demo.make_preferences", "--out", str(out)], check=True,
                   env=env, capture_output=True)
    assert out.read_bytes() == _demo_bytes("preferences.jsonl")
    assert make_preferences.main(["--check", "--out", str(out)]) == 0
    out.write_bytes(b"stale\n")
    assert make_preferences.main(["--check", "--out", str(out)]) == 1


def test_preference_pairs_prefer_what_the_demo_teaches(records: list[dict], pairs: list[dict]) -> None:
    """Judged by the demo's chats (whose facts the tests above check): every chosen answer is a sentence the chats
    teach, the answer to the same question where the chats ask it; no rejected answer is taught anywhere."""
    taught = set(_assistant_texts(records))
    answer_of: dict[str, set[str]] = {}
    for r in records:
        m = r["messages"]
        for question, reply in zip(m, m[1:]):
            if question["role"] == "user" and reply["role"] == "assistant":
                answer_of.setdefault(question["content"], set()).add(reply["content"])
    assert 400 <= len(pairs) <= 600 and {p["lang"] for p in pairs} == {"en", "ru"}
    asked_in_chats = 0
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "kind", "lang"}
        (question,), (chosen,), (rejected,) = p["prompt"], p["chosen"], p["rejected"]
        assert (question["role"], chosen["role"], rejected["role"]) == ("user", "assistant", "assistant")
        assert chosen["content"] in taught and rejected["content"] not in taught, p
        if question["content"] in answer_of:
            assert answer_of[question["content"]] == {chosen["content"]}, p
            asked_in_chats += 1
    assert asked_in_chats >= len(pairs) // 2
    ops = {"+": lambda a, b: a + b, "×": lambda a, b: a * b}
    sums = [p for p in pairs if p["kind"] == "arithmetic"]
    assert len(sums) >= 200
    for p in sums:  # and checked directly: only the result differs, and only the chosen one is right
        (a, op, b, c), (a2, op2, b2, wrong) = (re.fullmatch(r"(\d+) ([+×]) (\d+) = (\d+)\.", p[s][0]["content"])
                                               .groups() for s in ("chosen", "rejected"))
        assert (a, op, b) == (a2, op2, b2) and f"{a} {op} {b}" in p["prompt"][0]["content"]
        assert ops[op](int(a), int(b)) == int(c) != int(wrong)
