"""Curation ops on in-memory Arrow batches: reading, parsing, filters, exact dedup (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pytest

from loraforge.data import ops
from loraforge.data.schema import LINE_SCHEMA, MESSAGES_TYPE, ROW_SCHEMA


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


@pytest.mark.parametrize(
    ("answer", "user", "reason"),
    [("", "q", "empty"), ("   \n", "q", "empty"), ("abc", "q", "too_short"), ("abcde", "q", None),
     ("abcde", "q" * 6, "too_long"), ("abcde", "q" * 5, None)],
)
def test_length_reason(answer, user, reason):
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    total = sum(len(m["content"]) for m in messages)
    assert ops.length_reason(messages, total, min_chars=4, max_chars=10) == reason


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


def test_pure_core_does_not_import_ray():
    code = ("import sys, loraforge.data.ops, loraforge.data.ledger, loraforge.data.io, loraforge.data.output, "
            "loraforge.data.plots; assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
