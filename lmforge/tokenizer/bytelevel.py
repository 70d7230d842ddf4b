"""The GPT-2 byte-to-unicode alphabet used by byte-level BPE.

Byte-level BPE works on bytes, not characters, so that any string (any language, emoji,
invalid-looking input) can be encoded without an unknown token. Vocabulary files are text,
though, and raw bytes such as 0x00 or 0x20 would be awkward there (invisible, or split by
whitespace-based tooling). GPT-2 therefore spells every byte as one printable unicode
character: printable Latin-1 bytes stand for themselves and the other 68 bytes are moved to
U+0100.. (so a space 0x20 becomes ``Ġ`` and a newline 0x0A becomes ``Ċ``).
"""

from __future__ import annotations


def _build_byte_alphabet() -> tuple[str, ...]:
    """Return the 256 characters that spell bytes 0..255, in GPT-2's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelled = {b: chr(b) for b in printable}
    next_free = 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + next_free)
            next_free += 1
    return tuple(spelled[b] for b in range(256))


BYTE_TO_CHAR: tuple[str, ...] = _build_byte_alphabet()
"""``BYTE_TO_CHAR[b]`` is the vocabulary character for byte ``b``."""

CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
"""Inverse of :data:`BYTE_TO_CHAR`."""

# str.translate on the Latin-1 view of the bytes maps all bytes in one C-level pass, which is
# far faster than a Python loop over ``bytes``.
_LATIN1_TO_ALPHABET = {b: c for b, c in enumerate(BYTE_TO_CHAR)}
_ALPHABET_TO_LATIN1: dict[int, int | str] = {cp: "\uffff" for cp in range(256)}  # unencodable
_ALPHABET_TO_LATIN1.update({ord(c): b for b, c in enumerate(BYTE_TO_CHAR)})


def text_to_symbols(text: str) -> str:
    """Spell the UTF-8 bytes of ``text`` in the byte alphabet (``"hé"`` -> ``"hÃ©"``)."""
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_ALPHABET)


def symbols_to_bytes(symbols: str) -> bytes | None:
    """Bytes spelled by ``symbols``, or None when a character is not in the byte alphabet.

    None lets callers fall back to the token's own UTF-8 text, which is what added tokens
    such as ``<|im_start|>`` written outside the alphabet need.
    """
    try:
        return symbols.translate(_ALPHABET_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None


def token_bytes(token: str) -> bytes:
    """Bytes a byte-level decoder produces for ``token``: its spelled bytes or its own UTF-8."""
    raw = symbols_to_bytes(token)
    return raw if raw is not None else token.encode("utf-8")
