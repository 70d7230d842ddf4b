"""Deduplication: exact (hash of normalized text) and near-duplicate (MinHash + LSH) (D3).

Exact deduplication hashes a normalized form of each text (case folded, punctuation and
whitespace squeezed out), so two copies that differ only in formatting collide. It costs
one hash per document and catches mirrors and re-posts.

Near duplicates (the same article with a changed sentence, a boilerplate header, a
different date) need a similarity measure. Each text becomes the set of its word
*shingles* (overlapping k-word windows); two texts are near duplicates when the Jaccard
similarity |A ∩ B| / |A ∪ B| of their shingle sets is above a threshold.

* **MinHash** squeezes a shingle set into ``num_perm`` integers: for each of ``num_perm``
  random hash functions h_i (universal hashing, h_i(x) = (a_i x + b_i) mod p), keep the
  smallest h_i over the set. For two sets, P[min h_i(A) = min h_i(B)] equals their
  Jaccard similarity, so the share of equal positions in two signatures estimates it.
* **LSH banding** avoids comparing every pair: cut each signature into ``bands`` bands of
  ``rows`` values; texts whose signatures agree on all rows of at least one band land in
  the same bucket and become candidates. Two texts of similarity s become candidates with
  probability 1 - (1 - s^rows)^bands, an S-curve whose steepest point is near
  (1/bands)^(1/rows). :func:`choose_bands` picks the (bands, rows) whose curve best
  separates "below threshold" from "above".

Candidates are then verified with the signature estimate, so the final decision uses
the threshold, not the bucket luck. Both work at the document level and, through
:class:`ParagraphDeduplicator`, at the paragraph level (repeated disclaimers, navigation
text and quoted passages inside otherwise different documents).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import numpy as np

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy 1.x spells it trapz
MERSENNE_PRIME = (1 << 31) - 1  # a < 2^31 and x < 2^32 keep a*x + b inside uint64
_NON_WORD = re.compile(r"[\W_]+")


def normalize_for_hash(text: str) -> str:
    """Case-folded NFKC words joined by single spaces (punctuation and layout ignored)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def text_digest(text: str) -> bytes:
    """16-byte digest of the normalized text (collisions are negligible at 2^-64 scale)."""
    return hashlib.blake2b(normalize_for_hash(text).encode("utf-8"), digest_size=16).digest()


class ExactDeduplicator:
    """Remembers digests of texts seen so far; ``seen(text)`` is True for a repeat."""

    def __init__(self) -> None:
        self._digests: set[bytes] = set()
        self.duplicates = 0

    def seen(self, text: str) -> bool:
        digest = text_digest(text)
        if digest in self._digests:
            self.duplicates += 1
            return True
        self._digests.add(digest)
        return False


def shingles(text: str, k: int = 5) -> set[str]:
    """The set of k-word windows of the normalized text (the whole text if shorter)."""
    words = normalize_for_hash(text).split()
    if len(words) <= k:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class MinHasher:
    """MinHash signatures with ``num_perm`` universal hash functions (seeded, reproducible)."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1) -> None:
        if num_perm < 1:
            raise ValueError("num_perm must be positive")
        self.num_perm, self.shingle_size = num_perm, shingle_size
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, MERSENNE_PRIME, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_PRIME, size=(num_perm, 1), dtype=np.uint64)

    def hash_shingles(self, items: Iterable[str]) -> np.ndarray:
        """32-bit base hashes of the shingles (crc32: fast, stable across processes)."""
        return np.fromiter((zlib.crc32(s.encode("utf-8")) for s in items), dtype=np.uint64)

    def signature_of_set(self, items: Iterable[str]) -> np.ndarray:
        base = self.hash_shingles(items)
        if base.size == 0:
            return np.full(self.num_perm, MERSENNE_PRIME, dtype=np.uint32)
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, base.size, 4096):  # bounded memory for long documents
            chunk = base[start:start + 4096][None, :]
            hashed = (self.a * chunk + self.b) % np.uint64(MERSENNE_PRIME)
            np.minimum(sig, hashed.min(axis=1), out=sig)
        return sig.astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_set(shingles(text, self.shingle_size))

    @staticmethod
    def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
        return float(np.mean(sig_a == sig_b))


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two texts of this Jaccard similarity share at least one LSH bucket)."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=float) ** rows) ** bands


def choose_bands(num_perm: int, threshold: float, false_positive_weight: float = 0.5,
                 false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm that best matches a step at ``threshold``.

    The error of a choice is the area under the S-curve below the threshold (pairs that
    become candidates though they are not similar enough: wasted verifications) plus the
    area above the curve beyond the threshold (similar pairs never compared: missed
    duplicates), each weighted. Integrated numerically on a fine grid.
    """
    if not 0 < threshold < 1:
        raise ValueError("threshold must be between 0 and 1")
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s <= threshold, s >= threshold
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        p = candidate_probability(s, bands, rows)
        fp = _trapezoid(p[below], s[below])
        fn = _trapezoid(1.0 - p[above], s[above])
        error = false_positive_weight * fp + false_negative_weight * fn
        if error < best_error - 1e-12:
            best, best_error = (bands, rows), error
    return best


@dataclass
class NearDuplicateIndex:
    """Streaming near-duplicate detection: the first text of a cluster is kept.

    ``check(key, text)`` returns the key of an earlier text it nearly duplicates (and
    does not index it), or None (and indexes it). Verification uses the MinHash estimate
    of Jaccard similarity against ``threshold``.
    """

    threshold: float = 0.8
    num_perm: int = 128
    shingle_size: int = 5
    bands: int | None = None
    rows: int | None = None
    seed: int = 1
    # Candidates are verified, so a false positive of the banding costs one comparison while
    # a false negative is a missed duplicate: weigh misses more when choosing bands and rows.
    false_positive_weight: float = 0.1
    false_negative_weight: float = 0.9
    hasher: MinHasher = field(init=False)
    _buckets: list[dict[bytes, list[Hashable]]] = field(init=False, repr=False)
    _signatures: dict[Hashable, np.ndarray] = field(init=False, repr=False)
    candidates_checked: int = 0
    duplicates: int = 0

    def __post_init__(self) -> None:
        if self.bands is None or self.rows is None:
            self.bands, self.rows = choose_bands(self.num_perm, self.threshold, self.false_positive_weight,
                                                 self.false_negative_weight)
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        self.hasher = MinHasher(self.num_perm, self.shingle_size, self.seed)
        self._buckets = [{} for _ in range(self.bands)]
        self._signatures = {}

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        assert r is not None
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands or 0)]

    def check(self, key: Hashable, text: str) -> Hashable | None:
        return self.check_signature(key, self.hasher.signature(text))

    def check_signature(self, key: Hashable, sig: np.ndarray) -> Hashable | None:
        band_keys = self._band_keys(sig)
        seen: set[Hashable] = set()
        for bucket, band_key in zip(self._buckets, band_keys):
            for other in bucket.get(band_key, ()):
                if other in seen:
                    continue
                seen.add(other)
                self.candidates_checked += 1
                if MinHasher.estimate_jaccard(sig, self._signatures[other]) >= self.threshold:
                    self.duplicates += 1
                    return other
        self._signatures[key] = sig
        for bucket, band_key in zip(self._buckets, band_keys):
            bucket.setdefault(band_key, []).append(key)
        return None


def find_near_duplicates(texts: Iterable[str], threshold: float = 0.8, num_perm: int = 128,
                         shingle_size: int = 5, seed: int = 1) -> dict[int, int]:
    """index of each near-duplicate text -> index of the earlier text it repeats."""
    index = NearDuplicateIndex(threshold, num_perm, shingle_size, seed=seed)
    found: dict[int, int] = {}
    for i, text in enumerate(texts):
        original = index.check(i, text)
        if original is not None:
            found[i] = original  # type: ignore[assignment]
    return found


_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")


@dataclass
class ParagraphDeduplicator:
    """Drops paragraphs already seen in earlier documents (exactly or nearly).

    Paragraphs shorter than ``min_words`` are always kept: short lines ("Early life",
    "References") repeat legitimately and carry little weight.
    """

    min_words: int = 8
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 64
    shingle_size: int = 3
    paragraphs_removed: int = 0
    bytes_removed: int = 0
    _exact: ExactDeduplicator = field(default_factory=ExactDeduplicator, repr=False)
    _near: NearDuplicateIndex | None = field(default=None, repr=False)
    _count: int = 0

    def __post_init__(self) -> None:
        if self.near:
            self._near = NearDuplicateIndex(self.threshold, self.num_perm, self.shingle_size, seed=7)

    def filter(self, text: str) -> str:
        kept: list[str] = []
        for paragraph in _PARAGRAPH_SPLIT.split(text):
            if len(paragraph.split()) < self.min_words:
                kept.append(paragraph)
                continue
            self._count += 1
            duplicate = self._exact.seen(paragraph)
            if not duplicate and self._near is not None:
                duplicate = self._near.check(self._count, paragraph) is not None
            if duplicate:
                self.paragraphs_removed += 1
                self.bytes_removed += len(paragraph.encode("utf-8"))
            else:
                kept.append(paragraph)
        return "\n\n".join(p for p in kept if p.strip())
