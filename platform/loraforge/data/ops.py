"""Curation ops: pure functions from an Arrow batch to an Arrow batch (no Ray in here).

Chain: read_lines (files -> lines) -> parse_lines (lines -> ROW_SCHEMA rows) -> length_filter ->
add_content_hash -> mark_duplicates. Ops after parse only touch rows whose status is still `kept`
and mark the rest, so every input row reaches the ledger.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from loraforge.data.formats import BAD_ENCODING, Conversation, RowError, parse_line, text_chars
from loraforge.data.schema import (
    DROPPED,
    DUPLICATE,
    EMPTY,
    FILE_SCHEMA,
    KEPT,
    LINE_SCHEMA,
    MERGED,
    OP_EXACT_DEDUP,
    OP_FILTER,
    OP_PARSE,
    ORDER_KEYS,
    ROW_SCHEMA,
    TOO_LONG,
    TOO_SHORT,
)

READ_CHUNK_LINES = 20_000


# ---------------------------------------------------------------- read
def read_lines(files: pa.Table, chunk_lines: int = READ_CHUNK_LINES) -> Iterator[pa.Table]:
    """Files (FILE_SCHEMA) -> their non-blank lines (LINE_SCHEMA), numbered from 1, in chunks.

    Each line is decoded on its own, so one bad byte costs one row, not the file.
    """
    for f in files.to_pylist():
        cols: dict[str, list[Any]] = {name: [] for name in LINE_SCHEMA.names}
        with open(f["path"], "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    text: str | None = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    text = None
                cols["input_index"].append(f["input_index"])
                cols["source"].append(f["source"])
                cols["format"].append(f["format"])
                cols["line"].append(number)
                cols["text"].append(text)
                if len(cols["line"]) >= chunk_lines:
                    yield pa.table(cols, schema=LINE_SCHEMA)
                    cols = {name: [] for name in LINE_SCHEMA.names}
        if cols["line"]:
            yield pa.table(cols, schema=LINE_SCHEMA)


def file_table(files: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(files, schema=FILE_SCHEMA)


# ---------------------------------------------------------------- parse
def row_id(source: str, line: int, sub: int) -> str:
    return f"{source}:{line}" if sub == 0 else f"{source}:{line}#{sub}"


def _row(source: str, input_index: int, line: int, sub: int, result: Conversation | RowError) -> dict:
    row: dict[str, Any] = {
        "id": row_id(source, line, sub),
        "source": source,
        "input_index": input_index,
        "line": line,
        "sub": sub,
    }
    if isinstance(result, RowError):
        row.update(status=DROPPED, op=OP_PARSE, reason=result.reason, detail=result.detail)
    else:
        row.update(messages=result, text_chars=text_chars(result), status=KEPT)
    return row


def parse_lines(lines: pa.Table) -> pa.Table:
    """Lines (LINE_SCHEMA) -> rows (ROW_SCHEMA); unusable lines become `dropped` rows of op parse."""
    rows = []
    for ln in lines.to_pylist():
        src, idx, number = ln["source"], ln["input_index"], ln["line"]
        if ln["text"] is None:
            rows.append(_row(src, idx, number, 0, RowError(BAD_ENCODING, "line is not valid UTF-8")))
            continue
        try:
            parsed = parse_line(ln["text"], ln["format"])
        except RowError as err:
            rows.append(_row(src, idx, number, 0, err))
            continue
        rows.extend(_row(src, idx, number, sub, result) for sub, result in parsed)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# ---------------------------------------------------------------- filter
def _mark(table: pa.Table, updates: dict[int, dict[str, Any]]) -> pa.Table:
    """Rewrite status/op/reason/detail/merged_into of the given row positions."""
    if not updates:
        return table
    for col in ("status", "op", "reason", "detail", "merged_into"):
        values = table.column(col).to_pylist()
        changed = False
        for pos, upd in updates.items():
            if col in upd:
                values[pos] = upd[col]
                changed = True
        if changed:
            table = table.set_column(table.schema.get_field_index(col), col, pa.array(values, pa.string()))
    return table


def length_reason(messages: Conversation, total_chars: int, min_chars: int, max_chars: int) -> str | None:
    """Why a conversation fails the length filter, or None. Assistant text is counted stripped."""
    answer_chars = sum(len(m["content"].strip()) for m in messages if m["role"] == "assistant")
    if answer_chars == 0:
        return EMPTY
    if answer_chars < min_chars:
        return TOO_SHORT
    if total_chars > max_chars:
        return TOO_LONG
    return None


def length_filter(table: pa.Table, min_chars: int, max_chars: int) -> pa.Table:
    """Drop (mark) kept rows with an empty/short assistant answer or too many characters in total."""
    statuses = table.column("status").to_pylist()
    messages = table.column("messages").to_pylist()
    chars = table.column("text_chars").to_pylist()
    updates = {}
    for pos, status in enumerate(statuses):
        if status != KEPT:
            continue
        reason = length_reason(messages[pos], chars[pos], min_chars, max_chars)
        if reason:
            detail = {
                EMPTY: "assistant text is empty",
                TOO_SHORT: f"assistant text shorter than min_chars={min_chars}",
                TOO_LONG: f"{chars[pos]} chars > max_chars={max_chars}",
            }[reason]
            updates[pos] = {"status": DROPPED, "op": OP_FILTER, "reason": reason, "detail": detail}
    return _mark(table, updates)


# ---------------------------------------------------------------- exact dedup
def normalise_messages(messages: Conversation) -> list[list[str]]:
    """Whitespace runs -> one space, ends stripped; case and roles kept."""
    return [[m["role"], " ".join(m["content"].split())] for m in messages]


def content_hash(messages: Conversation) -> str:
    blob = json.dumps(normalise_messages(messages), ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


def add_content_hash(table: pa.Table) -> pa.Table:
    statuses = table.column("status").to_pylist()
    messages = table.column("messages").to_pylist()
    hashes = [content_hash(m) if s == KEPT else None for s, m in zip(statuses, messages, strict=True)]
    return table.set_column(
        table.schema.get_field_index("content_hash"), "content_hash", pa.array(hashes, pa.string())
    )


def mark_duplicates(table: pa.Table) -> pa.Table:
    """Within this batch, keep the first kept row (in ORDER_KEYS order) of each content hash and mark
    the others `merged` into it. Correct globally only if a hash's rows all share one batch: the Ray
    shell sorts on `content_hash` first (and ledger.check_exact_dedup verifies the result)."""
    table = table.sort_by([(k, "ascending") for k in ORDER_KEYS])
    statuses = table.column("status").to_pylist()
    hashes = table.column("content_hash").to_pylist()
    ids = table.column("id").to_pylist()
    first: dict[str, str] = {}
    updates = {}
    for pos, (status, h) in enumerate(zip(statuses, hashes, strict=True)):
        if status != KEPT or h is None:
            continue
        if h in first:
            updates[pos] = {"status": MERGED, "op": OP_EXACT_DEDUP, "reason": DUPLICATE,
                            "merged_into": first[h]}
        else:
            first[h] = ids[pos]
    return _mark(table, updates)


# ---------------------------------------------------------------- select
def with_status(table: pa.Table, status: str, keep: bool = True) -> pa.Table:
    """Rows whose status is (keep=True) or is not (keep=False) `status`."""
    mask = pc.equal(table.column("status"), status)
    return table.filter(mask if keep else pc.invert(mask))


def curate_batch(table: pa.Table, min_chars: int, max_chars: int, exact_dedup: bool = True) -> pa.Table:
    """The whole chain on one in-memory table of lines: what the Ray pipeline computes, for tests."""
    rows = length_filter(parse_lines(table), min_chars, max_chars)
    return mark_duplicates(add_content_hash(rows)) if exact_dedup else rows
