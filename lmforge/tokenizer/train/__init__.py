"""Training tokenizers: byte-level BPE (T1), WordPiece (T2) and Unigram (T3).

    from lmforge.tokenizer.train import train_tokenizer, read_training_texts

    tok = train_tokenizer(read_training_texts(["corpus.txt"]), algo="bpe", vocab_size=8000)
    tok.save("my-tokenizer")          # tokenizer.json that Hugging Face `tokenizers` loads too

Each algorithm comes with the normalizer, pre-tokenizer and decoder it is usually paired
with, written into the tokenizer.json so that any loader rebuilds the same pipeline:

=========  ==============  ===================================================  =========
algorithm  normalizer      pre-tokenizer                                        decoder
=========  ==============  ===================================================  =========
bpe        none            GPT-2 regex (or Llama-3 regex) + byte-level spelling ByteLevel
wordpiece  NFC (+lower)    BERT: whitespace + punctuation, CJK ideographs alone WordPiece
unigram    NFKC            Metaspace: spaces become ``▁`` that start each word  Metaspace
=========  ==============  ===================================================  =========

The trainers see each distinct pre-token once, with its count, so training time grows
with the number of distinct words, not with the corpus size.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.io import text_files
from lmforge.tokenizer.bytelevel import BYTE_TO_CHAR, text_to_symbols
from lmforge.tokenizer.normalizers import normalizer_from_dict
from lmforge.tokenizer.pretokenize import LLAMA3_PATTERN, pre_tokenizer_from_dict
from lmforge.tokenizer.tokenizer import Tokenizer

ALGORITHMS = ("bpe", "wordpiece", "unigram")
DEFAULT_SPECIAL_TOKENS = {
    "bpe": ("<|endoftext|>",),
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "unigram": ("<unk>", "<s>", "</s>"),
}
# BERT isolates CJK ideographs (it has no way to find word boundaries in them). The
# ranges are the CJK Unified Ideographs blocks and their extensions and compatibility forms.
CJK_IDEOGRAPHS = "[\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f]"


def pipeline_spec(algo: str, pre_tokenization: str = "gpt2", lowercase: bool = False) -> dict[str, Any]:
    """The tokenizer.json sections (normalizer, pre_tokenizer, decoder) for an algorithm."""
    if algo == "bpe":
        if pre_tokenization == "gpt2":
            pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        elif pre_tokenization == "llama3":
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
        else:
            raise LmforgeError(f"unknown pre-tokenization {pre_tokenization!r}: use gpt2 or llama3")
        return {"normalizer": None, "pre_tokenizer": pre,
                "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}}
    if algo == "wordpiece":
        normalizer: dict[str, Any] = {"type": "NFC"}
        if lowercase:
            normalizer = {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}
        return {"normalizer": normalizer,
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "BertPreTokenizer"},
                    {"type": "Split", "pattern": {"Regex": CJK_IDEOGRAPHS}, "behavior": "Isolated", "invert": False}]},
                "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True}}
    if algo == "unigram":
        return {"normalizer": {"type": "NFKC"},
                "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
                "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}}
    raise LmforgeError(f"unknown algorithm {algo!r}: use {', '.join(ALGORITHMS)}")


def count_words(texts: Iterable[str], spec: dict[str, Any], special_tokens: Sequence[str] = (),
                byte_level: bool = False) -> Counter[str]:
    """Distinct pre-tokens of the corpus with their counts, as the model will see them.

    Special tokens written in the text are cut out first (they are never merged into
    anything); byte-level pre-tokens are spelled in the byte alphabet.
    """
    normalizer = normalizer_from_dict(spec["normalizer"])
    pre = pre_tokenizer_from_dict(spec["pre_tokenizer"])
    assert pre is not None
    splitter = re.compile("|".join(map(re.escape, sorted(special_tokens, key=len, reverse=True)))) \
        if special_tokens else None
    counts: Counter[str] = Counter()
    for text in texts:
        segments = splitter.split(text) if splitter else [text]
        for k, segment in enumerate(segments):
            if normalizer is not None:
                segment = normalizer.normalize(segment)
            if segment:
                counts.update(pre.split([segment], k == 0))
    if byte_level:
        spelled: Counter[str] = Counter()
        for word, c in counts.items():
            spelled[text_to_symbols(word)] += c
        return spelled
    return counts


def read_training_texts(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Texts from .txt/.md files (blank-line-separated blocks) and .jsonl files (a text field)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise LmforgeError(f"training file not found: {path}")
        try:
            if path.suffix.lower() == ".jsonl":
                with open(path, encoding="utf-8") as f:
                    for n, record in text_files.parse_jsonl(f, path):
                        text = record.get(text_field) if isinstance(record, dict) else None
                        if not isinstance(text, str):
                            raise LmforgeError(f"{path}:{n}: no string field {text_field!r}")
                        yield text
            else:
                text = path.read_text(encoding="utf-8", errors="replace")
                yield from (block for block in re.split(r"\n\s*\n", text) if block.strip())
        except OSError as exc:
            raise LmforgeError(f"cannot read {path}: {exc.strerror or exc}") from None


def _assemble(spec: dict[str, Any], model: dict[str, Any], special_tokens: Sequence[str],
              vocab: dict[str, int], **roles: str | None) -> Tokenizer:
    from lmforge.tokenizer.formats.hf_json import tokenizer_from_dict

    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in special_tokens]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": spec["normalizer"], "pre_tokenizer": spec["pre_tokenizer"], "post_processor": None,
            "decoder": spec["decoder"], "model": model}
    return tokenizer_from_dict(data, **{k: v for k, v in roles.items() if v is not None})


def train_tokenizer(
    texts: Iterable[str],
    algo: str = "bpe",
    vocab_size: int = 8000,
    special_tokens: Sequence[str] | None = None,
    min_frequency: int | None = None,
    pre_tokenization: str = "gpt2",
    lowercase: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **options: Any,
) -> Tokenizer:
    """Train a tokenizer of ``algo`` on ``texts``; returns an lmforge Tokenizer (``.save(dir)``).

    ``options`` go to the algorithm's trainer (e.g. ``limit_alphabet`` for WordPiece,
    ``max_piece_length`` or ``seed_size`` for Unigram).
    """
    if algo not in ALGORITHMS:
        raise LmforgeError(f"unknown algorithm {algo!r}: use {', '.join(ALGORITHMS)}")
    specials = tuple(DEFAULT_SPECIAL_TOKENS[algo] if special_tokens is None else special_tokens)
    if len(set(specials)) != len(specials):
        raise LmforgeError("special tokens must be distinct")
    spec = pipeline_spec(algo, pre_tokenization, lowercase)
    words = count_words(texts, spec, specials, byte_level=algo == "bpe")
    if not words:
        raise LmforgeError("the training texts are empty")

    if algo == "bpe":
        from lmforge.tokenizer.train.bpe import train_bpe

        if vocab_size < len(specials) + 256:
            raise LmforgeError(f"--vocab-size must be at least {len(specials) + 256} for byte-level BPE "
                               "(256 byte symbols plus the special tokens)")
        result = train_bpe(words, vocab_size, specials, BYTE_TO_CHAR, min_frequency or 0, progress, **options)
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                 "vocab": result.vocab, "merges": [list(m) for m in result.merges]}
        eos = specials[0] if specials else None
        return _assemble(spec, model, specials, result.vocab, eos_token=eos)
    if algo == "wordpiece":
        from lmforge.tokenizer.train.wordpiece import train_wordpiece

        unk = "[UNK]" if "[UNK]" in specials else None
        if unk is None:
            raise LmforgeError("WordPiece needs [UNK] among the special tokens")
        vocab = train_wordpiece(words, vocab_size, specials, min_frequency=2 if min_frequency is None else min_frequency,
                                progress=progress, **options)
        model = {"type": "WordPiece", "unk_token": unk, "continuing_subword_prefix": "##",
                 "max_input_chars_per_word": 100, "vocab": vocab}
        return _assemble(spec, model, specials, vocab, unk_token=unk,
                         eos_token="[SEP]" if "[SEP]" in specials else None,
                         pad_token="[PAD]" if "[PAD]" in specials else None)
    from lmforge.tokenizer.train.unigram import train_unigram

    unk = "<unk>" if "<unk>" in specials else None
    if unk is None:
        raise LmforgeError("Unigram needs <unk> among the special tokens")
    specials = (unk,) + tuple(t for t in specials if t != unk)  # the unknown token has id 0
    try:
        pieces = train_unigram(words, vocab_size, specials, progress=progress, **options)
    except ValueError as exc:
        raise LmforgeError(str(exc)) from None
    model = {"type": "Unigram", "unk_id": 0, "vocab": [[p, s] for p, s in pieces], "byte_fallback": False}
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    return _assemble(spec, model, specials, vocab, unk_token=unk,
                     bos_token="<s>" if "<s>" in specials else None,
                     eos_token="</s>" if "</s>" in specials else None)


__all__ = ["ALGORITHMS", "count_words", "pipeline_spec", "read_training_texts", "train_tokenizer"]
