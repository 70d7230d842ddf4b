"""Unigram language-model tokenization (T3), SentencePiece style.

The model: every piece ``x`` of the vocabulary has a probability ``p(x)``, pieces are
drawn independently, and a word's segmentation ``x1 .. xk`` has probability
``p(x1) ... p(xk)``. Encoding picks the most probable segmentation with the Viterbi
algorithm over the lattice of all vocabulary pieces that match the word. Unlike BPE, the
model scores every alternative segmentation, which is what makes subword sampling and
the pruning below possible.

Training works top-down, the opposite of BPE:

1. **Seed** a large vocabulary: every character, plus the most frequent substrings of the
   words (weighted by frequency x length), up to ``max_piece_length`` characters.
2. **EM**: the E-step runs forward-backward over each word's lattice to get the expected
   number of times each piece is used; the M-step sets ``p(x)`` proportional to that.
   Pieces whose expected count falls below one half are dropped.
3. **Prune**: for each piece, estimate how much the corpus log-likelihood would drop if
   it were removed (its uses would be replaced by its own best segmentation into other
   pieces) and keep the ``shrinking_factor`` share that matter most. Characters are
   never pruned, so every word stays encodable.
4. Repeat 2-3 until the vocabulary is a little above the target, then run EM once more
   and keep the ``vocab_size`` most probable pieces.

Words are the Metaspace pre-tokens (``▁`` marks a preceding space), as in SentencePiece.
Characters that were not in the training data get the unknown token when encoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np

from lmforge.tokenizer.bpe import PieceCache

K_UNK_PENALTY = 10.0  # the unknown token scores this much below the rarest piece


class _FlatLattice:
    """The lattices of many words at once, as flat NumPy arrays, built once per training.

    Node ``offset[w] + i`` is position ``i`` of word ``w``; an edge is a seed piece that
    spans positions ``start..end`` of a word. Pieces only ever leave the vocabulary during
    training, so the seed lattice stays valid: each pass masks the edges of pruned pieces.
    Forward, backward and Viterbi passes walk the positions in order and handle the same
    position of *all* words with one vectorized step, which replaces millions of Python
    operations by a few hundred NumPy calls.
    """

    def __init__(self, words: Sequence[str], piece_ids: Mapping[str, int], max_len: int,
                 whole_from: int) -> None:
        lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        self.offset = np.concatenate([[0], np.cumsum(lengths + 1)])[:-1]
        self.first = self.offset
        self.last = self.offset + lengths
        self.n_nodes = int(lengths.sum() + len(words))
        self.lengths = lengths
        e_word, e_start, e_end, e_pid = [], [], [], []
        get = piece_ids.get
        # Every prefix of a piece: a substring that is not one cannot grow into a piece.
        prefixes = {p[:k] for p in piece_ids for k in range(1, len(p) + 1)}
        for w, word in enumerate(words):
            n = len(word)
            for i in range(n):
                for j in range(i + 1, min(n, i + max_len) + 1):
                    sub = word[i:j]
                    if sub not in prefixes:
                        break
                    pid = get(sub)
                    if pid is not None:
                        e_word.append(w)
                        e_start.append(i)
                        e_end.append(j)
                        e_pid.append(pid)
        self.word = np.asarray(e_word, dtype=np.int64)
        self.start = np.asarray(e_start, dtype=np.int64)
        self.end = np.asarray(e_end, dtype=np.int64)
        self.pid = np.asarray(e_pid, dtype=np.int64)
        # Edges of the pseudo-words (pieces segmented to find their alternatives) that
        # span the whole piece: excluded when looking for the best split *without* it.
        self.whole = (self.word >= whole_from) & (self.start == 0) & (self.end == lengths[self.word])
        self._index()

    def _index(self) -> None:
        self.start_node = self.offset[self.word] + self.start
        self.end_node = self.offset[self.word] + self.end
        self.by_end = self._groups(self.end)
        self.by_start = self._groups(self.start)[::-1]

    def compact(self, active_pieces: np.ndarray) -> None:
        """Drop the edges of pieces that left the vocabulary (later passes get cheaper)."""
        keep = active_pieces[self.pid]
        if keep.all():
            return
        for name in ("word", "start", "end", "pid", "whole"):
            setattr(self, name, getattr(self, name)[keep])
        self._index()

    @staticmethod
    def _groups(positions: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(positions, kind="stable")
        bounds = np.searchsorted(positions[order], np.arange(positions.max(initial=0) + 2))
        return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def _reduce(self, target: np.ndarray, nodes: np.ndarray, vals: np.ndarray, scratch: np.ndarray,
                acc: np.ndarray) -> None:
        """target[node] = logsumexp of vals per node (scratch/acc are reset afterwards)."""
        np.maximum.at(scratch, nodes, vals)
        top = scratch[nodes]
        finite = np.isfinite(top)
        np.add.at(acc, nodes[finite], np.exp(vals[finite] - top[finite]))
        with np.errstate(divide="ignore"):
            target[nodes] = np.where(finite, top + np.log(np.maximum(acc[nodes], 1e-300)), -np.inf)
        scratch[nodes] = -np.inf
        acc[nodes] = 0.0

    def forward_backward(self, edge_logp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        alpha = np.full(self.n_nodes, -np.inf)
        alpha[self.first] = 0.0
        beta = np.full(self.n_nodes, -np.inf)
        beta[self.last] = 0.0
        scratch = np.full(self.n_nodes, -np.inf)
        acc = np.zeros(self.n_nodes)
        for idx in self.by_end:
            self._reduce(alpha, self.end_node[idx], alpha[self.start_node[idx]] + edge_logp[idx], scratch, acc)
        for idx in self.by_start:
            self._reduce(beta, self.start_node[idx], beta[self.end_node[idx]] + edge_logp[idx], scratch, acc)
        return alpha, beta

    def viterbi_edges(self, edge_logp: np.ndarray) -> np.ndarray:
        """best_edge[node]: the last edge of the best path to each node (-1: unreachable)."""
        best = np.full(self.n_nodes, -np.inf)
        best[self.first] = 0.0
        best_edge = np.full(self.n_nodes, -1, dtype=np.int64)
        for idx in self.by_end:
            nodes = self.end_node[idx]
            vals = best[self.start_node[idx]] + edge_logp[idx]
            np.maximum.at(best, nodes, vals)
            winners = idx[(vals == best[nodes]) & np.isfinite(vals)]
            best_edge[self.end_node[winners][::-1]] = winners[::-1]  # the first winner of each node
        return best_edge

    def backtrack(self, best_edge: np.ndarray, words: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per step, (word, piece id) pairs along the best paths of ``words`` (end to start)."""
        node = self.last[words]
        alive = best_edge[node] >= 0
        words, node = words[alive], node[alive]
        steps = []
        while words.size:
            edge = best_edge[node]
            steps.append((words, self.pid[edge]))
            node = self.start_node[edge]
            more = node != self.first[words]
            words, node = words[more], node[more]
        return steps


def _seed_pieces(words: Sequence[str], counts: Sequence[int], max_len: int, seed_size: int,
                 required: set[str]) -> dict[str, float]:
    """Characters plus the substrings with the largest frequency x length (log-probs)."""
    freq: dict[str, int] = {}
    for word, count in zip(words, counts):
        n = len(word)
        for i in range(n):
            if i and word[i] == "▁":
                continue  # "▁" only ever starts a piece
            for j in range(i + 2, min(n, i + max_len) + 1):
                if word[j - 1] == "▁":
                    break
                piece = word[i:j]
                freq[piece] = freq.get(piece, 0) + count
    candidates = sorted((p for p, f in freq.items() if f >= 2), key=lambda p: (-freq[p] * len(p), p))
    chosen = candidates[:max(0, seed_size - len(required))]
    char_freq: dict[str, int] = {}
    for word, count in zip(words, counts):
        for ch in word:
            char_freq[ch] = char_freq.get(ch, 0) + count
    pool = {p: float(freq[p]) for p in chosen}
    pool.update({ch: float(char_freq.get(ch, 1)) for ch in required})
    log_total = math.log(sum(pool.values()))
    return {p: math.log(f) - log_total for p, f in pool.items()}


def train_unigram(
    word_counts: Mapping[str, int],
    vocab_size: int,
    special_tokens: Sequence[str] = ("<unk>",),
    max_piece_length: int = 16,
    seed_size: int | None = None,
    shrinking_factor: float = 0.75,
    em_iterations: int = 2,
    character_coverage: float = 0.9995,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[str, float]]:
    """The vocabulary as (piece, log probability): special tokens (score 0) first, then
    pieces by decreasing probability."""
    words = sorted(word_counts)
    counts = np.asarray([word_counts[w] for w in words], dtype=np.float64)
    char_freq: dict[str, int] = {}
    for word, count in word_counts.items():
        for ch in word:
            char_freq[ch] = char_freq.get(ch, 0) + count
    # Characters covering `character_coverage` of all character occurrences are required;
    # the rarest remainder is left to the unknown token (as SentencePiece does).
    total_chars = sum(char_freq.values())
    required: set[str] = set()
    covered = 0
    for ch in sorted(char_freq, key=lambda c: (-char_freq[c], c)):
        if covered / max(1, total_chars) >= character_coverage and ch != "▁":
            break
        required.add(ch)
        covered += char_freq[ch]
    target = vocab_size - len(special_tokens)
    if target < len(required):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the {len(required)} characters of the corpus "
                         f"plus {len(special_tokens)} special tokens")

    if seed_size is None:
        seed_size = min(200_000, max(20_000, 8 * vocab_size))
    seed = _seed_pieces(words, list(counts), max_piece_length, seed_size, required)
    pieces = sorted(seed, key=lambda p: (-seed[p], p))
    piece_ids = {p: i for i, p in enumerate(pieces)}
    n_pieces = len(pieces)
    is_required = np.asarray([p in required for p in pieces])
    multi = [p for p in pieces if len(p) > 1]
    # Corpus words first, then one pseudo-word per multi-character piece.
    lattice = _FlatLattice(list(words) + multi, piece_ids, max_piece_length, whole_from=len(words))
    n_words = len(words)
    weights = np.concatenate([counts, np.zeros(len(multi))])
    pseudo_piece = np.asarray([piece_ids[p] for p in multi], dtype=np.int64)
    corpus_words = np.arange(n_words)
    pseudo_words = np.arange(n_words, n_words + len(multi))

    logp = np.asarray([seed[p] for p in pieces])
    active = np.ones(n_pieces, dtype=bool)

    def em_step() -> np.ndarray:
        edge_logp = np.where(active[lattice.pid], logp[lattice.pid], -np.inf)
        alpha, beta = lattice.forward_backward(edge_logp)
        z = alpha[lattice.last]
        usable = np.isfinite(z) & (weights > 0)
        w_edge = lattice.word
        ok = usable[w_edge] & np.isfinite(edge_logp)
        post = np.zeros(len(w_edge))
        post[ok] = np.exp(alpha[lattice.start_node[ok]] + edge_logp[ok] + beta[lattice.end_node[ok]] - z[w_edge[ok]])
        return np.bincount(lattice.pid, weights=post * weights[w_edge], minlength=n_pieces)

    def m_step(expected: np.ndarray) -> None:
        nonlocal logp
        active[:] = active & ((expected >= 0.5) | is_required)
        kept = np.where(active, np.maximum(expected, 1e-3), 0.0)
        with np.errstate(divide="ignore"):
            logp = np.where(active, np.log(kept) - math.log(kept.sum()), -np.inf)

    def prune(goal: int) -> None:
        edge_logp = np.where(active[lattice.pid] & ~lattice.whole, logp[lattice.pid], -np.inf)
        best_edge = lattice.viterbi_edges(edge_logp)
        freq = np.zeros(n_pieces)
        for w, pid in lattice.backtrack(best_edge, corpus_words):
            np.add.at(freq, pid, counts[w])
        total = freq.sum() or 1.0
        f_piece = freq[pseudo_piece]
        sum_log = np.zeros(len(multi))
        n_alt = np.zeros(len(multi))
        for w, pid in lattice.backtrack(best_edge, pseudo_words):
            k = w - n_words
            with np.errstate(divide="ignore"):
                sum_log[k] += np.log(freq[pid] + f_piece[k])
            n_alt[k] += 1
        loss = np.zeros(n_pieces)
        has = (f_piece > 0) & (n_alt > 0)
        new_total = total + f_piece * (n_alt - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp_piece = np.log(f_piece) - math.log(total)
            logp_alt = sum_log - n_alt * np.log(new_total)
            loss[pseudo_piece] = np.where(has, f_piece / total * (logp_piece - logp_alt), 0.0)
        candidates = np.flatnonzero(active & ~is_required)
        keep_n = max(0, goal - int((active & is_required).sum()))
        order = candidates[np.lexsort((candidates, -loss[candidates]))]
        active[order[keep_n:]] = False

    while True:
        for _ in range(em_iterations):
            m_step(em_step())
            lattice.compact(active)
        size = int(active.sum())
        if progress is not None:
            progress(min(target, size), size)
        if size <= int(target * 1.1):
            break
        prune(max(int(target * 1.1), int(size * shrinking_factor)))
        lattice.compact(active)
    m_step(em_step())
    alive = np.flatnonzero(active)
    ranked = sorted(alive, key=lambda i: (not is_required[i], -logp[i], pieces[i]))[:target]
    ranked.sort(key=lambda i: (-logp[i], pieces[i]))
    # Scores are rounded to 12 decimals: JSON readers that parse floats by the fast
    # "integer significand / power of ten" path (serde_json in `tokenizers` does) then get
    # exactly the same doubles as Python, so exact ties in Viterbi break the same way.
    return [(t, 0.0) for t in special_tokens] + [(pieces[i], round(float(logp[i]), 12)) for i in ranked]


class UnigramModel:
    """Viterbi encoding over a Unigram vocabulary, matching Hugging Face ``tokenizers``.

    Tie-breaking and unknown handling follow the reference exactly: positions are
    visited left to right and a path replaces an earlier one only if strictly better;
    a character with no one-character piece gets the unknown token at
    ``min_score - 10``; consecutive unknown characters fuse into one unknown token.
    """

    byte_level = False

    def __init__(self, vocab: Sequence[tuple[str, float]], unk_id: int | None = 0, byte_fallback: bool = False) -> None:
        self.pieces = [(str(p), float(s)) for p, s in vocab]
        self.vocab = {p: i for i, (p, _) in enumerate(self.pieces)}
        self.id_to_token = {i: p for i, (p, _) in enumerate(self.pieces)}
        self.scores = [s for _, s in self.pieces]
        self.unk_id, self.byte_fallback = unk_id, byte_fallback
        self.min_score = min(self.scores, default=0.0)
        self.max_len = max((len(p) for p, _ in self.pieces), default=1)
        self._cache = PieceCache(self.encode_word)

    def segment(self, word: str) -> list[str]:
        """The best segmentation as strings (unknown stretches fused into one string)."""
        n = len(word)
        if not n:
            return []
        vocab, scores = self.vocab, self.scores
        unk_score = self.min_score - K_UNK_PENALTY
        best = [0.0] * (n + 1)
        start_of: list[int | None] = [None] * (n + 1)
        id_of = [0] * (n + 1)
        for i in range(n):
            here = best[i]
            has_single = False
            for j in range(i + 1, min(n, i + self.max_len) + 1):
                tid = vocab.get(word[i:j])
                if tid is None:
                    continue
                candidate = scores[tid] + here
                if start_of[j] is None or candidate > best[j]:
                    best[j], start_of[j], id_of[j] = candidate, i, tid
                if j == i + 1:
                    has_single = True
            if not has_single:
                if self.unk_id is None:
                    raise ValueError(f"cannot encode {word[i]!r}: no piece and no unknown token")
                candidate = unk_score + here
                if start_of[i + 1] is None or candidate > best[i + 1]:
                    best[i + 1], start_of[i + 1], id_of[i + 1] = candidate, i, self.unk_id
        out: list[str] = []
        unknown: list[str] = []
        j = n
        while j > 0:
            i = start_of[j]
            assert i is not None
            if self.unk_id is not None and id_of[j] == self.unk_id:
                unknown.append(word[i:j])
            else:
                if unknown:
                    out.append("".join(reversed(unknown)))
                    unknown = []
                out.append(word[i:j])
            j = i
        if unknown:
            out.append("".join(reversed(unknown)))
        return out[::-1]

    def encode_word(self, word: str) -> list[int]:
        ids: list[int] = []
        for piece in self.segment(word):
            tid = self.vocab.get(piece)
            if tid is None and self.byte_fallback:
                byte_ids = [self.vocab.get(f"<0x{b:02X}>") for b in piece.encode("utf-8")]
                if None not in byte_ids:
                    ids += byte_ids  # type: ignore[arg-type]
                    continue
            ids.append(tid if tid is not None else self.unk_id)  # type: ignore[arg-type]
        return ids

    def encode_pieces(self, pieces: Iterable[str], out: list[int]) -> None:
        out += chain.from_iterable(map(self._cache.__getitem__, pieces))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Unigram", "unk_id": self.unk_id, "vocab": [[p, s] for p, s in self.pieces],
                "byte_fallback": self.byte_fallback}
