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
# Row kinds: an SFT conversation, a preference pair (messages end with the chosen answer, `rejected`
# holds the other answer) or a plain text document (one assistant message holding the text).
KIND_CHAT, KIND_PREFERENCE, KIND_TEXT = "chat", "preference", "text"
# Ops in pipeline order; each marks rows with its own name in the ledger's `op` column. Whole-row dedup
# (exact, then fuzzy) runs before line dedup, so cutting shared lines cannot hide a near-duplicate row.
OP_PARSE, OP_FILTER, OP_PII = "parse", "filter", "pii"
OP_EXACT_DEDUP, OP_LINE_DEDUP, OP_FUZZY_DEDUP = "exact_dedup", "line_dedup", "fuzzy_dedup"
OP_CONTAMINATION, OP_SCORES, OP_MODS, OP_MIXTURE = "contamination", "scores", "mods", "mixture"
OPS = (
    OP_PARSE, OP_FILTER, OP_PII, OP_EXACT_DEDUP, OP_FUZZY_DEDUP, OP_LINE_DEDUP,
    OP_CONTAMINATION, OP_SCORES, OP_MODS, OP_MIXTURE,
)
EMPTY, TOO_SHORT, TOO_LONG, DUPLICATE = "empty", "too_short", "too_long", "duplicate"

# Order of rows everywhere (dedup's "first", output files, ledger): input position in the spec,
# then line number, then instance number within a line.
ORDER_KEYS = ["input_index", "line", "sub"]

# One row per input file, the reader's input. `group` (mixture group; null: the source name) and
# `rehearsal` (general-corpus replay input) are copied onto every row read from the file.
FILE_SCHEMA = pa.schema(
    [
        ("input_index", pa.int32()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("format", pa.string()),
        ("group", pa.string()),
        ("rehearsal", pa.bool_()),
    ]
)

# One row per input record: a non-blank JSONL line, a Parquet record (as JSON text) or a plain-text
# document (as JSON text {"text": ...}). `line` is the 1-based line number (JSONL; for text documents
# the first line of the block) or record number (Parquet); `text` is null when it is not valid UTF-8.
LINE_SCHEMA = pa.schema(
    [
        ("input_index", pa.int32()),
        ("source", pa.string()),
        ("format", pa.string()),
        ("group", pa.string()),
        ("rehearsal", pa.bool_()),
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
        ("kind", pa.string()),  # chat | preference | text (null for rows dropped by parse)
        ("messages", MESSAGES_TYPE),  # null for rows dropped by parse
        ("rejected", pa.string()),  # preference pairs: the rejected answer
        ("text_chars", pa.int64()),
        ("content_hash", pa.string()),  # set for kept rows before dedup
        ("heuristic_score", pa.float64()),  # filters: higher is better; picks the member a dedup cluster keeps
        ("pii", pa.map_(pa.string(), pa.int32())),  # redactions per PII type (null: none)
        ("lines_removed", pa.int32()),  # line dedup: lines cut from this row's responses
        ("group", pa.string()),  # mixture group (input's group, default its source name)
        ("rehearsal", pa.bool_()),  # general-corpus replay input
        ("ppl", pa.float64()),  # perplexity of the response under the scoring model
        ("ifd", pa.float64()),  # loss(answer | instruction) / loss(answer)
        ("token_scores", pa.list_(pa.float32())),  # token cleaning: base loss - reference loss per label token
        ("loss_weights", pa.list_(pa.float32())),  # per label token (train's tokenisation), 1 kept / 0 cleaned
        ("quality", pa.float64()),  # MoDS quality scorer output
        ("position", pa.int64()),  # output order (curriculum), set by the mixture op
        ("status", pa.string()),
        ("op", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),  # human-readable why (e.g. the JSON error message)
        ("merged_into", pa.string()),
    ]
)

# What train reads: the conversation plus the scores that selection and curriculum used.
OUTPUT_COLUMNS = [
    "id", "source", "kind", "messages", "rejected", "group", "heuristic_score",
    "ppl", "ifd", "quality", "loss_weights", "position",
]
OUTPUT_SCHEMA = pa.schema([ROW_SCHEMA.field(name) for name in OUTPUT_COLUMNS])

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
