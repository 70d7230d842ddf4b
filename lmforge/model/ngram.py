"""An n-gram language model over token ids with interpolated modified Kneser-Ney smoothing (M10).

The model that language modelling used before neural networks: the probability of the
next token depends only on the last ``order - 1`` tokens, estimated from counts. Raw
relative frequencies give zero to every n-gram the training text lacks, so the counts
are *discounted* and the freed probability mass goes to the next lower order, down to a
uniform distribution over the vocabulary (interpolation, Chen & Goodman 1998)::

    P_k(w | h) = max(c_k(h w) - D_k(c_k(h w)), 0) / c_k(h .)  +  gamma_k(h) * P_{k-1}(w | h')
    gamma_k(h) = (D_k1 N1(h .) + D_k2 N2(h .) + D_k3 N3+(h .)) / c_k(h .)
    P_0(w)     = 1 / V

where ``h'`` drops the oldest token of ``h``, ``N_i(h .)`` is the number of distinct tokens
seen after ``h`` with count i (3+: at least 3), and a context never seen (``c_k(h .) = 0``)
hands its whole mass to the lower order. Two things make it *modified Kneser-Ney*:

* the count ``c_k`` is the raw count only at the highest order; a lower order counts
  *continuations*, ``N1+(. h w)``: the number of distinct tokens seen right before
  ``h w``. A lower order is consulted only when the longer context did not settle the
  matter, so it should say how likely ``w`` is to appear in *new* contexts ("Francisco"
  is frequent but follows almost only "San");
* three discounts per order, for n-grams seen once, twice and three or more times,
  estimated from that order's count-of-counts ``n_i`` (how many n-grams have count i):
  ``Y = n1 / (n1 + 2 n2)``, ``D1 = 1 - 2Y n2/n1``, ``D2 = 2 - 3Y n3/n2``, ``D3+ = 3 - 4Y n4/n3``.

Every distribution sums to one over the vocabulary, for seen and unseen contexts alike.

Sequences are counted as given: no begin/end markers are added (callers that want them
add their own ids), n-grams never cross from one sequence into the next, and the first
tokens of a sequence simply have shorter histories. An n-gram that occurs only at the
start of a sequence has no left neighbour and so a continuation count of zero.

Storage: the n-grams of order k are kept as one sorted ``int64`` key array,
``key = id(context) * V + w``, where ``id(context)`` is the index of the (k-1)-gram in
order k-1's key array (the empty context of order 1 has id 0). All n-grams sharing a
context are therefore one contiguous slice, a context is found with k binary searches,
and counting is ``np.unique`` over key arrays (half a million tokens, order 5: about a
second on one core).

File format (`save` / `load`): one safetensors file holding, per order k = 1..n, the
tensors ``order{k}.keys`` (int64, sorted), ``order{k}.counts`` (int64: raw counts at the
highest order, continuation counts below) and ``order{k}.discounts`` (float64 [D1, D2, D3+]),
with metadata ``format = lmforge-ngram/1``, ``order`` and ``vocab_size``. Everything else
(per-context totals and back-off weights) is recomputed on load.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError

FORMAT = "lmforge-ngram/1"


def modified_kn_discounts(counts: np.ndarray) -> tuple[float, float, float]:
    """(D1, D2, D3+) from the count-of-counts of ``counts`` (Chen & Goodman's estimates).

    Where the corpus is too small for a count-of-count to exist, the single absolute
    discount ``Y = n1 / (n1 + 2 n2)`` stands in (0.5 when even that is undefined); each
    discount is kept within [0, i] so no count goes negative.
    """
    n = [int(np.count_nonzero(counts == i)) for i in (1, 2, 3, 4)]
    y = n[0] / (n[0] + 2 * n[1]) if n[0] + 2 * n[1] > 0 else 0.5
    if n[0] == 0:
        y = 0.5
    out = []
    for i in (1, 2, 3):
        if n[i - 1] > 0 and n[i] > 0 and n[0] > 0:
            d = i - (i + 1) * y * n[i] / n[i - 1]
        else:
            d = y
        out.append(float(min(max(d, 0.0), float(i))))
    return out[0], out[1], out[2]


class _Order:
    """The n-grams of one order: sorted keys, their counts, discounts and, per context, the slice,
    total and back-off mass."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray, discounts: Sequence[float], n_contexts: int,
                 vocab_size: int) -> None:
        self.keys, self.counts = keys, counts
        self.discounts = np.array([0.0, *discounts], dtype=np.float64)  # indexed by min(count, 3)
        contexts = keys // vocab_size
        self.start = np.searchsorted(keys, np.arange(n_contexts + 1, dtype=np.int64) * vocab_size)
        self.total = np.bincount(contexts, weights=counts, minlength=n_contexts).astype(np.float64)
        subtracted = self.discounts[np.minimum(counts, 3)]
        self.gamma = np.bincount(contexts, weights=subtracted, minlength=n_contexts)
        self.kept = np.maximum(counts - subtracted, 0.0)  # discounted counts


class NGramLM:
    """An order-``order`` Kneser-Ney language model over ids 0..vocab_size-1 (see the module docstring).

    ``discounts``: None estimates modified-KN discounts from the data; a number uses that one
    discount for every count and order; a list gives (D1, D2, D3+) per order, index 0 being
    the unigram (whose back-off is the uniform distribution).
    """

    def __init__(self, order: int = 4, vocab_size: int | None = None,
                 discounts: float | Sequence[Sequence[float]] | None = None) -> None:
        if order < 1:
            raise LmforgeError(f"the n-gram order must be at least 1, got {order}")
        if vocab_size is not None and vocab_size < 1:
            raise LmforgeError(f"vocab_size must be positive, got {vocab_size}")
        if isinstance(discounts, (list, tuple)) and len(discounts) != order:
            raise LmforgeError(f"give one (D1, D2, D3+) per order: {order} expected, got {len(discounts)}")
        self.order, self.vocab_size, self.discount_spec = order, vocab_size, discounts
        self.orders: list[_Order] = []
        self.tokens_seen = 0

    # -- counting ---------------------------------------------------------------------------
    def fit(self, sequences: Iterable[Sequence[int] | np.ndarray]) -> "NGramLM":
        """Count every n-gram (orders 1..n) of ``sequences`` and build the smoothed model."""
        arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        arrays = [a for a in arrays if len(a)]
        if not arrays:
            raise LmforgeError("the n-gram model needs at least one non-empty token sequence to fit")
        tokens = np.concatenate(arrays)
        if tokens.min() < 0:
            raise LmforgeError("token ids must be non-negative")
        V = self.vocab_size if self.vocab_size is not None else int(tokens.max()) + 1
        if tokens.max() >= V:
            raise LmforgeError(f"token id {int(tokens.max())} is outside the vocabulary of {V}")
        self.vocab_size, self.tokens_seen = V, len(tokens)
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        ends = np.repeat(np.cumsum(lengths), lengths)  # index one past the end of each position's sequence
        positions = np.arange(len(tokens), dtype=np.int64)

        raw: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # keys, counts, first index, start ids
        previous = None  # per position: id of the (k-1)-gram starting there (-1: none)
        for k in range(1, self.order + 1):
            starts = positions[positions + k <= ends]
            keys = tokens[starts + k - 1] if k == 1 else previous[starts] * V + tokens[starts + k - 1]
            if k > 1 and len(keys) and (previous[starts].max() + 1) * V >= 2**63:
                raise LmforgeError("too many distinct n-grams for 64-bit keys")
            unique, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True,
                                                       return_counts=True)
            ids = np.full(len(tokens), -1, dtype=np.int64)
            ids[starts] = inverse
            raw.append((unique, counts.astype(np.int64), starts[first], ids))
            previous = ids

        self.orders = []
        n_contexts = 1
        for k in range(1, self.order + 1):
            keys, counts, first_positions, ids = raw[k - 1]
            if k < self.order:
                # N1+(. g): the distinct (k+1)-grams whose last k tokens are g, i.e. distinct left neighbours.
                longer_first = raw[k][2]
                suffix_ids = ids[longer_first + 1]
                counts = np.bincount(suffix_ids, minlength=len(keys)).astype(np.int64)
            self.orders.append(_Order(keys, counts, self._discounts_for(k, counts), n_contexts, V))
            n_contexts = len(keys)
        return self

    def _discounts_for(self, k: int, counts: np.ndarray) -> tuple[float, ...]:
        spec = self.discount_spec
        if spec is None:
            return modified_kn_discounts(counts)
        if isinstance(spec, (int, float)):
            d = float(spec)
            values = (d, d, d)
        else:
            values = tuple(float(x) for x in spec[k - 1])
            if len(values) != 3:
                raise LmforgeError("each order's discounts are three numbers (D1, D2, D3+)")
        for i, d in enumerate(values, start=1):
            if not 0.0 <= d <= i:
                raise LmforgeError(f"discount D{i} must be within [0, {i}], got {d}")
        return values

    # -- queries ------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not self.orders:
            raise LmforgeError("the n-gram model has not been fitted (call fit or load)")

    def _context_id(self, context: Sequence[int]) -> int:
        """Index of the n-gram ``context`` in its order's key array, or -1 if it was never seen."""
        ident = 0
        V = self.vocab_size
        for j, token in enumerate(context):
            keys = self.orders[j].keys
            key = ident * V + int(token)
            i = int(np.searchsorted(keys, key))
            if i >= len(keys) or keys[i] != key:
                return -1
            ident = i
        return ident

    def next_distribution(self, context: Sequence[int]) -> np.ndarray:
        """P(w | context) for every w in the vocabulary (float64, sums to 1); only the last
        ``order - 1`` tokens of ``context`` matter."""
        self._check_fitted()
        V = self.vocab_size
        context = list(context)[max(0, len(context) - (self.order - 1)):] if self.order > 1 else []
        p = np.full(V, 1.0 / V)
        for k, table in enumerate(self.orders, start=1):
            if k - 1 > len(context):
                break
            c = self._context_id(context[len(context) - (k - 1):]) if k > 1 else 0
            if c < 0 or table.total[c] <= 0:
                continue
            lo, hi = table.start[c], table.start[c + 1]
            words = table.keys[lo:hi] - c * V
            p = p * (table.gamma[c] / table.total[c])
            p[words] += table.kept[lo:hi] / table.total[c]
        return p

    def logprob(self, context: Sequence[int], token: int) -> float:
        """Natural log of P(token | context)."""
        self._check_fitted()
        if not 0 <= int(token) < self.vocab_size:
            raise LmforgeError(f"token id {token} is outside the vocabulary of {self.vocab_size}")
        return math.log(self._prob(list(context), int(token)))

    def _prob(self, context: list[int], token: int) -> float:
        V = self.vocab_size
        context = context[max(0, len(context) - (self.order - 1)):] if self.order > 1 else []
        p = 1.0 / V
        for k, table in enumerate(self.orders, start=1):
            if k - 1 > len(context):
                break
            c = self._context_id(context[len(context) - (k - 1):]) if k > 1 else 0
            if c < 0 or table.total[c] <= 0:
                continue
            key = c * V + token
            lo, hi = table.start[c], table.start[c + 1]
            i = lo + int(np.searchsorted(table.keys[lo:hi], key))
            kept = float(table.kept[i]) if i < hi and table.keys[i] == key else 0.0
            p = (kept + table.gamma[c] * p) / table.total[c]
        return p

    def token_logprobs(self, sequence: Sequence[int] | np.ndarray, first: int = 1) -> np.ndarray:
        """ln P(sequence[t] | sequence[:t]) for t = first .. len-1, all positions at once (NumPy).

        ``first = 1`` scores every token that has at least one token before it, as a
        next-token model fed the sequence would; ``first = 0`` also scores the first token
        with the empty context."""
        self._check_fitted()
        seq = np.asarray(sequence, dtype=np.int64).reshape(-1)
        if len(seq) and (seq.min() < 0 or seq.max() >= self.vocab_size):
            raise LmforgeError(f"token ids must be within the vocabulary of {self.vocab_size}")
        V = self.vocab_size
        targets = np.arange(first, len(seq))
        p = np.full(len(targets), 1.0 / V)
        ids = None  # per position i: id of the (k-1)-gram starting at i (-1: unseen)
        for k, table in enumerate(self.orders, start=1):
            if k == 1:
                ctx = np.zeros(len(targets), dtype=np.int64)
            else:
                prev_table = self.orders[k - 2]
                n = len(seq) - (k - 2)
                key = seq[:n] if k == 2 else np.where(ids[:n] >= 0, ids[:n] * V + seq[k - 2:k - 2 + n], -1)
                found = np.searchsorted(prev_table.keys, key)
                found = np.minimum(found, len(prev_table.keys) - 1)
                ids = np.where((key >= 0) & (prev_table.keys[found] == key), found, -1)
                starts = targets - (k - 1)
                ctx = np.where(starts >= 0, ids[np.maximum(starts, 0)], -1)
            usable = ctx >= 0
            usable[usable] = table.total[ctx[usable]] > 0
            c, w = ctx[usable], seq[targets[usable]]
            key = c * V + w
            i = np.minimum(np.searchsorted(table.keys, key), len(table.keys) - 1)
            kept = np.where(table.keys[i] == key, table.kept[i], 0.0)
            p[usable] = (kept + table.gamma[c] * p[usable]) / table.total[c]
        return np.log(p)

    def perplexity(self, sequences: Iterable[Sequence[int] | np.ndarray], first: int = 1) -> dict[str, float]:
        """exp(mean negative log-likelihood) over every scored token of ``sequences``
        (see `token_logprobs` for ``first``), with the nats and the token count."""
        nats, count = 0.0, 0
        for s in sequences:
            lp = self.token_logprobs(s, first)
            nats -= float(lp.sum())
            count += len(lp)
        if count == 0:
            raise LmforgeError("no tokens to score")
        return {"perplexity": math.exp(nats / count), "nats_per_token": nats / count, "tokens": count}

    def generate(self, prompt: Sequence[int], max_tokens: int = 32, temperature: float = 1.0, seed: int = 0,
                 stop_ids: Iterable[int] = ()) -> list[int]:
        """Sample up to ``max_tokens`` ids after ``prompt`` (temperature 0: the most likely id)."""
        self._check_fitted()
        rng = np.random.default_rng(seed)
        stops, context, out = set(stop_ids), list(prompt), []
        for _ in range(max_tokens):
            p = self.next_distribution(context)
            if temperature <= 0:
                token = int(np.argmax(p))
            else:
                if temperature != 1.0:
                    logits = np.log(np.maximum(p, 1e-300)) / temperature
                    p = np.exp(logits - logits.max())
                p = p / p.sum()
                token = int(rng.choice(len(p), p=p))
            out.append(token)
            context.append(token)
            if token in stops:
                break
        return out

    # -- persistence ------------------------------------------------------------------------
    def num_ngrams(self) -> list[int]:
        return [len(t.keys) for t in self.orders]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to one safetensors file, atomically (format in the module docstring)."""
        from safetensors.numpy import save_file

        from lmforge.io.atomic import atomic_path

        self._check_fitted()
        tensors: dict[str, np.ndarray] = {}
        for k, t in enumerate(self.orders, start=1):
            tensors[f"order{k}.keys"] = np.ascontiguousarray(t.keys, dtype=np.int64)
            tensors[f"order{k}.counts"] = np.ascontiguousarray(t.counts, dtype=np.int64)
            tensors[f"order{k}.discounts"] = np.ascontiguousarray(t.discounts[1:], dtype=np.float64)
        meta = {"format": FORMAT, "order": str(self.order), "vocab_size": str(self.vocab_size),
                "tokens_seen": str(self.tokens_seen)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "NGramLM":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LmforgeError(f"no n-gram model at {path}")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise LmforgeError(f"{path} is not an {FORMAT} file")
                order, V = int(meta["order"]), int(meta["vocab_size"])
                arrays = {name: f.get_tensor(name) for name in f.keys()}
        except LmforgeError:
            raise
        except Exception as exc:  # a truncated or foreign file
            raise LmforgeError(f"cannot read the n-gram model {path}: {exc}") from None
        model = cls(order, V)
        model.tokens_seen = int(meta.get("tokens_seen", 0))
        n_contexts = 1
        for k in range(1, order + 1):
            keys, counts = arrays[f"order{k}.keys"], arrays[f"order{k}.counts"]
            model.orders.append(_Order(keys, counts, tuple(arrays[f"order{k}.discounts"]), n_contexts, V))
            n_contexts = len(keys)
        return model

    def describe(self) -> dict[str, Any]:
        """Order, vocabulary, n-gram counts and discounts, for reports."""
        return {"order": self.order, "vocab_size": self.vocab_size, "tokens_seen": self.tokens_seen,
                "ngrams": self.num_ngrams(),
                "discounts": [[round(float(d), 4) for d in t.discounts[1:]] for t in self.orders]}

