"""Where loraforge keeps its state: one home folder, overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from loraforge.errors import DataError

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def home() -> Path:
    """Root of caches, local MLflow store and run outputs (`LORAFORGE_HOME`, default ./.loraforge)."""
    return Path(os.environ.get("LORAFORGE_HOME", Path.cwd() / ".loraforge")).resolve()


def lab_dir() -> Path:
    return home() / "lab"


def runs_dir() -> Path:
    return home() / "runs"


def shared_data_dir(required: bool = True) -> Path:
    """Real data shipped beside the project (`LORAFORGE_SHARED_DATA`, default ../shared/data)."""
    path = Path(os.environ.get("LORAFORGE_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    if required and not path.is_dir():
        raise DataError(
            f"shared data folder not found: {path} (set LORAFORGE_SHARED_DATA to the folder that "
            "holds tinyshakespeare.txt and the self_instruct/gsm8k JSONL files)"
        )
    return path
