"""Curation ops on in-memory Arrow batches: reading (JSONL, Parquet, text), parsing, exact dedup (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loraforge.data import ops
from loraforge.data.schema import KIND_CHAT, KIND_PREFERENCE, KIND_TEXT, LINE_SCHEMA, MESSAGES_TYPE, ROW_SCHEMA
from loraforge.errors import DataError


def alpaca(instruction: str, output: str, inp: str = "") -> str:
    return json.dumps({"instruction": instruction, "input": inp, "output": output})


def chat(user: str, answer: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})


def lines_table(source: str, lines: list[str | None], input_index: int = 0, fmt: str = "auto") -> pa.Table:
    return pa.Table.from_pylist(
        [{"input_index": input_index, "source": source, "format": fmt, "line": i, "text": t}
         for i, t in enumerate(lines, start=1)],
        schema=LINE_SCHEMA,
    )


def by_id(table: pa.Table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


def test_read_lines_numbers_lines_skips_blanks_and_survives_bad_bytes(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n   \n\xff\xfe bad utf8\n{"b": 2}\r\nlast-no-newline')
    files = ops.file_table([{"input_index": 3, "source": "src", "path": str(path), "format": "alpaca"}])
    chunks = list(ops.read_lines(files, chunk_lines=2))
    assert [c.num_rows for c in chunks] == [2, 2]  # chunked, blank lines skipped
    table = pa.concat_tables(chunks)
    assert table.schema == LINE_SCHEMA
    assert table.column("line").to_pylist() == [1, 4, 5, 6]
    assert table.column("text").to_pylist() == ['{"a": 1}', None, '{"b": 2}', "last-no-newline"]
    assert set(table.column("format").to_pylist()) == {"alpaca"}
    assert set(table.column("input_index").to_pylist()) == {3}
    assert set(table.column("group").to_pylist()) == {"src"}  # no group given: the source name
    assert set(table.column("rehearsal").to_pylist()) == {False}


def files_of(path, fmt="auto", group=None, rehearsal=False, source="src") -> pa.Table:
    return ops.file_table([{"input_index": 0, "source": source, "path": str(path), "format": fmt,
                            "group": group, "rehearsal": rehearsal}])


def test_read_parquet_records_in_chunks_through_the_same_parse(tmp_path):
    path = tmp_path / "in.parquet"
    records = [
        {"instruction": "q1", "input": None, "output": "a1", "chosen": None, "rejected": None, "prompt": None},
        {"instruction": None, "input": None, "output": None, "chosen": "yes", "rejected": "no", "prompt": "p"},
        {"instruction": "q3", "input": "ctx", "output": None, "chosen": None, "rejected": None, "prompt": None},
    ]
    # a Parquet table has one schema: absent fields are null columns; null means "absent" for detection
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    chunks = list(ops.read_lines(files_of(path, group="g", rehearsal=True), chunk_lines=2))
    assert [c.num_rows for c in chunks] == [2, 1]
    lines = pa.concat_tables(chunks)
    assert lines.column("line").to_pylist() == [1, 2, 3]
    assert set(lines.column("group").to_pylist()) == {"g"} and set(lines.column("rehearsal").to_pylist()) == {True}
    assert json.loads(lines.column("text")[0].as_py())["instruction"] == "q1"
    rows = by_id(ops.parse_lines(lines))
    assert (rows["src:1"]["kind"], rows["src:1"]["messages"]) == (KIND_CHAT, [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}])
    assert (rows["src:2"]["kind"], rows["src:2"]["rejected"]) == (KIND_PREFERENCE, "no")
    assert (rows["src:3"]["status"], rows["src:3"]["reason"]) == ("dropped", "bad_type")  # output is null
    assert "'output'" in rows["src:3"]["detail"]
    assert {r["group"] for r in rows.values()} == {"g"}


def test_parquet_chat_and_preference_records(tmp_path):
    path = tmp_path / "chat.parquet"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.Table.from_pylist([{"messages": msgs}, {"messages": msgs[:1]}]), path)
    rows = by_id(ops.parse_lines(pa.concat_tables(ops.read_lines(files_of(path, "chat")))))
    assert rows["src:1"]["messages"] == msgs and rows["src:1"]["status"] == "kept"
    assert (rows["src:2"]["status"], rows["src:2"]["reason"]) == ("dropped", "no_assistant")


def test_parquet_odd_value_types_do_not_crash(tmp_path):
    import datetime

    path = tmp_path / "odd.parquet"
    table = pa.table({"text": ["doc one", "doc two"], "when": [datetime.date(2024, 1, 1), None],
                      "raw": [b"ok", b"\xff\xfe"]})
    pq.write_table(table, path)
    rows = by_id(ops.parse_lines(pa.concat_tables(ops.read_lines(files_of(path, "text")))))
    assert rows["src:1"]["messages"] == [{"role": "assistant", "content": "doc one"}]
    assert (rows["src:2"]["status"], rows["src:2"]["reason"]) == ("dropped", "bad_encoding")  # bytes not UTF-8


@pytest.mark.parametrize("content", [b"not parquet at all", b""])
def test_unreadable_parquet_is_a_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken.parquet: cannot read as Parquet"):
        list(ops.read_lines(files_of(path)))
    with pytest.raises(DataError, match="broken.parquet"):
        ops.check_input_file(path, "auto")


def test_read_plain_text_documents(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"First doc line one\nline two\n\n\n  \nSecond doc\r\n\nbad \xff byte\nmore\n\nlast")
    lines = pa.concat_tables(ops.read_lines(files_of(path, "text"), chunk_lines=2))
    assert lines.column("line").to_pylist() == [1, 6, 8, 11]  # first line of each block
    assert set(lines.column("format").to_pylist()) == {"text"}
    rows = by_id(ops.parse_lines(lines))
    assert rows["src:1"]["messages"] == [{"role": "assistant", "content": "First doc line one\nline two"}]
    assert rows["src:1"]["kind"] == KIND_TEXT
    assert rows["src:6"]["messages"][0]["content"] == "Second doc"
    assert (rows["src:8"]["status"], rows["src:8"]["reason"]) == ("dropped", "bad_encoding")
    assert rows["src:11"]["messages"][0]["content"] == "last"
    # auto on a .txt file also means plain documents
    assert pa.concat_tables(ops.read_lines(files_of(path, "auto"))).num_rows == 4


def test_text_input_needs_the_text_format(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError, match="format must be text, not 'alpaca'"):
        list(ops.read_lines(files_of(path, "alpaca")))


def test_input_type_by_suffix():
    assert [ops.input_type(p) for p in ("a.jsonl", "b.json", "c.PARQUET", "d.txt", "e")] == [
        "jsonl", "jsonl", "parquet", "txt", "jsonl"]


def test_parse_lines_ids_statuses_and_schema():
    seed = json.dumps({"instruction": "Antonym", "instances": [{"input": "hot", "output": "cold"},
                                                               {"input": "up", "output": 7}]})
    table = ops.parse_lines(lines_table("s", [alpaca("a", "b"), "oops{", None, chat("q", "r"), seed]))
    assert table.schema == ROW_SCHEMA
    rows = by_id(table)
    assert list(rows) == ["s:1", "s:2", "s:3", "s:4", "s:5#1", "s:5#2"]
    assert rows["s:1"]["status"] == "kept" and rows["s:1"]["op"] is None
    assert rows["s:1"]["text_chars"] == 2
    assert (rows["s:2"]["status"], rows["s:2"]["op"], rows["s:2"]["reason"]) == ("dropped", "parse", "bad_json")
    assert "Expecting" in rows["s:2"]["detail"] and rows["s:2"]["messages"] is None
    assert rows["s:3"]["reason"] == "bad_encoding"
    assert rows["s:4"]["messages"][1] == {"role": "assistant", "content": "r"}
    assert rows["s:5#1"]["status"] == "kept" and rows["s:5#1"]["sub"] == 1
    assert rows["s:5#2"]["reason"] == "bad_type"
    assert table.schema.field("messages").type == MESSAGES_TYPE
    assert {r["kind"] for r in rows.values() if r["status"] == "kept"} == {KIND_CHAT}
    assert rows["s:2"]["kind"] is None
    # group defaults to the source name, rehearsal to false, on every row (dropped ones too)
    assert {(r["group"], r["rehearsal"]) for r in rows.values()} == {("s", False)}
    # columns later ops fill start null
    assert table.column("heuristic_score").null_count == table.num_rows
    assert table.column("pii").null_count == table.num_rows


def test_parse_lines_kinds_rejected_group_and_rehearsal():
    pref = json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    text = json.dumps({"text": "Once upon a time."})
    lines = pa.Table.from_pylist(
        [{"input_index": 0, "source": "s", "format": "auto", "group": "maths", "rehearsal": True, "line": i, "text": t}
         for i, t in enumerate([pref, text], start=1)],
        schema=LINE_SCHEMA,
    )
    rows = by_id(ops.parse_lines(lines))
    assert (rows["s:1"]["kind"], rows["s:1"]["rejected"]) == (KIND_PREFERENCE, "5")
    assert rows["s:1"]["messages"][-1] == {"role": "assistant", "content": "4"}
    assert rows["s:1"]["text_chars"] == len("2+2?") + 1  # messages only, not the rejected answer
    assert (rows["s:2"]["kind"], rows["s:2"]["rejected"]) == (KIND_TEXT, None)
    assert rows["s:2"]["messages"] == [{"role": "assistant", "content": "Once upon a time."}]
    assert {(r["group"], r["rehearsal"]) for r in rows.values()} == {("maths", True)}


def test_parse_lines_of_an_empty_table():
    out = ops.parse_lines(LINE_SCHEMA.empty_table())
    assert out.schema == ROW_SCHEMA and out.num_rows == 0


def test_length_filter_marks_only_kept_rows():
    table = ops.parse_lines(lines_table("s", [alpaca("q", ""), alpaca("q", "ok!"), "bad", alpaca("q", "x" * 50),
                                              alpaca("q", "fine answer")]))
    out = by_id(ops.length_filter(table, min_chars=3, max_chars=40))
    assert {k: (r["status"], r["op"], r["reason"]) for k, r in out.items()} == {
        "s:1": ("dropped", "filter", "empty"),
        "s:2": ("kept", None, None),
        "s:3": ("dropped", "parse", "bad_json"),  # untouched
        "s:4": ("dropped", "filter", "too_long"),
        "s:5": ("kept", None, None),
    }
    assert "max_chars=40" in out["s:4"]["detail"]
    # the length filter scores what it examines; parse-dropped rows stay unscored
    assert out["s:2"]["heuristic_score"] is not None and out["s:3"]["heuristic_score"] is None


def test_content_hash_normalises_whitespace_but_keeps_case_and_roles():
    base = [{"role": "user", "content": "Hello  world"}, {"role": "assistant", "content": "Hi"}]
    spaced = [{"role": "user", "content": " Hello\n\tworld "}, {"role": "assistant", "content": "Hi\n"}]
    upper = [{"role": "user", "content": "HELLO world"}, {"role": "assistant", "content": "Hi"}]
    swapped = [{"role": "assistant", "content": "Hello  world"}, {"role": "user", "content": "Hi"}]
    assert ops.content_hash(base) == ops.content_hash(spaced)
    assert ops.content_hash(base) != ops.content_hash(upper)
    assert ops.content_hash(base) != ops.content_hash(swapped)


def test_mark_duplicates_keeps_first_in_input_order_regardless_of_batch_order():
    a = lines_table("a", [alpaca("Say hi", "hi there"), alpaca("x", "y"), alpaca("Say hi", "hi   there")])
    b = lines_table("b", [chat("Say hi", "hi there"), "broken"], input_index=1)
    rows = ops.add_content_hash(ops.parse_lines(pa.concat_tables([b, a])))  # b's rows come first
    assert rows.column("content_hash").null_count == 1  # the broken line has no hash
    out = by_id(ops.mark_duplicates(rows))
    assert out["a:1"]["status"] == "kept"
    assert (out["a:3"]["status"], out["a:3"]["op"], out["a:3"]["merged_into"]) == ("merged", "exact_dedup", "a:1")
    assert out["b:1"]["status"] == "merged" and out["b:1"]["merged_into"] == "a:1"
    assert out["b:1"]["reason"] == "duplicate"
    assert out["a:2"]["status"] == "kept" and out["b:2"]["status"] == "dropped"
    # same answer whichever order the batch arrives in
    reversed_out = by_id(ops.mark_duplicates(rows.take(list(range(rows.num_rows))[::-1])))
    assert {k: r["status"] for k, r in reversed_out.items()} == {k: r["status"] for k, r in out.items()}


def test_dropped_rows_are_not_dedup_anchors():
    # The first copy is filtered out (too long); the later copy must stay kept, not merge into a dropped row.
    long_answer = "z" * 30
    t = lines_table("s", [alpaca("q", long_answer), alpaca("q", long_answer)])
    rows = ops.length_filter(ops.parse_lines(t), min_chars=1, max_chars=10)
    out = by_id(ops.mark_duplicates(ops.add_content_hash(rows)))
    assert [out[i]["status"] for i in ("s:1", "s:2")] == ["dropped", "dropped"]
    rows = ops.parse_lines(lines_table("s", ["bad", alpaca("q", "a"), alpaca("q", "a")]))
    out = by_id(ops.mark_duplicates(ops.add_content_hash(rows)))
    assert [out[i]["status"] for i in ("s:1", "s:2", "s:3")] == ["dropped", "kept", "merged"]


def test_curate_batch_without_dedup_keeps_duplicates():
    t = lines_table("s", [alpaca("q", "a"), alpaca("q", "a")])
    assert ops.curate_batch(t, 1, 100, exact_dedup=False).column("status").to_pylist() == ["kept", "kept"]
    assert ops.curate_batch(t, 1, 100).column("status").to_pylist() == ["kept", "merged"]


def test_curate_batch_with_a_filter_spec():
    from loraforge.spec import FilterSpec

    t = lines_table("s", [alpaca("q", "a b c d"), alpaca("q", "a")])
    out = ops.curate_batch(t, filters=FilterSpec(min_words=2))
    assert out.column("reason").to_pylist() == [None, "too_few_words"]


def test_pure_core_does_not_import_ray():
    code = ("import sys, loraforge.data.ops, loraforge.data.ledger, loraforge.data.io, loraforge.data.output, "
            "loraforge.data.plots, loraforge.data.filters, loraforge.data.pii; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
