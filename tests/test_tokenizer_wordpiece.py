"""WordPiece at run time: all-MiniLM-L6-v2's tokenizer.json against Hugging Face `tokenizers`."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.normalizers import BertNormalizer
from lmforge.tokenizer.padding import Truncation
from lmforge.tokenizer.pretokenize import BertPreTokenizer

VARIED = [
    "Hello World, café!", "", "   ", "\t\n\r ", "A man is playing a guitar.",
    "Crème brûlée à la façon de l'Élysée", "ÄÖÜ ß ǅ İstanbul ΟΔΥΣΣΕΥΣ ΣΑΣ Σ", "UPPERCASE Words And MiXeD case",
    "北京是中国的首都。我爱自然语言处理！", "日本語のテキストとカタカナ、한국어 텍스트", "\U0002a6a5 \U0002b740 \U0002b820 cjk ext",
    "price: $3,499.99 (approx.) — 50% off!!! #deal @you ~ ^_^ <tag> a|b `x` {y} [z]",
    "numbers 1234567890 3.14159 1e-10 ٣٤٥ ⅫⅣ ²³ ½", "emoji 😀🚀👍🏽 👨‍👩‍👧 ❤️ ☃ 🤗🤗🤗",
    "a" * 150, "x" * 99 + " " + "y" * 100 + " " + "z" * 101, "supercalifragilisticexpialidocious pneumonoultramicroscopic",
    "[CLS] inside [SEP] text [MASK] and [UNK] [PAD]", "lowercase [mask] is not special",
    "zero\u200bwidth\ufeffjoin\u00a0nbsp\u3000ideo space\x00nul\x07bell\u0085nel\u2028line",
    "control\x1c\x1d\x1e\x1fchars \ufffd replacement \ue000 private \u0890 new format",
    "Ωmega ﬁ ligature ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "tab\tseparated\nlines\r\nwindows", "don't won't it's I'm we've",
    "e\u0301 combining acute, o\u0308, n\u0303", "URL https://example.com/a?b=c&d=e#frag email a.b@c.de",
    "\u0130\u0049\u0131 turkish", "Ελληνικά ΑΣ", "    leading and trailing spaces    ",
]


@pytest.fixture(scope="module")
def pair(minilm_dir):
    """(lmforge's tokenizer, tokenizers' with no truncation or padding) for all-MiniLM-L6-v2."""
    from tokenizers import Tokenizer as Reference

    ref = Reference.from_file(str(minilm_dir / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    return Tokenizer.from_pretrained_dir(minilm_dir), ref


def test_pipeline_is_read_as_bert(pair):
    ours, _ = pair
    assert isinstance(ours.normalizer, BertNormalizer) and ours.normalizer.lowercase
    assert isinstance(ours.pre_tokenizer, BertPreTokenizer)
    assert ours.post_processor.prefix == [101] and ours.post_processor.suffix == [102]
    assert ours.pad_id == 0 and ours.unk_id == 100
    assert ours.truncation == Truncation(128) and ours.padding.length == 128


@pytest.mark.parametrize("text", VARIED)
def test_ids_equal_tokenizers_on_varied_text(pair, text):
    ours, ref = pair
    assert ours.encode(text) == ref.encode(text).ids
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids


def test_empty_and_whitespace_give_only_cls_sep(pair):
    ours, _ = pair
    assert ours.encode("") == ours.encode(" \t\n ") == [101, 102]
    assert ours.encode("a" * 101) == [101, 100, 102]  # longer than max_input_chars_per_word: [UNK]


def old_stable_code_points() -> list[int]:
    """Code points assigned by Unicode 3.2 whose category has not changed since.

    `tokenizers` classifies characters with older Unicode tables than Python's and `regex`'s;
    characters assigned later (e.g. U+2E4F, punctuation since Unicode 11) may differ.
    """
    old = unicodedata.ucd_3_2_0
    return [c for c in range(0x110000) if not 0xD800 <= c < 0xE000
            and old.category(chr(c)) != "Cn" and old.category(chr(c)) == unicodedata.category(chr(c))]


def test_ids_equal_tokenizers_on_random_unicode(pair):
    ours, ref = pair
    pool = old_stable_code_points()
    rng = random.Random(0)
    texts = ["".join(chr(rng.choice(pool)) if rng.random() < 0.6 else chr(rng.randrange(0x20, 0x7F))
                     for _ in range(rng.randint(0, 16))) for _ in range(3000)]
    expected = [e.ids for e in ref.encode_batch(texts)]
    mismatched = [t for t, e in zip(texts, expected) if ours.encode(t) != e]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} differ, e.g. {mismatched[:3]!r}"


def test_truncation_keeps_cls_and_sep(pair, minilm_dir):
    from tokenizers import Tokenizer as Reference

    ours, ref = pair
    texts = ["word " * 300, "short text", "", "medium length text here " * 10]
    # The file's own section (128, right): what `tokenizers` does on loading it.
    from_file = Reference.from_file(str(minilm_dir / "tokenizer.json"))
    from_file.no_padding()
    assert ours.encode_batch(texts, max_length=True) == [e.ids for e in from_file.encode_batch(texts)]
    assert [len(ids) for ids in ours.encode_batch(texts, max_length=True)] == [128, 4, 2, 42]
    long = ours.encode(texts[0], max_length=256)
    assert len(long) == 256 and long[0] == 101 and long[-1] == 102
    ref.enable_truncation(256)
    try:
        assert ours.encode_batch(texts, max_length=256) == [e.ids for e in ref.encode_batch(texts)]
        ref.enable_truncation(7, direction="left")
        left = Tokenizer.from_pretrained_dir(minilm_dir)
        left.truncation = Truncation(7, "left")
        assert left.encode_batch(texts, max_length=True) == [e.ids for e in ref.encode_batch(texts)]
    finally:
        ref.no_truncation()
    assert ours.encode("hello world", max_length=2) == [101, 102]
    with pytest.raises(LmforgeError, match="no room for the 2 special tokens"):
        ours.encode("hello world", max_length=1)
    assert ours.encode("hello world", add_special_tokens=False, max_length=1) == [7592]


def test_padding_to_the_longest_with_attention_mask(pair):
    ours, ref = pair
    texts = ["The quick brown fox jumps over the lazy dog.", "Hi", "", "Ünïcödé and 中文 mixed"]
    ref.enable_padding()
    try:
        expected = ref.encode_batch(texts)
    finally:
        ref.no_padding()
    batch = ours.pad(ours.encode_batch(texts))
    assert batch.input_ids == [e.ids for e in expected]
    assert batch.attention_mask == [e.attention_mask for e in expected]
    assert batch.lengths == [sum(e.attention_mask) for e in expected]
    assert {len(row) for row in batch.input_ids} == {max(batch.lengths)}
    fixed = ours.pad([[101, 5, 102], [101, 102]], length=6, pad_to_multiple_of=4)
    assert fixed.input_ids == [[101, 5, 102, 0, 0, 0, 0, 0], [101, 102, 0, 0, 0, 0, 0, 0]]
    assert fixed.attention_mask == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]


def test_saved_tokenizer_keeps_its_sections_and_ids(pair, tmp_path):
    from tokenizers import Tokenizer as Reference

    ours, _ = pair
    ours.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["normalizer"]["type"] == "BertNormalizer" and data["pre_tokenizer"] == {"type": "BertPreTokenizer"}
    assert data["truncation"]["max_length"] == 128 and data["padding"]["strategy"] == {"Fixed": 128}
    again = Reference.from_file(str(tmp_path / "tokenizer.json"))
    again.no_padding()
    texts = VARIED + ["word " * 200]
    assert [e.ids for e in again.encode_batch(texts)] == Tokenizer.from_pretrained_dir(tmp_path).encode_batch(
        texts, max_length=True)
