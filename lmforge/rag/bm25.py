"""Okapi BM25 keyword search over chunks, with an analyzer for English and Chinese.

**Analyzer.** Text is NFKC-normalized (full-width letters and digits become ASCII, so
"ＢＭ２５" is "bm25") and case-folded, then cut into tokens:

* Latin (and other alphabetic) text: words of letters and digits; a possessive "'s" is
  dropped and other apostrophes joined ("don't" -> "dont"); English stopwords (the 33 of
  Lucene's English analyzer) are removed and the remaining words pass through a light
  stemmer (Harman's S-stemmer: plural "-ies", "-es", "-s" to the singular). Both are
  switches on `Analyzer`; benchmarks/rag_bm25.py measures each choice.
* CJK text (Han, kana, Hangul): Chinese is written without spaces and a dictionary-free
  index cannot know the word boundaries, so each run of CJK characters gives its character
  unigrams and overlapping bigrams ("退款政策" -> 退 款 政 策 退款 款政 政策), function
  characters (的, 什麼, 如何 ...) left out as described at `CJK_FUNCTION_CHARS`. A bigram
  matches a two-character word exactly; unigrams keep single-character words and partial
  matches findable. Traditional and Simplified characters are indexed as written (no
  conversion): "退貨" does not match "退货".
* punctuation, ASCII or full-width (，。「」), is never a token; mixed text ("用 BM25 搜尋")
  gives both kinds of tokens.

**Scoring.** For a query q and a chunk d of length |d| (tokens) in a collection of N chunks
with average length avgdl:

    score(q, d) = sum over query tokens t of  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))

with k1 = 1.2 and b = 0.75 by default (Lucene's and Elasticsearch's). A query token that
appears twice counts twice. The IDF variants (n(t) = chunks containing t):

* "lucene" (default): ln(1 + (N - n + 0.5) / (n + 0.5)), Lucene's BM25Similarity: always
  positive, so a term in most chunks still adds a little;
* "okapi": ln((N - n + 0.5) / (n + 0.5)), Robertson-Sparck Jones, which is negative for a
  term in more than half the chunks; negative values are replaced by epsilon times the
  mean IDF of the vocabulary, as the rank-bm25 package's BM25Okapi does.

The index is the chunk's `search_text()`: titles, key terms (English and Chinese), heading
path and text, so a question that names a page's subject finds its passages.
"""

from __future__ import annotations

import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import regex

from ..errors import LmforgeError
from .fusion import Filters, make_filter
from .types import Chunk, Hit

# Lucene's EnglishAnalyzer stop set.
ENGLISH_STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these "
    "they this to was will with".split()
)

# Chinese function characters, Traditional and Simplified. In an English collection they are
# rare, so their IDF is high and any Chinese text in a page would attract every question that
# contains them. None of them is a term alone. Particles, pronouns and question words never
# make a useful bigram either (是效, 的模, 什麼); the others (對, 能, 有, 過 ...) also start
# content words (對齊, 效能, 過擬合), so a bigram goes only when both of its characters are
# function characters (如何, 可以).
CJK_PARTICLES = frozenset("的了是在和與及或嗎呢吧啊呀什麼甚怎哪這那我你您他她它們請也都就很么这们吗")
CJK_FUNCTION_CHARS = CJK_PARTICLES | frozenset(
    "為樣如何些個要會能可以有把被讓從對於一該還又得地著過之其而且但問为对会个样让从该还过时问")

# Two-character words that frame a Chinese question (when, after, how many, the difference,
# one's own ...) rather than name its subject. BM25 keeps them (their IDF prices them); the
# refusal signals (`question_terms`) leave them out, since sharing one of them with a passage
# is no evidence that the passage is about the question.
CJK_SCAFFOLDING = frozenset(
    "時候 之後 之前 一直 一樣 不同 需要 比較 多少 問題 方法 處理 差別 差在 哪裡 為何 請問 到底 真的 還是 應該 "
    "怎樣 是否 能否 有沒 沒有 一下 一些 一個 一種 幾個 這樣 那樣 大概 通常 常常 一起 一定 自己 東西 事情 情況 "
    "出來 起來 下來".split())
_SCAFFOLDING = regex.compile("|".join(sorted(CJK_SCAFFOLDING)))

_CJK_CLASS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}"
_TOKENS = regex.compile(
    rf"(?P<cjk>[{_CJK_CLASS}]+)"
    rf"|(?P<word>[^\W_{_CJK_CLASS}]+(?:['\u2019][^\W_{_CJK_CLASS}]+)*)"
)


def s_stem(word: str) -> str:
    """Harman's S-stemmer: English plurals to the singular, nothing else."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word


@dataclass(frozen=True)
class Analyzer:
    """Text to index terms (see the module's description)."""

    stopwords: frozenset[str] = ENGLISH_STOPWORDS
    stem: Callable[[str], str] | None = s_stem
    cjk_unigrams: bool = True
    cjk_bigrams: bool = True
    cjk_particles: frozenset[str] = CJK_PARTICLES
    cjk_function_chars: frozenset[str] = CJK_FUNCTION_CHARS

    def __call__(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text).casefold()
        tokens: list[str] = []
        for match in _TOKENS.finditer(text):
            run = match.group("cjk")
            if run is not None:
                function, particles = self.cjk_function_chars, self.cjk_particles
                if self.cjk_unigrams or len(run) == 1:
                    tokens.extend(c for c in run if c not in function)
                if self.cjk_bigrams:
                    for a, b in zip(run, run[1:]):
                        if a not in particles and b not in particles and (a not in function or b not in function):
                            tokens.append(a + b)
                continue
            word = match.group("word")
            if word.endswith(("'s", "\u2019s")):
                word = word[:-2]
            word = word.replace("'", "").replace("\u2019", "")
            if not word or word in self.stopwords:
                continue
            tokens.append(self.stem(word) if self.stem is not None else word)
        return tokens


DEFAULT_ANALYZER = Analyzer()


@dataclass
class BM25Index:
    """An inverted index of chunks scored by Okapi BM25 (see the module's description)."""

    k1: float = 1.2
    b: float = 0.75
    idf_variant: str = "lucene"  # or "okapi" (rank-bm25's BM25Okapi)
    epsilon: float = 0.25  # "okapi": negative IDFs become epsilon * mean IDF
    analyzer: Callable[[str], list[str]] = field(default=DEFAULT_ANALYZER, repr=False)
    chunks: list[Chunk] = field(default_factory=list, repr=False)
    build_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.k1 < 0 or not 0.0 <= self.b <= 1.0:
            raise LmforgeError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")
        if self.idf_variant not in ("lucene", "okapi"):
            raise LmforgeError(f"unknown BM25 IDF variant {self.idf_variant!r}: use 'lucene' or 'okapi'")
        self.avgdl = 1.0
        self._vocabulary: dict[str, int] = {}
        self._offsets = self._docs = self._tf = self._idf = self._norm = np.zeros(0)

    @classmethod
    def build(cls, chunks: Iterable[Chunk], progress: Callable[[int], None] | None = None,
              **options: Any) -> BM25Index:
        """An index over `chunks` (their `search_text()`); `options` are the dataclass fields."""
        index = cls(**options)
        chunks = list(chunks)
        start = time.perf_counter()
        tokens = []
        for n, chunk in enumerate(chunks, 1):
            tokens.append(index.analyzer(chunk.search_text()))
            if progress is not None and n % 256 == 0:
                progress(n)
        index._index(chunks, tokens)
        index.build_seconds = time.perf_counter() - start
        if progress is not None:
            progress(len(chunks))
        return index

    @classmethod
    def from_tokens(cls, chunks: Sequence[Chunk], tokens: Sequence[Sequence[str]], **options: Any) -> BM25Index:
        """An index over chunks whose terms were produced elsewhere (one token list per chunk)."""
        if len(chunks) != len(tokens):
            raise LmforgeError(f"{len(tokens)} token lists for {len(chunks)} chunks")
        index = cls(**options)
        index._index(list(chunks), tokens)
        return index

    def _index(self, chunks: list[Chunk], tokens: Sequence[Sequence[str]]) -> None:
        # Postings as one CSR-like layout: every (term, chunk, tf) triple sorted by term, and
        # for each term id the offset of its run; a term's postings are one slice, no copies.
        self.chunks = chunks
        n = len(chunks)
        vocabulary: dict[str, int] = {}
        term_ids: list[int] = []
        tfs: list[int] = []
        distinct = np.zeros(n, dtype=np.int64)
        for doc, terms in enumerate(tokens):
            counts = Counter(terms)
            for term in counts:
                if term not in vocabulary:
                    vocabulary[term] = len(vocabulary)
            term_ids.extend(map(vocabulary.__getitem__, counts))
            tfs.extend(counts.values())
            distinct[doc] = len(counts)
        ids = np.asarray(term_ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")  # stable: chunk order within each term
        self._docs = np.repeat(np.arange(n, dtype=np.int64), distinct)[order]
        self._tf = np.asarray(tfs, dtype=np.float64)[order]
        df = np.bincount(ids, minlength=len(vocabulary))
        self._offsets = np.concatenate(([0], np.cumsum(df)))
        self._vocabulary = vocabulary
        lengths = np.asarray([len(t) for t in tokens], dtype=np.float64)
        self.avgdl = float(lengths.mean()) if n and lengths.sum() else 1.0
        # The length normalization k1 * (1 - b + b |d| / avgdl) of every chunk, computed once.
        self._norm = self.k1 * (1.0 - self.b + self.b * lengths / self.avgdl)
        self._idf = self._idf_values(df.astype(np.float64), n)

    @property
    def idf(self) -> dict[str, float]:
        """Each indexed term's IDF (built on demand, for inspection)."""
        return dict(zip(self._vocabulary, self._idf.tolist()))

    def _idf_values(self, df: Any, n: int) -> Any:
        if self.idf_variant == "lucene":
            return np.log1p((n - df + 0.5) / (df + 0.5))
        idf = np.log(n - df + 0.5) - np.log(df + 0.5)
        floor = self.epsilon * float(idf.mean()) if idf.size else 0.0
        return np.where(idf < 0, floor, idf)

    def unseen_idf(self) -> float:
        """The IDF a term no chunk holds would have: the rarest a term can be in this collection."""
        return float(self._idf_values(np.zeros(1), len(self))[0])

    def _posting(self, term: str) -> tuple[Any, Any, float] | None:
        """(chunk indices, term frequencies, idf) of a term, or None when no chunk has it."""
        tid = self._vocabulary.get(term)
        if tid is None:
            return None
        a, b = self._offsets[tid], self._offsets[tid + 1]
        return self._docs[a:b], self._tf[a:b], float(self._idf[tid])

    def __len__(self) -> int:
        return len(self.chunks)

    def scores(self, query: str | Sequence[str]) -> Any:
        """The BM25 score of every chunk for `query` (a string, or its terms), as a NumPy array."""
        return self._scores(self.analyzer(query) if isinstance(query, str) else query)[0]

    def _scores(self, terms: Sequence[str]) -> tuple[Any, Any]:
        """(score of every chunk, whether it shares a term with the query)."""
        out = np.zeros(len(self.chunks), dtype=np.float64)
        matched = np.zeros(len(self.chunks), dtype=bool)
        for term in terms:
            posting = self._posting(term)
            if posting is None:
                continue
            ids, tf, idf = posting
            out[ids] += idf * tf * (self.k1 + 1.0) / (tf + self._norm[ids])
            matched[ids] = True
        return out, matched

    def search(self, query: str, k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """The `k` best chunks that share a term with `query` and pass `filters`.

        Hits carry `ranks={"bm25": place}` (1-based); equal scores keep index order.
        """
        return self.search_terms(self.analyzer(query), k, filters)

    def search_terms(self, terms: Sequence[str], k: int = 10, filters: Filters | None = None) -> list[Hit]:
        """`search` for a query already analyzed into terms."""
        if k <= 0 or not self.chunks:
            return []
        keep = make_filter(filters)
        all_scores, matched = self._scores(terms)
        candidates = np.flatnonzero(matched)
        if filters:
            candidates = np.asarray([i for i in candidates if keep(self.chunks[i])], dtype=np.int64)
        if not candidates.size:
            return []
        scores = all_scores[candidates]
        order = np.lexsort((candidates, -scores))[:k]  # score descending, then index ascending
        return [Hit(chunk=self.chunks[int(candidates[i])], score=float(scores[i]), ranks={"bm25": place})
                for place, i in enumerate(order, 1)]


@dataclass(frozen=True)
class QuestionTerms:
    """What the refusal signals read of a question (see `question_terms`)."""

    content: tuple[str, ...]  # distinct words and CJK bigrams that can name a subject
    han: tuple[str, ...]  # distinct Han characters outside the function characters
    latin: tuple[str, ...]  # distinct analyzed Latin-script words of two letters or more


def question_terms(text: str, analyzer: Analyzer = DEFAULT_ANALYZER) -> QuestionTerms:
    """The content terms of a question, for deciding whether a collection can answer it.

    Unlike the analyzer's output, CJK unigrams are left out (single characters match by
    chance: an English collection's few Chinese key terms share some character with almost
    any Chinese question), and question scaffolding (`CJK_SCAFFOLDING`) is cut out of the text
    first, so that neither it nor the bigrams across its edges count (時候需要 gives none).
    Latin words are analyzed as for indexing (stopwords out, stemmed).
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    particles, function = analyzer.cjk_particles, analyzer.cjk_function_chars
    content: list[str] = []
    han: list[str] = []
    latin: list[str] = []
    for match in _TOKENS.finditer(text):
        run = match.group("cjk")
        if run is None:
            words = analyzer(match.group("word"))
            content.extend(words)
            latin.extend(w for w in words if len(w) >= 2 and w.isascii() and w.isalpha())
            continue
        han.extend(c for c in run if c not in function and regex.match(r"\p{Han}", c))
        for piece in _SCAFFOLDING.split(run):  # a scaffolding word splits the run like punctuation
            for a, b in zip(piece, piece[1:]):
                if a not in particles and b not in particles and (a not in function or b not in function):
                    content.append(a + b)
    return QuestionTerms(tuple(dict.fromkeys(content)), tuple(dict.fromkeys(han)), tuple(dict.fromkeys(latin)))
