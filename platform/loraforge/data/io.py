"""Load conversations for training: a curate output folder (Parquet) or a raw JSONL file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loraforge.data.formats import Conversation, RowError, parse_line
from loraforge.errors import DataError
from loraforge.resolve import resolve_data


def parquet_files(folder: Path) -> list[Path]:
    """The data files of a curate output folder (its data/ subfolder) or of a plain Parquet folder."""
    data = folder / "data" if (folder / "data").is_dir() else folder
    return sorted(data.glob("*.parquet"))


def _read_parquet(files: list[Path]) -> list[Conversation]:
    out: list[Conversation] = []
    for f in files:
        try:
            table = pq.read_table(f, columns=["messages"])
        except (pa.ArrowInvalid, OSError, KeyError) as err:
            raise DataError(f"cannot read conversations from {f}: {err}") from None
        out.extend(table.column("messages").to_pylist())
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
                for _sub, result in rows:
                    if isinstance(result, RowError):
                        raise DataError(f"{path}:{number}: {result}")
                    out.append(result)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    return out


def read_conversations(path: str | Path) -> list[Conversation]:
    """Conversations (`[{"role", "content"}]`) from a curate output folder, a Parquet file or folder,
    or a JSONL file (alpaca, chat, ShareGPT or self_instruct rows; auto-detected per row).

    Raises DataError naming the file (and line, for JSONL) when something is unusable.
    """
    resolved = resolve_data(str(path))
    if resolved.is_dir():
        files = parquet_files(resolved)
        if not files:
            raise DataError(f"no Parquet files in {resolved} (expected a curate output folder)")
        rows = _read_parquet(files)
    elif resolved.suffix == ".parquet":
        rows = _read_parquet([resolved])
    else:
        rows = _read_jsonl(resolved)
    if not rows:
        raise DataError(f"no conversations in {resolved}")
    return rows
