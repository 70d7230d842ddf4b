"""The BPE model: turn one pre-token into token ids by applying merges.

A pre-token starts as a list of symbols (one per character, or per byte for byte-level
vocabularies). Merging repeatedly joins the adjacent pair with the best priority (lowest
merge rank, or for SentencePiece-style GGUF vocabularies, highest token score) until no
pair can merge. Ties go to the leftmost pair, which is what both Hugging Face
``tokenizers`` and llama.cpp do.

Real text repeats its words constantly, so the result for each distinct pre-token is kept
in a dict: after warm-up almost every pre-token costs one dict lookup.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

from lmforge.tokenizer.bytelevel import text_to_symbols

# Pieces longer than this are not cached: a long piece (a whole SentencePiece paragraph)
# rarely repeats and would only grow the cache.
_MAX_CACHED_LEN = 256
_MAX_CACHE_ENTRIES = 1_000_000


class PieceCache(dict[str, list[int]]):
    """pre-token -> ids; a miss computes the ids (and stores them if the piece is short).

    Every model that encodes each pre-token on its own (BPE, WordPiece, Unigram) keeps one,
    so a warm cache makes a pre-token cost a dict lookup whatever the model.
    """

    def __init__(self, compute: Callable[[str], list[int]]) -> None:
        super().__init__()
        self.compute = compute

    def __missing__(self, piece: str) -> list[int]:
        ids = self.compute(piece)
        if len(piece) < _MAX_CACHED_LEN:
            if len(self) >= _MAX_CACHE_ENTRIES:
                self.clear()
            self[piece] = ids
        return ids


class BPE:
    """Vocabulary + merge priorities + the merge loop, with a per-piece cache.

    Args:
        vocab: token string -> id.
        merges: pairs of token strings, best first (rank = position), as in tokenizer.json.
        pair_priority: alternative to ``merges``: (left, right) -> priority, lower merges
            first. SentencePiece GGUF vocabularies use ``-score`` of the merged token here.
        byte_level: pieces arrive as raw text and are spelled in the byte alphabet first.
        byte_fallback: characters missing from the vocabulary become ``<0xNN>`` tokens.
        unk_token / fuse_unk: what a missing character becomes without byte fallback.
        ignore_merges: a piece that is itself a vocabulary token is emitted whole
            (Llama-3 style), even if the merges would split it.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Iterable[tuple[str, str]] = (),
        *,
        pair_priority: dict[tuple[str, str], float] | None = None,
        byte_level: bool = False,
        byte_fallback: bool = False,
        unk_token: str | None = None,
        fuse_unk: bool = False,
        ignore_merges: bool = False,
        continuing_subword_prefix: str | None = None,
        end_of_word_suffix: str | None = None,
        dropout: float | None = None,
    ) -> None:
        self.vocab = vocab
        self.id_to_token: dict[int, str] = {i: t for t, i in vocab.items()}
        self.merges: list[tuple[str, str]] = list(merges)
        self.byte_level = byte_level
        self.byte_fallback = byte_fallback
        self.unk_token = unk_token
        self.fuse_unk = fuse_unk
        self.ignore_merges = ignore_merges
        self.continuing_subword_prefix = continuing_subword_prefix
        self.end_of_word_suffix = end_of_word_suffix
        self.dropout = dropout  # kept for saving; encoding is always deterministic
        self.scored = pair_priority is not None

        # (left_id, right_id) -> (priority, merged_id): integer keys hash fast.
        self._pairs: dict[tuple[int, int], tuple[float, int]] = {}
        affix = (continuing_subword_prefix or "")
        if pair_priority is not None:
            items: Iterable[tuple[tuple[str, str], float]] = pair_priority.items()
        else:
            items = ((pair, rank) for rank, pair in enumerate(self.merges))
        for (left, right), priority in items:
            merged = left + right[len(affix):] if affix and right.startswith(affix) else left + right
            try:
                key = (vocab[left], vocab[right])
                self._pairs[key] = (priority, vocab[merged])
            except KeyError:
                continue  # a merge whose tokens are not all in the vocabulary can never apply
        self._byte_ids: list[int | None] = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
        self._cache = PieceCache(self._encode_uncached)

    # ------------------------------------------------------------------ encoding
    def encode_pieces(self, pieces: Iterable[str], out: list[int]) -> None:
        """Append the ids of every piece to ``out`` (the hot loop of encoding).

        ``map`` + ``chain`` keep the loop in C; only cache misses run Python code.
        """
        out += chain.from_iterable(map(self._cache.__getitem__, pieces))

    def encode_piece(self, piece: str) -> list[int]:
        """Ids of one pre-token (uncached; see :meth:`encode_pieces`)."""
        return self._encode_uncached(piece)

    def _encode_uncached(self, piece: str) -> list[int]:
        symbols = text_to_symbols(piece) if self.byte_level else piece
        vocab = self.vocab
        if self.ignore_merges:
            whole = vocab.get(symbols)
            if whole is not None:
                return [whole]
        ids = self._initial_symbols(symbols)
        if len(ids) < 2:
            return ids
        return self._merge(ids)

    def _initial_symbols(self, word: str) -> list[int]:
        """One id per character, with byte fallback / unknown-token handling."""
        vocab = self.vocab
        prefix, suffix = self.continuing_subword_prefix, self.end_of_word_suffix
        if prefix is None and suffix is None:
            ids = [vocab.get(c) for c in word]
            if None not in ids:
                return ids  # type: ignore[return-value]
        out: list[int] = []
        unk: int | None = None  # a pending (possibly fused) unknown token
        last = len(word) - 1
        for i, ch in enumerate(word):
            key = ch
            if i and prefix:
                key = prefix + key
            if i == last and suffix:
                key = key + suffix
            tid = vocab.get(key)
            if tid is not None:
                if unk is not None:
                    out.append(unk)
                    unk = None
                out.append(tid)
                continue
            if self.byte_fallback:
                byte_ids = [self._byte_ids[b] for b in key.encode("utf-8")]
                if None not in byte_ids:
                    # A pending unknown token stays pending here, as in `tokenizers`.
                    out += byte_ids  # type: ignore[arg-type]
                    continue
            if self.unk_token is not None:
                unk_id = vocab.get(self.unk_token)
                if unk_id is None:
                    continue
                if unk is not None and not self.fuse_unk:
                    out.append(unk)
                unk = unk_id
        if unk is not None:
            out.append(unk)
        return out

    def _merge(self, ids: list[int]) -> list[int]:
        """Apply merges best-first with a heap over a linked list of symbols.

        Entries are (priority, position, merged_id); a popped entry is stale when either side
        has changed since it was pushed, which the pair lookup detects.
        """
        pairs = self._pairs
        n = len(ids)
        if n == 2:  # the commonest case after single characters, worth a shortcut
            hit = pairs.get((ids[0], ids[1]))
            return [hit[1]] if hit is not None else ids
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            hit = pairs.get((ids[i], ids[i + 1]))
            if hit is not None:
                heap.append((hit[0], i, hit[1]))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, i, merged = pop(heap)
            j = nxt[i]
            if not alive[i] or j >= n:
                continue
            hit = pairs.get((ids[i], ids[j]))
            if hit is None or hit[1] != merged:
                continue
            ids[i] = merged
            alive[j] = False
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                hit = pairs.get((merged, ids[k]))
                if hit is not None:
                    push(heap, (hit[0], i, hit[1]))
            p = prv[i]
            if p >= 0:
                hit = pairs.get((ids[p], merged))
                if hit is not None:
                    push(heap, (hit[0], p, hit[1]))
        return [t for t, keep in zip(ids, alive) if keep]

    # ------------------------------------------------------------------ saving
    def merges_for_saving(self) -> list[tuple[str, str]]:
        """Merges in rank order; for score-based vocabularies, sorted by priority."""
        if not self.scored:
            return self.merges
        ordered = sorted(self._pairs.items(), key=lambda kv: (kv[1][0], kv[1][1], kv[0]))
        return [(self.id_to_token[a], self.id_to_token[b]) for (a, b), _ in ordered]

    def to_dict(self) -> dict[str, Any]:
        """The ``model`` section of tokenizer.json."""
        return {
            "type": "BPE",
            "dropout": self.dropout,
            "unk_token": self.unk_token,
            "continuing_subword_prefix": self.continuing_subword_prefix,
            "end_of_word_suffix": self.end_of_word_suffix,
            "fuse_unk": self.fuse_unk,
            "byte_fallback": self.byte_fallback,
            "ignore_merges": self.ignore_merges,
            "vocab": self.vocab,
            "merges": [list(m) for m in self.merges_for_saving()],
        }
