"""Heuristic quality filters (FilterSpec) and the heuristic score, on ROW_SCHEMA batches (no Ray).

Every check measures the *response* (the assistant turns joined by a newline: a text row's document, a
preference pair's chosen answer), except `too_long` and `too_many_words`, which measure the whole row.
The ratio checks only apply to responses of at least `min_text_length_for_ratios` characters: on a
"4" or a "Yes." every ratio is noise. The first failing check, in the order of REASONS, drops the row
with a stable reason code and a detail holding the measured value and the threshold.

Measures (all on the response):
  chars                 len(response.strip())
  words                 whitespace-separated tokens
  symbol_ratio          symbol characters / non-whitespace characters; symbols are Unicode symbols (S*) and
                        punctuation (P*) except prose punctuation . , ; : ! ? ' " ( ) - and typographic
                        quotes and dashes (so #, *, =, <, |, _, @, … count; letters, digits, combining
                        marks and control characters do not)
  digit_ratio           digit characters / non-whitespace characters
  repeated_ngram_ratio  share of words covered by a word n-gram (lower-cased, n = repeated_ngram_n) that
                        occurs more than once in the response
  duplicate_line_ratio  share of the response's lines that repeat an earlier line (lines compared
                        stripped; blank lines and lines without a letter or digit, like `}` or `---`, are
                        not counted, so code and markdown are not penalised for their closing lines)
  nonprintable_ratio    control (except tab, CR, LF), unassigned, private-use and surrogate characters and
                        U+FFFD (a decoding error) / all characters

heuristic_score (set on every row the filter examines; higher is better; in [0, 1]):
  (1 - exp(-words / 100))                       length: 0 for no words, 0.63 at 100, 0.95 at 300
  * (1 - symbol_ratio) * (1 - repeated_ngram_ratio) * (1 - duplicate_line_ratio) * (1 - nonprintable_ratio)
Digits are not penalised (numbers are normal in maths and code answers). Dedup keeps the member of a
duplicate cluster with the highest score, so of two near-copies the fuller, cleaner one survives.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa

from loraforge.data.formats import response_text
from loraforge.data.ops import mark_rows
from loraforge.data.schema import DROPPED, EMPTY, KEPT, OP_FILTER, ROW_SCHEMA, TOO_LONG, TOO_SHORT
from loraforge.spec import FilterSpec

# Reason codes (op "filter"), in the order the checks run.
TOO_FEW_WORDS, TOO_MANY_WORDS = "too_few_words", "too_many_words"
NONPRINTABLE, SYMBOL_RATIO, DIGIT_RATIO = "nonprintable", "symbol_ratio", "digit_ratio"
REPEATED_NGRAMS, DUPLICATE_LINES = "repeated_ngrams", "duplicate_lines"
REASONS = (
    EMPTY, TOO_SHORT, TOO_LONG, TOO_FEW_WORDS, TOO_MANY_WORDS,
    NONPRINTABLE, SYMBOL_RATIO, DIGIT_RATIO, REPEATED_NGRAMS, DUPLICATE_LINES,
)

# Length term of the score: 1 - exp(-words / LENGTH_SCALE).
LENGTH_SCALE = 100.0

# Counting runs on the UTF-8 bytes for the ASCII part (bytes.translate deletes in C at ~1 GB/s) and on a
# Counter of the distinct non-ASCII characters, classified once each, for the rest.
_PROSE_ASCII = set(b".,;:!?'\"()-")
_ASCII_SYMBOL = bytes(b for b in range(33, 127) if not chr(b).isalnum() and b not in _PROSE_ASCII)
_ASCII_DIGIT = b"0123456789"
_ASCII_CONTROL = bytes([*range(0, 9), 11, 12, *range(14, 32), 127])  # not tab, LF, CR
_EVERY_BYTE = bytes(range(256))
_NOT_SYMBOL = _EVERY_BYTE.translate(None, _ASCII_SYMBOL)
_NOT_DIGIT = _EVERY_BYTE.translate(None, _ASCII_DIGIT)
_NOT_CONTROL = _EVERY_BYTE.translate(None, _ASCII_CONTROL)
_PROSE_UNICODE = frozenset("\u2018\u2019\u201c\u201d\u2013\u2014\u00ab\u00bb")  # quotes and dashes
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ALNUM = re.compile(r"[^\W_]")


@lru_cache(maxsize=65536)
def _char_class(char: str) -> tuple[bool, bool, bool]:
    """(symbol, digit, non-printable) for one non-ASCII character."""
    cat = unicodedata.category(char)
    symbol = cat[0] == "S" or (cat[0] == "P" and char not in _PROSE_UNICODE)
    nonprintable = char == "\ufffd" or cat in ("Cc", "Cn", "Co", "Cs")
    return symbol, cat == "Nd", nonprintable


def char_counts(text: str) -> tuple[int, int, int]:
    """(symbols, digits, non-printable characters) of `text`, as the module doc defines them."""
    raw = text.encode("utf-8", "surrogatepass")
    symbols = len(raw.translate(None, _NOT_SYMBOL))
    digits = len(raw.translate(None, _NOT_DIGIT))
    nonprintable = len(raw.translate(None, _NOT_CONTROL))
    if not text.isascii():
        for char, n in Counter(_NON_ASCII.findall(text)).items():
            symbol, digit, bad = _char_class(char)
            symbols += n * symbol
            digits += n * digit
            nonprintable += n * bad
    return symbols, digits, nonprintable


def nonprintable_count(text: str) -> int:
    return char_counts(text)[2]


def repeated_ngram_ratio(words: list[str], n: int) -> float:
    """Share of words inside at least one n-gram that occurs more than once among `words`."""
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered, end = 0, 0
    for i in [i for i, g in enumerate(grams) if counts[g] > 1]:
        covered += i + n - max(i, end)
        end = i + n
    return covered / len(words)


def duplicate_line_ratio(text: str) -> float:
    if "\n" not in text:
        return 0.0
    lines = [raw.strip() for raw in text.splitlines()]
    if len(set(lines)) == len(lines):
        return 0.0  # nothing repeats (the common case): no need to sort out blank and symbol-only lines
    lines = [line for line in lines if _ALNUM.search(line)]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


@dataclass(frozen=True, slots=True)
class TextStats:
    chars: int  # stripped length
    words: int
    symbol_ratio: float
    digit_ratio: float
    repeated_ngram_ratio: float
    duplicate_line_ratio: float
    nonprintable_ratio: float

    @property
    def score(self) -> float:
        return (
            (1.0 - math.exp(-self.words / LENGTH_SCALE))
            * (1.0 - self.symbol_ratio)
            * (1.0 - self.repeated_ngram_ratio)
            * (1.0 - self.duplicate_line_ratio)
            * (1.0 - self.nonprintable_ratio)
        )


def text_stats(text: str, ngram: int = 3) -> TextStats:
    """Every measure of the module doc for one response text."""
    words = text.split()
    visible = sum(map(len, words))
    symbols, digits, nonprintable = char_counts(text)
    return TextStats(
        chars=len(text.strip()),
        words=len(words),
        symbol_ratio=symbols / visible if visible else 0.0,
        digit_ratio=digits / visible if visible else 0.0,
        repeated_ngram_ratio=repeated_ngram_ratio(text.lower().split(), ngram),
        duplicate_line_ratio=duplicate_line_ratio(text),
        nonprintable_ratio=nonprintable / len(text) if text else 0.0,
    )


def heuristic_score(text: str, ngram: int = 3) -> float:
    return text_stats(text, ngram).score


def _over(reason: str, what: str, value: float, field: str, limit: float | None) -> tuple[str, str] | None:
    if limit is not None and value > limit:
        return reason, f"{what} {value:.3f} > {field}={limit:g}"
    return None


def filter_reason(stats: TextStats, row_words: int | None, row_chars: int, spec: FilterSpec) -> tuple[str, str] | None:
    """(reason, detail) of the first check the row fails, or None. `row_words` (whitespace tokens of every
    message) is only needed when spec.max_words is set."""
    if stats.chars == 0:
        return EMPTY, "response text is empty"
    if stats.chars < spec.min_chars:
        return TOO_SHORT, f"response has {stats.chars} chars < min_chars={spec.min_chars}"
    if row_chars > spec.max_chars:
        return TOO_LONG, f"row has {row_chars} chars > max_chars={spec.max_chars}"
    if spec.min_words is not None and stats.words < spec.min_words:
        return TOO_FEW_WORDS, f"response has {stats.words} words < min_words={spec.min_words}"
    if spec.max_words is not None and row_words is not None and row_words > spec.max_words:
        return TOO_MANY_WORDS, f"row has {row_words} words > max_words={spec.max_words}"
    if stats.chars < spec.min_text_length_for_ratios:
        return None
    return (
        _over(NONPRINTABLE, "non-printable ratio", stats.nonprintable_ratio, "max_nonprintable_ratio",
              spec.max_nonprintable_ratio)
        or _over(SYMBOL_RATIO, "symbol ratio", stats.symbol_ratio, "max_symbol_ratio", spec.max_symbol_ratio)
        or _over(DIGIT_RATIO, "digit ratio", stats.digit_ratio, "max_digit_ratio", spec.max_digit_ratio)
        or _over(REPEATED_NGRAMS, f"repeated {spec.repeated_ngram_n}-gram ratio", stats.repeated_ngram_ratio,
                 "max_repeated_ngram_ratio", spec.max_repeated_ngram_ratio)
        or _over(DUPLICATE_LINES, "duplicate line ratio", stats.duplicate_line_ratio, "max_duplicate_line_ratio",
                 spec.max_duplicate_line_ratio)
    )


def length_only(min_chars: int, max_chars: int) -> FilterSpec:
    """A FilterSpec with only the character-length checks switched on."""
    return FilterSpec(
        min_chars=min_chars, max_chars=max_chars, max_symbol_ratio=None, max_digit_ratio=None,
        max_repeated_ngram_ratio=None, max_duplicate_line_ratio=None, max_nonprintable_ratio=None,
    )


def apply_filters(table: pa.Table, spec: FilterSpec) -> pa.Table:
    """Mark kept rows failing a check `dropped` (op filter) and set `heuristic_score` on every row that was
    kept on entry (dropped ones included, for the score histograms); other rows are left as they are."""
    statuses = table.column("status").to_pylist()
    messages = table.column("messages").to_pylist()
    chars = table.column("text_chars").to_pylist()
    scores: list[Any] = table.column("heuristic_score").to_pylist()
    updates: dict[int, dict[str, str]] = {}
    for pos, status in enumerate(statuses):
        if status != KEPT:
            continue
        msgs = messages[pos] or []
        stats = text_stats(response_text(msgs), spec.repeated_ngram_n)
        scores[pos] = stats.score
        row_words = sum(len(m["content"].split()) for m in msgs) if spec.max_words is not None else None
        row_chars = chars[pos] if chars[pos] is not None else sum(len(m["content"]) for m in msgs)
        failed = filter_reason(stats, row_words, row_chars, spec)
        if failed:
            updates[pos] = {"status": DROPPED, "op": OP_FILTER, "reason": failed[0], "detail": failed[1]}
    index = table.schema.get_field_index("heuristic_score")
    table = table.set_column(index, "heuristic_score", pa.array(scores, ROW_SCHEMA.field("heuristic_score").type))
    return mark_rows(table, updates)
