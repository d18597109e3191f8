"""Row formats -> conversations, and every way a row can be unusable (no Ray)."""

from __future__ import annotations

import json

import pytest

from loraforge.data import formats as F
from loraforge.data.formats import RowError, parse_line, parse_record


def conv(user: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def only(rows):
    assert len(rows) == 1 and rows[0][0] == 0
    return rows[0][1]


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
    assert rows[0][1] == conv("Antonym?\n\nhot", "cold")
    assert rows[1][1] == conv("Antonym?", "none")
    assert isinstance(rows[2][1], RowError) and rows[2][1].reason == F.BAD_TYPE
    assert "instances[2]" in rows[2][1].detail


def test_real_self_instruct_line(shared_line):
    rows = parse_line(shared_line)
    assert len(rows) == 1 and rows[0][0] == 1
    messages = rows[0][1]
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
            assert parse_record(rec, fmt)[0][1] == conv("i", "o")


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
