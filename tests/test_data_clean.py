"""D2: markup and boilerplate removal, unicode normalization, quality filters, language ID."""

from __future__ import annotations

import pytest

from lmforge.data.clean import QualityConfig, clean_text, normalize_unicode, quality_reasons, strip_html
from lmforge.data.corpora import load_source
from lmforge.data.langid import CharNgramLanguageIdentifier, identify_language, script_of
from lmforge.data.samples import MULTILINGUAL_SAMPLES
from lmforge.data.wikitext import strip_wiki_markup

PROSE = ("The river rises in the hills north of the town and flows south through farmland for about forty "
         "kilometres before it reaches the sea. In the nineteenth century it was used to carry timber, and "
         "several mills were built along its banks. Today the valley is known for its orchards and for a "
         "walking path that follows the water from the source to the coast.")


def test_html_and_boilerplate_are_removed():
    page = ("<html><head><style>p{color:red}</style></head><body><nav>Home | Login</nav>"
            "<p>First &amp; only <b>paragraph</b>.</p><script>alert(1)</script>"
            "<p>Second one.</p><footer>Copyright © 2024 Example. All rights reserved.</footer></body></html>")
    text = clean_text(page)
    assert text == "First & only paragraph.\n\nSecond one." or text == "First & only paragraph.\nSecond one."
    assert "alert" not in strip_html(page) and "color" not in strip_html(page)


def test_unicode_normalization_forms():
    decomposed = "Cafe\u0301 \ufb01le \uff21\u200b  x"
    assert normalize_unicode(decomposed, "NFC") == "Café \ufb01le \uff21 x"
    assert normalize_unicode(decomposed, "NFKC") == "Café file A x"


def test_wiki_markup_is_stripped():
    wiki = ("{{Infobox|name={{nested|x}}}}\n'''Anarchism''' is a [[political philosophy]] that "
            "[[self-governance|advocates]] things.<ref>Source</ref> See [http://example.com the site].\n"
            "[[File:Pic.jpg|thumb|A [[caption]] here]]\n{| class=wikitable\n|-\n| a || b\n|}\n"
            "== History ==\nEarly text.\n== References ==\n* a reference\n[[Category:Philosophy]]")
    text = strip_wiki_markup(wiki)
    assert text.startswith("Anarchism is a political philosophy that advocates things. See the site.")
    assert "History\n\nEarly text." in text
    for junk in ("{{", "[[", "<ref", "Source", "caption", "wikitable", "reference", "Category"):
        assert junk not in text


def test_real_wikipedia_articles_come_out_clean():
    docs = list(load_source("wiki"))
    assert 90 <= len(docs) <= 106  # redirects skipped
    for doc in docs:
        assert "[[" not in doc.text and "{{" not in doc.text and "<ref" not in doc.text
    assert docs[0].text.startswith("Anarchism\n\nAnarchism is a political philosophy")


@pytest.mark.parametrize("text,reason", [
    ("Too short to be a document.", "too_short"),
    ("buy cheap " * 60, "repeated_ngram"),
    ("\n".join(["Click to subscribe for updates"] * 10 + [PROSE]), "duplicate_lines"),
    ("#tag " * 40 + PROSE, "symbol_ratio"),
    ("12 345 6789 0.5 77 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31",
     "non_alpha_words"),
    ("Lorem ipsum dolor sit amet consectetur adipiscing elit sed eiusmod tempor incididunt labore dolore "
     "magna aliqua enim minim veniam quis nostrud exercitation ullamco laboris nisi aliquip commodo "
     "consequat duis aute irure reprehenderit voluptate velit esse cillum", "few_stop_words"),
])
def test_quality_rules_fire(text, reason):
    assert reason in quality_reasons(text, "en")


def test_good_prose_passes_and_thresholds_are_tunable():
    assert quality_reasons(PROSE, "en") == []
    assert "too_short" in quality_reasons(PROSE, "en", QualityConfig(min_words=500))
    # Word-based rules do not apply to text written without spaces.
    assert quality_reasons("图书馆早上九点开门，晚上六点关门。周末的时候阅览室比较安静，很多学生来这里做自己的项目，"
                           "也有人在这里看报纸和杂志，一直待到下午。", "zh") == []


def test_language_identifier_on_samples_and_real_text():
    for lang, texts in MULTILINGUAL_SAMPLES.items():
        for text in texts:
            assert identify_language(text).lang == lang, text
    assert identify_language(next(iter(load_source("bgwiki"))).text).lang == "bg"
    assert identify_language("def f(x): return x + 1").lang == "und"
    assert script_of("ж") == "Cyrillic" and script_of("7") is None


def test_char_ngram_identifier_learns_from_samples():
    train = {lang: texts[:1] for lang, texts in MULTILINGUAL_SAMPLES.items() if lang in ("en", "de", "fr", "es")}
    model = CharNgramLanguageIdentifier().fit(train)
    for lang in train:
        assert model.predict(MULTILINGUAL_SAMPLES[lang][1]) == lang
    probs = model.predict_proba("the weather was nice")
    assert abs(sum(probs.values()) - 1) < 1e-9 and next(iter(probs)) == "en"
