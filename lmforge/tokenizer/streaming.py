"""Streaming detokenization: text deltas as tokens arrive, one token at a time.

Decoding each new token on its own is wrong twice over: a byte-level token can end in the
middle of a UTF-8 character (an emoji is often 2-4 tokens), and SentencePiece decoders drop
the leading space of the *first* token they see, so "▁world" alone decodes to "world".
Re-decoding the whole sequence each step is right but quadratic.

Two strategies, both constant work per token:

* byte-level vocabularies: every id is a fixed byte string, so the bytes go through an
  incremental UTF-8 decoder that holds back an incomplete character until it is complete.
* anything else: decode a short window (the last emitted token + the new ones) twice, with
  and without the new tokens, and emit the difference; the shared first token absorbs the
  decoder's start-of-text rules. A window whose text ends in U+FFFD is an incomplete
  character, so it waits for more tokens.

Either way, the concatenation of all deltas plus :meth:`IncrementalDecoder.flush` equals
``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.tokenizer.tokenizer import Tokenizer


class IncrementalDecoder:
    """Turn a stream of token ids into text deltas.

    >>> dec = IncrementalDecoder(tokenizer)           # doctest: +SKIP
    >>> "".join(dec.push(i) for i in ids) + dec.flush() == tokenizer.decode(ids)  # doctest: +SKIP
    True
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._byte_level = tokenizer.decodes_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tokens: list[str] = []  # window of token strings (generic strategy)
        self._prefix = 0  # window start
        self._read = 0  # end of the part of the window already emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly "")."""
        tok = self.tokenizer
        if self.skip_special_tokens and token_id in tok.special_ids:
            return ""
        if self._byte_level:
            data = tok.token_bytes(token_id)
            return self._utf8.decode(data) if data else ""
        token = tok.id_to_token(token_id)
        if token is None:
            return ""
        self._tokens.append(token)
        prefix_text = tok.decode_tokens(self._tokens[self._prefix:self._read])
        new_text = tok.decode_tokens(self._tokens[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            # Keep only the last emitted token as context for the next window.
            drop = self._read
            self._tokens = self._tokens[drop:]
            self._prefix, self._read = 0, len(self._tokens)
            return delta
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character becomes U+FFFD)."""
        if self._byte_level:
            return self._utf8.decode(b"", final=True)
        tok = self.tokenizer
        prefix_text = tok.decode_tokens(self._tokens[self._prefix:self._read])
        new_text = tok.decode_tokens(self._tokens[self._prefix:])
        self._tokens, self._prefix, self._read = [], 0, 0
        return new_text[len(prefix_text):]

    def reset(self) -> None:
        """Forget all state, to start a new stream."""
        self._utf8.reset()
        self._tokens, self._prefix, self._read = [], 0, 0
