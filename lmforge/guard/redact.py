"""PII redaction for prompts, logs and stored conversations (G3), reversible or not.

`Redactor` replaces what lmforge/data/pii.py finds (e-mails, phones, cards with Luhn,
IBANs, IPs, URL credentials, US SSNs, UK National Insurance numbers, street addresses)
with placeholders. Three modes:

- ``reversible``: numbered placeholders (``[EMAIL_1]``, ``[PHONE_2]``); the same value
  gets the same placeholder throughout a redactor's life, so a conversation stays
  readable ("[EMAIL_1] bounced, try [EMAIL_1] again"), and the mapping placeholder ->
  original is kept apart from the text (`Redaction.mapping`, `save_mapping` writes it
  atomically with owner-only permissions). `restore` puts the originals back. Use it
  where the operator is allowed to keep the originals (a support ticket system that
  must call the customer back), with the mapping in a separate, access-controlled store.
- ``irreversible``: typed placeholders (``[EMAIL]``) and no mapping: nothing to restore.
  For logs, analytics and training data.
- ``pseudonym``: a keyed hash of the value (``[EMAIL_3fa94c1e]``, HMAC-SHA256 with a
  secret key): the same value gets the same token in every log line and every run with
  that key, so counts and joins still work, but the original cannot be read back
  without trying candidate values with the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

MODES = ("reversible", "irreversible", "pseudonym")


@dataclass
class Redaction:
    text: str
    mapping: dict[str, str] = field(default_factory=dict)  # placeholder -> original (reversible mode only)
    counts: dict[str, int] = field(default_factory=dict)  # kind -> matches


class Redactor:
    """``redact(text)`` -> `Redaction`; ``restore(text)`` (reversible mode) puts originals back."""

    def __init__(self, mode: str = "irreversible", kinds: tuple[str, ...] | None = None,
                 key: bytes | str | None = None) -> None:
        if mode not in MODES:
            raise LmforgeError(f"unknown redaction mode {mode!r} (choose {', '.join(MODES)})")
        if mode == "pseudonym" and not key:
            raise LmforgeError("pseudonym redaction needs a secret key")
        self.mode, self.kinds = mode, kinds
        self.key = key.encode() if isinstance(key, str) else key
        self.mapping: dict[str, str] = {}  # placeholder -> original
        self._by_value: dict[tuple[str, str], str] = {}
        self._numbers: dict[str, int] = {}

    def _placeholder(self, kind: str, value: str) -> str:
        from lmforge.data.pii import PLACEHOLDERS

        label = PLACEHOLDERS[kind][1:-1]
        if self.mode == "irreversible":
            return f"[{label}]"
        if self.mode == "pseudonym":
            digest = hmac.new(self.key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:8]
            return f"[{label}_{digest}]"
        known = self._by_value.get((label, value))
        if known is None:
            self._numbers[label] = self._numbers.get(label, 0) + 1
            known = f"[{label}_{self._numbers[label]}]"
            self._by_value[(label, value)] = known
            self.mapping[known] = value
        return known

    def redact(self, text: str) -> Redaction:
        from lmforge.data.pii import find_pii

        matches = find_pii(text, self.kinds)
        parts, pos, used, counts = [], 0, {}, {}
        for m in matches:
            placeholder = self._placeholder(m.kind, m.text)
            parts += [text[pos:m.start], placeholder]
            pos = m.end
            counts[m.kind] = counts.get(m.kind, 0) + 1
            if self.mode == "reversible":
                used[placeholder] = m.text
        parts.append(text[pos:])
        return Redaction("".join(parts), used, counts)

    def redact_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A conversation (``[{"role", "content"}, ...]``) with every string content redacted."""
        return [{**m, "content": self.redact(m["content"]).text} if isinstance(m.get("content"), str) else dict(m)
                for m in messages]

    def restore(self, text: str, mapping: dict[str, str] | None = None) -> str:
        """`text` with the placeholders of `mapping` (default: everything this redactor saw) put back."""
        if self.mode != "reversible" and mapping is None:
            raise LmforgeError(f"{self.mode} redaction keeps no originals to restore")
        return restore(text, self.mapping if mapping is None else mapping)


_PLACEHOLDER = re.compile(r"\[[A-Z_]+_\d+\]")


def restore(text: str, mapping: dict[str, str]) -> str:
    """Put the originals of a reversible redaction back (placeholders not in `mapping` stay)."""
    return _PLACEHOLDER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)


def save_mapping(mapping: dict[str, str], path: str | Path) -> Path:
    """Write a redaction mapping as JSON, atomically, readable by its owner only."""
    from lmforge.io.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        os.chmod(tmp, 0o600)  # before any original is written to it
        tmp.write_text(json.dumps(mapping, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_mapping(path: str | Path) -> dict[str, str]:
    from lmforge.io.text_files import parse_json, read_text

    data = parse_json(read_text(Path(path), "redaction mapping"), Path(path))
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise LmforgeError(f"{path}: a redaction mapping is an object of placeholder -> original strings")
    return data
