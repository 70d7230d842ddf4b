"""Personally identifiable information: detection and redaction (D4, G3).

A model trained on text containing e-mail addresses, phone numbers or card numbers can
repeat them verbatim. Before training, every match is replaced by a typed placeholder
(``[EMAIL]``, ``[PHONE]``, ...) and counted for the scorecard.

Regexes alone over-match (every 16-digit number is not a card, every dotted quad is not
an address), so each kind has a validator:

* e-mail: local part, ``@``, a domain with a dot and a 2+ letter top-level label;
* URL credentials: ``scheme://user:password@host``; only the ``user:password`` part goes;
* IP: IPv4 with every octet <= 255 (not part of a longer dotted number such as a
  version string), and full or ``::``-compressed IPv6;
* credit card: 13-19 digits (spaces or dashes between groups allowed) passing the Luhn
  checksum, with a known issuer prefix (Visa, Mastercard, Amex, Discover, JCB, Diners);
* IBAN: country code, two check digits, 11-30 letters/digits, passing ISO 13616's
  mod-97 check;
* US social security number: ``AAA-GG-SSSS`` (dashes or spaces), or nine bare digits
  right after "SSN" / "social security"; area 000, 666 and 900-999, group 00 and serial
  0000 were never issued, nor were the numbers printed on sample cards (078-05-1120,
  219-09-9999), so those are not reported;
* UK National Insurance number: two prefix letters (not D F I Q U V; second not O; not
  BG GB KN NK NT TN ZZ), six digits in pairs, a suffix A-D;
* street address: a house number, one to four capitalised words and a street type
  (Street, St., Avenue, Road, Lane, Drive, Boulevard, ...), optionally an apartment or
  suite, a city, a two-letter state and a ZIP code; or the continental order, a street
  word ending in -straße/-strasse/-weg/-gasse/-platz (or "Rue", "Via", "Calle" first) and a
  house number;
* phone: international (``+`` country code) or grouped national numbers with 10-15
  digits, or 8+ digits when an area code in parentheses makes the intent clear. Year
  ranges and plain long numbers are not phones.

Matches are found kind by kind in that order; a later kind never overlaps an earlier
one (a card number is not also reported as a phone).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

PLACEHOLDERS = {
    "url_credentials": "[CREDENTIALS]", "email": "[EMAIL]", "iban": "[IBAN]",
    "credit_card": "[CREDIT_CARD]", "ip_address": "[IP]", "us_ssn": "[SSN]", "uk_nino": "[NATIONAL_ID]",
    "street_address": "[ADDRESS]", "phone": "[PHONE]",
}

_URL_CREDENTIALS = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,15}://([^\s/?#@:]+(?::[^\s/?#@]*)?)@[\w.-]+")
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:])(?:"
    r"(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?"
    r"|::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})"
    r")(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?\d{1,5}(?:[ .-]\d{2,5}){1,5}(?![\w])"
    r"|(?<![\w+])\+\d{8,15}(?!\w)")
_SSN = re.compile(r"(?<![\w-])\d{3}([- ])\d{2}\1\d{4}(?![\w-])")
_SSN_BARE = re.compile(r"(?i:\b(?:ssn|social security(?: number| no\.?)?)\s*(?:#|:|is)?\s*)(\d{9})\b")
_NINO = re.compile(r"\b([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])\b")
_STREET_TYPES = (r"Street|St\.?|Avenue|Ave\.?|Road|Rd\.?|Boulevard|Blvd\.?|Lane|Ln\.?|Drive|Dr\.?|Court|Ct\.?|"
                 r"Place|Pl\.?|Terrace|Way|Parkway|Pkwy\.?|Highway|Hwy\.?|Square|Sq\.?|Circle|Close|Crescent")
_ADDRESS = re.compile(
    r"\b\d{1,5}[A-Za-z]?\s+(?:[A-Z][a-z]+\.?\s+|[A-Z]\.\s+|\d{1,3}(?:st|nd|rd|th)\s+){1,4}"
    rf"(?:{_STREET_TYPES})(?![\w])(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?"
    r"(?:,?\s+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|#)\s*[\w-]{1,6})?"
    r"(?:,\s*[A-Z][a-z]+(?:\s[A-Z][a-z]+){0,2}(?:,\s*[A-Z]{2})?(?:\s+\d{5}(?:-\d{4})?)?)?"
    r"|\b(?:[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|weg|gasse|platz|allee)|(?:Rue|Via|Calle|Avenida|Rua)"
    r"(?:\s+(?:de|del|della|da|des|du|la|le)?\s*[A-Z][a-zà-ÿ]+){1,3})\s+\d{1,4}[a-z]?\b"
    r"(?:,\s*\d{4,5}\s+[A-Z][a-zà-ÿäöüß]+)?")
_YEAR_RANGE = re.compile(r"^(?:1[5-9]|20)\d\d\s*[-–]\s*(?:1[5-9]|20)?\d\d$")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|6(?:011|5|4[4-9])|35|3(?:0[0-5]|[68]))")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters -> 10..35, mod 97 == 1."""
    s = candidate.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def _card_ok(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    return (13 <= len(digits) <= 19 and len(set(digits)) > 1 and bool(_CARD_PREFIX.match(digits))
            and luhn_valid(digits))


def _phone_ok(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    if _YEAR_RANGE.match(match.strip()):
        return False
    if match.startswith("+"):
        return 8 <= len(digits) <= 15
    if "(" in match:
        return 8 <= len(digits) <= 15
    groups = re.split(r"[ .-]", match)
    # National numbers written in groups: at least 10 digits, and not a date such as 2004.10.12.
    if len(digits) < 10 or len(digits) > 15:
        return False
    return not (len(groups) == 3 and len(groups[0]) == 4 and all(len(g) <= 2 for g in groups[1:]))


# Numbers printed on sample cards and in advertisements, used by many people as if their own.
_SSN_SAMPLES = {"078051120", "219099999"}
_NINO_BAD_PREFIXES = {"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"}


def ssn_valid(candidate: str) -> bool:
    """Whether nine digits (separators ignored) could be an issued US social security number."""
    digits = re.sub(r"\D", "", candidate)
    if len(digits) != 9 or digits in _SSN_SAMPLES:
        return False
    area, group, serial = int(digits[:3]), int(digits[3:5]), int(digits[5:])
    return area != 0 and area != 666 and area < 900 and group != 0 and serial != 0


def _ssn_ok(match: str) -> bool:
    return ssn_valid(match[-11:] if re.search(r"\d{3}[- ]\d{2}[- ]\d{4}$", match) else match[-9:])


def nino_valid(candidate: str) -> bool:
    """A UK National Insurance number's shape rules (prefix letters and suffix)."""
    s = candidate.replace(" ", "").upper()
    return bool(re.fullmatch(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\d{6}[A-D]", s)) and s[:2] not in _NINO_BAD_PREFIXES


def _ipv6_ok(match: str) -> bool:
    # "ab::cd" in prose or code is not an address; real ones nearly always contain a digit.
    return match.count(":") >= 2 and any(ch.isdigit() for ch in match)


@dataclass(frozen=True)
class _Kind:
    name: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] = lambda _m: True
    group: int = 0  # which group to redact (0: the whole match)


KINDS: tuple[_Kind, ...] = (
    _Kind("url_credentials", _URL_CREDENTIALS, group=1),
    _Kind("email", _EMAIL),
    _Kind("iban", _IBAN, iban_valid),
    _Kind("credit_card", _CARD, _card_ok),
    _Kind("ip_address", _IPV4),
    _Kind("ip_address", _IPV6, _ipv6_ok),
    _Kind("us_ssn", _SSN, _ssn_ok),
    _Kind("us_ssn", _SSN_BARE, _ssn_ok, group=1),
    _Kind("uk_nino", _NINO, nino_valid),
    _Kind("street_address", _ADDRESS),
    _Kind("phone", _PHONE, _phone_ok),
)


@dataclass
class PiiMatch:
    kind: str
    start: int
    end: int
    text: str


@dataclass
class PiiResult:
    text: str  # the redacted text
    matches: list[PiiMatch] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(m.kind for m in self.matches)


def find_pii(text: str, kinds: tuple[str, ...] | None = None) -> list[PiiMatch]:
    """All PII matches in ``text``, non-overlapping, in text order."""
    taken: list[tuple[int, int]] = []
    found: list[PiiMatch] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e in taken)

    for kind in KINDS:
        if kinds is not None and kind.name not in kinds:
            continue
        for m in kind.pattern.finditer(text):
            start, end = m.span(kind.group)
            whole = m.group(0)
            if start < 0 or not kind.valid(whole) or not free(*m.span()):
                continue
            taken.append(m.span())
            found.append(PiiMatch(kind.name, start, end, text[start:end]))
    return sorted(found, key=lambda m: m.start)


def redact_pii(text: str, kinds: tuple[str, ...] | None = None) -> PiiResult:
    """Replace every PII match with its placeholder; the result lists what was found."""
    matches = find_pii(text, kinds)
    if not matches:
        return PiiResult(text, [])
    parts: list[str] = []
    pos = 0
    for m in matches:
        parts.append(text[pos:m.start])
        parts.append(PLACEHOLDERS[m.kind])
        pos = m.end
    parts.append(text[pos:])
    return PiiResult("".join(parts), matches)
