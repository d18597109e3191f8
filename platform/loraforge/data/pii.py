"""PII redaction with patterns (no model): typed placeholders, counted per type per row (no Ray).

Types, in the order they are applied (earlier types claim their text first, so the digits of a card
number or an IBAN are never taken for a phone number):

  email           local@domain.tld                                   -> [EMAIL]
  iban            country code + 2 check digits + 11-30 letters/digits, optionally in groups of 4;
                  length checked against the country's IBAN length where known and mod-97 validated
                                                                     -> [IBAN]
  credit_card     13-19 digits starting 2-6, plain or in groups of 3-6 split by one kind of space or
                  dash; Luhn-checked (a number failing Luhn is left alone) -> [CREDIT_CARD]
  ip              IPv4 with octets 0-255 (no leading zeros), IPv6 (validated by `ipaddress`, must
                  contain a digit, so `dead::beef` and C++ `a::b` stay)   -> [IP_ADDRESS]
  phone           international (+ country code, 8-15 digits), North American ((555) 123-4567,
                  555-123-4567, 555.123.4567, 1-800-555-0199) and European national numbers (trunk 0,
                  groups split by one kind of separator: 020 7946 0958, 06 12 34 56 78, 030/1234567),
                  9-12 digits. Numbers without a + or separators, years, dates, times, versions,
                  decimals and short digit groups (12-34) are not phones  -> [PHONE]
  street_address  house number + 1-4 capitalised words (or an ordinal like 5th) + a street suffix
                  (Street, St, Avenue, Ave, Road, Rd, Lane, Ln, Boulevard, Blvd, Drive, Dr, Court, Ct,
                  Place, Pl, Way, Terrace, Parkway, Highway, Circle, Square, Trail, ...), optional
                  direction and unit (Apt 4B, Suite 200, Unit 5, #12) -> [STREET_ADDRESS]

Placeholders contain no digits and no @, so redacting redacted text changes nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

from loraforge.data.schema import KEPT, MESSAGES_TYPE, ROW_SCHEMA
from loraforge.spec import PiiSpec

EMAIL, PHONE, IP, CREDIT_CARD, IBAN, STREET_ADDRESS = "email", "phone", "ip", "credit_card", "iban", "street_address"
PII_TYPES = (EMAIL, IBAN, CREDIT_CARD, IP, PHONE, STREET_ADDRESS)  # application order
PLACEHOLDERS = {
    EMAIL: "[EMAIL]", PHONE: "[PHONE]", IP: "[IP_ADDRESS]", CREDIT_CARD: "[CREDIT_CARD]",
    IBAN: "[IBAN]", STREET_ADDRESS: "[STREET_ADDRESS]",
}

# ---------------------------------------------------------------- email
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)

# ---------------------------------------------------------------- iban
# ISO 13616 IBAN lengths by country (the public SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
# A candidate: country, check digits, then alphanumeric groups with at most one space between them. It may
# run past the IBAN (into a following word), so the IBAN is cut to its country's length before checking.
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,30}")


def iban_valid(compact: str) -> bool:
    """ISO 7064 mod-97: move the first four characters to the end, letters -> 10..35, remainder 1."""
    if not (15 <= len(compact) <= 34) or not compact.isalnum() or not compact.isascii():
        return False
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    digits = "".join(str(int(ch, 36)) for ch in compact[4:] + compact[:4])
    return int(digits) % 97 == 1


def _iban_end(text: str, start: int, stop: int) -> int | None:
    """End of a valid IBAN starting at `start` within the candidate text[start:stop], or None. Only cuts at a
    group boundary (not inside a run of letters/digits) are tried, longest first."""
    country = text[start:start + 2]
    positions = [i for i in range(start, stop) if text[i] != " "]
    lengths = [IBAN_LENGTHS[country]] if country in IBAN_LENGTHS else range(min(34, len(positions)), 14, -1)
    for length in lengths:
        if length > len(positions):
            continue
        end = positions[length - 1] + 1
        if end < len(text) and text[end].isalnum():
            continue
        if iban_valid("".join(text[i] for i in positions[:length])):
            return end
    return None


def _redact_iban(text: str) -> tuple[str, int]:
    out, count, pos = [], 0, 0
    search_at = 0
    while (m := _IBAN.search(text, search_at)) is not None:
        end = _iban_end(text, m.start(), m.end())
        if end is None:
            search_at = m.start() + 1
            continue
        out.append(text[pos:m.start()])
        out.append(PLACEHOLDERS[IBAN])
        count += 1
        pos = search_at = end
    if count == 0:
        return text, 0
    out.append(text[pos:])
    return "".join(out), count


# ---------------------------------------------------------------- credit card
# Patterns start with a character class, not a lookbehind, so `re` can skip ahead to candidate characters;
# the "not glued to what precedes" check is a two-character lookbehind after the first character.
_CARD = re.compile(
    r"[2-6](?<![\w.,/+-][2-6])(?<!\d[ -][2-6])"
    r"(?:\d{12,18}|\d{3}(?P<sep>[ -])\d{3,6}(?:(?P=sep)\d{3,6}){1,3})"
    r"(?![\w]|[ -]\d|[.,/]\d)"
)
_CARD_HINT = re.compile(r"\d{4}")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match[str]) -> str | None:
    digits = m.group(0).replace(" ", "").replace("-", "")
    return PLACEHOLDERS[CREDIT_CARD] if 13 <= len(digits) <= 19 and luhn_valid(digits) else None


# ---------------------------------------------------------------- ip
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?![\w]|\.\d)")
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
_IPV4_HINT = re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")


def _ipv6(m: re.Match[str]) -> str | None:
    candidate = m.group(0)
    if not any(ch.isdigit() for ch in candidate):
        return None
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return None
    return PLACEHOLDERS[IP]


# ---------------------------------------------------------------- phone
# Not glued to a word, another number or an operator before, nor running on into more digits after.
_PHONE_BEFORE = r"(?<![\w.,/+\-@=*<>])"
_PHONE_AFTER = r"(?![\w@]|[.,/\-:]\d| \d)"
_PHONE = re.compile(
    _PHONE_BEFORE
    + r"(?:"
    # international: +CC then groups (an optional (0) or (area) group), 8-15 digits checked below
    + r"(?P<intl>\+\d{1,3}(?:[ .\-]?\(\d{1,4}\))?(?:[ .\-]?\d{1,5}){1,6})"
    # North American: optional 1, area code (plain or in parentheses), 3 + 4 digits, one kind of separator
    # (spaces alone as separators need an area code and exchange starting 2-9, as lists of numbers look alike)
    + r"|(?P<nanp>(?:1[ .\-])?(?:\(\d{3}\) ?\d{3}[ .\-]\d{4}|\d{3}(?P<s1>[.\-])\d{3}(?P=s1)\d{4}"
    + r"|[2-9]\d{2} [2-9]\d{2} \d{4}))"
    # European national: trunk 0 + area, then 1-4 groups with one kind of separator; 9-12 digits checked below
    + r"|(?P<national>(?:\(0\d{1,4}\) ?|0\d{1,4}(?P<s2>[ .\-/]))\d{2,8}(?:(?(s2)(?P=s2)|[ .\-])\d{2,8}){0,3})"
    + r")"
    + _PHONE_AFTER
)


# Every phone form has a + before a digit or a separator between two digits.
_PHONE_HINT = re.compile(r"\d[ .\-/)]{1,2}\d|\+\d")


def _phone(m: re.Match[str]) -> str | None:
    digits = sum(ch.isdigit() for ch in m.group(0))
    if m.group("intl") is not None:
        ok = 8 <= digits <= 15
    elif m.group("national") is not None:
        ok = 9 <= digits <= 12
    else:
        ok = True
    return PLACEHOLDERS[PHONE] if ok else None


# ---------------------------------------------------------------- street address
_UNIT_WORDS = r"(?:Apt|Apartment|Suite|Ste|Unit|Floor|Fl|Room|Rm)"
# St and Dr followed by a capitalised word are Saint and Doctor ("10 Things To Do In St Louis").
_SUFFIXES = (
    "Street|Avenue|Ave|Av|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Court|Ct|Place|Pl|Terrace|Ter|Way|"
    "Parkway|Pkwy|Highway|Hwy|Circle|Cir|Square|Sq|Trail|Trl|Crescent|Close|Row|Alley|Plaza|Expressway|"
    rf"(?:St|Dr)(?!\.? (?!{_UNIT_WORDS}\b)[A-Z])"
)
_UNIT = rf"(?:,? {_UNIT_WORDS}\.? ?#? ?[A-Za-z0-9-]{{1,6}}|,? #[A-Za-z0-9-]{{1,6}})"
_STREET = re.compile(
    r"\d(?<![\w.,/-]\d)\d{0,5}[A-Za-z]?(?:-\d{1,4})? "
    r"(?:(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.? )?"
    r"(?:(?:[A-Z][A-Za-z'\-]*|\d{1,3}(?:st|nd|rd|th)) ){1,4}"
    rf"(?:{_SUFFIXES})\b\.?"
    r"(?: (?:N|S|E|W|NE|NW|SE|SW)\b)?"
    rf"{_UNIT}?"
    r"(?![\w])"
)


_STREET_HINT = re.compile(r"\d[A-Za-z]?(?:-\d+)? [A-Z\d]")


# ---------------------------------------------------------------- redaction
Replacer = Callable[[re.Match[str]], "str | None"]


def _sub(pattern: re.Pattern[str], decide: Replacer, text: str) -> tuple[str, int]:
    """Replace each match that `decide` accepts (it returns the placeholder, or None to keep the text)."""
    count = 0

    def repl(m: re.Match[str]) -> str:
        nonlocal count
        placeholder = decide(m)
        if placeholder is None:
            return m.group(0)
        count += 1
        return placeholder

    out = pattern.sub(repl, text)
    return (out, count) if count else (text, 0)


def _fixed(placeholder: str) -> Replacer:
    return lambda m: placeholder


def _redact_email(text: str) -> tuple[str, int]:
    return _sub(_EMAIL, _fixed(PLACEHOLDERS[EMAIL]), text) if "@" in text else (text, 0)


def _redact_card(text: str) -> tuple[str, int]:
    return _sub(_CARD, _card, text) if _CARD_HINT.search(text) else (text, 0)


def _redact_ip(text: str) -> tuple[str, int]:
    text, n4 = _sub(_IPV4, _fixed(PLACEHOLDERS[IP]), text) if _IPV4_HINT.search(text) else (text, 0)
    text, n6 = _sub(_IPV6, _ipv6, text) if "::" in text or _IPV6_HINT.search(text) else (text, 0)
    return text, n4 + n6


def _redact_phone(text: str) -> tuple[str, int]:
    return _sub(_PHONE, _phone, text) if _PHONE_HINT.search(text) else (text, 0)


def _redact_street(text: str) -> tuple[str, int]:
    return _sub(_STREET, _fixed(PLACEHOLDERS[STREET_ADDRESS]), text) if _STREET_HINT.search(text) else (text, 0)


_REDACTORS: dict[str, Callable[[str], tuple[str, int]]] = {
    EMAIL: _redact_email, IBAN: _redact_iban, CREDIT_CARD: _redact_card, IP: _redact_ip,
    PHONE: _redact_phone, STREET_ADDRESS: _redact_street,
}
_DIGIT = re.compile(r"\d")


def _ordered(types: Iterable[str]) -> list[str]:
    wanted = set(types)
    unknown = wanted - set(PII_TYPES)
    if unknown:
        raise ValueError(f"unknown PII type(s) {sorted(unknown)}; expected some of {list(PII_TYPES)}")
    return [t for t in PII_TYPES if t in wanted]


def redact_text(text: str, types: Iterable[str] = PII_TYPES) -> tuple[str, Counter[str]]:
    """`text` with every PII match of `types` replaced by its placeholder, and the count per type."""
    counts: Counter[str] = Counter()
    ordered = _ordered(types)
    if not text or (_DIGIT.search(text) is None and "@" not in text):
        return text, counts  # every type needs a digit, except e-mail, which needs an @
    # Repeat until nothing changes: a redaction can remove what kept an earlier pattern from matching
    # ("555-123-4567 12 Main Street": the phone is followed by digits until the address is replaced). Each
    # pass that changes the text removes at least one digit or @, so this ends, and the result is a fixed
    # point: redacting it again finds nothing.
    while True:
        found = 0
        for kind in ordered:
            text, n = _REDACTORS[kind](text)
            if n:
                counts[kind] += n
                found += n
        if not found:
            return text, counts


def redact_pii(table: pa.Table, spec: PiiSpec) -> pa.Table:
    """Redact every message's content and `rejected` of the kept rows; write per-row counts into `pii`
    (null when nothing was found) and refresh `text_chars`. Never drops a row."""
    if not spec.enabled or not spec.types or table.num_rows == 0:
        return table
    types = _ordered(spec.types)
    statuses = table.column("status").to_pylist()
    messages = table.column("messages").to_pylist()
    rejected = table.column("rejected").to_pylist()
    chars = table.column("text_chars").to_pylist()
    found: list[Any] = table.column("pii").to_pylist()
    changed = False
    for pos, status in enumerate(statuses):
        if status != KEPT or messages[pos] is None:
            continue
        counts: Counter[str] = Counter()
        for m in messages[pos]:
            m["content"], c = redact_text(m["content"], types)
            counts.update(c)
        if rejected[pos] is not None:
            rejected[pos], c = redact_text(rejected[pos], types)
            counts.update(c)
        if counts:
            changed = True
            found[pos] = sorted(counts.items())
            chars[pos] = sum(len(m["content"]) for m in messages[pos])
    if not changed:
        return table
    for name, values, type_ in (
        ("messages", messages, MESSAGES_TYPE), ("rejected", rejected, pa.string()),
        ("text_chars", chars, pa.int64()), ("pii", found, ROW_SCHEMA.field("pii").type),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, type_))
    return table
