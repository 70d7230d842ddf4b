"""Verse-aligned Bible text from installed SWORD modules (an offline parallel corpus).

Debian ships public-domain Bibles as SWORD modules (``sword-text-kjv``, ``sword-text-web``,
``sword-text-sparv``) with the ``diatheke`` reader. Every verse carries the same reference
("John 3:16") in every translation, so two modules give a sentence-aligned parallel corpus
with no alignment step: English-Spanish for translation, KJV-WEB for paraphrase.

Module names change between package versions ("KJV" in older releases, "engKJV2006eb" in
newer ones), so a language/translation is asked for by a short key and resolved against
``diatheke``'s module list. The plain-text output still holds a few markup leftovers
(Strong's numbers such as ``<G3588>``, paragraph signs ``¶``, doubled spaces) that
`clean_verse` removes.

Splits are made by BOOK (`split_books`): a test book's verses are never seen in training,
which is the honest setting for translation (verses of one book share names and phrasing).
"""

from __future__ import annotations

import functools
import math
import re
import shutil
import subprocess
from dataclasses import dataclass

from lmforge.errors import LmforgeError

INSTALL = "apt-get install diatheke sword-text-kjv sword-text-web sword-text-sparv"
# short key -> module names it goes by in different package versions (first installed wins)
MODULES = {
    "kjv": ("engKJV2006eb", "KJV", "engKJV2006"),
    "web": ("engWEB2015eb", "WEB", "engWEBeb"),
    "rv1909": ("spaRV1909eb", "SpaRV1909", "spaRV1909"),
}
OLD_TESTAMENT = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "I Samuel",
    "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
    "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel",
    "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
    "Zechariah", "Malachi",
)
NEW_TESTAMENT = (
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians", "II Corinthians", "Galatians",
    "Ephesians", "Philippians", "Colossians", "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy",
    "Titus", "Philemon", "Hebrews", "James", "I Peter", "II Peter", "I John", "II John", "III John", "Jude",
    "Revelation of John",
)
BOOKS = OLD_TESTAMENT + NEW_TESTAMENT
# held-out books of the default book split: one of each kind of writing, about 7% of the verses
DEFAULT_TEST_BOOKS = ("Ruth", "Proverbs", "Micah", "Mark", "Galatians", "I John")
DEFAULT_VALIDATION_BOOKS = ("Esther", "Philippians", "James")
_BOOK_SET = frozenset(BOOKS)

_STRONGS = re.compile(r"<[GH]\d+>")
_MARKUP = re.compile(r"<[^<>]{0,40}>")
_SPACES = re.compile(r"\s+")
_REFERENCE = re.compile(r"^((?:I{1,3} )?[A-Z][A-Za-z ]*?) (\d+):(\d+): ?(.*)$")


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def reference(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def clean_verse(text: str) -> str:
    """A verse's plain text without Strong's numbers, markup leftovers or paragraph signs."""
    text = _STRONGS.sub("", text)
    text = _MARKUP.sub("", text).replace("¶", " ")
    return _SPACES.sub(" ", text).strip()


def _diatheke() -> str:
    path = shutil.which("diatheke")
    if path is None:
        raise LmforgeError(f"the Bible corpus needs diatheke and the SWORD modules ({INSTALL}); "
                           "diatheke is not installed here")
    return path


def installed_modules() -> list[str]:
    """Names of the installed SWORD Bible modules."""
    out = _run(["-b", "system", "-k", "modulelist"])
    names, in_bibles = [], False
    for line in out.splitlines():
        if line.endswith(":") and " : " not in line:
            in_bibles = line.startswith("Biblical Texts")
            continue
        if in_bibles and " : " in line:
            names.append(line.split(" : ", 1)[0].strip())
    return names


def resolve_module(key: str) -> str:
    """The installed module name for ``key`` (``kjv``, ``web``, ``rv1909`` or a module name)."""
    installed = installed_modules()
    for name in MODULES.get(key.lower(), (key,)):
        if name in installed:
            return name
    package = {"kjv": "sword-text-kjv", "web": "sword-text-web", "rv1909": "sword-text-sparv"}.get(key.lower(), key)
    raise LmforgeError(f"no installed SWORD module for {key!r} (installed: {', '.join(installed) or 'none'}); "
                       f"install {package} ({INSTALL})")


def _run(args: list[str]) -> str:
    try:
        return subprocess.run([_diatheke(), *args], capture_output=True, text=True, timeout=300,
                              check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise LmforgeError(f"diatheke failed ({' '.join(args)}): {exc.stderr.strip() or exc}") from None
    except (subprocess.SubprocessError, OSError) as exc:
        raise LmforgeError(f"diatheke could not run ({exc})") from None


@functools.lru_cache(maxsize=4)
def read_module(module: str) -> tuple[Verse, ...]:
    """Every verse of ``module`` (a key of MODULES or an installed module name), in canonical order.

    One ``diatheke`` call reads the whole Bible (a few seconds); lines that are not
    "Book chapter:verse: text" (the Psalms' titles, blank lines) are headings, not verse text.
    """
    out = _run(["-b", resolve_module(module), "-f", "plain", "-k", f"{BOOKS[0]} 1:1-{BOOKS[-1]} 22:21"])
    verses = []
    for line in out.splitlines():
        match = _REFERENCE.match(line.strip())
        if match and match.group(1) in _BOOK_SET:
            text = clean_verse(match.group(4))
            if text:
                verses.append(Verse(match.group(1), int(match.group(2)), int(match.group(3)), text))
    if not verses:
        raise LmforgeError(f"diatheke returned no verses for module {module!r}")
    return tuple(verses)


def read_book(module: str, book: str) -> list[Verse]:
    """Every verse of ``book`` in ``module``."""
    if book not in _BOOK_SET:
        raise LmforgeError(f"unknown book {book!r}; books are named as in {BOOKS[:3]} ... {BOOKS[-1]!r}")
    return [v for v in read_module(module) if v.book == book]


def parallel_verses(source: str, target: str, books: tuple[str, ...] | list[str] = BOOKS) -> list[tuple[Verse, Verse]]:
    """(source verse, target verse) pairs with the same reference, in canonical order.

    Translations sometimes number a chapter's verses differently (Spanish Jonah 2:1 is
    English Jonah 1:17), and pairing by reference would then pair different verses for the
    rest of the chapter. Two rules keep such chapters out: the chapter must have the same
    verse numbers in both modules, and the verses' lengths must not fit clearly better one
    verse shifted (`_shifted`): verse lengths of a translation track the original's, so a
    misnumbered chapter shows up as lengths that line up with the neighbouring verse. For
    KJV / Reina-Valera 1909 this leaves out 1.3% of the verses (396 of 31,102).
    """
    unknown = [b for b in books if b not in _BOOK_SET]
    if unknown:
        raise LmforgeError(f"unknown book(s): {', '.join(unknown)}")
    wanted = set(books)

    def chapters(module: str) -> dict[tuple[str, int], dict[int, Verse]]:
        out: dict[tuple[str, int], dict[int, Verse]] = {}
        for v in read_module(module):
            if v.book in wanted:
                out.setdefault((v.book, v.chapter), {})[v.verse] = v
        return out

    src, tgt = chapters(source), chapters(target)
    candidates = [[(verses[n], tgt[key][n]) for n in sorted(verses)]
                  for key, verses in src.items() if key in tgt and verses.keys() == tgt[key].keys()]
    ratios = sorted(math.log(len(b.text) / len(a.text)) for chapter in candidates for a, b in chapter)
    offset = ratios[len(ratios) // 2] if ratios else 0.0  # the languages' usual length ratio
    pairs = [pair for chapter in candidates if not _shifted(chapter, offset) for pair in chapter]
    if not pairs:
        raise LmforgeError(f"no aligned verses between {source} and {target} in {len(books)} book(s)")
    return pairs


def _shifted(chapter: list[tuple[Verse, Verse]], offset: float = 0.0, margin: float = 0.7) -> bool:
    """True when the chapter's verse lengths match clearly better with a one-verse offset.

    ``offset`` is the usual log length ratio of target to source verses.
    """
    if len(chapter) < 4:
        return False
    logs = [(math.log(len(a.text)), math.log(len(b.text))) for a, b in chapter]

    def misfit(shift: int) -> float:
        source = [x for x, _ in logs]
        target = [y for _, y in logs]
        if shift > 0:
            source, target = source[shift:], target[:-shift]
        elif shift < 0:
            source, target = source[:shift], target[-shift:]
        return sum(abs(y - x - offset) for x, y in zip(source, target)) / len(source)

    return min(misfit(1), misfit(-1)) < margin * misfit(0)


def split_books(books: tuple[str, ...] | list[str] = BOOKS, test: tuple[str, ...] = DEFAULT_TEST_BOOKS,
                validation: tuple[str, ...] = DEFAULT_VALIDATION_BOOKS) -> dict[str, list[str]]:
    """Books per split: held-out test and validation books, the rest for training."""
    unknown = sorted((set(test) | set(validation)) - set(BOOKS))
    if unknown:
        raise LmforgeError(f"unknown book(s) in the split: {', '.join(unknown)}")
    if set(test) & set(validation):
        raise LmforgeError("a book cannot be in both the test and the validation split")
    return {"train": [b for b in books if b not in test and b not in validation],
            "validation": [b for b in books if b in validation],
            "test": [b for b in books if b in test]}
