"""Atomic stage outputs: build everything in a hidden sibling folder, then rename it into place.

A reader never sees a half-written output, and an existing output is never overwritten.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loraforge.errors import DataError


def check_output_free(output: Path) -> None:
    """An output may be new or an empty folder; anything else is refused (never overwritten)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise DataError(f"output {output} exists and is not a folder; choose another output")
    if any(output.iterdir()):
        raise DataError(
            f"output folder {output} already exists and is not empty; remove it or choose another output"
        )


@contextmanager
def staged_output(output: Path) -> Iterator[Path]:
    """Yield a staging folder beside `output`; on clean exit rename it to `output`, else delete it."""
    check_output_free(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    try:
        yield staging
        check_output_free(output)  # again: something may have appeared while we worked
        if output.exists():
            output.rmdir()
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
