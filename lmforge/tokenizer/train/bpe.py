"""Byte-level BPE training (T1): merge the most frequent adjacent pair, again and again.

Start from the 256 byte symbols (so nothing is ever out of vocabulary), with every
pre-token ("word") of the corpus spelled as bytes and counted once per distinct word.
Each step finds the adjacent pair of symbols that occurs most often across the corpus
(weighted by word counts), adds the pair's concatenation to the vocabulary, records the
merge, and rewrites every word that contains the pair. Merges never cross pre-token
boundaries, which is why the pre-tokenization regex is part of the vocabulary.

Recounting all pairs after every merge would cost a pass over the corpus per merge.
Instead the trainer keeps

* ``pair_counts``: pair -> weighted count, updated by the *changes* each merge causes
  (merging ``a b`` inside ``x a b y`` removes the pairs ``x a`` and ``b y`` and creates
  ``x ab`` and ``ab y``);
* ``where``: pair -> the words containing it, so a merge only visits those words;
* a heap of (count, pair) entries with lazy invalidation: an entry whose count is out of
  date is re-pushed with the current count when it reaches the top, instead of being
  searched for and updated in place.

Ties between equally frequent pairs go to the pair with the smaller token ids (ids follow
the vocabulary order: special tokens, then the byte alphabet sorted by code point, then
merged tokens in creation order). With that rule the merges are exactly those of
Hugging Face ``tokenizers``' ``BpeTrainer`` on the same words, which the tests check.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass
class BpeResult:
    vocab: dict[str, int]  # token -> id (special tokens first, then alphabet, then merges)
    merges: list[tuple[str, str]]  # in the order learned (= priority when encoding)


class VocabularyBuilder:
    """Tokens in the order they are first added; a token's id is its position."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self.id_to_token: list[str] = []
        self.token_to_id: dict[str, int] = {}
        for token in tokens:
            self.add(token)

    def add(self, token: str) -> int:
        """The token's id, adding it at the end if it is new."""
        if token not in self.token_to_id:
            self.token_to_id[token] = len(self.id_to_token)
            self.id_to_token.append(token)
        return self.token_to_id[token]


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[tuple[tuple[int, int], int]]:
    """Merge every non-overlapping ``a b`` left to right, in place; returns pair-count changes.

    The merged pair itself is not reported (its count is stale from then on, and it is
    never chosen again because no word holds it any more).
    """
    changes: list[tuple[tuple[int, int], int]] = []
    i = 0
    index = word.index
    while True:
        try:
            i = index(a, i)
        except ValueError:
            return changes
        if i + 1 < len(word) and word[i + 1] == b:
            if i > 0:
                prev = word[i - 1]
                changes.append(((prev, a), -1))
                changes.append(((prev, new), 1))
            word[i:i + 2] = [new]
            if i + 1 < len(word):
                nxt = word[i + 1]
                changes.append(((b, nxt), -1))
                changes.append(((new, nxt), 1))
        i += 1


def train_bpe(
    word_counts: Mapping[str, int],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    initial_alphabet: Sequence[str] = (),
    min_frequency: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> BpeResult:
    """Learn merges from ``word_counts`` (words already spelled in the symbol alphabet).

    ``initial_alphabet`` symbols are always in the vocabulary (for byte-level BPE: all 256
    byte symbols); characters of the words outside it are added too. Training stops at
    ``vocab_size`` tokens or when no pair occurs at least ``max(1, min_frequency)`` times.
    ``progress(done, total)`` is called every few hundred merges.
    """
    vocab = VocabularyBuilder(special_tokens)
    add, id_to_token, token_to_id = vocab.add, vocab.id_to_token, vocab.token_to_id
    alphabet = set(initial_alphabet)
    for word in word_counts:
        alphabet.update(word)
    for ch in sorted(alphabet, key=ord):
        add(ch)

    words: list[list[int]] = []
    counts: list[int] = []
    for word, count in word_counts.items():
        words.append([token_to_id[ch] for ch in word])
        counts.append(count)

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for i, word in enumerate(words):
        c = counts[i]
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + c
            bucket = where.get(pair)
            if bucket is None:
                where[pair] = {i}
            else:
                bucket.add(i)

    # Heap entries: (-count, left, right, entry id); the words to visit live in `positions`.
    heap: list[tuple[int, int, int, int]] = []
    positions: dict[int, set[int]] = {}
    for n, (pair, pos) in enumerate(where.items()):
        heap.append((-pair_counts[pair], pair[0], pair[1], n))
        positions[n] = pos
    next_entry = len(heap)
    heapq.heapify(heap)
    del where

    merges: list[tuple[str, str]] = []
    floor = max(1, min_frequency)
    total_merges = max(0, vocab_size - len(id_to_token))
    while len(token_to_id) < vocab_size and heap:
        neg, a, b, entry = heapq.heappop(heap)
        current = pair_counts[(a, b)]
        if -neg != current:
            heapq.heappush(heap, (-current, a, b, entry))
            continue
        if current < floor:
            break
        left, right = id_to_token[a], id_to_token[b]
        new = add(left + right)
        merges.append((left, right))

        updates: dict[tuple[int, int], set[int]] = {}
        for w in positions.pop(entry):
            c = counts[w]
            for pair, change in _merge_word(words[w], a, b, new):
                pair_counts[pair] = pair_counts.get(pair, 0) + change * c
                if change > 0:
                    bucket = updates.get(pair)
                    if bucket is None:
                        updates[pair] = {w}
                    else:
                        bucket.add(w)
        for pair, pos in updates.items():
            count = pair_counts[pair]
            if count > 0:
                heapq.heappush(heap, (-count, pair[0], pair[1], next_entry))
                positions[next_entry] = pos
                next_entry += 1
        if progress is not None and len(merges) % 200 == 0:
            progress(len(merges), total_merges)
    if progress is not None:
        progress(len(merges), total_merges)
    return BpeResult(dict(token_to_id), merges)
