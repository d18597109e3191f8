"""Curation ops: pure functions from an Arrow batch to an Arrow batch (no Ray in here).

Chain: read_lines (files -> records) -> parse_lines (records -> ROW_SCHEMA rows) -> filters.apply_filters
-> pii.redact_pii -> add_content_hash -> mark_duplicates. Ops after parse only touch rows whose status is
still `kept` and mark the rest, so every input row reaches the ledger.

Input files (by suffix): `.parquet` (each record is one row, read in chunks), `.txt` (plain text, format
text: documents are blocks of lines separated by blank lines) and anything else JSONL (one record per line).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loraforge.data.formats import BAD_ENCODING, Conversation, Parsed, RowError, parse_line, text_chars
from loraforge.data.schema import (
    DROPPED,
    DUPLICATE,
    FILE_SCHEMA,
    KEPT,
    LINE_SCHEMA,
    MERGED,
    OP_EXACT_DEDUP,
    OP_PARSE,
    ORDER_KEYS,
    ROW_SCHEMA,
)
from loraforge.errors import DataError

if TYPE_CHECKING:
    from loraforge.spec import FilterSpec

READ_CHUNK_LINES = 20_000
JSONL, PARQUET, TXT = "jsonl", "parquet", "txt"


# ---------------------------------------------------------------- read
def input_type(path: str | Path) -> str:
    """How a file is read, from its suffix: parquet, txt or (anything else) jsonl."""
    suffix = Path(path).suffix.lower()
    return PARQUET if suffix == ".parquet" else TXT if suffix == ".txt" else JSONL


def check_input_file(path: str | Path, fmt: str) -> None:
    """Whole-file problems, before any row is read: raise DataError naming the file.

    A `.txt` file holds plain documents, so its format must be text (or auto); a `.parquet` file must open
    as Parquet. Call it when resolving inputs so a bad file fails the stage before the cluster does work.
    """
    kind = input_type(path)
    if kind == TXT and fmt not in ("text", "auto"):
        raise DataError(f"{path}: a .txt input holds plain text documents; its format must be text, not {fmt!r}")
    if kind == PARQUET:
        _open_parquet(str(path))


def _open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read as Parquet: {err}") from None


class _Chunker:
    """Collects (line, text) of one file and emits LINE_SCHEMA tables of at most `size` rows."""

    def __init__(self, f: dict[str, Any], fmt: str, size: int):
        self.file, self.fmt, self.size = f, fmt, size
        self.numbers: list[int] = []
        self.texts: list[str | None] = []

    def add(self, number: int, text: str | None) -> pa.Table | None:
        self.numbers.append(number)
        self.texts.append(text)
        return self.flush() if len(self.numbers) >= self.size else None

    def flush(self) -> pa.Table | None:
        n = len(self.numbers)
        if n == 0:
            return None
        f = self.file
        group = f.get("group") or f["source"]
        table = pa.Table.from_arrays(
            [
                pa.array([f["input_index"]] * n, pa.int32()),
                pa.array([f["source"]] * n, pa.string()),
                pa.array([self.fmt] * n, pa.string()),
                pa.array([group] * n, pa.string()),
                pa.array([bool(f.get("rehearsal"))] * n, pa.bool_()),
                pa.array(self.numbers, pa.int64()),
                pa.array(self.texts, pa.string()),
            ],
            schema=LINE_SCHEMA,
        )
        self.numbers, self.texts = [], []
        return table


def _jsonl_records(path: str) -> Iterator[tuple[int, str | None]]:
    """Non-blank lines, each decoded on its own so one bad byte costs one row, not the file."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield number, None


def text_documents(path: str) -> Iterator[tuple[int, str | None]]:
    """A plain text file's documents: blocks of non-blank lines separated by blank lines, each with the
    number of its first line; a block with a line that is not UTF-8 is None (one bad row, not the file)."""
    first, lines, bad = 0, [], False
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                if lines or bad:
                    yield first, None if bad else "\n".join(lines)
                first, lines, bad = 0, [], False
                continue
            first = first or number
            try:
                lines.append(raw.decode("utf-8").rstrip("\r\n"))
            except UnicodeDecodeError:
                bad = True
    if lines or bad:
        yield first, None if bad else "\n".join(lines)


def _text_records(path: str) -> Iterator[tuple[int, str | None]]:
    for number, text in text_documents(path):
        yield number, None if text is None else json.dumps({"text": text}, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """JSON fallback for Parquet values that are not JSON types: bytes as UTF-8 text (a UnicodeDecodeError
    makes the record a bad_encoding row), anything else (dates, decimals, ...) as its str()."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _record_json(record: dict[str, Any]) -> str | None:
    try:
        return json.dumps(record, ensure_ascii=False, default=_plain)
    except UnicodeDecodeError:
        return None


def _parquet_records(path: str, chunk: int) -> Iterator[tuple[int, str | None]]:
    """Records (1-based record numbers) as JSON text, read `chunk` records at a time, so every input
    format parses through the same path as JSONL."""
    pf = _open_parquet(path)
    number = 0
    try:
        for batch in pf.iter_batches(batch_size=chunk):
            for record in batch.to_pylist():
                number += 1
                yield number, _record_json(record)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read Parquet record {number + 1}: {err}") from None


def read_lines(files: pa.Table, chunk_lines: int = READ_CHUNK_LINES) -> Iterator[pa.Table]:
    """Files (FILE_SCHEMA) -> their records (LINE_SCHEMA), in chunks of at most `chunk_lines`.

    JSONL: non-blank lines numbered from 1. Parquet: records numbered from 1, as JSON text. Text (.txt):
    blank-line separated documents numbered by their first line, as JSON {"text": ...}. Raises DataError
    for a whole-file problem (a Parquet file that does not open, a .txt input with a non-text format).
    """
    for f in files.to_pylist():
        path, fmt = f["path"], f["format"]
        check_input_file(path, fmt)
        kind = input_type(path)
        if kind == TXT:
            fmt, records = "text", _text_records(path)
        elif kind == PARQUET:
            records = _parquet_records(path, chunk_lines)
        else:
            records = _jsonl_records(path)
        chunker = _Chunker(f, fmt, chunk_lines)
        for number, text in records:
            table = chunker.add(number, text)
            if table is not None:
                yield table
        table = chunker.flush()
        if table is not None:
            yield table


def file_table(files: list[dict[str, Any]]) -> pa.Table:
    """FILE_SCHEMA rows from dicts with input_index, source, path, format and optionally group, rehearsal."""
    return pa.Table.from_pylist(files, schema=FILE_SCHEMA)


# ---------------------------------------------------------------- parse
def row_id(source: str, line: int, sub: int) -> str:
    return f"{source}:{line}" if sub == 0 else f"{source}:{line}#{sub}"


# Columns parse_lines fills; every other ROW_SCHEMA column starts null.
_PARSED_COLUMNS = (
    "id", "source", "input_index", "line", "sub", "kind", "messages", "rejected", "text_chars",
    "group", "rehearsal", "status", "op", "reason", "detail",
)


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def parse_lines(lines: pa.Table) -> pa.Table:
    """Records (LINE_SCHEMA) -> rows (ROW_SCHEMA); unusable records become `dropped` rows of op parse.

    Fills id, source, input_index, line, sub, kind, messages, rejected, text_chars, group (default: the
    source name), rehearsal (default false) and status/op/reason/detail.
    """
    cols: dict[str, list[Any]] = {name: [] for name in _PARSED_COLUMNS}

    def add(src: str, idx: int, number: int, group: str, rehearsal: bool, sub: int,
            result: Parsed | RowError) -> None:
        cols["id"].append(row_id(src, number, sub))
        cols["source"].append(src)
        cols["input_index"].append(idx)
        cols["line"].append(number)
        cols["sub"].append(sub)
        cols["group"].append(group)
        cols["rehearsal"].append(rehearsal)
        if isinstance(result, RowError):
            for name in ("kind", "messages", "rejected", "text_chars"):
                cols[name].append(None)
            cols["status"].append(DROPPED)
            cols["op"].append(OP_PARSE)
            cols["reason"].append(result.reason)
            cols["detail"].append(result.detail)
        else:
            cols["kind"].append(result.kind)
            cols["messages"].append(result.messages)
            cols["rejected"].append(result.rejected)
            cols["text_chars"].append(text_chars(result.messages))
            cols["status"].append(KEPT)
            for name in ("op", "reason", "detail"):
                cols[name].append(None)

    inputs = zip(
        *(_column(lines, name) for name in ("source", "input_index", "line", "format", "group", "rehearsal", "text")),
        strict=True,
    )
    for src, idx, number, fmt, group, rehearsal, text in inputs:
        group, rehearsal = group or src, bool(rehearsal)
        if text is None:
            add(src, idx, number, group, rehearsal, 0, RowError(BAD_ENCODING, "not valid UTF-8 text"))
            continue
        try:
            parsed = parse_line(text, fmt or "auto")
        except RowError as err:
            add(src, idx, number, group, rehearsal, 0, err)
            continue
        for sub, result in parsed:
            add(src, idx, number, group, rehearsal, sub, result)
    n = len(cols["id"])
    arrays = [
        pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type) for f in ROW_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=ROW_SCHEMA)


# ---------------------------------------------------------------- filter
def mark_rows(table: pa.Table, updates: dict[int, dict[str, Any]]) -> pa.Table:
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


def length_filter(table: pa.Table, min_chars: int, max_chars: int) -> pa.Table:
    """Only the length checks of filters.apply_filters (empty / too_short / too_long); kept for callers
    that predate FilterSpec."""
    from loraforge.data.filters import apply_filters, length_only

    return apply_filters(table, length_only(min_chars, max_chars))


# ---------------------------------------------------------------- exact dedup
def normalise_messages(messages: Conversation) -> list[list[str]]:
    """Whitespace runs -> one space, ends stripped; case and roles kept."""
    return [[m["role"], " ".join(m["content"].split())] for m in messages]


def content_hash(messages: Conversation, rejected: str | None = None) -> str:
    """Hash of the normalised conversation; a preference pair's rejected answer is part of its content."""
    parts: list = normalise_messages(messages)
    if rejected is not None:
        parts = [*parts, ["rejected", " ".join(rejected.split())]]
    blob = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


def add_content_hash(table: pa.Table) -> pa.Table:
    statuses = table.column("status").to_pylist()
    messages = table.column("messages").to_pylist()
    rejected = table.column("rejected").to_pylist()
    hashes = [
        content_hash(m, r) if s == KEPT else None for s, m, r in zip(statuses, messages, rejected, strict=True)
    ]
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
    return mark_rows(table, updates)


# ---------------------------------------------------------------- select
def with_status(table: pa.Table, status: str, keep: bool = True) -> pa.Table:
    """Rows whose status is (keep=True) or is not (keep=False) `status`."""
    mask = pc.equal(table.column("status"), status)
    return table.filter(mask if keep else pc.invert(mask))


def curate_batch(
    table: pa.Table, min_chars: int = 1, max_chars: int = 8000, exact_dedup: bool = True,
    filters: FilterSpec | None = None,
) -> pa.Table:
    """Parse, filter and exact-dedup one in-memory table of lines, for tests. `filters` (a FilterSpec)
    replaces the plain length checks given by min_chars/max_chars."""
    from loraforge.data.filters import apply_filters, length_only

    rows = apply_filters(parse_lines(table), filters or length_only(min_chars, max_chars))
    return mark_duplicates(add_content_hash(rows)) if exact_dedup else rows
