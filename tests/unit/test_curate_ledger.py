"""Ledger invariant (in == kept + dropped + merged), manifest, funnel plot and atomic output (no Ray)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from loraforge.data import ops
from loraforge.data.ledger import (
    COUNT_KEYS,
    LedgerInvariantError,
    build_manifest,
    check_exact_dedup,
    check_ledger,
    funnel,
    ledger_table,
)
from loraforge.data.output import staged_output
from loraforge.data.plots import save_funnel_plot
from loraforge.data.schema import LEDGER_SCHEMA, LINE_SCHEMA
from loraforge.errors import DataError


def curated() -> tuple[pa.Table, int]:
    rows = [
        {"instruction": "Say hi", "output": "hi there"},  # a:1 kept
        {"instruction": "Add", "input": "2+2", "output": "4"},  # a:2 kept
        "not json",  # a:3 parse
        {"instruction": "Say  hi", "output": "hi there"},  # a:4 merged into a:1
        {"instruction": "q", "output": ""},  # a:5 filter empty
        {"instruction": "q", "output": "x" * 200},  # a:6 filter too_long
        {"instruction": "Seed", "instances": [{"input": "", "output": "one"}, {"input": "", "output": "two"}]},
    ]
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    table = pa.Table.from_pylist(
        [{"input_index": 0, "source": "a", "format": "auto", "line": i, "text": t}
         for i, t in enumerate(lines, start=1)],
        schema=LINE_SCHEMA,
    )
    out = ops.curate_batch(table, min_chars=1, max_chars=100)
    return out, out.num_rows


def test_manifest_counts_and_invariant():
    rows, n = curated()
    assert n == 8  # 7 lines, the self_instruct line has two instances
    ledger = ledger_table(rows)
    assert ledger.schema == LEDGER_SCHEMA
    assert ledger.column("id").to_pylist() == ["a:1", "a:2", "a:3", "a:4", "a:5", "a:6", "a:7#1", "a:7#2"]
    m = build_manifest(ledger, n, ["a", "b"], ["parse", "filter", "exact_dedup"])
    assert {k: m[k] for k in COUNT_KEYS} == {"in": 8, "kept": 4, "dropped": 3, "merged": 1}
    assert m["in"] == m["kept"] + m["dropped"] + m["merged"]
    assert m["by_op"] == {"exact_dedup": 1, "filter": 2, "parse": 1}
    assert m["by_reason"] == {"bad_json": 1, "duplicate": 1, "empty": 1, "too_long": 1}
    assert m["by_source"] == {"a": {"in": 8, "kept": 4, "dropped": 3, "merged": 1},
                              "b": {"in": 0, "kept": 0, "dropped": 0, "merged": 0}}
    assert m["funnel"] == [{"step": "in", "rows": 8}, {"step": "parse", "rows": 7},
                           {"step": "filter", "rows": 5}, {"step": "exact_dedup", "rows": 4}]
    with pytest.raises(LedgerInvariantError, match="exact_dedup"):  # an op that marked rows must be a step
        funnel(ledger, ["parse", "filter"])
    json.dumps(m)  # serialisable as manifest.json


def _tamper(ledger: pa.Table, row: int, **changes) -> pa.Table:
    rows = ledger.to_pylist()
    rows[row].update(changes)
    return pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.slice(1), "rows in (8) != ledger entries (7)"),  # a row went missing
        (lambda t: _tamper(t, 1, status="lost"), "unknown statuses"),
        (lambda t: _tamper(t, 1, id="a:1"), "more than once"),
        (lambda t: _tamper(t, 3, merged_into="a:5"), "point at no row that was kept"),  # a:5 dropped earlier
        (lambda t: _tamper(t, 3, merged_into="a:404"), "point at no row that was kept"),  # no such row
        (lambda t: _tamper(t, 2, reason=None), "lack op or reason"),
    ],
)
def test_check_ledger_raises_when_a_row_is_unaccounted_for(mutate, message):
    rows, n = curated()
    ledger = ledger_table(rows)
    assert check_ledger(ledger, n)["in"] == n
    with pytest.raises(LedgerInvariantError, match="invariant violated") as info:
        build_manifest(mutate(ledger), n, ["a"])
    assert message in str(info.value)


def test_a_merge_target_may_leave_later_but_not_before():
    rows, n = curated()
    ledger = ledger_table(rows)
    merged = [i for i, r in enumerate(ledger.to_pylist()) if r["status"] == "merged"]
    target = ledger.column("merged_into")[merged[0]].as_py()
    pos = ledger.column("id").to_pylist().index(target)
    later = _tamper(ledger, pos, status="dropped", op="contamination", reason="ngram_overlap")
    assert check_ledger(later, n)["dropped"] == 4  # dropped after the exact-dedup merge: a valid chain
    earlier = _tamper(ledger, pos, status="dropped", op="filter", reason="too_long")
    with pytest.raises(LedgerInvariantError, match="point at no row that was kept"):
        check_ledger(earlier, n)


def test_funnel_plot_is_a_png(tmp_path):
    path = save_funnel_plot([{"step": "in", "rows": 10}, {"step": "parse", "rows": 8}], tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_staged_output_renames_into_place_and_refuses_non_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder (as StageContext.stage_dir makes) is fine
    with staged_output(out) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "x.txt").write_text("1")
        assert not (out / "x.txt").exists()  # nothing visible until done
    assert (out / "x.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(DataError, match=str(out)):
        with staged_output(out):
            pass
    assert (out / "x.txt").read_text() == "1"


def test_staged_output_failure_leaves_nothing(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(RuntimeError):
        with staged_output(out) as staging:
            (staging / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_check_exact_dedup_catches_duplicates_left_kept():
    rows, _ = curated()
    check_exact_dedup(rows)  # the real chain passes
    lines = pa.Table.from_pylist(
        [{"input_index": 0, "source": "s", "format": "auto", "line": i, "text": json.dumps(
            {"instruction": "q", "output": "a"})} for i in (1, 2)],
        schema=LINE_SCHEMA,
    )
    split_apart = ops.add_content_hash(ops.curate_batch(lines, 1, 100, exact_dedup=False))
    with pytest.raises(LedgerInvariantError, match="1 duplicate kept rows"):
        check_exact_dedup(split_apart)
