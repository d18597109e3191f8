"""The curation ledger (one entry per input row: kept, dropped or merged) and its manifest summary.

`check_ledger` enforces "nothing is lost": rows in == kept + dropped + merged, ids are unique,
every merged row points at a kept row and every dropped row says which op dropped it and why.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from loraforge.data.schema import DROPPED, KEPT, LEDGER_SCHEMA, MERGED, OPS, ORDER_KEYS, STATUSES

COUNT_KEYS = ("in", KEPT, DROPPED, MERGED)


class LedgerInvariantError(RuntimeError):
    """A bug, not a user error: the ledger does not account for every input row."""


def ledger_table(rows: pa.Table) -> pa.Table:
    """ROW_SCHEMA rows -> the ledger (LEDGER_SCHEMA), in input order."""
    rows = rows.sort_by([(k, "ascending") for k in ORDER_KEYS])
    return rows.select(LEDGER_SCHEMA.names).cast(LEDGER_SCHEMA)


def check_ledger(ledger: pa.Table, rows_in: int) -> dict[str, int]:
    """Raise LedgerInvariantError unless the ledger accounts for all `rows_in` rows; return counts."""
    entries = ledger.select(["id", "status", "op", "reason", "merged_into"]).to_pylist()
    counts = Counter(e["status"] for e in entries)
    problems = []
    unknown = set(counts) - set(STATUSES)
    if unknown:
        problems.append(f"unknown statuses {sorted(map(str, unknown))}")
    total = counts[KEPT] + counts[DROPPED] + counts[MERGED]
    if not (rows_in == len(entries) == total):
        problems.append(
            f"rows in ({rows_in}) != ledger entries ({len(entries)}) or != kept + dropped + merged "
            f"({counts[KEPT]} + {counts[DROPPED]} + {counts[MERGED]} = {total})"
        )
    ids = Counter(e["id"] for e in entries)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        problems.append(f"{len(repeated)} ids appear more than once, e.g. {repeated[:3]}")
    orphans = _orphan_merges(entries)
    if orphans:
        problems.append(
            f"{len(orphans)} merged rows point at no row that was kept at the time of the merge, e.g. {orphans[:3]}"
        )
    unexplained = [e["id"] for e in entries if e["status"] != KEPT and not (e["op"] and e["reason"])]
    if unexplained:
        problems.append(f"{len(unexplained)} dropped/merged rows lack op or reason, e.g. {unexplained[:3]}")
    if problems:
        raise LedgerInvariantError("curation ledger invariant violated: " + "; ".join(problems))
    return {"in": rows_in, KEPT: counts[KEPT], DROPPED: counts[DROPPED], MERGED: counts[MERGED]}


def _orphan_merges(entries: list[dict[str, Any]]) -> list[str]:
    """Merged rows whose target is unknown, itself, or was already gone when the merge happened.

    A target may leave later (a cluster's kept member dropped by contamination, merged again by fuzzy
    dedup, ...): the chain is then followed in the ledger. It must not have left at or before the op
    that merged into it, since that op would have merged into a row it could no longer see.
    """
    step = {op: i for i, op in enumerate(OPS)}
    by_id = {e["id"]: e for e in entries}
    bad = []
    for e in entries:
        if e["status"] != MERGED:
            continue
        target = by_id.get(e["merged_into"])
        if target is None or target["id"] == e["id"]:
            bad.append(e["id"])
        elif target["status"] != KEPT and step.get(target["op"], -1) <= step.get(e["op"], len(OPS)):
            bad.append(e["id"])
    return bad


def check_exact_dedup(rows: pa.Table) -> None:
    """Raise LedgerInvariantError if two kept rows still share a content hash (dedup missed them)."""
    kept = rows.filter(pc.equal(rows.column("status"), KEPT)).column("content_hash")
    distinct = pc.count_distinct(kept, mode="all").as_py()
    if distinct != len(kept):
        raise LedgerInvariantError(
            f"exact dedup left {len(kept) - distinct} duplicate kept rows (rows of one hash split apart)"
        )


def funnel(ledger: pa.Table, steps: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows left after each op that ran (`steps`, in pipeline order; default all), starting with all rows in."""
    removed = Counter(ledger.column("op").to_pylist())
    steps = list(OPS) if steps is None else steps
    unknown = set(removed) - set(steps) - {None}
    if unknown:
        raise LedgerInvariantError(f"ledger names ops {sorted(unknown)} that are not among the steps run {steps}")
    rows = ledger.num_rows
    out = [{"step": "in", "rows": rows}]
    for op in steps:
        rows -= removed.get(op, 0)
        out.append({"step": op, "rows": rows})
    return out


def build_manifest(
    ledger: pa.Table, rows_in: int, sources: list[str], steps: list[str] | None = None
) -> dict[str, Any]:
    """Counts in/kept/dropped/merged, per op, per reason and per source (checks the invariant first)."""
    counts = check_ledger(ledger, rows_in)
    entries = ledger.select(["source", "status", "op", "reason"]).to_pylist()
    by_op = Counter(e["op"] for e in entries if e["status"] != KEPT)
    by_reason = Counter(e["reason"] for e in entries if e["status"] != KEPT)
    by_source: dict[str, dict[str, int]] = {s: {"in": 0, KEPT: 0, DROPPED: 0, MERGED: 0} for s in sources}
    for e in entries:
        per = by_source.setdefault(e["source"], {"in": 0, KEPT: 0, DROPPED: 0, MERGED: 0})
        per["in"] += 1
        per[e["status"]] += 1
    return {
        **counts,  # in, kept, dropped, merged
        "by_op": dict(sorted(by_op.items())),
        "by_reason": dict(sorted(by_reason.items())),
        "by_source": by_source,
        "funnel": funnel(ledger, steps),
    }
