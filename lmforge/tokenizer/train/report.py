"""Tokenizer quality report (T6): compression, unknown tokens and round trips per text group.

For each tokenizer and each group of held-out texts (a language or a script):

* **bytes per token**: UTF-8 bytes of the text / tokens. Higher is better compression: a
  model sees more text per position of its context and per unit of compute. It is
  comparable across tokenizers, unlike tokens per word, because it does not depend on
  how words are counted (CJK text has no spaces).
* **tokens per word**: "fertility", for space-separated languages.
* **unknown rate**: share of tokens that are the unknown token. Byte-level BPE has none
  by construction; WordPiece maps a whole word to ``[UNK]`` when one character is
  missing, Unigram only the missing characters.
* **round trip**: share of texts for which ``decode(encode(text)) == text``. Normalizers
  (NFKC, lowercasing) and BERT-style decoding (spaces around punctuation) break it.

The caller decides the groups (e.g. by the language identifier of :mod:`lmforge.data`),
so this module needs nothing but the tokenizers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lmforge.tokenizer.tokenizer import Tokenizer


def measure(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, Any]:
    """Compression and unknown-token figures of one tokenizer on some texts."""
    n_bytes = n_chars = n_words = n_tokens = n_unknown = exact = 0
    unk = tokenizer.unk_id
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        n_bytes += len(text.encode("utf-8"))
        n_chars += len(text)
        n_words += len(text.split())
        n_tokens += len(ids)
        if unk is not None:
            n_unknown += sum(1 for i in ids if i == unk)
        exact += tokenizer.decode(ids, skip_special_tokens=False) == text
    return {
        "texts": len(texts), "bytes": n_bytes, "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 3) if n_tokens else None,
        "chars_per_token": round(n_chars / n_tokens, 3) if n_tokens else None,
        "tokens_per_word": round(n_tokens / n_words, 3) if n_words else None,
        "unknown_rate": round(n_unknown / n_tokens, 4) if n_tokens else 0.0,
        "round_trip": round(exact / len(texts), 3) if texts else None,
    }


def quality_report(tokenizers: Mapping[str, Tokenizer], groups: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``{"groups": {group: {tokenizer: figures}}, "vocab_sizes": {...}}``."""
    return {
        "vocab_sizes": {name: tok.vocab_size for name, tok in tokenizers.items()},
        "groups": {group: {name: measure(tok, texts) for name, tok in tokenizers.items()}
                   for group, texts in groups.items() if texts},
    }


def report_markdown(report: Mapping[str, Any]) -> str:
    """Tables: bytes per token, unknown rate and round trips, one row per group."""
    names = list(report["vocab_sizes"])
    header = "| group | " + " | ".join(f"{n} ({report['vocab_sizes'][n]:,})" for n in names) + " |"
    rule = "|---|" + "---:|" * len(names)
    out = []
    for title, key, fmt in (("Bytes per token (higher = better compression)", "bytes_per_token", "{:.2f}"),
                            ("Unknown-token rate", "unknown_rate", "{:.2%}"),
                            ("Exact round trips decode(encode(x)) == x", "round_trip", "{:.0%}")):
        out += [f"**{title}**", "", header, rule]
        for group, by_tok in report["groups"].items():
            cells = []
            for n in names:
                v = by_tok[n][key]
                cells.append("-" if v is None else fmt.format(v))
            texts = next(iter(by_tok.values()))
            out.append(f"| {group} ({texts['bytes'] / 1000:.1f} KB) | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Bytes per token counts an unknown token like any other: a tokenizer that turns a word into "
               "[UNK] \"compresses\" it by losing it, so read it together with the unknown-token rate.")
    return "\n".join(out) + "\n"
