"""Sentence splitting, numbers, words and citation markers used by answering and groundedness."""

from __future__ import annotations

from lmforge.rag.text import (citation_numbers, content_words, is_chinese, keep_citations, numbers, split_sentences,
                              stem, strip_citations)


def test_sentences_split_in_english_and_chinese_but_not_inside_abbreviations_or_decimals():
    text = ("A KV cache stores keys [1]. It saves 45 MiB per token, e.g. for the default model. 3.14 is pi! "
            "快取保存鍵值。每一步只算新詞元？\n\n- item one\n- item two")
    assert split_sentences(text) == [
        "A KV cache stores keys [1].", "It saves 45 MiB per token, e.g. for the default model.", "3.14 is pi!",
        "快取保存鍵值。", "每一步只算新詞元？", "- item one", "- item two"]
    assert split_sentences("  \n\n ") == []


def test_numbers_are_normalized_so_a_changed_figure_is_seen():
    assert numbers("1,024 tokens, 45.5% of it, 2.1x faster, 360 MiB at step -3") == {"1024", "45.5%", "2.1", "360", "-3"}
    assert numbers("45 MiB") != numbers("46 MiB")
    assert numbers("no figures here, v2") == set()  # a digit inside a word is not a number


def test_citation_markers_are_read_filtered_and_stripped():
    assert citation_numbers("a [1] b [2, 3] c [1; 4]") == [1, 2, 3, 4]
    assert keep_citations("x [1, 7]. y [9].", {1, 2}) == "x [1]. y."
    assert strip_citations("The cache grows [2].") == "The cache grows."


def test_words_languages_and_stems():
    assert content_words("The caches are caching keys") == ["caches", "caching", "keys"]
    assert {stem(w) for w in ("cache", "caches", "cached", "caching")} == {"cach"}
    assert stem("studies") == "study" and stem("is") == "is"
    assert is_chinese("什麼是 KV cache？") and not is_chinese("What is a KV cache?")
