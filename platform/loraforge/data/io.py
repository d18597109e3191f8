"""Load conversations for training: a curate output folder (Parquet), a Parquet file, a JSONL file or a
plain text file.

Every row becomes one conversation (`[{"role", "content"}]`): a preference pair its prompt and chosen
answer, a text document one assistant message.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loraforge.data.formats import Conversation, RowError, parse_line, parse_record
from loraforge.data.ops import PARQUET, TXT, input_type, text_documents
from loraforge.errors import DataError
from loraforge.resolve import resolve_data


def parquet_files(folder: Path) -> list[Path]:
    """The data files of a curate output folder (its data/ subfolder) or of a plain Parquet folder."""
    data = folder / "data" if (folder / "data").is_dir() else folder
    return sorted(data.glob("*.parquet"))


def _parquet_file(f: Path) -> Iterator[Conversation]:
    """A file with a `messages` column (what curate writes) is read as is; any other Parquet file is read
    record by record in the input formats (alpaca, chat, preference, ...), like a JSONL file."""
    number = 0
    try:
        pf = pq.ParquetFile(f)
        if "messages" in pf.schema_arrow.names:
            yield from pf.read(columns=["messages"]).column("messages").to_pylist()
            return
        for batch in pf.iter_batches():
            for record in batch.to_pylist():
                number += 1
                yield from _usable(parse_record(record, "auto"), f"{f}:record {number}")
    except RowError as err:
        raise DataError(f"{f}:record {number}: {err}") from None
    except (pa.ArrowException, OSError, KeyError) as err:
        raise DataError(f"cannot read conversations from {f}: {err}") from None


def _usable(rows: list, where: str) -> Iterator[Conversation]:
    for _sub, result in rows:
        if isinstance(result, RowError):
            raise DataError(f"{where}: {result}")
        yield result.messages


def _read_parquet(files: list[Path]) -> list[Conversation]:
    out: list[Conversation] = []
    for f in files:
        out.extend(_parquet_file(f))
    return out


def _read_jsonl(path: Path) -> list[Conversation]:
    out: list[Conversation] = []
    try:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    rows = parse_line(raw.decode("utf-8"), "auto")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{number}: line is not valid UTF-8") from None
                except RowError as err:
                    raise DataError(f"{path}:{number}: {err}") from None
                out.extend(_usable(rows, f"{path}:{number}"))
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return out


def _read_text(path: Path) -> list[Conversation]:
    """Blank-line separated documents, each one assistant message (the curate reader's .txt rule)."""
    out: list[Conversation] = []
    try:
        for number, text in text_documents(str(path)):
            if text is None:
                raise DataError(f"{path}:{number}: text block is not valid UTF-8")
            out.append([{"role": "assistant", "content": text}])
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return out


def read_conversations(path: str | Path) -> list[Conversation]:
    """Conversations (`[{"role", "content"}]`) from a curate output folder, a Parquet file or folder, a
    JSONL file (alpaca, chat, ShareGPT, self_instruct, preference or text rows; auto-detected per row) or a
    .txt file (blank-line separated documents).

    Raises DataError naming the file (and line or record) when something is unusable.
    """
    resolved = resolve_data(str(path))
    if resolved.is_dir():
        files = parquet_files(resolved)
        if not files:
            raise DataError(f"no Parquet files in {resolved} (expected a curate output folder)")
        rows = _read_parquet(files)
    elif input_type(resolved) == PARQUET:
        rows = _read_parquet([resolved])
    elif input_type(resolved) == TXT:
        rows = _read_text(resolved)
    else:
        rows = _read_jsonl(resolved)
    if not rows:
        raise DataError(f"no conversations in {resolved}")
    return rows
