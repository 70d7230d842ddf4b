"""WordPiece (T2): likelihood-scored merges for training, greedy longest match for encoding.

Training looks like BPE, with two differences:

* Symbols inside a word carry the continuation prefix: ``playing`` starts as
  ``p ##l ##a ##y ##i ##n ##g``, so a piece at the start of a word and the same letters in
  the middle are different tokens (``un`` vs ``##un``).
* The pair to merge is not the most frequent one but the one with the highest score
  ``freq(ab) / (freq(a) * freq(b))``: how much more often ``a`` and ``b`` appear together
  than their own frequencies predict. Merging it raises the corpus likelihood of a
  unigram model over the symbols the most, per merge. Frequent symbols such as ``##e``
  are merged late, because they are common everywhere; ``min_frequency`` keeps pairs seen
  once or twice (whose score is inflated by tiny denominators) out.

Every score depends on the current counts of both symbols, so a merge can change the
score of many pairs at once. The trainer keeps pair and symbol counts in NumPy arrays and
recomputes all scores with one vectorized expression per merge; only the words that
contain the merged pair are rewritten.

Encoding does not replay merges at all: BERT's WordPiece takes, at each position of a
word, the longest vocabulary entry that matches (``##``-prefixed after the first piece);
if some position has no match, the whole word becomes ``[UNK]``. :class:`WordPieceModel`
implements that, identically to Hugging Face ``tokenizers`` (the tests compare ids).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np

from lmforge.tokenizer.bpe import PieceCache
from lmforge.tokenizer.train.bpe import VocabularyBuilder, _merge_word


def train_wordpiece(
    word_counts: Mapping[str, int],
    vocab_size: int,
    special_tokens: Sequence[str] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    prefix: str = "##",
    min_frequency: int = 2,
    limit_alphabet: int | None = 1000,
    score: str = "likelihood",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """The vocabulary (token -> id): special tokens, the alphabet, then merged tokens in order.

    ``score="ratio"`` ranks pairs by freq(ab) / (freq(a) freq(b)); ``score="likelihood"``
    by the exact gain in corpus log-likelihood of a unigram model over the symbols when
    every ``a b`` becomes ``ab`` (the ratio's logarithm weighted by freq(ab), plus the
    effect of the shorter corpus), which favours frequent pairs over rare ones.
    """
    if score not in ("ratio", "likelihood"):
        raise ValueError(f"unknown WordPiece score {score!r}: use ratio or likelihood")
    vocab = VocabularyBuilder(special_tokens)
    add, id_to_token, token_to_id = vocab.add, vocab.id_to_token, vocab.token_to_id

    # Alphabet: the most frequent characters (by occurrences); words with others are left
    # out of training (at encoding time they become [UNK] anyway).
    char_counts: dict[str, int] = {}
    for word, count in word_counts.items():
        for ch in word:
            char_counts[ch] = char_counts.get(ch, 0) + count
    chars = sorted(char_counts, key=lambda ch: (-char_counts[ch], ord(ch)))
    if limit_alphabet is not None:
        chars = chars[:limit_alphabet]
    allowed = set(chars)
    words: list[list[int]] = []
    counts: list[int] = []
    initial: set[str] = set()
    for word in sorted(word_counts):  # sorted: ids and tie-breaks independent of input order
        if not word or not set(word) <= allowed:
            continue
        symbols = [word[0]] + [prefix + ch for ch in word[1:]]
        initial.update(symbols)
        words.append(symbols)  # type: ignore[arg-type]
        counts.append(word_counts[word])
    for symbol in sorted(initial, key=lambda s: (s.startswith(prefix), s)):
        add(symbol)
    words_ids: list[list[int]] = [[token_to_id[s] for s in w] for w in words]  # type: ignore[misc]

    capacity = max(1024, vocab_size * 2)
    symbol_counts = np.zeros(capacity, dtype=np.float64)
    for w, c in zip(words_ids, counts):
        for s in w:
            symbol_counts[s] += c

    pair_slot: dict[tuple[int, int], int] = {}
    lefts: list[int] = []
    rights: list[int] = []
    pair_counts_list: list[float] = []
    where: list[set[int]] = []
    for i, w in enumerate(words_ids):
        c = counts[i]
        for pair in zip(w, w[1:]):
            slot = pair_slot.get(pair)
            if slot is None:
                slot = pair_slot[pair] = len(lefts)
                lefts.append(pair[0])
                rights.append(pair[1])
                pair_counts_list.append(0.0)
                where.append(set())
            pair_counts_list[slot] += c
            where[slot].add(i)
    left_arr = np.asarray(lefts, dtype=np.int64)
    right_arr = np.asarray(rights, dtype=np.int64)
    pair_counts = np.asarray(pair_counts_list, dtype=np.float64)

    def slot_of(pair: tuple[int, int]) -> int:
        nonlocal left_arr, right_arr, pair_counts
        slot = pair_slot.get(pair)
        if slot is None:
            slot = pair_slot[pair] = len(where)
            where.append(set())
            if slot >= len(left_arr):
                grow = max(1024, len(left_arr))
                left_arr = np.concatenate([left_arr, np.zeros(grow, dtype=np.int64)])
                right_arr = np.concatenate([right_arr, np.zeros(grow, dtype=np.int64)])
                pair_counts = np.concatenate([pair_counts, np.zeros(grow)])
            left_arr[slot], right_arr[slot] = pair
        return slot

    used = len(where)
    total_merges = max(0, vocab_size - len(id_to_token))
    done = 0
    floor = max(1, min_frequency)
    while len(id_to_token) < vocab_size and used:
        counts_view = pair_counts[:used]
        fa, fb = symbol_counts[left_arr[:used]], symbol_counts[right_arr[:used]]
        with np.errstate(divide="ignore", invalid="ignore"):
            if score == "ratio":
                scores = counts_view / np.maximum(fa * fb, 1e-300)
            else:
                scores = _likelihood_gain(counts_view, fa, fb, left_arr[:used] == right_arr[:used],
                                          float(symbol_counts.sum()))
            scores = np.where(counts_view >= floor, scores, -np.inf)
        best = int(np.argmax(scores))
        if not np.isfinite(scores[best]) or (score == "ratio" and scores[best] <= 0):
            break
        a, b = int(left_arr[best]), int(right_arr[best])
        left, right = id_to_token[a], id_to_token[b]
        merged = left + (right[len(prefix):] if right.startswith(prefix) else right)
        new = add(merged)
        if new >= len(symbol_counts):
            symbol_counts = np.concatenate([symbol_counts, np.zeros(len(symbol_counts))])
        for w in list(where[best]):
            c = counts[w]
            word = words_ids[w]
            before = len(word)
            changes = _merge_word(word, a, b, new)
            merged_here = before - len(word)
            if not merged_here:
                continue
            symbol_counts[a] -= merged_here * c
            symbol_counts[b] -= merged_here * c
            symbol_counts[new] += merged_here * c
            pair_counts[best] -= merged_here * c
            for pair, change in changes:
                slot = slot_of(pair)
                pair_counts[slot] += change * c
                if change > 0:
                    where[slot].add(w)
        pair_counts[best] = 0.0  # overlapping leftovers ("a a a") are not worth a retry
        where[best].clear()
        used = len(where)
        done += 1
        if progress is not None and done % 200 == 0:
            progress(done, total_merges)
    if progress is not None:
        progress(done, total_merges)
    return dict(token_to_id)


def _xlogx(x: np.ndarray) -> np.ndarray:
    return np.where(x > 0, x * np.log(np.maximum(x, 1e-300)), 0.0)


def _likelihood_gain(fab: np.ndarray, fa: np.ndarray, fb: np.ndarray, same: np.ndarray, total: float) -> np.ndarray:
    """Change of sum_s f_s log(f_s / N) when all f_ab pairs merge (N shrinks by f_ab).

    With L = sum_s f_s log f_s - N log N, only the terms of a, b, ab and N change.
    """
    n_after = total - fab
    before = _xlogx(fa) + np.where(same, 0.0, _xlogx(fb)) - total * np.log(total)
    fa_after = fa - np.where(same, 2 * fab, fab)
    fb_after = np.where(same, 0.0, fb - fab)
    after = _xlogx(fab) + _xlogx(fa_after) + _xlogx(fb_after) - _xlogx(n_after)
    return after - before


class WordPieceModel:
    """Greedy longest-match-first encoding over a WordPiece vocabulary (BERT style).

    Has the small interface lmforge's ``Tokenizer`` expects of a model: ``vocab``,
    ``id_to_token``, ``encode_pieces`` and ``to_dict``.
    """

    byte_level = False

    def __init__(self, vocab: dict[str, int], unk_token: str = "[UNK]", prefix: str = "##",
                 max_input_chars_per_word: int = 100) -> None:
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.unk_token, self.prefix = unk_token, prefix
        self.max_input_chars_per_word = max_input_chars_per_word
        self.unk_id = vocab.get(unk_token)
        self.max_len = max((len(t) for t in vocab), default=1)
        self._cache = PieceCache(self.encode_word)

    def encode_word(self, word: str) -> list[int]:
        vocab = self.vocab
        if len(word) > self.max_input_chars_per_word:
            return self._unknown()
        whole = vocab.get(word)
        if whole is not None:
            return [whole]
        out: list[int] = []
        start, n = 0, len(word)
        while start < n:
            end = min(n, start + self.max_len)
            found = None
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return self._unknown()
            out.append(found)
            start = end
        return out

    def _unknown(self) -> list[int]:
        if self.unk_id is None:
            raise ValueError(f"the vocabulary has no unknown token {self.unk_token!r}")
        return [self.unk_id]

    def encode_pieces(self, pieces: Iterable[str], out: list[int]) -> None:
        out += chain.from_iterable(map(self._cache.__getitem__, pieces))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "WordPiece", "unk_token": self.unk_token, "continuing_subword_prefix": self.prefix,
                "max_input_chars_per_word": self.max_input_chars_per_word, "vocab": self.vocab}
