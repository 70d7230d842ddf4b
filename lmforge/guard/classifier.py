"""Guard classifiers: frozen text features + a trained linear head + calibrated thresholds (G1, G2).

A guard runs on every message, so it must be cheap and its false-positive rate must be
chosen, not discovered. The classifier is two parts:

- **features**: ``embedding``: the sentence encoder all-MiniLM-L6-v2 through
  lmforge/rag/embedder.py, frozen (384 numbers per text, meaning-based, so a paraphrase
  lands near the phrasing it paraphrases); ``hashing``: character 3-5-gram counts
  hashed into a fixed number of buckets (signed) and scaled to unit length (no model at
  all, robust to misspellings, blind to meaning; quick enough for tests); ``both``
  (default): the two side by side. On held-out templates of the training split
  (three folds by template), recall at 1% false positives was 0.64 for embeddings alone,
  0.87 for hashing and 0.86 for both (docs/benchmarks.md); both keeps the meaning signal
  for paraphrases that share few characters with training text;
- **head**: ``logits = W x + b`` over the labels, trained full-batch with AdamW on the
  cross-entropy of lmforge/tune/heads.py (`classification_loss`, with its balanced class
  weights so a rare label is not ignored). With frozen features this is multinomial
  logistic regression; the body is never fine-tuned here (``lmforge finetune classify``
  does that, for a slower and larger model).

**Calibration.** Softmax scores are not probabilities one can threshold blindly. For
each flagged label c, the threshold t_c is chosen on scores of texts the head never
trained on (a calibration split, or out-of-fold scores when cross-fitted by template): with the scores of the N texts that are *not* c sorted from high to low, t_c
sits just above the (floor(N * target_fpr) + 1)-th highest, so at most a target share of
them scores at or above it. With several flagged labels (the moderation categories) the
target is for the union on safe texts: each of the k categories gets target / k of the
safe texts, since a safe text flagged under any category is a false alarm. The realised false-positive rate on new text differs from
the target by sampling error (a calibration split of N negatives pins it to roughly
``sqrt(fpr / N)``) and by how far new text is from the calibration text.

Saved as a directory: ``classifier.json`` (labels, features, thresholds, calibration
figures) and ``head.safetensors`` (W, b).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.guard.config import FeatureSpec, HeadSpec

_FORMAT = "lmforge-guard-classifier"


class Featurizer:
    """Texts -> float32 feature rows. Embeddings are cached per text within one featurizer."""

    def __init__(self, spec: FeatureSpec, progress: bool = False) -> None:
        spec.validate()
        self.spec, self.progress = spec, progress
        self._embedder = None
        self._cache: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return {"hashing": 0, "embedding": self.embedder.dim, "both": self.embedder.dim}[self.spec.kind] + \
            (self.spec.buckets if self.spec.kind != "embedding" else 0)

    @property
    def embedder(self):
        if self._embedder is None:
            from lmforge.rag.embedder import load_embedder

            self._embedder = load_embedder(self.spec.model, device="cpu")
        return self._embedder

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if self.spec.kind == "hashing":
            return np.stack([self._hash(t) for t in texts])
        if self.spec.kind == "both":
            return np.concatenate([self._embed(texts), np.stack([self._hash(t) for t in texts])], axis=1)
        return self._embed(texts)

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            from lmforge.io.progress import Progress

            bar = Progress("embed", len(missing), "texts", enabled=self.progress)
            vectors = self.embedder.encode(missing, batch_size=self.spec.batch_size,
                                           progress=lambda done, total: bar.update(done, total=total))
            bar.close()
            self._cache.update(zip(missing, vectors))
        return np.stack([self._cache[t] for t in texts])

    def _hash(self, text: str) -> np.ndarray:
        s = f" {' '.join(text.lower().split())} "
        row = np.zeros(self.spec.buckets, np.float32)
        for n in range(self.spec.ngram_min, self.spec.ngram_max + 1):
            for i in range(len(s) - n + 1):
                h = int.from_bytes(hashlib.blake2b(s[i:i + n].encode(), digest_size=8).digest(), "little")
                row[h % self.spec.buckets] += 1.0 if (h >> 63) & 1 else -1.0  # signed: collisions cancel on average
        norm = float(np.linalg.norm(row))
        return row / norm if norm else row


def threshold_for_fpr(negative_scores: Sequence[float], target_fpr: float) -> float:
    """The smallest threshold at which at most ``floor(N * target_fpr)`` of the N negatives
    score at or above it (the module's calibration rule)."""
    scores = sorted((float(s) for s in negative_scores), reverse=True)
    if not scores:
        raise LmforgeError("calibration needs at least one negative example")
    if not 0.0 <= target_fpr < 1.0:
        raise LmforgeError(f"a target false-positive rate is in [0, 1), got {target_fpr}")
    allowed = math.floor(len(scores) * target_fpr)
    return float(np.nextafter(np.float32(scores[allowed]), np.float32(np.inf)))


@dataclass
class TextClassifier:
    labels: list[str]
    features: FeatureSpec
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    thresholds: dict[str, float] = field(default_factory=dict)  # label -> threshold on its probability
    info: dict[str, Any] = field(default_factory=dict)  # training and calibration figures
    featurizer: Featurizer | None = None

    def _featurize(self, texts: Sequence[str]) -> np.ndarray:
        if self.featurizer is None:
            self.featurizer = Featurizer(self.features)
        return self.featurizer(list(texts))

    def probabilities(self, texts: Sequence[str] | np.ndarray) -> np.ndarray:
        """Softmax probabilities [N, C] (texts, or feature rows already computed)."""
        x = texts if isinstance(texts, np.ndarray) else self._featurize(texts)
        logits = x @ self.weight.T + self.bias
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def flags(self, probabilities: np.ndarray) -> list[dict[str, float]]:
        """Per row, the thresholded labels and their scores (empty: nothing flagged)."""
        out = []
        for row in probabilities:
            out.append({lab: float(row[i]) for i, lab in enumerate(self.labels)
                        if lab in self.thresholds and row[i] >= self.thresholds[lab]})
        return out

    def save(self, directory: str | Path) -> Path:
        import torch
        from safetensors.torch import save_file

        from lmforge.io.atomic import atomic_directory, write_json_atomic

        with atomic_directory(directory) as staging:
            save_file({"weight": torch.from_numpy(np.ascontiguousarray(self.weight, dtype=np.float32)),
                       "bias": torch.from_numpy(np.ascontiguousarray(self.bias, dtype=np.float32))},
                      str(staging / "head.safetensors"))
            write_json_atomic(staging / "classifier.json", {
                "format": _FORMAT, "labels": self.labels, "features": asdict(self.features),
                "thresholds": self.thresholds, "info": self.info})
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> "TextClassifier":
        from safetensors.numpy import load_file

        from lmforge.io.text_files import parse_json, read_text

        directory = Path(directory)
        meta_path = directory / "classifier.json"
        if not meta_path.is_file() or not (directory / "head.safetensors").is_file():
            raise LmforgeError(f"{directory} is not a guard classifier (no classifier.json / head.safetensors); "
                               "train one with `lmforge guard train`")
        meta = parse_json(read_text(meta_path, "classifier"), meta_path)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise LmforgeError(f"{meta_path}: not an lmforge guard classifier")
        tensors = load_file(str(directory / "head.safetensors"))
        weight, bias = tensors["weight"], tensors["bias"]
        if weight.shape[0] != len(meta["labels"]) or bias.shape != (len(meta["labels"]),):
            raise LmforgeError(f"{directory}: the head's shape does not match its {len(meta['labels'])} labels")
        return cls(list(meta["labels"]), FeatureSpec(**meta["features"]), weight, bias,
                   {k: float(v) for k, v in meta.get("thresholds", {}).items()}, meta.get("info", {}))


def train_head(x: np.ndarray, y: Sequence[int], n_labels: int, spec: HeadSpec | None = None) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """W [C, D], b [C] of a linear softmax head on feature rows `x`, and the loss per step."""
    import torch

    from lmforge.tune.heads import balanced_class_weights, classification_loss

    spec = spec or HeadSpec()
    if len(x) == 0 or len(x) != len(y):
        raise LmforgeError("training a head needs as many labels as feature rows, and at least one row")
    generator = torch.Generator().manual_seed(spec.seed)
    features = torch.from_numpy(np.asarray(x, dtype=np.float32))
    targets = torch.tensor(list(y), dtype=torch.long)
    head = torch.nn.Linear(features.shape[1], n_labels)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    counts = [int((targets == c).sum()) for c in range(n_labels)]
    weights = torch.tensor(balanced_class_weights(counts)) if spec.balanced and all(counts) else None
    optimizer = torch.optim.AdamW(head.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    losses = []
    # A head this small gains nothing from a thread team; on shared cores a busy team made each
    # step 20x slower (80 ms instead of 1 ms for 100 rows x 1024 features).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(spec.epochs):
            optimizer.zero_grad()
            loss = classification_loss(head(features), targets, weights)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()) / len(targets))
    finally:
        torch.set_num_threads(threads)
    return head.weight.detach().numpy().copy(), head.bias.detach().numpy().copy(), losses


def _thresholds(probs: np.ndarray, truth: Sequence[str], labels: list[str], flagged: Sequence[str],
                target_fpr: float, negative: str | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    thresholds, calib = {}, {}
    # With a negative label, the target is for the union: each flagged label gets an equal share of
    # it, measured on the negative texts only (a harmful text flagged under a neighbouring
    # category is a confusion between categories, not a false alarm on a safe text).
    share = target_fpr / len(flagged) if negative is not None and flagged else target_fpr
    for lab in flagged:
        c = labels.index(lab)
        negatives = [float(p[c]) for p, t in zip(probs, truth) if (t == negative if negative is not None else t != lab)]
        positives = [float(p[c]) for p, t in zip(probs, truth) if t == lab]
        t = threshold_for_fpr(negatives, share)
        thresholds[lab] = t
        calib[lab] = {"threshold": t, "negatives": len(negatives), "positives": len(positives),
                      "fpr": sum(s >= t for s in negatives) / len(negatives),
                      "recall": (sum(s >= t for s in positives) / len(positives)) if positives else None}
    return thresholds, calib


def train_classifier(train: Sequence[tuple[str, str]], calibration: Sequence[tuple[str, str]], labels: Sequence[str],
                     flagged: Sequence[str], target_fpr: float, features: FeatureSpec | None = None,
                     head: HeadSpec | None = None, featurizer: Featurizer | None = None,
                     groups: Sequence[str] | None = None, folds: int = 0,
                     negative: str | None = None) -> TextClassifier:
    """Train on (text, label) pairs and set a threshold for each label in `flagged` so that at
    most `target_fpr` of the calibration texts of other labels reach it.

    ``folds`` > 1 (cross-fitting): `groups` names each pair's template (train pairs first,
    then calibration pairs). The pooled pairs are cut into `folds` parts by template; each
    part is scored by a head trained on the other parts, the thresholds are set on those
    out-of-fold scores (every template scored as unseen, many more templates than a
    calibration split holds), and the returned head is trained on all pairs.

    ``negative`` (a label such as "safe"): `target_fpr` is for the negative texts flagged
    under *any* label; each of the k flagged labels gets ``target_fpr / k`` of it, measured
    on the negative texts only. Without it, each label's threshold keeps `target_fpr` of
    all texts of other labels below it.
    """
    features = features or FeatureSpec()
    featurizer = featurizer or Featurizer(features)
    labels = list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({lab for _, lab in [*train, *calibration]} - set(labels))
    if unknown:
        raise LmforgeError(f"labels {unknown} are not among {labels}")
    if folds > 1:
        pooled = [*train, *calibration]
        if groups is None or len(groups) != len(pooled):
            raise LmforgeError("cross-fitted calibration needs one template name per training and calibration pair")
        x = featurizer([t for t, _ in pooled])
        y = np.array([index[lab] for _, lab in pooled])
        names = sorted(set(groups))
        order = np.random.default_rng((head or HeadSpec()).seed).permutation(len(names))
        fold_of = {names[i]: k % folds for k, i in enumerate(order)}
        fold = np.array([fold_of[g] for g in groups])
        out_of_fold = np.zeros((len(pooled), len(labels)), np.float32)
        for k in range(folds):
            held = fold == k
            w, b, _ = train_head(x[~held], y[~held], len(labels), head)
            out_of_fold[held] = TextClassifier(labels, features, w, b).probabilities(x[held])
        thresholds, calib = _thresholds(out_of_fold, [lab for _, lab in pooled], labels, flagged, target_fpr, negative)
        weight, bias, losses = train_head(x, y, len(labels), head)
        clf = TextClassifier(labels, features, weight, bias, thresholds, featurizer=featurizer)
        clf.info = {"train_examples": len(pooled), "calibration_examples": len(pooled), "target_fpr": target_fpr,
                    "calibration_method": f"cross-fitted, {folds} folds over {len(names)} templates",
                    "final_loss": losses[-1], "first_loss": losses[0], "calibration": calib}
        return clf
    x = featurizer([t for t, _ in train])
    weight, bias, losses = train_head(x, [index[lab] for _, lab in train], len(labels), head)
    clf = TextClassifier(labels, features, weight, bias, featurizer=featurizer)
    probs = clf.probabilities(featurizer([t for t, _ in calibration]))
    clf.thresholds, calib = _thresholds(probs, [lab for _, lab in calibration], labels, flagged, target_fpr, negative)
    clf.info = {"train_examples": len(train), "calibration_examples": len(calibration), "target_fpr": target_fpr,
                "calibration_method": "calibration split", "final_loss": losses[-1], "first_loss": losses[0],
                "calibration": calib}
    return clf
