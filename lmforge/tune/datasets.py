"""Offline fine-tuning datasets (F1, D7): generated tasks with checkable answers, and two real sets.

Generated tasks (no download, deterministic from a seed): every item is drawn by a
``random.Random`` seeded with ``(seed, task)``; its user text is its identity, items are
kept only the first time their text appears, and each unique item goes to exactly one
split, so train, validation and test never share an item. The answer is computed, not
written, so a model's greedy answer can be checked by exact match.

    arithmetic       "What is 47 + 385?" -> "432" (+, -, x on 1-3 digit numbers)
    word-problems    one-step stories ("Ana has 12 apples and buys 7 more ...") -> a number
    units            "Convert 3.5 km to m." -> "3500" (length, mass, volume, time)
    dates            "What date is 17 days after 2023-03-05?" -> "2023-03-22"; weekdays
    json-extraction  a sentence about a person -> {"name": ..., "age": ..., "city": ...}
    format           follow a formatting instruction (upper case, reverse, sort, count)
    mixed            all of the above, in equal parts

Real data:

    sentiment        gensim's ``pang_lee_polarity.cor`` (200 movie-review sentences from
                     Pang & Lee's sentence polarity data, labelled __label__pos/neg; 100 each),
                     as "Is this review positive or negative?" -> "positive"/"negative";
                     splits stratified by class, the class balance reported per split
    bible-en-es      English (KJV) -> Spanish (Reina-Valera 1909) verse translation from the
                     Debian ``sword-text-kjv`` / ``sword-text-sparv`` modules through
                     ``diatheke`` (lmforge.data.bible); split by BOOK, so test verses come
                     from books never seen in training (test: Ruth, Proverbs, Micah, Mark,
                     Galatians, I John; validation: Esther, Philippians, James); refused
                     with a clear message when the modules are not installed

Every record is ``{"messages": [user, assistant], "answer": ..., "task": ..., "source": ...}``
(`lmforge.tune.sft_data` reads it). `make_dataset(name, seed, sizes)` returns the splits;
``lmforge finetune data NAME --out DIR`` writes DIR/{train,validation,test}.jsonl and
DIR/dataset.json (counts, class balance, where the records come from).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import LmforgeError

SPLITS = ("train", "validation", "test")

_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena", "Mateo",
          "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
_SURNAMES = ["Lopez", "Novak", "Okafor", "Tanaka", "Silva", "Meyer", "Haddad", "Kowalski", "Nguyen", "Rossi",
             "Ivanova", "Mensah", "Larsen", "Costa", "Sato", "Dubois"]
_CITIES = ["Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Hanoi", "Porto", "Accra", "Tbilisi",
           "Seville", "Bergen", "Krakow", "Valparaiso", "Dakar"]
_ITEMS = ["apples", "books", "stamps", "marbles", "pencils", "shells", "cards", "coins", "stickers", "eggs"]
_WORDS = ["river", "candle", "orbit", "maple", "lantern", "pebble", "violet", "harbor", "quartz", "meadow", "falcon",
          "tundra", "copper", "saffron", "glacier", "ember"]


def _number(x: float) -> str:
    """A computed number as text: integers without a decimal point, others to at most 3 places."""
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.3f}".rstrip("0").rstrip(".")


def arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 19)
        return f"What is {a} * {b}?", str(a * b)
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    if op == "-" and b > a:
        a, b = b, a
    return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)


def word_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", str(a + b)
    if kind == 1:
        a, b = max(a, b) + 1, min(a, b)
        return f"{name} had {a} {item} and gave away {b}. How many {item} are left?", str(a - b)
    if kind == 2:
        boxes, each = rng.randint(2, 12), rng.randint(2, 12)
        return f"{name} fills {boxes} boxes with {each} {item} each. How many {item} is that in total?", str(boxes * each)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    return (f"{name} shares {friends * each} {item} equally among {friends} friends. "
            f"How many {item} does each friend get?", str(each))


_UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("L", "mL", 1000), ("h", "min", 60),
          ("min", "s", 60), ("g", "mg", 1000), ("ft", "in", 12)]


def unit_conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(_UNITS)
    if rng.random() < 0.5:
        value = rng.randint(1, 99) / (2 if rng.random() < 0.3 else 1)
        return f"Convert {_number(value)} {big} to {small}.", _number(value * factor)
    value = rng.randint(1, 40) * factor // rng.choice((1, 2, 4)) if factor % 4 == 0 else rng.randint(1, 40) * factor
    return f"Convert {_number(value)} {small} to {big}.", _number(value / factor)


def date_question(rng: random.Random) -> tuple[str, str]:
    day = dt.date(2000, 1, 1) + dt.timedelta(days=rng.randint(0, 365 * 30))
    if rng.random() < 0.3:
        return f"What day of the week is {day.isoformat()}?", day.strftime("%A")
    n = rng.randint(1, 60)
    if rng.random() < 0.5:
        return (f"What date is {n} days after {day.isoformat()}? Answer as YYYY-MM-DD.",
                (day + dt.timedelta(days=n)).isoformat())
    return (f"What date is {n} days before {day.isoformat()}? Answer as YYYY-MM-DD.",
            (day - dt.timedelta(days=n)).isoformat())


def json_extraction(rng: random.Random) -> tuple[str, str]:
    name = f"{rng.choice(_NAMES)} {rng.choice(_SURNAMES)}"
    age, city = rng.randint(18, 90), rng.choice(_CITIES)
    sentence = rng.choice([
        f"{name}, {age}, lives in {city}.",
        f"Born {age} years ago, {name} now calls {city} home.",
        f"In {city} we met {name}, who is {age} years old.",
        f"{name} ({age}) moved to {city} last spring.",
    ])
    answer = json.dumps({"name": name, "age": age, "city": city})
    return f'Extract the name, age and city as JSON with keys "name", "age", "city": {sentence}', answer


def format_following(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    listed = ", ".join(words)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Write these words in upper case, separated by commas: {listed}", ",".join(w.upper() for w in words)
    if kind == 1:
        return f"Write these words in reverse order, separated by commas: {listed}", ",".join(reversed(words))
    if kind == 2:
        return f"Sort these words alphabetically, separated by commas: {listed}", ",".join(sorted(words))
    return f"How many letters are in the word '{words[0]}'? Answer with a number.", str(len(words[0]))


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": arithmetic, "word-problems": word_problem, "units": unit_conversion, "dates": date_question,
    "json-extraction": json_extraction, "format": format_following,
}
REAL = ("sentiment", "bible-en-es")
NAMES = (*GENERATORS, "mixed", *REAL)
DEFAULT_SIZES = {"train": 2000, "validation": 100, "test": 200}
SENTIMENT_SIZES = {"train": 140, "validation": 20, "test": 40}  # 200 sentences in all


def record(prompt: str, answer: str, task: str, source: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "answer": answer, "task": task, "source": source}


def _generated(name: str, seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    tasks = list(GENERATORS) if name == "mixed" else [name]
    total = sum(sizes.values())
    rngs = {t: random.Random(f"{seed}:{t}") for t in tasks}
    seen: set[str] = set()
    items: list[dict[str, Any]] = []
    misses = 0
    while len(items) < total:
        task = tasks[len(items) % len(tasks)]
        prompt, answer = GENERATORS[task](rngs[task])
        if prompt in seen:  # an item appears once, so it lands in one split only
            misses += 1
            if misses > 50 * total + 1000:
                raise LmforgeError(f"{name}: cannot draw {total} distinct items; ask for fewer")
            continue
        seen.add(prompt)
        items.append(record(prompt, answer, task, f"generated by lmforge.tune.datasets ({task}, seed {seed})"))
    out, start = {}, 0
    for split in ("validation", "test", "train"):  # held-out items first: they never depend on the training size
        out[split] = items[start:start + sizes[split]]
        start += sizes[split]
    return {s: out[s] for s in SPLITS}


def _sentiment(seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    from lmforge.data.corpora import gensim_data_file

    path = gensim_data_file("gensim/test/test_data/pang_lee_polarity.cor")
    by_class: dict[str, list[str]] = {"positive": [], "negative": []}
    seen = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.strip().partition(" ")
        text = text.strip()
        if label not in ("__label__pos", "__label__neg") or not text or text in seen:
            continue
        seen.add(text)
        by_class["positive" if label == "__label__pos" else "negative"].append(text)
    n = sum(len(v) for v in by_class.values())
    # Each class is split in the same proportions (stratified); the requested sizes scale to what exists.
    wanted = sum(sizes.values())
    fractions = {s: sizes[s] / wanted for s in SPLITS}
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    rng = random.Random(f"{seed}:sentiment")
    for label, texts in sorted(by_class.items()):
        texts = texts[:]
        rng.shuffle(texts)
        k = len(texts)
        n_val, n_test = round(k * fractions["validation"]), round(k * fractions["test"])
        if wanted < n:  # fewer asked than there are: take a stratified subset
            k = round(len(texts) * wanted / n)
            n_val, n_test = round(k * fractions["validation"]), round(k * fractions["test"])
        cuts = {"validation": texts[:n_val], "test": texts[n_val:n_val + n_test], "train": texts[n_val + n_test:k]}
        for split, chunk in cuts.items():
            out[split] += [record(f"Is this movie review positive or negative? Answer with one word.\n\n{t}", label,
                                  "sentiment", f"gensim test data {path.name} (Pang & Lee sentence polarity)")
                           for t in chunk]
    for split in SPLITS:
        rng.shuffle(out[split])
    return out


def _bible(seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    from lmforge.data.bible import parallel_verses, split_books

    pairs = parallel_verses("kjv", "rv1909")
    books = split_books()
    rng = random.Random(f"{seed}:bible")
    out = {}
    for split in SPLITS:
        held = set(books[split])
        chosen = [(en, es) for en, es in pairs if en.book in held]
        rng.shuffle(chosen)
        out[split] = [{**record(f"Translate this verse into Spanish: {en.text}", es.text, "bible-en-es",
                                "King James Version and Reina-Valera 1909 (SWORD modules, public domain)"),
                       "reference": en.reference, "book": en.book}
                      for en, es in chosen[:sizes[split]]]
    return out


def make_dataset(name: str, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The splits of dataset ``name`` (see the module docstring)."""
    sizes = {**(SENTIMENT_SIZES if name == "sentiment" else DEFAULT_SIZES), **(sizes or {})}
    if any(v < 0 for v in sizes.values()) or not sum(sizes.values()):
        raise LmforgeError("split sizes must be >= 0 and not all 0")
    if name in GENERATORS or name == "mixed":
        return _generated(name, seed, sizes)
    if name == "sentiment":
        return _sentiment(seed, sizes)
    if name == "bible-en-es":
        return _bible(seed, sizes)
    raise LmforgeError(f"unknown dataset {name!r}; choose one of {', '.join(NAMES)}")


def describe(splits: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Counts per split, and per answer where the answers are classes (few distinct values)."""
    info: dict[str, Any] = {"counts": {s: len(v) for s, v in splits.items()}}
    answers = {r["answer"] for rows in splits.values() for r in rows}
    if len(answers) <= 10:
        info["class_balance"] = {s: {a: sum(r["answer"] == a for r in rows) for a in sorted(answers)}
                                 for s, rows in splits.items()}
    info["tasks"] = sorted({r["task"] for rows in splits.values() for r in rows})
    info["sources"] = sorted({r["source"] for rows in splits.values() for r in rows})[:20]
    return info


LABEL_PRESERVING = ("sentiment",)  # datasets whose answer survives rewording the question (augmentation)


def write_dataset(name: str, out: str | Path, seed: int = 0, sizes: dict[str, int] | None = None,
                  augment_copies: int = 0, balance: str | None = None) -> dict[str, Any]:
    """Write ``out/{train,validation,test}.jsonl`` and ``out/dataset.json``; returns the description.

    ``augment_copies`` adds that many EDA variants of every training record and ``balance``
    (oversample | undersample) equalises the training classes (lmforge/tune/augment.py);
    validation and test stay as drawn.
    """
    from lmforge.tune import augment

    if (augment_copies or balance) and name not in LABEL_PRESERVING:
        raise LmforgeError(f"augmentation and class balancing apply to classification sets ({', '.join(LABEL_PRESERVING)}), "
                           f"not to {name!r}, whose answers are computed from the exact question")
    if balance not in (None, "oversample", "undersample"):
        raise LmforgeError(f"balance must be oversample or undersample, got {balance!r}")
    splits = make_dataset(name, seed, sizes)
    if balance:
        splits["train"] = getattr(augment, balance)(splits["train"], seed)
    if augment_copies:
        splits["train"] = augment.augment_records(splits["train"], augment_copies, seed)
    return write_splits(splits, out, {"name": name, "seed": seed, "augment_copies": augment_copies,
                                      "balance": balance, **describe(splits)})


def write_splits(splits: dict[str, list[dict[str, Any]]], out: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """``out/{split}.jsonl`` for every split and ``out/dataset.json`` holding ``info``, each written atomically."""
    from lmforge.io.atomic import write_json_atomic, write_text_atomic

    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_text_atomic(directory / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(directory / "dataset.json", info)
    return info
