"""Training pairs for the cross-encoder, generated from a knowledge base's own chunks.

No labelled data is downloaded and none is borrowed from the evaluation sets: every pair
below is made here, from the chunks of the indexed pages (the handbook by default) and
from word lists in this file. Each `Pair` records how it was made (`origin`) and from
which page (`source`).

**Relevance** (head ``relevant``; query first, passage second, the passage as the model
reads it, `CrossEncoder.passage_text`):

* ``term-en``: English templates over a page's key terms (front matter `terms`) and its
  title: "What is X?", "How does X work?", "When should I use X?", ...;
* ``term-zh``: Traditional Chinese templates over `zh_terms` and the Chinese part of
  `zh_title` ("X 是什麼？", "為什麼需要 X？", ...), and the same templates around English
  terms (Chinese questions often name the concept in English);
* ``heading``: a section's heading, with the page's subject when the heading is generic
  ("KV cache: trade-offs and pitfalls");
* ``masked``: a section's first prose sentence with the page's terms replaced by "this",
  as a description of the passage that does not name it;
* ``keywords``: three to five of the passage's rarest words, as a keyword search.

Each query's positive is its passage (for term queries: the page's first chunk that
mentions the term, else its first chunk). Its negatives are hard ones, the best hits of
the hybrid retriever from *other* pages (pages whose titles and terms name the query's
term, or whose text contains it, are skipped: they may well answer it), and one chunk of a
random other page. **Out-of-scope** queries (``oos``) come from templates over everyday
and neighbouring-field subjects the handbook does not cover (listed below), in English
and Chinese; their retrieved chunks are negatives.

**Support** (head ``supported``; sentence first, passage second): a passage is a window
of one to three consecutive prose sentences of a chunk. Positives are one of its own
sentences as written (``copy``), with a parenthesis or a trailing clause dropped
(``clause-dropped``), with words swapped for synonyms from a list (``synonyms``), two
neighbouring sentences joined (``joined``), one clause of it alone (``clause``), or all of
the rewordings at once (``reworded``). Negatives are the positive itself perturbed, so that
the changed fact is the only difference: a number changed (``number``), a word swapped for
its opposite from a list (``antonym``: "overestimates"/"underestimates", "half"/"a quarter",
"character"/"word", ...), one of the page's key terms swapped for another of its terms
(``term-swap``), a negation added or removed (``negation``); or a sentence of another
section of the same page (``other-section``), or a clause of the positive joined to such a
sentence (``mixed``: half stated, half not).
No Chinese support pairs are made: with no translation model, a Chinese sentence that a
passage supports cannot be produced here (see the handbook page on groundedness).

`generate` drops any query that is a copy or a near copy (word-set Jaccard >= 0.8) of a
string in `exclude`; `train-reranker` passes the labelled evaluation questions there and
reports how many were dropped (none, on the handbook, when this was written).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .text import content_words, is_chinese, numbers, split_sentences
from .types import Chunk

# -- word lists -------------------------------------------------------------------------------

EN_TEMPLATES = (
    "What is {x}?", "How does {x} work?", "Why would I use {x}?", "When should I use {x}?",
    "What are the trade-offs of {x}?", "Explain {x}.", "{x}", "How is {x} computed?",
    "What problem does {x} solve?", "Give me an example of {x}.", "What goes wrong with {x}?",
    "How does lmforge implement {x}?",
)
ZH_TEMPLATES = (
    "{x}是什麼？", "為什麼需要{x}？", "{x}怎麼運作？", "{x}有什麼優缺點？", "什麼時候該用{x}？",
    "{x}要注意哪些地方？", "請解釋{x}", "{x}的原理", "{x} 的例子", "lmforge 怎麼實作{x}？",
)
HEADING_TEMPLATES = ("{subject}: {heading}", "{heading} of {subject}", "{subject} {heading}")

# Subjects the handbook does not cover, for out-of-scope queries: everyday life and
# neighbouring technical fields.
OOS_SUBJECTS_EN = (
    "sourdough starters", "repotting orchids", "marathon training plans", "home office tax deductions",
    "learning the violin as an adult", "winter tent camping", "replacing a car battery", "planning a small wedding",
    "knitting a first scarf", "a road trip around Iceland", "house-training a puppy", "growing tomatoes on a balcony",
    "the rules of cricket", "chess openings for beginners", "learning to surf", "choosing running shoes",
    "refinancing a mortgage", "writing a cover letter", "the fall of the Roman Republic", "how photosynthesis works",
    "why volcanoes erupt", "support vector machine kernels", "random forest feature importance",
    "ARIMA models for sales forecasting", "OCR for scanned receipts", "blockchain consensus protocols",
    "quantum error correction codes", "register allocation in compilers", "TCP congestion control",
    "bird migration routes", "brewing pour-over coffee", "fixing a leaking faucet", "baroque painting",
    "the plot of Hamlet", "saving for retirement in index funds", "training for a half-triathlon",
)
OOS_TEMPLATES_EN = (
    "What should I know about {x}?", "Can you give me tips on {x}?", "How do I get started with {x}?",
    "What are common mistakes with {x}?", "Explain {x} to a beginner.", "{x}",
)
OOS_SUBJECTS_ZH = (
    "酸種麵包", "蘭花換盆", "馬拉松訓練", "學小提琴", "冬天露營", "換汽車電瓶", "婚禮預算", "織圍巾",
    "冰島自駕", "幼犬訓練", "陽台種番茄", "板球規則", "西洋棋開局", "學衝浪", "挑選跑鞋", "房貸轉貸",
    "寫求職信", "羅馬共和的衰亡", "光合作用", "火山爆發", "支持向量機的核函數", "隨機森林的特徵重要性",
    "ARIMA 銷售預測", "發票的文字辨識", "區塊鏈共識機制", "量子錯誤更正", "編譯器的暫存器配置",
    "TCP 壅塞控制", "候鳥遷徙", "手沖咖啡", "水龍頭漏水", "巴洛克繪畫", "退休理財", "鐵人三項訓練",
)
OOS_TEMPLATES_ZH = ("{x}要注意什麼？", "{x}有什麼技巧？", "{x}該怎麼開始？", "{x}常見的錯誤有哪些？", "{x}入門")

# Opposites that turn a supported sentence into an unsupported one (both directions are used).
ANTONYMS = (
    ("increases", "decreases"), ("increase", "decrease"), ("larger", "smaller"), ("more", "fewer"),
    ("higher", "lower"), ("faster", "slower"), ("overestimates", "underestimates"), ("before", "after"),
    ("first", "last"), ("linear", "quadratic"), ("always", "never"), ("half", "a quarter"), ("double", "triple"),
    ("encoder", "decoder"), ("input", "output"), ("minimum", "maximum"), ("exact", "approximate"),
    ("lossless", "lossy"), ("causal", "bidirectional"), ("add", "subtract"), ("training", "inference"),
    ("character", "word"), ("keys", "queries"), ("rows", "columns"), ("left", "right"), ("start", "end"),
    ("cheaper", "more expensive"), ("shorter", "longer"), ("less", "more"), ("grows", "shrinks"),
    ("rises", "falls"), ("above", "below"), ("compute-bound", "memory-bound"), ("prefill", "decode"),
    ("small", "large"), ("wider", "narrower"), ("early", "late"), ("precision", "recall"),
    ("lowercase", "uppercase"), ("sparse", "dense"), ("read", "write"), ("CPU", "GPU"), ("fp32", "bf16"),
    ("greedy", "random"), ("the same", "different"), ("most", "least"),
)
SYNONYMS = (
    ("uses", "relies on"), ("because", "since"), ("about", "roughly"), ("large", "big"), ("reduces", "lowers"),
    ("shows", "demonstrates"), ("needs", "requires"), ("often", "frequently"), ("each", "every"),
    ("whole", "entire"), ("begins", "starts"), ("picks", "chooses"), ("keeps", "retains"), ("gives", "yields"),
    ("many", "numerous"), ("enough", "sufficient"), ("computes", "calculates"), ("quickly", "fast"),
    ("makes", "renders"), ("lets", "allows"), ("however", "but"), ("stores", "keeps"), ("removes", "drops"),
    ("similar", "alike"), ("usually", "typically"), ("roughly", "approximately"), ("model's", "model's own"),
)
_AUXILIARIES = ("is", "are", "was", "were", "can", "does", "do", "will", "should", "must", "has", "have", "would")
_GENERIC_SHARE = 3  # a heading used by at least this many pages is generic ("The math", "Example")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
_WORDS = re.compile(r"[a-z0-9]+|[\u3400-\u9fff]")
_CODE = re.compile(r" = |==|\(\)|[{}<>_\\]|\w\(|\w\.\w+\(|http|\.\./|\.py\b")
_PLAIN_WORD = re.compile(r"^[(\"']?[A-Za-z0-9][\w'%/.,-]*[)\"',.;:!?]*$")
_SYLLABUS = re.compile(r"\s*\([A-Z]{1,3}\d+[^)]*\)\s*$")


@dataclass(frozen=True)
class Pair:
    """A training pair: (first, second) texts, a 0/1 label for one output (`head`), and its origin."""

    first: str
    second: str
    label: int
    head: str  # "relevant" or "supported"
    origin: str  # how it was made (see the module docstring)
    source: str  # the page it came from ("" for out-of-scope queries)
    lang: str = "en"


@dataclass
class DataOptions:
    """How many pairs of each kind `generate` makes."""

    seed: int = 0
    term_queries: int = 2  # English term queries per page
    zh_queries: int = 2  # Chinese term queries per page (plus one around an English term)
    heading_queries: int = 1
    masked_queries: int = 1
    keyword_queries: int = 1
    hard_negatives: int = 2  # per query, from the retriever's other pages
    random_negatives: int = 1
    oos_queries: int = 40  # in each language
    oos_negatives: int = 2
    support_sentences: int = 10  # per page; each gives one positive and one negative


@dataclass
class Dataset:
    pairs: list[Pair]
    stats: dict[str, int] = field(default_factory=dict)  # pairs per origin, queries dropped as near copies

    def by_head(self, head: str) -> list[Pair]:
        return [p for p in self.pairs if p.head == head]


@dataclass
class Page:
    source: str
    title: str  # without the syllabus ids
    zh_title: str  # the Chinese part of the zh_title
    terms: list[str]
    zh_terms: list[str]
    chunks: list[Chunk]

    def names(self) -> set[str]:
        """Lower-cased title, terms and Chinese terms: what a query about this page may name."""
        return {n.lower() for n in [self.title, self.zh_title, *self.terms, *self.zh_terms] if n}


def pages_of(chunks: Iterable[Chunk]) -> list[Page]:
    """Chunks grouped by page (in document order), with each page's titles and terms."""
    groups: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        groups.setdefault(chunk.source, []).append(chunk)
    pages = []
    for source, members in groups.items():
        members.sort(key=lambda c: c.line_start)
        meta = members[0].metadata
        zh_title = str(meta.get("zh_title") or "")
        zh_title = re.split(r"[（(]", zh_title, maxsplit=1)[0].strip()
        pages.append(Page(source, _SYLLABUS.sub("", members[0].title).strip(), zh_title,
                          [str(t) for t in meta.get("terms") or []], [str(t) for t in meta.get("zh_terms") or []],
                          members))
    return pages


def normalize_query(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def near_copy(a: str, b: str, threshold: float = 0.8) -> bool:
    """True when two queries are the same up to case and punctuation, or share >= `threshold`
    of their words (CJK characters count as words) by Jaccard similarity."""
    wa, wb = set(_WORDS.findall(a.lower())), set(_WORDS.findall(b.lower()))
    if not wa or not wb:
        return normalize_query(a) == normalize_query(b)
    return normalize_query(a) == normalize_query(b) or len(wa & wb) / len(wa | wb) >= threshold


class _Excluder:
    """Finds near copies of any string of a fixed list quickly (word index, then Jaccard)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.index: dict[str, set[int]] = {}
        for i, text in enumerate(self.texts):
            for word in set(_WORDS.findall(text.lower())):
                self.index.setdefault(word, set()).add(i)

    def hit(self, query: str) -> bool:
        candidates: set[int] = set()
        for word in set(_WORDS.findall(query.lower())):
            candidates |= self.index.get(word, set())
        return any(near_copy(query, self.texts[i]) for i in candidates)


# -- relevance queries ---------------------------------------------------------------------------

def _prose_sentences(text: str, min_words: int = 6) -> list[str]:
    """Sentences of prose (not code, tables, headings or list markers alone) with enough words."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        stripped = block.strip()
        if not stripped or stripped.startswith(("```", "|", "#", "    ", ">")):
            continue
        for sentence in split_sentences(stripped):
            sentence = re.sub(r"^[-*+] |^\d+[.)] ", "", re.sub(r"\s+", " ", sentence)).strip()
            plain = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", sentence).replace("**", "").replace("`", "")
            words = plain.split()
            if (len(words) >= min_words and not plain.endswith(":") and plain[:1].isupper()
                    and plain.endswith((".", "?", "!")) and not _CODE.search(plain)
                    and sum(bool(_PLAIN_WORD.match(w)) for w in words) >= 0.8 * len(words)):
                out.append(plain)
    return out


def _mentions(chunk: Chunk, term: str) -> bool:
    return term.lower() in chunk.text.lower()


def _relevance_queries(page: Page, generic: set[str], idf: dict[str, float], options: DataOptions,
                       rng: random.Random) -> list[tuple[str, Chunk, str, str, str]]:
    """(query, positive chunk, origin, the term it names or "", language) for one page."""
    out: list[tuple[str, Chunk, str, str, str]] = []
    first = page.chunks[0]
    en_names = list(dict.fromkeys([page.title] + page.terms))
    for term in rng.sample(en_names, min(options.term_queries, len(en_names))):
        positive = next((c for c in page.chunks if _mentions(c, term)), first)
        out.append((rng.choice(EN_TEMPLATES).format(x=term), positive, "term-en", term, "en"))
    zh_names = [n for n in dict.fromkeys([page.zh_title] + page.zh_terms) if n and is_chinese(n)]
    picked = rng.sample(zh_names, min(options.zh_queries, len(zh_names)))
    if page.terms:  # Chinese templates around an English term
        picked.append(rng.choice(page.terms))
    for term in picked:
        template = rng.choice(ZH_TEMPLATES)
        if not is_chinese(term):
            template = template.replace("{x}", " {x} ").strip()
        positive = next((c for c in page.chunks if _mentions(c, term)), first)
        out.append((template.format(x=term).replace("  ", " "), positive, "term-zh", term, "zh"))
    sections: dict[str, Chunk] = {}
    for chunk in page.chunks:
        if len(chunk.headings) > 1 and chunk.headings[-1] not in sections:
            sections[chunk.headings[-1]] = chunk
    subject = page.terms[0] if page.terms else page.title
    for heading in rng.sample(sorted(sections), min(options.heading_queries, len(sections))):
        clean = _SYLLABUS.sub("", heading).strip()
        query = clean if heading not in generic else rng.choice(HEADING_TEMPLATES).format(
            subject=subject, heading=clean.lower())
        out.append((query, sections[heading], "heading", "", "en"))
    candidates = [(c, s) for c in page.chunks for s in _prose_sentences(c.text, 8)[:1]]
    for chunk, sentence in rng.sample(candidates, min(options.masked_queries, len(candidates))):
        masked = sentence
        for name in sorted(page.terms + [page.title], key=len, reverse=True):
            masked = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", "this", masked, flags=re.IGNORECASE)
        words = masked.rstrip(".").split()
        out.append((" ".join(words[:16]), chunk, "masked", "", "en"))
    prose = [c for c in page.chunks if _prose_sentences(c.text)]
    for chunk in rng.sample(prose, min(options.keyword_queries, len(prose))):
        words = list(dict.fromkeys(w for w in content_words(chunk.text) if w.isascii() and len(w) > 2))
        words.sort(key=lambda w: -idf.get(w, 0.0))
        chosen = words[: rng.randint(3, 5)]
        rng.shuffle(chosen)
        if len(chosen) >= 3:
            out.append((" ".join(chosen), chunk, "keywords", "", "en"))
    return out


def _oos_queries(n: int, rng: random.Random) -> list[tuple[str, str]]:
    en = [t.format(x=s) for s in OOS_SUBJECTS_EN for t in OOS_TEMPLATES_EN]
    zh = [t.format(x=s) for s in OOS_SUBJECTS_ZH for t in OOS_TEMPLATES_ZH]
    return ([(q, "en") for q in rng.sample(en, min(n, len(en)))]
            + [(q, "zh") for q in rng.sample(zh, min(n, len(zh)))])


# -- support pairs ---------------------------------------------------------------------------------

def _swap_word(sentence: str, pairs: Sequence[tuple[str, str]], rng: random.Random) -> str | None:
    """`sentence` with one listed word (either side of a pair) replaced by its partner, or None."""
    options = []
    for a, b in pairs:
        for old, new in ((a, b), (b, a)):
            for match in re.finditer(rf"(?<![\w-]){re.escape(old)}(?![\w-])", sentence, flags=re.IGNORECASE):
                options.append((match, new))
    if not options:
        return None
    match, new = rng.choice(options)
    if match.group(0)[:1].isupper():
        new = new[:1].upper() + new[1:]
    return sentence[: match.start()] + new + sentence[match.end():]


def _change_number(sentence: str, passage: str, rng: random.Random) -> str | None:
    found = [m for m in _NUMBER.finditer(sentence) if m.group(0).replace(",", "").count(".") <= 1]
    if not found:
        return None
    match = rng.choice(found)
    text = match.group(0)
    plain = text.replace(",", "")
    have = numbers(passage)
    for _ in range(8):
        if "." in plain:
            whole, frac = plain.split(".")
            digits = list(frac)
            i = rng.randrange(len(digits))
            digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
            new = f"{whole}.{''.join(digits)}"
        else:
            value = int(plain)
            new = str(rng.choice([value * 2, value + 1 if value < 20 else value * 3, max(value // 2, value + 2),
                                  value * 10, value + rng.randint(2, 9)]))
        if "," in text and len(new) > 3:
            new = f"{int(new):,}"
        if new != text and new.replace(",", "") not in have:
            return sentence[: match.start()] + new + sentence[match.end():]
    return None


def _negate(sentence: str, rng: random.Random) -> str | None:
    existing = re.search(r"\b(not|never)\s", sentence)
    if existing and rng.random() < 0.5:
        word = existing.group(1)
        return sentence[: existing.start()] + ("always " if word == "never" else "") + sentence[existing.end():]
    found = [m for m in re.finditer(rf"\b({'|'.join(_AUXILIARIES)})\b(?! (?:not|no|never)\b)", sentence)]
    if not found:
        return None
    match = rng.choice(found)
    return sentence[: match.end()] + " not" + sentence[match.end():]


def _swap_term(sentence: str, page: Page, rng: random.Random) -> str | None:
    terms = [t for t in page.terms if len(t) > 2]
    present = [t for t in terms if re.search(rf"(?<!\w){re.escape(t)}(?!\w)", sentence, flags=re.IGNORECASE)]
    if not present:
        return None
    old = rng.choice(present)
    others = [t for t in terms if t.lower() not in sentence.lower() and t.lower() not in old.lower()
              and old.lower() not in t.lower()]
    if not others:
        return None
    return re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", rng.choice(others), sentence, count=1, flags=re.IGNORECASE)


def _drop_clause(sentence: str, rng: random.Random) -> str | None:
    options = []
    for match in re.finditer(r"\s?\([^()]{3,}\)", sentence):
        options.append(sentence[: match.start()] + sentence[match.end():])
    parts = sentence.rstrip(".").split(", ")
    if len(parts) > 2 and len(parts[-1].split()) >= 2:
        options.append(", ".join(parts[:-1]) + ".")
    options = [o for o in options if len(o.split()) >= 5]
    return rng.choice(options) if options else None


def _one_clause(sentence: str, rng: random.Random) -> str | None:
    """One clause of `sentence` (cut at "; ", ", and ", ", but ", ": " or ", so "), as a sentence of its own."""
    parts = [p.strip() for p in re.split(r"; |, and |, but |: |, so ", sentence.rstrip("."))]
    parts = [p for p in parts if len(p.split()) >= 5]
    if len(parts) < 2:
        return None
    part = rng.choice(parts)
    return part[:1].upper() + part[1:] + "."


def _reword(sentence: str, rng: random.Random) -> str | None:
    """`sentence` with parentheses dropped, every listed synonym swapped and clauses around "; " swapped."""
    text = re.sub(r"\s?\([^()]{3,}\)", "", sentence)
    for a, b in SYNONYMS:
        text = re.sub(rf"(?<![\w-]){re.escape(a)}(?![\w-])", b, text)
    parts = text.rstrip(".").split("; ")
    if len(parts) == 2 and rng.random() < 0.7:
        parts = parts[::-1]
        text = "; ".join(p[:1].upper() + p[1:] if k == 0 else p[:1].lower() + p[1:] for k, p in enumerate(parts)) + "."
    return text if text != sentence and len(text.split()) >= 5 else None


def _support_pairs(page: Page, rng: random.Random, n: int) -> list[Pair]:
    """Up to `n` (positive, negative) support pairs from one page (see the module docstring)."""
    windows: list[tuple[list[str], int, Chunk]] = []
    for chunk in page.chunks:
        sentences = _prose_sentences(chunk.text)
        for i in range(len(sentences)):
            windows.append((sentences, i, chunk))
    rng.shuffle(windows)
    out: list[Pair] = []
    made = 0
    for sentences, i, chunk in windows:
        if made >= n:
            break
        lo = max(0, i - rng.randint(0, 1))
        hi = min(len(sentences), i + 1 + rng.randint(0, 2))
        passage = " ".join(sentences[lo:hi])
        sentence = sentences[i]
        positive_kind = rng.choice(("copy", "clause-dropped", "synonyms", "joined", "clause", "reworded"))
        positive = None
        if positive_kind == "clause-dropped":
            positive = _drop_clause(sentence, rng)
        elif positive_kind == "synonyms":
            positive = _swap_word(sentence, SYNONYMS, rng)
            if positive is not None and rng.random() < 0.5:
                positive = _swap_word(positive, SYNONYMS, rng) or positive
        elif positive_kind == "joined" and i + 1 < hi:
            positive = sentence.rstrip(".") + "; " + sentences[i + 1][:1].lower() + sentences[i + 1][1:]
        elif positive_kind == "clause":
            positive = _one_clause(sentence, rng)
        elif positive_kind == "reworded":
            positive = _reword(sentence, rng)
        if positive is None:
            positive_kind, positive = "copy", sentence
        # The negative perturbs the positive itself, so that the one difference between the two
        # is the changed fact, not the wording.
        negatives = [("number", _change_number(positive, passage, rng)),
                     ("antonym", _swap_word(positive, ANTONYMS, rng)),
                     ("term-swap", _swap_term(positive, page, rng)),
                     ("negation", _negate(positive, rng))]
        negatives = [(kind, text) for kind, text in negatives if text and text != positive]
        if not negatives or rng.random() < 0.2:
            other = [s for c in page.chunks if c.headings != chunk.headings for s in _prose_sentences(c.text)
                     if s not in passage]
            if other:
                foreign = rng.choice(other)
                negatives.append(("other-section", foreign))
                clause = _one_clause(positive, rng)
                if clause is not None:  # half stated, half not: not supported
                    negatives.append(("mixed", clause.rstrip(".") + ", and " + foreign[:1].lower() + foreign[1:]))
        if not negatives:
            continue
        kind, negative = rng.choice(negatives)
        out.append(Pair(positive, passage, 1, "supported", positive_kind, page.source))
        out.append(Pair(negative, passage, 0, "supported", kind, page.source))
        made += 1
    return out


# -- everything ------------------------------------------------------------------------------------

def _idf(chunks: Sequence[Chunk]) -> dict[str, float]:
    df: Counter[str] = Counter()
    for chunk in chunks:
        df.update(set(content_words(chunk.text)))
    return {w: math.log(len(chunks) / n) for w, n in df.items()}


def _random_chunks(chunks: Sequence[Chunk], n: int, accept: Callable[[Chunk], bool],
                   rng: random.Random) -> list[Chunk]:
    """Up to `n` distinct random chunks that `accept` takes (a bounded number of draws)."""
    out: list[Chunk] = []
    for _ in range(50 * max(n, 0)):
        if len(out) >= n:
            break
        chunk = chunks[rng.randrange(len(chunks))]
        if accept(chunk) and all(chunk.id != c.id for c in out):
            out.append(chunk)
    return out


def generate(chunks: Sequence[Chunk], retrieve: Callable[[str, int], list[Chunk]] | None = None,
             options: DataOptions | None = None, exclude: Sequence[str] = (),
             progress: Callable[[int, int], None] | None = None,
             passage: Callable[[Chunk], str] = Chunk.search_text) -> Dataset:
    """Relevance and support pairs from `chunks` (see the module docstring).

    `retrieve(query, n)` returns the best `n` chunks for a query (the hybrid retriever); it
    supplies hard and out-of-scope negatives. Without it, negatives are random chunks of
    other pages. Queries that are near copies of a string in `exclude` are dropped.
    `passage(chunk)` is the text of a chunk in relevance pairs (what the model will read).
    """
    options = options or DataOptions()
    rng = random.Random(options.seed)
    chunks = list(chunks)
    pages = pages_of(chunks)
    heading_pages: Counter[str] = Counter()
    for page in pages:
        heading_pages.update({c.headings[-1] for c in page.chunks if len(c.headings) > 1})
    generic = {h for h, n in heading_pages.items() if n >= _GENERIC_SHARE}
    idf = _idf(chunks)
    excluder = _Excluder(exclude)
    stats: Counter[str] = Counter()
    pairs: list[Pair] = []
    names = {page.source: page.names() for page in pages}
    for n, page in enumerate(pages, 1):
        for query, positive, origin, term, lang in _relevance_queries(page, generic, idf, options, rng):
            if excluder.hit(query):
                stats["dropped_near_copies"] += 1
                continue
            stats["queries"] += 1
            pairs.append(Pair(query, passage(positive), 1, "relevant", origin, page.source, lang))

            def usable(c: Chunk) -> bool:
                if c.source == page.source:
                    return False
                if not term:
                    return True
                low = term.lower()
                return not (_mentions(c, term) or any(low in name or (len(name) > 1 and name in low)
                                                      for name in names.get(c.source, ())))

            hard = [c for c in (retrieve(query, 20) if retrieve else []) if usable(c)][: options.hard_negatives]
            easy = _random_chunks(chunks, options.random_negatives + options.hard_negatives - len(hard),
                                  lambda c: usable(c) and c.id not in {h.id for h in hard}, rng)
            for kind, negatives in (("hard", hard), ("random", easy)):
                for negative in negatives:
                    pairs.append(Pair(query, passage(negative), 0, "relevant", f"{origin}/{kind}",
                                      page.source, lang))
        pairs.extend(_support_pairs(page, rng, options.support_sentences))
        if progress is not None:
            progress(n, len(pages))
    for query, lang in _oos_queries(options.oos_queries, rng):
        if excluder.hit(query):
            stats["dropped_near_copies"] += 1
            continue
        stats["queries"] += 1
        found = retrieve(query, options.oos_negatives) if retrieve else rng.sample(chunks, options.oos_negatives)
        for negative in found[: options.oos_negatives]:
            pairs.append(Pair(query, passage(negative), 0, "relevant", "oos", "", lang))
    for pair in pairs:
        stats[f"{pair.head}/{pair.origin.split('/')[0]}/{pair.label}"] += 1
    stats["pairs"] = len(pairs)
    stats.setdefault("dropped_near_copies", 0)
    return Dataset(pairs, dict(sorted(stats.items())))
