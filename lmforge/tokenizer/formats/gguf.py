"""The tokenizer stored in a GGUF file's metadata (llama.cpp's ``tokenizer.ggml.*`` keys).

A GGUF carries no tokenizer.json: it stores the token list, merges (byte-level vocabularies)
or scores (SentencePiece-style ones), a type per token, special ids, and the *name* of the
pre-tokenizer (``tokenizer.ggml.pre``). This module turns that into the same pipeline a
tokenizer.json would describe, so a GGUF model tokenizes exactly like its original release
and can be saved as tokenizer.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.tokenizer.added_tokens import AddedToken
from lmforge.tokenizer.bpe import BPE
from lmforge.tokenizer.decoders import (
    ByteFallbackDecoder,
    ByteLevelDecoder,
    DecoderSequence,
    FuseDecoder,
    ReplaceDecoder,
    StripDecoder,
)
from lmforge.tokenizer.normalizers import NormalizerSequence, Prepend, Replace
from lmforge.tokenizer.pretokenize import (
    DIGITS_THEN_GPT2_PATTERNS,
    GGUF_PRE_TOKENIZERS,
    GPT2_PATTERN,
    ByteLevel,
    Digits,
    PreTokenizer,
    PreTokenizerSequence,
    Split,
)
from lmforge.tokenizer.processors import template_processing
from lmforge.tokenizer.tokenizer import Tokenizer

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPIECE_SPACE = "\u2581"  # ▁


MetadataGetter = Callable[[str], Any]


def _metadata_getter(source: Any) -> MetadataGetter:
    """A function key -> plain Python value (None when absent) for any supported source.

    Accepts a path (parsed with lmforge's fast GGUF container reader), an open
    ``lmforge.io.gguf_file.GGUFFile`` or an open ``gguf.GGUFReader``, so a model loader that
    already parsed the file does not pay for it twice.
    """
    if hasattr(source, "fields"):  # gguf.GGUFReader
        fields = source.fields
        return lambda key: fields[key].contents() if key in fields else None
    if not hasattr(source, "metadata"):
        path = Path(os.fspath(source))
        if not path.is_file():
            raise LmforgeError(f"GGUF file not found: {path}")
        from lmforge.io.gguf_file import GGUFFile

        source = GGUFFile(path)
    metadata = source.metadata

    def get(key: str) -> Any:
        value = metadata.get(key)
        return value.tolist() if hasattr(value, "tolist") else value  # numpy arrays -> lists

    return get


def _pre_tokenizer(pre: str | None) -> tuple[PreTokenizer, bool]:
    """The pre-tokenizer for a ``tokenizer.ggml.pre`` name, and its ignore_merges flag."""
    name = pre or "default"
    if name not in GGUF_PRE_TOKENIZERS:
        raise LmforgeError(
            f"unsupported GGUF pre-tokenizer {name!r}; known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
        )
    patterns, ignore_merges = GGUF_PRE_TOKENIZERS[name]
    # Spell the two commonest cases the way the models' own tokenizer.json files do, so a
    # saved copy looks like the original release.
    if patterns == (GPT2_PATTERN,):
        return ByteLevel(add_prefix_space=False, use_regex=True), ignore_merges
    if patterns == DIGITS_THEN_GPT2_PATTERNS:
        stages: tuple[PreTokenizer, ...] = (Digits(individual_digits=True),
                                            ByteLevel(add_prefix_space=False, use_regex=True))
        return PreTokenizerSequence(stages), ignore_merges
    splits = tuple(Split({"Regex": p}, "isolated") for p in patterns)
    return PreTokenizerSequence((*splits, ByteLevel(add_prefix_space=False, use_regex=False))), ignore_merges


def _score_priorities(tokens: list[str], scores: list[float], types: list[int]) -> dict[tuple[str, str], float]:
    """Merge priorities for a SentencePiece vocabulary, which ships scores instead of merges.

    llama.cpp joins the adjacent pair whose concatenation is a vocabulary token with the best
    score. As BPE pairs: every split of every normal token into two tokens, with priority
    ``-score`` (lower merges first).
    """
    known = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    priorities: dict[tuple[str, str], float] = {}
    for token, index in known.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in known and right in known:
                priorities[(left, right)] = -float(scores[index])
    return priorities


def load_gguf_tokenizer(source: Any) -> Tokenizer:
    """``Tokenizer.from_gguf``."""
    field = _metadata_getter(source)
    model_kind = field("tokenizer.ggml.model")
    tokens = field("tokenizer.ggml.tokens")
    if model_kind is None or tokens is None:
        raise LmforgeError("this GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
    types = field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)

    def token_at(key: str) -> str | None:
        index = field(f"tokenizer.ggml.{key}")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    added = [
        AddedToken(i, tok, special=types[i] != USER_DEFINED)
        for i, tok in enumerate(tokens)
        if types[i] in (CONTROL, USER_DEFINED, UNKNOWN)
    ]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    add_bos = field("tokenizer.ggml.add_bos_token")
    add_eos = field("tokenizer.ggml.add_eos_token")
    unk_token = token_at("unknown_token_id")

    if model_kind == "gpt2":
        merges = []
        for line in field("tokenizer.ggml.merges") or []:
            cut = line.find(" ", 1)
            if cut > 0:
                merges.append((line[:cut], line[cut + 1:]))
        pre_tokenizer, ignore_merges = _pre_tokenizer(field("tokenizer.ggml.pre"))
        model = BPE(vocab, merges, ignore_merges=ignore_merges)
        normalizer = None
        decoder: Any = ByteLevelDecoder()
        add_bos = bool(add_bos) if add_bos is not None else ignore_merges  # llama-3 family adds BOS
    elif model_kind == "llama":
        scores = field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        model = BPE(vocab, pair_priority=_score_priorities(tokens, scores, types),
                    byte_fallback=True, unk_token=unk_token)
        space_prefix = field("tokenizer.ggml.add_space_prefix")
        space_prefix = True if space_prefix is None else bool(space_prefix)
        escape = Replace({"String": " "}, SPIECE_SPACE)
        normalizer = NormalizerSequence((Prepend(SPIECE_SPACE), escape)) if space_prefix else escape
        pre_tokenizer = None
        steps: list[Any] = [ReplaceDecoder({"String": SPIECE_SPACE}, " "), ByteFallbackDecoder(), FuseDecoder()]
        if space_prefix:
            steps.append(StripDecoder(" ", 1, 0))
        decoder = DecoderSequence(tuple(steps))
        add_bos = True if add_bos is None else bool(add_bos)
    else:
        raise LmforgeError(
            f"unsupported GGUF tokenizer model {model_kind!r}: lmforge reads 'gpt2' (byte-level BPE) "
            "and 'llama' (SentencePiece-style BPE) vocabularies"
        )

    bos_token, eos_token = token_at("bos_token_id"), token_at("eos_token_id")
    bos = (bos_token, vocab[bos_token]) if add_bos and bos_token is not None else None
    eos = (eos_token, vocab[eos_token]) if add_eos and eos_token is not None else None
    extra_eos = [vocab[t] for key in ("eot_token_id", "eom_token_id") if (t := token_at(key)) is not None]
    template = field("tokenizer.chat_template")
    return Tokenizer(
        model,
        normalizer=normalizer,
        pre_tokenizer=pre_tokenizer,
        decoder=decoder,
        post_processor=template_processing(bos, eos),
        added_tokens=added,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=token_at("padding_token_id"),
        unk_token=unk_token,
        chat_template=template if isinstance(template, str) else None,
        extra_eos_ids=extra_eos,
        add_bos_token=bool(add_bos),
        add_eos_token=bool(add_eos),
    )
