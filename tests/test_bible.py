"""The offline parallel corpus read from SWORD modules (needs diatheke: scripts/install-bible.sh)."""

from __future__ import annotations

import shutil

import pytest

from lmforge.data import bible
from lmforge.errors import LmforgeError

needs_diatheke = pytest.mark.skipif(shutil.which("diatheke") is None,
                                    reason="diatheke and the SWORD modules are not installed (scripts/install-bible.sh)")


def test_clean_verse_drops_strongs_numbers_and_paragraph_signs():
    assert bible.clean_verse("¶ For God sent not his Son into the <G3588> world  ") == \
        "For God sent not his Son into the world"
    assert bible.clean_verse("no markup") == "no markup"


def test_book_split_is_disjoint_and_checked():
    split = bible.split_books()
    assert sum(len(v) for v in split.values()) == len(bible.BOOKS) == 66
    assert not set(split["test"]) & set(split["train"]) and not set(split["validation"]) & set(split["train"])
    with pytest.raises(LmforgeError, match="unknown book"):
        bible.split_books(test=("Hezekiah",))
    with pytest.raises(LmforgeError, match="both"):
        bible.split_books(test=("Ruth",), validation=("Ruth",))


def _verses(lengths_en, lengths_es):
    return [(bible.Verse("Numbers", 13, i + 1, "x" * a), bible.Verse("Numbers", 13, i + 1, "y" * b))
            for i, (a, b) in enumerate(zip(lengths_en, lengths_es))]


def test_a_chapter_numbered_one_verse_apart_is_recognised():
    lengths = [40, 180, 75, 300, 22, 140, 90, 260, 55, 120]
    aligned = _verses(lengths, [int(n * 0.9) for n in lengths])
    shifted = _verses(lengths, [int(n * 0.9) for n in lengths[1:] + [60]])
    assert not bible._shifted(aligned)
    assert bible._shifted(shifted)


@pytest.mark.slow  # reads whole SWORD modules (~6 s)
@needs_diatheke
def test_parallel_verses_are_aligned_by_reference():
    pairs = bible.parallel_verses("kjv", "rv1909", ["John", "Jonah"])
    by_ref = {en.reference: (en.text, es.text) for en, es in pairs}
    en, es = by_ref["John 3:16"]
    assert en.startswith("For God so loved the world") and es.startswith("Porque de tal manera amó Dios al mundo")
    assert all("<" not in e + s and "¶" not in e + s for e, s in by_ref.values())
    # Jonah 1:17 in English is Jonah 2:1 in the Spanish numbering: both chapters are left out
    assert not any(ref.startswith("Jonah 1:") or ref.startswith("Jonah 2:") for ref in by_ref)
    assert any(ref.startswith("Jonah 3:") for ref in by_ref)
    assert len([r for r in by_ref if r.startswith("John ")]) == 879  # every verse of John


@pytest.mark.slow  # seconds of the fast suite: run with the slow tests
@needs_diatheke
def test_bible_dataset_splits_by_book():
    from lmforge.tune.datasets import make_dataset

    splits = make_dataset("bible-en-es", sizes={"train": 50, "validation": 10, "test": 20})
    assert {k: len(v) for k, v in splits.items()} == {"train": 50, "validation": 10, "test": 20}
    books = {k: {r["book"] for r in v} for k, v in splits.items()}
    assert all(r["reference"].startswith(r["book"] + " ") for v in splits.values() for r in v)
    held = set(bible.DEFAULT_TEST_BOOKS) | set(bible.DEFAULT_VALIDATION_BOOKS)
    assert not books["train"] & held
    assert books["test"] <= set(bible.DEFAULT_TEST_BOOKS)
    first = splits["test"][0]
    assert first["messages"][0]["content"].startswith("Translate this verse into Spanish: ")
    assert first["answer"] == first["messages"][1]["content"] and first["answer"]


def test_missing_module_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(bible, "installed_modules", lambda: ["engKJV2006eb"])
    with pytest.raises(LmforgeError, match="sword-text-sparv"):
        bible.resolve_module("rv1909")
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    with pytest.raises(LmforgeError, match="diatheke is not installed"):
        bible._diatheke()
