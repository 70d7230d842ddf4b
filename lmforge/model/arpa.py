"""The ARPA text format for n-gram language models: lmforge's Kneser-Ney model written so that
KenLM, SRILM and the speech and translation toolkits built on them read it, and read back.

An ARPA file lists, per order k, every n-gram the model knows with two numbers::

    log10 P(w | h)    h w    log10 bow(h w)

and a lookup backs off: ``P(w | h) = P_listed(w | h)`` when ``h w`` is listed, otherwise
``bow(h) * P(w | h')`` with ``h'`` the context without its oldest word (``bow = 1`` for a
context that is not listed, and for one listed without a back-off number).

Interpolated Kneser-Ney (lmforge/model/ngram.py) is exactly a back-off model of this
form, which is why KenLM's own estimator writes its models this way:

* a listed n-gram ``h w`` stores the whole interpolated probability,
  ``(c*(h w) + gamma(h) P(w | h')) / c(h .)``;
* an unlisted ``w`` after a seen context gets only the interpolation term, so the
  context's back-off weight is ``gamma(h) / c(h .)``;
* a context with no continuation (``c(h .) = 0``) hands everything to the lower order:
  weight 1.

Every n-gram's prefix and suffix occur in the training text wherever the n-gram does, so
both are listed at the order below, as the format requires. The unigram list holds the
whole vocabulary (tokens never seen get the uniform floor's share), so no lookup reaches
an unknown word. ``<s>``, ``</s>`` and ``<unk>`` are listed with probability 10^-99 because
readers expect them; lmforge's model has no sentence markers (callers add their own ids).

Words are the tokenizer's token strings where each is non-empty, free of whitespace,
unique and not one of the three markers; any other token is written as ``<id:N>``. With no
tokenizer, every token is ``<id:N>``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError

MARKERS = ("<s>", "</s>", "<unk>")
ABSENT = -99.0  # log10 probability of the markers lmforge's model never predicts
LN10 = math.log(10.0)


def arpa_words(tokens: Sequence[str] | None, vocab_size: int) -> list[str]:
    """One ARPA word per token id (see the module docstring for the naming rule)."""
    words = [f"<id:{i}>" for i in range(vocab_size)]
    if tokens is None:
        return words
    if len(tokens) != vocab_size:
        raise LmforgeError(f"{len(tokens)} token strings for a vocabulary of {vocab_size}")
    seen: dict[str, int] = {}
    for token in tokens:
        if token and not any(ch.isspace() for ch in token) and token not in MARKERS \
                and not token.startswith("<id:"):
            seen[token] = seen.get(token, 0) + 1
    for i, token in enumerate(tokens):
        if seen.get(token) == 1:
            words[i] = token
    return words


def _ngram_ids(model) -> list[np.ndarray]:
    """Token ids of every stored n-gram, order by order: [N_k, k] int64 arrays."""
    V = model.vocab_size
    out: list[np.ndarray] = []
    for k, table in enumerate(model.orders, start=1):
        contexts, last = table.keys // V, table.keys % V
        ids = last[:, None] if k == 1 else np.concatenate([out[-1][contexts], last[:, None]], axis=1)
        out.append(ids)
    return out


def _index_of(model, ids: np.ndarray) -> np.ndarray:
    """Index of each row of ``ids`` [N, j] among order j's n-grams (every row must be stored)."""
    V = model.vocab_size
    index = np.zeros(len(ids), dtype=np.int64)
    for j in range(ids.shape[1]):
        keys = model.orders[j].keys
        key = index * V + ids[:, j]
        index = np.searchsorted(keys, key)
        if np.any(index >= len(keys)) or np.any(keys[np.minimum(index, len(keys) - 1)] != key):
            raise LmforgeError("the n-gram tables are inconsistent: a suffix of a stored n-gram is missing")
    return index


def arpa_tables(model) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per order k: (token ids [N_k, k], log10 P(w | h), log10 back-off or None at the top order).

    Order 1 covers the whole vocabulary, in id order."""
    model._check_fitted()
    V = model.vocab_size
    stored = _ngram_ids(model)
    first = model.orders[0]
    # Unigrams: every id, the floor 1/V interpolated with the (continuation) counts.
    prob1 = np.full(V, first.gamma[0] / first.total[0] / V) if first.total[0] > 0 else np.full(V, 1.0 / V)
    if first.total[0] > 0:
        prob1[stored[0][:, 0]] += first.kept / first.total[0]
    probs = [prob1]
    for k in range(2, model.order + 1):
        table, ids = model.orders[k - 1], stored[k - 1]
        contexts = table.keys // V
        lower = probs[-1][ids[:, 1:].reshape(-1)] if k == 2 else probs[-1][_index_of(model, ids[:, 1:])]
        total = table.total[contexts]
        with np.errstate(divide="ignore", invalid="ignore"):
            mixed = (table.kept + table.gamma[contexts] * lower) / total
        probs.append(np.where(total > 0, mixed, lower))
    out = []
    for k in range(1, model.order + 1):
        ids = np.arange(V, dtype=np.int64)[:, None] if k == 1 else stored[k - 1]
        backoff = None
        if k < model.order:
            upper = model.orders[k]  # order k + 1's contexts are order k's stored n-grams, by index
            with np.errstate(divide="ignore", invalid="ignore"):
                stored_weight = np.where(upper.total > 0, upper.gamma / upper.total, 1.0)
            if k == 1:  # the unigram rows are the whole vocabulary: place the stored ones' weights
                weight = np.ones(V)
                weight[stored[0][:, 0]] = stored_weight
            else:
                weight = stored_weight
            backoff = np.log10(weight)
        out.append((ids, np.log10(probs[k - 1]), backoff))
    return out


def write_arpa(model, path: str | os.PathLike[str], tokens: Sequence[str] | None = None) -> Path:
    """Write ``model`` (a fitted `NGramLM`) as an ARPA file, atomically; ``tokens``: the
    tokenizer's token string per id (see `arpa_words`)."""
    from lmforge.io.atomic import atomic_path

    words = np.array(arpa_words(tokens, model.vocab_size), dtype=object)
    tables = arpa_tables(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\\data\\\n")
        for k, (ids, _, _) in enumerate(tables, start=1):
            f.write(f"ngram {k}={len(ids) + (len(MARKERS) if k == 1 else 0)}\n")
        for k, (ids, logp, backoff) in enumerate(tables, start=1):
            f.write(f"\n\\{k}-grams:\n")
            if k == 1:
                for marker in MARKERS:
                    f.write(f"{ABSENT:.1f}\t{marker}" + ("\t0\n" if model.order > 1 else "\n"))
            text = [" ".join(row) for row in words[ids]]
            if backoff is None:
                f.writelines(f"{p:.9g}\t{t}\n" for p, t in zip(logp.tolist(), text))
            else:
                f.writelines(f"{p:.9g}\t{t}\t{b:.9g}\n" for p, t, b in zip(logp.tolist(), text, backoff.tolist()))
        f.write("\n\\end\\\n")
    return path


class ArpaLM:
    """A back-off n-gram model read from an ARPA file (any writer's), scored in Python.

    `logprob(context, word)` takes words; `token_logprobs(ids, words)` scores a sequence of
    token ids through a word list (``arpa_words``' naming), natural logs as `NGramLM` gives."""

    def __init__(self, tables: list[dict[tuple[str, ...], tuple[float, float]]]) -> None:
        self.tables = tables  # order k - 1 -> {words: (log10 p, log10 bow)}
        self.order = len(tables)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ArpaLM":
        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"no ARPA file at {path}")
        try:
            tables = cls._parse(path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise LmforgeError(f"{path} is not a readable ARPA file: {exc}") from None
        return cls(tables)

    @staticmethod
    def _parse(path: Path) -> list[dict[tuple[str, ...], tuple[float, float]]]:
        tables: list[dict[tuple[str, ...], tuple[float, float]]] = []
        expected: list[int] = []  # the header's n-gram counts
        section = None  # "data", an order, or "end"
        with open(path, encoding="utf-8") as f:
            for number, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line:
                    continue
                if line == "\\data\\":
                    section = "data"
                elif line == "\\end\\":
                    section = "end"
                    break
                elif line.startswith("\\") and line.endswith("-grams:"):
                    k = int(line[1:-7])
                    if k != len(tables) + 1:
                        raise LmforgeError(f"{path}:{number}: the {k}-grams section is out of order")
                    tables.append({})
                    section = k
                elif section == "data" and line.startswith("ngram "):
                    expected.append(int(line.split("=", 1)[1]))
                elif isinstance(section, int):
                    fields = line.split()
                    if len(fields) not in (section + 1, section + 2):
                        raise LmforgeError(f"{path}:{number}: a {section}-gram line needs {section + 1} or "
                                           f"{section + 2} fields, got {len(fields)}")
                    bow = float(fields[section + 1]) if len(fields) == section + 2 else 0.0
                    tables[-1][tuple(fields[1:section + 1])] = (float(fields[0]), bow)
                else:
                    raise LmforgeError(f"{path}:{number}: unexpected line {line[:60]!r}")
        if section != "end" or not tables:
            raise LmforgeError(f"{path} is not a complete ARPA file (no \\data\\ ... \\end\\)")
        if [len(t) for t in tables] != expected:
            raise LmforgeError(f"{path}: the header counts {expected} do not match the sections "
                               f"{[len(t) for t in tables]}")
        return tables

    def log10prob(self, context: Sequence[str], word: str) -> float:
        """log10 P(word | context) by the back-off rule (only the last order - 1 words count)."""
        context = tuple(context)[max(0, len(context) - (self.order - 1)):] if self.order > 1 else ()
        penalty = 0.0
        for start in range(len(context) + 1):
            history = context[start:]
            entry = self.tables[len(history)].get(history + (word,))
            if entry is not None:
                return penalty + entry[0]
            if history:
                penalty += self.tables[len(history) - 1].get(history, (0.0, 0.0))[1]
        raise LmforgeError(f"{word!r} is not in the model's vocabulary")

    def logprob(self, context: Sequence[str], word: str) -> float:
        """Natural log of P(word | context)."""
        return self.log10prob(context, word) * LN10

    def token_logprobs(self, ids: Sequence[int], words: Sequence[str], first: int = 1) -> np.ndarray:
        """ln P(ids[t] | ids[:t]) for t = first .. len-1, the ids named by ``words``."""
        seq = [words[int(i)] for i in ids]
        return np.array([self.logprob(seq[:t], seq[t]) for t in range(first, len(seq))])
