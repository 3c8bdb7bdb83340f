"""Generate impruver's bundled demo data, ``chats.jsonl`` and ``heldout.jsonl``, deterministically.

The demo chats are written by this script from its own word lists and facts (nothing is copied from elsewhere):
short Russian and English conversations of a few *question kinds* that a tiny model trained for a minute or two
on two CPU cores can actually learn: sums and products of one-digit numbers, the capitals of a fixed set of
countries, translations of a fixed vocabulary, the day or month after another, opposites and letter counts;
plus small talk, two-turn dialogues and a few tool-use dialogues in impruver's canonical roles
(``function_call`` / ``function_response``). Every answer is computed or checked here, so the facts a tiny model
learns from the demo are correct.

Each kind has one answer form per language (so a reply can be scored by exact match) and several question
phrasings. ``heldout.jsonl`` asks the same kinds in combinations the training chats never contain: a fact in a
phrasing it was never asked in (``split: combination``), and phrasings that no training chat uses at all
(``split: phrasing``). It is what ``impruver.evaluate`` scores the trained demo on (``eval.questions=demo``).

Regenerate (the output is byte-identical for the same script)::

    python -m impruver.assets.demo.make_demo            # rewrites chats.jsonl and heldout.jsonl next to this file
    python -m impruver.assets.demo.make_demo --check    # exit status 1 if either file is out of date

The script uses the standard library only, so it runs without impruver's heavier dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 20240601
OUTPUT = Path(__file__).with_name("chats.jsonl")
HELDOUT = "heldout.jsonl"  # written next to the chats

Message = dict[str, str]
Record = dict[str, object]

# --------------------------------------------------------------------------------------------------------------
# Facts. Each row is checked by hand; the Russian case forms (genitive "of X", instrumental "before X") are stored
# rather than derived because Russian declension has too many exceptions to derive safely. The tables are kept
# small on purpose: a 1-2M-parameter model has to learn every fact in them in a couple of CPU minutes.
# --------------------------------------------------------------------------------------------------------------

# (English country, English capital, Russian country, Russian country in the genitive, Russian capital)
CAPITALS: list[tuple[str, str, str, str, str]] = [
    ("France", "Paris", "Франция", "Франции", "Париж"),
    ("Germany", "Berlin", "Германия", "Германии", "Берлин"),
    ("Italy", "Rome", "Италия", "Италии", "Рим"),
    ("Spain", "Madrid", "Испания", "Испании", "Мадрид"),
    ("Portugal", "Lisbon", "Португалия", "Португалии", "Лиссабон"),
    ("Austria", "Vienna", "Австрия", "Австрии", "Вена"),
    ("Poland", "Warsaw", "Польша", "Польши", "Варшава"),
    ("Greece", "Athens", "Греция", "Греции", "Афины"),
    ("Sweden", "Stockholm", "Швеция", "Швеции", "Стокгольм"),
    ("Norway", "Oslo", "Норвегия", "Норвегии", "Осло"),
    ("Finland", "Helsinki", "Финляндия", "Финляндии", "Хельсинки"),
    ("Denmark", "Copenhagen", "Дания", "Дании", "Копенгаген"),
    ("Russia", "Moscow", "Россия", "России", "Москва"),
    ("Armenia", "Yerevan", "Армения", "Армении", "Ереван"),
    ("Japan", "Tokyo", "Япония", "Японии", "Токио"),
    ("China", "Beijing", "Китай", "Китая", "Пекин"),
    ("India", "New Delhi", "Индия", "Индии", "Нью-Дели"),
    ("Turkey", "Ankara", "Турция", "Турции", "Анкара"),
    ("Egypt", "Cairo", "Египет", "Египта", "Каир"),
    ("Kenya", "Nairobi", "Кения", "Кении", "Найроби"),
    ("Canada", "Ottawa", "Канада", "Канады", "Оттава"),
    ("Mexico", "Mexico City", "Мексика", "Мексики", "Мехико"),
    ("Brazil", "Brasília", "Бразилия", "Бразилии", "Бразилиа"),
    ("Australia", "Canberra", "Австралия", "Австралии", "Канберра"),
]

# (English word, Russian word)
WORDS: list[tuple[str, str]] = [
    ("cat", "кошка"), ("dog", "собака"), ("house", "дом"), ("water", "вода"), ("sun", "солнце"),
    ("moon", "луна"), ("book", "книга"), ("apple", "яблоко"), ("bread", "хлеб"), ("milk", "молоко"),
    ("tree", "дерево"), ("city", "город"), ("friend", "друг"), ("school", "школа"), ("table", "стол"),
    ("window", "окно"), ("bird", "птица"), ("fish", "рыба"), ("sea", "море"), ("river", "река"),
    ("snow", "снег"), ("night", "ночь"), ("family", "семья"), ("horse", "лошадь"),
]

# (word, its opposite); asked one way.
OPPOSITES_EN: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"), ("light", "dark"),
    ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("long", "short"),
    ("strong", "weak"), ("rich", "poor"), ("wet", "dry"),
]
OPPOSITES_RU: list[tuple[str, str]] = [
    ("горячий", "холодный"), ("большой", "маленький"), ("быстрый", "медленный"), ("верх", "низ"),
    ("день", "ночь"), ("светлый", "тёмный"), ("весёлый", "грустный"), ("открытый", "закрытый"),
    ("рано", "поздно"), ("полный", "пустой"), ("длинный", "короткий"), ("сильный", "слабый"),
    ("богатый", "бедный"), ("мокрый", "сухой"),
]

DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
# (nominative, genitive "after X" / "после X", instrumental "before X" / "перед X")
DAYS_RU = [
    ("понедельник", "понедельника", "понедельником"), ("вторник", "вторника", "вторником"),
    ("среда", "среды", "средой"), ("четверг", "четверга", "четвергом"), ("пятница", "пятницы", "пятницей"),
    ("суббота", "субботы", "субботой"), ("воскресенье", "воскресенья", "воскресеньем"),
]
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December"]
MONTHS_RU = [
    ("январь", "января", "январём"), ("февраль", "февраля", "февралём"), ("март", "марта", "мартом"),
    ("апрель", "апреля", "апрелем"), ("май", "мая", "маем"), ("июнь", "июня", "июнем"),
    ("июль", "июля", "июлем"), ("август", "августа", "августом"), ("сентябрь", "сентября", "сентябрём"),
    ("октябрь", "октября", "октябрём"), ("ноябрь", "ноября", "ноябрём"), ("декабрь", "декабря", "декабрём"),
]

# Words for letter counting (letters only, no hyphens, so len() is the letter count).
LETTER_WORDS_EN = ["garden", "pencil", "river", "orange", "planet", "window", "coffee", "music", "island", "bridge",
                   "summer", "winter", "yellow", "candle", "rocket", "banana", "tiger", "cloud", "lemon", "family"]
LETTER_WORDS_RU = ["окно", "молоко", "дерево", "книга", "солнце", "машина", "ромашка", "школа", "дорога", "яблоко",
                   "кот", "собака", "город", "весна", "лето", "зима", "тетрадь", "карандаш", "река", "улица"]

UNITS: list[tuple[str, str, int, str, str, str]] = [
    ("kilometers", "meters", 1000, "км", "м", "метров"),
    ("kilograms", "grams", 1000, "кг", "г", "граммов"),
    ("hours", "minutes", 60, "ч", "мин", "минут"),
    ("minutes", "seconds", 60, "мин", "с", "секунд"),
    ("meters", "centimeters", 100, "м", "см", "сантиметров"),
    ("liters", "milliliters", 1000, "л", "мл", "миллилитров"),
    ("days", "hours", 24, "сут", "ч", "часов"),
]
SYSTEM_EN = [
    "You are a helpful assistant. Answer briefly.",
    "You are a friendly assistant. Keep answers short and correct.",
    "Answer in one sentence.",
]
SYSTEM_RU = [
    "Ты — полезный ассистент. Отвечай кратко.",
    "Ты дружелюбный помощник. Отвечай коротко и точно.",
    "Отвечай одним предложением.",
]

SMALL_TALK_EN: list[tuple[str, str]] = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there", "Hi! What would you like to talk about?"),
    ("Good morning!", "Good morning! I hope your day starts well."),
    ("Good evening", "Good evening! How was your day?"),
    ("How are you?", "I am doing well, thank you for asking. How are you?"),
    ("Thank you so much!", "You are welcome! I am glad I could help."),
    ("Thanks for the help", "Any time. Feel free to ask again."),
    ("Goodbye!", "Goodbye! Have a nice day."),
    ("See you later", "See you later! Take care."),
    ("Good night", "Good night and sleep well!"),
    ("What is your name?", "I am a small demo assistant trained with impruver."),
    ("Who made you?", "I was trained as a tiny demo model with the impruver framework."),
    ("Can you help me?", "Of course. Tell me what you need."),
    ("I am bored.", "Maybe read a book or take a short walk outside."),
    ("Nice to meet you", "Nice to meet you too!"),
    ("Tell me something nice", "You are doing great, and every day is a chance to learn something new."),
    ("Sorry, I made a mistake.", "No problem at all, mistakes help us learn."),
    ("Do you like music?", "I cannot listen to music, but many people find it relaxing."),
]
SMALL_TALK_RU: list[tuple[str, str]] = [
    ("Привет!", "Привет! Чем могу помочь?"),
    ("Здравствуйте", "Здравствуйте! О чём хотите поговорить?"),
    ("Доброе утро!", "Доброе утро! Пусть день будет удачным."),
    ("Добрый вечер", "Добрый вечер! Как прошёл ваш день?"),
    ("Как дела?", "Спасибо, всё хорошо. А у вас как дела?"),
    ("Спасибо большое!", "Пожалуйста! Рад был помочь."),
    ("Спасибо за помощь", "Обращайтесь в любое время."),
    ("До свидания!", "До свидания! Хорошего дня."),
    ("Пока", "Пока! Берегите себя."),
    ("Спокойной ночи", "Спокойной ночи и приятных снов!"),
    ("Как тебя зовут?", "Я маленький демонстрационный ассистент, обученный с помощью impruver."),
    ("Кто тебя создал?", "Меня обучили как крошечную демонстрационную модель во фреймворке impruver."),
    ("Можешь мне помочь?", "Конечно. Расскажите, что нужно сделать."),
    ("Мне скучно.", "Можно почитать книгу или немного погулять на свежем воздухе."),
    ("Приятно познакомиться", "Мне тоже очень приятно!"),
    ("Скажи что-нибудь приятное", "У вас всё получится, а каждый день даёт шанс узнать что-то новое."),
    ("Извини, я ошибся.", "Ничего страшного, на ошибках учатся."),
    ("Ты любишь музыку?", "Я не могу слушать музыку, но многим людям она помогает отдохнуть."),
]


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def ru_plural(n: int, one: str, few: str, many: str) -> str:
    """Pick the Russian noun form for a count: 1 буква, 2 буквы, 5 букв (11-14 take the "many" form)."""
    if n % 10 == 1 and n % 100 != 11:
        return one
    if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14:
        return few
    return many


def chat(*turns: tuple[str, str], system: str | None = None) -> Record:
    """Build one record from (role, content) turns, with an optional system prompt first."""
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages += [{"role": role, "content": content} for role, content in turns]
    return {"messages": messages}


def qa(question: str, answer: str, system: str | None = None) -> Record:
    """A single-turn user/assistant record."""
    return chat(("user", question), ("assistant", answer), system=system)


# --------------------------------------------------------------------------------------------------------------
# Question kinds. A kind is a list of facts (slot values), one answer form and several question phrasings, per
# language. Training asks each fact in `per_fact` of the `train` phrasings; the held-out set asks some facts in a
# `train` phrasing that fact was never asked in, and some in the `heldout` phrasings, which no training chat uses.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One kind of question in one language."""

    name: str
    lang: str  # "en" | "ru"
    facts: list[dict[str, str]]  # slot values for the templates
    answer: str  # the one answer form (a str.format template over the slots)
    train: tuple[str, ...]  # question phrasings used in training
    heldout: tuple[str, ...]  # question phrasings used only in heldout.jsonl
    per_fact: int = 2  # training questions per fact (each in a different phrasing)


def arithmetic() -> list[Kind]:
    """Sums of 1-9 and products of 2-9: the answer "a op b = c" is the same in both languages."""
    facts = [{"a": str(a), "op": "+", "b": str(b), "c": str(a + b)} for a in range(1, 10) for b in range(1, 10)]
    facts += [{"a": str(a), "op": "×", "b": str(b), "c": str(a * b)} for a in range(2, 10) for b in range(2, 10)]
    answer = "{a} {op} {b} = {c}."
    return [
        Kind("arithmetic", "en", facts, answer,
             ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?",
              "Please compute {a} {op} {b}.", "What does {a} {op} {b} equal?"),
             ("Can you tell me what {a} {op} {b} equals?",), per_fact=3),
        Kind("arithmetic", "ru", facts, answer,
             ("Сколько будет {a} {op} {b}?", "Вычисли {a} {op} {b}.", "Посчитай {a} {op} {b}.",
              "Чему равно {a} {op} {b}?", "Сколько получится, если {a} {op} {b}?"),
             ("Подскажи, сколько получится {a} {op} {b}?",), per_fact=3),
    ]


def capitals() -> list[Kind]:
    """The capital of each country of CAPITALS; Russian questions name the country in the genitive."""
    en = [{"country": c, "capital": k} for c, k, *_ in CAPITALS]
    ru = [{"gen": g, "capital": k} for *_, g, k in CAPITALS]
    return [
        Kind("capital", "en", en, "The capital of {country} is {capital}.",
             ("What is the capital of {country}?", "Which city is the capital of {country}?",
              "Name the capital of {country}.", "Tell me the capital city of {country}."),
             ("Do you know the capital of {country}?",), per_fact=3),
        Kind("capital", "ru", ru, "Столица {gen} — {capital}.",
             ("Какая столица у {gen}?", "Назови столицу {gen}.", "Какой город является столицей {gen}?",
              "Столица {gen} — это какой город?"),
             ("Скажи, какой город — столица {gen}?",), per_fact=3),
    ]


def translations() -> list[Kind]:
    """English to Russian asked in English, Russian to English asked in Russian, for every word of WORDS."""
    facts = [{"en": en, "ru": ru} for en, ru in WORDS]
    return [
        Kind("translation", "en", facts, 'In Russian, "{en}" is «{ru}».',
             ('How do you say "{en}" in Russian?', 'Translate "{en}" into Russian.',
              'What is the Russian word for "{en}"?'),
             ('What is "{en}" in Russian?',)),
        Kind("translation", "ru", facts, "По-английски «{ru}» — {en}.",
             ("Как по-английски «{ru}»?", "Переведи на английский слово «{ru}».", "Как будет «{ru}» на английском?"),
             ("Как сказать «{ru}» по-английски?",)),
    ]


def calendar() -> list[Kind]:
    """The day of the week or the month that comes after another one (the order wraps: December -> January)."""
    kinds = []
    for noun, seq in (("day", DAYS_EN), ("month", MONTHS_EN)):
        after = [{"x": x, "y": seq[(i + 1) % len(seq)]} for i, x in enumerate(seq)]
        kinds.append(Kind("calendar", "en", after, f"The {noun} after {{x}} is {{y}}.",
                          (f"What {noun} comes after {{x}}?", f"Which {noun} follows {{x}}?",
                           f"What is the {noun} after {{x}}?", f"Which {noun} is next after {{x}}?"),
                          (f"Tell me the {noun} after {{x}}.",), per_fact=3))
    for noun, seq in (("день", DAYS_RU), ("месяц", MONTHS_RU)):
        after = [{"gen": gen, "y": seq[(i + 1) % len(seq)][0]} for i, (_, gen, _) in enumerate(seq)]
        kinds.append(Kind("calendar", "ru", after, "После {gen} идёт {y}.",
                          (f"Какой {noun} идёт после {{gen}}?", "Что идёт после {gen}?",
                           f"Какой {noun} будет после {{gen}}?", f"Какой {noun} наступает после {{gen}}?"),
                          (f"Назови {noun} после {{gen}}.",), per_fact=3))
    return kinds


def opposites() -> list[Kind]:
    """Antonyms, each pair asked one way (word -> opposite), so that a question has one answer to learn."""
    en = [{"w": w, "o": o} for w, o in OPPOSITES_EN]
    ru = [{"w": w, "o": o} for w, o in OPPOSITES_RU]
    return [
        Kind("opposite", "en", en, 'The opposite of "{w}" is "{o}".',
             ('What is the opposite of "{w}"?', 'Give me an antonym for "{w}".',
              'What word means the opposite of "{w}"?', 'What is an antonym of "{w}"?'),
             ('Name the opposite of "{w}".',), per_fact=3),
        Kind("opposite", "ru", ru, "Антоним слова «{w}» — «{o}».",
             ("Какое слово противоположно слову «{w}»?", "Назови антоним к слову «{w}».", "Антоним слова «{w}»?",
              "Какой антоним у слова «{w}»?"),
             ("Подбери антоним к слову «{w}».",), per_fact=3),
    ]


def letters() -> list[Kind]:
    """Letter counts of the words of LETTER_WORDS_* (len() of a word made of letters only)."""
    en = [{"w": w, "n": str(len(w))} for w in LETTER_WORDS_EN]
    ru = [{"w": w, "n": str(len(w)), "unit": ru_plural(len(w), "буква", "буквы", "букв")} for w in LETTER_WORDS_RU]
    return [
        Kind("letters", "en", en, 'The word "{w}" has {n} letters.',
             ('How many letters are in the word "{w}"?', 'Count the letters in "{w}".',
              'How long is the word "{w}" in letters?'),
             ('How many letters does "{w}" have?',)),
        Kind("letters", "ru", ru, "В слове «{w}» {n} {unit}.",
             ("Сколько букв в слове «{w}»?", "Посчитай буквы в слове «{w}».", "Из скольких букв состоит слово «{w}»?"),
             ("Какова длина слова «{w}» в буквах?",)),
    ]


KINDS: list[Callable[[], list[Kind]]] = [arithmetic, capitals, translations, calendar, opposites, letters]
HELDOUT_PER_KIND = 8  # held-out questions per kind and language: half new combinations, half new phrasings


def questions(rng: random.Random) -> tuple[list[Record], list[Record]]:
    """Training records and held-out questions of every kind: (chats, heldout).

    For each fact the training phrasings are shuffled: the first ``per_fact`` are trained on and the next one is
    that fact's unseen combination. Held-out facts are still trained on (in other phrasings): the held-out set
    tests asking, not knowing something never shown.
    """
    records: list[Record] = []
    heldout: list[Record] = []
    for make in KINDS:
        groups: dict[str, list[tuple[Kind, dict[str, str], str]]] = {}  # lang -> (kind, fact, unseen phrasing)
        for kind in make():
            systems = SYSTEM_EN if kind.lang == "en" else SYSTEM_RU
            for fact in kind.facts:
                phrasings = rng.sample(kind.train, len(kind.train))
                answer = kind.answer.format(**fact)
                for phrasing in phrasings[:kind.per_fact]:
                    # About a fifth get a system prompt, so the model sees both shapes.
                    system = rng.choice(systems) if rng.random() < 0.2 else None
                    records.append(qa(phrasing.format(**fact), answer, system=system))
                groups.setdefault(kind.lang, []).append((kind, fact, phrasings[kind.per_fact]))
        for lang, candidates in groups.items():
            picked = rng.sample(candidates, HELDOUT_PER_KIND)
            for i, (kind, fact, unseen) in enumerate(picked):
                split = "combination" if i % 2 == 0 else "phrasing"
                phrasing = unseen if split == "combination" else rng.choice(kind.heldout)
                heldout.append({"messages": [{"role": "user", "content": phrasing.format(**fact)}],
                                "answer": kind.answer.format(**fact), "kind": kind.name, "lang": lang,
                                "split": split})
    return records, heldout


def small_talk(rng: random.Random) -> list[Record]:
    """Greetings and polite phrases, some with a system prompt."""
    records = []
    for pairs, systems in ((SMALL_TALK_EN, SYSTEM_EN), (SMALL_TALK_RU, SYSTEM_RU)):
        for q, a in pairs:
            # About a third get a system prompt, so the model sees both shapes.
            records.append(qa(q, a, system=rng.choice(systems) if rng.random() < 0.35 else None))
    return records


def dialogues(rng: random.Random) -> list[Record]:
    """Two-turn dialogues: a fact, then a follow-up about another one, in the kinds' answer forms."""
    records = []
    for _ in range(8):
        a, b, c, d = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        records.append(chat(("user", f"What is {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}."),
                            ("user", f"And {c} + {d}?"), ("assistant", f"{c} + {d} = {c + d}.")))
        a, b, c, d = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        records.append(chat(("user", f"Сколько будет {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}."),
                            ("user", f"А {c} + {d}?"), ("assistant", f"{c} + {d} = {c + d}.")))
    for (c1, k1, _, g1, r1), (c2, k2, _, g2, r2) in zip(rng.sample(CAPITALS, 8), rng.sample(CAPITALS, 8)):
        if c1 == c2:
            continue
        records.append(chat(("user", f"What is the capital of {c1}?"), ("assistant", f"The capital of {c1} is {k1}."),
                            ("user", f"And of {c2}?"), ("assistant", f"The capital of {c2} is {k2}."),
                            system=rng.choice([None, SYSTEM_EN[0]])))
        records.append(chat(("user", f"Назови столицу {g2}."), ("assistant", f"Столица {g2} — {r2}."),
                            ("user", f"А столица {g1}?"), ("assistant", f"Столица {g1} — {r1}."),
                            system=rng.choice([None, SYSTEM_RU[0]])))
    return records


# Tool use, in impruver's canonical roles: function_call (content: JSON {"name", "arguments"}), function_response
# (content: the tool's JSON result), then the assistant's answer built from that result.
# --------------------------------------------------------------------------------------------------------------

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]},
}
TIME_TOOL = {
    "name": "get_time",
    "description": "Get the current local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]},
}
CONVERT_TOOL = {
    "name": "convert_units",
    "description": "Convert a value from one unit to another.",
    "parameters": {"type": "object",
                   "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                  "to_unit": {"type": "string"}},
                   "required": ["value", "from_unit", "to_unit"]},
}
ALL_TOOLS = [WEATHER_TOOL, TIME_TOOL, CONVERT_TOOL]


def tool_chat(question: str, name: str, arguments: dict[str, object], result: dict[str, object], answer: str,
              tools: list[dict[str, object]]) -> Record:
    """One tool-use record: user, function_call, function_response, assistant; with its tool definitions."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    record = chat(("user", question), ("function_call", call),
                  ("function_response", json.dumps(result, ensure_ascii=False)), ("assistant", answer))
    record["tools"] = tools
    return record


def tool_use(rng: random.Random) -> list[Record]:
    """Weather, time and unit conversion through tools, half in English and half in Russian (24 records)."""
    records = []
    picks = rng.sample(CAPITALS, 16)
    for i, (_, city, _, _, ru_city) in enumerate(picks[:8]):
        temp = rng.randint(-10, 30)
        sky_en, sky_ru = rng.choice([("sunny", "солнечно"), ("cloudy", "облачно"), ("rainy", "дождь")])
        tools = [WEATHER_TOOL] if i % 2 else ALL_TOOLS
        if i % 2 == 0:
            records.append(tool_chat(f"What is the weather like in {city} right now?", "get_weather", {"city": city},
                                     {"city": city, "temperature_c": temp, "condition": sky_en},
                                     f"It is {sky_en} in {city}, {temp} °C.", tools))
        else:
            records.append(tool_chat(f"Какая сейчас погода в городе {ru_city}?", "get_weather", {"city": ru_city},
                                     {"city": ru_city, "temperature_c": temp, "condition": sky_ru},
                                     f"Сейчас в городе {ru_city} {sky_ru}, {temp} °C.", tools))
    for i, (_, city, _, _, ru_city) in enumerate(picks[8:]):
        hh, mm = rng.randint(0, 23), rng.randint(0, 59)
        tools = [TIME_TOOL] if i % 2 else ALL_TOOLS
        if i % 2 == 0:
            records.append(tool_chat(f"What time is it in {city}?", "get_time", {"city": city},
                                     {"city": city, "time": f"{hh:02d}:{mm:02d}"},
                                     f"It is {hh:02d}:{mm:02d} in {city} now.", tools))
        else:
            records.append(tool_chat(f"Который час сейчас в городе {ru_city}?", "get_time", {"city": ru_city},
                                     {"city": ru_city, "time": f"{hh:02d}:{mm:02d}"},
                                     f"В городе {ru_city} сейчас {hh:02d}:{mm:02d}.", tools))
    for i, (src, dst, factor, ru_src, ru_dst, _) in enumerate(UNITS + UNITS[:1]):
        n = rng.randint(2, 50)
        tools = [CONVERT_TOOL] if i % 2 else ALL_TOOLS
        args = {"value": n, "from_unit": src, "to_unit": dst}
        result = {"value": n * factor, "unit": dst}
        if i % 2 == 0:
            records.append(tool_chat(f"Use the converter: {n} {src} in {dst}, please.", "convert_units", args, result,
                                     f"{n} {src} is {n * factor} {dst}.", tools))
        else:
            records.append(tool_chat(f"Переведи {n} {ru_src} в {ru_dst} с помощью конвертера.", "convert_units", args,
                                     result, f"{n} {ru_src} = {n * factor} {ru_dst}.", tools))
    return records


def build(seed: int = SEED) -> tuple[list[Record], list[Record]]:
    """All training records, in topic order, and the held-out questions, from one seeded random generator."""
    rng = random.Random(seed)
    records, heldout = questions(rng)
    unseen = {q["messages"][0]["content"] for q in heldout}  # type: ignore[index]
    # A dialogue's opening question may happen to be a held-out one: such dialogues are left out.
    records += small_talk(rng) + [r for r in dialogues(rng) if not _users(r) & unseen] + tool_use(rng)
    leaked = set().union(*(_users(r) & unseen for r in records))
    assert not leaked, f"held-out questions also asked in training: {sorted(leaked)[:3]}"
    return records, heldout


def _users(record: Record) -> set[str]:
    return {m["content"] for m in record["messages"] if m["role"] == "user"}  # type: ignore[attr-defined]


def _jsonl(records: list[Record], *, sort: bool) -> str:
    lines = [json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) for record in records]
    lines = sorted(set(lines)) if sort else lines
    return "".join(line + "\n" for line in lines)


def render(seed: int = SEED) -> str:
    """The chats file's text: one JSON object per line, deduplicated exactly, sorted so the output is stable."""
    return _jsonl(build(seed)[0], sort=True)


def render_heldout(seed: int = SEED) -> str:
    """The held-out questions' text: one {"messages", "answer", "kind", "lang", "split"} per line, by kind."""
    return _jsonl(build(seed)[1], sort=False)


def write(path: Path = OUTPUT, seed: int = SEED) -> None:
    """Write the chats to ``path`` and the held-out questions beside it, atomically, UTF-8 with "\\n" line ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in ((path, render(seed)), (path.with_name(HELDOUT), render_heldout(seed))):
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_bytes(text.encode("utf-8"))
        os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    """Command line: write chats.jsonl and heldout.jsonl (or --out PATH and heldout.jsonl beside it), or --check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write the chats (default: chats.jsonl "
                        "here); heldout.jsonl goes beside it")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file differs from what would be written")
    args = parser.parse_args(argv)
    if args.check:
        stale = [path for path, text in ((args.out, render()), (args.out.with_name(HELDOUT), render_heldout()))
                 if (path.read_bytes() if path.exists() else b"") != text.encode("utf-8")]
        for path in stale:
            print(f"{path} is out of date; run: python -m impruver.assets.demo.make_demo", file=sys.stderr)
        if not stale:
            print(f"{args.out} and {HELDOUT} are up to date.")
        return 1 if stale else 0
    write(args.out)
    print(f"Wrote {args.out} and {args.out.with_name(HELDOUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
