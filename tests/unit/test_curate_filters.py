"""Heuristic filters and the heuristic score: each measure against its definition, each reason (no Ray)."""

from __future__ import annotations

import json
import math

import pytest
from curate_rows import chat, make_rows

from loraforge.data import filters as Fl
from loraforge.data.filters import apply_filters, duplicate_line_ratio, repeated_ngram_ratio, text_stats
from loraforge.data.schema import KIND_PREFERENCE, KIND_TEXT
from loraforge.spec import FilterSpec

# Only the check under test switched on (plus the length checks, which cannot be switched off).
OFF = dict(max_symbol_ratio=None, max_digit_ratio=None, max_repeated_ngram_ratio=None,
           max_duplicate_line_ratio=None, max_nonprintable_ratio=None, min_text_length_for_ratios=0)


def only(**kwargs) -> FilterSpec:
    return FilterSpec(**{**OFF, **kwargs})


def by_id(table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


PROSE = ("The committee met on Tuesday to review the budget. After a long discussion they agreed to fund "
         "the new library wing, and construction should begin in the spring.")


# ---------------------------------------------------------------- measures
def test_repeated_ngram_ratio_counts_words_covered_by_repeated_ngrams():
    words = "a b c a b c x".split()
    # 3-grams: abc, bca, cab, abc, bcx -> "a b c" occurs twice and covers words 0-2 and 3-5: 6 of 7
    assert repeated_ngram_ratio(words, 3) == pytest.approx(6 / 7)
    assert repeated_ngram_ratio("a b c d e f".split(), 3) == 0.0
    assert repeated_ngram_ratio("a b".split(), 3) == 0.0  # fewer words than n
    # overlapping occurrences count each word once: "a a a a" 2-grams (a,a) x3 cover all 4 words
    assert repeated_ngram_ratio("a a a a".split(), 2) == 1.0
    # unigrams: words that occur more than once
    assert repeated_ngram_ratio("x y x z".split(), 1) == pytest.approx(2 / 4)


def test_duplicate_line_ratio_ignores_blank_and_symbol_only_lines():
    assert duplicate_line_ratio("one line only") == 0.0
    assert duplicate_line_ratio("buy now\nbuy now\n  buy now  \nsomething else") == pytest.approx(2 / 4)
    code = "if a {\n  f(1)\n}\nif b {\n  f(2)\n}\n```\n```"
    assert duplicate_line_ratio(code) == 0.0  # `}` and ``` lines are structure, not repetition
    assert duplicate_line_ratio("\n\n---\n---") == 0.0


def test_text_stats_ratios_match_their_definitions():
    s = text_stats("ab ## 12\n\x00x")
    # non-whitespace characters: a b # # 1 2 \x00 x = 8; whitespace: space, space, newline
    assert s.words == 4
    assert s.symbol_ratio == pytest.approx(2 / 8)  # '#', '#' (the NUL is non-printable, not a symbol)
    assert s.digit_ratio == pytest.approx(2 / 8)
    assert s.nonprintable_ratio == pytest.approx(1 / 11)  # NUL of 11 characters
    assert s.chars == 11
    prose = text_stats("Well, it's fine (really) - isn't it? Yes; \u201cquite\u201d\u2014ok.")
    assert prose.symbol_ratio == 0.0  # ordinary punctuation, quotes and dashes are not symbols
    assert text_stats("x_y @ a").symbol_ratio == pytest.approx(2 / 5)
    # non-ASCII: symbols (S*) and non-prose punctuation count, letters, marks and digits of any script do not
    mixed = "\u00a9\u2192\u3002 \u0939\u093f\u0928\u094d\u0926\u0940 \u0663"  # 3 symbols, Hindi word, digit
    assert text_stats(mixed).symbol_ratio == pytest.approx(3 / 10)
    assert text_stats("\u0663\u0664").digit_ratio == 1.0  # Arabic-Indic digits are digits


def test_nonprintable_counts_controls_unassigned_private_use_and_replacement_char():
    assert Fl.nonprintable_count("tab\tnewline\ncr\r") == 0
    assert Fl.nonprintable_count("\x07\x1b\x7f") == 3
    assert Fl.nonprintable_count("caf\u00e9 \u4e2d\u6587 \U0001F600 \u00a0") == 0  # letters, emoji, nbsp
    assert Fl.nonprintable_count("\x85\ue000\ufffd\U000e0080x") == 4  # C1 control, private use, U+FFFD, Cn


def test_heuristic_score_formula():
    text = "one two three four five six seven eight nine ten\n" * 1 + "#" * 5
    s = text_stats(text)
    expected = ((1 - math.exp(-s.words / Fl.LENGTH_SCALE)) * (1 - s.symbol_ratio) * (1 - s.repeated_ngram_ratio)
                * (1 - s.duplicate_line_ratio) * (1 - s.nonprintable_ratio))
    assert s.score == pytest.approx(expected)
    assert text_stats("").score == 0.0
    assert 0 < text_stats(PROSE).score < 1


def test_heuristic_score_prefers_fuller_and_cleaner_texts():
    short = PROSE[:60]
    assert Fl.heuristic_score(PROSE) > Fl.heuristic_score(short)  # same text, more of it
    assert Fl.heuristic_score(PROSE) > Fl.heuristic_score(PROSE.replace(" ", " ## "))  # symbol noise
    assert Fl.heuristic_score(PROSE) > Fl.heuristic_score(PROSE + "\n" + PROSE)  # a pasted-twice copy
    assert Fl.heuristic_score("1 2 3 4 5 6 7 8") == Fl.heuristic_score("a b c d e f g h")  # digits are fine


# ---------------------------------------------------------------- reasons
SHORT = "A fine answer."
CASES = [
    # (spec, answer, reason, words in the detail[, an answer the spec keeps; default PROSE])
    (only(), "   ", "empty", "empty"),
    (only(min_chars=10), "short", "too_short", "5 chars < min_chars=10"),
    (only(max_chars=30), "x" * 40, "too_long", "row has 41 chars > max_chars=30", SHORT),
    (only(min_words=5), "only three words", "too_few_words", "3 words < min_words=5"),
    (only(max_words=5), "one two three four five six", "too_many_words", "row has 7 words > max_words=5", SHORT),
    (only(max_nonprintable_ratio=0.01), PROSE + "\x00" * 5, "nonprintable", "max_nonprintable_ratio=0.01"),
    (only(max_symbol_ratio=0.25), "#### $$$$ %%%% &&&& ** ok", "symbol_ratio", "> max_symbol_ratio=0.25"),
    (only(max_digit_ratio=0.5), "call 1234567890 and 0987654321 now", "digit_ratio",
     "digit ratio 0.667 > max_digit_ratio=0.5"),
    (only(max_repeated_ngram_ratio=0.3, repeated_ngram_n=3), "buy cheap pills now " * 5, "repeated_ngrams",
     "repeated 3-gram ratio 1.000"),
    (only(max_duplicate_line_ratio=0.3), "same line here\n" * 4 + "other", "duplicate_lines",
     "duplicate line ratio 0.600"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[2] for c in CASES])
def test_each_reason(case):
    spec, answer, reason, detail = case[:4]
    good = case[4] if len(case) > 4 else PROSE
    out = by_id(apply_filters(make_rows([{"user": "q", "answer": answer}, {"user": "q", "answer": good}]), spec))
    assert (out["s:1"]["status"], out["s:1"]["op"], out["s:1"]["reason"]) == ("dropped", "filter", reason)
    assert detail in out["s:1"]["detail"]
    assert out["s:2"]["status"] == "kept", out["s:2"]["detail"]
    assert reason in Fl.REASONS


def test_thresholds_of_null_switch_checks_off():
    junk = "#### $$$$ " * 10 + "\x00" + "\nsame\nsame\nsame"
    spec = FilterSpec(max_symbol_ratio=None, max_digit_ratio=None, max_repeated_ngram_ratio=None,
                      max_duplicate_line_ratio=None, max_nonprintable_ratio=None)
    assert apply_filters(make_rows([{"user": "q", "answer": junk}]), spec).column("status").to_pylist() == ["kept"]


def test_ratios_skip_short_responses():
    spec = FilterSpec(max_symbol_ratio=0.1, min_text_length_for_ratios=20)
    out = apply_filters(make_rows([{"user": "q", "answer": "x = 2 * 3 + 4"}, {"user": "q", "answer": "#" * 25}]), spec)
    assert out.column("reason").to_pylist() == [None, "symbol_ratio"]


def test_first_failing_check_wins():
    spec = FilterSpec(min_words=50, max_symbol_ratio=0.1, min_text_length_for_ratios=0)
    out = apply_filters(make_rows([{"user": "q", "answer": "#### ####"}]), spec)
    assert out.column("reason").to_pylist() == ["too_few_words"]


def test_max_words_and_max_chars_count_the_whole_row_min_checks_the_response():
    spec = only(max_words=6, min_chars=3)
    rows = make_rows([
        {"user": "one two three four five", "answer": "six seven"},  # 7 words in the row
        {"user": "one two", "answer": "three"},
    ])
    assert apply_filters(rows, spec).column("reason").to_pylist() == ["too_many_words", None]
    long_prompt = make_rows([{"user": "p" * 100, "answer": "fine answer"}])
    assert apply_filters(long_prompt, only(max_chars=50)).column("reason").to_pylist() == ["too_long"]


def test_response_is_every_assistant_turn():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "bc"}]
    out = apply_filters(make_rows([{"messages": messages}]), only(min_chars=4))  # "a\nbc" = 4 chars
    assert out.column("status").to_pylist() == ["kept"]
    out = apply_filters(make_rows([{"messages": messages}]), only(min_chars=5))
    assert out.column("reason").to_pylist() == ["too_short"]


def test_preference_rows_are_judged_by_the_chosen_answer_and_text_rows_by_the_document():
    rows = make_rows([
        {"messages": chat("q", PROSE), "kind": KIND_PREFERENCE, "rejected": "#### " * 50},
        {"messages": [{"role": "assistant", "content": "#" * 40}], "kind": KIND_TEXT},
    ])
    out = apply_filters(rows, only(max_symbol_ratio=0.25))
    assert out.column("reason").to_pylist() == [None, "symbol_ratio"]


def test_only_kept_rows_are_touched_and_scores_set():
    rows = make_rows([
        {"user": "q", "answer": PROSE},
        {"user": "q", "answer": "", "status": "dropped", "op": "parse", "reason": "bad_json"},
        {"user": "q", "answer": "x", "status": "merged", "op": "exact_dedup", "reason": "duplicate",
         "merged_into": "s:1", "heuristic_score": 0.5},
        {"user": "q", "answer": "   "},
    ])
    out = by_id(apply_filters(rows, FilterSpec()))
    assert (out["s:1"]["status"], out["s:1"]["reason"]) == ("kept", None)
    assert out["s:1"]["heuristic_score"] == pytest.approx(Fl.heuristic_score(PROSE))
    assert (out["s:2"]["status"], out["s:2"]["reason"], out["s:2"]["heuristic_score"]) == ("dropped", "bad_json", None)
    assert (out["s:3"]["status"], out["s:3"]["heuristic_score"]) == ("merged", 0.5)  # untouched
    assert (out["s:4"]["reason"], out["s:4"]["heuristic_score"]) == ("empty", 0.0)  # examined: scored
    assert out["s:1"]["messages"] == rows.to_pylist()[0]["messages"]  # filters never edit text


def test_real_data_mostly_passes_loose_thresholds():
    """Real instruction data (self-instruct outputs, GSM8K answers) is not junk: with ratio thresholds
    a little above the spec defaults almost all of it is kept (the defaults' effect is in the README)."""
    from loraforge.paths import shared_data_dir

    answers = [json.loads(line)["answer"] for line in (shared_data_dir() / "gsm8k_test.jsonl").open()]
    rows = make_rows([{"user": "q", "answer": a} for a in answers])
    spec = FilterSpec(max_symbol_ratio=0.35, repeated_ngram_n=5, max_repeated_ngram_ratio=0.5)
    kept = apply_filters(rows, spec).column("status").to_pylist().count("kept")
    assert kept / len(answers) > 0.99
