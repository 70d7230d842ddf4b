"""The ``Tokenizer``: text <-> ids for every model lmforge runs.

One object ties together the stages that a ``tokenizer.json`` (or a GGUF file's tokenizer
metadata) describes::

    text -> added tokens split out -> normalizer -> pre-tokenizer -> BPE -> post-processor -> ids
    ids  -> token strings -> decoder -> text

Batches for encoders add two steps (see `padding.py`): truncation to the model's longest
input (``max_length``) and padding to a rectangle with an attention mask (`pad`).

Each stage lives in its own module; this one only wires them together and offers the small
public API the rest of lmforge uses (encode/decode, special ids, chat templates, save).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.tokenizer.added_tokens import AddedToken, AddedTokenSplitter
from lmforge.tokenizer.bpe import BPE
from lmforge.tokenizer.bytelevel import token_bytes
from lmforge.tokenizer.decoders import ByteLevelDecoder, Decoder
from lmforge.tokenizer.normalizers import Normalizer
from lmforge.tokenizer.padding import Batch, Padding, Truncation, pad, truncate
from lmforge.tokenizer.pretokenize import PreTokenizer, defers_byte_spelling
from lmforge.tokenizer.processors import PostProcessor

# Token strings that end a turn or a document in common chat models. When the vocabulary
# marks one of them as special, generation must stop on it even if the file's single
# `eos` id names another (SmolLM2 and Qwen2 end turns with <|im_end|> but documents with
# <|endoftext|>, Llama-3 uses <|eot_id|>).
END_OF_GENERATION_TOKENS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "</s>", "<eos>", "<EOT>", "<|return|>", "<|call|>", "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
})


class Tokenizer:
    """Byte-level or SentencePiece-style BPE tokenizer with chat templates.

    Build one with :meth:`from_file` (tokenizer.json), :meth:`from_pretrained_dir` (a Hugging
    Face model directory) or :meth:`from_gguf` (a GGUF model file). The constructor takes the
    already-built stages; it is public for tests and for trainers that build vocabularies.
    """

    def __init__(
        self,
        model: BPE,
        *,
        normalizer: Normalizer | None = None,
        pre_tokenizer: PreTokenizer | None = None,
        decoder: Decoder | None = None,
        post_processor: PostProcessor | None = None,
        added_tokens: Iterable[AddedToken] = (),
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        truncation: Truncation | None = None,
        padding: Padding | None = None,
    ) -> None:
        self.model = model
        self.normalizer = normalizer
        self.pre_tokenizer = pre_tokenizer
        self.decoder = decoder
        self.post_processor = post_processor or PostProcessor()
        self.added_tokens: list[AddedToken] = sorted(added_tokens, key=lambda t: t.id)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.chat_template = chat_template
        # Only written back on save when they were stated: transformers rebuilds the
        # post-processor from them when present.
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        # tokenizer.json's own truncation/padding sections: the defaults `max_length=True`
        # and `pad` use (encoding never truncates unless asked, as in transformers).
        self.truncation, self.padding = truncation, padding

        if defers_byte_spelling(pre_tokenizer):
            model.byte_level = True
        self._splitter = AddedTokenSplitter(self.added_tokens, normalizer.normalize if normalizer else None)
        self._has_added = bool(self._splitter.by_match)

        self._id_to_token: dict[int, str] = dict(model.id_to_token)
        self._token_to_id: dict[str, int] = dict(model.vocab)
        for t in self.added_tokens:
            # A normalized added token decodes to its normalized spelling, as in `tokenizers`.
            shown = normalizer.normalize(t.content) if normalizer and t.normalized else t.content
            self._id_to_token[t.id] = shown
            self._token_to_id[t.content] = t.id
        self.special_ids: frozenset[int] = frozenset(t.id for t in self.added_tokens if t.special)
        self._vocab_size = max(self._id_to_token, default=-1) + 1

        # Byte-level decoding is by far the commonest; precompute each id's bytes once.
        self._id_bytes: list[bytes] | None = None
        if isinstance(decoder, ByteLevelDecoder):
            table = [b""] * self._vocab_size
            for i, tok in self._id_to_token.items():
                table[i] = token_bytes(tok)
            self._id_bytes = table
            self._id_bytes_no_special = [b"" if i in self.special_ids else b for i, b in enumerate(table)]

        eog = {self._token_to_id[t] for t in END_OF_GENERATION_TOKENS if t in self._token_to_id}
        eog &= set(self.special_ids)
        self.eos_ids: frozenset[int] = frozenset(
            {i for i in (self.eos_id,) if i is not None} | eog | set(extra_eos_ids)
        )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json``."""
        from lmforge.tokenizer.formats.hf_json import load_tokenizer_json

        return load_tokenizer_json(Path(path))

    @classmethod
    def from_pretrained_dir(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load a model directory: tokenizer.json plus tokenizer_config.json and friends."""
        from lmforge.tokenizer.formats.hf_json import load_pretrained_dir

        return load_pretrained_dir(Path(directory))

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | Any) -> Tokenizer:
        """Read the tokenizer stored in a GGUF file's metadata.

        ``source`` is a path, or a file the caller already opened: an
        ``lmforge.io.gguf_file.GGUFFile`` or a ``gguf.GGUFReader`` (parsing a large file
        twice is wasted time, so a model loader that has one open should pass it).
        """
        from lmforge.tokenizer.formats.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(source)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (largest id + 1): the embedding rows needed."""
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._id_to_token.get(token_id)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self._token_to_id.get(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._special_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._special_id(self.pad_token)

    @property
    def unk_id(self) -> int | None:
        return self._special_id(self.unk_token)

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = True, max_length: int | bool | None = None) -> list[int]:
        """Token ids of ``text``.

        Added tokens written in the text (``<|im_start|>``) always become their single id, as
        in Hugging Face ``tokenizers``; ``add_special_tokens`` only controls the BOS/EOS-style
        tokens the post-processor wraps around the text.

        ``max_length`` truncates: the result, special tokens included, has at most that many
        ids; the text's tokens are cut from the end the tokenizer's truncation section names
        (the right one by default). ``True`` uses that section's own length.
        """
        if not isinstance(text, str):
            raise LmforgeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        segments = self._splitter.split_raw(text) if self._has_added else [text] if text else []
        try:
            for index, segment in enumerate(segments):
                if isinstance(segment, int):
                    ids.append(segment)
                else:
                    self._encode_segment(segment, index == 0, ids)
        except UnicodeEncodeError as exc:
            raise LmforgeError(
                f"text contains a lone surrogate ({exc.object[exc.start]!r} at {exc.start}), which is not "
                "valid unicode; decode the input with errors='replace' first"
            ) from None
        if max_length is not None and max_length is not False:
            limit, direction = self._truncation_limit(max_length)
            reserved = self.post_processor.added_count() if add_special_tokens else 0
            ids = truncate(ids, limit, reserved, direction)
        return self.post_processor.apply(ids) if add_special_tokens else ids

    def _truncation_limit(self, max_length: int | bool) -> tuple[int, str]:
        direction = self.truncation.direction if self.truncation else "right"
        if max_length is True:
            if self.truncation is None:
                raise LmforgeError("this tokenizer has no truncation settings; pass max_length as a number")
            return self.truncation.max_length, direction
        if max_length < 1:
            raise LmforgeError(f"max_length must be at least 1, got {max_length}")
        return int(max_length), direction

    def _encode_segment(self, text: str, at_start: bool, out: list[int]) -> None:
        if self.normalizer is not None:
            text = self.normalizer.normalize(text)
        parts = self._splitter.split_normalized(text) if self._splitter.has_normalized else [text]
        for index, part in enumerate(parts):
            if isinstance(part, int):
                out.append(part)
            elif not part:
                continue  # normalized away: nothing to pre-tokenize (not even a "▁" prefix)
            elif self.pre_tokenizer is not None:
                pieces = self.pre_tokenizer.split([part], at_start and index == 0)
                self.model.encode_pieces(pieces, out)
            else:
                self.model.encode_pieces((part,), out)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True,
                     max_length: int | bool | None = None) -> list[list[int]]:
        """Encode several texts (sequentially: the per-piece cache makes that fast enough)."""
        return [self.encode(t, add_special_tokens, max_length) for t in texts]

    def pad(self, sequences: Sequence[Sequence[int]], length: int | None = None,
            pad_to_multiple_of: int | None = None) -> Batch:
        """Pad encoded sequences to the longest (or to ``length``) with an attention mask.

        The pad id, side and default multiple come from the tokenizer's padding section, or
        else its pad token (id 0 when it has none), on the right.
        """
        base = self.padding or Padding(self.pad_id if self.pad_id is not None else 0, self.pad_token or "")
        settings = Padding(base.pad_id, base.pad_token, base.pad_type_id, base.direction, length,
                           pad_to_multiple_of if pad_to_multiple_of is not None else base.pad_to_multiple_of)
        return pad(sequences, settings)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Ids outside the vocabulary are ignored, as in ``tokenizers``."""
        ids = list(ids)
        table = self._id_bytes
        if table is not None:
            if not ids or (min(ids) >= 0 and max(ids) < len(table)):
                pick = self._id_bytes_no_special if skip_special_tokens else table
                return b"".join([pick[i] for i in ids]).decode("utf-8", "replace")
        return self.decode_tokens(self.ids_to_tokens(ids, skip_special_tokens))

    def ids_to_tokens(self, ids: Iterable[int], skip_special_tokens: bool = False) -> list[str]:
        """Token strings of the known ids (special ones dropped if asked)."""
        get = self._id_to_token.get
        special = self.special_ids if skip_special_tokens else frozenset()
        return [tok for i in ids if i not in special and (tok := get(i)) is not None]

    def decode_tokens(self, tokens: list[str]) -> str:
        """Run the decoder over token strings (no decoder: tokens joined by spaces)."""
        if self.decoder is None:
            return " ".join(tokens)
        return "".join(self.decoder.decode_chain(tokens))

    @property
    def decodes_bytes(self) -> bool:
        """True when every id stands for a fixed byte string (byte-level vocabularies)."""
        return self._id_bytes is not None

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes one id stands for, when the vocabulary is byte-level (else None)."""
        if self._id_bytes is None or not 0 <= token_id < len(self._id_bytes):
            return None
        return self._id_bytes[token_id]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation with the model's own Jinja chat template.

        Returns the prompt text, or its ids when ``tokenize`` (encoded without extra BOS: the
        template writes every special token it wants). Extra keyword arguments (``tools``,
        ``documents``, ``chat_template`` to override, anything a template reads) are passed on.
        """
        from lmforge.tokenizer.chat_template import render_chat_template

        template = kwargs.pop("chat_template", None) or self.chat_template
        if not template:
            raise LmforgeError(
                "this tokenizer has no chat template; pass chat_template=... or use a chat/instruct model"
            )
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "unk_token": self.unk_token, "pad_token": self.pad_token}
        variables = {k: v for k, v in special.items() if v is not None}
        variables.update(kwargs)
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------ saving
    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json atomically."""
        from lmforge.tokenizer.formats.hf_json import save_pretrained_dir

        save_pretrained_dir(self, Path(directory))

    def __repr__(self) -> str:
        kind = "byte-level BPE" if self.model.byte_level else "BPE"
        return (f"Tokenizer({kind}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'no'})")
