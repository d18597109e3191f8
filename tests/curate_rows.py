"""Builders of ROW_SCHEMA tables for curation op tests (no Ray, no files)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from loraforge.data.schema import KEPT, KIND_CHAT, ROW_SCHEMA


def chat(user: str, answer: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def make_rows(rows: list[dict[str, Any]], source: str = "s") -> pa.Table:
    """Kept ROW_SCHEMA rows; each dict needs `messages` (or user+answer) and may set any other column.

    Ids default to "<source>:<n>" with line n = position + 1, so input order is list order.
    """
    out = []
    for n, r in enumerate(rows, start=1):
        r = dict(r)
        if "messages" not in r:
            r["messages"] = chat(r.pop("user"), r.pop("answer"))
        row = {
            "id": f"{source}:{n}",
            "source": source,
            "input_index": 0,
            "line": n,
            "sub": 0,
            "kind": KIND_CHAT,
            "text_chars": sum(len(m["content"]) for m in r["messages"]),
            "status": KEPT,
            "group": source,
            "rehearsal": False,
        }
        row.update(r)
        out.append(row)
    return pa.Table.from_pylist(out, schema=ROW_SCHEMA)
