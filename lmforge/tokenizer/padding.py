"""Truncation and padding: from texts of any length to a rectangular batch of ids.

A model takes a batch as one [B, T] tensor, so sequences of different lengths are padded
to a common length, and an attention mask (1 = real token, 0 = padding) tells the model
which positions to ignore. A model also has a longest input (its position table, or the
length it was trained on), so longer texts are truncated first. The special tokens a
post-processor adds ([CLS] ... [SEP]) are kept: the text's own tokens are cut to leave room
for them, as Hugging Face `tokenizers` does.

`tokenizer.json` may carry both settings (`truncation`, `padding`); `Truncation` and
`Padding` read and write those sections, so a loaded tokenizer saves them back unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import LmforgeError

DIRECTIONS = ("right", "left")


def _direction(value: Any) -> str:
    direction = str(value or "right").lower()
    if direction not in DIRECTIONS:
        raise LmforgeError(f"unknown truncation/padding direction {value!r} (use right or left)")
    return direction


@dataclass
class Truncation:
    """How long inputs are cut: at most `max_length` ids (special tokens included).

    `direction` is the end that is cut: "right" keeps the beginning of the text, "left"
    its end. `strategy` and `stride` only matter for sentence pairs and overflowing
    windows, which lmforge does not produce; they are kept for saving.
    """

    max_length: int
    direction: str = "right"
    strategy: str = "LongestFirst"
    stride: int = 0

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise LmforgeError(f"truncation max_length must be at least 1, got {self.max_length}")
        self.direction = _direction(self.direction)

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> Truncation | None:
        if not spec:
            return None
        return cls(int(spec["max_length"]), spec.get("direction", "Right"), spec.get("strategy", "LongestFirst"),
                   int(spec.get("stride", 0)))

    def to_dict(self) -> dict[str, Any]:
        return {"direction": self.direction.capitalize(), "max_length": self.max_length,
                "strategy": self.strategy, "stride": self.stride}


@dataclass
class Padding:
    """How a batch is made rectangular: `pad_id` fills the short rows on `direction`'s side,
    up to the longest row (or `length` when set), rounded up to `pad_to_multiple_of`."""

    pad_id: int = 0
    pad_token: str = "[PAD]"
    pad_type_id: int = 0
    direction: str = "right"
    length: int | None = None  # a fixed length; None: the longest sequence of the batch
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        self.direction = _direction(self.direction)

    @classmethod
    def from_dict(cls, spec: dict[str, Any] | None) -> Padding | None:
        if not spec:
            return None
        strategy = spec.get("strategy", "BatchLongest")
        length = int(strategy["Fixed"]) if isinstance(strategy, dict) and "Fixed" in strategy else None
        return cls(int(spec.get("pad_id", 0)), str(spec.get("pad_token", "[PAD]")), int(spec.get("pad_type_id", 0)),
                   spec.get("direction", "Right"), length, spec.get("pad_to_multiple_of"))

    def to_dict(self) -> dict[str, Any]:
        return {"strategy": {"Fixed": self.length} if self.length is not None else "BatchLongest",
                "direction": self.direction.capitalize(), "pad_to_multiple_of": self.pad_to_multiple_of,
                "pad_id": self.pad_id, "pad_type_id": self.pad_type_id, "pad_token": self.pad_token}


@dataclass
class Batch:
    """Padded ids and their attention mask, row for row; `lengths` are the unpadded lengths."""

    input_ids: list[list[int]] = field(default_factory=list)
    attention_mask: list[list[int]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def truncate(ids: list[int], max_length: int, reserved: int = 0, direction: str = "right") -> list[int]:
    """At most ``max_length - reserved`` of ``ids`` (``reserved``: special tokens added later)."""
    budget = max_length - reserved
    if budget < 0:
        raise LmforgeError(f"max_length {max_length} leaves no room for the {reserved} special tokens around the text")
    if len(ids) <= budget:
        return ids
    return ids[:budget] if direction == "right" else ids[len(ids) - budget:]


def pad(sequences: Sequence[Sequence[int]], padding: Padding | None = None) -> Batch:
    """Pad ``sequences`` to one length (see `Padding`); the attention mask marks real ids."""
    padding = padding or Padding()
    lengths = [len(s) for s in sequences]
    width = max(lengths, default=0)
    if padding.length is not None:
        width = max(width, padding.length)
    multiple = padding.pad_to_multiple_of
    if multiple and width % multiple:
        width += multiple - width % multiple
    ids, mask = [], []
    for seq, n in zip(sequences, lengths):
        fill = width - n
        if padding.direction == "right":
            ids.append([*seq, *[padding.pad_id] * fill])
            mask.append([1] * n + [0] * fill)
        else:
            ids.append([*[padding.pad_id] * fill, *seq])
            mask.append([0] * fill + [1] * n)
    return Batch(ids, mask, lengths)
