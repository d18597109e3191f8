"""read_conversations: the loader training uses, on JSONL files and Parquet folders (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraforge.data.io import read_conversations
from loraforge.data.schema import OUTPUT_SCHEMA
from loraforge.errors import DataError

CONV = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


def test_jsonl_mixed_formats(tmp_path):
    path = tmp_path / "mix.jsonl"
    rows = [
        {"instruction": "q", "output": "a"},
        {"messages": CONV},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"instruction": "q", "instances": [{"input": "", "output": "a"}, {"input": "", "output": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_conversations(path) == [CONV] * 5


@pytest.mark.parametrize(
    ("bad", "message"),
    [("{nope", "bad_json"), ('{"instruction": "q"}', "missing_field"),
     ('{"instruction": "q", "instances": [{"output": 1}]}', "bad_type")],
)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n\n" + bad + "\n")
    with pytest.raises(DataError) as info:
        read_conversations(path)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no conversations"):
        read_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no Parquet files"):
        read_conversations(tmp_path / "folder")


def test_curate_output_folder(tmp_path):
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    for i in range(2):
        rows = [{"id": f"s:{i}", "source": "s", "messages": CONV}]
        pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), data / f"part-{i:05d}-0.parquet")
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "out" / "ledger.parquet")  # not data: ignored
    assert read_conversations(tmp_path / "out") == [CONV, CONV]
    assert read_conversations(data) == [CONV, CONV]
    assert read_conversations(data / "part-00000-0.parquet") == [CONV]


def test_jsonl_preference_and_text_rows(tmp_path):
    path = tmp_path / "kinds.jsonl"
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "wrong"},  # -> prompt + chosen answer
        {"chosen": CONV, "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no"}]},
        {"text": "a whole document"},  # -> one assistant message
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_conversations(path) == [CONV, CONV, [{"role": "assistant", "content": "a whole document"}]]


def test_plain_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("doc one\nstill one\n\n\ndoc two\n")
    assert read_conversations(path) == [[{"role": "assistant", "content": "doc one\nstill one"}],
                                         [{"role": "assistant", "content": "doc two"}]]
    (tmp_path / "bad.txt").write_bytes(b"ok\n\nbad \xff\n")
    with pytest.raises(DataError, match="bad.txt:3"):
        read_conversations(tmp_path / "bad.txt")


def test_raw_parquet_in_an_input_format(tmp_path):
    path = tmp_path / "alpaca.parquet"
    pq.write_table(pa.table({"instruction": ["q", "q"], "input": [None, ""], "output": ["a", "a"]}), path)
    assert read_conversations(path) == [CONV, CONV]
    pq.write_table(pa.table({"instruction": ["q", "q"], "output": ["a", None]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet:record 2.*'output'"):
        read_conversations(tmp_path / "bad.parquet")


def test_unreadable_parquet_is_a_data_error(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="junk.parquet"):
        read_conversations(tmp_path / "junk.parquet")
