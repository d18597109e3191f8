"""Arrow schemas shared by the curation ops, the Ray pipeline and the readers.

Every op takes and returns `ROW_SCHEMA` tables, so a batch keeps one shape from parse to write and
rows are marked (status/op/reason) instead of removed: nothing can silently disappear.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)

KEPT, DROPPED, MERGED = "kept", "dropped", "merged"
STATUSES = (KEPT, DROPPED, MERGED)
# Ops in pipeline order, with the reasons each can give (the parse reasons live in formats.py).
OP_PARSE, OP_FILTER, OP_EXACT_DEDUP = "parse", "filter", "exact_dedup"
OPS = (OP_PARSE, OP_FILTER, OP_EXACT_DEDUP)
EMPTY, TOO_SHORT, TOO_LONG, DUPLICATE = "empty", "too_short", "too_long", "duplicate"

# Order of rows everywhere (dedup's "first", output files, ledger): input position in the spec,
# then line number, then instance number within a line.
ORDER_KEYS = ["input_index", "line", "sub"]

# One row per input file, the reader's input.
FILE_SCHEMA = pa.schema(
    [("input_index", pa.int32()), ("source", pa.string()), ("path", pa.string()), ("format", pa.string())]
)

# One row per non-blank line; `text` is null when the line is not valid UTF-8.
LINE_SCHEMA = pa.schema(
    [
        ("input_index", pa.int32()),
        ("source", pa.string()),
        ("format", pa.string()),
        ("line", pa.int64()),
        ("text", pa.string()),
    ]
)

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # "<source>:<line>" or "<source>:<line>#<instance>" (self_instruct)
        ("source", pa.string()),
        ("input_index", pa.int32()),
        ("line", pa.int64()),
        ("sub", pa.int32()),
        ("messages", MESSAGES_TYPE),  # null for rows dropped by parse
        ("text_chars", pa.int64()),
        ("content_hash", pa.string()),  # set for kept rows before dedup
        ("status", pa.string()),
        ("op", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),  # human-readable why (e.g. the JSON error message)
        ("merged_into", pa.string()),
    ]
)

OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("messages", MESSAGES_TYPE)])

LEDGER_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("op", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("merged_into", pa.string()),
    ]
)


def empty_rows() -> pa.Table:
    return ROW_SCHEMA.empty_table()
