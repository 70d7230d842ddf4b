"""Language identification: writing system first, then function words (D2).

What it can do, and how well:

* **Script**: every character is looked up in a table of unicode blocks (Latin, Cyrillic,
  Greek, Arabic, Hebrew, Devanagari, Han, Kana, Hangul, Thai, ...). Scripts used by one
  major language settle the question at once: Hangul -> Korean, kana (with or without
  Han) -> Japanese, Han alone -> Chinese, Greek, Hebrew, Thai, Georgian, Armenian, and the
  Indic scripts. This is reliable on any text a few characters long.
* **Latin and Cyrillic languages** share a script, so the identifier counts the most
  frequent function words of each candidate (English, German, French, Spanish, Italian,
  Portuguese, Dutch, Swedish, Polish, Turkish, Indonesian, Finnish; Russian, Ukrainian,
  Bulgarian). Function words make up a third to a half of running text in these
  languages, so a sentence or two is usually enough; single words, names, lists and code
  come back as ``und`` (undetermined) with their script.
* It cannot separate close relatives it has no list for (Norwegian vs Danish, Serbian vs
  Croatian in Latin letters), Arabic-script languages (Arabic vs Persian vs Urdu) or
  Devanagari ones (Hindi vs Marathi vs Nepali): those get the script's main language.

For anything beyond that, :class:`CharNgramLanguageIdentifier` is a small naive Bayes
classifier over character 1-3-grams that you fit on a few sentences per language.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# (first code point, last code point, script), sorted by first code point.
_SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x005A, "Latin"), (0x0061, 0x007A, "Latin"), (0x00C0, 0x024F, "Latin"),
    (0x0370, 0x03FF, "Greek"), (0x0400, 0x052F, "Cyrillic"), (0x0530, 0x058F, "Armenian"),
    (0x0590, 0x05FF, "Hebrew"), (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"),
    (0x08A0, 0x08FF, "Arabic"), (0x0900, 0x097F, "Devanagari"), (0x0980, 0x09FF, "Bengali"),
    (0x0A00, 0x0A7F, "Gurmukhi"), (0x0A80, 0x0AFF, "Gujarati"), (0x0B80, 0x0BFF, "Tamil"),
    (0x0C00, 0x0C7F, "Telugu"), (0x0C80, 0x0CFF, "Kannada"), (0x0D00, 0x0D7F, "Malayalam"),
    (0x0E00, 0x0E7F, "Thai"), (0x10A0, 0x10FF, "Georgian"), (0x1100, 0x11FF, "Hangul"),
    (0x1200, 0x137F, "Ethiopic"), (0x1E00, 0x1EFF, "Latin"), (0x1F00, 0x1FFF, "Greek"),
    (0x3040, 0x309F, "Kana"), (0x30A0, 0x30FF, "Kana"), (0x3130, 0x318F, "Hangul"),
    (0x31F0, 0x31FF, "Kana"), (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"),
    (0xAC00, 0xD7AF, "Hangul"), (0xF900, 0xFAFF, "Han"), (0xFB50, 0xFDFF, "Arabic"),
    (0xFE70, 0xFEFF, "Arabic"), (0xFF66, 0xFF9F, "Kana"), (0x20000, 0x2FA1F, "Han"),
)
_RANGE_STARTS = [r[0] for r in _SCRIPT_RANGES]

# Scripts that (for this identifier) mean one language.
SCRIPT_LANGUAGE = {
    "Greek": "el", "Armenian": "hy", "Hebrew": "he", "Arabic": "ar", "Devanagari": "hi",
    "Bengali": "bn", "Gurmukhi": "pa", "Gujarati": "gu", "Tamil": "ta", "Telugu": "te",
    "Kannada": "kn", "Malayalam": "ml", "Thai": "th", "Georgian": "ka", "Hangul": "ko",
    "Ethiopic": "am", "Kana": "ja", "Han": "zh",
}
SPACELESS_LANGUAGES = frozenset({"zh", "ja", "th"})

# The commonest function words of each language (our own short lists: articles,
# pronouns, prepositions, conjunctions, auxiliaries). Words shared by several languages
# are fine: the decision is relative.
STOP_WORDS: dict[str, frozenset[str]] = {lang: frozenset(words.split()) for lang, words in {
    "en": "the of and to in is that it was for on are as with he they at be this from have or by "
          "one had not but what all were when we there can an which their said if do will each about "
          "how up out them then she many some so these would has him into more her two its who",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an "
          "werden aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum "
          "war haben nur oder aber vor zur bis mehr durch man",
    "fr": "le de la les et des en du un une est que pour qui dans par sur pas au plus ne se ce il "
          "avec sont aux son sa ou mais été elle nous vous leur ces cette comme tout fait être lui",
    "es": "el la de que y en los del se las por un para con no una su al es lo como más pero sus le "
          "ya o fue este ha sí porque esta son entre cuando muy sin sobre también me hasta hay donde",
    "it": "il di che e la in un per non una del le è della con si da dei sono al alla gli nel anche "
          "come ma più lo ha delle questo suo ci tra loro nella fra essere stato sua quando",
    "pt": "o de a que e do da em um para é com não uma os no se na por mais as dos como mas foi ao "
          "ele das tem à seu sua ou ser quando muito há nos já está também só pelo pela até isso",
    "nl": "de en van het een in is dat op te zijn met voor niet aan er om die ook als bij door maar "
          "uit dan wordt nog ze naar over was worden kan wel zo hij deze heeft hebben geen",
    "sv": "och i att det som en på är av för med till den har de inte om ett han men var jag sig "
          "från vi så kan man när år säger hon under också efter eller nu sin där vid mot",
    "pl": "i w na z się nie do to że jest o jak a po co tak za od ale przez jego jej już są dla "
          "może tylko być by czy też ich który która było jednak także oraz tym",
    "tr": "ve bir bu da de için ile olarak çok daha gibi olan en ama ne var sonra kadar her o "
          "değil veya ya ise hem şey bile nasıl yok ki mi",
    "id": "yang dan di ini itu dengan untuk dari dalam tidak akan pada ke juga ada adalah atau "
          "oleh karena sudah saya mereka kami bisa telah tersebut lebih seperti",
    "fi": "ja on ei se että oli hän ovat mutta kun niin kuin myös tai joka sen ole vain jos jo "
          "hänen mitä voi ollut siitä sitä minä sekä kanssa",
    "ru": "и в не на что с по как это он к но из у за от то же все так его для о а она был вы "
          "бы мы уже только ли было когда или если при их был быть был была были",
    "uk": "і в не на що з та як це до по у за від але він я так його для про вона ти ми вже "
          "лише чи було коли або якщо при їх бути була були є її",
    "bg": "и на в да се за от с не е са по че както като това той но към ще при от до тя те "
          "един една след бе беше може които който която или има във със",
}.items()}

_LATIN_CANDIDATES = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "pl", "tr", "id", "fi")
_CYRILLIC_CANDIDATES = ("ru", "uk", "bg")
# Letters that only one of the Cyrillic candidates uses.
_CYRILLIC_MARKERS = {"uk": set("іїєґ"), "ru": set("ыэё")}
_WORD = re.compile(r"[^\W\d_]+")


def script_of(ch: str) -> str | None:
    """The script of one character (None for digits, punctuation, spaces, symbols)."""
    cp = ord(ch)
    i = bisect.bisect_right(_RANGE_STARTS, cp) - 1
    if i >= 0:
        start, end, script = _SCRIPT_RANGES[i]
        if start <= cp <= end:
            return script
    return None


def script_histogram(text: str, limit: int = 5000) -> Counter[str]:
    """How many letters of each script the first ``limit`` characters contain."""
    counts: Counter[str] = Counter()
    for ch in text[:limit]:
        if ch.isalpha():
            counts[script_of(ch) or "Other"] += 1
    return counts


def is_spaceless_script(lang: str) -> bool:
    """True for languages written without spaces between words (word counts mislead)."""
    return lang in SPACELESS_LANGUAGES


@dataclass(frozen=True)
class LanguageGuess:
    lang: str  # ISO 639-1 code, or "und" when undetermined
    script: str  # dominant script ("None" for text without letters)
    confidence: float  # 0..1


def _vote(words: list[str], candidates: Iterable[str]) -> tuple[str, float, int]:
    hits = {lang: sum(1 for w in words if w in STOP_WORDS[lang]) for lang in candidates}
    best = max(hits, key=lambda lang: (hits[lang], -list(hits).index(lang)))
    total = sum(hits.values())
    return best, (hits[best] / total if total else 0.0), hits[best]


def identify_language(text: str, limit: int = 5000) -> LanguageGuess:
    """Best guess of ``text``'s language from its script and function words."""
    scripts = script_histogram(text, limit)
    letters = sum(scripts.values())
    if not letters:
        return LanguageGuess("und", "None", 0.0)
    script, count = scripts.most_common(1)[0]
    share = count / letters
    # Japanese mixes Han and kana; a little kana among Han characters means Japanese.
    cjk = scripts["Han"] + scripts["Kana"]
    if cjk and cjk / letters > 0.5 and scripts["Kana"] >= 0.05 * cjk:
        return LanguageGuess("ja", "Kana" if scripts["Kana"] >= scripts["Han"] else "Han", cjk / letters)
    if script in SCRIPT_LANGUAGE:
        return LanguageGuess(SCRIPT_LANGUAGE[script], script, share)
    words = [w.lower() for w in _WORD.findall(text[:limit])]
    if script == "Cyrillic":
        chars = set(text[:limit].lower())
        if chars & _CYRILLIC_MARKERS["uk"]:
            return LanguageGuess("uk", script, share)
        if chars & _CYRILLIC_MARKERS["ru"]:
            return LanguageGuess("ru", script, share)
        lang, conf, hits = _vote(words, ("ru", "bg"))
        return LanguageGuess(lang if hits >= 2 else "und", script, conf * share if hits >= 2 else 0.0)
    if script == "Latin":
        lang, conf, hits = _vote(words, _LATIN_CANDIDATES)
        enough = hits >= max(2, 0.05 * len(words))
        return LanguageGuess(lang if enough else "und", script, conf * share if enough else 0.0)
    return LanguageGuess("und", script, 0.0)


class CharNgramLanguageIdentifier:
    """Multinomial naive Bayes over character n-grams, trained on samples you provide.

    Each language's profile is the count of every 1..``n``-gram in its samples (words
    padded with spaces so that beginnings and endings count). A text scores the sum of
    log P(gram | language) with add-one smoothing; the best score wins, and
    ``predict_proba`` turns the scores into probabilities.
    """

    def __init__(self, n: int = 3) -> None:
        self.n = n
        self.counts: dict[str, Counter[str]] = {}
        self.totals: dict[str, int] = {}
        self.vocabulary: set[str] = set()

    def grams(self, text: str) -> list[str]:
        out: list[str] = []
        for word in _WORD.findall(text.lower()):
            padded = f" {word} "
            for k in range(1, self.n + 1):
                out += [padded[i:i + k] for i in range(len(padded) - k + 1)]
        return out

    def fit(self, samples: Mapping[str, Iterable[str]]) -> CharNgramLanguageIdentifier:
        for lang, texts in samples.items():
            counter = self.counts.setdefault(lang, Counter())
            for text in texts:
                counter.update(self.grams(text))
            self.totals[lang] = sum(counter.values())
            self.vocabulary.update(counter)
        return self

    def scores(self, text: str) -> dict[str, float]:
        if not self.counts:
            raise ValueError("fit() the identifier before predicting")
        grams = Counter(self.grams(text))
        v = len(self.vocabulary) + 1
        out = {}
        for lang, counter in self.counts.items():
            denom = math.log(self.totals[lang] + v)
            out[lang] = sum(c * (math.log(counter.get(g, 0) + 1) - denom) for g, c in grams.items())
        return out

    def predict_proba(self, text: str) -> dict[str, float]:
        scores = self.scores(text)
        top = max(scores.values())
        exp = {lang: math.exp(s - top) for lang, s in scores.items()}
        z = sum(exp.values())
        return {lang: e / z for lang, e in sorted(exp.items(), key=lambda kv: -kv[1])}

    def predict(self, text: str) -> str:
        scores = self.scores(text)
        return max(scores, key=scores.__getitem__)
