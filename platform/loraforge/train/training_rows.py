"""What train reads: conversations plus curate's per-token loss weights and curriculum position.

A curate output folder (Parquet under data/, OUTPUT_SCHEMA columns) yields rows in `position` order
(rows without a position follow, in file order), so "as_written" training walks curate's curriculum.
JSONL files (alpaca, chat, ...) are delegated to the curation reader and carry no weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loraforge.errors import DataError

Conversation = list[dict[str, str]]
OPTIONAL_COLUMNS = ("id", "loss_weights", "position")


@dataclass(frozen=True)
class TrainingRow:
    messages: Conversation
    loss_weights: list[float] | None = None  # one per predicted label token (see sft_data); None: all 1
    position: int | None = None  # curriculum order from curate's mixture op
    id: str | None = None


def _parquet_files(folder: Path) -> list[Path]:
    data = folder / "data" if (folder / "data").is_dir() else folder
    return sorted(data.glob("*.parquet"))


def _read_parquet(files: list[Path]) -> list[TrainingRow]:
    rows: list[TrainingRow] = []
    for f in files:
        try:
            names = set(pq.read_schema(f).names)
            if "messages" not in names:
                raise DataError(f"{f} has no `messages` column (not a curate output)")
            table = pq.read_table(f, columns=["messages", *[c for c in OPTIONAL_COLUMNS if c in names]])
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"cannot read training rows from {f}: {err}") from None
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        none = [None] * table.num_rows
        for messages, weights, position, row_id in zip(
            cols["messages"], cols.get("loss_weights", none), cols.get("position", none), cols.get("id", none),
            strict=True,
        ):
            if not messages:
                raise DataError(f"{f}: row {row_id or len(rows)} has no messages")
            rows.append(TrainingRow(messages, weights, position, row_id))
    # Stable: ties and rows without a position keep file order.
    return sorted(rows, key=lambda r: (r.position is None, r.position or 0))


def read_training_rows(path: str | Path) -> list[TrainingRow]:
    """Rows from a curate output folder, a Parquet file or folder, or a JSONL file.

    Raises DataError naming the file when something is unusable or nothing is there.
    """
    from loraforge.resolve import resolve_data

    resolved = resolve_data(str(path))
    if resolved.is_dir():
        files = _parquet_files(resolved)
        if not files:
            raise DataError(f"no Parquet files in {resolved} (expected a curate output folder)")
        rows = _read_parquet(files)
    elif resolved.suffix == ".parquet":
        rows = _read_parquet([resolved])
    else:
        from loraforge.data.io import read_conversations

        # getattr: the reader may return parsed-row objects carrying `messages` or bare conversations
        rows = [TrainingRow(getattr(conv, "messages", conv)) for conv in read_conversations(resolved)]
    if not rows:
        raise DataError(f"no conversations in {resolved}")
    return rows
