"""D4: PII detection and redaction, positives and negatives per kind."""

from __future__ import annotations

import pytest

from lmforge.data.corpora import load_source
from lmforge.data.pii import find_pii, iban_valid, luhn_valid, redact_pii

POSITIVES = [
    ("Write to jane.doe+news@example.co.uk for details.", "email", "jane.doe+news@example.co.uk"),
    ("Call +1 415 555 0132 after six.", "phone", "+1 415 555 0132"),
    ("Office: (02) 9876 5432.", "phone", "(02) 9876 5432"),
    ("Reach us on 415-555-0132 today.", "phone", "415-555-0132"),
    ("Or +441632960961 from abroad.", "phone", "+441632960961"),
    ("The server 192.168.10.20 went down.", "ip_address", "192.168.10.20"),
    ("Route via 2001:db8::8a2e:370:7334 now.", "ip_address", "2001:db8::8a2e:370:7334"),
    ("Paid with 4111 1111 1111 1111 yesterday.", "credit_card", "4111 1111 1111 1111"),
    ("Amex 3782-822463-10005 on file.", "credit_card", "3782-822463-10005"),
    ("IBAN DE89 3704 0044 0532 0130 00, thanks.", "iban", "DE89 3704 0044 0532 0130 00"),
    ("Account GB82WEST12345698765432.", "iban", "GB82WEST12345698765432"),
    ("Clone https://deploy:s3cret@git.example.org/repo.git", "url_credentials", "deploy:s3cret"),
]

NEGATIVES = [
    "Version 1.2.3.4.5 was released.",         # dotted numbers, not an address
    "Octets 999.12.1.1 are out of range.",
    "Between 1999-2004 the town grew.",         # year range
    "ISBN 978-3-16-148410-0 is printed inside.",
    "Card 4111 1111 1111 1112 fails Luhn.",
    "About 12345678 people live there.",        # a plain number
    "Meet at 12:30:45 on 2020-01-15.",          # time and date
    "The score was 3-1 and the ratio 1:2:3.",
    "Mail root@localhost on the box.",          # no top-level domain
    "IBAN DE89 3704 0044 0532 0130 01 has a bad checksum.",
    "See https://example.com/a@b for the page.",  # @ in the path, no credentials
    "Extension 555-0132 only.",                 # too short for a phone number
    "Population 1,234,567 in 2001.",
    "C++ uses a::b scoping.",
]


@pytest.mark.parametrize("text,kind,found", POSITIVES)
def test_positives_are_found_and_redacted(text, kind, found):
    matches = find_pii(text)
    assert [(m.kind, m.text) for m in matches] == [(kind, found)]
    result = redact_pii(text)
    assert found not in result.text and result.counts[kind] == 1


@pytest.mark.parametrize("text", NEGATIVES)
def test_negatives_are_left_alone(text):
    assert find_pii(text) == []
    assert redact_pii(text).text == text


def test_several_kinds_in_one_text_are_counted():
    text = ("Contact ops@example.org or +44 20 7946 0958; card 5555 5555 5555 4444; "
            "host 10.0.0.1 and ops@example.org again.")
    result = redact_pii(text)
    assert dict(result.counts) == {"email": 2, "phone": 1, "credit_card": 1, "ip_address": 1}
    assert result.text == ("Contact [EMAIL] or [PHONE]; card [CREDIT_CARD]; host [IP] and [EMAIL] again.")


def test_checksums():
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")


def test_no_false_positives_on_real_news():
    hits = [m for d in load_source("news") for m in find_pii(d.text)]
    assert hits == []
