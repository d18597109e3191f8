"""PII redaction: every type found and validated, look-alikes left alone, the batch op (no Ray)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from curate_rows import chat, make_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraforge.data import pii
from loraforge.data.pii import iban_valid, luhn_valid, redact_pii, redact_text
from loraforge.data.schema import KIND_PREFERENCE, ROW_SCHEMA
from loraforge.spec import PiiSpec

FOUND = [
    # (text, redacted text, type)
    ("mail john.doe+tag@example.co.uk today", "mail [EMAIL] today", "email"),
    ("From: a_b-c@mail-server.org.", "From: [EMAIL].", "email"),
    # phones: international, North American, European national
    ("Call +44 20 7946 0958 now", "Call [PHONE] now", "phone"),
    ("Call +1 (555) 234-5678.", "Call [PHONE].", "phone"),
    ("+33 1 23 45 67 89", "[PHONE]", "phone"),
    ("+4915112345678", "[PHONE]", "phone"),
    ("tel (555) 123-4567", "tel [PHONE]", "phone"),
    ("(123) 456-7891", "[PHONE]", "phone"),
    ("555-123-4567", "[PHONE]", "phone"),
    ("555.123.4567", "[PHONE]", "phone"),
    ("212 555 0198", "[PHONE]", "phone"),
    ("1-800-555-0199", "[PHONE]", "phone"),
    ("Phone:555-123-4567", "Phone:[PHONE]", "phone"),
    ("020 7946 0958", "[PHONE]", "phone"),
    ("06 12 34 56 78", "[PHONE]", "phone"),
    ("030/1234567", "[PHONE]", "phone"),
    ("(030) 1234567", "[PHONE]", "phone"),
    # IP addresses
    ("server 192.168.1.1.", "server [IP_ADDRESS].", "ip"),
    ("from 8.8.8.8:53", "from [IP_ADDRESS]:53", "ip"),
    ("loopback ::1 here", "loopback [IP_ADDRESS] here", "ip"),
    ("fe80::1ff:fe23:4567:890a", "[IP_ADDRESS]", "ip"),
    ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "[IP_ADDRESS]", "ip"),
    ("2001:db8::8a2e:370:7334/64", "[IP_ADDRESS]/64", "ip"),
    # cards (Luhn-valid test numbers)
    ("card 4111 1111 1111 1111 exp", "card [CREDIT_CARD] exp", "credit_card"),
    ("4111-1111-1111-1111", "[CREDIT_CARD]", "credit_card"),
    ("amex 3782 822463 10005", "amex [CREDIT_CARD]", "credit_card"),
    ("4012888888881881", "[CREDIT_CARD]", "credit_card"),
    ("6011 0009 9013 9424", "[CREDIT_CARD]", "credit_card"),
    # IBANs (valid check digits)
    ("IBAN DE89 3704 0044 0532 0130 00 BIC X", "IBAN [IBAN] BIC X", "iban"),
    ("GB82WEST12345698765432", "[IBAN]", "iban"),
    ("FR14 2004 1010 0505 0001 3M02 606.", "[IBAN].", "iban"),
    ("NO9386011117947", "[IBAN]", "iban"),
    # street addresses
    ("221B Baker Street", "[STREET_ADDRESS]", "street_address"),
    ("1600 Pennsylvania Avenue NW, Washington", "[STREET_ADDRESS], Washington", "street_address"),
    ("at 12 Main St., Apt 4B.", "at [STREET_ADDRESS].", "street_address"),
    ("5 W 34th St", "[STREET_ADDRESS]", "street_address"),
    ("42 Wallaby Way, Sydney", "[STREET_ADDRESS], Sydney", "street_address"),
    ("600 S Rowan Ave, Los Angeles", "[STREET_ADDRESS], Los Angeles", "street_address"),
    ("9 Elm Rd Suite 200", "[STREET_ADDRESS]", "street_address"),
]


@pytest.mark.parametrize(("text", "redacted", "kind"), FOUND, ids=[f"{c[2]}:{c[0]}" for c in FOUND])
def test_each_type_is_found_and_replaced(text, redacted, kind):
    out, counts = redact_text(text)
    assert out == redacted
    assert counts == Counter({kind: 1})
    assert redact_text(text, [kind]) == (redacted, Counter({kind: 1}))  # found by its own pattern alone


LEFT_ALONE = [
    # maths (GSM8K style), numbers, dates, times, versions
    "12-34", "Subtract: 56-12 = 44", "In 2023 we", "1999-2023", "2023-01-15", "15/01/2023", "01.02.2023", "01/15/2023",
    "v1.2.3", "10.0.19041.1", "3.14159", "1,234,567", "12345678", "5551234567", "12 + 34 = 46", "$1,200",
    "48/2 = <<48/2=24>>24", "5 * 12 = 60", "12:30:45", "at 12:30", "0.5 0.25 0.125", "x = 1234 5678",
    "1 2 3 4 5 6 7 8 9 1 2 3 4 5 6", "The population is 7 800 000 000", "100 200 3000 4000", "Step 1 2 3",
    "He paid $120 - $45 = $75 and then 3 x 25 = 75", "Ratio 3:4:5", "Score 21-14-7",
    # other identifiers that are not these types
    "ISBN 0-306-40615-2", "ISBN 978-0-306-40615-7", "ZIP 90210-1234", "SSN 123-45-6789", "00:1A:2B:3C:4D:5E",
    "std::vector<int>", "dead::beef", "1.2.3.4.5", "999.1.1.1", "192.168.001.001",
    # invalid checksums
    "card 4111 1111 1111 1112", "4012888888881882", "0000 0000 0000 0000", "IBAN DE89 3704 0044 0532 0130 01",
    "GB82WEST12345698765433", "DE89 3704 0044 0532 0130 0",  # one character short for DE
    # no address without number + name + suffix
    "Top 10 Things To Do In St Louis", "He walked 5 miles down the road", "Dr. Smith", "The 3 Little Pigs",
    "Baker Street", "3 streets away", "at the corner of Main St and Elm",
    # e-mail look-alikes
    "a@b", "user@localhost", "@handle", "x @ y.com",
]


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_look_alikes_are_left_alone(text):
    assert redact_text(text) == (text, Counter())


def test_gsm8k_has_nothing_to_redact():
    """1,319 real maths problems and solutions: numbers, prices, equations, times; no PII."""
    from loraforge.paths import shared_data_dir

    total: Counter[str] = Counter()
    for line in (shared_data_dir() / "gsm8k_test.jsonl").open():
        row = json.loads(line)
        for text in (row["question"], row["answer"]):
            out, counts = redact_text(text)
            assert out == text or not counts
            total.update(counts)
    assert total == Counter()


def test_order_cards_and_ibans_before_phones():
    text = "Pay DE89 3704 0044 0532 0130 00 or card 4111 1111 1111 1111, call 555-123-4567"
    out, counts = redact_text(text)
    assert out == "Pay [IBAN] or card [CREDIT_CARD], call [PHONE]"
    assert counts == Counter({"iban": 1, "credit_card": 1, "phone": 1})


def test_several_of_one_type_and_mixed_text():
    text = ("Contact a@x.org or b@y.org.\nOffice: 10 Downing Street, +44 20 7946 0958.\n"
            "Servers 10.0.0.1 and 10.0.0.2 answer on ::1.")
    out, counts = redact_text(text)
    assert counts == Counter({"email": 2, "street_address": 1, "phone": 1, "ip": 3})
    assert out == ("Contact [EMAIL] or [EMAIL].\nOffice: [STREET_ADDRESS], [PHONE].\n"
                   "Servers [IP_ADDRESS] and [IP_ADDRESS] answer on [IP_ADDRESS].")


def test_a_redaction_that_frees_an_earlier_pattern_is_followed_up():
    # The phone is followed by digits until the address is replaced; the result is a fixed point.
    out, counts = redact_text("555-123-4567 12 Main Street")
    assert out == "[PHONE] [STREET_ADDRESS]"
    assert counts == Counter({"phone": 1, "street_address": 1})


def test_types_subset_and_unknown_type():
    text = "a@b.com 555-123-4567"
    assert redact_text(text, ["phone"]) == ("a@b.com [PHONE]", Counter({"phone": 1}))
    assert redact_text(text, []) == (text, Counter())
    with pytest.raises(ValueError, match="unknown PII type"):
        redact_text(text, ["names"])


def test_luhn_and_mod97_against_known_numbers():
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")  # the textbook example
    assert all(luhn_valid(n) for n in ("4111111111111111", "5555555555554444", "378282246310005"))
    assert iban_valid("DE89370400440532013000") and iban_valid("GB82WEST12345698765432")
    assert not iban_valid("DE89370400440532013001") and not iban_valid("GB82WEST1234569876543")
    assert not iban_valid("DE89-3704")


# ---------------------------------------------------------------- properties
_pieces = st.sampled_from([
    " ", "-", ".", "/", "(", ")", "+", ":", "@", ",", "\n", "a", "St", "Street", "Main ", "x.com", "DE89",
    "[PHONE]", "[EMAIL]", "4111", "1111", "555", "123", "4567", "0", "12", "192.168.", "::", "fe80",
]) | st.from_regex(r"\d{1,5}", fullmatch=True)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(_pieces, max_size=25))
def test_redaction_is_idempotent_on_digit_soup(parts):
    text = "".join(parts)
    out, counts = redact_text(text)
    assert redact_text(out) == (out, Counter())
    assert all(n > 0 for n in counts.values())
    if not counts:
        assert out == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_redaction_is_idempotent_on_any_text(text):
    out, _ = redact_text(text)
    assert redact_text(out) == (out, Counter())


# ---------------------------------------------------------------- the batch op
def test_redact_pii_rewrites_messages_rejected_counts_and_chars():
    rows = make_rows([
        {"messages": chat("mail me: a@b.com", "call 555-123-4567 or 555-765-4321")},
        {"messages": chat("2 + 2?", "4")},
        {"messages": chat("q", "ok"), "kind": KIND_PREFERENCE, "rejected": "my card is 4111 1111 1111 1111"},
        {"messages": chat("x@y.com", "dropped"), "status": "dropped", "op": "filter", "reason": "too_short"},
    ])
    out = redact_pii(rows, PiiSpec())
    assert out.schema == ROW_SCHEMA
    r = out.to_pylist()
    assert r[0]["messages"] == chat("mail me: [EMAIL]", "call [PHONE] or [PHONE]")
    assert dict(r[0]["pii"]) == {"email": 1, "phone": 2}
    assert r[0]["text_chars"] == len("mail me: [EMAIL]") + len("call [PHONE] or [PHONE]")
    assert r[1]["pii"] is None and r[1]["messages"] == chat("2 + 2?", "4")
    assert r[2]["rejected"] == "my card is [CREDIT_CARD]" and dict(r[2]["pii"]) == {"credit_card": 1}
    assert r[3]["messages"] == chat("x@y.com", "dropped") and r[3]["pii"] is None  # not kept: untouched
    assert [x["status"] for x in r] == ["kept", "kept", "kept", "dropped"]  # never drops


def test_redact_pii_disabled_or_nothing_found_returns_the_table():
    rows = make_rows([{"user": "a@b.com", "answer": "fine"}])
    assert redact_pii(rows, PiiSpec(enabled=False)) is rows
    assert redact_pii(rows, PiiSpec(types=["phone"])) is rows
    assert redact_pii(rows.slice(0, 0), PiiSpec()).num_rows == 0


def test_placeholders_cannot_match_any_pattern():
    for placeholder in pii.PLACEHOLDERS.values():
        assert redact_text(f"{placeholder} {placeholder}") == (f"{placeholder} {placeholder}", Counter())
