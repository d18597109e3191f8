"""Row formats -> parsed rows (conversation, kind, rejected), and every way a row can be unusable (no Ray)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraforge.data import formats as F
from loraforge.data.formats import Parsed, RowError, parse_line, parse_record, response_text
from loraforge.data.schema import KIND_CHAT, KIND_PREFERENCE, KIND_TEXT


def conv(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def only_parsed(rows) -> Parsed:
    assert len(rows) == 1 and rows[0][0] == 0
    assert isinstance(rows[0][1], Parsed)
    return rows[0][1]


def only(rows):
    """The conversation of a one-row chat record."""
    parsed = only_parsed(rows)
    assert parsed.kind == KIND_CHAT and parsed.rejected is None
    return parsed.messages


def test_alpaca_with_and_without_input():
    assert only(parse_record({"instruction": "Add", "input": "2+2", "output": "4"})) == conv("Add\n\n2+2", "4")
    assert only(parse_record({"instruction": "Hi", "input": "", "output": "yo"})) == conv("Hi", "yo")
    assert only(parse_record({"instruction": "Hi", "output": "yo"}, "alpaca")) == conv("Hi", "yo")
    assert only(parse_record({"instruction": "Hi", "input": None, "output": "yo"})) == conv("Hi", "yo")
    # whitespace-only input is not appended
    assert only(parse_record({"instruction": "Hi", "input": "  ", "output": "yo"})) == conv("Hi", "yo")


def test_chat_messages_and_sharegpt():
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    assert only(parse_record({"messages": msgs})) == msgs
    share = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}]}
    assert only(parse_record(share, "chat")) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    ]


def test_self_instruct_one_row_per_instance():
    rec = {"id": "seed_task_1", "instruction": "Antonym?", "instances": [
        {"input": "hot", "output": "cold"}, {"input": "", "output": "none"}, {"output": 3}]}
    rows = parse_record(rec)  # auto-detected
    assert [sub for sub, _ in rows] == [1, 2, 3]
    assert rows[0][1] == Parsed(conv("Antonym?\n\nhot", "cold"))
    assert rows[1][1].messages == conv("Antonym?", "none")
    assert isinstance(rows[2][1], RowError) and rows[2][1].reason == F.BAD_TYPE
    assert "instances[2]" in rows[2][1].detail


def test_real_self_instruct_line(shared_line):
    rows = parse_line(shared_line)
    assert len(rows) == 1 and rows[0][0] == 1
    messages = rows[0][1].messages
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert json.loads(shared_line)["instruction"] in messages[0]["content"]


@pytest.fixture
def shared_line():
    from loraforge.paths import shared_data_dir

    path = shared_data_dir() / "self_instruct_seed_tasks.jsonl"
    return path.read_text().splitlines()[0]


@pytest.mark.parametrize("fmt", ["auto", "alpaca", "chat", "self_instruct"])
def test_detect_or_declare(fmt):
    rows = {
        "alpaca": {"instruction": "i", "output": "o"},
        "chat": {"messages": [{"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}]},
        "self_instruct": {"instruction": "i", "instances": [{"input": "", "output": "o"}]},
    }
    for name, rec in rows.items():
        if fmt in ("auto", name):
            assert parse_record(rec, fmt)[0][1].messages == conv("i", "o")


@pytest.mark.parametrize(
    ("line", "fmt", "reason", "in_detail"),
    [
        ('{"instruction": "x", "output": ', "auto", F.BAD_JSON, "Expecting value"),
        ("not json at all", "auto", F.BAD_JSON, "line 1 column 1"),
        ("[1, 2]", "auto", F.NOT_OBJECT, "list"),
        ('"a string"', "auto", F.NOT_OBJECT, "str"),
        ("null", "auto", F.NOT_OBJECT, "NoneType"),
        ('{"foo": 1, "bar": 2}', "auto", F.UNKNOWN_FORMAT, "bar, foo"),
        ('{"instruction": "x"}', "auto", F.MISSING_FIELD, "output"),
        ('{"output": "y"}', "auto", F.MISSING_FIELD, "instruction"),
        ('{"instruction": "   ", "output": "y"}', "auto", F.MISSING_FIELD, "empty"),
        ('{"instruction": 5, "output": "y"}', "auto", F.BAD_TYPE, "int"),
        ('{"instruction": "x", "output": ["y"]}', "auto", F.BAD_TYPE, "list"),
        ('{"instruction": "x", "input": 3, "output": "y"}', "auto", F.BAD_TYPE, "'input'"),
        ('{"messages": "hi"}', "auto", F.BAD_TYPE, "must be a list"),
        ('{"messages": ["hi"]}', "auto", F.BAD_TYPE, "messages[0]"),
        ('{"messages": [{"role": "user"}]}', "auto", F.MISSING_FIELD, "content"),
        ('{"messages": [{"role": "user", "content": 1}]}', "auto", F.BAD_TYPE, "content"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "auto", F.BAD_ROLE, "'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "auto", F.NO_ASSISTANT, "1 message"),
        ('{"messages": []}', "auto", F.NO_ASSISTANT, "0 message"),
        ('{"conversations": [{"from": "alien", "value": "x"}]}', "auto", F.BAD_ROLE, "alien"),
        ('{"instruction": "x", "instances": []}', "auto", F.NO_INSTANCES, "empty"),
        ('{"instruction": "x", "instances": {"output": "y"}}', "auto", F.BAD_TYPE, "dict"),
        ('{"instruction": "x", "output": "y"}', "chat", F.MISSING_FIELD, "messages"),
        ('{"messages": []}', "alpaca", F.MISSING_FIELD, "instruction"),
        ('{"instruction": "x", "output": "y"}', "self_instruct", F.BAD_TYPE, "instances"),
        # preference pairs
        ('{"prompt": "p", "chosen": "a"}', "auto", F.MISSING_FIELD, "'rejected'"),
        ('{"prompt": "p", "rejected": "b"}', "auto", F.MISSING_FIELD, "'chosen'"),
        ('{"chosen": "a", "rejected": "b"}', "auto", F.MISSING_FIELD, "prompt"),
        ('{"prompt": "  ", "chosen": "a", "rejected": "b"}', "auto", F.MISSING_FIELD, "empty"),
        ('{"prompt": [], "chosen": "a", "rejected": "b"}', "auto", F.MISSING_FIELD, "empty list"),
        ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "auto", F.BAD_TYPE, "'prompt'"),
        ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "auto", F.BAD_TYPE, "'chosen'"),
        ('{"prompt": "p", "chosen": "a", "rejected": {"x": 1}}', "auto", F.BAD_TYPE, "'rejected'"),
        ('{"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "auto",
         F.NO_ASSISTANT, "'chosen' must end with an assistant turn"),
        ('{"prompt": "p", "chosen": "a", "rejected": []}', "auto", F.NO_ASSISTANT, "'rejected'"),
        ('{"prompt": [{"role": "bot", "content": "p"}], "chosen": "a", "rejected": "b"}', "auto", F.BAD_ROLE,
         "prompt[0]"),
        ('{"instruction": "x", "output": "y"}', "preference", F.MISSING_FIELD, "'chosen'"),
        # text documents
        ('{"text": 5}', "auto", F.BAD_TYPE, "'text'"),
        ('{"text": null}', "text", F.BAD_TYPE, "NoneType"),
        ('{"body": "x"}', "text", F.MISSING_FIELD, "'text'"),
        # explicit ShareGPT
        ('{"messages": []}', "sharegpt", F.MISSING_FIELD, "conversations"),
        ('{"conversations": [{"from": "human", "value": "q"}]}', "sharegpt", F.NO_ASSISTANT, "1 message"),
        ('{"conversations": [{"from": "gpt"}]}', "sharegpt", F.MISSING_FIELD, "'value'"),
        ('{"conversations": [{"value": "x"}]}', "sharegpt", F.MISSING_FIELD, "'from'"),
    ],
)
def test_malformed_rows_raise_row_error(line, fmt, reason, in_detail):
    with pytest.raises(RowError) as info:
        parse_line(line, fmt)
    assert info.value.reason == reason
    assert in_detail in info.value.detail


def test_deeply_nested_json_is_a_row_error_not_a_crash():
    with pytest.raises(RowError) as info:
        parse_line("[" * 100_000 + "]" * 100_000)
    assert info.value.reason in (F.BAD_JSON, F.NOT_OBJECT)


# ---------------------------------------------------------------- preference, text, ShareGPT
def test_preference_with_string_prompt():
    parsed = only_parsed(parse_record({"prompt": "2+2?", "chosen": "4", "rejected": "5"}))
    assert parsed.kind == KIND_PREFERENCE
    assert parsed.messages == conv("2+2?", "4")
    assert parsed.rejected == "5"
    assert response_text(parsed.messages) == "4"  # filters look at the chosen answer only


def test_preference_with_message_lists():
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    rec = {
        "prompt": prompt,
        # UltraFeedback style: chosen/rejected repeat the prompt and end with the answer
        "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "22"}],
    }
    parsed = only_parsed(parse_record(rec, "preference"))
    assert parsed.messages == prompt + [{"role": "assistant", "content": "4"}]  # the explicit prompt wins
    assert (parsed.kind, parsed.rejected) == (KIND_PREFERENCE, "22")


def test_preference_without_prompt_takes_it_from_the_chosen_conversation():
    chosen = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "bye?"}, {"role": "assistant", "content": "bye"}]
    parsed = only_parsed(parse_record({"chosen": chosen, "rejected": [{"role": "assistant", "content": "no"}]}))
    assert parsed.messages == chosen
    assert parsed.rejected == "no"


def test_text_rows_are_one_assistant_message():
    parsed = only_parsed(parse_record({"text": "A document.\n\nSecond paragraph.", "meta": 1}))
    assert parsed == Parsed([{"role": "assistant", "content": "A document.\n\nSecond paragraph."}], KIND_TEXT)
    assert only_parsed(parse_record({"text": "x"}, "text")).kind == KIND_TEXT


def test_explicit_sharegpt_names_and_role_content_turns():
    rec = {"conversations": [{"from": "System", "value": "s"}, {"from": "human", "value": "q"},
                             {"role": "assistant", "content": "a"}]}  # mixed styles occur in the wild
    assert only(parse_record(rec, "sharegpt")) == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    ]
    assert F.detect_format(rec) == "sharegpt"


@pytest.mark.parametrize(
    ("rec", "fmt"),
    [
        ({"messages": []}, "chat"),
        ({"conversations": []}, "sharegpt"),
        ({"instruction": "i", "instances": []}, "self_instruct"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"chosen": "a", "rejected": "b"}, "preference"),
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"text": "t"}, "text"),
        ({"text": "t", "instruction": "i", "output": "o"}, "alpaca"),  # text is the last resort
        ({"text": "t", "instruction": None, "output": None, "chosen": None}, "text"),  # nulls are absent
        ({"instruction": None, "output": None}, "alpaca"),  # ... unless nothing else is there
    ],
)
def test_auto_detection(rec, fmt):
    assert F.detect_format(rec) == fmt


def test_unknown_format_is_a_programming_error_not_a_row_error():
    with pytest.raises(ValueError, match="unknown format 'yaml'"):
        parse_record({"text": "x"}, "yaml")


def test_lone_surrogate_escape_is_a_bad_encoding_row():
    # json.loads accepts "\ud800" but the result is not UTF-8: Arrow could not store it.
    rows = parse_line('{"instruction": "q", "output": "bad \\ud800 here"}')
    assert isinstance(rows[0][1], RowError) and rows[0][1].reason == F.BAD_ENCODING
    # a proper surrogate pair is one emoji and fine
    rows = parse_line('{"instruction": "q", "output": "ok \\ud83d\\ude00"}')
    assert rows[0][1].messages[1]["content"] == "ok \U0001F600"


# ---------------------------------------------------------------- property: never anything but RowError
_keys = st.sampled_from(["instruction", "input", "output", "messages", "conversations", "instances", "prompt",
                         "chosen", "rejected", "text", "role", "content", "from", "value", "x"])
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.sampled_from(["user", "assistant", "system", "human", "gpt"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_json, fmt=st.sampled_from(F.FORMATS))
def test_parse_record_raises_only_row_errors(obj, fmt):
    try:
        rows = parse_record(obj, fmt)
    except RowError as err:
        assert err.reason and err.detail
        return
    for sub, result in rows:
        assert isinstance(sub, int)
        if isinstance(result, RowError):
            continue
        assert result.kind in (KIND_CHAT, KIND_PREFERENCE, KIND_TEXT)
        assert any(m["role"] == "assistant" for m in result.messages)
        assert all(isinstance(m["content"], str) and m["role"] in F.ROLES for m in result.messages)
        assert (result.rejected is not None) == (result.kind == KIND_PREFERENCE)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_parse_line_raises_only_row_errors_on_any_text(text):
    try:
        parse_line(text)
    except RowError:
        pass
