"""Post-processors: the special tokens wrapped around an encoded text (BOS, EOS, CLS/SEP).

Only the single-sequence case matters to lmforge (it never encodes sentence pairs), so a
post-processor here reduces to two id lists: what goes before the text and what goes after.
The original tokenizer.json section is kept verbatim so that saving loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import LmforgeError


@dataclass
class PostProcessor:
    """Ids added before and after a sequence when ``add_special_tokens`` is true."""

    prefix: list[int] = field(default_factory=list)
    suffix: list[int] = field(default_factory=list)
    spec: dict[str, Any] | None = None  # the tokenizer.json form, written back on save

    def added_count(self) -> int:
        """How many ids `apply` adds around a sequence (what truncation must leave room for)."""
        return len(self.prefix) + len(self.suffix)

    def apply(self, ids: list[int]) -> list[int]:
        if not self.prefix and not self.suffix:
            return ids
        return [*self.prefix, *ids, *self.suffix]


def template_processing(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> PostProcessor:
    """A TemplateProcessing that adds ``bos`` before and/or ``eos`` after the text."""
    single: list[dict[str, Any]] = []
    special: dict[str, Any] = {}
    if bos:
        single.append({"SpecialToken": {"id": bos[0], "type_id": 0}})
    single.append({"Sequence": {"id": "A", "type_id": 0}})
    if eos:
        single.append({"SpecialToken": {"id": eos[0], "type_id": 0}})
    pair = [*single]
    if bos:
        pair.append({"SpecialToken": {"id": bos[0], "type_id": 1}})
    pair.append({"Sequence": {"id": "B", "type_id": 1}})
    if eos:
        pair.append({"SpecialToken": {"id": eos[0], "type_id": 1}})
    for tok in (bos, eos):
        if tok:
            special[tok[0]] = {"id": tok[0], "ids": [tok[1]], "tokens": [tok[0]]}
    spec = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}
    return PostProcessor([bos[1]] if bos else [], [eos[1]] if eos else [], spec)


def _template_ids(items: list[dict[str, Any]], special: dict[str, Any]) -> tuple[list[int], list[int]]:
    prefix: list[int] = []
    suffix: list[int] = []
    seen_sequence = False
    for item in items:
        if "Sequence" in item:
            seen_sequence = True
            continue
        name = item["SpecialToken"]["id"]
        if name not in special:
            raise LmforgeError(f"post_processor uses special token {name!r} without declaring its ids")
        (suffix if seen_sequence else prefix).extend(special[name]["ids"])
    return prefix, suffix


def post_processor_from_dict(spec: dict[str, Any] | None) -> PostProcessor:
    """Build the single-sequence view of a tokenizer.json ``post_processor``."""
    if spec is None:
        return PostProcessor()
    kind = spec.get("type")
    if kind == "TemplateProcessing":
        single = spec["single"]
        if isinstance(single, str):  # the Python bindings' short form "<s> $A"
            raise LmforgeError("TemplateProcessing in string form is not supported in tokenizer.json")
        prefix, suffix = _template_ids(single, spec.get("special_tokens", {}))
        return PostProcessor(prefix, suffix, spec)
    if kind in ("RobertaProcessing", "BertProcessing"):
        return PostProcessor([spec["cls"][1]], [spec["sep"][1]], spec)
    if kind == "ByteLevel":
        return PostProcessor([], [], spec)
    if kind == "Sequence":
        prefix: list[int] = []
        suffix: list[int] = []
        for sub in spec["processors"]:
            p = post_processor_from_dict(sub)
            prefix, suffix = p.prefix + prefix, suffix + p.suffix
        return PostProcessor(prefix, suffix, spec)
    raise LmforgeError(f"unsupported post_processor type {kind!r} in tokenizer.json")
