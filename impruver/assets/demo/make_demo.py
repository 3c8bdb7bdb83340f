"""Generate impruver's bundled demo dataset, ``chats.jsonl``, deterministically.

The demo chats are written by this script from its own word lists and facts (nothing is copied from elsewhere):
short Russian and English conversations about arithmetic, capitals, translations, the order of days and months,
opposites, unit conversions, letter counts, even and odd numbers, small talk, and a few tool-use dialogues in
impruver's canonical roles (``function_call`` / ``function_response``). Every answer is computed or checked here,
so the facts a tiny model learns from the demo are correct.

Regenerate (the output is byte-identical for the same script)::

    python -m impruver.assets.demo.make_demo            # rewrites chats.jsonl next to this file
    python -m impruver.assets.demo.make_demo --check    # exit status 1 if chats.jsonl is out of date

The script uses the standard library only, so it runs without impruver's heavier dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 20240601
OUTPUT = Path(__file__).with_name("chats.jsonl")

Message = dict[str, str]
Record = dict[str, object]

# --------------------------------------------------------------------------------------------------------------
# Facts. Each row is checked by hand; the Russian case forms (genitive "of X", instrumental "before X") are stored
# rather than derived because Russian declension has too many exceptions to derive safely.
# --------------------------------------------------------------------------------------------------------------

# (English country, English capital, Russian country, Russian country in the genitive, Russian capital)
CAPITALS: list[tuple[str, str, str, str, str]] = [
    ("France", "Paris", "Франция", "Франции", "Париж"),
    ("Germany", "Berlin", "Германия", "Германии", "Берлин"),
    ("Italy", "Rome", "Италия", "Италии", "Рим"),
    ("Spain", "Madrid", "Испания", "Испании", "Мадрид"),
    ("Portugal", "Lisbon", "Португалия", "Португалии", "Лиссабон"),
    ("the United Kingdom", "London", "Великобритания", "Великобритании", "Лондон"),
    ("Ireland", "Dublin", "Ирландия", "Ирландии", "Дублин"),
    ("Belgium", "Brussels", "Бельгия", "Бельгии", "Брюссель"),
    ("Austria", "Vienna", "Австрия", "Австрии", "Вена"),
    ("Poland", "Warsaw", "Польша", "Польши", "Варшава"),
    ("the Czech Republic", "Prague", "Чехия", "Чехии", "Прага"),
    ("Hungary", "Budapest", "Венгрия", "Венгрии", "Будапешт"),
    ("Greece", "Athens", "Греция", "Греции", "Афины"),
    ("Sweden", "Stockholm", "Швеция", "Швеции", "Стокгольм"),
    ("Norway", "Oslo", "Норвегия", "Норвегии", "Осло"),
    ("Finland", "Helsinki", "Финляндия", "Финляндии", "Хельсинки"),
    ("Denmark", "Copenhagen", "Дания", "Дании", "Копенгаген"),
    ("Iceland", "Reykjavik", "Исландия", "Исландии", "Рейкьявик"),
    ("Latvia", "Riga", "Латвия", "Латвии", "Рига"),
    ("Lithuania", "Vilnius", "Литва", "Литвы", "Вильнюс"),
    ("Estonia", "Tallinn", "Эстония", "Эстонии", "Таллин"),
    ("Russia", "Moscow", "Россия", "России", "Москва"),
    ("Belarus", "Minsk", "Беларусь", "Беларуси", "Минск"),
    ("Armenia", "Yerevan", "Армения", "Армении", "Ереван"),
    ("Georgia", "Tbilisi", "Грузия", "Грузии", "Тбилиси"),
    ("Kazakhstan", "Astana", "Казахстан", "Казахстана", "Астана"),
    ("Mongolia", "Ulaanbaatar", "Монголия", "Монголии", "Улан-Батор"),
    ("Japan", "Tokyo", "Япония", "Японии", "Токио"),
    ("China", "Beijing", "Китай", "Китая", "Пекин"),
    ("South Korea", "Seoul", "Южная Корея", "Южной Кореи", "Сеул"),
    ("India", "New Delhi", "Индия", "Индии", "Нью-Дели"),
    ("Vietnam", "Hanoi", "Вьетнам", "Вьетнама", "Ханой"),
    ("Thailand", "Bangkok", "Таиланд", "Таиланда", "Бангкок"),
    ("Turkey", "Ankara", "Турция", "Турции", "Анкара"),
    ("Egypt", "Cairo", "Египет", "Египта", "Каир"),
    ("Kenya", "Nairobi", "Кения", "Кении", "Найроби"),
    ("Morocco", "Rabat", "Марокко", "Марокко", "Рабат"),
    ("Nigeria", "Abuja", "Нигерия", "Нигерии", "Абуджа"),
    ("Canada", "Ottawa", "Канада", "Канады", "Оттава"),
    ("Mexico", "Mexico City", "Мексика", "Мексики", "Мехико"),
    ("Cuba", "Havana", "Куба", "Кубы", "Гавана"),
    ("Brazil", "Brasília", "Бразилия", "Бразилии", "Бразилиа"),
    ("Argentina", "Buenos Aires", "Аргентина", "Аргентины", "Буэнос-Айрес"),
    ("Peru", "Lima", "Перу", "Перу", "Лима"),
    ("Australia", "Canberra", "Австралия", "Австралии", "Канберра"),
    ("New Zealand", "Wellington", "Новая Зеландия", "Новой Зеландии", "Веллингтон"),
]

# (English word, Russian word)
WORDS: list[tuple[str, str]] = [
    ("cat", "кошка"), ("dog", "собака"), ("house", "дом"), ("water", "вода"), ("sun", "солнце"),
    ("moon", "луна"), ("book", "книга"), ("apple", "яблоко"), ("bread", "хлеб"), ("milk", "молоко"),
    ("tree", "дерево"), ("city", "город"), ("friend", "друг"), ("school", "школа"), ("table", "стол"),
    ("window", "окно"), ("door", "дверь"), ("bird", "птица"), ("fish", "рыба"), ("flower", "цветок"),
    ("sea", "море"), ("river", "река"), ("mountain", "гора"), ("snow", "снег"), ("rain", "дождь"),
    ("night", "ночь"), ("morning", "утро"), ("family", "семья"), ("father", "отец"), ("brother", "брат"),
    ("sister", "сестра"), ("red", "красный"), ("green", "зелёный"), ("big", "большой"), ("small", "маленький"),
    ("forest", "лес"), ("egg", "яйцо"), ("cheese", "сыр"), ("chair", "стул"), ("horse", "лошадь"),
]

# (word, its opposite); each pair is asked in both directions.
OPPOSITES_EN: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("day", "night"), ("light", "dark"),
    ("happy", "sad"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("long", "short"),
    ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("easy", "difficult"), ("loud", "quiet"),
    ("clean", "dirty"), ("left", "right"), ("first", "last"), ("inside", "outside"),
]
OPPOSITES_RU: list[tuple[str, str]] = [
    ("горячий", "холодный"), ("большой", "маленький"), ("быстрый", "медленный"), ("верх", "низ"),
    ("день", "ночь"), ("светлый", "тёмный"), ("весёлый", "грустный"), ("открытый", "закрытый"),
    ("рано", "поздно"), ("полный", "пустой"), ("длинный", "короткий"), ("сильный", "слабый"),
    ("богатый", "бедный"), ("мокрый", "сухой"), ("простой", "сложный"), ("громкий", "тихий"),
    ("чистый", "грязный"), ("левый", "правый"), ("вход", "выход"), ("друг", "враг"),
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
ORDINALS_EN = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
               "eleventh", "twelfth"]

# Words for letter counting (letters only, no hyphens, so len() is the letter count).
LETTER_WORDS_EN = ["garden", "pencil", "river", "orange", "planet", "window", "coffee", "music", "island", "bridge",
                   "summer", "winter", "yellow", "candle", "rocket", "banana", "tiger", "cloud", "lemon", "family"]
LETTER_WORDS_RU = ["окно", "молоко", "дерево", "книга", "солнце", "машина", "ромашка", "школа", "дорога", "яблоко",
                   "кот", "собака", "город", "весна", "лето", "зима", "тетрадь", "карандаш", "река", "улица"]

# (English unit, English target, factor, Russian abbreviation, Russian target abbreviation, Russian target in the
# genitive plural). Factors are exact integers, so every answer is exact.
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


def cap(text: str) -> str:
    """Upper-case the first character only (str.capitalize would lower-case the rest)."""
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------------------------------------------
# Topics. Each returns a list of records; answers are computed from the facts above.
# --------------------------------------------------------------------------------------------------------------


def arithmetic(rng: random.Random) -> list[Record]:
    """Sums, differences and products of small numbers; every answer contains the equation "a op b = c"."""
    en = ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {op} {b}?", "{a} {op} {b} = ?",
          "Please compute {a} {op} {b}.", "Can you tell me what {a} {op} {b} equals?"]
    ru = ["Сколько будет {a} {op} {b}?", "Вычисли {a} {op} {b}.", "Посчитай, пожалуйста, {a} {op} {b}.",
          "{a} {op} {b} = ?", "Чему равно {a} {op} {b}?", "Подскажи, сколько получится {a} {op} {b}?"]
    ops: list[tuple[str, Callable[[int, int], int]]] = [("+", int.__add__), ("-", int.__sub__), ("×", int.__mul__)]
    records = []
    for lang, templates in (("en", en), ("ru", ru)):
        for i in range(40):
            op, fn = ops[i % 3]
            a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "×" else (rng.randint(1, 99), rng.randint(1, 99))
            if op == "-" and b > a:
                a, b = b, a  # keep differences non-negative so the answers stay simple
            eq = f"{a} {op} {b} = {fn(a, b)}"
            answer = rng.choice([f"{eq}.", f"The answer is {eq}."] if lang == "en" else [f"{eq}.", f"Ответ: {eq}."])
            records.append(qa(rng.choice(templates).format(a=a, op=op, b=b), answer))
    return records


def capitals(rng: random.Random) -> list[Record]:
    """One English and one Russian question per country, in varied phrasings."""
    records = []
    for country, capital, ru_country, ru_gen, ru_capital in CAPITALS:
        q_en = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                           f"Name the capital of {country}.", f"Tell me the capital city of {country}."])
        a_en = rng.choice([f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}.",
                           f"It is {capital}."])
        q_ru = rng.choice([f"Какая столица у страны {ru_country}?", f"Назови столицу {ru_gen}.",
                           f"Какой город является столицей {ru_gen}?", f"Столица {ru_gen} — это какой город?"])
        a_ru = rng.choice([f"Столица {ru_gen} — {ru_capital}.", f"{ru_capital} — столица {ru_gen}.",
                           f"Это {ru_capital}."])
        records.append(qa(q_en, a_en))
        records.append(qa(q_ru, a_ru))
    return records


def translations(rng: random.Random) -> list[Record]:
    """English->Russian asked in English and Russian->English asked in Russian, one of each per word."""
    records = []
    for en, ru in WORDS:
        q_en = rng.choice([f'How do you say "{en}" in Russian?', f'Translate "{en}" into Russian.',
                           f'What is the Russian word for "{en}"?'])
        a_en = rng.choice([f'"{cap(en)}" in Russian is «{ru}».', f"The Russian word is «{ru}».", f"«{cap(ru)}»."])
        q_ru = rng.choice([f"Как по-английски «{ru}»?", f"Переведи на английский слово «{ru}».",
                           f"Как будет «{ru}» на английском?"])
        a_ru = rng.choice([f"«{cap(ru)}» по-английски — {en}.", f"По-английски это {en}.", f"{cap(en)}."])
        records.append(qa(q_en, a_en))
        records.append(qa(q_ru, a_ru))
    return records


def calendar(rng: random.Random) -> list[Record]:
    """The order of the days of the week and of the months, both directions and by number."""
    records = []
    for seq, noun in ((DAYS_EN, "day"), (MONTHS_EN, "month")):
        n = len(seq)
        for i, name in enumerate(seq):
            nxt, prev = seq[(i + 1) % n], seq[(i - 1) % n]
            records.append(qa(rng.choice([f"What {noun} comes after {name}?", f"Which {noun} follows {name}?"]),
                              f"{nxt} comes after {name}."))
            records.append(qa(rng.choice([f"What {noun} comes before {name}?", f"Which {noun} is just before {name}?"]),
                              f"{prev} comes before {name}."))
    for i, month in enumerate(MONTHS_EN):
        records.append(qa(f"Which month is number {i + 1} in the year?",
                          f"{month} is the {ORDINALS_EN[i]} month of the year."))
    for seq, noun in ((DAYS_RU, "день недели"), (MONTHS_RU, "месяц")):
        n = len(seq)
        for i, (name, gen, ins) in enumerate(seq):
            nxt, prev = seq[(i + 1) % n][0], seq[(i - 1) % n][0]
            records.append(qa(rng.choice([f"Какой {noun} идёт после {gen}?", f"Что следует за {ins}?"]),
                              f"После {gen} идёт {nxt}."))
            records.append(qa(rng.choice([f"Какой {noun} идёт перед {ins}?", f"Что было перед {ins}?"]),
                              f"Перед {ins} идёт {prev}."))
    for i, (month, _, _) in enumerate(MONTHS_RU):
        records.append(qa(f"Какой месяц в году идёт под номером {i + 1}?", f"Под номером {i + 1} идёт {month}."))
    return records


def opposites(rng: random.Random) -> list[Record]:
    """Antonyms in both directions; a subset is sampled so this topic does not dominate."""
    records = []
    for a, b in OPPOSITES_EN:
        for w, o in rng.sample([(a, b), (b, a)], 1):
            q = rng.choice([f'What is the opposite of "{w}"?', f'Give me an antonym for "{w}".',
                            f'What word means the opposite of "{w}"?'])
            records.append(qa(q, rng.choice([f'The opposite of "{w}" is "{o}".', f'"{cap(o)}".'])))
    for a, b in OPPOSITES_RU:
        for w, o in rng.sample([(a, b), (b, a)], 1):
            q = rng.choice([f"Какое слово противоположно слову «{w}»?", f"Назови антоним к слову «{w}».",
                            f"Антоним слова «{w}»?"])
            records.append(qa(q, rng.choice([f"Антоним слова «{w}» — «{o}».", f"«{cap(o)}»."])))
    return records


def units(rng: random.Random) -> list[Record]:
    """Conversions with exact integer factors (km->m, kg->g, hours->minutes, ...)."""
    records = []
    for src, dst, factor, ru_src, ru_dst, ru_dst_gen in UNITS:
        for n in rng.sample(range(2, 20), 3):
            q_en = rng.choice([f"How many {dst} are in {n} {src}?", f"Convert {n} {src} to {dst}.",
                               f"{n} {src} is how many {dst}?"])
            records.append(qa(q_en, f"{n} {src} is {n * factor} {dst}."))
            q_ru = rng.choice([f"Переведи {n} {ru_src} в {ru_dst}.", f"{n} {ru_src} — это сколько {ru_dst_gen}?",
                               f"Сколько {ru_dst_gen} в {n} {ru_src}?"])
            records.append(qa(q_ru, f"{n} {ru_src} = {n * factor} {ru_dst}."))
    return records


def letters(rng: random.Random) -> list[Record]:
    """Letter counts of short words (len() of a word made of letters only)."""
    records = []
    for w in LETTER_WORDS_EN:
        q = rng.choice([f'How many letters are in the word "{w}"?', f'Count the letters in "{w}".'])
        records.append(qa(q, f'The word "{w}" has {len(w)} letters.'))
    for w in LETTER_WORDS_RU:
        q = rng.choice([f"Сколько букв в слове «{w}»?", f"Посчитай буквы в слове «{w}»."])
        n = len(w)
        records.append(qa(q, f"В слове «{w}» {n} {ru_plural(n, 'буква', 'буквы', 'букв')}."))
    return records


def parity(rng: random.Random) -> list[Record]:
    """Even or odd for distinct numbers."""
    records = []
    for n in rng.sample(range(1, 200), 20):
        q = rng.choice([f"Is {n} even or odd?", f"Is the number {n} even?", f"Tell me if {n} is odd or even."])
        records.append(qa(q, f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
    for n in rng.sample(range(1, 200), 20):
        q = rng.choice([f"Число {n} чётное или нечётное?", f"{n} — чётное число?", f"Определи чётность числа {n}."])
        records.append(qa(q, f"{n} — {'чётное' if n % 2 == 0 else 'нечётное'} число."))
    return records


def small_talk(rng: random.Random) -> list[Record]:
    """Greetings and polite phrases, some with a system prompt."""
    records = []
    for pairs, systems in ((SMALL_TALK_EN, SYSTEM_EN), (SMALL_TALK_RU, SYSTEM_RU)):
        for q, a in pairs:
            # About a third get a system prompt, so the model sees both shapes.
            records.append(qa(q, a, system=rng.choice(systems) if rng.random() < 0.35 else None))
    return records


def dialogues(rng: random.Random) -> list[Record]:
    """Two-turn dialogues: a fact, then a follow-up that depends on the first answer."""
    records = []
    for _ in range(10):
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 5)
        records.append(chat(("user", f"What is {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}."),
                            ("user", f"And if we multiply that by {c}?"),
                            ("assistant", f"{a + b} × {c} = {(a + b) * c}.")))
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 5)
        records.append(chat(("user", f"Сколько будет {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}."),
                            ("user", f"А если умножить это на {c}?"),
                            ("assistant", f"{a + b} × {c} = {(a + b) * c}.")))
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


# --------------------------------------------------------------------------------------------------------------
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


TOPICS: list[Callable[[random.Random], list[Record]]] = [
    arithmetic, capitals, translations, calendar, opposites, units, letters, parity, small_talk, dialogues, tool_use,
]


def build(seed: int = SEED) -> list[Record]:
    """All demo records, in topic order, from one seeded random generator."""
    rng = random.Random(seed)
    return [record for topic in TOPICS for record in topic(rng)]


def render(seed: int = SEED) -> str:
    """The demo file's text: one JSON object per line, deduplicated exactly, sorted so the output is stable."""
    lines = {json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) for record in build(seed)}
    return "".join(line + "\n" for line in sorted(lines))


def write(path: Path = OUTPUT, seed: int = SEED) -> None:
    """Write the demo file atomically (a temp file then os.replace), as UTF-8 with "\\n" line ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(render(seed).encode("utf-8"))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Command line: write chats.jsonl (or --out PATH), or --check that the committed file is up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write (default: chats.jsonl here)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    if args.check:
        current = args.out.read_bytes() if args.out.exists() else b""
        if current != render().encode("utf-8"):
            print(f"{args.out} is out of date; run: python -m impruver.assets.demo.make_demo", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date.")
        return 0
    write(args.out)
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
