"""Data augmentation and class imbalance for fine-tuning data (D8).

Augmentation makes more training text from the text there is, for tasks whose label does
not change when the wording does (sentiment, topic), never for tasks with computed answers
(arithmetic: "47 + 385" reworded is another question):

- `eda` - the four "easy data augmentation" edits of Wei & Zou (2019): synonym
  replacement, random insertion of a synonym, random swap, random deletion, each applied to
  about ``alpha`` of the words. Synonyms come from a mapping the caller gives (no lexical
  database ships offline); with none, only swap and deletion apply.
- Back-translation (English -> pivot -> English) and LLM paraphrase need a translation or
  chat model; `paraphrase_records` takes any ``rewrite(text) -> text`` callable (for
  example lmforge's generator with a "Paraphrase:" prompt) and keeps the label.

Class imbalance, for classification sets (answers from a small set of classes):

- `class_counts`, `oversample` (duplicate minority-class records, seeded, until every
  class has as many as the largest) and `undersample` (the reverse);
- `class_weights` - inverse-frequency weights normalised to mean 1 over the records, for
  a weighted loss;
- `focal_loss` - cross-entropy scaled by (1 - p_t)^gamma (Lin et al., 2017), which turns
  down the loss of examples already classified confidently; gamma = 0 is cross-entropy.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

from lmforge.errors import LmforgeError


def eda(text: str, rng: random.Random, alpha: float = 0.1, synonyms: Mapping[str, Sequence[str]] | None = None,
        operation: str | None = None) -> str:
    """One EDA edit of ``text`` (a random one of the available operations unless ``operation`` names it)."""
    words = text.split()
    if len(words) < 2:
        return text
    n = max(1, round(alpha * len(words)))
    synonyms = synonyms or {}
    replaceable = [i for i, w in enumerate(words) if synonyms.get(w.lower())]
    available = ["swap", "delete"] + (["synonym", "insert"] if replaceable else [])
    op = operation or rng.choice(available)
    if op not in available:
        raise LmforgeError(f"EDA operation {op!r} is not available here (available: {', '.join(available)})")
    words = words[:]
    if op == "swap":
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif op == "delete":
        kept = [w for w in words if rng.random() >= alpha]
        words = kept or [rng.choice(words)]
    elif op == "synonym":
        for i in rng.sample(replaceable, min(n, len(replaceable))):
            words[i] = rng.choice(list(synonyms[words[i].lower()]))
    else:  # insert: a synonym of a random replaceable word at a random place
        for _ in range(n):
            source = words[rng.choice(replaceable)] if replaceable else None
            if source is None or not synonyms.get(source.lower()):
                break
            words.insert(rng.randrange(len(words) + 1), rng.choice(list(synonyms[source.lower()])))
    return " ".join(words)


def _user_text(record: Mapping[str, Any]) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == "user")


def _with_user_text(record: Mapping[str, Any], text: str, how: str) -> dict[str, Any]:
    messages = [dict(m) for m in record["messages"]]
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[first_user]["content"] = text
    return {**record, "messages": messages, "augmented": how}


def augment_records(records: Sequence[Mapping[str, Any]], copies: int, seed: int = 0, alpha: float = 0.1,
                    synonyms: Mapping[str, Sequence[str]] | None = None, keep_prefix: str = "\n\n") -> list[dict[str, Any]]:
    """The records plus ``copies`` EDA variants of each (labels unchanged). Only the text after
    ``keep_prefix`` in the user turn is edited, so an instruction before it stays intact."""
    if copies < 0:
        raise LmforgeError("augmentation copies must be >= 0")
    rng = random.Random(f"{seed}:eda")
    out = [dict(r) for r in records]
    for record in records:
        text = _user_text(record)
        head, sep, body = text.rpartition(keep_prefix) if keep_prefix in text else ("", "", text)
        for _ in range(copies):
            out.append(_with_user_text(record, head + sep + eda(body, rng, alpha, synonyms), "eda"))
    return out


def paraphrase_records(records: Sequence[Mapping[str, Any]], rewrite: Callable[[str], str]) -> list[dict[str, Any]]:
    """One rewritten copy of each record (back-translation, an LLM paraphrase ...), label kept."""
    return [_with_user_text(r, rewrite(_user_text(r)), "paraphrase") for r in records]


def class_counts(records: Sequence[Mapping[str, Any]], key: str = "answer") -> dict[str, int]:
    return dict(sorted(Counter(str(r[key]) for r in records).items()))


def oversample(records: Sequence[Mapping[str, Any]], seed: int = 0, key: str = "answer") -> list[dict[str, Any]]:
    """Duplicate records of the smaller classes (drawn without replacement while possible) until
    every class has as many as the largest; the result is shuffled."""
    rng = random.Random(f"{seed}:oversample")
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_class.setdefault(str(r[key]), []).append(r)
    if not by_class:
        raise LmforgeError("no records to resample")
    largest = max(len(v) for v in by_class.values())
    out = []
    for rows in by_class.values():
        extra = []
        while len(rows) + len(extra) < largest:
            pool = rows[:]
            rng.shuffle(pool)
            extra += pool[:largest - len(rows) - len(extra)]
        out += [dict(r) for r in rows + extra]
    rng.shuffle(out)
    return out


def undersample(records: Sequence[Mapping[str, Any]], seed: int = 0, key: str = "answer") -> list[dict[str, Any]]:
    """Keep a random subset of every class as large as the smallest class; the result is shuffled."""
    rng = random.Random(f"{seed}:undersample")
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_class.setdefault(str(r[key]), []).append(r)
    if not by_class:
        raise LmforgeError("no records to resample")
    smallest = min(len(v) for v in by_class.values())
    out = [dict(r) for rows in by_class.values() for r in rng.sample(rows, smallest)]
    rng.shuffle(out)
    return out


def class_weights(labels: Sequence[Any]) -> dict[Any, float]:
    """Inverse-frequency weights, normalised so that the mean weight over the records is 1."""
    counts = Counter(labels)
    if not counts:
        raise LmforgeError("no labels to weigh")
    n, k = len(labels), len(counts)
    return {label: n / (k * c) for label, c in counts.items()}


def focal_loss(logits, targets, gamma: float = 2.0, weight=None, reduction: str = "mean"):
    """Focal loss -(1 - p_t)^gamma * w_t * log p_t over logits [N, C] and class targets [N].

    ``weight`` [C] are per-class weights (e.g. from `class_weights`); "mean" divides by the
    summed weights of the targets, as weighted cross-entropy does, so gamma = 0 equals
    ``F.cross_entropy(logits, targets, weight=weight)``.
    """
    import torch
    import torch.nn.functional as F

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets.view(-1, 1)).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    w = torch.ones_like(loss) if weight is None else weight.to(loss.dtype)[targets]
    loss = loss * w
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / w.sum()
